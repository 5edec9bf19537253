"""The ``embed`` job: corpus -> embeddings (Parquet) -> ScaNN index, as a Beam pipeline.

::

    MatchFiles(corpus/**) -> DecodeImageFn --dead--> dead_letter-*.jsonl
                                  |
                   RunInference(KeyedModelHandler(FlaxEncoderHandler))
                                  |
                     to_record -> WriteToParquet(embeddings-*.parquet)

After the pipeline finishes, the Parquet shards are read back, a ScaNN index is
built and published atomically as the store's CURRENT version, and a run summary
(counts, elapsed, items per second) is written beside the embeddings. A corpus where
nothing could be embedded fails with a clear message and publishes nothing.

Locally the runner is Beam's in-process ``FnApiRunner``, named explicitly: the
DirectRunner would first try to download a Prism binary. ``num_workers > 1``
switches it to its multi-process mode.
"""

from __future__ import annotations

import glob
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from lookalike.index.builder import IndexOptions, build_and_publish
from lookalike.model.artifact import read_model_meta
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.progress import Progress
from lookalike.model.store import Store, StoreError, check_version_name
from lookalike.pipeline.inference import FlaxEncoderHandler
from lookalike.pipeline.sources import DEAD, DecodeImageFn, corpus_pattern, corpus_root, dead_letter, is_image_path

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
    ("model_version", pa.string()),
]


class EmbedError(RuntimeError):
    """The embed job could not produce an index; the message says why."""


@dataclass
class EmbedConfig:
    workdir: str
    corpus: str | None = None  # folder or glob; default workdir/corpus
    model_version: str | None = None  # default models/LATEST
    run_name: str | None = None
    runner: str = LOCAL_RUNNER
    num_workers: int = 1
    max_batch_size: int = 256
    index: IndexOptions = field(default_factory=IndexOptions)
    beam_args: list[str] = field(default_factory=list)
    publish: bool = True


@dataclass
class EmbedSummary:
    run: str
    run_dir: str
    model_version: str
    index_version: str | None
    files_matched: int
    embedded: int
    failed: int
    elapsed_s: float
    items_per_s: float
    runner: str
    dead_letter_examples: list[dict[str, str]]


def embedding_schema(embed_dim: int) -> pa.Schema:
    return pa.schema(EMBEDDING_SCHEMA_FIELDS + [("embedding", pa.list_(pa.float32(), embed_dim))])


class ToRecordFn(beam.DoFn):
    """(item, PredictionResult) -> Parquet row; logs progress with rate and ETA."""

    def __init__(self, model_version: str, total: int):
        self._model_version = model_version
        self._total = total

    def setup(self) -> None:
        self._progress = Progress("embed", total=self._total, unit="items", logger=log)
        self._count = 0

    def process(self, keyed: tuple[dict[str, Any], Any]):
        item, result = keyed
        self._count += 1
        self._progress.update(self._count)
        yield {**item, "model_version": self._model_version, "embedding": np.asarray(result.inference, np.float32).tolist()}


def pipeline_options(config: EmbedConfig) -> PipelineOptions:
    args = [f"--runner={config.runner}", *config.beam_args]
    if config.runner == LOCAL_RUNNER and config.num_workers > 1:
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={config.num_workers}"]
    return PipelineOptions(args)


def build_pipeline(
    p: beam.Pipeline, pattern: str, root: str, model_dir: str, meta: dict[str, Any], run_dir: str, total: int, max_batch_size: int
) -> None:
    """Add the embed transforms to ``p``."""
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    matched = p | "MatchCorpus" >> fileio.MatchFiles(pattern, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
    images = matched | "ImageSuffix" >> beam.Filter(lambda m: is_image_path(m.path))
    others = matched | "OtherSuffix" >> beam.Filter(lambda m: not is_image_path(m.path))
    decoded = images | "Decode" >> beam.ParDo(DecodeImageFn(spec, root)).with_outputs(DEAD, main="ok")
    handler = KeyedModelHandler(FlaxEncoderHandler(model_dir, min_batch_size=min(32, max_batch_size), max_batch_size=max_batch_size))
    (
        decoded.ok
        | "Embed" >> RunInference(handler)
        | "ToRecord" >> beam.ParDo(ToRecordFn(meta["version"], total))
        | "WriteParquet" >> beam.io.WriteToParquet(
            f"{run_dir}/embeddings", embedding_schema(int(meta["embed_dim"])), file_name_suffix=".parquet"
        )
    )
    rejected = others | "NotImage" >> beam.Map(
        lambda m: dead_letter(m.path, "filter", "not an image file (unsupported suffix)")
    )
    (
        (decoded[DEAD], rejected)
        | "AllDead" >> beam.Flatten()
        | "DeadJson" >> beam.Map(json.dumps)
        | "WriteDead" >> beam.io.WriteToText(f"{run_dir}/dead_letter", file_name_suffix=".jsonl")
    )


def read_embeddings(run_dir: Path) -> tuple[np.ndarray, pa.Table]:
    """Read ``embeddings-*.parquet`` of a run -> ([N, D] float32, items table without embeddings)."""
    files = sorted(glob.glob(str(run_dir / "embeddings-*.parquet")))
    tables = [pq.read_table(f) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return np.zeros((0, 0), np.float32), pa.table({})
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
    from apache_beam.io.filesystems import FileSystems

    try:
        return sum(len(m.metadata_list) for m in FileSystems.match([pattern]))
    except Exception:  # an empty or unreachable pattern: the pipeline reports it
        return 0


def run_embed(config: EmbedConfig) -> EmbedSummary:
    """Run the pipeline, build and publish the index; raise EmbedError if nothing was embedded."""
    store = Store.at(config.workdir)
    model_dir = store.require_model(config.model_version)
    meta = read_model_meta(model_dir)
    corpus = config.corpus or str(store.corpus_dir)
    if "://" not in corpus and not any(ch in corpus for ch in "*?[") and not Path(corpus).is_dir():
        raise StoreError(f"corpus folder {corpus} does not exist: run `lookalike demo` or pass --corpus")
    if "://" not in corpus:
        corpus = str(Path(corpus).expanduser().resolve()) if not any(ch in corpus for ch in "*?[") else corpus
    pattern, root = corpus_pattern(corpus), corpus_root(corpus)
    run = check_version_name(config.run_name or time.strftime("e-%Y%m%dT%H%M%S", time.gmtime()))
    run_dir = store.embedding_run_dir(run)
    if run_dir.exists():
        raise EmbedError(f"embedding run {run_dir} already exists; choose another --run-name")
    run_dir.mkdir(parents=True)
    total = count_matches(pattern)
    log.info("embedding %d file(s) matching %s with model %s on %s", total, pattern, meta["version"], config.runner)
    started = time.perf_counter()
    with beam.Pipeline(options=pipeline_options(config)) as p:
        build_pipeline(p, pattern, root, str(model_dir), meta, str(run_dir), total, config.max_batch_size)
    embeddings, items = read_embeddings(run_dir)
    dead = read_dead_letters(run_dir)
    elapsed = time.perf_counter() - started
    summary = EmbedSummary(
        run=run,
        run_dir=str(run_dir),
        model_version=meta["version"],
        index_version=None,
        files_matched=total,
        embedded=int(len(embeddings)),
        failed=len(dead),
        elapsed_s=round(elapsed, 3),
        items_per_s=round(len(embeddings) / elapsed, 1) if elapsed > 0 else 0.0,
        runner=config.runner,
        dead_letter_examples=dead[:20],
    )
    for row in dead:
        log.warning("skipped %s at %s: %s", row["uri"], row["stage"], row["reason"])
    if len(embeddings) == 0:
        (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        raise EmbedError(
            f"nothing embedded from {pattern}: {total} file(s) matched, {len(dead)} rejected "
            f"(see {run_dir}/dead_letter-*.jsonl); no index published"
        )
    if config.publish:
        summary.index_version = build_and_publish(store, embeddings, items, model_version=meta["version"], options=config.index)
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    log.info(
        "embedded %d item(s), %d failed, in %.1fs (%.0f items/s); index %s",
        summary.embedded, summary.failed, elapsed, summary.items_per_s, summary.index_version,
    )
    return summary
