"""Build a (sharded) ScaNN index version from embeddings, tune it, and publish it atomically.

The configuration is chosen by shard size: exact brute force for small corpora
(``brute_force``), a spherical k-means tree with exact float scoring of the searched
leaves for medium ones (``tree_exact``, ``num_leaves`` near 2 sqrt(n): on 50k real
CIFAR-10 embeddings it beats tree + AH by ~1.4x at the same recall, because AH's lookup
tables and reordering cost more than scanning a few hundred short vectors), and tree +
AH + reorder above that (``tree_ah``, ``num_leaves`` near sqrt(n)). AH without a tree
(``ah``) is only used when asked for: without residuals its codes were too coarse on real
embeddings. Dot product on unit embeddings throughout. Every choice can be overridden
through ``IndexOptions`` and all of them are recorded in the manifest. After the build,
``lookalike.index.autotune`` picks the query-time ``leaves_to_search`` and reorder count
that meet ``target_recall`` at the highest throughput.

``build_shard`` + ``assemble_index`` are the two halves a distributed pipeline calls
(one ``build_shard`` per shard, then one ``assemble_index``); ``build_index`` does both
locally and ``build_and_publish`` wraps it in an atomic publish.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lookalike.index.manifest import (
    FORMAT, METRIC, REORDER_MODES, TREE_MODES, file_checksums, publish_atomically, shard_name, write_manifest,
)
from lookalike.index.rows import write_items_parquet
from lookalike.index.simd import enable_scann_simd
from lookalike.index.writes import save_array, save_searcher
from lookalike.model.store import Store

log = logging.getLogger(__name__)

BRUTE_FORCE_MAX_ITEMS = 20_000  # per shard: below this exact search is fast enough
TREE_EXACT_MAX_ITEMS = 200_000  # per shard: below this exact scoring of the searched leaves beats AH + reorder
TREE_EXACT_LEAVES_PER_SQRT_N = 2.0  # smaller leaves: fewer vectors scanned for the same recall (CIFAR-10: 448 > 224)
TRAINING_SAMPLE_MIN = 30_000
TRAINING_SAMPLE_PER_LEAF = 100  # below ~100 per leaf the k-means partitions lose recall badly
SCANN_MIN_PARTITION_SIZE = 50  # ScaNN's default: each k-means iteration re-seeds every leaf with fewer training points
MIN_PARTITION_PER_MEAN_LEAF = 0.25  # ours: a quarter of the mean leaf (see min_partition_size)
TREE_AH_MIN_ITEMS = 16  # ScaNN trains 16 AH centres per block on a tree shard's residuals: fewer items cannot
MODES = ("auto", "brute_force", "tree_exact", "ah", "tree_ah")


@dataclass(frozen=True)
class IndexOptions:
    """How to build. ``None`` means "choose": by size at build time, by autotuning at query time."""

    mode: str = "auto"  # auto | brute_force | tree_exact | ah | tree_ah
    num_neighbors: int = 10
    num_shards: int = 1
    num_leaves: int | None = None  # tree only; default ~2 sqrt(shard size) (tree_exact), ~sqrt (tree_ah)
    leaves_to_search: int | None = None  # tree only; None = autotuned
    reorder: int | None = None  # ah/tree: candidates re-scored exactly; None = autotuned
    training_sample_size: int | None = None  # tree and AH training; default max(30k, 100 per leaf)
    ah_dims_per_block: int = 2  # ah/tree_ah: dimensions per 16-centre AH block (1 = finer codes, slower scoring)
    autotune: bool = True
    target_recall: float = 0.95  # recall@tune_k against exact search
    tune_k: int = 10
    tune_queries: int = 1000  # corpus rows sampled as held-out queries
    seed: int = 0


def validate_embeddings(embeddings: np.ndarray, ids: list[str]) -> np.ndarray:
    """Check [N, D] finite, non-zero float embeddings and N unique ids; return unit float32 rows."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"expected [N, D] embeddings with N, D > 0, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"expected float embeddings, got dtype {emb.dtype}")
    if len(ids) != len(emb):
        raise ValueError(f"{len(ids)} ids for {len(emb)} embeddings")
    emb = emb.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        raise ValueError(f"embedding of item {ids[bad[0]]!r} has NaN or infinite values ({len(bad)} such rows)")
    norms = np.linalg.norm(emb, axis=1)
    zero = np.flatnonzero(norms < 1e-12)
    if len(zero):
        raise ValueError(f"embedding of item {ids[zero[0]]!r} is a zero vector and has no direction ({len(zero)} such rows)")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate item id {dup!r} in index build")
    off = np.abs(norms - 1.0) > 1e-3
    if off.any():
        log.info("normalising %d embedding(s) that are not unit length", int(off.sum()))
        emb = emb / norms[:, None]
    return np.ascontiguousarray(emb, dtype=np.float32)


def item_ids(items: pa.Table) -> list[str]:
    if "id" not in items.column_names:
        raise ValueError(f"items table needs an 'id' column, has {items.column_names}")
    ids = items.column("id").to_pylist()
    empty = [i for i, v in enumerate(ids) if v in (None, "")]
    if empty:
        raise ValueError(f"item at row {empty[0]} has an empty id")
    return [str(i) for i in ids]


def resolve_options(n: int, options: IndexOptions, *, warn: bool = True) -> dict[str, Any]:
    """Concrete build parameters for ``n`` items split into ``options.num_shards`` shards
    (a tree_ah fallback to brute force is logged as a warning unless not ``warn``)."""
    if options.mode not in MODES:
        raise ValueError(f"unknown index mode {options.mode!r}; use one of {', '.join(MODES)}")
    if options.num_shards < 1 or options.num_shards > max(1, n):
        raise ValueError(f"num_shards must be between 1 and the item count {n}, got {options.num_shards}")
    if not 0.0 < options.target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {options.target_recall}")
    if options.ah_dims_per_block not in (1, 2, 4):
        raise ValueError(f"ah_dims_per_block must be 1, 2 or 4, got {options.ah_dims_per_block}")
    per_shard = math.ceil(n / options.num_shards)
    mode = options.mode
    if mode == "auto":
        mode = ("brute_force" if per_shard < BRUTE_FORCE_MAX_ITEMS else
                "tree_exact" if per_shard < TREE_EXACT_MAX_ITEMS else "tree_ah")
    fallback = None
    if mode == "tree_ah" and n // options.num_shards < TREE_AH_MIN_ITEMS:
        fallback = (f"tree_ah needs at least {TREE_AH_MIN_ITEMS} items per shard (AH trains {TREE_AH_MIN_ITEMS} "
                    f"centres per block), got {n} item(s) in {options.num_shards} shard(s): built brute_force (exact)")
        if warn:
            log.warning("index mode %s", fallback)
        mode = "brute_force"
    params: dict[str, Any] = {"mode": mode, "num_neighbors": options.num_neighbors, "num_shards": options.num_shards,
                              "requested": {k: v for k, v in asdict(options).items() if v is not None}}
    if fallback:
        params["fallback"] = fallback
    per_sqrt = TREE_EXACT_LEAVES_PER_SQRT_N if mode == "tree_exact" else 1.0
    leaves = min(options.num_leaves or max(2, int(round(per_sqrt * math.sqrt(per_shard)))), per_shard)
    if mode != "brute_force":
        # a sample, not the corpus: k-means and codebook training time grows with it, quality barely
        sample = options.training_sample_size or max(TRAINING_SAMPLE_MIN, TRAINING_SAMPLE_PER_LEAF * leaves)
        params.update(training_sample_size=min(per_shard, sample))
    if mode in REORDER_MODES:
        params.update(reorder=options.reorder or 100, ah_dims_per_block=options.ah_dims_per_block)
    if mode in TREE_MODES:
        params.update(num_leaves=leaves, leaves_to_search=min(leaves, options.leaves_to_search or max(1, leaves // 10)),
                      spherical=True)  # spherical k-means: the right partitions for dot products of unit vectors
    return params


def min_partition_size(sample: int, num_leaves: int) -> int:
    """The smallest k-means leaf (in training points) ScaNN keeps rather than re-seeds.

    ScaNN's default of 50 is most of a leaf at ``tree_exact``'s ~70 points per leaf (20k items,
    283 leaves) and more than a leaf at 2k items (89 leaves of 22): on clustered or low-rank
    embeddings each iteration re-seeded many leaves, some came back empty (ScaNN's warning
    "Could not normalize centroid due to zero norm or empty or zero-weight partition") and
    the final tree kept leaves of 0-5 items (2k low-rank items: ~20 % outside their nearest
    leaf; 20k: 8 tuned leaves for recall 0.95 where 6 now do). A quarter of the mean leaf
    re-seeds only the starved ones. The warning can still appear once on tightly clustered
    embeddings; it is harmless: the empty leaf's centre is re-seeded in the same step.
    """
    return max(1, min(SCANN_MIN_PARTITION_SIZE, int(MIN_PARTITION_PER_MEAN_LEAF * sample / max(1, num_leaves))))


def build_searcher(embeddings: np.ndarray, params: dict[str, Any], docids: list[str] | None = None):
    """A ScaNN searcher over [N, D] float32 unit vectors with dot-product scores (docids enable updates)."""
    from lookalike.index.scann_module import scann_ops_pybind

    enable_scann_simd()
    builder = scann_ops_pybind().builder(embeddings, params["num_neighbors"], METRIC)
    mode = params["mode"]
    if mode in TREE_MODES:
        leaves, sample = min(params["num_leaves"], len(embeddings)), min(params["training_sample_size"], len(embeddings))
        builder = builder.tree(
            num_leaves=leaves,
            num_leaves_to_search=min(params["leaves_to_search"], params["num_leaves"]),
            training_sample_size=sample,
            min_partition_size=min_partition_size(sample, leaves),
            spherical=params.get("spherical", False),
        )
    if mode in REORDER_MODES:
        builder = builder.score_ah(params.get("ah_dims_per_block", 2), anisotropic_quantization_threshold=0.2,
                                   training_sample_size=min(params["training_sample_size"], len(embeddings)))
        builder = builder.reorder(params["reorder"])
    else:  # brute_force, tree_exact: exact float dot products (of every item, or of the searched leaves)
        builder = builder.score_brute_force()
    return builder.build(docids=docids)


def build_shard(embeddings: np.ndarray, items: pa.Table, *, index_dir: Path, shard: int, params: dict[str, Any]) -> dict[str, Any]:
    """Write shard number ``shard`` into ``index_dir/shard-NNNNN`` and return its manifest entry.

    One call per shard; a distributed pipeline can run these on different workers
    (``params`` from ``resolve_options``), then call ``assemble_index`` once.
    """
    ids = item_ids(items)
    emb = validate_embeddings(embeddings, ids)
    if params["mode"] == "tree_ah" and len(emb) < TREE_AH_MIN_ITEMS:
        raise ValueError(f"index shard {shard} has {len(emb)} item(s): mode tree_ah needs at least {TREE_AH_MIN_ITEMS} "
                         "per shard (AH trains 16 centres per block); use fewer shards or another index mode")
    from lookalike.index.scann_module import scann_ops_pybind

    scann_ops_pybind()  # the first import is not part of the build time

    started = time.perf_counter()
    searcher = build_searcher(emb, params, docids=list(ids))
    build_s = time.perf_counter() - started
    health = None
    if params["mode"] in TREE_MODES:
        searcher.initialize_health_stats()
        health = searcher.get_health_stats()
    name = shard_name(shard)
    out = Path(index_dir) / name
    save_searcher(searcher, out / "scann")
    write_items_parquet(items, out / "items.parquet")
    save_array(out / "embeddings.npy", emb)
    log.info("built %s shard %s of %d x %d in %.2fs", params["mode"], name, len(emb), emb.shape[1], build_s)
    return {"name": name, "count": int(len(emb)), "embed_dim": int(emb.shape[1]), "build_seconds": round(build_s, 3),
            "health_at_build": health, "files": file_checksums(Path(index_dir), name)}


def assemble_index(
    index_dir: Path,
    shards: list[dict[str, Any]],
    *,
    model_version: str,
    params: dict[str, Any],
    options: IndexOptions = IndexOptions(),
    queries: np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write the manifest over built shards, verify by loading, autotune, record results. Returns the manifest.
    ``metadata`` (the embed run's metadata file: path, sha256, ...) is recorded as is; so is
    ``source``, what the items were embedded from (``{"corpus": FOLDER}``, ``{"list_file": FILE}``
    or ``{"tfds": SPEC}``: reindex defaults to the served index's corpus folder)."""
    from lookalike.index.autotune import tune_index
    from lookalike.index.searcher import ItemIndex

    index_dir = Path(index_dir)
    dims = {s["embed_dim"] for s in shards}
    if len(dims) != 1:
        raise ValueError(f"shards disagree on the embedding dim: {sorted(dims)}")
    count = sum(s["count"] for s in shards)
    manifest: dict[str, Any] = {
        "format": FORMAT, "model_version": model_version, "count": count, "embed_dim": dims.pop(), "metric": METRIC,
        "build": params, "scann_kernels": enable_scann_simd(), "build_seconds": round(sum(s["build_seconds"] for s in shards), 3),
        "created_unix_s": time.time(), "shards": shards,
        "updates": {"base_count": count, "inserted": 0, "updated": 0, "deleted": 0, "parent_version": None},
    }
    if metadata is not None:
        manifest["metadata"] = metadata
    if source is not None:
        manifest["source"] = source
    write_manifest(index_dir, manifest)
    index = ItemIndex.load(index_dir)
    started = time.perf_counter()
    manifest["tuning"] = tune_index(index, options, queries=queries)
    manifest["tuning"]["tune_seconds"] = round(time.perf_counter() - started, 3)
    manifest["memory"] = index.memory_bytes_per_vector()
    write_manifest(index_dir, manifest)
    t, m = manifest["tuning"], manifest["memory"]
    quality = ("recall not measured (too few items: every item is searched, exact)" if t.get("skipped") else
               f"recall@{t['k']} {t['recall']:.3f} (target {t['target_recall']:.2f}{'' if t['target_met'] else ', NOT met'})")
    log.info("index %s: %d items in %d shard(s), mode %s, %s, %.0f QPS single-thread, "
             "leaves_to_search %s, reorder %s, %.0f index bytes/vector",
             index_dir.name, count, len(shards), params["mode"], quality, t["qps"], t["leaves_to_search"], t["reorder"],
             m["index_bytes_per_vector"])
    return manifest


def build_index(
    embeddings: np.ndarray,
    items: pa.Table,
    *,
    model_version: str,
    out_dir: Path,
    options: IndexOptions = IndexOptions(),
    queries: np.ndarray | None = None,
    metadata: dict[str, Any] | None = None,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write a complete index into ``out_dir`` (created; must not exist). Returns the manifest.

    ``embeddings`` is [N, D]; ``items`` has one row per embedding and at least an ``id``
    column; its other columns (uri, kind, width, height, content_hash, group, ...) are
    served as metadata. ``queries`` ([Q, D]) are the held-out tuning queries (default: a
    sample of the corpus, each excluding itself from its results).
    """
    ids = item_ids(items)
    emb = validate_embeddings(embeddings, ids)  # whole-corpus checks (duplicates across shards) before writing
    params = resolve_options(len(ids), options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    try:
        bounds = np.linspace(0, len(ids), options.num_shards + 1).astype(int)
        shards = [
            build_shard(emb[a:b], items.slice(a, b - a), index_dir=out_dir, shard=i, params=params)
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]
        return assemble_index(out_dir, shards, model_version=model_version, params=params, options=options, queries=queries,
                              metadata=metadata, source=source)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # we created it: leave nothing half-written
        raise


def build_and_publish(
    store: Store,
    embeddings: np.ndarray,
    items: pa.Table,
    *,
    model_version: str,
    options: IndexOptions = IndexOptions(),
    make_current: bool = True,
    version: str | None = None,
    metadata: dict[str, Any] | None = None,
    store_locked: bool = False,
    source: dict[str, str] | None = None,
) -> str:
    """Build in a temporary folder, rename into ``indexes/<version>`` (default: a new name),
    then move CURRENT (recorded in the store's history). ``metadata``, ``source``: see ``assemble_index``.
    ``make_current`` holds the store lock throughout (``LockHeldError`` if another run has it),
    unless ``store_locked`` says the caller holds it (``index.manifest.publish_atomically``)."""
    version = publish_atomically(
        store, lambda tmp: build_index(embeddings, items, model_version=model_version, out_dir=tmp, options=options,
                                       metadata=metadata, source=source),
        make_current=make_current, reason=f"build: model {model_version}", version=version, store_locked=store_locked,
    )
    log.info("published index %s%s in %s", version, " as CURRENT" if make_current else "", store.root)
    return version


__all__ = ["IndexOptions", "assemble_index", "build_and_publish", "build_index", "build_shard", "resolve_options",
           "validate_embeddings"]
