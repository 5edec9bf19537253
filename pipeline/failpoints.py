"""Fault injection for crash tests: ``LOOKALIKE_FAILPOINT=<name>`` SIGKILLs the process there.

Used by tests to prove that a run killed at any step (reindex) or after any inference
batch (embed) leaves the store consistent and that the next run resumes. Without the
variable, ``failpoint`` does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def failpoint(name: str) -> None:
    """SIGKILL this process if ``LOOKALIKE_FAILPOINT`` equals ``name`` (SIGTERM if it equals
    ``name:SIGTERM``: a polite stop, as by ``kill`` or a service manager)."""
    wanted = os.environ.get("LOOKALIKE_FAILPOINT")
    if wanted in (name, f"{name}:SIGTERM"):
        log.warning("failpoint %s: killing this process", wanted)
        os.kill(os.getpid(), signal.SIGTERM if wanted.endswith(":SIGTERM") else signal.SIGKILL)
