"""The ``embed`` job: corpus -> embeddings (Parquet) -> ScaNN index, as a Beam pipeline.

::

    MatchFiles(corpus/**) or a list file
      -> ReadSourceFn: read + sha256 ---- dead ----------------------------------+
           | new                  \--- cached (--incremental, same model) --+    |
      GroupByKey(hash bucket)      (byte-identical files decoded once)      |    |
      -> DecodeBatchFn: images / sampled video frames, thumbnails -- dead --|----+
      -> RunInference(KeyedModelHandler(FlaxEncoderHandler)), one batch a call   |
      -> rows (each batch also written to embeddings/cache/<model>/)       |    |
      -> one record per path <----------------------------------------------+    |
      -> GroupByKey(shard) -> WriteParquetShardFn (embeddings-SSSSS-of-NNNNN)    |
                                   GroupByKey -> WriteJsonlFn (dead_letter) <----+
      all sinks -> Done   (one final transform: the Dask runner computes only the last)

After the pipeline finishes, the Parquet shards are read back, a ScaNN index is
built and published atomically as the store's CURRENT version, and a run summary
(counts, elapsed, items per second) is written beside the embeddings. A corpus where
nothing could be embedded fails with a clear message and publishes nothing.

Locally the runner is Beam's in-process ``FnApiRunner``, named explicitly: the
DirectRunner would first try to download a Prism binary. ``num_workers > 1``
switches it to its multi-process mode. ``--runner dask`` runs the same graph on a
dask.distributed cluster (``lookalike.pipeline.dask_runner``). Sinks write whole files
after a GroupByKey, so the graph is correct on runners without bundle finalisation.
"""

from __future__ import annotations

import glob
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from lookalike.index.builder import IndexOptions, resolve_options
from lookalike.model.artifact import read_model_meta
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.progress import Progress
from lookalike.model.store import Store, StoreError, check_version_name
from lookalike.pipeline.batches import BATCH, DecodeBatchFn, bucket_of, split_tagged
from lookalike.pipeline.cache import WriteFileIndexFn, cache_dir, write_cache_rows
from lookalike.pipeline.failpoints import failpoint
from lookalike.pipeline.index_shards import BuildIndexShardFn, collect_shard_entries
from lookalike.pipeline.inference import FlaxEncoderHandler
from lookalike.pipeline.sources import CACHED, DEAD, FILE, NEW, ReadSourceFn, corpus_pattern, corpus_root, expand_to_items
from lookalike.pipeline.tfds_source import ReadTfdsRangeFn, TfdsSpec, example_ranges
from lookalike.pipeline.writers import WriteJsonlFn, WriteParquetShardFn, shard_of
from lookalike.pipeline.video import FrameSampling

log = logging.getLogger(__name__)

LOCAL_RUNNER = "FnApiRunner"

EMBEDDING_SCHEMA_FIELDS = [
    ("id", pa.string()),
    ("uri", pa.string()),
    ("kind", pa.string()),
    ("timestamp_s", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("content_hash", pa.string()),
    ("group", pa.string()),
    ("thumbnail", pa.string()),
    ("model_version", pa.string()),
    ("reused", pa.bool_()),  # True: embedding taken from the cache (--incremental)
]


class EmbedError(RuntimeError):
    """The embed job could not produce an index; the message says why."""


@dataclass
class EmbedConfig:
    workdir: str
    corpus: str | None = None  # folder or glob; default workdir/corpus
    list_file: str | None = None  # a text file listing paths, one per line (instead of corpus)
    tfds: str | None = None  # a TFDS data set NAME[:SPLIT] (instead of corpus), read offline
    tfds_data_dir: str | None = None
    model_version: str | None = None  # default models/LATEST
    run_name: str | None = None
    runner: str = LOCAL_RUNNER
    num_workers: int = 1
    max_batch_size: int = 256  # files per inference batch (videos add one row per sampled frame)
    num_shards: int | None = None  # embedding shards; default one per ~50k files
    index: IndexOptions = field(default_factory=IndexOptions)
    beam_args: list[str] = field(default_factory=list)
    publish: bool = True
    incremental: bool = False
    sampling: FrameSampling = field(default_factory=FrameSampling)


@dataclass
class EmbedSummary:
    run: str
    run_dir: str
    model_version: str
    index_version: str | None
    files_matched: int
    files_read: int  # bytes read (an --incremental run skips unchanged path+size+mtime); -1 if unknown
    items: int
    embedded: int
    unchanged: int
    duplicate_files: int
    failed: int
    elapsed_s: float
    items_per_s: float
    runner: str
    dead_letter_examples: list[dict[str, str]]


def embedding_schema(embed_dim: int) -> pa.Schema:
    return pa.schema(EMBEDDING_SCHEMA_FIELDS + [("embedding", pa.list_(pa.float32(), embed_dim))])


class BatchRowsFn(beam.DoFn):
    """(metas, PredictionResult with [B, D] inference) -> one cache row (meta + embedding) per
    item. Each batch's rows are written to the embedding cache at once (one file per batch,
    atomically), so a run killed midway keeps every finished batch for the next
    ``--incremental`` run. Logs the embed stage's progress (items, rate, ETA)."""

    def __init__(self, total_files: int, cache_dir: str, embed_dim: int):
        self._total = total_files
        self._cache_dir = cache_dir
        self._embed_dim = embed_dim

    def setup(self) -> None:
        self._progress = Progress("embed", total=self._total or None, unit="items", logger=log)
        self._count = 0
        self._batches = 0

    def process(self, keyed: tuple[list[dict[str, Any]], Any]):
        metas, result = keyed
        embeddings = np.asarray(result.inference, np.float32)
        rows = [{**meta, "embedding": emb.tolist()} for meta, emb in zip(metas, embeddings)]
        write_cache_rows(self._cache_dir, rows, self._embed_dim)
        self._batches += 1
        failpoint(f"embed_batch_{self._batches}")
        self._count += len(metas)
        self._progress.update(self._count)
        yield from rows


def num_shards_for(total_files: int, requested: int | None) -> int:
    """Embedding shards: as requested, else one per ~50k files."""
    return requested if requested else max(1, -(-total_files // 50_000))


def resolve_runner(name: str) -> str:
    """Runner names as Beam takes them; ``dask`` means our fixed Dask runner."""
    from lookalike.pipeline.dask_runner import DASK_RUNNER_ALIASES, RUNNER_PATH

    return RUNNER_PATH if name.lower() in DASK_RUNNER_ALIASES else name


def pipeline_options(config: EmbedConfig) -> PipelineOptions:
    args = [f"--runner={resolve_runner(config.runner)}", *config.beam_args]
    if config.runner == LOCAL_RUNNER and config.num_workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={config.num_workers}"]
    return PipelineOptions(args)


def build_pipeline(p: beam.Pipeline, config: EmbedConfig, pattern: str, root: str, model_dir: str,
                   meta: dict[str, Any], store: Store, run_dir: str, total: int,
                   index_build: tuple[str, dict[str, Any]] | None = None) -> None:
    """Add the embed transforms to ``p``; every sink feeds the final ``Done`` transform.
    With ``index_build`` = (temporary index folder, build params), each embedding shard
    also becomes a ScaNN index shard there."""
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    embed_dim, version = int(meta["embed_dim"]), meta["version"]
    cache = str(cache_dir(store.embeddings_dir, version))
    thumbs = str(store.root / "thumbnails")
    num_buckets = max(1, -(-total // max(1, config.max_batch_size)))
    num_shards = num_shards_for(total, config.num_shards)
    if config.tfds:
        tfds_spec = TfdsSpec.parse(config.tfds, config.tfds_data_dir)
        read = split_tagged(
            p | "TfdsRanges" >> beam.Create(example_ranges(tfds_spec)) | "ReadTfds" >> beam.ParDo(ReadTfdsRangeFn(tfds_spec)),
            (NEW, CACHED, DEAD, FILE), "Read")
    elif config.list_file:
        files = p | "ListedFiles" >> beam.Create(read_list_file(config.list_file)) | "AsMetadata" >> beam.Map(
            lambda path: FileMetadata(path, 0))
    else:
        files = p | "MatchCorpus" >> fileio.MatchFiles(pattern, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
    if not config.tfds:
        read = split_tagged(files | "ReadAndHash" >> beam.ParDo(ReadSourceFn(cache if config.incremental else None, total)),
                            (NEW, CACHED, DEAD, FILE), "Read")
    file_index = (
        read[FILE]
        | "FileIndexKey" >> beam.Map(lambda row: (0, row))
        | "GroupFileIndex" >> beam.GroupByKey()
        | "WriteFileIndex" >> beam.ParDo(WriteFileIndexFn(cache))
    )
    decoded = split_tagged(
        read[NEW]
        | "ToBucket" >> beam.Map(lambda entry: (bucket_of(entry[0], num_buckets), entry))
        | "GroupBuckets" >> beam.GroupByKey()
        | "DecodeBatches" >> beam.ParDo(DecodeBatchFn(spec, thumbs, config.sampling)),
        (BATCH, DEAD), "Decoded")
    # Pre-made batches, one per RunInference call: max_batch_size=1 makes BatchElements emit in process().
    handler = KeyedModelHandler(FlaxEncoderHandler(model_dir, min_batch_size=1, max_batch_size=1,
                                                   encoder_batch=config.max_batch_size))
    new_rows = decoded[BATCH] | "Embed" >> RunInference(handler) | "BatchRows" >> beam.ParDo(
        BatchRowsFn(total, cache, embed_dim))
    new_items = new_rows | "NewItems" >> beam.FlatMap(lambda row: expand_to_items(row["uris"], row, root, thumbs, version))
    old_items = read[CACHED] | "CachedItems" >> beam.FlatMap(
        lambda pair: expand_to_items(pair[0], pair[1], root, thumbs, version, reused=True))
    shards = (
        (new_items, old_items)
        | "AllItems" >> beam.Flatten()
        | "ShardKey" >> beam.Map(lambda r: (shard_of(r["id"], num_shards), r))
        | "GroupShards" >> beam.GroupByKey()
    )
    parquet_files = shards | "WriteParquet" >> beam.ParDo(
        WriteParquetShardFn(f"{run_dir}/embeddings", num_shards, embedding_schema(embed_dim)))
    sinks = [parquet_files]
    if index_build is not None:
        index_dir, params = index_build
        item_schema = pa.schema([f for f in embedding_schema(embed_dim) if f.name != "embedding"])
        sinks.append(shards | "BuildIndexShards" >> beam.ParDo(BuildIndexShardFn(index_dir, params, item_schema)))
    dead_files = (
        (read[DEAD], decoded[DEAD])
        | "AllDead" >> beam.Flatten()
        | "DeadKey" >> beam.Map(lambda row: (0, row))
        | "GroupDead" >> beam.GroupByKey()
        | "WriteDead" >> beam.ParDo(WriteJsonlFn(f"{run_dir}/dead_letter-00000-of-00001.jsonl"))
    )
    _ = (*sinks, dead_files, file_index) | "AllSinks" >> beam.Flatten() | "Done" >> beam.Map(lambda path: path)


def read_list_file(path: str) -> list[str]:
    """Paths listed one per line (blank lines and # comments ignored); relative ones are
    taken relative to the list file's folder."""
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    with FileSystems.open(path, compression_type="uncompressed") as f:
        lines = f.read().decode("utf-8").splitlines()
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return [e if e.startswith("/") or "://" in e else f"{base}/{e}" for e in entries]


def counts_from_items(items: pa.Table) -> dict[str, int]:
    """The summary counts, derived from the written items (for runners without metrics)."""
    if items.num_rows == 0:
        return {}
    rows = items.select(["uri", "content_hash", "reused"]).to_pylist()
    new = [r for r in rows if not r["reused"]]
    new_sources = {r["content_hash"].split("#")[0] for r in new}
    return {
        "items_decoded": len({r["content_hash"] for r in new}),
        "files_unchanged": len({r["uri"] for r in rows if r["reused"]}),
        "duplicate_files": len({r["uri"] for r in new}) - len(new_sources),
    }


def counter_values(result: Any) -> dict[str, int]:
    """The pipeline's ``lookalike`` counters (empty where the runner does not report metrics)."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners do not support metrics queries
        return {}
    totals: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace == "lookalike":
            totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    return totals


def read_embeddings(run_dir: Path) -> tuple[np.ndarray, pa.Table]:
    """Read ``embeddings-*.parquet`` of a run -> ([N, D] float32, items table without embeddings)."""
    files = sorted(glob.glob(str(run_dir / "embeddings-*.parquet")))
    tables = [pq.read_table(f) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return np.zeros((0, 0), np.float32), pa.table({"id": pa.array([], pa.string())})
    table = pa.concat_tables(tables).sort_by("id")
    emb = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
    emb = emb.reshape(table.num_rows, -1)
    return emb, table.drop(["embedding"])


def read_dead_letters(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for f in sorted(glob.glob(str(run_dir / "dead_letter-*.jsonl"))):
        rows += [json.loads(line) for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def count_matches(pattern: str) -> int:
    try:
        return sum(len(m.metadata_list) for m in FileSystems.match([pattern]))
    except Exception:  # an empty or unreachable pattern: the pipeline reports it
        return 0


def summarize(run: str, run_dir: Path, model_version: str, total: int, runner: str, result: Any,
              elapsed: float) -> EmbedSummary:
    """Counts of a finished run, from the runner's metrics or else from what it wrote."""
    embeddings, items = read_embeddings(run_dir)
    from_runner = counter_values(result)
    counts = from_runner or counts_from_items(items)
    dead = read_dead_letters(run_dir)
    for row in dead:
        log.warning("skipped %s at %s: %s", row["uri"], row["stage"], row["reason"])
    return EmbedSummary(
        run=run,
        run_dir=str(run_dir),
        model_version=model_version,
        index_version=None,
        files_matched=total,
        files_read=counts.get("files_read", 0 if from_runner else -1),
        items=int(len(embeddings)),
        embedded=counts.get("items_decoded", 0),
        unchanged=counts.get("files_unchanged", 0),
        duplicate_files=counts.get("duplicate_files", 0),
        failed=len(dead),
        elapsed_s=round(elapsed, 3),
        items_per_s=round(len(embeddings) / elapsed, 1) if elapsed > 0 else 0.0,
        runner=runner,
        dead_letter_examples=dead[:20],
    )


def run_embed(config: EmbedConfig) -> EmbedSummary:
    """Run the pipeline, build and publish the index; raise EmbedError if nothing was embedded."""
    store = Store.at(config.workdir)
    model_dir = store.require_model(config.model_version)
    meta = read_model_meta(model_dir)
    corpus = config.corpus or str(store.corpus_dir)
    if config.tfds:
        tfds_spec = TfdsSpec.parse(config.tfds, config.tfds_data_dir)
        corpus = tfds_spec.root
    elif config.list_file:
        list_file = config.list_file if "://" in config.list_file else str(Path(config.list_file).resolve())
        if "://" not in list_file and not Path(list_file).is_file():
            raise StoreError(f"list file {config.list_file} does not exist")
        config = replace(config, list_file=list_file)
        corpus = list_file.rsplit("/", 1)[0]
    elif "://" not in corpus and not any(ch in corpus for ch in "*?[") and not Path(corpus).is_dir():
        raise StoreError(f"corpus folder {corpus} does not exist: run `lookalike demo` or pass --corpus")
    if "://" not in corpus:
        corpus = str(Path(corpus).expanduser().resolve()) if not any(ch in corpus for ch in "*?[") else corpus
    pattern, root = corpus_pattern(corpus), corpus_root(corpus)
    run = check_version_name(config.run_name or time.strftime("e-%Y%m%dT%H%M%S", time.gmtime()))
    run_dir = store.embedding_run_dir(run)
    if run_dir.exists():
        raise EmbedError(f"embedding run {run_dir} already exists; choose another --run-name")
    run_dir.mkdir(parents=True)
    if config.tfds:
        ranges = example_ranges(tfds_spec)
        total = ranges[-1][1] if ranges else 0
    else:
        total = len(read_list_file(config.list_file)) if config.list_file else count_matches(pattern)
    log.info("embedding %d file(s) matching %s with model %s on %s", total, pattern, meta["version"], config.runner)
    started = time.perf_counter()

    def execute(index_build: tuple[str, dict[str, Any]] | None) -> EmbedSummary:
        """Run the pipeline and summarise it; EmbedError (summary written) if nothing was embedded."""
        p = beam.Pipeline(options=pipeline_options(config))
        build_pipeline(p, config, pattern, root, str(model_dir), meta, store, str(run_dir), total, index_build)
        result = None
        try:
            result = p.run()
            result.wait_until_finish()
        finally:
            client = getattr(result, "client", None)  # the Dask runner leaves its client open
            if client is not None:
                client.close()
        summary = summarize(run, run_dir, meta["version"], total, config.runner, result, time.perf_counter() - started)
        if summary.items == 0:
            (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
            raise EmbedError(
                f"nothing embedded from {pattern}: {total} file(s) matched, {summary.failed} rejected "
                f"(see {run_dir}/dead_letter-*.jsonl); no index published"
            )
        return summary

    if config.publish and total > 0:
        from lookalike.index.builder import assemble_index
        from lookalike.index.manifest import publish_atomically
        from lookalike.pipeline.versions import record_promotion

        options = replace(config.index, num_shards=min(num_shards_for(total, config.num_shards), total))
        params = resolve_options(total, options)
        done: list[EmbedSummary] = []

        def write(tmp: Path) -> None:  # the index is built into tmp shard by shard, then assembled
            tmp.mkdir(parents=True)
            done.append(execute((str(tmp), params)))
            shards = collect_shard_entries(tmp)
            assemble_index(tmp, shards, model_version=meta["version"], params={**params, "num_shards": len(shards)},
                           options=options)

        index_version = publish_atomically(store, write, make_current=True)
        summary = done[0]
        summary.index_version = index_version
        record_promotion(store, index_version, f"embed run {run}")
    else:
        summary = execute(None)
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    log.info(
        "%d item(s): %d embedded, from %d unchanged file(s) reused, %d duplicate file(s); %d failed; "
        "%.1fs (%.0f items/s); index %s",
        summary.items, summary.embedded, summary.unchanged, summary.duplicate_files, summary.failed,
        summary.elapsed_s, summary.items_per_s, summary.index_version,
    )
    return summary
