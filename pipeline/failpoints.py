"""Fault injection for crash tests: ``LOOKALIKE_FAILPOINT=<name>`` SIGKILLs the process there
(``<name>:SIGTERM`` sends SIGTERM); ``LOOKALIKE_FAILPOINT=<name>:wait`` makes it wait there
(logged), for a test to interrupt it.

Used by tests to prove that a run killed at any step (reindex) or after any inference
batch (embed) leaves the store consistent and that the next run resumes, and that Ctrl-C
in the middle of a run stops it cleanly. Without the variable, ``failpoint`` does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)


def failpoint(name: str) -> None:
    """SIGKILL this process if ``LOOKALIKE_FAILPOINT`` equals ``name`` (SIGTERM if it equals
    ``name:SIGTERM``: a polite stop, as by ``kill`` or a service manager); wait forever if it
    equals ``name:wait``."""
    wanted = os.environ.get("LOOKALIKE_FAILPOINT")
    if wanted in (name, f"{name}:SIGTERM"):
        log.warning("failpoint %s: killing this process", wanted)
        os.kill(os.getpid(), signal.SIGTERM if wanted.endswith(":SIGTERM") else signal.SIGKILL)
    elif wanted == f"{name}:wait":
        log.warning("failpoint %s: waiting", name)
        while True:
            time.sleep(1)
