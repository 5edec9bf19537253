"""Build a ScaNN index version from embeddings and publish it atomically.

``build_index`` picks the ScaNN configuration by corpus size (exact brute force for
small corpora, tree + asymmetric hashing + exact reordering above that; every choice
overridable and recorded in the manifest), writes the searcher, item metadata,
embeddings and a manifest with checksums into a temporary folder, and
``publish_index`` renames it into ``indexes/<version>`` and moves ``CURRENT``.
Readers therefore never see half an index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lookalike.model.store import Store

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "lookalike-index/1"
BRUTE_FORCE_MAX_ITEMS = 20_000


@dataclass(frozen=True)
class IndexOptions:
    """How to build; ``mode='auto'`` chooses by size."""

    mode: str = "auto"  # auto | brute_force | tree_ah
    num_neighbors: int = 10
    num_leaves: int | None = None  # default ~sqrt(n)
    leaves_to_search: int | None = None  # default ~num_leaves/10
    reorder: int = 100
    training_sample_size: int = 100_000


def validate_embeddings(embeddings: np.ndarray, ids: list[str]) -> np.ndarray:
    """Check [N, D] finite float32 embeddings and N unique ids; return float32 array."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"expected [N, D] embeddings with N, D > 0, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"expected float embeddings, got dtype {emb.dtype}")
    emb = emb.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        raise ValueError(f"embedding of item {ids[bad[0]]!r} has NaN or infinite values ({len(bad)} such rows)")
    if len(ids) != len(emb):
        raise ValueError(f"{len(ids)} ids for {len(emb)} embeddings")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate item id {dup!r} in index build")
    return emb


def resolve_options(n: int, options: IndexOptions) -> dict[str, Any]:
    """Concrete build parameters for ``n`` items."""
    mode = options.mode
    if mode == "auto":
        mode = "brute_force" if n < BRUTE_FORCE_MAX_ITEMS else "tree_ah"
    if mode not in ("brute_force", "tree_ah"):
        raise ValueError(f"unknown index mode {options.mode!r}; use auto, brute_force or tree_ah")
    params: dict[str, Any] = {"mode": mode, "num_neighbors": options.num_neighbors}
    if mode == "tree_ah":
        leaves = options.num_leaves or max(2, int(round(math.sqrt(n))))
        params.update(
            num_leaves=min(leaves, n),
            leaves_to_search=options.leaves_to_search or max(1, leaves // 10),
            reorder=options.reorder,
            training_sample_size=min(n, options.training_sample_size),
        )
    return params


def build_searcher(embeddings: np.ndarray, params: dict[str, Any]):
    """A ScaNN searcher over [N, D] float32 unit vectors with dot-product scores."""
    import scann

    builder = scann.scann_ops_pybind.builder(embeddings, params["num_neighbors"], "dot_product")
    if params["mode"] == "brute_force":
        return builder.score_brute_force().build()
    return (
        builder.tree(
            num_leaves=params["num_leaves"],
            num_leaves_to_search=params["leaves_to_search"],
            training_sample_size=params["training_sample_size"],
        )
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        .reorder(params["reorder"])
        .build()
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_index(
    embeddings: np.ndarray,
    items: pa.Table,
    *,
    model_version: str,
    out_dir: Path,
    options: IndexOptions = IndexOptions(),
) -> dict[str, Any]:
    """Write a complete index into ``out_dir`` (created; must not exist). Returns the manifest.

    ``items`` has one row per embedding and at least an ``id`` column; its other
    columns (uri, kind, width, height, content_hash, ...) are served as metadata.
    """
    ids = [str(i) for i in items.column("id").to_pylist()]
    emb = validate_embeddings(embeddings, ids)
    params = resolve_options(len(emb), options)
    import scann  # noqa: F401  (slow first import; not part of the build time)

    started = time.perf_counter()
    searcher = build_searcher(emb, params)
    build_s = time.perf_counter() - started
    out_dir.mkdir(parents=True)
    (out_dir / "scann").mkdir()
    searcher.serialize(str(out_dir / "scann"), relative_path=True)
    pq.write_table(items, out_dir / "items.parquet")
    np.save(out_dir / "embeddings.npy", emb)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "model_version": model_version,
        "count": int(len(emb)),
        "embed_dim": int(emb.shape[1]),
        "metric": "dot_product",
        "build": params,
        "build_seconds": round(build_s, 3),
        "created_unix_s": time.time(),
        "files": {str(p.relative_to(out_dir)): sha256_file(p) for p in files},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("built %s index of %d x %d in %.2fs", params["mode"], len(emb), emb.shape[1], build_s)
    return manifest


def new_index_version() -> str:
    return time.strftime("i-%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def build_and_publish(
    store: Store,
    embeddings: np.ndarray,
    items: pa.Table,
    *,
    model_version: str,
    options: IndexOptions = IndexOptions(),
    make_current: bool = True,
) -> str:
    """Build in a temporary folder, rename into ``indexes/<version>``, then move CURRENT."""
    store.indexes_dir.mkdir(parents=True, exist_ok=True)
    version = new_index_version()
    tmp = store.indexes_dir / f".tmp-{version}"
    try:
        build_index(embeddings, items, model_version=model_version, out_dir=tmp, options=options)
        tmp.rename(store.index_dir(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        store.set_current_index(version)
        log.info("published index %s as CURRENT in %s", version, store.root)
    return version


__all__ = ["IndexOptions", "build_index", "build_and_publish", "resolve_options", "validate_embeddings", "asdict"]
