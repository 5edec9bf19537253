"""The worker processes of the local runner's multi-process mode (``--num-workers N``).

Beam's ``FnApiRunner`` starts each worker as ``python -m apache_beam.runners.worker.sdk_worker_main``,
whose logging is not the ``lookalike`` process's: raw ``INFO:name:message`` lines without
time, some 40 lines of harness start-up and shut-down per worker, and every record shipped
back to the runner, which logs a worker's warnings a second time as one-line protobuf dumps.
``LocalRunner`` starts them through ``python -m lookalike.pipeline.worker_main`` instead,
which configures logging as the CLI does
(``lookalike.pipeline.logs``: same format, Beam and absl at WARNING, known noise dropped),
lets a worker log only to the stderr it inherited from the ``lookalike`` process, and then
runs Beam's harness unchanged.

Ctrl-C: a terminal sends SIGINT to every process of the job. A worker ignores it, and the
``lookalike`` process, which decides, stops its workers (SIGTERM, by the pids they
registered) before raising KeyboardInterrupt: otherwise Beam would wait for their
in-flight bundles, and a worker killed mid-bundle would print a traceback. Work already
finished is in the embedding cache (``BatchRowsFn`` writes each batch there first).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from lookalike.pipeline.interrupts import request_stop
from lookalike.pipeline.worker_main import STOP_FILE, WORKER_PIDS_ENV, worker_label


def worker_command(pids_dir: str, verbose: bool) -> str:
    """The shell command that starts one worker process (Beam runs it with ``sh -c``)."""
    return (f"{WORKER_PIDS_ENV}={shlex.quote(pids_dir)} exec {shlex.quote(sys.executable)} -m lookalike.pipeline.worker_main"
            + (" --verbose" if verbose else ""))


def stop_workers(pids_dir: str) -> int:
    """SIGTERM every worker process registered in ``pids_dir`` (none if ""); how many were signalled."""
    stopped = 0
    for name in os.listdir(pids_dir) if pids_dir and os.path.isdir(pids_dir) else []:
        if name == STOP_FILE:
            continue
        try:
            os.kill(int(name), signal.SIGTERM)
            stopped += 1
        except (ValueError, ProcessLookupError, PermissionError):
            pass
    return stopped


class LocalRunner(FnApiRunner):
    """Beam's in-process ``FnApiRunner``; in its multi-process mode (``--direct_running_mode=
    multi_processing``) workers start through ``lookalike.pipeline.worker_main``, and Ctrl-C
    stops them at once."""

    _pids_dir: str = ""

    def resolve_any_environments(self, pipeline_proto: Any) -> Any:
        pipeline_proto = super().resolve_any_environments(pipeline_proto)
        command = worker_command(self._pids_dir, logging.getLogger("lookalike").getEffectiveLevel() <= logging.DEBUG)
        for env in pipeline_proto.components.environments.values():
            if env.urn == python_urns.SUBPROCESS_SDK:
                env.payload = command.encode("utf-8")
        return pipeline_proto

    def run_via_runner_api(self, pipeline_proto: Any, options: Any) -> Any:
        processes = options.view_as(DirectOptions).direct_running_mode == "multi_processing"
        self._pids_dir = tempfile.mkdtemp(prefix="lookalike-workers-") if processes else ""
        try:
            with _interrupt_stops_workers(self._pids_dir):
                return super().run_via_runner_api(pipeline_proto, options)
        finally:
            if self._pids_dir:
                shutil.rmtree(self._pids_dir, ignore_errors=True)


class _AfterInterrupt(logging.Filter):
    """Once Ctrl-C stopped the run: drops what Beam logs while it tears down (the
    KeyboardInterrupt it re-raises from a DoFn, connections to the stopped workers closing in
    error), and any traceback of the interrupt itself; the CLI says, in one line, what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        interrupt = bool(record.exc_info and record.exc_info[0] and issubclass(record.exc_info[0], KeyboardInterrupt))
        return not (interrupt or record.name.startswith("apache_beam"))


@contextmanager
def _interrupt_stops_workers(pids_dir: str) -> Iterator[None]:
    """While the pipeline runs, SIGINT stops the worker processes and ends the run with
    KeyboardInterrupt, not the RuntimeError Beam makes of it inside a DoFn (whose traceback
    it logs): the caller can tell an interrupt from a failure."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = threading.Event()
    previous_hook = threading.excepthook
    quiet = _AfterInterrupt()

    def on_sigint(signum: int, frame: Any) -> None:
        request_stop(signum)
        if not interrupted.is_set():
            interrupted.set()
            for handler in logging.getLogger().handlers:
                handler.addFilter(quiet)
            if pids_dir:  # a worker that starts from now on exits at once (worker_main)
                open(os.path.join(pids_dir, STOP_FILE), "w").close()
            stop_workers(pids_dir)
        raise KeyboardInterrupt

    def quiet_worker_threads(args: Any) -> None:  # Beam's thread that waited on a worker we stopped
        if not interrupted.is_set():
            previous_hook(args)

    on_sigint.stops_workers = True  # type: ignore[attr-defined]  # SIGTERM handlers hand the stop to it (cli._Terminated)
    previous = signal.signal(signal.SIGINT, on_sigint)
    threading.excepthook = quiet_worker_threads
    try:
        yield
        if interrupted.is_set():  # its KeyboardInterrupt was swallowed on the way (by Beam, or a gc callback)
            raise KeyboardInterrupt
    except Exception as e:
        if interrupted.is_set():
            raise KeyboardInterrupt from e
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        threading.excepthook = previous_hook
        for handler in logging.getLogger().handlers:
            handler.removeFilter(quiet)


__all__ = ["WORKER_PIDS_ENV", "LocalRunner", "stop_workers", "worker_command", "worker_label"]
