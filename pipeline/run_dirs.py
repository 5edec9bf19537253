"""An embed run's folder (``DIR/embeddings/<run>``) before its pipeline starts and after it fails.

A run claims its folder and holds an OS lock on it for its lifetime, so no other run writes
there; what it writes before the pipeline starts (the corpus listing, the dead letters of
files it could not list or name: ``PRE_RUN_FILES``) is worth nothing on its own, so a run
killed that early leaves a folder the next run may take over, and a failed run that wrote
nothing else removes its folder so its name can be used again.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lookalike.model.filelock import try_lock_folder
from lookalike.model.store import REINDEX_RUN_MARK
from lookalike.pipeline.sources import bad_name_letter, dead_letter
from lookalike.pipeline.summary import EmbedError
from lookalike.pipeline.writers import write_jsonl

log = logging.getLogger(__name__)

RESERVED_RUN_NAMES = ("cache",)  # embeddings/cache holds the embedding cache (``pipeline.cache``)
LISTING_FILE_NAME = ".listing.arrow"  # the files to read, in the run folder while the pipeline runs
UNCHANGED_FILE_NAME = ".unchanged.arrow"  # --incremental: the files not read (path, source hash), likewise
# What a run writes before its pipeline starts: the listing, and the dead letters of files it
# could not list, name or (``--incremental``) knows to fail. A run that fails or is killed
# before writing anything else leaves nothing worth keeping: the next run writes them again.
PRE_RUN_FILES = frozenset({LISTING_FILE_NAME, UNCHANGED_FILE_NAME, "dead_letter-unlisted.jsonl", "dead_letter-misnamed.jsonl",
                           "dead_letter-unread.jsonl", REINDEX_RUN_MARK})



def holds_only_a_listing(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but what a run writes before its pipeline starts (its
    corpus listing, ``PRE_RUN_FILES``), or nothing: what a run killed before any output leaves."""
    try:
        return all(p.name in PRE_RUN_FILES for p in run_dir.iterdir())
    except OSError:
        return False


def claim_run_dir(run_dir: Path) -> int:
    """Create ``run_dir`` (or take over the folder a killed run left, holding only its listing)
    and lock it for this run's lifetime (``filelock.try_lock_folder``; the kernel releases the
    lock of a killed run): the descriptor to close when the run ends. EmbedError when a live
    run holds the folder."""
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = try_lock_folder(run_dir)
    if fd is None:
        raise EmbedError(f"embedding run {run_dir} is being written by another running embed; choose another --run-name")
    if existed:
        if not holds_only_a_listing(run_dir):  # written meanwhile by a run that has ended since
            os.close(fd)
            raise EmbedError(f"embedding run {run_dir} already exists; choose another --run-name")
        for name in PRE_RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        log.info("reusing the folder of embedding run %s: a killed run left nothing there but its corpus listing", run_dir)
    return fd


def remove_if_unused(run_dir: Path) -> bool:
    """Remove the folder of a failed run that wrote nothing worth keeping (nothing, or only
    what it writes before its pipeline starts: ``PRE_RUN_FILES``), so its name can be used
    again; True if removed. A run that wrote a summary (with its dead letters) or embedding
    shards keeps them for the user to read. (The embedding cache, which lets ``--incremental``
    resume after a crash, is not in here.)"""
    try:
        kept = [p.name for p in run_dir.iterdir() if p.name not in PRE_RUN_FILES]
    except OSError:
        return False
    if kept:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("removed the folder of the failed run %s: it holds no output", run_dir)
    return not run_dir.exists()


def report_unlisted(errors: list[OSError], run_dir: Path) -> None:
    """Folders of the corpus that could not be listed: a warning each, and a dead letter each
    (stage "list", the folder as its uri), so the run reports them among its failures."""
    letters = [dead_letter(str(e.filename), "list", f"{type(e).__name__}: {e}") for e in errors]
    for letter in letters:
        log.warning("cannot list corpus folder %s (%s): its files are left out", letter["uri"], letter["reason"])
    write_jsonl(run_dir / "dead_letter-unlisted.jsonl", letters)


def report_misnamed(paths: list[str], run_dir: Path) -> None:
    """Files whose names are not UTF-8: a warning and a dead letter each (stage "list")."""
    letters = [bad_name_letter(path) for path in paths]
    log.warning("%d file(s) left out: their names are not valid UTF-8 (e.g. %s); rename them to UTF-8 (convmv) to "
                "embed them", len(letters), letters[0]["uri"])
    write_jsonl(run_dir / "dead_letter-misnamed.jsonl", letters)
