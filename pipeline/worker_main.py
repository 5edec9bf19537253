"""Entry point of one worker process of the local multi-process runner (``workers.LocalRunner``):
``python -m lookalike.pipeline.worker_main``. Logging is configured before Beam is imported,
so the warnings Beam logs while it imports get the same format and noise filter as in the
``lookalike`` process; then Beam's worker harness runs unchanged."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys

from lookalike.pipeline.logs import configure_logging

WORKER_PIDS_ENV = "LOOKALIKE_WORKER_PIDS"  # the folder where each worker process registers its pid (workers.stop_workers)
STOP_FILE = "stop"  # in that folder once the run was stopped: a worker starting after it exits at once


def worker_label() -> str:
    """This process's name in per-worker progress lines: Beam's worker id in a worker process, else the pid."""
    return os.environ.get("WORKER_ID") or f"pid {os.getpid()}"


def main(argv: list[str] | None = None) -> None:
    """Run one Beam worker harness with lookalike's logging; SIGINT is left to the ``lookalike`` process."""
    parser = argparse.ArgumentParser(prog="python -m lookalike.pipeline.worker_main")
    parser.add_argument("--verbose", action="store_true", help="DEBUG lines, and every library's INFO lines")
    verbose = parser.parse_known_args(argv)[0].verbose
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(verbose)  # before Beam's harness is imported: its import-time warnings get our filter
    logging.getLogger("lookalike").setLevel(logging.DEBUG if verbose else logging.INFO)  # the harness resets the root level
    os.environ.pop("LOGGING_API_SERVICE_DESCRIPTOR", None)  # log here only, not a second time through the runner
    pids_dir = os.environ.get(WORKER_PIDS_ENV)
    if pids_dir and os.path.isdir(pids_dir):
        open(os.path.join(pids_dir, str(os.getpid())), "w").close()
        if os.path.exists(os.path.join(pids_dir, STOP_FILE)):  # the run was stopped while this worker started
            sys.exit(0)
    from apache_beam.runners.worker import sdk_worker_main

    gc.freeze()  # the modules imported so far are never garbage: full collections skip them (model.memory)
    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main(sys.argv[1:])
