"""Index files written so that a failed write names the file and, on a full disk, says so.

numpy reports a short write as ``OSError: 57536 requested and 2016 written`` and ScaNN's
serializer as ``RuntimeError: Failed to extract SingleMachineFactoryOptions: I/O error``:
neither names the file nor the cause, and ScaNN's is not even an OSError, so a reindex
run took a full disk for a failing candidate model. These wrappers raise an OSError with
the path, and ``errno.ENOSPC`` ("No space left on device") when the file system holding
it is (nearly) full after the failure.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# A failed write leaves less than this free on its file system: taken as a full disk.
FULL_BELOW_BYTES = 1 << 20


def write_failure(path: Path, error: BaseException) -> OSError:
    """An OSError naming ``path`` for a write that failed with ``error``: ENOSPC when the
    file system of ``path`` has less than FULL_BELOW_BYTES free, else EIO."""
    if isinstance(error, OSError) and error.errno is not None:  # the cause is known: only the path was missing
        return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))
    folder = path if path.is_dir() else path.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < FULL_BELOW_BYTES:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free; {error})", str(path))
    return OSError(errno.EIO, f"writing failed: {type(error).__name__}: {error}", str(path))


@contextmanager
def failures_named(path: Path, *, runtime_errors: bool = False) -> Iterator[None]:
    """Within the block, an OSError that names no file (and, with ``runtime_errors``, a
    RuntimeError: ScaNN's) becomes ``write_failure(path, error)``; one that names its file
    (open() failed) stays as it is."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and e.filename is not None:
            raise
        raise write_failure(path, e) from e
    except RuntimeError as e:
        if not runtime_errors:
            raise
        raise write_failure(path, e) from e


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save(path, array)``; a failed write raises ``write_failure``."""
    with failures_named(path):
        np.save(path, array)


def save_searcher(searcher: Any, folder: Path) -> None:
    """Serialize a ScaNN searcher into ``folder`` (created), its assets relative to it; a
    failed write raises ``write_failure``."""
    with failures_named(folder, runtime_errors=True):  # ScaNN: RuntimeError "... I/O error"
        folder.mkdir(parents=True)
        searcher.serialize(str(folder), True)  # relative asset paths; positional: the raw pybind object takes no keywords
