"""One reindex run at a time per store: an exclusive lock file with stale-lock detection.

``DIR/.reindex.lock`` is created with O_EXCL and holds the owner's host, pid and start
time. A lock whose process no longer exists on this host (killed, even with SIGKILL),
or that is older than ``stale_after_s``, is stale: it is removed and taken over, and
the caller is told so it can clean up what the dead run left.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".reindex.lock"


class LockHeldError(RuntimeError):
    """Another live run holds the store's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Context manager: ``with StoreLock(root) as lock: ...``; ``lock.took_over_stale`` says
    whether a dead run's lock was replaced."""

    def __init__(self, root: Path, stale_after_s: float = 24 * 3600):
        self.path = Path(root) / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.took_over_stale = False

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def _is_stale(self, owner: dict) -> bool:
        if not owner:
            return True  # unreadable or half-written lock: its writer died mid-write
        if time.time() - float(owner.get("started_unix_s", 0)) > self.stale_after_s:
            return True
        return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))

    def acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_unix_s": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if not self._is_stale(owner):
                    raise LockHeldError(
                        f"another reindex run holds {self.path} (pid {owner.get('pid')} on {owner.get('host')}, "
                        f"started {time.ctime(owner.get('started_unix_s', 0))})"
                    ) from None
                log.warning("removing stale lock %s left by %s", self.path, owner or "an unreadable owner")
                self.path.unlink(missing_ok=True)
                self.took_over_stale = True
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            return self
        raise LockHeldError(f"could not take {self.path}: another run raced for it")

    def release(self) -> None:
        if self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
