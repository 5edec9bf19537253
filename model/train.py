"""Training: balanced pairs, contrastive loss, AdamW, one jitted step, data-parallel.

``train_and_evaluate(config, workdir)`` reads ``workdir/corpus/<label>/*`` (or
``data_dir``), trains the Siamese encoder, evaluates it on a held-out split,
calibrates the same-item distance threshold, and saves the artifact under
``workdir/models/<version>`` with ``LATEST`` pointing at it. The step is
data-parallel over every local device (a 1-D ``data`` mesh): batches are sharded,
parameters replicated, XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lookalike.model.artifact import save_model
from lookalike.model.config import TrainConfig, config_to_dict
from lookalike.model.data import LabelledImages, PairSampler, load_labelled_folder, split_train_val
from lookalike.model.encoder import ConvEncoder, create_encoder
from lookalike.model.losses import contrastive_pair_loss
from lookalike.model.metrics import best_f1_threshold, retrieval_metrics
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.progress import Progress
from lookalike.model.store import Store

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    version: str
    model_dir: Path
    metrics: dict[str, Any]


def make_optimizer(model: ConvEncoder, config: TrainConfig) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=max(1, min(config.warmup_steps, config.num_steps - 1)),
        decay_steps=max(2, config.num_steps),
        end_value=config.learning_rate * 0.05,
    )
    return nnx.Optimizer(model, optax.adamw(schedule, weight_decay=config.weight_decay), wrt=nnx.Param)


@nnx.jit
def train_step(model: ConvEncoder, optimizer: nnx.Optimizer, x_a: jax.Array, x_b: jax.Array, similar: jax.Array, margin: jax.Array) -> jax.Array:
    """One contrastive step on [B, H, W, C] pair sides and [B] labels; returns the mean loss."""

    def loss_fn(model: ConvEncoder) -> jax.Array:
        emb = model(jnp.concatenate([x_a, x_b], axis=0))
        emb_a, emb_b = jnp.split(emb, 2, axis=0)
        return contrastive_pair_loss(emb_a, emb_b, similar, margin).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def data_mesh() -> Mesh:
    """A 1-D mesh named ``data`` over every local device (CPU, GPU or TPU)."""
    return jax.make_mesh((jax.device_count(),), ("data",))


def replicate(mesh: Mesh, *modules: nnx.Module) -> None:
    """Place every variable of ``modules`` on all devices of ``mesh``."""
    state = nnx.state(modules)
    nnx.update(modules, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))


def embed_numpy(model: ConvEncoder, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """[N, H, W, C] -> [N, embed_dim] with the in-training model."""
    forward = nnx.jit(lambda m, x: m(x))
    out = []
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        pad = np.zeros((batch - len(chunk), *chunk.shape[1:]), np.float32)
        out.append(np.asarray(forward(model, jnp.asarray(np.concatenate([chunk, pad]))))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.out.out_features), np.float32)


def evaluate(model: ConvEncoder, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return retrieval_metrics(embed_numpy(model, images), labels)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "precision_at_1" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in evals], [h["precision_at_1"] for h in evals], "o-", color="tab:orange", label="val precision@1")
        ax2.set_ylabel("validation precision@1", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title("lookalike training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def warm_start(model: ConvEncoder, config: TrainConfig, init_from: Path) -> bool:
    """Copy the parameters of the model at ``init_from`` into ``model`` if the shapes match."""
    from lookalike.model.artifact import load_model
    from lookalike.model.config import config_from_dict

    previous, meta = load_model(init_from)
    old = config_from_dict(meta["config"])
    same_shape = (old.image_size, old.channels, old.conv_widths, old.hidden_dim, old.embed_dim) == (
        config.image_size, config.channels, config.conv_widths, config.hidden_dim, config.embed_dim)
    if not same_shape:
        log.warning("not warm-starting from %s: its architecture differs from this config", meta["version"])
        return False
    nnx.update(model, nnx.state(previous))
    log.info("warm start from model %s", meta["version"])
    return True


def train_on_arrays(
    config: TrainConfig, data: LabelledImages, run_dir: Path, init_from: Path | None = None
) -> tuple[ConvEncoder, dict[str, Any], float | None]:
    """Train on in-memory labelled images (optionally starting from the model at
    ``init_from``); return (model, metrics, same-item threshold)."""
    train_idx, val_idx = split_train_val(data.labels, config.val_fraction, config.seed)
    x_train, y_train = data.images[train_idx], data.labels[train_idx]
    x_val, y_val = data.images[val_idx], data.labels[val_idx]
    mesh = data_mesh()
    n_dev = mesh.devices.size
    batch_pairs = -(-config.batch_pairs // (2 * n_dev)) * 2 * n_dev
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    log.info(
        "training on %d images of %d classes (%d held out), %d device(s), %d pairs/step, %d steps",
        len(train_idx), len(data.class_names), len(val_idx), n_dev, batch_pairs, config.num_steps,
    )
    model = create_encoder(config)
    warm = warm_start(model, config, init_from) if init_from else False
    optimizer = make_optimizer(model, config)
    replicate(mesh, model, optimizer)
    sampler = PairSampler(y_train, seed=config.seed)
    margin = jnp.float32(config.margin)
    history: list[dict[str, Any]] = []
    log_path = run_dir / "train_log.jsonl"
    progress = Progress("train", total=config.num_steps, unit="steps", logger=log)
    with log_path.open("w", encoding="utf-8") as log_file:
        running = []
        for step in range(1, config.num_steps + 1):
            ia, ib, sim = sampler.sample(batch_pairs)
            loss = train_step(
                model, optimizer,
                jax.device_put(x_train[ia], batch_sharding),
                jax.device_put(x_train[ib], batch_sharding),
                jax.device_put(sim, batch_sharding),
                margin,
            )
            running.append(loss)
            record: dict[str, Any] = {}
            if step % config.log_every_steps == 0 or step == config.num_steps:
                record = {"step": step, "loss": float(np.mean(jax.device_get(running)))}
                running = []
                if not np.isfinite(record["loss"]):
                    raise FloatingPointError(f"training diverged at step {step}: loss {record['loss']}")
            if len(val_idx) > 1 and (step % config.eval_every_steps == 0 or step == config.num_steps):
                record.update({"step": step, **evaluate(model, x_val, y_val)})
            if record:
                history.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            progress.update(step, extra=f"loss {history[-1]['loss']:.4f}" if history and "loss" in history[-1] else "")
    progress.done()
    plot_history(history, run_dir / "training.png")
    metrics: dict[str, Any] = {"train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
                               "steps": config.num_steps, "warm_start": warm}
    threshold = None
    if len(val_idx) > 1:
        val_emb = embed_numpy(model, x_val)
        metrics.update(retrieval_metrics(val_emb, y_val))
        threshold, f1 = best_f1_threshold(val_emb, y_val)
        metrics["same_item_f1"] = f1
    metrics["final_loss"] = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    return model, metrics, threshold


def train_and_evaluate(
    config: TrainConfig, workdir: str | Path, data_dir: str | Path | None = None, init_from: str | Path | None = None
) -> TrainResult:
    """Train on ``data_dir`` (default ``workdir/corpus``), optionally warm-started from the
    model folder ``init_from``, and publish the model as LATEST."""
    store = Store.at(workdir)
    source = Path(data_dir) if data_dir else store.corpus_dir
    spec = PreprocessSpec(image_size=config.image_size, channels=config.channels)
    started = time.perf_counter()
    data = load_labelled_folder(source, spec)
    if data.failures:
        log.warning("%d unreadable file(s) skipped in %s", len(data.failures), source)
    store.models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store.models_dir, prefix=".run-") as run:
        run_dir = Path(run)
        model, metrics, threshold = train_on_arrays(config, data, run_dir, Path(init_from) if init_from else None)
        metrics["train_seconds"] = round(time.perf_counter() - started, 2)
        metrics["data_dir"] = str(source)
        metrics["skipped_files"] = len(data.failures)
        version = save_model(
            model, config, spec, store.models_dir,
            threshold=threshold, metrics=metrics,
            extra_files={"train_log.jsonl": run_dir / "train_log.jsonl", "training.png": run_dir / "training.png"},
        )
    store.set_latest_model(version)
    log.info("model %s saved (%s); metrics %s", version, store.model_dir(version), json.dumps(metrics))
    return TrainResult(version=version, model_dir=store.model_dir(version), metrics=metrics)


__all__ = ["TrainResult", "train_and_evaluate", "train_on_arrays", "train_step", "make_optimizer", "config_to_dict"]
