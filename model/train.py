"""Training: contrastive pairs or mined triplets, AdamW, one jitted step, data-parallel.

``train_and_evaluate(config, workdir)`` reads ``workdir/corpus/<label>/*`` (or
``data_dir``, a TFDS split, or images and videos without labels: ``model.sources``),
trains the Siamese encoder, evaluates it on a held-out split,
calibrates the same-item distance threshold, and saves the artifact under
``workdir/models/<version>`` with ``LATEST`` pointing at it. The step is
data-parallel over every local device (a 1-D ``data`` mesh): batches are sharded,
parameters replicated, XLA inserts the gradient all-reduce. Batches are built on a
background thread (``Prefetcher``) from a generator seeded by (seed, step); the
training state is checkpointed under ``models/.runs/<run-id>/`` so rerunning the same
training after a kill resumes it, and the published weights are the best ones by
validation MAP@R.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lookalike.model.artifact import read_model_meta, save_model
from lookalike.model.augment import augment_batch
from lookalike.model.config import TrainConfig, config_to_dict, validate_config
from lookalike.model.checkpoints import TrainCheckpoints, exclusive_run
from lookalike.model.data import LabelledImages, PairSampler, PKSampler, split_train_val
from lookalike.model.encoder import EncoderModule, create_encoder
from lookalike.model.held_out import HELD_OUT_FILE, write_held_out
from lookalike.model.losses import contrastive_pair_loss, mined_triplet_loss
from lookalike.model.memory import keep_freed_memory
from lookalike.model.metrics import best_f1_threshold, json_ready, retrieval_metrics
from lookalike.model.mining_memory import check_triplet_memory
from lookalike.model.prefetch import Prefetcher
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.progress import Progress, last_value_note
from lookalike.model.sharding import data_mesh, embed_numpy, replicate
from lookalike.model.sources import load_training_data
from lookalike.model.training_inputs import METRIC_KEY as TRAINING_INPUTS_KEY
from lookalike.model.training_inputs import model_trained_from, training_inputs_sha256
from lookalike.model.runs import (JOB_FILE, NOT_THE_JOB, checkpoint_steps, job_config, record_job, run_id, start_afresh_if_inputs_changed,
                                  warn_of_stopped_runs)
from lookalike.model.store import Store
from lookalike.model.unlabelled import training_augment, view_holdout

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    version: str
    model_dir: Path
    metrics: dict[str, Any]
    reused: bool = False  # an identical earlier training's model (``reuse_identical``), not trained again


def make_optimizer(model: EncoderModule, config: TrainConfig) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=max(1, min(config.warmup_steps, config.num_steps - 1)),
        decay_steps=max(2, config.num_steps),
        end_value=config.learning_rate * 0.05,
    )
    return nnx.Optimizer(model, optax.adamw(schedule, weight_decay=config.weight_decay), wrt=nnx.Param)


@nnx.jit
def train_step(model: EncoderModule, optimizer: nnx.Optimizer, x_a: jax.Array, x_b: jax.Array, similar: jax.Array, margin: jax.Array) -> jax.Array:
    """One contrastive step on [B, H, W, C] pair sides and [B] labels; returns the mean loss."""

    def loss_fn(model: EncoderModule) -> jax.Array:
        emb = model(jnp.concatenate([x_a, x_b], axis=0))
        emb_a, emb_b = jnp.split(emb, 2, axis=0)
        return contrastive_pair_loss(emb_a, emb_b, similar, margin).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit(static_argnames=("mining",))
def triplet_train_step(model: EncoderModule, optimizer: nnx.Optimizer, x: jax.Array, labels: jax.Array, margin: jax.Array, mining: str) -> jax.Array:
    """One triplet step on a [B, H, W, C] P x K batch with [B] labels, mining in-batch."""

    def loss_fn(model: EncoderModule) -> jax.Array:
        return mined_triplet_loss(model(x), labels, margin, mining)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


BEST_METRIC = "map_at_r"
# A checkpoint at least this often besides every ``checkpoint_every_steps`` (default: every
# evaluation): a ResNet on a CPU takes minutes per evaluation interval, and a run killed
# before its first checkpoint starts over.
CHECKPOINT_EVERY_S = 300.0


def batch_maker(
    config: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, mesh: Mesh, class_names: list[str] | None = None
) -> tuple[Callable[[int], tuple[jax.Array, ...]], Callable[..., jax.Array], int]:
    """-> (make_batch(step) -> device arrays, step_fn(model, optimizer, *batch), images per step).

    ``make_batch`` is a pure function of (config.seed, step) and runs on the prefetch
    thread; the batch is sharded over the ``data`` axis of ``mesh``. With
    ``config.unlabelled`` the labels are instances, usually of one image: its K copies
    (or both sides of a similar pair) become different augmented views."""
    n_dev = mesh.devices.size
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    margin = jnp.float32(config.margin)

    def rng_for(step: int) -> np.random.Generator:
        return np.random.default_rng([config.seed, step])

    augment = training_augment(config)
    min_images = 1 if config.unlabelled else 2

    def images_at(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return augment_batch(x_train[idx], augment, rng) if augment.enabled else x_train[idx]

    if config.loss == "triplet":
        sampler = PKSampler(y_train, config.pk_classes, config.pk_images, seed=config.seed, min_images=min_images,
                            class_names=class_names)
        per_class = sampler.per_class
        while (sampler.num_classes * per_class) % n_dev:
            per_class += 1
        if per_class != sampler.per_class:
            log.info("K raised from %d to %d images per class so the batch splits over %d devices",
                     sampler.per_class, per_class, n_dev)
        sampler.per_class = per_class

        def make_triplet_batch(step: int) -> tuple[jax.Array, ...]:
            rng = rng_for(step)
            idx, labels = sampler.sample(rng)
            return jax.device_put(images_at(idx, rng), sharding), jax.device_put(labels, sharding)

        def triplet_fn(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, labels: jax.Array) -> jax.Array:
            return triplet_train_step(model, optimizer, x, labels, margin, config.mining)

        return make_triplet_batch, triplet_fn, sampler.batch_size

    pairs = PairSampler(y_train, seed=config.seed, min_images=min_images)
    batch_pairs = -(-config.batch_pairs // (2 * n_dev)) * 2 * n_dev
    if batch_pairs != config.batch_pairs:  # said, as the triplet path says its K (metrics record the batch used)
        log.info("batch_pairs raised from %d to %d so the batch (half similar pairs) splits over %d devices",
                 config.batch_pairs, batch_pairs, n_dev)

    def make_pair_batch(step: int) -> tuple[jax.Array, ...]:
        rng = rng_for(step)
        ia, ib, sim = pairs.sample(batch_pairs, rng)
        return (jax.device_put(images_at(ia, rng), sharding), jax.device_put(images_at(ib, rng), sharding),
                jax.device_put(sim, sharding))

    def pair_fn(model: nnx.Module, optimizer: nnx.Optimizer, x_a: jax.Array, x_b: jax.Array, sim: jax.Array) -> jax.Array:
        return train_step(model, optimizer, x_a, x_b, sim, margin)

    return make_pair_batch, pair_fn, 2 * batch_pairs


def evaluate(model: EncoderModule, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return retrieval_metrics(embed_numpy(model, images), labels)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "precision_at_1" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", label="train loss", marker="o" if len(steps) < 3 else None)  # a lone point shows
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in evals], [h["precision_at_1"] for h in evals], "o-", color="tab:orange", label="precision@1")
        if all("map_at_r" in h for h in evals):
            ax2.plot([h["step"] for h in evals], [h["map_at_r"] for h in evals], "s--", color="tab:green", label="MAP@R")
        ax2.set_ylabel("validation metric")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.set_title("lookalike training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def warm_start(model: EncoderModule, config: TrainConfig, init_from: Path) -> bool:
    """Copy the parameters of the model at ``init_from`` into ``model`` if the shapes match."""
    from lookalike.model.artifact import load_model
    from lookalike.model.config import config_from_dict

    previous, meta = load_model(init_from)
    old = config_from_dict(meta["config"])
    shape_fields = ("architecture", "image_size", "channels", "conv_widths", "hidden_dim", "resnet_widths",
                    "resnet_blocks", "embed_dim")
    same_shape = all(getattr(old, f) == getattr(config, f) for f in shape_fields)
    if not same_shape:
        log.warning("not warm-starting from %s: its architecture differs from this config", meta["version"])
        return False
    nnx.update(model, nnx.state(previous))
    log.info("warm start from model %s", meta["version"])
    return True


def train_on_arrays(
    config: TrainConfig, data: LabelledImages, run_dir: Path, init_from: Path | None = None
) -> tuple[EncoderModule, dict[str, Any], float | None]:
    """Train on in-memory labelled images (optionally starting from the model at
    ``init_from``); return (model, metrics, same-item threshold).

    Checkpoints go to ``run_dir/checkpoints``; if one is there already the run resumes
    after its step. The returned model has the best validation MAP@R seen."""
    validate_config(config)
    if config.unlabelled:  # validation: retrieve augmented views of held-out instances
        train_idx, val_idx, x_val, y_val = view_holdout(data, config)
    else:
        train_idx, val_idx = split_train_val(data.labels, config.val_fraction, config.seed)
        x_val, y_val = data.images[val_idx], data.labels[val_idx]
    x_train, y_train = data.images[train_idx], data.labels[train_idx]
    validating = can_validate(y_val, config.val_fraction)
    mesh = data_mesh()
    make_batch, step_fn, images_per_step = batch_maker(config, x_train, y_train, mesh, data.class_names)
    check_triplet_memory(config, images_per_step, mesh)
    log.info(
        "training on %d images of %d %s (%d held out), %d device(s), %s loss, %d images/step, %d steps",
        len(train_idx), len(data.class_names) or len(np.unique(data.labels)),  # names are optional: count labels
        "instances" if config.unlabelled else "classes", len(val_idx),
        mesh.devices.size, config.loss, images_per_step, config.num_steps,
    )
    model = create_encoder(config)
    warm = warm_start(model, config, init_from) if init_from else False
    optimizer = make_optimizer(model, config)
    replicate(mesh, model, optimizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = TrainCheckpoints(run_dir, BEST_METRIC)
    try:
        start_step, history = checkpoints.restore_latest(model, optimizer)
        ckpt_every = config.checkpoint_every_steps or config.eval_every_steps
        log_path = run_dir / "train_log.jsonl"
        progress = Progress("train", total=config.num_steps, unit="steps", logger=log, already=start_step)
        loop_started, timed_steps, side_s = time.perf_counter(), 0, 0.0
        deadline = loop_started + 60.0 * config.max_train_minutes if config.max_train_minutes > 0 else None
        last_step, last_saved = start_step, time.perf_counter()
        with log_path.open("w", encoding="utf-8") as log_file, \
                Prefetcher(make_batch, range(start_step + 1, config.num_steps + 1), config.prefetch_batches) as batches:
            for record in history:
                log_file.write(json.dumps(json_ready(record)) + "\n")
            running = []  # side_s: evaluation and checkpoint time, not part of the training throughput
            for step, batch in batches:
                if step == start_step + 1:
                    log.info("compiling the training step (once per run%s)",
                             "; a ResNet can take minutes on a CPU" if config.architecture == "resnet" else "")
                running.append(step_fn(model, optimizer, *batch))
                last = step == config.num_steps or (deadline is not None and time.perf_counter() >= deadline)
                if step == start_step + 1:  # exclude compilation from the throughput and the ETA
                    jax.block_until_ready(running[-1])
                    loop_started, timed_steps = time.perf_counter(), 0
                    progress.restart_rate(step)
                timed_steps += 1
                if len(running) >= 2:  # at most one step ahead of the device: progress counts steps done, not queued
                    jax.block_until_ready(running[-2])
                evaluating = validating and (step % config.eval_every_steps == 0 or last)
                checkpointing = step % ckpt_every == 0 or last or time.perf_counter() - last_saved >= CHECKPOINT_EVERY_S
                if evaluating or checkpointing:
                    jax.block_until_ready(running[-1])  # the step itself counts as training time
                side_started = time.perf_counter()
                record: dict[str, Any] = {}
                if step % config.log_every_steps == 0 or last:
                    record = {"step": step, "loss": float(np.mean(jax.device_get(running)))}
                    running = []
                    if not np.isfinite(record["loss"]):
                        raise FloatingPointError(f"training diverged at step {step}: loss {record['loss']}")
                if evaluating:
                    record.update({"step": step, **evaluate(model, x_val, y_val)})
                    checkpoints.offer_best(step, model, record)
                if record:
                    history.append(record)
                    log_file.write(json.dumps(json_ready(record)) + "\n")
                    log_file.flush()
                if checkpointing:
                    checkpoints.save(step, model, optimizer, history)
                    last_saved = time.perf_counter()
                    _failpoint(f"train.after_checkpoint.{step}")
                if evaluating or checkpointing:
                    side_s += time.perf_counter() - side_started
                if not last:  # the last step's line is progress.done()'s
                    progress.update(step, extra=last_value_note(history, "loss", step))
                else:
                    progress.count = step
                last_step = step
                if last:
                    if step < config.num_steps:
                        log.warning("time budget of %g min used up (compiling the step included): training stops at "
                                    "step %d of %d", config.max_train_minutes, step, config.num_steps)
                    break
        progress.done(", ".join(note for note in (last_value_note(history, "loss", last_step),
                                                   "stopped by the time budget" if last_step < config.num_steps else "")
                                if note))
        loop_s = time.perf_counter() - loop_started - side_s
        plot_history(history, run_dir / "training.png")
        metrics: dict[str, Any] = {"train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
                                   "steps": last_step, "planned_steps": config.num_steps, "warm_start": warm, "resumed_from_step": start_step,
                                   "images_per_step": images_per_step, "devices": int(mesh.devices.size),
                                   "images_per_s": round(images_per_step * max(timed_steps - 1, 0) / max(loop_s, 1e-9), 1)}
        if config.unlabelled:
            metrics["val_views"] = int(len(y_val))
        best = checkpoints.best_step()
        if best is not None and best != last_step:
            checkpoints.restore_best(model)
            log.info("publishing the weights of step %d (best validation %s %.4f)", best, BEST_METRIC, checkpoints.best_value)
        metrics["best_step"] = best if best is not None else last_step
    finally:
        checkpoints.close()  # orbax's threads would otherwise hold the process after an error
    threshold = None
    if validating:
        val_emb = embed_numpy(model, x_val)
        metrics.update(retrieval_metrics(val_emb, y_val))
        threshold, f1 = best_f1_threshold(val_emb, y_val)
        metrics["same_item_f1"] = f1
    metrics["final_loss"] = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    return model, metrics, threshold


def can_validate(y_val: np.ndarray, val_fraction: float | None = None) -> bool:
    """Whether held-out items with labels ``y_val`` can measure retrieval: at least two
    classes, one of them with two items; else metrics and the same-item threshold would
    be computed on one class (perfect scores, a threshold that flags everything) and are
    left out, with a warning (naming ``val_fraction`` when it is 0: nothing is held out)."""
    classes, counts = np.unique(y_val, return_counts=True)
    if len(classes) >= 2 and (counts >= 2).any():
        return True
    if val_fraction == 0:
        log.warning("val_fraction=0: no images are held out, so no validation metrics, best-step choice or same-item "
                    "threshold (search results report same_item as null); leave val_fraction above 0 to get them")
        return False
    log.warning("validation holds %d image(s) of %d class(es) (classes of 3 or fewer images train only): no validation "
                "metrics, best-step choice or same-item threshold; add images to more classes", len(y_val), len(classes))
    return False


def _failpoint(name: str) -> None:
    from lookalike.pipeline.failpoints import failpoint

    failpoint(name)


def train_and_evaluate(
    config: TrainConfig, workdir: str | Path, data_dir: str | Path | None = None, init_from: str | Path | None = None,
    tfds: str | None = None, tfds_data_dir: str | None = None, set_latest: bool = True,
    exclude: Collection[str] = (), reuse_identical: bool = False, by_reindex: bool = False,
) -> TrainResult:
    """Train on ``data_dir`` (default ``workdir/corpus``) or on the TFDS split ``tfds``
    (``NAME[:SPLIT]``, prepared in ``tfds_data_dir``), optionally warm-started from the
    model folder ``init_from``, and save the model; ``set_latest``: make it the store's
    LATEST (the model ``embed`` uses by default; the reindex job does that only once the
    model is promoted). ``config.unlabelled`` (switched on for a TFDS data set without
    labels) trains on augmented views. ``exclude``: ``data_dir``-relative paths left out of
    training (the reindex job's held-out evaluation images). ``reuse_identical``: when a saved
    model was trained from exactly these inputs (``lookalike.model.training_inputs``), return it
    without training. ``by_reindex``: the reindex job's training, recorded in its run folder
    (its checkpoints go once the model it warm-started from no longer serves)."""
    if tfds and data_dir:
        raise ValueError(f"train on a folder ({data_dir}) or a TFDS data set ({tfds}), not both")
    validate_config(config)  # before the images are decoded
    keep_freed_memory()
    store = Store.at(workdir)
    started = time.perf_counter()
    loaded = load_training_data(config, Path(data_dir) if data_dir else store.corpus_dir, tfds, tfds_data_dir, exclude)
    config, data = loaded.config, loaded.data
    spec = PreprocessSpec(image_size=config.image_size, channels=config.channels)
    init_path = Path(init_from) if init_from else None
    warm_version = read_model_meta(init_path)["version"] if init_path else None
    inputs_sha256 = training_inputs_sha256(config, data, warm_version)
    if reuse_identical and (done := model_trained_from(store.models_dir, inputs_sha256)) is not None:
        log.info("model %s was trained from exactly these inputs (config, %d images and labels, warm start): reused, "
                 "not trained again", done, len(data.labels))
        return TrainResult(version=done, model_dir=store.model_dir(done),
                           metrics=read_model_meta(store.model_dir(done)).get("metrics") or {}, reused=True)
    run_dir = store.models_dir / ".runs" / run_id(config, loaded.source, init_path, exclude)
    try:
        with exclusive_run(run_dir):
            # the job's inputs (a time cap or log interval is no other data: the checkpoints resume)
            start_afresh_if_inputs_changed(run_dir, training_inputs_sha256(job_config(config), data, warm_version))
            job = config_to_dict(config)
            if not (run_dir / JOB_FILE).exists():  # a new job, not a resumed one: say which stopped ones it leaves
                warn_of_stopped_runs(run_dir.parent, run_dir, job, loaded.source, ignore=NOT_THE_JOB)
            record_job(run_dir, job, loaded.source, warm_version if by_reindex else None)
            try:
                model, metrics, threshold = train_on_arrays(config, data, run_dir, init_path)
            except BaseException as e:
                steps = checkpoint_steps(run_dir)
                if run_dir.is_dir() and not steps:
                    shutil.rmtree(run_dir, ignore_errors=True)  # nothing to resume from: leave no empty run behind
                if isinstance(e, KeyboardInterrupt):
                    log.warning("training interrupted: %s", f"rerun the same command to resume from the checkpoint of "
                                f"step {steps[-1]} ({run_dir})" if steps else "no checkpoint was written yet, so a rerun "
                                "starts again")
                raise
            metrics["train_seconds"] = round(time.perf_counter() - started, 2)
            metrics["data_dir"] = loaded.source
            metrics["skipped_files"] = len(data.failures)
            metrics["training_files"], metrics["held_out_files"] = len(data.paths), len(exclude)
            metrics[TRAINING_INPUTS_KEY] = inputs_sha256
            extra = {"train_log.jsonl": run_dir / "train_log.jsonl", "training.png": run_dir / "training.png"}
            if not tfds and not config.unlabelled:  # the files it never saw, for reindex's evaluation set
                extra[HELD_OUT_FILE] = write_held_out(run_dir / HELD_OUT_FILE, loaded.source, data, config, exclude,
                                                      store_root=store.root,
                                                      warm_started_from=init_path if metrics.get("warm_start") else None)
            version = save_model(model, config, spec, store.models_dir, threshold=threshold, metrics=metrics,
                                 extra_files=extra)
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        try:
            run_dir.parent.rmdir()  # models/.runs, when no other run is in progress
        except OSError:
            pass
    if set_latest:
        store.set_latest_model(version)
    log.info("model %s saved (%s); metrics %s", version, store.model_dir(version), json.dumps(metrics))
    return TrainResult(version=version, model_dir=store.model_dir(version), metrics=metrics)


__all__ = ["TrainResult", "train_and_evaluate", "train_on_arrays", "train_step", "triplet_train_step", "make_optimizer",
           "batch_maker", "data_mesh", "embed_numpy", "replicate",
           "config_to_dict", "run_id"]
