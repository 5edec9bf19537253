"""What interrupted and killed runs leave in a store, and its removal.

A reindex run marks the index candidate it builds (``mark_candidate``) until it promotes or
discards it; a run that dies in between leaves the mark, and the next run holding the store
lock removes the candidate (``clean_candidates``). A killed run also leaves temporary
folders: partial indexes (``indexes/.tmp-*``, each locked by its live writer), partial models
and embedding run folders holding only the listing it wrote before its pipeline started; and a
reindex killed or stopped in its embed step leaves that run unfinished (no summary).
``clean_leftovers`` removes what applies right after a run takes the store lock and says so
in one line.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lookalike.index.manifest import WRITER_LOCK_SUFFIX, writer_lock_path
from lookalike.model.filelock import try_lock, try_lock_folder, unlock
from lookalike.model.store import REINDEX_RUN_MARK, Store

log = logging.getLogger(__name__)

CANDIDATE_MARK = ".candidate-"


def mark_candidate(store: Store, version: str) -> None:
    """Note that index ``version`` is about to be built as an unpromoted candidate: if the run
    dies before promoting or discarding it, the next run removes it (``clean_candidates``)."""
    store.indexes_dir.mkdir(parents=True, exist_ok=True)
    (store.indexes_dir / f"{CANDIDATE_MARK}{store.index_dir(version).name}").touch()


def unmark_candidate(store: Store, version: str) -> None:
    """The candidate was promoted: it is an ordinary version now."""
    (store.indexes_dir / f"{CANDIDATE_MARK}{version}").unlink(missing_ok=True)


def discard_candidate(store: Store, version: str) -> None:
    """Remove an unpromoted candidate's folder (it must never serve or count as kept)."""
    if _remove_candidate(store, version):
        log.info("removed index candidate %s (not promoted)", version)


def _remove_candidate(store: Store, version: str) -> bool:
    """Remove candidate ``version``'s folder and mark unless it serves (then it only loses its
    mark); True if a folder was removed. Logs nothing: the callers say what they removed."""
    if store.current_index_or_none() == version:
        unmark_candidate(store, version)
        return False
    existed = store.index_dir(version).exists()
    shutil.rmtree(store.index_dir(version), ignore_errors=True)
    unmark_candidate(store, version)
    return existed


def clean_candidates(store: Store) -> list[str]:
    """Remove candidates a killed or interrupted run built but never promoted (call only while
    holding the store lock); a candidate that did become CURRENT just loses its mark. Returns
    the versions removed; logs nothing (``clean_leftovers`` does)."""
    removed = []
    if store.indexes_dir.is_dir():
        for mark in store.indexes_dir.glob(f"{CANDIDATE_MARK}*"):
            if _remove_candidate(store, version := mark.name[len(CANDIDATE_MARK):]):
                removed.append(version)
    return removed


def clean_leftovers(store: Store, took_over_stale: bool) -> list[str]:
    """Remove what earlier runs left, just after taking the store lock (call only while holding
    it): index candidates a run built but never promoted (a run stopped by Ctrl-C leaves one
    too), and, when the lock was taken over from a run that died (``took_over_stale``), its
    temporary folders (``clean_partial``). Logs one line saying what was removed (after a
    dead run, also that there was nothing); returns the versions and folders removed."""
    partial = clean_partial(store, quiet=True) if took_over_stale else []
    candidates = clean_candidates(store)
    unfinished = clean_unfinished_reindex_runs(store)  # a stopped run's too: nothing reads them
    trainings = clean_unresumable_trainings(store)
    parts = ([f"index candidate(s) built but never promoted: {', '.join(candidates)}"] if candidates else []) + \
            ([f"partial folder(s): {', '.join(partial)}"] if partial else []) + \
            ([f"unfinished reindex embedding run(s): {', '.join(unfinished)}"] if unfinished else []) + \
            ([f"checkpoints of stopped reindex trainings no run can resume (warm-started from a model no longer "
              f"served): {', '.join(trainings)}"] if trainings else [])
    if took_over_stale:
        log.warning("the run that held the store lock died; %s",
                    f"removed what it left: {'; '.join(parts)}" if parts else "it left nothing to remove")
    elif parts:
        log.warning("removed what an earlier, interrupted run left: %s", "; ".join(parts))
    return candidates + partial + unfinished + trainings


def clean_unresumable_trainings(store: Store) -> list[str]:
    """Remove the checkpoints (``models/.runs/run-*``) of stopped reindex trainings that no run
    can resume: warm-started from a model that no longer serves (``runs.remove_unresumable_reindex_runs``).
    Nothing when what serves cannot be read."""
    from lookalike.index.manifest import read_manifest
    from lookalike.model.runs import remove_unresumable_reindex_runs

    try:
        current = store.current_index_or_none()
        served_model = read_manifest(store.index_dir(current)).get("model_version") if current else None
    except Exception:  # a garbled CURRENT or manifest: the run fails on it, with its reason
        return []
    if not isinstance(served_model, str):
        return []
    return [str(run) for run in remove_unresumable_reindex_runs(store.models_dir / ".runs", served_model)]


def clean_partial_indexes(store: Store, *, quiet: bool = False) -> list[str]:
    """Remove the ``indexes/.tmp-*`` folders that killed runs left, never one still being
    written: its writer holds the OS lock of ``.tmp-<version>.lock`` from before the folder
    exists until it is renamed or removed (``index.manifest.publish_atomically``), so a folder
    whose lock this process can take has no live writer. Safe without the store lock, so
    ``embed --no-publish`` (which does not take it) cleans up too. Logs what it removed unless
    ``quiet`` (the caller does)."""
    if not store.indexes_dir.is_dir():
        return []
    folders = {p.name.removesuffix(WRITER_LOCK_SUFFIX) for p in store.indexes_dir.iterdir()
               if p.name.startswith(".tmp-")}
    removed = []
    for name in sorted(folders):
        tmp = store.indexes_dir / name
        lock = writer_lock_path(tmp)
        fd = try_lock(lock)
        if fd is None:  # a live run is writing it
            continue
        try:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(str(tmp))
        finally:
            unlock(lock, fd)  # and removes the lock file a killed writer left
    if removed and not quiet:
        log.warning("removed partial index folder(s) that killed runs left: %s", ", ".join(removed))
    return removed


def clean_partial(store: Store, *, quiet: bool = False) -> list[str]:
    """Remove temporary folders a killed run left (call only while holding the store lock):
    partial indexes no live run writes (``clean_partial_indexes``), and partial models. Logs
    the partial indexes it removed unless ``quiet``."""
    removed = clean_partial_indexes(store, quiet=quiet)
    if store.models_dir.is_dir():
        for tmp in store.models_dir.iterdir():
            if tmp.name.startswith((".tmp-", ".run-")):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(str(tmp))
    return removed + clean_unstarted_embed_runs(store)


def clean_unfinished_reindex_runs(store: Store) -> list[str]:
    """Remove embedding runs reindex started (``REINDEX_RUN_MARK``, made when the folder is
    claimed) that never wrote their summary and that no live run holds: what a reindex killed
    or stopped during its embed step leaves (up to a full copy of the corpus's embeddings; the
    embedding cache keeps what they embedded). Never a run of ``lookalike embed``."""
    return _remove_unheld_runs(store, lambda run: (run / REINDEX_RUN_MARK).is_file()
                               and not (run / "summary.json").exists())


def clean_unstarted_embed_runs(store: Store) -> list[str]:
    """Remove embedding run folders that hold nothing but what a run writes before its pipeline
    starts (its corpus listing): what a run killed early leaves (reindex's embed step names
    its run by the time, so no later run takes the folder over). Never one a live run holds
    (``filelock.try_lock_folder``)."""
    from lookalike.pipeline.run_dirs import holds_only_a_listing  # here: it imports Beam, which `serve` never needs

    return _remove_unheld_runs(store, lambda run: holds_only_a_listing(run) and any(run.iterdir()))


def _remove_unheld_runs(store: Store, is_leftover: Callable[[Path], bool]) -> list[str]:
    """Remove the embedding run folders ``is_leftover`` picks, looked at again while holding the
    folder's lock (``filelock.try_lock_folder``: never one a live run holds; a run may have
    finished since the first look). A folder this user cannot read (another user's run, mode
    700) is not ours: left alone. Returns those removed."""
    removed = []
    runs = store.embeddings_dir
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        try:
            if not run.is_dir() or run.is_symlink() or not is_leftover(run):
                continue
            fd = try_lock_folder(run)
        except OSError:
            continue
        if fd is None:  # a live run is writing it
            continue
        try:
            if is_leftover(run):
                shutil.rmtree(run, ignore_errors=True)
                if not run.exists():
                    removed.append(str(run))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
