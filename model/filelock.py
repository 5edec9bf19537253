"""An exclusive, non-blocking OS file lock (``flock``) that the kernel releases when its
holder dies, shared by the store lock (``lookalike.model.store_lock``) and the training-run
lock (``lookalike.model.checkpoints.exclusive_run``). A releasing holder unlinks the file
while still holding it, so a new holder checks that the file it locked is still the one at
the path, and otherwise locks the new one."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def try_lock(path: Path) -> int | None:
    """Open ``path`` (created if needed) and lock it: its descriptor, or None when another
    live process holds it. Release with ``unlock``."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # unlinked by a holder that just released it: lock the new file
    raise RuntimeError(f"could not lock {path}: it kept being replaced")


def unlock(path: Path, fd: int) -> None:
    """Remove ``path`` (if still there) while holding it, then release the lock."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def try_lock_folder(path: Path) -> int | None:
    """Lock the existing folder ``path`` itself (``flock`` on its descriptor): the descriptor,
    or None when another live process holds it. Release with ``os.close``; the kernel releases
    it when the holder dies, so a folder whose lock can be taken has no live writer."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
