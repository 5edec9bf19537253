"""The ``embed`` job: corpus -> embeddings (Parquet) -> ScaNN index, as a Beam pipeline.

::

    corpus listed before the run (only the files not known unchanged with --incremental),
    written to a listing file sorted by size and cut into chunks of equal-size runs
      -> ReadChunkFn: read + sha256 + decode (byte-identical files share a chunk: decoded
         once), thumbnails, full batches carried over between chunks ---- dead -----+
           |  \--- cached (--incremental, bytes known to the cache) ---------+      |
      -> RunInference(FlaxEncoderHandler), one ItemBatch (metas, pixels) a call,   |
         dispatched asynchronously (JAX), fused with reading and decoding    |      |
      -> BatchRowsFn (one batch behind): cache file per batch; Arrow items table per shard
           |       files unchanged by path, size, mtime (listed before) --> ReusedItemsFn
      GroupByKey(shard) <- (shard, items table) <-----------------------------+      |
      -> concatenated, sorted by id -> WriteParquetShardFn (embeddings-SSSSS-of-NNNNN)
                                    \-> BuildIndexShardFn (ScaNN shard)              |
                                   GroupByKey -> WriteJsonlFn (dead_letter) <-------+
      all sinks -> Done   (one final transform: the Dask runner computes only the last)

A TFDS data set, a list file or a corpus too big to list first is read file by file
(``ReadSourceFn``: read + sha256), grouped by content-hash bucket (byte-identical files
meet), and decoded into batches by ``DecodeBatchFn``; the rest of the graph is the same.

Per item, only the decode stage does Python work; after inference a batch travels as
one Arrow table (``lookalike.pipeline.items``). An ``--incremental`` run on a corpus
where nothing changed does not start Beam at all, and keeps the served index when it
already holds exactly these items (``lookalike.pipeline.reuse``).

After the pipeline finishes, the Parquet shards are read back, a ScaNN index is
built and published atomically as the store's CURRENT version, and a run summary
(counts, elapsed, items per second) is written beside the embeddings. A corpus where
nothing could be embedded fails with a clear message and publishes nothing.

Locally the runner is Beam's in-process ``FnApiRunner``, named explicitly: the
DirectRunner would first try to download a Prism binary. ``num_workers > 1``
switches it to its multi-process mode, each worker's XLA thread pool sized to its share of
the CPUs (``lookalike.model.cpu_threads``). ``--runner dask`` runs the same graph on a
dask.distributed cluster (``lookalike.pipeline.dask_runner``). Sinks write whole files
after a GroupByKey, so the graph is correct on runners without bundle finalisation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from lookalike.index.builder import IndexOptions, resolve_options
from lookalike.model.artifact import read_model_meta
from lookalike.model.cpu_threads import threads_per_worker
from lookalike.model.memory import keep_freed_memory
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.store import Store, StoreError, check_version_name
from lookalike.pipeline.batches import (BATCH, BatchRowsFn, DecodeBatchFn, ReadChunkFn, bucket_of, split_tagged,
                                        write_listing)
from lookalike.pipeline.cache import WriteFileIndexFn, cache_dir, load_cache_table
from lookalike.pipeline.elements import EmbeddedBatch, ItemBatch, Routed, ShardTable
from lookalike.pipeline.index_shards import BuildIndexShardFn, build_index_shard, collect_shard_entries
from lookalike.pipeline.inference import FlaxEncoderHandler, discard_preloaded, preload_encoder
from lookalike.pipeline.items import concat_sorted, embedding_schema, split_by_shard
from lookalike.pipeline.reuse import ReusedItemsFn, ReusePlan, current_index_if_same, list_files, plan_reuse, reused_items
from lookalike.pipeline.sources import CACHED, DEAD, FILE, NEW, ReadSourceFn, corpus_pattern, corpus_root
from lookalike.pipeline.summary import EmbedSummary, counter_values, read_dead_letters, read_embeddings, summarize
from lookalike.pipeline.tfds_source import ReadTfdsRangeFn, TfdsSpec, example_ranges
from lookalike.pipeline.video import FrameSampling
from lookalike.pipeline.writers import WriteJsonlFn, WriteParquetShardFn, write_items_shard, write_jsonl

log = logging.getLogger(__name__)

LOCAL_RUNNER = "FnApiRunner"
DASK_RUNNER_ALIASES = {"dask", "daskrunner", "fixeddaskrunner"}
# Corpus listings up to this many files travel in the pipeline graph; bigger ones are matched again by Beam.
LISTING_IN_GRAPH_MAX = 500_000

__all__ = ["EmbedConfig", "EmbedError", "EmbedSummary", "read_dead_letters", "read_embeddings", "run_embed"]


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
class _Run:
    """What every stage of one run needs to know."""

    config: EmbedConfig
    store: Store
    meta: dict[str, Any]
    model_dir: str
    pattern: str
    root: str
    run_dir: Path
    total: int
    listing: list[FileMetadata] | None = None  # the matched corpus, listed before the run
    plan: ReusePlan | None = None  # --incremental on a matched corpus: files split before Beam
    listing_file: str | None = None  # the files to read (listed before the run), chunked by size
    chunks: list[tuple[int, int]] | None = None  # [start, stop) rows of listing_file, one element each

    @property
    def files_to_read(self) -> int:
        """Files the pipeline reads (the progress logs' totals): all, or those the plan did not settle."""
        return len(self.plan.changed) if self.plan is not None else self.total

    @property
    def cache(self) -> str:
        return str(cache_dir(self.store.embeddings_dir, self.meta["version"]))

    @property
    def num_shards(self) -> int:
        return num_shards_for(self.total, self.config.num_shards)

    @property
    def schema(self) -> pa.Schema:
        return embedding_schema(int(self.meta["embed_dim"]))

    @property
    def expand(self) -> dict[str, str]:
        """How cached or embedded rows become items (``items.expand_items`` arguments)."""
        return {"root": self.root, "thumbnails_dir": str(self.store.root / "thumbnails"),
                "model_version": self.meta["version"]}


def num_shards_for(total_files: int, requested: int | None) -> int:
    """Embedding shards: as requested, else one per ~50k files."""
    return requested if requested else max(1, -(-total_files // 50_000))


def resolve_runner(name: str) -> str:
    """Runner names as Beam takes them; ``dask`` means our fixed Dask runner (imported only
    then: importing Beam's Dask runner takes over a second)."""
    if name.lower() not in DASK_RUNNER_ALIASES:
        return name
    from lookalike.pipeline.dask_runner import RUNNER_PATH

    return RUNNER_PATH


def pipeline_options(config: EmbedConfig) -> PipelineOptions:
    args = [f"--runner={resolve_runner(config.runner)}", *config.beam_args]
    if config.runner == LOCAL_RUNNER and config.num_workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={config.num_workers}"]
    return PipelineOptions(args)


def _read(p: beam.Pipeline, run: _Run) -> dict[str, beam.PCollection]:
    """The source stage: ("new" | "cached" | "dead" | "file") PCollections."""
    config = run.config
    if config.tfds:
        tfds_spec = TfdsSpec.parse(config.tfds, config.tfds_data_dir)
        tagged = (p | "TfdsRanges" >> beam.Create(example_ranges(tfds_spec))
                  | "ReadTfds" >> beam.ParDo(ReadTfdsRangeFn(tfds_spec)))
        return split_tagged(tagged, (NEW, CACHED, DEAD, FILE), "Read")
    if config.list_file:
        files = p | "ListedFiles" >> beam.Create(read_list_file(config.list_file)) | "AsMetadata" >> beam.Map(
            lambda path: FileMetadata(path, 0))
    else:
        files = p | "MatchCorpus" >> fileio.MatchFiles(run.pattern, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
    read = files | "ReadAndHash" >> beam.ParDo(ReadSourceFn(run.cache if config.incremental else None, run.files_to_read, config.sampling))
    return split_tagged(read, (NEW, CACHED, DEAD, FILE), "Read")


def _read_and_decode(p: beam.Pipeline, run: _Run, spec: PreprocessSpec) -> dict[str, beam.PCollection]:
    """Sources to decoded batches: "batch" ((metas, pixels)), "dead" (letters), "cached" (lists of
    (uri, source hash)) and "file" (file index tables, or lists of rows).

    A corpus listed before the run (a folder or glob of at most LISTING_IN_GRAPH_MAX files)
    is read in chunks of files of equal sizes (``batches.write_listing``): read, hash and
    decode in one DoFn, fused with inference. Other sources (TFDS, a list file, bigger
    corpora) are read file by file and grouped by content-hash bucket before decoding."""
    config = run.config
    thumbnails = run.expand["thumbnails_dir"]
    if run.listing_file is not None:
        chunks = run.chunks or []
        reshuffle = len(chunks) > 1 and not (config.runner == LOCAL_RUNNER and config.num_workers == 1)
        tagged = (p | "ListedChunks" >> beam.Create(chunks, reshuffle=reshuffle)
                  | "ReadAndDecode" >> beam.ParDo(ReadChunkFn(
                      run.listing_file, run.cache if config.incremental else None, run.files_to_read, spec, thumbnails,
                      config.sampling, config.max_batch_size, failures_dir=run.cache)).with_output_types(Routed))
        return split_tagged(tagged, (BATCH, DEAD, CACHED, FILE), "Chunk", {BATCH: ItemBatch})
    read = _read(p, run)
    num_buckets = max(1, -(-run.total // max(1, config.max_batch_size)))
    decoded = split_tagged(
        read[NEW]
        | "ToBucket" >> beam.Map(lambda entry: (bucket_of(entry[0], num_buckets), entry))
        | "GroupBuckets" >> beam.GroupByKey()
        | "DecodeBatches" >> beam.ParDo(DecodeBatchFn(spec, thumbnails, config.sampling, config.max_batch_size,
                                                      failures_dir=run.cache))
        .with_output_types(Routed),
        (BATCH, DEAD), "Decoded", {BATCH: ItemBatch})
    return {
        BATCH: decoded[BATCH],
        DEAD: (read[DEAD], decoded[DEAD]) | "ReadOrDecodeDead" >> beam.Flatten(),
        CACHED: read[CACHED] | "CachedChunk" >> beam.Map(lambda pair: [pair]),
        FILE: read[FILE] | "FileRowChunk" >> beam.Map(lambda row: [row]),
    }


def build_pipeline(p: beam.Pipeline, run: _Run, index_build: tuple[str, dict[str, Any]] | None = None) -> None:
    """Add the embed transforms to ``p``; every sink feeds the final ``Done`` transform.
    With ``index_build`` = (temporary index folder, build params), each embedding shard
    also becomes a ScaNN index shard there."""
    config, embed_dim = run.config, int(run.meta["embed_dim"])
    spec = PreprocessSpec.from_dict(run.meta["preprocess"])
    read = _read_and_decode(p, run, spec)
    file_index = (
        read[FILE]
        | "FileIndexKey" >> beam.Map(lambda rows: (0, rows))
        | "GroupFileIndex" >> beam.GroupByKey()
        | "WriteFileIndex" >> beam.ParDo(WriteFileIndexFn(run.cache))
    )
    # Pre-made batches, one per RunInference call: max_batch_size=1 makes BatchElements emit in process().
    # Worker processes on this machine share its CPUs: each gets an equal part for XLA's thread pool.
    local_workers = config.num_workers if config.runner == LOCAL_RUNNER and config.num_workers > 1 else None
    handler = FlaxEncoderHandler(run.model_dir, min_batch_size=1, max_batch_size=1, encoder_batch=config.max_batch_size,
                                 xla_cpu_threads=threads_per_worker(local_workers) if local_workers else None)
    items = read[BATCH] | "Embed" >> RunInference(handler).with_output_types(EmbeddedBatch) | "BatchRows" >> beam.ParDo(
        BatchRowsFn(run.files_to_read, run.cache, embed_dim, run.num_shards, **run.expand)).with_output_types(ShardTable)
    if config.incremental:  # only an incremental run has cached files (a Flatten costs a stage of its own)
        cached_files = read[CACHED]
        if run.plan is not None and run.plan.unchanged:
            unchanged = p | "UnchangedFiles" >> beam.Create([run.plan.unchanged], reshuffle=False)
            cached_files = (cached_files, unchanged) | "AllCached" >> beam.Flatten()
        old_items = (
            cached_files
            | "CachedKey" >> beam.Map(lambda chunk: (0, chunk))
            | "GroupCached" >> beam.GroupByKey()
            | "ReusedItems" >> beam.ParDo(ReusedItemsFn(run.cache, embed_dim, run.num_shards, **run.expand))
            .with_output_types(ShardTable)
        )
        items = (items, old_items) | "AllItems" >> beam.Flatten()
    schema = run.schema
    shards = (
        items
        | "GroupShards" >> beam.GroupByKey()
        | "SortShards" >> beam.Map(lambda kv: (kv[0], concat_sorted(list(kv[1]), schema))).with_output_types(ShardTable)
    )
    sinks = [shards | "WriteParquet" >> beam.ParDo(WriteParquetShardFn(f"{run.run_dir}/embeddings", run.num_shards))]
    if index_build is not None:
        sinks.append(shards | "BuildIndexShards" >> beam.ParDo(BuildIndexShardFn(*index_build)))
    dead_files = (
        read[DEAD]
        | "DeadKey" >> beam.Map(lambda row: (0, row))
        | "GroupDead" >> beam.GroupByKey()
        | "WriteDead" >> beam.ParDo(WriteJsonlFn(f"{run.run_dir}/dead_letter-00000-of-00001.jsonl"))
    )
    _ = (*sinks, dead_files, file_index) | "AllSinks" >> beam.Flatten() | "Done" >> beam.Map(lambda path: path)


def read_list_file(path: str) -> list[str]:
    """Paths listed one per line (blank lines and # comments ignored, a path listed twice kept
    once); relative ones are taken relative to the list file's folder, ``file://`` URLs are
    local paths, and local paths are normalised (``a/../b`` is ``b``)."""
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    with FileSystems.open(path, compression_type="uncompressed") as f:
        lines = f.read().decode("utf-8").splitlines()
    paths: dict[str, None] = {}
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("file://"):
            entry = unquote(entry[len("file://"):])
        if "://" not in entry:
            entry = os.path.normpath(entry if entry.startswith("/") else f"{base}/{entry}")
        paths.setdefault(entry, None)
    return list(paths)


def common_folder(paths: list[str]) -> str:
    """The deepest folder holding every path (of any filesystem: compared by '/' parts); item
    ids are paths relative to it, so files listed from different folders never share an id."""
    parts = [p.split("/")[:-1] for p in paths]
    if not parts:
        return ""
    common = parts[0]
    for other in parts[1:]:
        n = 0
        while n < min(len(common), len(other)) and common[n] == other[n]:
            n += 1
        common = common[:n]
    return "/".join(common) or "/"


def write_reused(run: _Run, items: pa.Table, index_build: tuple[str, dict[str, Any]] | None) -> dict[str, int]:
    """Nothing changed: write the reused items as the run's shards (and index shards) without
    Beam; returns the counts the pipeline would have reported."""
    for shard, table in split_by_shard(items, run.num_shards):
        table = concat_sorted([table], run.schema)
        write_items_shard(f"{run.run_dir}/embeddings", shard, run.num_shards, table)
        if index_build is not None:
            build_index_shard(*index_build, shard, table)
    log.info("nothing changed in %d file(s): %d cached item(s) reused without running the pipeline",
             len(run.plan.unchanged), len(items))
    return {"files_read": 0, "files_unchanged": len(run.plan.unchanged)}


def _execute(run: _Run, started: float, index_build: tuple[str, dict[str, Any]] | None,
             reused: pa.Table | None) -> EmbedSummary:
    """Run the pipeline (or only write ``reused``) and summarise; EmbedError (summary
    written) if nothing was embedded."""
    config = run.config
    if reused is not None:
        counted = write_reused(run, reused, index_build)
    else:
        if run.listing is not None and len(run.listing) <= LISTING_IN_GRAPH_MAX:
            todo = run.plan.changed if run.plan is not None else run.listing
            run.listing_file = str(run.run_dir / ".listing.arrow")
            run.chunks = write_listing(run.listing_file, todo)
        p = beam.Pipeline(options=pipeline_options(config))
        build_pipeline(p, run, index_build)
        result = None
        try:
            result = p.run()
            result.wait_until_finish()
        finally:
            client = getattr(result, "client", None)  # the Dask runner leaves its client open
            if client is not None:
                client.close()
            if run.listing_file is not None:
                Path(run.listing_file).unlink(missing_ok=True)
        counted = counter_values(result)
        if counted and run.plan is not None:  # files the plan kept out of the pipeline
            counted["files_unchanged"] = counted.get("files_unchanged", 0) + len(run.plan.unchanged)
    summary = summarize(run.run_dir.name, run.run_dir, run.meta["version"], run.total, config.runner, counted,
                        time.perf_counter() - started)
    if summary.items == 0:
        (run.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        if run.total == 0:
            raise EmbedError(f"nothing embedded: no files found in {_source_name(run)}; no index published")
        raise EmbedError(
            f"nothing embedded from {_source_name(run)}: {run.total} file(s) found, {summary.failed} rejected "
            f"(see {run.run_dir}/dead_letter-*.jsonl); no index published"
        )
    return summary


def _source_name(run: _Run) -> str:
    """What the run reads, as the user named it: a TFDS data set, a list file, or a corpus pattern."""
    if run.config.tfds:
        return f"TFDS data set {run.config.tfds}"
    if run.config.list_file:
        return f"the files listed in {run.config.list_file}"
    return run.pattern


def validate_config(config: EmbedConfig) -> None:
    """ValueError naming the setting, before anything is written."""
    for name in ("num_workers", "max_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.num_shards is not None and config.num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {config.num_shards}")
    if sum(bool(x) for x in (config.corpus, config.list_file, config.tfds)) > 1:
        raise ValueError("give one source: a corpus, a list file or a TFDS data set")
    resolve_options(1, replace(config.index, num_shards=1))  # the index options (target recall, mode, ...)


def _resolve_corpus(config: EmbedConfig, store: Store) -> tuple[EmbedConfig, str]:
    """The config with an absolute list file, and the corpus folder or pattern (TFDS: its uri root)."""
    corpus = config.corpus or str(store.corpus_dir)
    if config.tfds:
        return config, TfdsSpec.parse(config.tfds, config.tfds_data_dir).root
    if config.list_file:
        list_file = config.list_file if "://" in config.list_file else str(Path(config.list_file).resolve())
        if "://" not in list_file and not Path(list_file).is_file():
            raise StoreError(f"list file {config.list_file} does not exist")
        listed = read_list_file(list_file)  # ids are relative to the listed files' common folder
        return replace(config, list_file=list_file), common_folder(listed) if listed else list_file.rsplit("/", 1)[0]
    wildcard = any(ch in corpus for ch in "*?[")
    if "://" not in corpus and not wildcard and not Path(corpus).is_dir():
        raise StoreError(f"corpus folder {corpus} does not exist: run `lookalike demo` or pass --corpus")
    if "://" not in corpus and not wildcard:
        corpus = str(Path(corpus).expanduser().resolve())
    return config, corpus


def run_embed(config: EmbedConfig) -> EmbedSummary:
    """Run the pipeline, build and publish the index; raise EmbedError if nothing was embedded."""
    started = time.perf_counter()
    validate_config(config)
    keep_freed_memory()
    store = Store.at(config.workdir)
    model_dir = store.require_model(config.model_version)
    meta = read_model_meta(model_dir)
    config, corpus = _resolve_corpus(config, store)
    pattern, root = corpus_pattern(corpus), corpus_root(corpus)
    run_name = check_version_name(config.run_name or time.strftime("e-%Y%m%dT%H%M%S", time.gmtime()))
    run_dir = store.embedding_run_dir(run_name)
    for n in range(2, 100):  # a default name already taken (a run killed within the same second): number it
        if config.run_name or not run_dir.exists():
            break
        run_dir = store.embedding_run_dir(f"{run_name}-{n}")
    run_name = run_dir.name
    if run_dir.exists():
        raise EmbedError(f"embedding run {run_dir} already exists; choose another --run-name")
    run_dir.mkdir(parents=True)
    run = _Run(config, store, meta, str(model_dir), pattern, root, run_dir, total=0)
    try:
        return _list_and_run(run, started)
    finally:
        discard_preloaded()


def _list_and_run(run: _Run, started: float) -> EmbedSummary:
    """List the corpus, plan reuse, run the pipeline and write the summary. On the in-process
    runner the encoder loads and compiles meanwhile (``inference.preload_encoder``): from the
    start, or for ``--incremental`` once the plan shows files to embed (a rerun with nothing
    new never pays for it)."""
    config, meta, pattern, run_dir = run.config, run.meta, run.pattern, run.run_dir
    in_process = config.runner == LOCAL_RUNNER and config.num_workers <= 1
    if in_process and not config.incremental:
        preload_encoder(run.model_dir, config.max_batch_size)
    if config.tfds:
        ranges = example_ranges(TfdsSpec.parse(config.tfds, config.tfds_data_dir))
        run.total = ranges[-1][1] if ranges else 0
    elif config.list_file:
        run.total = len(read_list_file(config.list_file))
    else:
        run.listing = list_files(pattern)
        run.total = len(run.listing)
        if config.incremental:  # the cache is read once here: little besides it when nothing changed
            cache_table = load_cache_table(run.cache, int(meta["embed_dim"]))
            run.plan = plan_reuse(run.listing, run.cache, cache_table.column("source_hash"), config.sampling)
            if run.plan.dead:  # not media, or bytes that failed before: reported again, not read
                write_jsonl(run_dir / "dead_letter-unread.jsonl", run.plan.dead)
    if in_process and config.incremental and (run.plan is None or run.plan.changed):
        preload_encoder(run.model_dir, config.max_batch_size)
    log.info("embedding %d file(s) from %s with model %s on %s%s", run.total, _source_name(run), meta["version"], config.runner,
             f" ({len(run.plan.unchanged)} unchanged by path, size and mtime; {len(run.plan.dead)} known to fail)"
             if run.plan else "")
    reused = None
    if run.plan is not None and run.plan.unchanged and not run.plan.changed:
        reused = reused_items(cache_table, run.plan.unchanged, **run.expand)
    if config.publish and run.total > 0:
        summary = _publish(run, started, reused)
    else:
        summary = _execute(run, started, None, reused)
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    log.info(
        "%d item(s): %d embedded, from %d unchanged file(s) reused, %d duplicate file(s); %d failed; "
        "%.1fs (%.0f items/s); index %s",
        summary.items, summary.embedded, summary.unchanged, summary.duplicate_files, summary.failed,
        summary.elapsed_s, summary.items_per_s, summary.index_version or "not built (--no-publish)",
    )
    return summary


def _publish(run: _Run, started: float, reused: pa.Table | None) -> EmbedSummary:
    """Embed and publish a new index as CURRENT, or keep CURRENT when ``reused`` (nothing
    changed) is exactly what it already holds."""
    from lookalike.index.builder import assemble_index
    from lookalike.index.manifest import publish_atomically
    from lookalike.pipeline.versions import record_promotion

    options = replace(run.config.index, num_shards=min(run.num_shards, run.total))
    params = resolve_options(run.total, options)
    if reused is not None:
        built = sum(1 for _ in split_by_shard(reused.select(["id"]), run.num_shards))
        current = current_index_if_same(run.store, run.meta["version"], {**params, "num_shards": built}, reused)
        if current is not None:
            summary = _execute(run, started, None, reused)
            summary.index_version = current
            log.info("the corpus is unchanged and index %s already holds these items: it stays CURRENT", current)
            return summary
    done: list[EmbedSummary] = []

    def write(tmp: Path) -> None:  # the index is built into tmp shard by shard, then assembled
        tmp.mkdir(parents=True)
        done.append(_execute(run, started, (str(tmp), params), reused))
        shards = collect_shard_entries(tmp)
        assemble_index(tmp, shards, model_version=run.meta["version"], params={**params, "num_shards": len(shards)},
                       options=options)

    index_version = publish_atomically(run.store, write, make_current=True)
    summary = done[0]
    summary.index_version = index_version
    record_promotion(run.store, index_version, f"embed run {run.run_dir.name}")
    return summary
