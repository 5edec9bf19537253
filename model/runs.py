"""A training job's run folder (``models/.runs/<run id>/``): its name, what it records, and
when its checkpoints are resumed, started afresh or named as left behind.

The id is a hash of the job (config, data, warm start, held-out files), so rerunning the same
command after a kill finds its checkpoints; settings that change how a training runs, not what
it trains (``NOT_THE_JOB``: a time cap added to a slow training), do not count. Checkpoints of
other data (files changed since) start again from step 0. A rerun with another setting
(``--set num_steps=300`` after a stop at 400) is another job and starts from step 0: each run
folder records its job (``job.json``), and a new training of the same data names the stopped
runs it does not resume, their step, size and the settings that differ, rather than leave the
user to think the earlier work resumed while its checkpoints stay on disk for good.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from lookalike.model.config import TrainConfig, config_to_dict
from lookalike.model.filelock import try_lock, unlock
from lookalike.model.store import atomic_write_text

log = logging.getLogger(__name__)

# Settings that change how a training runs, not what it trains: a rerun changing them (a time
# cap added to a slow training that was stopped) resumes the same job. Hashed at their
# defaults, so a job that never set them keeps the name it had before they were left out.
NOT_THE_JOB = ("max_train_minutes", "log_every_steps", "checkpoint_every_steps", "prefetch_batches")


def job_config(config: TrainConfig) -> TrainConfig:
    """``config`` with the ``NOT_THE_JOB`` fields at their defaults: what names the job and what its
    checkpoints' inputs are compared by."""
    return replace(config, **{name: getattr(TrainConfig(), name) for name in NOT_THE_JOB})


def run_id(config: TrainConfig, source: str | Path, init_from: Path | None, exclude: Collection[str] = ()) -> str:
    """A stable name for one training job: the same job rerun after a kill finds its checkpoints.

    ``source``: a folder, or a string naming any other source (e.g. a TFDS split);
    ``exclude``: the files held out of it (another held-out set is another job). The fields
    in ``NOT_THE_JOB`` do not count."""
    where = source if isinstance(source, str) else str(Path(source).absolute())
    job = job_config(config)
    key = json.dumps({"config": config_to_dict(job), "source": where,
                      "init_from": str(init_from) if init_from else None,
                      **({"exclude": sorted(exclude)} if exclude else {})}, sort_keys=True)
    return "run-" + hashlib.sha256(key.encode()).hexdigest()[:12]


RUN_INPUTS_FILE = "training_inputs.sha256"  # in a run folder: what its checkpoints were trained on


def start_afresh_if_inputs_changed(run_dir: Path, inputs_sha256: str) -> None:
    """A run folder's checkpoints are resumed only by a training of the same inputs: when the
    data changed since they were written (files added, edited or removed; same config and
    folder, so the same run id), they are removed with a warning and training starts from
    step 0, so the saved model is what its recorded ``training_inputs_sha256`` says."""
    recorded = run_dir / RUN_INPUTS_FILE
    try:
        before = recorded.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        before = None  # a new run, or one written before inputs were recorded: resumed as it is
    if before is not None and before != inputs_sha256 and (run_dir / "checkpoints").exists():
        log.warning("the training data changed since the checkpoints in %s were written (files added, edited or "
                    "removed): training starts again from step 0", run_dir)
        for leftover in run_dir.iterdir():
            if leftover.name not in (".lock", RUN_INPUTS_FILE):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    atomic_write_text(recorded, inputs_sha256 + "\n")


JOB_FILE = "job.json"
REINDEX_WARM_START = "reindex_warm_start"  # in job.json: a reindex training and the model it warm-starts from
MAX_DIFFERENCES_SHOWN = 4


def record_job(run_dir: Path, config: dict[str, Any], source: str, reindex_warm_start: str | None = None) -> None:
    """Write ``run_dir/job.json``: the config (``config_to_dict``) and data ``source`` of its job;
    for the reindex job's training, the version of the served model it warm-starts from
    (``reindex_warm_start``)."""
    job = {"config": config, "source": source,
           **({REINDEX_WARM_START: reindex_warm_start} if reindex_warm_start else {})}
    atomic_write_text(run_dir / JOB_FILE, json.dumps(job, sort_keys=True) + "\n")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints in ``run_dir``, oldest first."""
    return sorted(int(p.name) for p in (run_dir / "checkpoints" / "latest").glob("[0-9]*") if p.name.isdigit())


def _in_progress(run_dir: Path) -> bool:
    """Whether a live training holds ``run_dir``'s lock (``checkpoints.exclusive_run``)."""
    try:
        fd = os.open(run_dir / ".lock", os.O_RDWR)
    except OSError:
        return False  # no lock file: nobody has it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


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
        steps = checkpoint_steps(other)
        if job.get("source") != source or not steps or _in_progress(other):
            continue
        step = steps[-1]
        differ = _differences(config, job.get("config") or {}, ignore)
        shown = "; ".join(differ[:MAX_DIFFERENCES_SHOWN]) + ("; ..." if len(differ) > MAX_DIFFERENCES_SHOWN else "")
        found.append(f"{other} (step {step}, {_size_bytes(other) / 1e6:.1f} MB; other settings: {shown or 'held-out files or warm start'})")
    return found


def remove_unresumable_reindex_runs(runs_dir: Path, served_model: str) -> list[Path]:
    """Remove the run folders in ``runs_dir`` of reindex trainings (``job.json``'s
    ``REINDEX_WARM_START``) warm-started from another model than ``served_model``: reindex
    warm-starts from the served model only, so once another serves no run can resume them.
    Each is removed holding its lock, never one in progress; runs of ``lookalike train`` or
    of ``train_and_evaluate`` called otherwise are never touched. Returns those removed."""
    removed = []
    for run in sorted(runs_dir.glob("run-*")) if runs_dir.is_dir() else []:
        try:
            job = json.loads((run / JOB_FILE).read_text(encoding="utf-8"))
            warm = job.get(REINDEX_WARM_START) if isinstance(job, dict) else None
            if not isinstance(warm, str) or warm == served_model:
                continue
            fd = try_lock(run / ".lock")  # held while removing: no training starts in it meanwhile
        except (OSError, ValueError):
            continue
        if fd is None:  # in progress
            continue
        try:
            shutil.rmtree(run, ignore_errors=True)
        finally:
            unlock(run / ".lock", fd)
        if not run.exists():
            removed.append(run)
    return removed


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


__all__ = ["JOB_FILE", "NOT_THE_JOB", "RUN_INPUTS_FILE", "checkpoint_steps", "job_config", "record_job", "run_id", "start_afresh_if_inputs_changed",
           "remove_unresumable_reindex_runs",
           "stopped_runs_of", "warn_of_stopped_runs"]
