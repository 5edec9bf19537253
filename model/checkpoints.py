"""Training checkpoints: resume after a kill, keep the best model by validation metric.

A run folder holds two orbax ``CheckpointManager`` trees::

    <run_dir>/checkpoints/latest/<step>/   model + optimizer state + history (1 kept)
    <run_dir>/checkpoints/best/<step>/     model state of the best validation metric (1 kept)

``TrainCheckpoints.restore_latest`` puts the saved state back into the live (possibly
sharded) modules and returns the step to continue after and the metrics history so
far. Batches are a pure function of (seed, step), so a resumed run trains on the same
batches an uninterrupted one would have.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lookalike.model.filelock import try_lock, unlock
from lookalike.model.store_lock import LockHeldError

log = logging.getLogger(__name__)


class RunInUseError(LockHeldError):
    """Another process is training in the same run folder (a lock held: the CLI's exit 75, try later)."""


def error_summary(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters (its type if it has
    none): orbax and TensorStore errors run to many lines of details."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


@contextmanager
def exclusive_run(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` while a training run uses ``run_dir`` (created if needed): two
    runs of the same job (same config, data and workdir) would write the same checkpoints.
    An ``flock``, so the kernel releases it when the holder dies: a killed run never blocks
    the rerun."""
    lock_path = run_dir / ".lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = try_lock(lock_path)
    if fd is None:
        raise RunInUseError(f"another training is using {run_dir} (the same config and data in this workdir); "
                            "wait for it to finish, or change the config (e.g. --set seed=1)")
    try:
        yield
    finally:
        unlock(lock_path, fd)  # already gone if the run folder was removed


def _saving(what: str):
    """Ctrl-C and SIGTERM wait for the end of a save: raised in the main thread while orbax
    waits for its save thread, the KeyboardInterrupt made orbax log "Save Finalize thread
    failed" with a traceback and forget a checkpoint its thread still finished writing. Held
    back, they stop the run a moment later with the checkpoint complete (a resume uses it)."""
    from lookalike.pipeline.interrupts import interrupts_deferred

    return interrupts_deferred(f"the {what} is being saved")


def _abstract(state: Any) -> Any:
    """Shape, dtype and sharding of every array of ``state`` (the restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class TrainCheckpoints:
    """Latest and best training state under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, best_metric: str):
        root = Path(run_dir).absolute() / "checkpoints"
        self.best_metric = best_metric
        self._latest = ocp.CheckpointManager(root / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        self._best = ocp.CheckpointManager(root / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        best_step = self._best.latest_step()
        self.best_value: float | None = None
        if best_step is not None:
            try:
                meta = self._best.restore(best_step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                self.best_value = float(meta["value"])
            except Exception as e:  # a corrupt or truncated checkpoint: dropped, never the end of training
                self._drop(self._best, best_step, "best model", e)

    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, history: list[dict[str, Any]]) -> None:
        """Save the latest state at ``step`` (what a resumed run continues from). Ctrl-C or
        SIGTERM during the save stops the run right after it (see ``_saving``)."""
        with _saving(f"checkpoint of step {step}"):
            self._latest.save(step, args=ocp.args.Composite(
                model=ocp.args.StandardSave(nnx.state(model)),
                optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
                meta=ocp.args.JsonSave({"step": step, "history": history}),
            ))
            self._latest.wait_until_finished()

    def offer_best(self, step: int, model: nnx.Module, record: dict[str, Any]) -> bool:
        """Save the model as the best if ``record`` (the evaluation of ``step``) has a finite
        metric at least as good as the best so far; called at every evaluation, whether or
        not the step is also checkpointed. -> whether it was saved."""
        value = record.get(self.best_metric)
        # NaN (e.g. MAP@R of a validation split with one item per class) is no evidence.
        if value is None or not math.isfinite(value) or (self.best_value is not None and value < self.best_value):
            return False
        self.best_value = float(value)
        with _saving(f"best model of step {step}"):
            if step in self._best.all_steps():  # a resumed run evaluating a step again (past its latest checkpoint)
                self._best.delete(step)
            self._best.save(step, args=ocp.args.Composite(
                model=ocp.args.StandardSave(nnx.state(model)),
                meta=ocp.args.JsonSave({"step": step, "value": float(value), "metric": self.best_metric}),
            ), force=True)
            self._best.wait_until_finished()
        return True

    def restore_latest(self, model: nnx.Module, optimizer: nnx.Optimizer) -> tuple[int, list[dict[str, Any]]]:
        """Load the newest state into ``model`` and ``optimizer``; -> (step, history), (0, []) if none."""
        step = self._latest.latest_step()
        if step is None:
            return 0, []
        try:
            restored = self._latest.restore(step, args=ocp.args.Composite(
                model=ocp.args.StandardRestore(_abstract(nnx.state(model))),
                optimizer=ocp.args.StandardRestore(_abstract(nnx.state(optimizer))),
                meta=ocp.args.JsonRestore(),
            ))
            resumed = int(restored["meta"]["step"]), list(restored["meta"]["history"])
        except Exception as e:  # a corrupt or truncated checkpoint (disk full, a copy cut short): start afresh
            self._drop(self._latest, step, "checkpoint", e)
            return 0, []
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        log.info("resumed training from the checkpoint of step %d", step)
        return resumed

    @staticmethod
    def _drop(manager: ocp.CheckpointManager, step: int, what: str, error: Exception) -> None:
        """Delete the unreadable ``what`` of ``step``, saying which and why (one line, no traceback)."""
        folder = Path(manager.directory) / str(step)
        reason = error_summary(error)
        log.warning("the %s of step %d in %s cannot be read (%s): deleted, training goes on without it", what, step,
                    folder, reason)
        try:
            manager.delete(step)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
        manager.reload()

    def best_step(self) -> int | None:
        return self._best.latest_step()

    def restore_best(self, model: nnx.Module) -> int | None:
        """Load the best state into ``model``; -> its step (None if there is none)."""
        step = self._best.latest_step()
        if step is None:
            return None
        restored = self._best.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(nnx.state(model))),
        ))
        nnx.update(model, restored["model"])
        return step

    def close(self) -> None:
        """Wait for any save still being written and stop orbax's threads."""
        with _saving("closing the checkpoints"):
            self._latest.close()
            self._best.close()
