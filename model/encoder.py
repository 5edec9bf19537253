"""The Siamese tower: a small conv net whose L2-normalised output is the embedding.

Both images of a pair go through the same module (shared weights); the distance of
their embeddings is what the contrastive loss trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lookalike.model.config import TrainConfig


class ConvEncoder(nnx.Module):
    """[N, H, W, C] float32 images in [0, 1] -> [N, embed_dim] unit-norm embeddings."""

    def __init__(self, config: TrainConfig, *, rngs: nnx.Rngs):
        self.convs = nnx.List()
        in_ch = config.channels
        for width in config.conv_widths:
            self.convs.append(nnx.Conv(in_ch, width, kernel_size=(3, 3), rngs=rngs))
            in_ch = width
        side = config.image_size
        for _ in config.conv_widths:
            side = max(1, side // 2)
        self.hidden = nnx.Linear(side * side * in_ch, config.hidden_dim, rngs=rngs)
        self.out = nnx.Linear(config.hidden_dim, config.embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = (x - 0.5) * 2.0
        for conv in self.convs:
            x = nnx.relu(conv(x))
            x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.hidden(x))
        return l2_normalize(self.out(x))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay finite)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def create_encoder(config: TrainConfig, seed: int | None = None) -> ConvEncoder:
    return ConvEncoder(config, rngs=nnx.Rngs(config.seed if seed is None else seed))
