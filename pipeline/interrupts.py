"""SIGTERM stops a long job as Ctrl-C does.

``kill PID``, a systemd stop or a cron/``timeout`` limit sends SIGTERM, whose default action
ends the process on the spot: no log line, no report, nothing cleaned up. Inside
``sigterm_as_interrupt()`` SIGTERM is handed to the SIGINT handler in force instead (Python's
own, which raises KeyboardInterrupt, or the embed pipeline's, which also stops its worker
processes), so every ``except KeyboardInterrupt`` / ``finally`` of the job runs, and
``stop_reason()`` tells the two signals apart for the job's report and its last line.

``interrupts_deferred()`` holds both signals back over a short section that must not be cut
in the middle (a training checkpoint being written by orbax, whose wait for its save thread
would log the interrupt as a failed save, with a traceback) and delivers them right after it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

_received: int | None = None  # the signal that stopped the job (None: none, or Ctrl-C)


_stops: list[int] = []  # every stop signal that arrived, also those whose exception was lost


def request_stop(signum: int) -> None:
    """Note that ``signum`` asked the job to stop. A handler's KeyboardInterrupt or SystemExit
    can be lost: raised while the main thread runs a garbage-collection callback ("Exception
    ignored in ..."), or inside library code that catches everything; ``raise_if_stopped``
    at the job's checkpoints (before it publishes) then stops it anyway."""
    _stops.append(signum)


def stop_mark() -> int:
    """A mark of the stop signals so far: ``raise_if_stopped(where, mark)`` looks only at later ones."""
    return len(_stops)


def raise_if_stopped(where: str, since: int) -> None:
    """KeyboardInterrupt if a stop signal arrived after mark ``since`` and the job went on."""
    if len(_stops) > since:
        log.debug("stop signal %d noted earlier: stopping %s", _stops[-1], where)
        raise KeyboardInterrupt(f"signal {_stops[-1]}")


def stop_reason() -> str:
    """Why the job got KeyboardInterrupt: ``terminated (SIGTERM)`` or ``interrupted (SIGINT)``."""
    return "terminated (SIGTERM)" if _received == signal.SIGTERM else "interrupted (SIGINT)"


def stop_exit_status() -> int:
    """The shell's status for the stopping signal: 143 (128 + SIGTERM) or 130 (128 + SIGINT)."""
    return 128 + (signal.SIGTERM if _received == signal.SIGTERM else signal.SIGINT)


def terminated() -> bool:
    """True once SIGTERM arrived inside ``sigterm_as_interrupt()``."""
    return _received == signal.SIGTERM


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received == signal.SIGTERM:
        return  # already stopping: a second SIGTERM must not cut the cleanup short
    _received = signum
    request_stop(signum)
    log.warning("SIGTERM received: stopping as for Ctrl-C")
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)  # raises KeyboardInterrupt (and e.g. stops the embed workers first)
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread through the SIGINT
    handler in force; outside (and in other threads, where handlers cannot be set) nothing changes."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_deferred(what: str) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are held back (logged, naming ``what`` is finished
    first) and delivered to the handlers in force before it as soon as it ends, so the stop
    they ask for (KeyboardInterrupt, or the default end of the process) comes right after,
    never in the middle. A second signal does not wait (a save stuck on a hung disk must not
    make the job unstoppable): KeyboardInterrupt at once. Keep the block short: it delays
    Ctrl-C. In other threads (where handlers cannot be set), nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if held:  # asked again: stop now, in the middle if need be
            log.warning("%s received again while %s: stopping now", name, what)
            raise KeyboardInterrupt
        log.warning("%s received while %s: stopping once it is done (send it again to stop at once)", name, what)
        held.append(signum)

    previous: dict[int, Callable | int | None] = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(held):  # each signal once, in the order they came
            signal.raise_signal(signum)  # the handler now in force runs here (KeyboardInterrupt is raised)
