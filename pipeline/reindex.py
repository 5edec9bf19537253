"""The retrain-and-reindex cron job: only ever make things better, never break serving.

Steps (each timed, logged and written into the run report):

1. ``train``: a candidate model, warm-started from the served one, on the corpus without
   the frozen evaluation images (held out, so the gate does not reward memorisation). The
   corpus: ``corpus``, else the folder the served index was embedded from (its manifest's
   ``source``), else ``DIR/corpus`` (``reindex_inputs.resolve_corpus``).
2. ``evaluate``: candidate and current model on the frozen evaluation set
   (``DIR/eval/frozen.json``: readable images of each class, made on the first run and
   checked before training; images gone or unreadable since are left out, and a set with
   less than half left is made again): MAP@R and Recall@K. The candidate goes on only if
   it is better beyond noise (``reindex_checks.gate``): the mean over the evaluation queries
   of its AP@R minus the served model's (paired, query by query) must exceed both
   ``min_improvement`` and 2 standard errors of that mean; or with ``force``.
3. ``embed``: the Beam pipeline, incremental (the cache is per model version, so a new
   model re-embeds everything and an unchanged one embeds only new or changed media),
   with the ``metadata`` file joined onto the items (by default the one the served index
   joined, checked before training; a changed file alone is an update).
4. ``build``: a new index version, autotuned, written aside (not yet served).
5. ``validate``: ANN recall at or above target, every matched file either indexed or
   dead-lettered, encoder and index compatible, at least ``min_items_ratio`` of the served
   index's items. Same model as served: overlap@k of canary queries (``DIR/eval/canaries.json``)
   between the served and the new index at or above ``min_canary_overlap``. New model: each
   canary's own embedding finds it first (``min_canary_self``); its quality was judged in 2.
6. ``promote``: ``CURRENT`` replaced atomically (a running server hot-swaps to it), and
   ``models/LATEST`` set to its model. Only then: a rejected or failed candidate never
   becomes the model a later ``lookalike embed`` uses by default. A candidate index that
   fails 4-6 is deleted.
7. ``prune``: keep the ``keep_versions`` most recently promoted versions; delete the models
   of the versions deleted and older rejected candidates (never a model trained by hand),
   the embedding runs reindex made beyond the ``keep_versions`` latest, and the embedding
   caches of models no longer in the store.
   It runs after ``kept_current`` too.

When the candidate model is rejected in 2, or fails 3-6, steps 3-6 run again with the
served model: the corpus update is still published (outcome ``corpus_updated``, exit 4)
if it validates; an unchanged corpus keeps the current version (``kept_current``, exit 3).
A candidate that failed because the store could not be read or written (an OSError: no
permission, disk full) makes the run ``failed`` (exit 1) after that, whatever it published:
it is not the candidate's fault, and exit 3 or 4 would hide it from cron. Once the outcome
stands (``CURRENT`` moved, or was kept), what fails after it (saving a new evaluation set,
pruning, or ``models/LATEST`` after ``CURRENT`` moved) keeps that outcome and makes the exit
status 1 (``errors_after_outcome``). A model an operator rolled back from
(``Store.rolled_back_from``) is not promoted again without ``force``: the same inputs would
train or reuse the same model, and the gate would undo the rollback every night.

The store lock allows one run at a time and detects a dead run's lock; temporary folders
a killed run left are removed. A kill at any step leaves ``CURRENT`` untouched, because
nothing but step 6 writes it. Ctrl-C, and SIGTERM when the caller runs the job inside
``interrupts.sigterm_as_interrupt()`` (the CLI does), stop the step under way, release the
lock and write the report (outcome ``failed``, the signal as reason). For crash tests,
``LOOKALIKE_FAILPOINT=<step>`` makes the process SIGKILL itself as that step starts.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.model.config import TrainConfig
from lookalike.model.store import Store, StoreError
from lookalike.model.store_lock import StoreLock
from lookalike.pipeline.failpoints import failpoint
from lookalike.pipeline.interrupts import raise_if_stopped, stop_exit_status, stop_mark, stop_reason
from lookalike.pipeline.leftovers import clean_leftovers, discard_candidate, mark_candidate, unmark_candidate
from lookalike.pipeline.reindex_checks import (  # noqa: F401 (re-exported)
    GateDecision, ValidationError, choose_eval_set, evaluate_model, frozen_eval_set, gate, ids_unseen_by_served, save_eval_set,
    usable_eval_ids, validate,
)
from lookalike.pipeline.reindex_inputs import resolve_corpus, resolve_metadata, resolve_train_config, unlabelled_reason
from lookalike.pipeline.report import REPORTS_KEPT, draw_examples, prune_reports, report_folder, write_report
from lookalike.pipeline.versions import (follow_served_model, last_served_present, missing_current_hint, promote, prune,
                                         served_manifest, served_unusable)

if TYPE_CHECKING:  # the embed run's summary, imported when the run embeds
    from lookalike.pipeline.summary import EmbedSummary

log = logging.getLogger(__name__)

EXIT_PROMOTED, EXIT_FAILED, EXIT_KEPT_CURRENT, EXIT_CORPUS_UPDATED = 0, 1, 3, 4
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the store lock; nothing was done, try again later
STEPS = ("train", "evaluate", "embed", "build", "validate", "promote", "prune")


@dataclass
class ReindexConfig:
    workdir: str
    train: TrainConfig | None = None  # None: the served model's own config (else the digits preset)
    train_overrides: list[str] = field(default_factory=list)  # KEY=VALUE applied when ``train`` is None
    corpus: str | None = None  # None: the served index's corpus folder (manifest ``source``), else DIR/corpus
    min_improvement: float = 0.0  # candidate MAP@R must exceed current by more than this (and by more than noise)
    force: bool = False
    target_recall: float = 0.95
    min_canary_overlap: float = 0.2  # same model: neighbour overlap@10 of canaries, served vs new index
    min_canary_self: float = 0.9  # new model: share of canaries found first by their own embedding
    min_items_ratio: float = 0.5  # the new index must hold at least this share of the served one's items
    keep_versions: int = 5
    num_workers: int = 1
    eval_per_class: int = 30
    num_canaries: int = 20
    metadata: str | None = None  # item metadata joined by id (embed --metadata); None: the served index's file
    no_metadata: bool = False  # publish without metadata, even when the served index has some


@dataclass
class ReindexReport:
    outcome: str = "failed"  # promoted | corpus_updated | kept_current | failed
    reason: str = ""
    current_model: str | None = None
    candidate_model: str | None = None
    chosen_model: str | None = None
    previous_index: str | None = None
    new_index: str | None = None  # the index this run promoted; None when it promoted none
    # a candidate index built but not promoted (deleted, or left by a stopped run): the last one
    rejected_index: str | None = None
    candidate_error: str | None = None  # why a candidate model that passed the gate was not promoted
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    stopped_status: int | None = None  # a run stopped by a signal: the shell's status for it (130, 143)
    # What failed once the outcome stood (CURRENT moved or kept): saving the evaluation set, pruning,
    # pointing models/LATEST at the promoted model. The outcome stays; the exit status is 1.
    errors_after_outcome: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.stopped_status is not None:
            return self.stopped_status
        if self.errors_after_outcome:
            return EXIT_FAILED
        return {"promoted": EXIT_PROMOTED, "corpus_updated": EXIT_CORPUS_UPDATED,
                "kept_current": EXIT_KEPT_CURRENT}.get(self.outcome, EXIT_FAILED)


class ReindexInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM (see ``lookalike.pipeline.interrupts``): its report
    (outcome ``failed``, the reason naming the signal) is written and held in ``report``."""

    def __init__(self, report: ReindexReport):
        super().__init__(report.reason)
        self.report = report


class _Steps:
    """Times each step into the report and honours failpoints. No step starts after a stop
    signal since ``stop_mark`` (``interrupts.stop_mark``), even one whose KeyboardInterrupt was
    lost (raised in a garbage-collection callback: "Exception ignored in ...")."""

    def __init__(self, report: ReindexReport, stop_mark: int = 0):
        self.report = report
        self.stop_mark = stop_mark

    def __call__(self, name: str):
        steps = self

        class _Step:
            def __enter__(self):
                raise_if_stopped(f"before step {name}", steps.stop_mark)
                failpoint(name)
                log.info("reindex step %s ...", name)
                self.start = time.perf_counter()
                return self

            def __exit__(self, exc_type, exc, tb):
                elapsed = round(time.perf_counter() - self.start, 3)
                # str(KeyboardInterrupt()) is empty: say which signal stopped the step
                error = (None if exc is None else stop_reason() if isinstance(exc, KeyboardInterrupt)
                         else str(exc) or type(exc).__name__)
                steps.report.steps.append({"step": name, "seconds": elapsed, "ok": exc is None,
                                           **({"error": error} if exc else {})})
                outcome = ("done" if exc is None else error if isinstance(exc, KeyboardInterrupt)
                           else f"failed: {error}")
                log.info("reindex step %s %s in %.1fs", name, outcome, elapsed)

        return _Step()


def run_reindex(config: ReindexConfig) -> ReindexReport:
    """Run every step under the store lock; returns the report (also written to DIR/reports/).

    Ctrl-C (or SIGTERM inside ``interrupts.sigterm_as_interrupt()``) stops the run: the lock
    is released, the report is written with outcome ``failed`` and the signal as reason, and
    ReindexInterrupted (a KeyboardInterrupt) carries it to the caller."""
    store = Store.at(config.workdir)
    if not store.root.is_dir():
        raise StoreError(f"store {store.root} does not exist: make it with `lookalike train --workdir {store.root} --data "
                         f"FOLDER` and `lookalike embed --workdir {store.root} --corpus FOLDER` (or `lookalike demo "
                         f"--workdir {store.root} --no-serve`) first")
    if not os.access(store.root, os.W_OK):
        raise StoreError(f"store {store.root} is not writable")
    report = ReindexReport()
    started = time.time()
    mark = stop_mark()
    with StoreLock(store.root) as lock:
        try:
            # What serves, cheaply (CURRENT and its manifest), for a report of a run stopped before the first step has it
            report.previous_index, report.current_model = _served_now(store)
            clean_leftovers(store, lock.took_over_stale)  # one line says what was removed
            _run_steps(config, store, report, report_folder(store, started), mark)
        except Exception as e:  # our own StoreError says it all; another error is named by its type
            report.outcome = "failed"
            report.reason = disk_full_first(str(e) if type(e) is StoreError else f"{type(e).__name__}: {e}")
            log.error("reindex failed (CURRENT: %s): %s", store.current_index_or_none(), report.reason)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM within interrupts.sigterm_as_interrupt()
            report.outcome, report.reason, report.stopped_status = "failed", stop_reason(), stop_exit_status()
            raise ReindexInterrupted(report) from e
        finally:
            report.metrics["elapsed_s"] = round(time.time() - started, 2)
            try:
                write_report(store, report, started)
            except OSError as e:  # a full disk or read-only reports/: the outcome stands (CURRENT may have moved)
                log.warning("the report of this run could not be written to %s: %s (outcome: %s, CURRENT: %s)",
                            report_folder(store, started), e, report.outcome, store.current_index_or_none())
            try:
                old_reports = prune_reports(store)  # after every run, failed ones too: reports/ stays bounded
            except OSError as e:
                old_reports = []
                log.warning("older report folders could not be removed: %s", e)
            if old_reports:
                log.info("removed the %d oldest report folder(s) (the %d newest are kept): %s", len(old_reports),
                         REPORTS_KEPT, ", ".join(old_reports))
    return report


def _served_now(store: Store) -> tuple[str | None, str | None]:
    """(CURRENT's version, its model version) as far as they can be read without loading them."""
    served = served_manifest(store)  # logs a garbled CURRENT (the first step then fails on it)
    if served:
        return served[0], served[1].get("model_version")
    try:
        return store.current_index(), None  # a manifest that cannot be read
    except StoreError:
        return None, None


def _run_steps(config: ReindexConfig, store: Store, report: ReindexReport, report_dir: Path, mark: int = 0) -> None:
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.artifact import read_model_meta
    from lookalike.model.held_out import added_since_training, files_unseen_by
    from lookalike.model.train import train_and_evaluate

    step = _Steps(report, mark)
    report.previous_index = store.current_index()
    if report.previous_index is None and last_served_present(store) is not None:
        raise StoreError(f"{store.root / 'CURRENT'} is missing, but this store has served versions: {missing_current_hint(store)} "
                         "(reindex does not replace them with a model trained from scratch)")
    current_index, current_model_dir = None, None
    if report.previous_index:
        try:
            current_index = ItemIndex.load(store.require_current_index())
            current_model_dir = store.require_model(current_index.model_version)
            read_model_meta(current_model_dir)  # a corrupt model.json is the served version's problem too
        except Exception as e:
            raise served_unusable(store, report.previous_index, e) from e
    report.current_model = current_index.model_version if current_index else None  # known even if the corpus is not
    corpus = resolve_corpus(config, store, current_index.manifest if current_index else None, report.previous_index)
    report.metrics["corpus"] = str(corpus)
    config = replace(config, metadata=resolve_metadata(config, current_index, report.previous_index))
    # a corpus that cannot be evaluated fails before training; a new set is saved once the run succeeds
    train_config = resolve_train_config(config, current_model_dir)
    if train_config.unlabelled:
        asked = (config.train is not None or report.current_model is None
                 or any(o.partition("=")[0].strip() == "unlabelled" for o in config.train_overrides))
        raise StoreError(unlabelled_reason(store, corpus, report.current_model, asked))
    unseen_by_served = files_unseen_by(current_model_dir, corpus)
    eval_set, new_eval_set = choose_eval_set(store, corpus, config.eval_per_class, unseen=unseen_by_served)
    ids = eval_set
    with step("train"):
        # not LATEST yet: a candidate that is rejected or fails validation must not become what `embed` uses
        # without the evaluation images: the gate must measure generalisation, not memorisation
        trained = train_and_evaluate(train_config, store.root, data_dir=corpus, init_from=current_model_dir,
                                     set_latest=False, exclude=ids, reuse_identical=True, by_reindex=True)
        report.candidate_model = trained.version
        if not trained.reused:
            store.mark_reindex_model(trained.version)  # pruning may delete it once no index uses it
        report.metrics["candidate_reused"] = trained.reused  # trained from the same inputs before: not again
    with step("evaluate"):
        ids, gone = usable_eval_ids(corpus, ids)  # files that went away while training are left out of both
        if len(ids) < 2:
            raise StoreError(f"evaluation images in {corpus} went away during training: {len(gone)} unusable, "
                             f"{len(ids)} left (e.g. {next(iter(gone.items()), ('-', '-'))})")
        cur_ap = None
        if current_model_dir is not None:
            if unseen_by_served:  # and the files added since it was trained, which its record cannot list
                unseen_by_served = unseen_by_served | added_since_training(current_model_dir, corpus, ids)
            ids = _gate_ids(ids, unseen_by_served, report)
            report.metrics["current"], cur_ap = evaluate_model(current_model_dir, corpus, ids)
        cand, cand_ap = evaluate_model(trained.model_dir, corpus, ids)
        report.metrics["candidate"] = cand
        decision = gate(cand_ap, cur_ap, config.min_improvement, config.force)
        rolled_back = store.rolled_back_from(trained.version) if current_index is not None else None
        held_back = rolled_back is not None and decision.accepted and not config.force
        if held_back:  # an operator's word beats the gate
            what = rolled_back.get("error") or (f"an operator rolled back from index {rolled_back.get('index')} of "
                                                f"this model ({rolled_back.get('time')}; `lookalike versions rollback`)")
            decision = replace(decision, accepted=False, reason=(
                f"{what}: it is not promoted again without --force (would be accepted: {decision.reason})"))
        accept = decision.accepted
        report.chosen_model = trained.version if accept else report.current_model
        report.metrics["candidate_accepted"] = accept
        report.metrics["gate"] = decision.as_metrics()
        current_map = report.metrics.get("current", {}).get("map_at_r")
        log.info("candidate %s %s: %s (MAP@R %.4f vs current %s, on %d evaluation images)", trained.version,
                 "accepted" if accept else "rejected", decision.reason, cand["map_at_r"],
                 "none" if current_map is None else f"{current_map:.4f}", len(ids))
    store_error = None  # the candidate failed because the store could not be read or written
    if accept:
        try:
            _embed_build_promote(config, store, report, step, corpus, trained.version, current_index)
            report.outcome = "promoted"
            report.reason = f"new model {trained.version}"
        except Exception as e:
            if _served_anyway(store, report, trained.version, e):  # CURRENT moved: it serves
                report.outcome, report.reason = "promoted", f"new model {trained.version}"
            elif current_index is None:
                raise
            else:
                report.candidate_error = f"{type(e).__name__}: {e}"
                store_error = e if store_write_failure(e) else None
                log.warning("candidate model %s was not promoted (%s): publishing the corpus update embedded with the "
                            "served model %s instead", trained.version, report.candidate_error, report.current_model)
                report.chosen_model, report.new_index = report.current_model, None
                why = f"candidate model {trained.version} failed: {report.candidate_error}"
    else:
        verdict = "rolled back before" if held_back else "not better beyond noise"
        why = (f"candidate model {trained.version} {verdict} (MAP@R {cand['map_at_r']:.4f} vs served "
               f"{report.metrics['current']['map_at_r']:.4f}; {decision.reason})")
    if report.outcome != "promoted":
        store.set_rejected_model(trained.version)  # kept for inspection: pruning spares the latest rejected one
        try:
            updated = _embed_build_promote(config, store, report, step, corpus, report.current_model, current_index)
        except Exception as e:
            if not _served_anyway(store, report, report.current_model, e):
                raise RuntimeError(f"{why}; and the corpus update with the served model failed: "
                                   f"{type(e).__name__}: {e}") from e
            updated = True
        report.outcome = "corpus_updated" if updated else "kept_current"
        report.reason = f"{why}; " + (f"corpus update embedded with the served model {report.current_model} promoted"
                                      if updated else "the corpus is unchanged")
        if store_error is not None:  # not the candidate's fault: an operator must hear of it (exit 1, not 3 or 4)
            try:  # first free what pruning frees: a full store must not stay full night after night
                _prune(store, config, report, step, report_dir)
            except Exception as e:
                log.warning("pruning after the failed candidate failed too: %s: %s", type(e).__name__, e)
            raise StoreError(f"{report.reason}; the run fails: a store that cannot be written is no fault of the "
                             "candidate") from store_error
    # The outcome stands from here: what fails now is reported with it (exit 1), never as "nothing promoted".
    if new_eval_set:  # the run succeeded: its new evaluation set is the frozen one from now on
        try:
            save_eval_set(store, eval_set, corpus)
        except Exception as e:
            _error_after_outcome(report, "saving the new evaluation set", e)
    try:
        _prune(store, config, report, step, report_dir)  # also when CURRENT is kept: older rejected candidates go
    except Exception as e:
        _error_after_outcome(report, "pruning", e)


def disk_full_first(text: str) -> str:
    """``text`` led by "the disk is full" when it says so: libraries put it at the end of a long message."""
    return f"the disk is full (No space left on device): {text}" if "No space left on device" in text else text


def _error_after_outcome(report: ReindexReport, what: str, error: Exception) -> None:
    text = disk_full_first(f"{what} failed: {type(error).__name__}: {error}")
    report.errors_after_outcome.append(text)
    log.error("reindex %s (CURRENT: %s), but then %s", report.outcome, report.new_index or report.previous_index, text)


def _served_anyway(store: Store, report: ReindexReport, model: str | None, error: Exception) -> bool:
    """Whether the index this run built serves although promoting it raised ``error``: CURRENT
    moved, then pointing ``models/LATEST`` at its model failed (a full disk). The run then has
    that outcome; LATEST is tried once more, and the error is reported after the outcome."""
    if report.new_index is None or store.current_index_or_none() != report.new_index:
        return False
    try:
        if model:
            follow_served_model(store, model)
        retried = "; models/LATEST was set on a second try"
    except Exception as again:
        retried = f"; models/LATEST was not updated either ({type(again).__name__}: {again})"
    _error_after_outcome(report, f"promoting {report.new_index} (CURRENT moved to it)", error)
    report.errors_after_outcome[-1] += retried
    return True


def _prune(store: Store, config: ReindexConfig, report: ReindexReport, step: "_Steps", report_dir: Path) -> None:
    """The prune step, after the report's example queries are drawn: with ``--keep 1`` it
    deletes the version served before, which they show."""
    draw_examples(store, report, report_dir)
    with step("prune"):
        report.metrics["pruned"] = prune(store, config.keep_versions, locked=True)


def _gate_ids(ids: list[str], unseen_by_served: set[str], report: ReindexReport) -> list[str]:
    """The evaluation ids both models are compared on: those the served model never trained on
    when enough are (``ids_unseen_by_served``), else all of them, with a warning when some are
    its training images (a model trained by ``lookalike train`` on most of the corpus)."""
    unseen = ids_unseen_by_served(ids, unseen_by_served)
    seen = len(ids) - len(unseen) if unseen is not None else len([i for i in ids if i not in unseen_by_served])
    if unseen is not None:
        log.info("the gate compares the models on the %d evaluation images the served model never trained on "
                 "(%d of the %d are its training images, which it would remember)", len(unseen), seen, len(ids))
        report.metrics["eval_images_left_out_as_served_training"] = seen
        return unseen
    if unseen_by_served and seen:
        log.warning("%d of the %d evaluation images are the served model's training images and too few others "
                    "are left to compare on: the gate favours the served model, which remembers them, until a "
                    "model this job trained is served", seen, len(ids))
    return ids


# errno values that mean the store itself failed: full, over quota, not permitted, read-only, I/O.
STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO})
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]")


def store_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is the environment failing rather than the candidate: an OSError (or
    one in its chain of causes), or an error whose text carries a store errno (``[Errno 28]``):
    Beam's runner re-raises a worker's OSError as a RuntimeError holding only its text."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return any(int(number) in STORE_ERRNOS for number in _ERRNO_IN_TEXT.findall(str(error)))


def _embed_build_promote(config: ReindexConfig, store: Store, report: ReindexReport, step: _Steps, corpus: Path,
                         model: str, current_index) -> bool:
    """Embed the corpus with ``model`` (incremental), build a candidate index, validate and
    promote it; False (nothing built) when ``model`` is the served one and the corpus is
    unchanged. A candidate that fails is removed, and the error raised."""
    from lookalike.index.builder import IndexOptions, build_and_publish
    from lookalike.index.manifest import corpus_source, new_index_version
    from lookalike.pipeline.embed import EmbedConfig, read_embeddings, run_embed

    with step("embed"):
        gc.collect()  # training's and evaluation's garbage, before run_embed freezes what is alive (model.memory)
        summary = run_embed(EmbedConfig(workdir=str(store.root), corpus=str(corpus), model_version=model,
                                        incremental=True, publish=False, num_workers=config.num_workers,
                                        metadata=config.metadata, reindex_run=True))
        store.mark_reindex_run(summary.run)  # again, now finished: pruning keeps the latest runs reindex made
        report.metrics["embed"] = embed_metrics(summary)
        embeddings, items = read_embeddings(Path(summary.run_dir))
    new_items = set(zip(items.column("id").to_pylist(), items.column("content_hash").to_pylist()))
    if current_index is not None:  # items of the served index no longer in the corpus
        report.metrics["embed"]["removed"] = len(set(current_index.items.ids()) - {i for i, _ in new_items})
    metadata = {k: v for k, v in summary.metadata.items() if k != "unmatched_ids"} if summary.metadata else None
    if current_index is not None and model == current_index.model_version \
            and (current_index.manifest.get("metadata") or {}).get("sha256") == (metadata or {}).get("sha256") \
            and new_items == {(i["id"], i.get("content_hash")) for i in current_index.items}:
        return False  # same model, items and metadata file: nothing to publish
    candidate = new_index_version()
    try:
        with step("build"):
            mark_candidate(store, candidate)  # a kill from here to promotion leaves it for the next run to remove
            options = IndexOptions(target_recall=config.target_recall)
            report.new_index = build_and_publish(store, embeddings, items, model_version=model, options=options,
                                                 make_current=False, version=candidate, metadata=metadata,
                                                 source=corpus_source(str(corpus), store.root))
        with step("validate"):
            validate(store, report, summary, current_index, config, model_changed=model != report.current_model)
        with step("promote"):
            promote(store, report.new_index, reason=f"reindex: model {model}", locked=True)
    except BaseException as e:
        if isinstance(e, Exception):  # stopped by a signal, the candidate stays marked: the next run removes it
            discard_candidate(store, candidate)  # a failed candidate never serves and never counts as kept
        if report.new_index == candidate and store.current_index_or_none() != candidate:
            report.new_index, report.rejected_index = None, candidate  # new_index names only a served version
        raise
    unmark_candidate(store, candidate)  # promote pointed models/LATEST at its model: the one `embed` uses next
    return True


def embed_metrics(summary: EmbedSummary) -> dict[str, Any]:
    """The report's ``metrics["embed"]``: the embed run's counts (files listed, read, embedded,
    reused unchanged, failed) and, when files failed, the dead-letter files naming them and the
    first of their lines (uri, stage, reason), which the report keeps once the run is pruned."""
    from lookalike.pipeline.summary import run_files

    keys = ("run", "run_dir", "files_matched", "files_read", "items", "embedded", "unchanged", "failed")
    metrics: dict[str, Any] = {k: getattr(summary, k) for k in keys}
    if summary.failed:
        metrics["dead_letters"] = run_files(summary.run_dir, "dead_letter-*.jsonl")
        metrics["dead_letter_examples"] = list(summary.dead_letter_examples)
    return metrics


def report_dict(report: ReindexReport) -> dict[str, Any]:
    return {**asdict(report), "exit_code": report.exit_code}
