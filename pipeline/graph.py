r"""The embed job's Beam graph, its configuration and runner options (run by ``pipeline.embed``).

::

    corpus listed before the run (only the files not known unchanged with --incremental),
    written to a listing file sorted by size and cut into chunks of equal-size runs
      -> ReadChunkFn: read + sha256 + decode (byte-identical files share a chunk: decoded
         once; photos and videos several at once), thumbnails, full batches carried
         over between chunks ------------------------------------------- dead -----+
           |  \--- cached (--incremental, bytes known to the cache) ---------+      |
      -> RunInference(FlaxEncoderHandler), one ItemBatch (metas, pixels) a call,   |
         dispatched asynchronously (JAX), fused with reading and decoding    |      |
      -> BatchRowsFn (one batch behind): cache file per batch; Arrow items table per shard
           |       files unchanged by path, size, mtime, inode (listed before) --> ReusedItemsFn
      GroupByKey(shard) <- (shard, items table) <-----------------------------+      |
      -> concatenated, sorted by id, --metadata joined -> WriteParquetShardFn (embeddings-SSSSS-of-NNNNN)
                                    \-> BuildIndexShardFn (ScaNN shard)              |
                                   GroupByKey -> WriteJsonlFn (dead_letter) <-------+
      all sinks -> Done   (one final transform: the Dask runner computes only the last)

A TFDS data set, a list file or a corpus too big to list first is read file by file
(``ReadSourceFn``: read + sha256; ``ReadTfdsRangeFn``: a range of examples, each encoded as
PNG + sha256; with --incremental both send bytes the cache knows down the "cached" path),
grouped by content-hash bucket (byte-identical files meet), and decoded into batches by
``DecodeBatchFn``; the rest of the graph is the same.

Per item, only the decode stage does Python work; after inference a batch travels as
one Arrow table (``lookalike.pipeline.items``). Index shards are built on the workers
(``BuildIndexShardFn``, with the build parameters of the run's item count, a side input:
a video is one file but many items); ``lookalike.pipeline.embed`` assembles and publishes them.

Locally the runner is Beam's in-process ``FnApiRunner``, named explicitly: the
DirectRunner would first try to download a Prism binary. ``num_workers > 1``
switches it to its multi-process mode, each worker's XLA thread pool sized to its share of
the CPUs (``lookalike.model.cpu_threads``), its logging set up like this process's and
Ctrl-C stopping it (``lookalike.pipeline.workers``); each worker logs the progress of its
own share, and ``lookalike.pipeline.embed`` the overall count once the run ends.
``--runner dask`` runs the same graph on a dask.distributed cluster
(``lookalike.pipeline.dask_runner``). Sinks write whole files
after a GroupByKey, so the graph is correct on runners without bundle finalisation.
"""


from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineRunner

from lookalike.index.builder import IndexOptions
from lookalike.model.cpu_threads import threads_per_worker
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.store import Store
from lookalike.pipeline.batches import BATCH, BatchRowsFn, DecodeBatchFn, bucket_of, split_tagged
from lookalike.pipeline.cache import WriteFileIndexFn, cache_dir
from lookalike.pipeline.elements import EmbeddedBatch, ItemBatch, Routed, ShardTable
from lookalike.pipeline.index_shards import BuildIndexShardFn, index_build_params
from lookalike.pipeline.inference import FlaxEncoderHandler
from lookalike.pipeline.items import embedding_schema
from lookalike.pipeline.listing import ReadChunkFn, read_unchanged
from lookalike.pipeline.metadata import MetadataSpec, with_metadata
from lookalike.pipeline.reuse import ReusedItemsFn, ReusePlan, globstar_variants
from lookalike.pipeline.sources import CACHED, DEAD, FILE, NEW, ReadSourceFn, read_list_file
from lookalike.pipeline.tfds_source import ReadTfdsRangeFn, TfdsSpec, example_ranges
from lookalike.pipeline.video import FrameSampling
from lookalike.pipeline.writers import WriteJsonlFn, WriteParquetShardFn

log = logging.getLogger(__name__)

LOCAL_RUNNER = "FnApiRunner"
THUMBNAILS_FOLDER = "thumbnails"  # under the store root
DASK_RUNNER_ALIASES = {"dask", "daskrunner", "fixeddaskrunner"}
# Corpus listings up to this many files travel in the pipeline graph; bigger ones are matched again by Beam.
LISTING_IN_GRAPH_MAX = 500_000

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
    decode_threads: int | None = None  # sources decoded at once in each process; default one per CPU (its share)
    max_batch_size: int = 256  # files per inference batch (videos add one row per sampled frame)
    num_shards: int | None = None  # embedding shards; default one per ~50k files
    index: IndexOptions = field(default_factory=IndexOptions)
    beam_args: list[str] = field(default_factory=list)
    publish: bool = True
    incremental: bool = False
    sampling: FrameSampling = field(default_factory=FrameSampling)
    metadata: str | None = None  # a JSONL, CSV or Parquet file of item metadata, joined by id (pipeline.metadata)
    # After publishing: prune index versions and `lookalike embed` runs beyond this many (versions.prune); None: keep all
    keep_versions: int | None = None
    # reindex's own run: marked as such from the moment its folder is claimed (Store.mark_reindex_run), so
    # one killed before it finished is removed by the next run (leftovers.clean_unfinished_reindex_runs)
    reindex_run: bool = False


@dataclass
class EmbedRun:
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
    # Files matched but left out of ``listing`` and ``total`` (names not UTF-8: dead-lettered at the
    # start), and corpus folders that could not be listed (a dead letter each): the summary's
    # files_matched counts the first, its unlisted_folders the second.
    misnamed_left_out: int = 0
    unlisted_folders: int = 0
    plan: ReusePlan | None = None  # --incremental on a matched corpus: files split before Beam
    # The pipeline reads the files to read from a listing file (``listing.write_listing``): a listed
    # corpus whose files to read (all, or those the plan did not settle) are few enough
    # (``embed.LISTING_IN_GRAPH_MAX``). Else Beam matches the corpus again and ``ReadSourceFn.read_one``
    # settles every file itself: unchanged ones, files not media, bytes known to fail, bad names.
    reads_listing: bool = False
    listing_file: str | None = None  # the files to read (listed before the run), chunked by size
    unchanged_file: str | None = None  # the plan's unchanged files, when the pipeline reads the listing
    chunks: list[tuple[int, int]] | None = None  # [start, stop) rows of listing_file, one element each
    tfds_ranges: list[tuple[str, int, int]] | None = None  # a TFDS source's (split, start, stop) example ranges, one element each
    metadata: MetadataSpec | None = None  # the checked --metadata file, joined onto every shard
    redo_sources: frozenset[str] = frozenset()  # cached source hashes whose thumbnails are gone: decoded again
    stop_mark: int = 0  # interrupts.stop_mark() when the run started: a stop signal since then ends it before publishing
    leave_out: str | None = None  # the store's folder when it lies inside the corpus (``reuse.store_inside_corpus``)

    @property
    def files_to_read(self) -> int:
        """Files the pipeline reads (the progress logs' totals): all, or those the plan did not settle."""
        return len(self.plan.changed) if self.plan is not None and self.reads_listing else self.total

    @property
    def progress_total(self) -> int:
        """The total the read and embed progress lines count towards: ``files_to_read`` when one
        process does all the work, else 0: each worker process then logs its own share, without
        a percentage or ETA it cannot know (the main process logs the overall count at the end)."""
        one_process = self.config.runner == LOCAL_RUNNER and self.config.num_workers == 1
        return self.files_to_read if one_process else 0

    @property
    def cache(self) -> str:
        return str(cache_dir(self.store.embeddings_dir, self.meta["version"]))

    @property
    def num_shards(self) -> int:
        return num_shards_for(self.total, self.config.num_shards)

    @property
    def schema(self) -> pa.Schema:
        return embedding_schema(int(self.meta["embed_dim"]))

    def index_params(self, item_count: int, *, warn: bool = True) -> dict[str, Any]:
        """The index build parameters for ``item_count`` items (``index_build_params``)."""
        return index_build_params(self.config.index, self.num_shards, item_count, warn=warn)

    @property
    def expand(self) -> dict[str, str]:
        """How cached or embedded rows become items (``items.expand_items`` arguments): thumbnail
        paths, and the uris of files inside the store (its corpus/), are recorded relative to
        the store root, so a moved or copied store finds them."""
        return {"root": self.root, "thumbnails_dir": THUMBNAILS_FOLDER, "store_root": str(self.store.root),
                "model_version": self.meta["version"]}


def num_shards_for(total_files: int, requested: int | None) -> int:
    """Embedding shards: as requested, else one per ~50k files."""
    return requested if requested else max(1, -(-total_files // 50_000))


def cpu_share(config: EmbedConfig) -> int | None:
    """CPUs each worker process may use for XLA's thread pool and for decoding, when the local
    runner's multi-process mode starts several on this machine (an equal share each), else
    None: the process uses every CPU it may run on."""
    if config.runner == LOCAL_RUNNER and config.num_workers > 1:
        return threads_per_worker(config.num_workers)
    return None


def resolve_runner(name: str) -> str:
    """Runner names as Beam takes them; ``dask`` means our fixed Dask runner (imported only
    then: importing Beam's Dask runner takes over a second)."""
    if name.lower() not in DASK_RUNNER_ALIASES:
        return name
    from lookalike.pipeline.dask_runner import RUNNER_PATH

    return RUNNER_PATH


def local_runner(config: EmbedConfig) -> PipelineRunner | None:
    """The runner object for the local runner (``workers.LocalRunner``: its worker processes log
    like this one and stop on Ctrl-C), else None: Beam makes the runner the options name."""
    if config.runner != LOCAL_RUNNER:
        return None
    from lookalike.pipeline.workers import LocalRunner

    return LocalRunner()


def pipeline_options(config: EmbedConfig) -> PipelineOptions:
    args = [f"--runner={resolve_runner(config.runner)}", *config.beam_args]
    if config.runner == LOCAL_RUNNER and config.num_workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={config.num_workers}"]
    return PipelineOptions(args)


def read_sources(p: beam.Pipeline, run: EmbedRun) -> dict[str, beam.PCollection]:
    """The source stage: ("new" | "cached" | "dead" | "file") PCollections."""
    config = run.config
    if config.tfds:
        tfds_spec = TfdsSpec.parse(config.tfds, config.tfds_data_dir)
        ranges = run.tfds_ranges if run.tfds_ranges is not None else example_ranges(tfds_spec)
        tagged = (p | "TfdsRanges" >> beam.Create(ranges)
                  | "ReadTfds" >> beam.ParDo(ReadTfdsRangeFn(tfds_spec, run.cache if config.incremental else None)))
        return split_tagged(tagged, (NEW, CACHED, DEAD, FILE), "Read")
    if config.list_file:
        files = p | "ListedFiles" >> beam.Create(read_list_file(config.list_file)) | "AsMetadata" >> beam.Map(
            lambda path: FileMetadata(path, 0))
    else:
        variants = globstar_variants(run.pattern) if run.pattern.count("**") == 1 else [run.pattern]  # disjoint matches
        files = (p | "CorpusPatterns" >> beam.Create(variants, reshuffle=False)
                 | "MatchCorpus" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW))
    reader = ReadSourceFn(run.cache if config.incremental else None, run.progress_total, config.sampling, run.redo_sources,
                          leave_out=run.leave_out)
    read = files | "ReadAndHash" >> beam.ParDo(reader)
    return split_tagged(read, (NEW, CACHED, DEAD, FILE), "Read")


def read_and_decode(p: beam.Pipeline, run: EmbedRun, spec: PreprocessSpec) -> dict[str, beam.PCollection]:
    """Sources to decoded batches: "batch" ((metas, pixels)), "dead" (letters), "cached" (lists of
    (uri, source hash)) and "file" (file index tables, or lists of rows).

    A corpus listed before the run (a folder or glob of at most LISTING_IN_GRAPH_MAX files)
    is read in chunks of files of equal sizes (``listing.write_listing``): read, hash and
    decode in one DoFn, fused with inference. Other sources (TFDS, a list file, bigger
    corpora) are read file by file and grouped by content-hash bucket before decoding."""
    config = run.config
    thumbnails = str(run.store.root / THUMBNAILS_FOLDER)
    decode_threads = config.decode_threads or cpu_share(config)  # None: every CPU the (worker) process may use
    if run.listing_file is not None:
        chunks = run.chunks or []
        reshuffle = len(chunks) > 1 and not (config.runner == LOCAL_RUNNER and config.num_workers == 1)
        tagged = (p | "ListedChunks" >> beam.Create(chunks, reshuffle=reshuffle)
                  | "ReadAndDecode" >> beam.ParDo(ReadChunkFn(
                      run.listing_file, run.cache if config.incremental else None, run.progress_total, spec, thumbnails,
                      config.sampling, config.max_batch_size, failures_dir=run.cache, decode_threads=decode_threads,
                      redo_sources=run.redo_sources))
                  .with_output_types(Routed))
        return split_tagged(tagged, (BATCH, DEAD, CACHED, FILE), "Chunk", {BATCH: ItemBatch})
    read = read_sources(p, run)
    num_buckets = max(1, -(-run.total // max(1, config.max_batch_size)))
    decoded = split_tagged(
        read[NEW]
        | "ToBucket" >> beam.Map(lambda entry: (bucket_of(entry[0], num_buckets), entry))
        | "GroupBuckets" >> beam.GroupByKey()
        | "DecodeBatches" >> beam.ParDo(DecodeBatchFn(spec, thumbnails, config.sampling, config.max_batch_size,
                                                      failures_dir=run.cache, decode_threads=decode_threads))
        .with_output_types(Routed),
        (BATCH, DEAD), "Decoded", {BATCH: ItemBatch})
    return {
        BATCH: decoded[BATCH],
        DEAD: (read[DEAD], decoded[DEAD]) | "ReadOrDecodeDead" >> beam.Flatten(),
        CACHED: read[CACHED] | "CachedChunk" >> beam.Map(lambda pair: [pair]),
        FILE: read[FILE] | "FileRowChunk" >> beam.Map(lambda row: [row]),
    }


def build_pipeline(p: beam.Pipeline, run: EmbedRun, index_dir: str | None = None) -> None:
    """Add the embed transforms to ``p``; every sink feeds the final ``Done`` transform.
    With ``index_dir`` (the new index's temporary folder), each embedding shard also becomes
    a ScaNN index shard there, built with the parameters of the run's item count."""
    config, embed_dim = run.config, int(run.meta["embed_dim"])
    spec = PreprocessSpec.from_dict(run.meta["preprocess"])
    read = read_and_decode(p, run, spec)
    file_index = (
        read[FILE]
        | "FileIndexKey" >> beam.Map(lambda rows: (0, rows))
        | "GroupFileIndex" >> beam.GroupByKey()
        | "WriteFileIndex" >> beam.ParDo(WriteFileIndexFn(run.cache))
    )
    # Pre-made batches, one per RunInference call: max_batch_size=1 makes BatchElements emit in process().
    handler = FlaxEncoderHandler(run.model_dir, min_batch_size=1, max_batch_size=1, encoder_batch=config.max_batch_size,
                                 xla_cpu_threads=cpu_share(config))
    items = read[BATCH] | "Embed" >> RunInference(handler).with_output_types(EmbeddedBatch) | "BatchRows" >> beam.ParDo(
        BatchRowsFn(run.progress_total if not (config.incremental and run.progress_total) else None, run.cache, embed_dim,
                    run.num_shards, **run.expand)).with_output_types(ShardTable)
    if config.incremental:  # only an incremental run has cached files (a Flatten costs a stage of its own)
        cached_files = read[CACHED]
        if run.unchanged_file is not None:  # else read_one finds them, if any, as Beam matches the corpus again
            unchanged = (p | "UnchangedFiles" >> beam.Create([run.unchanged_file], reshuffle=False)
                         | "ReadUnchanged" >> beam.Map(read_unchanged))
            cached_files = (cached_files, unchanged) | "AllCached" >> beam.Flatten()
        old_items = (
            cached_files
            | "CachedKey" >> beam.Map(lambda chunk: (0, chunk))
            | "GroupCached" >> beam.GroupByKey()
            | "ReusedItems" >> beam.ParDo(ReusedItemsFn(run.cache, embed_dim, run.num_shards, **run.expand))
            .with_output_types(ShardTable)
        )
        items = (items, old_items) | "AllItems" >> beam.Flatten()
    schema, metadata = run.schema, run.metadata
    shards = (
        items
        | "GroupShards" >> beam.GroupByKey()
        | "SortShards" >> beam.Map(lambda kv: (kv[0], with_metadata(list(kv[1]), schema, metadata)))
        .with_output_types(ShardTable)
    )
    sinks = [shards | "WriteParquet" >> beam.ParDo(WriteParquetShardFn(f"{run.run_dir}/embeddings", run.num_shards))]
    if index_dir is not None:
        item_count = (shards | "ShardSizes" >> beam.Map(lambda kv: kv[1].num_rows)
                      | "ItemCount" >> beam.CombineGlobally(sum))
        sinks.append(shards | "BuildIndexShards" >> beam.ParDo(
            BuildIndexShardFn(index_dir, run.config.index, run.num_shards), beam.pvalue.AsSingleton(item_count)))
    dead_files = (
        read[DEAD]
        | "DeadKey" >> beam.Map(lambda row: (0, row))
        | "GroupDead" >> beam.GroupByKey()
        | "WriteDead" >> beam.ParDo(WriteJsonlFn(f"{run.run_dir}/dead_letter-00000-of-00001.jsonl"))
    )
    _ = (*sinks, dead_files, file_index) | "AllSinks" >> beam.Flatten() | "Done" >> beam.Map(lambda path: path)


__all__ = ["DASK_RUNNER_ALIASES", "EmbedConfig", "EmbedRun", "LISTING_IN_GRAPH_MAX", "LOCAL_RUNNER", "build_pipeline",
           "local_runner", "num_shards_for", "pipeline_options", "resolve_runner"]
