"""Index versions of a store: list, check, promote, roll back (``lookalike versions``).

Every move of CURRENT (promotion, rollback, ``embed``, ``ItemIndex.publish``) is appended
to ``DIR/history.jsonl`` (version, time, reason) by ``Store.set_current_index``, so
``rollback`` knows which version served before the current one; rollbacks are recorded
too and pop the stack, so repeated rollbacks walk further back. Promotion always goes
through the same checks: the index loads (manifest, checksums, counts), the model the
index names exists and matches its dimension, and a smoke query of a stored item finds
that item (or a byte-identical copy of it) first. Only then is ``CURRENT`` replaced,
atomically, and ``models/LATEST`` pointed at the model of the index that serves
(``follow_served_model``), so the next ``lookalike embed`` does not bring back the model a
rollback moved away from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


from lookalike.index.manifest import IndexLoadError, read_manifest, verify_files
from lookalike.model.store import HISTORY, REINDEX_RUN_MARK, Store, StoreError, versions_in  # noqa: F401 (HISTORY: re-exported)
from lookalike.pipeline.leftovers import clean_partial_indexes

THUMBNAILS_FOLDER = "thumbnails"  # under the store root, as the embed pipeline writes them (graph.THUMBNAILS_FOLDER)
# A temporary cache file not written for this long was left by a killed run (``_remove_stale_temp_files``).
STALE_TEMP_S = 3600.0

log = logging.getLogger(__name__)


class PromotionError(RuntimeError):
    """A version failed its checks and was not promoted; CURRENT is unchanged."""


@contextmanager
def _store_lock(store: Store, locked: bool, purpose: str) -> Iterator[None]:
    """Hold the store lock (the one reindex holds) unless the caller already does
    (``locked``); LockHeldError when another run holds it."""
    if locked:
        yield
        return
    from lookalike.model.store_lock import StoreLock

    if not store.root.is_dir():
        raise StoreError(f"store {store.root} does not exist")
    with StoreLock(store.root, purpose=purpose):
        yield


def served_manifest(store: Store) -> tuple[str, dict[str, Any]] | None:
    """(CURRENT's version, its manifest), or None when nothing is served or either cannot be
    read (the commands that load the index report that, with their remedy). For hints and
    log lines that need a figure of the served version without loading it."""
    try:
        version = store.current_index_or_none() if store.root.is_dir() else None
        return (version, read_manifest(store.index_dir(version))) if version else None
    except (IndexLoadError, OSError, ValueError):
        return None


def list_versions(store: Store) -> list[dict[str, Any]]:
    """Index versions, oldest first, with their manifest figures, whether they serve and
    whether they ever served (``served``: in the history; rollback and prune consider only those).
    StoreError when the store does not exist (an empty list would read as "no versions yet")."""
    if not store.root.is_dir():
        raise StoreError(f"store {store.root} does not exist")
    current = store.current_index_or_none()
    rows = []
    if not store.indexes_dir.is_dir():
        return rows
    served = {entry["version"] for entry in store.history()}
    for path in sorted(p for p in store.indexes_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        row: dict[str, Any] = {"version": path.name, "current": path.name == current, "served": path.name in served}
        try:  # the manifest's structure and every file it lists, without reading them (no checksums)
            manifest = read_manifest(path)
            verify_files(path, manifest, verify_checksums=False)
        except (IndexLoadError, OSError, ValueError, TypeError, AttributeError) as e:
            row["error"] = str(e) if isinstance(e, IndexLoadError) else f"unreadable manifest: {e}"
            rows.append(row)
            continue
        tuned = manifest.get("tuning") if isinstance(manifest.get("tuning"), dict) else {}
        row.update({
            "model_version": manifest.get("model_version"),
            "count": manifest.get("count"),
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(manifest.get("created_unix_s", 0))),
            # measured at k=10 (a small index is tuned at a smaller k; one too small is not measured)
            "recall_at_10": tuned.get("recall") if tuned.get("k") == 10 and not tuned.get("skipped") else None,
            "recall": None if tuned.get("skipped") else tuned.get("recall"),
            "recall_k": tuned.get("k"),
            "mode": (manifest.get("build") or {}).get("mode"),
        })
        rows.append(row)
    return rows


def warn_if_current_missing(store: Store, rows: list[dict[str, Any]]) -> str | None:
    """Log one warning when CURRENT names a version that is not among ``rows`` (those of
    ``list_versions``: its folder is gone), which a listing would otherwise show as no ``*``
    and nothing said; returns that version (None when CURRENT is absent or listed; a garbled
    CURRENT was named when the rows were listed)."""
    try:
        current = store.current_index()
    except StoreError:
        return None
    if current is None or any(r["version"] == current for r in rows):
        return None
    log.warning("CURRENT names index version %s, which is not in %s: nothing can be served from it; promote a "
                "listed version with `lookalike versions promote VERSION --workdir %s`", current, store.indexes_dir,
                store.root)
    return current


def check_version(store: Store, version: str) -> dict[str, Any]:
    """Load index ``version`` and its model and run a smoke query; raise PromotionError if bad."""
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.artifact import load_encoder

    try:
        index = ItemIndex.load(store.index_dir(version))
        encoder = load_encoder(store.require_model(index.model_version))
    except (OSError, ValueError, RuntimeError, StoreError) as e:
        raise PromotionError(f"index version {version} is not servable: {e}") from e
    if encoder.embed_dim != index.embed_dim:
        raise PromotionError(f"index {version} has dim {index.embed_dim} but model {encoder.version} gives {encoder.embed_dim}")
    probe = index.items[len(index) // 2]["id"]
    found = index.search(index.embeddings[index.row_of(probe)], k=1)[0]
    if not found or not index.same_content(probe, found[0].id):  # a byte-identical copy first is right
        got = f"{found[0].id!r}, another picture," if found else "nothing"
        raise PromotionError(f"index {version} failed its smoke query: searching by the stored embedding of item "
                             f"{probe!r} found {got} instead of that item or a byte-identical copy of it")
    return {"version": version, "model_version": index.model_version, "count": len(index)}


def record_promotion(store: Store, version: str, reason: str) -> None:
    store.record_history(version, reason)


def history(store: Store) -> list[dict[str, Any]]:
    """Every recorded move of CURRENT, oldest first (truncated lines skipped with a warning)."""
    return store.history()


def missing_version(store: Store, version: str) -> str:
    """Why ``version`` cannot be promoted when it is not in ``indexes/``, with the versions
    there are (a mistyped name is then easy to see), or that there are none."""
    from lookalike.model.store import name_versions, versions_in

    there = versions_in(store.indexes_dir, "manifest.json")
    known = (name_versions("index", there) + " (`lookalike versions list` shows them all)" if there
             else f"it holds none: run `lookalike embed --workdir {store.root}` first")
    return f"no index version {version!r} in {store.indexes_dir}: {known}"


def promote(store: Store, version: str, reason: str = "manual", *, locked: bool = False) -> dict[str, Any]:
    """Check ``version`` and make it CURRENT (atomic), and its model ``models/LATEST``; raise
    PromotionError otherwise (then neither moves). Holds the store lock (LockHeldError while
    a reindex or a publishing embed runs) unless ``locked``: the caller already holds it."""
    if not store.index_dir(version).is_dir():
        raise PromotionError(missing_version(store, version))
    with _store_lock(store, locked, f"versions promote {version}"):
        clean_partial_indexes(store)
        return _promote(store, version, reason)


def _promote(store: Store, version: str, reason: str) -> dict[str, Any]:
    if not store.index_dir(version).is_dir():
        raise PromotionError(missing_version(store, version))
    checked = check_version(store, version)
    previous = store.current_index_or_none()  # a garbled CURRENT is repaired by promoting a good version
    store.set_current_index(version, reason if previous != version else f"{reason} (already current)")
    log.info("promoted index %s (%s): %s", version, f"was {previous}" if previous else "the first one served", reason)
    previous_latest = follow_served_model(store, checked["model_version"])
    return {**checked, "previous": previous, "previous_latest_model": previous_latest}


def follow_served_model(store: Store, model: str) -> str | None:
    """Point ``models/LATEST`` at ``model``, the model of the index just made CURRENT, so the
    next ``lookalike embed`` (which uses LATEST by default) embeds with the served model
    rather than one a rollback moved away from. Returns what LATEST named before (None: nothing,
    or a garbled file, which this repairs)."""
    try:
        before = store.latest_model()
    except StoreError as e:  # a garbled LATEST: replaced below
        log.warning("%s", e)
        before = None
    if before != model:
        store.set_latest_model(model)
        log.info("models/LATEST now names %s (was %s), the model of the served index: `lookalike embed` uses it "
                 "by default", model, before)
    if store.rejected_model() == model:  # served now: no longer a rejected candidate kept for inspection
        (store.models_dir / "REJECTED").unlink(missing_ok=True)
    store.clear_rolled_back_mark(model)  # served again on purpose (a promote, reindex --force)
    return before


def promotion_stack(store: Store) -> list[str]:
    """Versions in the order they were promoted, with rolled-back ones popped off."""
    stack: list[str] = []
    for entry in history(store):
        version = entry["version"]
        if entry.get("reason", "").startswith("rollback") and version in stack:
            while stack[-1] != version:  # back to the version rolled back to (the top itself, from a garbled CURRENT)
                stack.pop()
        elif entry.get("reason", "").startswith("rollback"):  # to a version whose promotion the history lost
            if stack:
                stack.pop()  # the version rolled back from
            stack.append(version)
        elif not stack or stack[-1] != version:
            stack.append(version)
    return stack


def rollback(store: Store, *, locked: bool = False) -> dict[str, Any]:
    """Promote the version that served before the current one (``models/LATEST`` follows, to
    that version's model); repeated calls walk further back. Only versions the promotion
    history shows were served are candidates (never one that was built but not promoted, e.g.
    a candidate that failed validation). Holds the store lock unless ``locked``."""
    with _store_lock(store, locked, "versions rollback"):
        clean_partial_indexes(store)
        return _rollback(store)


def last_served_present(store: Store) -> str | None:
    """The most recently promoted version (per the history, rollbacks undone) whose folder
    still loads as a version, or None."""
    available = {r["version"] for r in list_versions(store) if "error" not in r}
    return next((v for v in reversed(promotion_stack(store)) if v in available), None)


def missing_current_hint(store: Store) -> str:
    """What to do when CURRENT is missing: promote the version served last, if one is left."""
    last = last_served_present(store)
    if last is None:
        return "no version this store served is left to promote"
    return (f"{store.history_path} shows {last} was served last: serve it again with "
            f"`lookalike versions promote {last} --workdir {store.root}`")


def _rollback(store: Store) -> dict[str, Any]:
    current = store.current_index()
    if current is None:
        raise PromotionError(f"nothing to roll back: {store.root} has no CURRENT index; {missing_current_hint(store)}")
    available = {r["version"] for r in list_versions(store) if "error" not in r}
    stack = promotion_stack(store)
    if stack and stack[-1] == current:
        stack.pop()
    served_before = [v for v in stack if v != current]
    if not served_before:
        raise PromotionError(f"no earlier version to roll back to: {current} is the first version this store has "
                             f"served (per {store.history_path})")
    earlier = [v for v in served_before if v in available]
    if not earlier:
        raise PromotionError(f"no earlier version to roll back to from {current}: none of the versions served "
                             f"before it ({store.history_path}) is still in {store.indexes_dir}; promote one "
                             "explicitly with `lookalike versions promote VERSION`")
    served = served_manifest(store)
    from_model = served[1].get("model_version") if served and served[0] == current else None
    result = _promote(store, earlier[-1], reason=f"rollback from {current}")
    if from_model and from_model != result["model_version"]:
        # reindex would train (or reuse) the same model from the same inputs and promote it again
        store.mark_rolled_back_model(from_model, current)
        log.info("model %s is marked as rolled back: reindex does not promote it again without --force "
                 "(`lookalike versions promote` serves it again)", from_model)
    return result


def promoted_versions(store: Store) -> list[str]:
    """Versions that ever served (per the history) and still exist, most recently promoted first."""
    last: dict[str, int] = {}
    for i, entry in enumerate(history(store)):
        last[entry["version"]] = i
    present = {r["version"] for r in list_versions(store)}
    return sorted((v for v in last if v in present), key=lambda v: -last[v])


def prune(store: Store, keep: int, keep_models: tuple[str, ...] = (), *, locked: bool = False,
          embed_runs: bool = False, own_run: Path | None = None) -> list[str]:
    """Delete promoted index versions beyond the ``keep`` most recently promoted ones (never
    CURRENT), and models no remaining index uses that reindex trained (``Store.mark_reindex_model``:
    older rejected candidates) or that an index deleted here used; never LATEST,
    models/REJECTED (the latest rejected candidate, kept for inspection), ``keep_models``, nor
    a model trained by hand (``lookalike train``) that no deleted index used. Then the
    embedding runs reindex made beyond the ``keep`` latest, the caches of models gone and the
    cache files killed runs left half written (``_prune_embeddings``); a run of ``lookalike
    embed`` only with ``embed_runs`` (asked for by ``embed --keep`` or ``versions prune
    --embedding-runs``): then those beyond the ``keep``
    latest too (an index never needs its run: it holds its own copy of the embeddings). Then the
    thumbnails nothing left lists (``_prune_thumbnails``; ``own_run``: the caller's own embed
    run folder, which it holds locked).

    Versions that never served (not in the history) are neither counted nor deleted here:
    reindex removes its own unpromoted candidates (``clean_candidates``). Holds the store
    lock unless ``locked``."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (CURRENT is always kept), got {keep}")
    with _store_lock(store, locked, "prune"):
        return _prune(store, keep, keep_models, embed_runs, own_run)


def _prune(store: Store, keep: int, keep_models: tuple[str, ...], embed_runs: bool = False,
           own_run: Path | None = None) -> list[str]:
    current = store.current_index_or_none()
    promoted = promoted_versions(store)
    kept = set(promoted[:keep]) | {current}
    removed = [v for v in promoted if v not in kept]
    by_version = {r["version"]: r.get("model_version") for r in list_versions(store)}
    models_of_removed = {by_version.get(v) for v in removed}
    for v in removed:
        shutil.rmtree(store.index_dir(v), ignore_errors=True)
    used = {by_version[v] for v in by_version if v not in removed} | {store.latest_model(), store.rejected_model(),
                                                                       *keep_models}
    if store.models_dir.is_dir():
        for model in store.models_dir.iterdir():
            if not model.is_dir() or model.name.startswith(".") or model.name in used:
                continue
            if model.name in models_of_removed or store.is_reindex_model(model.name):  # never one trained by hand
                shutil.rmtree(model, ignore_errors=True)
                removed.append(model.name)
    removed += _prune_embeddings(store, keep, embed_runs)
    removed += _prune_thumbnails(store, own_run)
    if removed:
        log.info("pruned %s", ", ".join(removed))
    return removed


def _prune_thumbnails(store: Store, own_run: Path | None = None) -> list[str]:
    """Delete the thumbnails no index version left and no embedding run left lists (of files
    deleted or edited since, of pruned versions), except recent ones
    (``thumbnails.prune_thumbnails``); returns ``["thumbnails: N file(s)"]`` if any went. Nothing
    while an embed run other than ``own_run`` (the caller's) is running (its folder locked: an
    ``embed --no-publish`` takes no store lock and lists its thumbnails only at its end), nor
    when a version's or run's items cannot be read: their thumbnails are unknown."""
    import pyarrow.parquet as pq

    from lookalike.model.filelock import try_lock_folder
    from lookalike.pipeline.thumbnails import prune_thumbnails

    for run in sorted(store.embeddings_dir.iterdir()) if store.embeddings_dir.is_dir() else []:
        if not run.is_dir() or run.name.startswith(".") or (own_run is not None and run == Path(own_run)):
            continue
        try:
            fd = try_lock_folder(run)
        except OSError:  # not ours to open: not an embed run of this store's user
            continue
        if fd is None:
            log.info("thumbnails not pruned: embedding run %s is running", run)
            return []
        os.close(fd)

    item_files = [*store.indexes_dir.glob("[!.]*/shard-*/items.parquet"), *store.embeddings_dir.glob("[!.]*/embeddings-*.parquet")]
    referenced: set[str] = set()
    for path in item_files:
        try:
            names = pq.read_schema(path).names
            if "thumbnail" in names:
                column = pq.read_table(path, columns=["thumbnail"]).column("thumbnail").to_pylist()
                referenced.update("/".join(t.replace(os.sep, "/").rsplit("/", 2)[-2:]) for t in column if t)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            log.warning("thumbnails not pruned: the items of %s cannot be read (%s)", path, e)
            return []
    count = prune_thumbnails(store.root / THUMBNAILS_FOLDER, referenced)
    return [f"thumbnails: {count} file(s)"] if count else []


def _prune_embeddings(store: Store, keep_runs: int, embed_runs: bool = False) -> list[str]:
    """Delete the embedding runs reindex made (``Store.mark_reindex_run``) beyond the
    ``keep_runs`` latest (with ``embed_runs``, the runs of ``lookalike embed`` beyond the
    ``keep_runs`` latest of them too), and the embedding caches no run can use: of a model no
    longer in the store, or of an older image decoding (``pipeline.cache.cache_dir``). Returns
    them as ``embeddings/<run>`` and ``embeddings/cache/<name>``."""
    from lookalike.pipeline.cache import cache_dir

    def reindex_run_mtime(folder: Path) -> float | None:  # None: not a run reindex made (or not ours to read)
        try:
            return (folder / REINDEX_RUN_MARK).stat().st_mtime if folder.is_dir() else None
        except OSError:  # e.g. another user's `lookalike embed` run, mode 700
            return None

    def delete(folder: Path, name: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            log.warning("could not delete %s while pruning (permissions?): left in place", folder)
        else:
            removed.append(name)

    removed: list[str] = []
    if not store.embeddings_dir.is_dir():
        return removed
    def embed_run_mtime(folder: Path) -> float | None:  # None: not a finished run of `lookalike embed`
        try:
            return (folder / "summary.json").stat().st_mtime if folder.is_dir() and folder.name != "cache" else None
        except OSError:
            return None

    runs = [(mtime, d) for d in store.embeddings_dir.iterdir() if (mtime := reindex_run_mtime(d)) is not None]
    for _, run in sorted(runs, key=lambda run: run[0], reverse=True)[keep_runs:]:
        delete(run, f"embeddings/{run.name}")
    if embed_runs:
        marked = {d for _, d in runs}
        mine = [(mtime, d) for d in store.embeddings_dir.iterdir()
                if d not in marked and (mtime := embed_run_mtime(d)) is not None]
        for _, run in sorted(mine, key=lambda run: run[0], reverse=True)[keep_runs:]:
            delete(run, f"embeddings/{run.name}")
    caches = store.embeddings_dir / "cache"
    for cache in sorted(caches.iterdir()) if caches.is_dir() else []:
        model = cache.name.split("~")[0]
        if not cache.is_dir():
            continue
        if not (store.models_dir / model / "model.json").is_file() or cache.name != cache_dir(store.embeddings_dir, model).name:
            delete(cache, f"embeddings/cache/{cache.name}")
        elif count := _remove_stale_temp_files(cache):
            removed.append(f"embeddings/cache/{cache.name}: {count} unfinished file(s)")
    return removed


def _remove_stale_temp_files(folder: Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Delete the ``.tmp-*`` files in ``folder`` last written over ``older_than_s`` ago: what a
    run killed while it wrote a cache file leaves (``writers.write_atomically``; a live writer
    finishes a file in seconds). Returns how many went."""
    removed = 0
    now = time.time()
    for path in folder.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
    return removed


def served_unusable(store: Store, version: str | None, error: Exception) -> Exception:
    """``error`` (the served index ``version`` or its model failing to load, as a corrupt or
    deleted file does) with how to recover added: rolling back to, or promoting, a version
    that loads. ``reindex`` and ``serve`` say it alike. An IndexLoadError or StoreError keeps
    its type; others become an IndexLoadError naming theirs."""
    from lookalike.index.manifest import IndexLoadError

    others = [v for v in versions_in(store.indexes_dir, "manifest.json") if v != version]
    hint = (f"the served index {version or 'CURRENT'} cannot be loaded: run `lookalike versions rollback --workdir "
            f"{store.root}` (or `lookalike versions promote VERSION --workdir {store.root}`) to serve a working version"
            if others else
            f"the served index {version or 'CURRENT'} cannot be loaded, and the store holds no other index version: run "
            f"`lookalike embed --workdir {store.root}` (with the --corpus it was embedded from) to build a new one "
            "(when its model is what cannot be loaded, train one first with `lookalike train`)")
    if "lookalike versions rollback" in str(error):  # it says what to do already
        return error if type(error) in (IndexLoadError, StoreError) else IndexLoadError(f"{type(error).__name__}: {error}")
    if type(error) in (IndexLoadError, StoreError):
        return type(error)(f"{error}; {hint}")
    return IndexLoadError(f"{type(error).__name__}: {error}; {hint}")
