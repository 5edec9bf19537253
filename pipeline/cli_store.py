"""The store-management commands of ``lookalike``: ``reindex`` (the cron job) and
``versions`` (list, promote, rollback), with their exit codes and JSON output."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING

from lookalike.pipeline.cli_options import (POSITIVE, _add_train_config, _add_workdir, _float_in, _print_json, _train_config,
                                            add_metadata_option)

if TYPE_CHECKING:
    from lookalike.pipeline.reindex import ReindexReport

log = logging.getLogger("lookalike")

# the README's crontab line too (tests/test_cli.py checks they agree)
CRONTAB_EXAMPLE = ("0 3 * * * nice -n 10 /srv/lookalike/.venv/bin/lookalike reindex --workdir /srv/lookalike/store "
                   ">> /srv/lookalike/reindex.log 2>&1")

REPORT_KEYS = ("outcome", "reason", "exit_code", "previous_index", "new_index", "rejected_index", "current_model",
               "candidate_model", "chosen_model", "candidate_error", "errors_after_outcome")


def _outcome_line(data: dict) -> dict:
    """The JSON line a reindex ends with: ``REPORT_KEYS`` (null where unknown) and the UTC time
    it ended (``finished_utc``), so a cron log appended night after night dates every night,
    a failure before any log line included."""
    return {**{key: data.get(key) for key in REPORT_KEYS},
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def served_fields(workdir: str) -> dict[str, str]:
    """``previous_index`` and ``current_model`` of a store a reindex stopped at before any step
    (locked, not writable): what CURRENT serves, read without the lock; whatever cannot be
    read (no store, a garbled CURRENT or manifest) is left out, so it stays null."""
    from lookalike.index.manifest import read_manifest
    from lookalike.model.store import Store

    fields: dict[str, str] = {}
    try:
        store = Store.at(workdir)
        version = store.current_index()
        if version is not None:
            fields["previous_index"] = version
            fields["current_model"] = read_manifest(store.index_dir(version))["model_version"]
    except Exception as e:  # noqa: BLE001 - best effort, for the outcome line only
        log.debug("served version of %s not read: %s", workdir, e)
    return fields


def cmd_reindex(args: argparse.Namespace) -> int:
    from lookalike.pipeline.interrupts import sigterm_as_interrupt, stop_exit_status, stop_reason, terminated
    from lookalike.model.store import StoreError
    from lookalike.model.store_lock import LockHeldError
    from lookalike.pipeline.reindex import EXIT_LOCKED, ReindexConfig, ReindexInterrupted, report_dict, run_reindex

    config = ReindexConfig(
        workdir=args.workdir, train=_train_config(args) if args.config else None, train_overrides=args.overrides,
        corpus=args.corpus, min_improvement=args.min_improvement,
        force=args.force, target_recall=args.target_recall, min_canary_overlap=args.min_canary_overlap,
        min_canary_self=args.min_canary_self, min_items_ratio=args.min_items_ratio,
        keep_versions=args.keep, num_workers=args.num_workers, metadata=args.metadata,
        no_metadata=args.no_metadata,
    )
    try:
        with sigterm_as_interrupt():  # kill, systemd stop, a timeout: stop as for Ctrl-C, with a report
            report = run_reindex(config)
    except LockHeldError as e:  # not a failure of this run: another one is at work
        log.warning("reindex skipped: %s", e)
        locked = {"outcome": "locked", "reason": str(e), "exit_code": EXIT_LOCKED, **served_fields(args.workdir)}
        _print_json(_outcome_line(locked), one_line=True)
        return EXIT_LOCKED
    except (StoreError, ValueError, OSError, RuntimeError) as e:  # before any step: no store, not writable, a URL
        # The cron log's last line stays the JSON outcome (`tail -1 reindex.log | jq .outcome`), after the reason.
        print(f"lookalike reindex: error: {e}", file=sys.stderr, flush=True)
        failed = {"outcome": "failed", "reason": f"{type(e).__name__}: {e}", "exit_code": 1, **served_fields(args.workdir)}
        _print_json(_outcome_line(failed), one_line=True)
        return 1
    except KeyboardInterrupt as e:
        stopped = e.report if isinstance(e, ReindexInterrupted) else None
        if stopped is not None:  # the outcome line a cron log expects, with the exit status of the signal
            data = report_dict(stopped)
            _print_json(_outcome_line(data), one_line=True)
        if not terminated():
            raise  # Ctrl-C: `lookalike` ends with its one line and status 130
        print(f"lookalike reindex: {stop_reason()}: {served_after_stop(args.workdir, stopped)}", file=sys.stderr)
        return stop_exit_status()
    data = report_dict(report)
    if report.outcome == "failed" or report.errors_after_outcome:  # before the JSON line, the last of a cron log
        print(f"lookalike reindex: {failure_line(args.workdir, report)}", file=sys.stderr, flush=True)
    _print_json(_outcome_line(data), one_line=True)
    return report.exit_code


def failure_line(workdir: str, report: ReindexReport) -> str:
    """What a failed run (or one whose outcome stood before something failed) says: whether
    CURRENT moved, and why it failed."""
    from lookalike.model.store import Store

    if report.outcome != "failed":
        return f"{report.outcome} ({report.reason}), then failed: {'; '.join(report.errors_after_outcome)}"
    current = Store.at(workdir).current_index_or_none()
    moved = report.new_index is not None and report.new_index == current
    return f"failed, {f'{current} promoted' if moved else 'nothing promoted'}: {report.reason}"


# What the next reindex does with what a stopped one left, for the stopped run's last line.
NEXT_RUN_RESUMES = ("the next run resumes from what this one finished (its training checkpoint, its embedded batches) "
                    "and removes the rest")


def served_after_stop(workdir: str, report: ReindexReport | None) -> str:
    """What serves after a stopped run, for its last line: CURRENT named, and whether it is unchanged."""
    from lookalike.model.store import Store

    current = Store.at(workdir).current_index_or_none()
    if report is not None and report.new_index is not None and report.new_index == current:  # CURRENT moved first
        return f"CURRENT is {current}, promoted by this run before it stopped"
    return f"CURRENT is unchanged ({current}); {NEXT_RUN_RESUMES}"


def cmd_versions(args: argparse.Namespace) -> int:
    from lookalike.model.store import Store
    from lookalike.pipeline import versions

    store = Store.at(args.workdir)  # VERSION given or not as the action needs: checked by cli.contradictory_arguments
    if args.action == "list":
        rows = versions.list_versions(store)
        versions.warn_if_current_missing(store, rows)
        if args.json:
            _print_json(rows)
        for r in rows if not args.json else []:
            mark = "*" if r.get("current") else " "
            never = "" if r.get("served") or r.get("current") else "never served"
            recall = f"recall@{r.get('recall_k')} {r['recall']}" if r.get("recall") is not None else "recall not measured"
            if "error" in r:  # its figures are unknown: the reason instead
                print(f"{mark} {r['version']}  cannot be served: {r['error']}")
                continue
            print(f"{mark} {r['version']}  model {r.get('model_version')}  {r.get('count')} items  "
                  f"{recall}  {r.get('created')}  {never}".rstrip())
        return 0
    if args.action == "promote":
        _print_json(versions.promote(store, args.version, reason="manual promote"))
    elif args.action == "prune":
        store.require_current_index()  # a store that serves: nothing is pruned from one that does not
        _print_json({"removed": versions.prune(store, args.keep, embed_runs=args.embedding_runs)})
    else:
        _print_json(versions.rollback(store))
    return 0



def add_store_commands(sub) -> None:
    """Register ``reindex`` and ``versions`` on the ``lookalike`` subcommand parser ``sub``."""
    p = sub.add_parser("reindex", help="retrain, evaluate, re-embed, validate and promote (the cron job)",
                       description="Trains a candidate (warm start from the served model), keeps it only if it beats "
                       "the served model on the frozen evaluation set by more than noise, embeds the corpus "
                       "incrementally, builds and autotunes a new index, validates it (recall, item count, canaries, compatibility) and "
                       "promotes it atomically; a running server hot-swaps to it. A rejected or failing candidate "
                       "model still lets the corpus update embedded with the served model be promoted. Exit codes: "
                       "0 promoted (new model), 4 corpus updated with the served model, 3 kept current (nothing "
                       "new), 1 failed (nothing promoted), 75 another run holds the store lock (nothing done), "
                       "130 Ctrl-C and 143 SIGTERM (the run stops as a whole, its report says so, CURRENT unchanged unless "
                       "already promoted). "
                       "Example crontab line (niced below the server; cron's PATH does not hold the "
                       "virtualenv, so name its lookalike by absolute path): "
                       f"{CRONTAB_EXAMPLE}")
    _add_workdir(p)
    _add_train_config(p, default=None, config_help="training preset (default: the served model's own config, "
                      "from its model.json, so the candidate warm-starts; digits when nothing is served yet); "
                      "--set overrides apply either way")
    p.add_argument("--corpus", default=None, help="labelled image folder to train on and embed (default: the folder "
                   "the served index was embedded from, as its manifest records, e.g. by `embed --corpus`; else "
                   "WORKDIR/corpus); the log names the one used")
    metadata = p.add_mutually_exclusive_group()
    add_metadata_option(metadata, default_help=" (default: the file the served index joined, so tags and filters "
                        "survive every run)")
    metadata.add_argument("--no-metadata", action="store_true",
                          help="publish without item metadata, even when the served index has some")
    p.add_argument("--min-improvement", type=_float_in(0.0, 1.0), default=0.0,
                   help="the candidate's MAP@R must beat the served model's by more than this, and by more "
                   "than noise: 2 standard errors of the paired per-query AP@R difference (default 0)")
    p.add_argument("--force", action="store_true", help="use the candidate even if it is not better beyond noise")
    p.add_argument("--target-recall", type=_float_in(0.0, 1.0, low_open=True), default=0.95, help="ANN recall@10 the new index must reach")
    p.add_argument("--min-canary-overlap", type=_float_in(0.0, 1.0), default=0.2,
                   help="same model as served: least mean overlap@10 of canary queries between served and new "
                   "index (0-1)")
    p.add_argument("--min-canary-self", type=_float_in(0.0, 1.0), default=0.9,
                   help="new model: least share of canary queries the new index returns first for their own "
                   "embedding (0-1)")
    p.add_argument("--min-items-ratio", type=_float_in(0.0, 1.0), default=0.5,
                   help="refuse a new index holding fewer than this share of the served index's items (0-1; "
                   "0 accepts any shrink)")
    p.add_argument("--num-workers", type=POSITIVE, default=1, help="Beam worker processes for the embed step")
    p.add_argument("--keep", type=POSITIVE, default=5, help="index versions to keep (default 5)")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("versions", help="list, promote, roll back or prune index versions",
                       description="lookalike versions list | promote VERSION | rollback | prune. Promote and rollback run "
                       "the same checks as reindex (index loads, model matches, smoke query) and switch CURRENT "
                       "atomically; a running server hot-swaps. Both point models/LATEST (the model embed uses by "
                       "default) at the model of the index they make current.")
    _add_workdir(p)
    p.add_argument("action", choices=["list", "promote", "rollback", "prune"], metavar="{list,promote,rollback,prune}",
                   help="list: every index version (* = CURRENT; a warning when CURRENT names a version that is gone; "
                   "error when the store does not exist); promote VERSION: check it and make it CURRENT; "
                   "rollback: make the version served before CURRENT current again; prune: delete what reindex "
                   "--keep deletes (index versions beyond the --keep most recently served, never CURRENT; models "
                   "and embedding runs reindex made that nothing kept uses; caches of models gone)")
    p.add_argument("version", nargs="?", help="the index version to promote")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.add_argument("--keep", type=POSITIVE, default=5, help="prune: index versions (and embedding runs) to keep")
    p.add_argument("--embedding-runs", action="store_true",
                   help="prune: also the runs of `lookalike embed` beyond the --keep latest (kept otherwise: "
                   "their Parquet files are yours; an index holds its own copy of the embeddings)")
    p.set_defaults(func=cmd_versions)
