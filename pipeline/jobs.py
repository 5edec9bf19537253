"""Whole jobs that chain the stages: ``demo`` and ``reindex``.

Both are thin compositions of the library calls every subcommand uses:
``write_digits_corpus`` -> ``train_and_evaluate`` -> ``run_embed`` (Beam pipeline,
index build, atomic publish). The server is started by the CLI, not here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lookalike.model.config import TrainConfig
from lookalike.model.datasets import write_digits_corpus
from lookalike.model.store import Store
from lookalike.model.train import TrainResult, train_and_evaluate
from lookalike.pipeline.embed import EmbedConfig, EmbedSummary, run_embed

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    train: TrainResult
    embed: EmbedSummary


def run_demo(config: TrainConfig, workdir: str | Path, num_workers: int = 1) -> JobResult:
    """Write the bundled digits as files, train, embed and publish an index."""
    store = Store.at(workdir)
    write_digits_corpus(store.corpus_dir)
    return retrain_and_reindex(config, workdir, num_workers=num_workers)


def retrain_and_reindex(
    config: TrainConfig, workdir: str | Path, corpus: str | None = None, num_workers: int = 1, keep_versions: int = 5
) -> JobResult:
    """Train a model on the labelled corpus, embed the corpus with it, publish, prune old indexes."""
    store = Store.at(workdir)
    corpus_dir = Path(corpus) if corpus else store.corpus_dir
    trained = train_and_evaluate(config, workdir, data_dir=corpus_dir)
    embedded = run_embed(
        EmbedConfig(workdir=str(store.root), corpus=str(corpus_dir), model_version=trained.version, num_workers=num_workers)
    )
    prune_indexes(store, keep_versions)
    return JobResult(train=trained, embed=embedded)


def prune_indexes(store: Store, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` index versions, never the CURRENT one."""
    import shutil

    current = store.current_index()
    versions = sorted(p.name for p in store.indexes_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    removed = [v for v in versions[: max(0, len(versions) - keep)] if v != current]
    for v in removed:
        shutil.rmtree(store.index_dir(v), ignore_errors=True)
        log.info("removed old index version %s", v)
    return removed
