"""One writer at a time per store: ``DIR/.reindex.lock``, held with an OS file lock.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the lock file, so taking it is atomic and the
kernel releases it when the holder dies (even by SIGKILL): no two live processes can hold
it, and no stale-lock guesswork (pid checks, ages, check-then-unlink) is needed. The file
holds the owner's host, pid and start time for messages; a holder checks after locking that
the file it locked is still the one at the path (a releasing owner unlinks it), else it
tries again. Content left in the file by an owner that did not release it (it died) sets
``took_over_stale``, so the caller can clean up what the dead run left.

Reindex, ``lookalike versions promote|rollback``, an ``embed`` that publishes (so also
``demo``) and the library's publishing calls (``index.manifest.publish_atomically`` with
``make_current``: ``build_and_publish``, ``ItemIndex.publish``) take it; local stores only
(flock does not reach across hosts on network file systems). It lives beside ``Store``
(``lookalike.model.store``), which both the index and the pipeline packages use.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from lookalike.model.filelock import try_lock, unlock

log = logging.getLogger(__name__)

LOCK_NAME = ".reindex.lock"


class LockHeldError(RuntimeError):
    """Another live run holds the store's lock."""


def describe_holder(owner: dict) -> str:
    """What the holder of a lock wrote into it (``{"purpose", "pid", "host", "started_unix_s"}``),
    in words: only what it recorded, never a guess. A holder that recorded nothing (another
    tool's ``flock``, or a run in the instant between locking and writing) is said to be so."""
    if owner.get("unreadable"):
        return "held by another process whose details cannot be read"
    purpose, pid, host, started = (owner.get(k) for k in ("purpose", "pid", "host", "started_unix_s"))
    parts = [str(purpose)] if purpose else []
    if pid is not None:
        parts.append(f"pid {pid}" + (f" on {host}" if host else ""))
    elif host:
        parts.append(f"on {host}")
    if isinstance(started, (int, float)) and not isinstance(started, bool):
        parts.append(f"started {time.ctime(started)}")
    return ", ".join(parts) if parts else "held by another process that recorded no details"


class StoreLock:
    """Context manager: ``with StoreLock(root) as lock: ...``; ``lock.took_over_stale`` says
    whether a dead run's lock was taken over."""

    def __init__(self, root: Path, purpose: str = "reindex"):
        self.path = Path(root) / LOCK_NAME
        self.purpose = purpose
        self.took_over_stale = False
        self._fd: int | None = None

    def _owner(self, fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0)
            owner = json.loads(data.decode("utf-8")) if data.strip() else {}
        except (OSError, ValueError):
            return {"unreadable": True}
        return owner if isinstance(owner, dict) else {"unreadable": True}

    def acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = try_lock(self.path)
        if fd is None:
            try:
                held = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                owner = {}
            else:
                owner = self._owner(held)
                os.close(held)
            raise LockHeldError(f"another run holds {self.path} ({describe_holder(owner)}): "
                                "try again when it has finished")
        owner = self._owner(fd)
        if owner:
            self.took_over_stale = True
            log.warning("taking over the lock %s left by a run that died: %s", self.path, owner)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_unix_s": time.time(), "purpose": self.purpose}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        unlock(self.path, fd)  # while still locked: a waiter re-checks the path's inode

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
