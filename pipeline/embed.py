"""The ``embed`` job: corpus -> embeddings (Parquet) -> ScaNN index, as a Beam pipeline.

``run_embed`` lists the corpus, plans what an ``--incremental`` run can reuse, runs the Beam
graph (``lookalike.pipeline.graph``, where the stages are drawn), then builds and publishes
the index atomically as the store's CURRENT version and writes a run summary (counts,
elapsed, items per second, the ``--metadata`` file and its sha256) beside the embeddings.
A ``--metadata`` file is checked before anything is written and joined onto every shard
(``lookalike.pipeline.metadata``). A corpus where nothing could be embedded
fails with a clear message and publishes nothing; an ``--incremental`` run on a corpus where
nothing changed does not start Beam at all (``lookalike.pipeline.reuse``), and one whose
pipeline embedded nothing new (a TFDS data set, a list file: sources not planned before
Beam) keeps CURRENT when it already holds the same items.

A run that publishes holds the store lock (``DIR/.reindex.lock``, ``lookalike.model.store_lock``)
from its first check to its end, as ``reindex`` and ``versions promote|rollback`` do, so it
never moves CURRENT under them: when another run holds the lock it fails before any work
(LockHeldError; the CLI exits 75). ``publish=False`` takes no lock: that is how ``reindex``
embeds while it holds the lock itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import apache_beam as beam
import pyarrow as pa

from lookalike.model.artifact import read_model_meta
from lookalike.model.memory import keep_freed_memory, long_lived_objects_frozen
from lookalike.model.progress import format_seconds
from lookalike.model.store import Store, StoreError, check_version_name
from lookalike.pipeline.cache import load_cache_table
from lookalike.pipeline.embed_inputs import embed_source, resolve_corpus, source_name, validate_embed_config
from lookalike.pipeline.failpoints import failpoint
from lookalike.pipeline.graph import (LISTING_IN_GRAPH_MAX, LOCAL_RUNNER, THUMBNAILS_FOLDER, EmbedConfig, EmbedRun,
                                      build_pipeline, local_runner, pipeline_options)
from lookalike.pipeline.index_shards import build_index_shard, collect_shard_entries
from lookalike.pipeline.inference import discard_preloaded, preload_encoder
from lookalike.pipeline.interrupts import raise_if_stopped, stop_mark
from lookalike.pipeline.items import split_by_shard
from lookalike.model.store_lock import StoreLock
from lookalike.pipeline.listing import write_listing, write_unchanged
from lookalike.pipeline.metadata import prepare_metadata, report_unmatched, with_metadata
from lookalike.pipeline.reuse import current_index_if_same, list_files, plan_reuse, reused_items, store_inside_corpus
from lookalike.pipeline.sources import corpus_pattern, corpus_root, literal_folder, read_list_file, utf8_name
from lookalike.pipeline.summary import (EmbedError, EmbedSummary, counter_values, read_dead_letters, read_embeddings, read_items,
                                        summarize)
from lookalike.pipeline.tfds_source import TfdsSpec, example_ranges
from lookalike.pipeline.thumbnails import sources_missing_thumbnails, stale_linked_thumbnails, thumbnail_paths
from lookalike.pipeline.leftovers import clean_leftovers, clean_partial_indexes
from lookalike.pipeline.run_dirs import (LISTING_FILE_NAME, RESERVED_RUN_NAMES, UNCHANGED_FILE_NAME, claim_run_dir,
                                         holds_only_a_listing, remove_if_unused, report_misnamed, report_unlisted)
from lookalike.pipeline.versions import follow_served_model, prune, served_manifest
from lookalike.pipeline.writers import write_items_shard, write_jsonl

log = logging.getLogger(__name__)

__all__ = ["EmbedConfig", "EmbedError", "EmbedSummary", "pipeline_options", "read_dead_letters", "read_embeddings",
           "run_embed"]


class _KeepCurrent(Exception):
    """Raised inside ``publish_atomically`` to drop the index just built: CURRENT already holds these items."""

    def __init__(self, version: str):
        super().__init__(version)
        self.version = version


def write_reused(run: EmbedRun, items: pa.Table, index_dir: str | None) -> dict[str, int]:
    """Nothing changed: write the reused items as the run's shards (and index shards) without
    Beam; returns the counts the pipeline would have reported."""
    for shard, table in split_by_shard(items, run.num_shards):
        table = with_metadata([table], run.schema, run.metadata)
        write_items_shard(f"{run.run_dir}/embeddings", shard, run.num_shards, table)
        if index_dir is not None:
            build_index_shard(index_dir, run.index_params(len(items), warn=False), shard, table)
    log.info("no new or changed file among the %d listed: %d cached item(s) reused without running the pipeline",
             len(run.plan.unchanged), len(items))
    return {"files_read": 0, "files_unchanged": len(run.plan.unchanged)}


def _execute(run: EmbedRun, started: float, index_dir: str | None,
             reused: pa.Table | None) -> EmbedSummary:
    """Run the pipeline (or only write ``reused``) and summarise; EmbedError (summary
    written) if nothing was embedded."""
    config = run.config
    if reused is not None:
        counted = write_reused(run, reused, index_dir)
    else:
        if run.reads_listing:
            todo = run.plan.changed if run.plan is not None else run.listing
            run.listing_file = str(run.run_dir / LISTING_FILE_NAME)
            run.chunks = write_listing(run.listing_file, todo)
            if run.plan is not None and run.plan.unchanged:
                run.unchanged_file = str(run.run_dir / UNCHANGED_FILE_NAME)
                write_unchanged(run.unchanged_file, run.plan.unchanged)
        p = beam.Pipeline(runner=local_runner(config), options=pipeline_options(config))
        result = None
        try:
            build_pipeline(p, run, index_dir)
            result = p.run()
            result.wait_until_finish()
        finally:
            shutil.rmtree(p.local_tempdir, ignore_errors=True)  # Beam's own (empty) temp folder, also on failure
            client = getattr(result, "client", None)  # the Dask runner leaves its client open
            if client is not None:
                client.close()
            for pre_run_file in (run.listing_file, run.unchanged_file):
                if pre_run_file is not None:
                    Path(pre_run_file).unlink(missing_ok=True)
        raise_if_stopped("after the pipeline", run.stop_mark)  # a stop whose exception Beam or a gc callback swallowed
        counted = counter_values(result)
        failed_files = (counted or {}).get("files_failed", 0)
        # The workers logged their shares: the whole, once; or one process's embed progress ended
        # short of its total by the files that failed before they reached the encoder.
        if run.files_to_read and (not run.progress_total or failed_files):
            workers = ("one process" if run.progress_total else f"{config.num_workers} worker processes"
                       if config.runner == LOCAL_RUNNER else "the workers")
            counts = (f" ({counted.get('items_decoded', 0)} item(s) in {counted.get('batches', 0)} batch(es), "
                      f"{failed_files} file(s) failed{', not embedded' if failed_files else ''})") if counted else ""  # Dask reports no metrics
            log.info("read and embed: all %d file(s) done by %s in %s%s", run.files_to_read, workers,
                     format_seconds(time.perf_counter() - started), counts)
        if counted and run.plan is not None and run.reads_listing:  # files the plan kept out of the pipeline
            counted["files_unchanged"] = counted.get("files_unchanged", 0) + len(run.plan.unchanged)
    summary = summarize(run.run_dir.name, run.run_dir, run.meta["version"], run.total + run.misnamed_left_out,
                        config.runner, counted, time.perf_counter() - started,
                        files_read=run.total if config.tfds else None,  # TFDS: every selected example is read
                        unlisted_folders=run.unlisted_folders)
    if run.metadata is not None and summary.items:
        unmatched = report_unmatched(run.metadata, read_items(run.run_dir, ("id", "group")))
        summary.metadata = {**run.metadata.record(), "unmatched_ids": unmatched}
    if summary.items == 0:
        (run.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        if run.total == 0:
            unlisted = (f" ({summary.failed} folder(s) or file name(s) could not be used: see "
                        f"{run.run_dir}/dead_letter-*.jsonl)" if summary.failed else "")
            raise EmbedError(f"nothing embedded: no files found in {source_name(run)}{unlisted}; no index published")
        raise EmbedError(
            f"nothing embedded from {source_name(run)}: {run.total} file(s) found, {summary.failed} rejected "
            f"(see {run.run_dir}/dead_letter-*.jsonl); no index published"
        )
    return summary


def warn_if_metadata_dropped(store: Store) -> None:
    """Warn that a run without ``--metadata`` publishes an index without the served one's metadata."""
    current, manifest = served_manifest(store) or (None, {})  # a damaged served index: its own commands report it
    served = (manifest.get("metadata") or {}).get("path")
    if served:
        log.warning("the served index %s joins item metadata from %s; this run joins none, so the index it publishes "
                    "has no metadata to filter on (pass --metadata %s to keep it)", current, served, served)


@contextmanager
def publish_lock(store: Store, publish: bool) -> Iterator[None]:
    """Hold the store lock for a run that publishes (``publish``), so it cannot move CURRENT
    under a reindex or ``versions promote|rollback``, nor they under it; LockHeldError at once
    when another run holds it. Taking over a dead run's lock removes what that run left
    (``leftovers.clean_leftovers``). A run that does not publish takes no lock."""
    if not publish:
        yield
        return
    if not store.root.is_dir():
        raise StoreError(f"store {store.root} does not exist: run `lookalike train --workdir {store.root} --data FOLDER` "
                         "(or `lookalike demo`) first")
    with StoreLock(store.root, purpose="embed") as lock:
        clean_leftovers(store, lock.took_over_stale)
        yield


def run_embed(config: EmbedConfig) -> EmbedSummary:
    """Run the pipeline, build and publish the index; raise EmbedError if nothing was embedded.
    A run that publishes holds the store lock throughout (``publish_lock``): LockHeldError,
    before any work, while another run holds it."""
    started = time.perf_counter()
    mark = stop_mark()
    validate_embed_config(config)
    keep_freed_memory()
    store = Store.at(config.workdir)
    with publish_lock(store, config.publish), long_lived_objects_frozen():
        return _run_embed(config, store, started, mark)


def _run_embed(config: EmbedConfig, store: Store, started: float, mark: int = 0) -> EmbedSummary:
    model_dir = store.require_model(config.model_version)
    meta = read_model_meta(model_dir)
    config, corpus = resolve_corpus(config, store)
    metadata = prepare_metadata(config.metadata) if config.metadata else None  # checked before anything is written
    if metadata is None and config.publish:
        warn_if_metadata_dropped(store)
    pattern, root = corpus_pattern(corpus), corpus_root(corpus)
    if config.run_name is not None and config.run_name in RESERVED_RUN_NAMES:
        raise ValueError(f"invalid run name {config.run_name!r}: embeddings/{config.run_name} is the store's embedding "
                         "cache; choose another --run-name")
    run_name = check_version_name(config.run_name if config.run_name is not None
                                  else time.strftime("e-%Y%m%dT%H%M%S", time.gmtime()), "run name")
    run_dir = store.embedding_run_dir(run_name)
    for n in range(2, 100):  # a default name already taken (a run killed within the same second): number it
        if config.run_name or not run_dir.exists():
            break
        run_dir = store.embedding_run_dir(f"{run_name}-{n}")
    run_name = run_dir.name
    if run_dir.exists() and not holds_only_a_listing(run_dir):
        raise EmbedError(f"embedding run {run_dir} already exists; choose another --run-name")
    # The source is checked before the run folder exists: a missing data set or split is an error, not a folder.
    tfds_ranges = example_ranges(TfdsSpec.parse(config.tfds, config.tfds_data_dir)) if config.tfds else None
    clean_partial_indexes(store)  # never one a running embed is writing
    held = claim_run_dir(run_dir)
    if config.reindex_run:
        store.mark_reindex_run(run_name)
    run = EmbedRun(config, store, meta, str(model_dir), pattern, root, run_dir, total=0, tfds_ranges=tfds_ranges,
                   metadata=metadata, stop_mark=mark)
    try:
        return _list_and_run(run, started)
    except BaseException:
        remove_if_unused(run_dir)
        raise
    finally:
        os.close(held)
        discard_preloaded()


def _redo_missing_thumbnails(run: EmbedRun, cache_table: pa.Table) -> None:
    """Cached sources whose thumbnails are gone (``thumbnails/`` deleted or moved) are read,
    decoded and embedded again, with a warning, instead of reused: their items would have no
    picture. Every cached source is checked (a file read again, touched or copied, finds its
    bytes in the cache by hash too); a plan's unchanged files among them move to its changed.
    A thumbnail that is a hard link to a file edited in place since shows the new picture
    under the old bytes' address (``stale_linked_thumbnails``): it is removed first, so copies
    of the old bytes get theirs made again."""
    thumbnails = str(run.store.root / THUMBNAILS_FOLDER)
    stale = stale_linked_thumbnails(run.plan.changed, thumbnails) if run.plan is not None and run.plan.changed else []
    for path in stale:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if stale:
        log.info("%d thumbnail(s) were hard links to files edited in place since: removed, made again for copies of "
                 "the files' old bytes", len(stale))
    missing = sources_missing_thumbnails(cache_table.column("source_hash").to_pylist(),
                                         cache_table.column("content_hash").to_pylist(),
                                         thumbnails)
    if not missing:
        return
    run.redo_sources = frozenset(missing)
    if run.plan is not None:
        redo = {uri for uri, h in run.plan.unchanged if h in missing}
        run.plan.unchanged = [(uri, h) for uri, h in run.plan.unchanged if h not in missing]
        changed = redo | {m.path for m in run.plan.changed}
        run.plan.changed = [m for m in run.listing if m.path in changed]  # in the listing's order
    unlinked = {"/".join(Path(path).parts[-2:]) for path in stale}
    lost = missing - {h for h, c in zip(cache_table.column("source_hash").to_pylist(),
                                        thumbnail_paths("", cache_table.column("content_hash").to_pylist())) if c in unlinked}
    if lost:  # not only those just removed
        log.warning("%d cached source(s) have no thumbnail under %s (deleted or moved?): those in this corpus are "
                    "decoded and embedded again, not reused", len(lost), thumbnails)


def _list_and_run(run: EmbedRun, started: float) -> EmbedSummary:
    """List the corpus, plan reuse, run the pipeline and write the summary. On the in-process
    runner the encoder loads and compiles meanwhile (``inference.preload_encoder``): from the
    start, or for ``--incremental`` once the plan shows files to embed (a rerun with nothing
    new never pays for it)."""
    config, meta, pattern, run_dir = run.config, run.meta, run.pattern, run.run_dir
    in_process = config.runner == LOCAL_RUNNER and config.num_workers <= 1
    if in_process and not config.incremental:
        preload_encoder(run.model_dir, config.max_batch_size)
    if config.tfds:
        run.total = sum(stop - start for _, start, stop in run.tfds_ranges or [])
    elif config.list_file:
        run.total = len(read_list_file(config.list_file))
    else:
        unlisted: list[OSError] = []  # folders below the corpus that could not be listed (permissions)
        run.leave_out = store_inside_corpus(pattern, run.store.root)
        left_out: list[str] = []  # what a glob matched in the store
        run.listing = list_files(pattern, unlisted.append, run.store.root, left_out)
        if run.leave_out and (literal_folder(pattern) is not None or left_out):  # a glob that cannot match it: no news
            log.warning("the store %s lies inside the corpus %s: its files (thumbnails, caches, models) are left out",
                        run.store.root, source_name(run))
        misnamed = [m for m in run.listing if not utf8_name(m.path)]
        run.listing = [m for m in run.listing if utf8_name(m.path)] if misnamed else run.listing  # the listing (Arrow) holds UTF-8
        if unlisted:
            report_unlisted(unlisted, run_dir)
            run.unlisted_folders = len(unlisted)
        if config.incremental:  # the cache is read once here: little besides it when nothing changed
            cache_table = load_cache_table(run.cache, int(meta["embed_dim"]))
            run.plan = plan_reuse(run.listing, run.cache, cache_table.column("source_hash"), config.sampling)
            _redo_missing_thumbnails(run, cache_table)
        run.reads_listing = len(run.plan.changed if run.plan is not None else run.listing) <= LISTING_IN_GRAPH_MAX
        if run.reads_listing:  # else the pipeline matches the corpus again and read_one reports these itself
            if misnamed:
                report_misnamed([m.path for m in misnamed], run_dir)
                run.misnamed_left_out = len(misnamed)
            if run.plan is not None and run.plan.dead:  # not media, or bytes that failed before: reported again, not read
                write_jsonl(run_dir / "dead_letter-unread.jsonl", run.plan.dead)
        run.total = len(run.listing) + (len(misnamed) - run.misnamed_left_out)
    if config.incremental and run.plan is None and os.path.isdir(run.cache):  # a TFDS data set or a list file
        _redo_missing_thumbnails(run, load_cache_table(run.cache, int(meta["embed_dim"])))
    if in_process and config.incremental and (run.plan is None or run.plan.changed):
        preload_encoder(run.model_dir, config.max_batch_size)
    log.info("embedding %d file(s) from %s with model %s on %s%s", run.total, source_name(run), meta["version"], config.runner,
             f" ({len(run.plan.unchanged)} not read: same path, size, mtime and inode as cached; {len(run.plan.dead)} known to fail)"
             if run.plan else "")
    reused = None
    if run.plan is not None and run.plan.unchanged and not run.plan.changed:
        reused = reused_items(cache_table, run.plan.unchanged, **run.expand)
    if config.publish and run.total > 0:
        summary = _publish(run, started, reused)
    else:
        summary = _execute(run, started, None, reused)
    try:
        _finish(run, summary)
    except BaseException as e:  # Ctrl-C or SIGTERM after publishing: the CLI says what is CURRENT, not "nothing published"
        if config.publish and summary.index_version:
            e.published_index_version = summary.index_version  # type: ignore[attr-defined]
        raise
    return summary


def _finish(run: EmbedRun, summary: EmbedSummary) -> None:
    """After the run (and its publishing): models/LATEST pointed at the served index's model, the
    summary written and logged, older versions pruned (``keep_versions``)."""
    config = run.config
    if config.publish and summary.index_version:  # published, or kept as CURRENT: the next embed
        try:  # without --model keeps its model, as after promote and rollback
            follow_served_model(run.store, run.meta["version"])
        except OSError as e:
            log.warning("index %s is published, but models/LATEST could not be pointed at its model %s: %s",
                        summary.index_version, run.meta["version"], e)
    (run.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    log.info(
        "%d item(s): %d embedded, reused from %d file(s) whose bytes were embedded before, %d duplicate file(s); "
        "%d failed; "
        "%.1fs (%s items/s); index %s",
        summary.items, summary.embedded, summary.unchanged, summary.duplicate_files, summary.failed,
        summary.elapsed_s, f"{summary.items_per_s:.0f}" if summary.items_per_s >= 10 else f"{summary.items_per_s:.1f}",
        summary.index_version or "not built (--no-publish)",
    )
    if config.keep_versions is not None and config.publish and summary.index_version:  # under this run's store lock
        failpoint("embed_prune")
        try:
            prune(run.store, config.keep_versions, locked=True, embed_runs=True, own_run=run.run_dir)
        except Exception as e:  # noqa: BLE001 - published already: the run succeeded, the next one prunes again
            log.warning("index %s is published, but pruning older versions failed: %s: %s", summary.index_version,
                        type(e).__name__, e)


def _publish(run: EmbedRun, started: float, reused: pa.Table | None) -> EmbedSummary:
    """Embed and publish a new index as CURRENT, or keep CURRENT when ``reused`` (nothing
    changed) is exactly what it already holds."""
    from lookalike.index.builder import assemble_index
    from lookalike.index.manifest import publish_atomically

    metadata_sha256 = run.metadata.sha256 if run.metadata is not None else None
    previous = served_manifest(run.store)
    if reused is not None:
        built = sum(1 for _ in split_by_shard(reused.select(["id"]), run.num_shards))
        params = run.index_params(len(reused), warn=False)
        current = current_index_if_same(run.store, run.meta["version"], {**params, "num_shards": built}, reused,
                                        metadata_sha256)
        if current is not None:
            summary = _execute(run, started, None, reused)
            summary.index_version = current
            log.info("the corpus is unchanged and index %s already holds these items: it stays CURRENT", current)
            return summary
    done: list[EmbedSummary] = []

    def write(tmp: Path) -> None:  # the index is built into tmp shard by shard, then assembled
        tmp.mkdir(parents=True)
        done.append(_execute(run, started, str(tmp), reused))
        shards = collect_shard_entries(tmp)
        count = sum(s["count"] for s in shards)
        options = replace(run.config.index, num_shards=max(1, min(run.num_shards, count)))
        built = {**run.index_params(count), "num_shards": len(shards)}
        if reused is None and run.config.incremental and done[0].embedded == 0:
            # Nothing new embedded (a source the plan could not settle before the pipeline, such
            # as a TFDS data set, every item taken from the cache): CURRENT stays if it holds these items.
            items = read_items(run.run_dir, ("id", "uri", "content_hash"))
            current = current_index_if_same(run.store, run.meta["version"], built, items, metadata_sha256)
            if current is not None:
                raise _KeepCurrent(current)
        assemble_index(tmp, shards, model_version=run.meta["version"], params=built, options=options,
                       metadata=done[0].metadata if run.metadata is not None else None,  # with unmatched_ids
                       source=embed_source(run.config, run.pattern, run.store.root))

    def write_unless_stopped(tmp: Path) -> None:
        write(tmp)
        raise_if_stopped("before publishing", run.stop_mark)  # never publish after a stop signal, even a swallowed one

    try:
        index_version = publish_atomically(run.store, write_unless_stopped, make_current=True, reason=f"embed run {run.run_dir.name}",
                                           store_locked=True)  # held by this run since its start
    except _KeepCurrent as keep:  # publish_atomically removed the index built meanwhile
        summary = done[0]
        summary.index_version = keep.version
        log.info("nothing new was embedded and index %s already holds these items: it stays CURRENT", keep.version)
        return summary
    summary = done[0]
    summary.index_version = index_version
    _log_change_of_items(previous, summary.items)
    _log_change_of_model(previous, index_version, run.meta["version"])
    return summary


def _log_change_of_model(previous: tuple[str, dict] | None, index_version: str, model: str) -> None:
    """A warning when the published index serves another model than the one it replaced: query
    vectors clients made with the old model are refused (409) from now on."""
    before = previous[1].get("model_version") if previous is not None else None
    if before is not None and before != model:
        log.warning("index %s serves model %s instead of %s (index %s): vectors made with %s are now refused (409); "
                    "`lookalike versions rollback` serves the previous index again", index_version, model, before,
                    previous[0], before)


def _log_change_of_items(previous: tuple[str, dict] | None, items: int) -> None:
    """One line saying how the published index differs in size from the one it replaced
    (``previous``: its version and manifest; files deleted from the corpus show here: the
    embed counts only say what was read)."""
    count = previous[1].get("count") if previous is not None else None
    if isinstance(count, int) and count != items:
        change = items - count
        log.info("the new index holds %d item(s), %d %s than index %s before it%s", items, abs(change),
                 "more" if change > 0 else "fewer", previous[0], "" if change > 0 else " (files removed from the corpus or failing now, or videos sampled into fewer frames)")
