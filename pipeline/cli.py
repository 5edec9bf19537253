"""The ``lookalike`` console script: one subcommand per job, thin over the libraries.

    lookalike demo    --workdir DIR [--no-serve]   digits -> train -> embed -> serve
    lookalike train   --workdir DIR                train the Siamese encoder
    lookalike embed   --workdir DIR                Beam pipeline: corpus -> embeddings -> index
    lookalike serve   --workdir DIR                query API and web page on 127.0.0.1
    lookalike query   --image F | --id ID | --vector ...   ask a running server
    lookalike reindex --workdir DIR                retrain, gate, re-embed, validate, promote (cron)
    lookalike versions list|promote V|rollback     manage served index versions
    lookalike eval    --workdir DIR --index [V]    ANN recall and retrieval metrics, exact vs ANN
    lookalike eval    --workdir DIR --model [V]    a model's retrieval, ROC AUC and few-shot metrics
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from functools import partial

from lookalike.pipeline.cli_options import (  # noqa: F401 (DEFAULT_WORKDIR, _float_in: re-exported)
    DEFAULT_PORT, DEFAULT_WORKDIR, PORT, POSITIVE, _add_train_config, _add_workdir, _DefaultsHelpFormatter, _float_in,
    _int_at_least, _print_json, _train_config, add_metadata_option, attach_negative_values, expanded_wildcard,
    misspelled_pass_through, corpus_options,
)
from lookalike.pipeline.cli_serving import add_serving_commands
from lookalike.pipeline.cli_store import add_store_commands
from lookalike.pipeline.failpoints import failpoint
from lookalike.pipeline.interrupts import request_stop
from lookalike.pipeline.logs import configure_logging, quiet_library_noise

log = logging.getLogger("lookalike")

def cmd_train(args: argparse.Namespace) -> int:
    from lookalike.model.train import train_and_evaluate
    from lookalike.pipeline.interrupts import sigterm_as_interrupt, stop_exit_status, stop_reason, terminated

    try:
        with sigterm_as_interrupt():  # kill, systemd stop, a timeout: stop as for Ctrl-C (checkpoint kept, one line)
            result = train_and_evaluate(_train_config(args), args.workdir, data_dir=args.data, tfds=args.tfds,
                                        tfds_data_dir=args.tfds_data_dir)
    except KeyboardInterrupt:
        if not terminated():
            raise  # Ctrl-C: `lookalike` ends with its one line and status 130
        print(f"lookalike train: {stop_reason()}{interrupted_hint(args)}", file=sys.stderr)
        return stop_exit_status()
    _print_json({"model_version": result.version, "model_dir": str(result.model_dir), "metrics": result.metrics})
    return 0


class _Terminated:
    """SIGTERM ends an embed run as Ctrl-C does: its cleanup runs (a run folder without output,
    the partial index and Beam's temp folder are removed) instead of the process vanishing
    mid-write. Beam reports the exit raised inside a stage as its own error, so the signal is
    remembered here for the exit status (128 + signal)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.signum = signum
        request_stop(signum)  # if this exit is swallowed (a gc callback), the run still stops before publishing
        handler = signal.getsignal(signal.SIGINT)
        if getattr(handler, "stops_workers", False):  # the local runner's: SIGTERM its worker processes first
            handler(signal.SIGINT, frame)  # (else Beam waits for their bundles, and a worker may abort); raises
        raise SystemExit(128 + signum)


def _interrupt_noted(signum: int, frame: object) -> None:
    """Ctrl-C as Python's own handler takes it (KeyboardInterrupt), also noted for the run's
    checkpoints in case that exception is swallowed (``interrupts.request_stop``)."""
    request_stop(signum)
    raise KeyboardInterrupt


def cmd_embed(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lookalike.index.builder import IndexOptions
    from lookalike.pipeline.embed import EmbedConfig, run_embed
    from lookalike.pipeline.video import FrameSampling

    terminated = _Terminated()
    previous = signal.signal(signal.SIGTERM, terminated)
    previous_int = signal.signal(signal.SIGINT, _interrupt_noted)  # the pipeline's own handler replaces it meanwhile
    try:
        summary = run_embed(EmbedConfig(
            workdir=args.workdir, corpus=args.corpus, list_file=args.list_file, tfds=args.tfds,
            tfds_data_dir=args.tfds_data_dir, model_version=args.model, run_name=args.run_name,
            runner=args.runner, num_workers=args.num_workers, decode_threads=args.decode_threads,
            max_batch_size=args.batch_size,
            num_shards=args.num_shards, index=IndexOptions(mode=args.index_mode, target_recall=args.target_recall),
            beam_args=args.beam_args, publish=not args.no_publish, incremental=args.incremental, keep_versions=args.keep,
            metadata=args.metadata,
            sampling=FrameSampling(interval_s=args.frame_interval_s, shot_threshold=args.shot_threshold,
                                   max_frames=args.max_frames_per_video),
        ))
    except BaseException:
        if terminated.signum is None:
            raise
        log.warning("embed stopped by signal %d%s", terminated.signum, interrupted_hint(args, sys.exc_info()[1]))
        return 128 + terminated.signum
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    _print_json(asdict(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.model:
        from lookalike.model.evaluate import evaluate_model_cli

        return evaluate_model_cli(args)
    from lookalike.index.evaluate import evaluate_index
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.store import Store

    store = Store.at(args.workdir)
    path = store.require_current_index() if args.index in (None, "CURRENT") else store.index_dir(args.index)
    _print_json(evaluate_index(ItemIndex.load(path), k=args.k, max_queries=args.max_queries, label_column=args.label_column))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lookalike.pipeline.jobs import run_demo

    result = run_demo(_train_config(args), args.workdir, num_workers=args.num_workers)
    some_image = _first_corpus_image(args.workdir)
    url = f"http://{args.host}:{args.port}"
    print(f"\nlookalike demo: model {result.train.version} "
          f"(val precision@1 {result.train.metrics.get('precision_at_1', float('nan')):.3f}), "
          f"{result.embed.embedded} images indexed as {result.embed.index_version}, {result.embed.failed} skipped.")
    print(f"workdir: {os.path.abspath(args.workdir)}")
    if args.no_serve:
        print(f"serve it with: lookalike serve --workdir {args.workdir} --port {args.port}")
        return 0
    print(f"\nserving on {url}/  (Ctrl-C to stop); try:\n"
          f"  curl -F file=@{some_image} '{url}/v1/search/image?k=5'\n"
          f"  lookalike query --url {url} --image {some_image}\n")
    from lookalike.serving.server import serve

    serve(args.workdir, host=args.host, port=args.port)
    return 0


def _first_corpus_image(workdir: str) -> str:
    from lookalike.model.data import list_images
    from lookalike.model.store import Store

    images = list_images(Store.at(workdir).corpus_dir)
    return str(images[0]) if images else "IMAGE.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, including Beam and JAX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(subparsers=sub.choices)  # main() reports a command's unknown options with its own usage

    p = sub.add_parser("demo", help="write the bundled digits as images, train, embed, index and serve",
                       description="Runs the whole system on scikit-learn's bundled handwritten digits "
                       "(no download): writes them under WORKDIR/corpus/<label>/, trains, embeds with "
                       "the Beam pipeline, publishes a ScaNN index, then serves it.")
    _add_workdir(p)
    _add_train_config(p)
    p.add_argument("--no-serve", action="store_true", help="stop after the index is published (exit 0)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--num-workers", type=POSITIVE, default=1, help="Beam worker processes for the embed step")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train the Siamese encoder (contrastive or triplet loss)",
                       description="Trains on a folder with one sub-folder per class (default WORKDIR/corpus), on "
                       "images and videos without labels (--unlabelled), or on a prepared TFDS data set (--tfds), and "
                       "saves WORKDIR/models/<version> (orbax params + model.json), pointed to by models/LATEST. "
                       "Examples: lookalike train --workdir DIR --set num_steps=800; lookalike train --workdir DIR "
                       "--data ~/clips --unlabelled --set loss=triplet; lookalike train --workdir DIR --tfds "
                       "cifar10:train --tfds-data-dir ~/tensorflow_datasets --config photos")
    _add_workdir(p)
    _add_train_config(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None,
                        help="labelled image folder <data>/<class>/*.png (default WORKDIR/corpus); with --unlabelled "
                        "any folder of images and videos")
    source.add_argument("--tfds", default=None, metavar="NAME[:SPLIT]",
                        help="train on a TFDS data set already prepared in --tfds-data-dir (never downloaded; split "
                        "default train, TFDS split syntax: train[:80%%], train+test); one without a 'label' feature "
                        "trains as --unlabelled")
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir (default ~/tensorflow_datasets)")
    p.add_argument("--unlabelled", action="store_true",
                   help="ignore labels (same as --set unlabelled=true): each image is its own class and each "
                   "video_window_s seconds of a video shot (frames every video_frame_interval_s) one; positives "
                   "are augmented views (augment_* if set, else crop, flip, jitter, rotation); validation retrieves "
                   "views of held-out images. --set loss=triplet (P x K views) learns fastest")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("embed", help="Beam pipeline: corpus -> embeddings (Parquet) -> ScaNN index",
                       description="Embeds every image and video (sampled frames) under --corpus (folder or glob; default WORKDIR/corpus) with a "
                       "trained model, writes WORKDIR/embeddings/<run>/ (Parquet, dead letters, summary.json), builds "
                       "a ScaNN index and publishes it as CURRENT. A run that publishes holds the store lock (WORKDIR/.reindex.lock) "
                       "that reindex and versions promote|rollback hold, so it never moves CURRENT under them: while "
                       "another run holds it, embed exits 75 before doing anything (--no-publish takes no lock). "
                       "Unknown options are passed to Beam, e.g. "
                       "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py")
    _add_workdir(p)
    source = p.add_mutually_exclusive_group()  # one source: giving two is a usage error (exit 2)
    source.add_argument("--corpus", default=None, help="folder or glob of images and videos (default WORKDIR/corpus); an existing folder is taken literally, even "
                        "if its name holds [ ] ? or *; in a glob, /**/ matches zero or more folders")
    source.add_argument("--list-file", default=None, help="a text file listing image/video paths or file:// URLs, one per line, relative ones from its folder; '#' after a space or at line start begins a comment (instead of --corpus)")
    source.add_argument("--tfds", default=None, metavar="NAME[:SPLIT]",
                   help="embed a TFDS data set already prepared in --tfds-data-dir (never downloaded; split default "
                   "train, TFDS split syntax: train[:100], train[10%%:20%%], train+test)")
    p.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir (default ~/tensorflow_datasets)")
    p.add_argument("--model", default=None, help="model version (default models/LATEST; a run that publishes points "
                   "models/LATEST at its model, and warns when that replaces the served one)")
    p.add_argument("--run-name", default=None, help="name of the embeddings run (default e-<UTC time>)")
    p.add_argument("--runner", default="FnApiRunner",
                   help="Beam runner (default FnApiRunner: in-process, no Prism download)")
    p.add_argument("--num-workers", type=POSITIVE, default=1, help="local runner: worker processes (multi-process mode if > 1; each runs XLA on CPUs/N threads)")
    p.add_argument("--decode-threads", type=POSITIVE, default=None,
                   help="images and videos decoded at once in each process (default: one per CPU it may use, "
                   "its share with --num-workers); files under 32 KiB are decoded on one thread")
    p.add_argument("--batch-size", type=POSITIVE, default=256, help="files per inference batch")
    p.add_argument("--num-shards", type=POSITIVE, default=None,
                   help="embedding and index shards, each built on a worker (default: one per 50k files)")
    p.add_argument("--index-mode", default="auto", choices=["auto", "brute_force", "tree_exact", "ah", "tree_ah"],
                   help="ScaNN configuration (auto: chosen by shard size: exact brute force under 20k items, "
                   "tree + exact scoring of the searched leaves under 200k, then tree + AH + reorder)")
    p.add_argument("--target-recall", type=_float_in(0.0, 1.0, low_open=True), default=0.95,
                   help="autotune the index's search parameters to this recall@10 against exact search")
    p.add_argument("--no-publish", action="store_true", help="write embeddings only; do not build or publish an index (takes no store lock)")
    p.add_argument("--incremental", action="store_true",
                   help="reuse embeddings of files whose bytes this model already embedded (embeddings/cache/)")
    p.add_argument("--keep", type=POSITIVE, default=None, metavar="N",
                   help="after publishing, delete index versions beyond the N most recently served (never CURRENT) "
                   "and embedding runs of this command beyond the N latest, as `versions prune --keep N "
                   "--embedding-runs` does: for a nightly `embed --incremental`, whose runs and versions otherwise "
                   "pile up (default: delete nothing)")
    add_metadata_option(p)
    p.add_argument("--frame-interval-s", type=_float_in(0.001, float("inf")), default=2.0,
                   help="videos: sample a frame every N seconds (at least 0.001: a frame's id names milliseconds)")
    p.add_argument("--max-frames-per-video", type=POSITIVE, default=10_000,
                   help="videos: index at most this many sampled frames of each video; a longer one's rest is "
                        "left out, with a warning naming it (default 10000)")
    p.add_argument("--shot-threshold", type=_float_in(0.0, 2.0), default=0.5,
                   help="videos: also sample on a shot change (grayscale histogram L1 distance above this, 0-2)")
    p.set_defaults(func=cmd_embed)

    add_serving_commands(sub)
    add_store_commands(sub)

    p = sub.add_parser("eval", help="evaluate a model, or how much the approximate index loses against exact search",
                       description="--index (default): for every item of an index version (its own item excluded) "
                       "compares the ANN neighbours with exact search: ANN recall@k, and Precision@1, Recall@K and "
                       "MAP@R (Musgrave et al. 2020) on both, labels being the first path component of the item id "
                       "(<label>/<file>) or a metadata column (--label-column). --model: Precision@1, Recall@K, "
                       "R-Precision, MAP@R, verification ROC AUC and N-way K-shot accuracy of a model on a labelled "
                       "folder: on the folder it trained on, only on the images it held out of training unless "
                       "--all-images. Examples: lookalike eval "
                       "--workdir DIR --index --k 10; lookalike eval --workdir DIR --model --n-way 5 --k-shot 1")
    _add_workdir(p)
    p.add_argument("--index", nargs="?", const="CURRENT", default=None, metavar="VERSION",
                   help="index version to evaluate (default: CURRENT)")
    p.add_argument("--k", "-k", type=POSITIVE, default=10, help="k of recall@k (default 10)")
    p.add_argument("--max-queries", type=POSITIVE, default=None, help="evaluate a seeded sample of this many items")
    p.add_argument("--label-column", default=None, metavar="COLUMN",
                   help="--index: take each item's label from this metadata column (e.g. one joined by embed "
                   "--metadata) instead of the first path component of its id")
    p.add_argument("--model", nargs="?", const="LATEST", default=None, metavar="VERSION",
                   help="evaluate a model (default LATEST; a version or a model folder) instead of an index")
    p.add_argument("--data", default=None, help="--model: labelled folder <label>/<file> (default WORKDIR/corpus). "
                   "When it is the folder the model trained on, only the images it held out of training (its "
                   "held_out.json) are scored")
    p.add_argument("--all-images", action="store_true",
                   help="--model: score every image of the folder, the model's own training images too (the scores "
                   "are then optimistic: a warning says so)")
    p.add_argument("--n-way", type=_int_at_least(2), default=None,
                   help="--model: classes per few-shot episode (default 5, skipped with a warning when the data has "
                   "fewer classes; given, that is an error, before anything is embedded)")
    p.add_argument("--k-shot", type=POSITIVE, default=None,
                   help="--model: examples per class in an episode (default 1; given, a few-shot score the data "
                   "cannot give is an error)")
    p.add_argument("--episodes", type=POSITIVE, default=1000, help="--model: few-shot episodes")
    p.add_argument("--max-items", type=_int_at_least(2), default=5000, help="--model: evaluate at most this many images")
    p.set_defaults(func=cmd_eval)
    for command in sub.choices.values():
        command.formatter_class = _DefaultsHelpFormatter
    return parser


def interrupted_hint(args: argparse.Namespace, stopped_by: BaseException | None = None) -> str:
    """What a Ctrl-C (or an embed's SIGTERM) left behind, for the one line ``main`` prints (the
    command logged the details); ``stopped_by``: the exception that stopped the command."""
    if args.command == "embed":
        published = getattr(stopped_by, "published_index_version", None)
        if published:  # stopped while it wrote its summary or pruned (--keep)
            return (f" after publishing index {published}, which is CURRENT"
                    + ("; pruning older versions was cut short: `lookalike versions prune --workdir "
                       f"{args.workdir} --keep {args.keep} --embedding-runs` finishes it" if args.keep else ""))
        return (": nothing published; every finished batch is in the embedding cache: rerun with --incremental to "
                "resume where it stopped")
    if args.command == "train":
        return ": no model published"
    if args.command in ("reindex", "versions") and getattr(args, "workdir", None):
        from lookalike.model.store import Store

        current = f": CURRENT is {Store.at(args.workdir).current_index_or_none()}"
        from lookalike.pipeline.cli_store import NEXT_RUN_RESUMES

        return current + (f"; {NEXT_RUN_RESUMES}" if args.command == "reindex" else "")
    return ""


def contradictory_arguments(args: argparse.Namespace) -> str | None:
    """Arguments that cannot go together or are missing, which argparse alone does not see;
    a usage error (exit 2) like its own. None if fine."""
    if args.command == "eval" and args.model and args.index:
        return "--model and --index evaluate different things: give one of them"
    if args.command == "versions" and args.version and args.action != "promote":
        return f"versions {args.action} takes no VERSION (got {args.version!r})"
    if args.command == "versions" and args.action == "promote" and not args.version:
        return "versions promote needs a VERSION (see `lookalike versions list`)"
    return None


def bad_train_overrides(args: argparse.Namespace) -> str | None:
    """Why the ``--set`` overrides of train, demo or reindex are wrong (an unknown key, a value
    of the wrong type or out of range), as a usage error before any work; None if fine. For a
    reindex without ``--config`` they are checked against the config of the model the store
    serves, which they will change (the digits preset when it serves none)."""
    if not getattr(args, "overrides", None):
        return None
    from lookalike.model.config import apply_overrides, validate_config

    try:
        if getattr(args, "config", None):
            validate_config(_train_config(args))
        else:
            from lookalike.pipeline.reindex_inputs import served_train_config

            served = served_train_config(args.workdir)
            validate_config(apply_overrides(served, list(args.overrides)) if served is not None else
                            _train_config(argparse.Namespace(**{**vars(args), "config": "digits"})))
    except ValueError as e:
        return f"--set: {e}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_library_noise()  # parsing may import Beam (embed's pass-through options), which warns as it loads
    parser = build_parser()
    # `query --vector -0.1,0.2`, `query --id -x.png`: argparse would take the value for an option
    option_names = {name for command in parser.get_default("subparsers").values()
                    for name in command._option_string_actions}
    argv = attach_negative_values(sys.argv[1:] if argv is None else argv, ("--vector",), ("--id",), option_names)
    args, unknown = parser.parse_known_args(argv)
    parser_of_command = args.subparsers.get(args.command, parser)
    if unknown:
        problem = expanded_wildcard(argv, unknown, corpus_options(parser_of_command))
        if args.command != "embed":
            parser_of_command.error(problem or f"unrecognized arguments: {' '.join(unknown)}")
        problem = problem or misspelled_pass_through(unknown, list(parser_of_command._option_string_actions))
        if problem:
            parser_of_command.error(problem)
    args.beam_args = unknown
    workdir = getattr(args, "workdir", None)
    if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
        parser_of_command.error(f"argument --workdir: {workdir} is a file, not a folder (the store: a folder)")
    problem = contradictory_arguments(args)
    if problem:
        parser_of_command.error(problem)
    # The jobs with stop handling of their own (installed once their libraries are imported):
    # until then (checking --set imports JAX: seconds), and after, a SIGTERM still says so.
    # Other commands keep the default action.
    with_own_stop = args.command in ("embed", "train", "reindex", "demo") and _in_main_thread()
    outside_a_job = partial(_terminated_outside_a_job, args.command)
    previous_term = signal.signal(signal.SIGTERM, outside_a_job) if with_own_stop else None
    try:
        failpoint("cli-parsed")
        problem = bad_train_overrides(args)
        if problem:
            parser_of_command.error(problem)
        configure_logging(args.verbose)
        failpoint("cli-started")
        return _run_command(args)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _terminated_outside_a_job(command: str, signum: int, frame: object) -> None:
    """SIGTERM to embed, train, reindex or demo while the job's own stop handling is not in
    force (the few seconds it spends importing Beam and JAX; uvicorn handing the signal back
    after the demo's server shut down): one line saying so, then death by the signal, as
    without a handler (status 143; a service manager counts it as a clean stop)."""
    try:
        os.write(2, f"lookalike {command}: terminated (SIGTERM)\n".encode())  # not print: stderr may be mid-write
    except OSError:
        pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _run_command(args: argparse.Namespace) -> int:
    from lookalike.model.store import StoreError
    from lookalike.model.store_lock import LockHeldError
    from lookalike.pipeline.reindex import EXIT_LOCKED

    try:
        return args.func(args)
    except LockHeldError as e:  # embed, versions promote/rollback during a reindex (or another embed): try again later
        print(f"lookalike {args.command}: error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback (the local runner stopped its workers)
        print(f"lookalike {args.command}: interrupted{interrupted_hint(args, e)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    except PermissionError as e:  # e.g. a store written by another user
        if args.verbose:
            log.exception("failed")
        where = f" {e.filename}" if e.filename else ""
        print(f"lookalike {args.command}: error: permission denied:{where} ({e.strerror or e}): run as a user that "
              "can read and write the store, or fix its permissions", file=sys.stderr)
        return 1
    except (StoreError, ValueError, OSError, RuntimeError, FloatingPointError) as e:  # OSError: unreadable files, a runner's connection
        if args.verbose:
            log.exception("failed")
        if not getattr(e, "logged_as_error", False):  # else its ERROR line says it all (serve's failed first load)
            print(f"lookalike {args.command}: error: {e}", file=sys.stderr)
        return 1


def run() -> None:
    """The ``lookalike`` console script: ``main()``, exiting with its status. A job that failed
    or was stopped (a non-zero status) ends without Python's interpreter teardown, once its
    output is flushed: threads may still be inside XLA or Beam then (an encoder compiling on
    the preload thread, a forward in flight), and tearing down under them ends the process
    with "terminate called ... FATAL: exception not rethrown" (status 134) or a segmentation
    fault instead of the job's own status (143 after SIGTERM, 1 after an error). Its
    cleanup has run by then: ``main`` returns after every ``finally`` of the job."""
    status = main()
    if status:
        logging.shutdown()  # flush every log handler
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`| head`): nothing more can be written
                pass
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
