"""Hot swap: follow the store's CURRENT pointer and replace the served Backend atomically.

A ``BackendSlot`` holds the Backend every request reads at its start. Requests keep
the reference they took, so a request in flight finishes on the old version while
new requests already see the new one; swapping is one attribute assignment.

A ``StoreReloader`` loads the version CURRENT names (reusing the loaded model when
the new index was built by the same one), checks that model and index fit together
and answer a smoke query, and only then swaps. A version that fails any step is
refused: the old one keeps serving, the reason is logged and kept in
``last_reload_error`` (shown in /v1/info), and the watcher does not retry that same
version until CURRENT changes again (``POST /v1/admin/reload`` forces a retry).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from lookalike.index.searcher import ItemIndex
from lookalike.model.store import Store, StoreError
from lookalike.serving.backend import DEFAULT_MAX_EMBED_BATCH, Backend, check_compatible

if TYPE_CHECKING:  # imported when a model loads (``load``), not before the server listens
    from lookalike.model.artifact import Encoder

log = logging.getLogger(__name__)

DEFAULT_WATCH_INTERVAL_S = 2.0


class SmokeQueryError(RuntimeError):
    """A freshly loaded backend did not answer a known query correctly."""


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload attempt did: ``swapped``, ``unchanged``, ``refused`` (with ``error``),
    or ``skipped`` (CURRENT still names the version refused last time)."""

    status: str
    index_version: str | None
    model_version: str | None
    error: str | None = None
    seconds: float = 0.0


class BackendSlot:
    """The served Backend (None until the first one is loaded) and the reload history."""

    def __init__(self, backend: Backend | None = None):
        self.backend: Backend | None = backend
        self.last_reload_error: str | None = None
        self.last_refused_version: str | None = None
        self.last_reload_unix_s: float | None = None
        self.reload_count = 0

    def swap(self, backend: Backend) -> Backend | None:
        """Serve ``backend`` from now on; return the previous one."""
        old, self.backend = self.backend, backend
        self.reload_count += old is not None
        self.last_reload_error = None
        self.last_refused_version = None
        self.last_reload_unix_s = time.time()
        return old

    def settled(self) -> None:
        """The served version is the one CURRENT names: no refusal is pending any more."""
        self.last_reload_error = None
        self.last_refused_version = None

    def refuse(self, version: str | None, reason: str) -> None:
        self.last_reload_error = reason
        self.last_refused_version = version
        self.last_reload_unix_s = time.time()


def without_store_root(text: str, root: os.PathLike | str) -> str:
    """``text`` with paths inside the store written relative to it (for /v1/info and /readyz,
    which any client reads), the store root itself as 'the store', and in a suggested command
    (``--workdir ROOT``) as ``--workdir DIR``, so the command still reads as one."""
    root = str(root).rstrip("/")
    return text.replace(f"--workdir {root}", "--workdir DIR").replace(root + "/", "").replace(root, "the store")


def smoke_test(backend: Backend) -> None:
    """Embed a blank image and search by a stored embedding; raise SmokeQueryError if wrong."""
    enc, index = backend.encoder, backend.index
    query = enc.embed(np.zeros((1, *enc.spec.shape), np.float32))
    if query.shape != (1, index.embed_dim) or not np.isfinite(query).all():
        raise SmokeQueryError(f"the model embeds a blank image to {query.shape} with non-finite values or wrong size")
    if len(index) == 0:
        raise SmokeQueryError(f"index {index.version} holds no items")
    index.search(query, 1)
    row = len(index) // 2
    found = index.search(index.embeddings[row], 1)[0]
    if not found or found[0].score < 0.99:
        got = f"{found[0].id!r} with score {found[0].score:.3f}" if found else "nothing"
        raise SmokeQueryError(
            f"index {index.version}: searching by the stored embedding of {index.items[row]['id']!r} returned {got}"
        )


class StoreReloader:
    """Loads the CURRENT version of a store into a Backend, checked, ready to swap in."""

    def __init__(self, workdir: str | os.PathLike, max_embed_batch: int = DEFAULT_MAX_EMBED_BATCH):
        self.store = Store.at(workdir)
        self.max_embed_batch = max_embed_batch  # a new model's forward is compiled up to this batch before the swap
        self._lock = threading.Lock()  # one load at a time (watcher and admin endpoint)

    def current_version(self) -> str | None:
        return self.store.current_index()

    def load(self, version: str, reuse: Backend | None = None) -> Backend:
        """Load index ``version`` and its model (reusing ``reuse.encoder`` when it is that model)."""
        from lookalike.model.artifact import load_encoder

        index = ItemIndex.load(self.store.index_dir(version))
        encoder: Encoder
        if reuse is not None and reuse.encoder.version == index.model_version:
            encoder = reuse.encoder
        else:
            model_dir = self.store.model_dir(index.model_version)
            if not (model_dir / "model.json").is_file():
                raise StoreError(f"index {version} names model {index.model_version!r}, which is not in {self.store.models_dir}")
            encoder = load_encoder(model_dir)
        check_compatible(encoder, index, str(self.store.root))
        backend = Backend(encoder=encoder, index=index)
        if encoder is not getattr(reuse, "encoder", None):
            encoder.warm_up(self.max_embed_batch)  # compile before the swap, not during live queries
        smoke_test(backend)
        backend.results_json  # read the result metadata before the swap, not in the first request
        return backend

    def reload(self, slot: BackendSlot, force: bool = False) -> ReloadOutcome:
        """Swap in CURRENT if it differs from the served version (or a refused one, unless ``force``)."""
        with self._lock:
            started = time.perf_counter()
            served = slot.backend
            try:
                version, problem = self.current_version(), f"no CURRENT pointer in {self.store.root}"
            except (OSError, ValueError) as e:
                version, problem = None, f"cannot read the CURRENT pointer in {self.store.root}: {e}"
            if served is not None and served.index.version == version:
                slot.settled()  # CURRENT points back at the served version: an earlier refusal is over
                return ReloadOutcome("unchanged", version, served.encoder.version)
            if not force and slot.last_reload_error is not None and version == slot.last_refused_version:
                return ReloadOutcome("skipped", version, None, slot.last_reload_error)  # logged once already
            if version is None:
                return self._refused(slot, None, problem, started)
            try:
                backend = self.load(version, reuse=served)
            except Exception as e:  # any failure refuses the version; the old one keeps serving
                return self._refused(slot, version, f"index {version} refused: {type(e).__name__}: {e}", started)
            slot.swap(backend)
            seconds = time.perf_counter() - started
            log.info(
                "now serving index %s (model %s, %d items), swapped in after %.2fs of loading",
                version, backend.encoder.version, len(backend.index), seconds,
            )
            return ReloadOutcome("swapped", version, backend.encoder.version, seconds=seconds)

    def _refused(self, slot: BackendSlot, version: str | None, error: str, started: float) -> ReloadOutcome:
        served = slot.backend.index.version if slot.backend else None
        log.error("%s; still serving %s", error, served)
        slot.refuse(version, without_store_root(error, self.store.root))  # clients see no server paths
        return ReloadOutcome("refused", version, None, error, time.perf_counter() - started)

