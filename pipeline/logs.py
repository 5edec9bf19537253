"""Log format and library noise, the same in the ``lookalike`` process and in the Beam worker
processes it starts (``lookalike.pipeline.workers``), so every line of a run reads alike."""

from __future__ import annotations

import logging
import os
import sys
import traceback

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Libraries whose INFO lines say nothing about the user's job (Beam's harness start and stop,
# orbax's checkpoint reads, JAX's backend probing): WARNING and above only, unless --verbose.
NOISY_LOGGERS = ("apache_beam", "absl", "jax", "orbax", "matplotlib", "httpx", "tensorflow")


class LibraryNoise(logging.Filter):
    """Drops warnings Beam logs on every run that say nothing about the user's job (optional
    Google Cloud clients absent; no ``resource`` module stats; a worker process without a
    staging folder, which the local runner never has), orbax's wait for a previous
    checkpoint save, and Beam's ERROR with a traceback for a
    stop signal raised inside a stage (SIGTERM's SystemExit, KeyboardInterrupt): the job says
    it in its own last line. Only these exact messages: any other warning or error still shows."""

    ROOT_PREFIXES = ("apitools not found", "Resource module is not available")
    BEAM_PREFIXES = ("No semi_persistent_directory found",)
    # orbax (through absl) when a checkpoint save waits for the previous one: a second's wait
    # on a busy disk, "consider checkpointing less frequently", on a job that is fine.
    ABSL_PREFIXES = ("Waiting for previous save to complete",)

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "root":
            return not message.startswith(self.ROOT_PREFIXES)
        if record.name == "absl" and record.levelno < logging.ERROR:
            return not message.startswith(self.ABSL_PREFIXES)
        if record.name.startswith("apache_beam") and record.levelno < logging.ERROR:
            return not message.startswith(self.BEAM_PREFIXES)
        if record.name.startswith("apache_beam") and record.exc_info:
            return not isinstance(record.exc_info[1], (SystemExit, KeyboardInterrupt))
        return True


class QuietFormatter(logging.Formatter):
    """The log format, without the tracebacks of orbax's errors (logged through absl by its
    background threads: six of them, 469 lines, for one checkpoint save on a full disk): their
    line stays, the job's own error says what failed, and ``--verbose`` (which keeps the plain
    formatter) shows them. The record itself is left as it is, for other handlers."""

    TRACEBACK_NOTE = " (traceback with --verbose)"

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and record.name == "absl" and _from_orbax(record)):
            return super().format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record) + self.TRACEBACK_NOTE
        finally:
            record.exc_info, record.exc_text = saved


def _from_orbax(record: logging.LogRecord) -> bool:
    """Whether orbax logged ``record`` or raised its exception (absl's logger names itself as
    the caller unless absl's logger class is installed, so the traceback is looked at too)."""
    if f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
        return True
    tb = record.exc_info[2] if record.exc_info else None
    return tb is not None and any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in traceback.extract_tb(tb))


class _EarlyHandler(logging.StreamHandler):
    """stderr in our format until ``configure_logging`` sets up the real handler (it removes this one)."""


def quiet_library_noise() -> None:
    """Drop ``LibraryNoise``'s messages from now on, before ``configure_logging`` (which needs the
    parsed arguments) and before anything imports Beam: the command-line parser lists Beam's
    options (a misspelt flag of ``embed``), and importing Beam warns through the root logger at
    import time. Without a handler, that module-level ``logging.warning`` would also install
    Python's bare default handler (``WARNING:root:...``), which ``configure_logging``'s
    ``basicConfig`` would then keep; so an early stderr handler in our format (other warnings
    still show) stands in until ``configure_logging`` replaces it."""
    root = logging.getLogger()
    if not any(isinstance(f, LibraryNoise) for f in root.filters):
        root.addFilter(LibraryNoise())  # records of the root logger itself: Beam's import-time warnings
    if not root.handlers:
        handler = _EarlyHandler()
        handler.setFormatter(QuietFormatter(LOG_FORMAT, DATE_FORMAT))
        handler.addFilter(LibraryNoise())  # records of other loggers, e.g. apache_beam's
        root.addHandler(handler)


def late_callback_noise(unraisable: "sys.UnraisableHookArgs") -> bool:
    """True for the one unraisable exception a failed orbax read leaves behind: TensorStore
    completing its other reads after orbax's event loop has closed (``call_soon_threadsafe``:
    "Event loop is closed", on no object). The read's own error has been reported by then;
    this traceback, printed 0-5 times at random, says nothing more."""
    exc = unraisable.exc_value
    return (unraisable.object is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            and unraisable.exc_traceback is not None
            and any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(unraisable.exc_traceback)))


def drop_late_callback_noise() -> None:
    """Install a ``sys.unraisablehook`` that drops ``late_callback_noise`` and hands anything
    else to the hook it replaces (the console script's process only)."""
    previous = sys.unraisablehook

    def hook(unraisable: "sys.UnraisableHookArgs") -> None:
        if not late_callback_noise(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


def configure_logging(verbose: bool) -> None:
    """Timestamped lines on stderr; INFO (DEBUG with ``verbose``) for lookalike, WARNING for noisy
    libraries; without ``verbose``, orbax's late-callback tracebacks dropped (``late_callback_noise``)."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for early in [h for h in root.handlers if isinstance(h, _EarlyHandler)]:
        root.removeHandler(early)  # quiet_library_noise's stand-in
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    if not verbose:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(LibraryNoise())
            handler.setFormatter(QuietFormatter(LOG_FORMAT, DATE_FORMAT))
        drop_late_callback_noise()


__all__ = ["DATE_FORMAT", "LOG_FORMAT", "NOISY_LOGGERS", "LibraryNoise", "QuietFormatter", "configure_logging", "drop_late_callback_noise",
           "late_callback_noise", "quiet_library_noise"]
