"""What the server answers from: the CURRENT index and the model that built it.

The index manifest names the model version its embeddings came from, so the server
loads exactly that model (not LATEST, which may be newer and incompatible) and
refuses to start when the two disagree: queries embedded by another model would
return confident nonsense rather than an error.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from lookalike.index.searcher import ItemIndex
from lookalike.model.store import Store, StoreError
from lookalike.serving.results import ResultRows, ResultsJSON

if TYPE_CHECKING:  # JAX, Flax and orbax are imported when a model loads, so the server listens first
    from lookalike.model.artifact import Encoder

log = logging.getLogger(__name__)


class BackendMismatchError(StoreError):
    """The served index and its model do not fit together; the message says what to rerun."""


@dataclass(frozen=True)
class Backend:
    """A loaded encoder and index, shared read-only by every request."""

    encoder: Encoder
    index: ItemIndex
    loaded_unix_s: float = field(default_factory=time.time)

    @property
    def store_root(self) -> Path:
        """The store the index was loaded from (DIR of DIR/indexes/<version>)."""
        return self.index.path.parent.parent

    @cached_property
    def rows(self) -> ResultRows:
        """Per-row result metadata, read once (the loaders build it before serving)."""
        return ResultRows(self.index.items)

    @cached_property
    def results_json(self) -> ResultsJSON:
        """Search results written as JSON, with per-row fields encoded once (built with ``rows``)."""
        return ResultsJSON(self.rows)


def check_compatible(encoder: Encoder, index: ItemIndex, workdir: str) -> None:
    """Raise BackendMismatchError unless ``index`` was built by ``encoder``."""
    problems = []
    if encoder.version != index.model_version:
        problems.append(f"the index names model {index.model_version!r} but model {encoder.version!r} was loaded")
    if encoder.embed_dim != index.embed_dim:
        problems.append(f"the model embeds to {encoder.embed_dim} dimensions but the index holds {index.embed_dim}")
    if problems:
        raise BackendMismatchError(
            f"index {index.version} cannot be served: {'; '.join(problems)}. "
            f"Rebuild it with `lookalike embed --workdir {workdir}`"
        )


# The most uploaded images one model forward takes (the engine's default; see --max-embed-batch).
DEFAULT_MAX_EMBED_BATCH = 16


def load_backend(workdir: str | os.PathLike, max_embed_batch: int = DEFAULT_MAX_EMBED_BATCH) -> Backend:
    """Load the CURRENT index of ``workdir`` and the model version its manifest names, its
    forward compiled for every batch of up to ``max_embed_batch`` images.

    Raises StoreError (the message says which step to run) when the index or the
    model is missing, and BackendMismatchError when they do not fit together.
    """
    from lookalike.model.artifact import load_encoder

    started = time.perf_counter()
    store = Store.at(workdir)
    index = ItemIndex.load(store.require_current_index())
    encoder = load_encoder(store.require_model(index.model_version))
    check_compatible(encoder, index, str(store.root))
    encoder.warm_up(max_embed_batch)  # compile every batch shape now, not during live queries
    backend = Backend(encoder=encoder, index=index)
    backend.results_json  # read the result metadata now, not in the first request
    log.info(
        "backend ready in %.1fs: index %s (%d items), model %s (dim %d)",
        time.perf_counter() - started, index.version, len(index), encoder.version, encoder.embed_dim,
    )
    return backend
