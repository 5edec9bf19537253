"""Trainings stopped with other settings are named, not silently left behind.

A training's checkpoints live in ``models/.runs/<run id>/``, the id a hash of the job (config,
data, warm start, held-out files: ``lookalike.model.train.run_id``). A stopped training is
resumed by the same command; a rerun with another setting (``--set num_steps=300`` after a
stop at 400) is another job and starts from step 0. That is right, but without a word the
user thinks the earlier work resumed, and the stopped run's checkpoints stay on disk for good.
Each run folder records its job (``job.json``); a new training of the same data logs which
stopped runs it does not resume, their step, size and the settings that differ.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from lookalike.model.store import atomic_write_text

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
MAX_DIFFERENCES_SHOWN = 4


def record_job(run_dir: Path, config: dict[str, Any], source: str) -> None:
    """Write ``run_dir/job.json``: the config (``config_to_dict``) and data ``source`` of its job."""
    atomic_write_text(run_dir / JOB_FILE, json.dumps({"config": config, "source": source}, sort_keys=True) + "\n")


def _checkpoint_step(run_dir: Path) -> int | None:
    steps = [int(p.name) for p in (run_dir / "checkpoints" / "latest").glob("[0-9]*") if p.name.isdigit()]
    return max(steps) if steps else None


def _size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _differences(ours: dict[str, Any], theirs: dict[str, Any], ignore: Collection[str]) -> list[str]:
    keys = sorted((set(ours) | set(theirs)) - set(ignore))
    return [f"{key} {theirs.get(key)!r} (now {ours.get(key)!r})" for key in keys if ours.get(key) != theirs.get(key)]


def stopped_runs_of(runs_dir: Path, run_dir: Path, config: dict[str, Any], source: str,
                    ignore: Collection[str] = ()) -> list[str]:
    """One description per other run folder in ``runs_dir`` that holds a checkpoint of a
    training of the same ``source``: its folder, step, size and the settings that differ
    (those in ``ignore`` left out)."""
    found = []
    for other in sorted(p for p in runs_dir.glob("run-*") if p.is_dir() and p != run_dir):
        try:
            job = json.loads((other / JOB_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a run from before jobs were recorded, or one starting right now
        step = _checkpoint_step(other)
        if job.get("source") != source or step is None:
            continue
        differ = _differences(config, job.get("config") or {}, ignore)
        shown = "; ".join(differ[:MAX_DIFFERENCES_SHOWN]) + ("; ..." if len(differ) > MAX_DIFFERENCES_SHOWN else "")
        found.append(f"{other} (step {step}, {_size_bytes(other) / 1e6:.1f} MB; other settings: {shown or 'held-out files or warm start'})")
    return found


def warn_of_stopped_runs(runs_dir: Path, run_dir: Path, config: dict[str, Any], source: str,
                         ignore: Collection[str] = ()) -> None:
    """Log a warning naming the stopped trainings of ``source`` this one does not resume."""
    try:
        found = stopped_runs_of(runs_dir, run_dir, config, source, ignore)
    except OSError as e:  # a look around, never a reason to fail the training
        log.debug("stopped runs in %s not looked at: %s", runs_dir, e)
        return
    if found:
        log.warning("not resumed: %d stopped training(s) of this data with other settings, kept for their own command "
                    "to resume (remove the folder to free the space): %s", len(found), "; ".join(found))


__all__ = ["JOB_FILE", "record_job", "stopped_runs_of", "warn_of_stopped_runs"]
