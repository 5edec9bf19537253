"""Where training runs: a data-parallel mesh over every local device (CPU, GPU or TPU;
several simulated CPUs with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``), the
model and optimizer replicated on it, and embedding with the in-training model split the
same way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lookalike.model.encoder import EncoderModule


def data_mesh() -> Mesh:
    """A 1-D mesh named ``data`` over every local device (CPU, GPU or TPU).

    Auto axis type: XLA decides the layout of the in-batch [B, B] distance matrix of
    the triplet losses (an all-gather of the [B, D] embeddings)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(mesh: Mesh, *modules: nnx.Module) -> None:
    """Place every variable of ``modules`` on all devices of ``mesh``."""
    state = nnx.state(modules)
    nnx.update(modules, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))


def embed_numpy(model: EncoderModule, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """[N, H, W, C] -> [N, embed_dim] with the in-training model. A model replicated over
    several devices (``replicate``) embeds data-parallel: each batch is split over them."""
    forward = nnx.jit(lambda m, x: m(x))
    devices = jax.tree_util.tree_leaves(nnx.state(model))[0].sharding.device_set
    split = None
    if len(devices) > 1:
        split = NamedSharding(Mesh(np.asarray(sorted(devices, key=lambda d: d.id)), ("data",)), PartitionSpec("data"))
        batch = -(-batch // len(devices)) * len(devices)
    out = []
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.float32)])
        x = jax.device_put(padded, split) if split is not None else jnp.asarray(padded)
        out.append(np.asarray(forward(model, x))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.out.out_features), np.float32)
