"""The ``demo`` job: the bundled digits through every stage.

A thin composition of the library calls every subcommand uses: ``write_digits_corpus``
-> ``train_and_evaluate`` -> ``run_embed`` (Beam pipeline, index build, atomic publish).
The server is started by the CLI, not here; ``reindex`` lives in ``reindex.py``.
"""

from __future__ import annotations

import gc
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
    trained = train_and_evaluate(config, workdir)
    gc.collect()  # training's garbage, before run_embed freezes what is alive (model.memory)
    embedded = run_embed(EmbedConfig(workdir=str(store.root), model_version=trained.version, num_workers=num_workers))
    return JobResult(train=trained, embed=embedded)
