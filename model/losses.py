"""Metric-learning losses on embedding distances.

Contrastive (Hadsell, Chopra & LeCun 2006), as our users learned it::

    L = Y * D^2 + (1 - Y) * max(margin - D, 0)^2      Y = 1 for a similar pair

Triplet (FaceNet): ``max(D(a, p) - D(a, n) + margin, 0)``, from optax.
All functions return per-example losses; callers take the mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """[N, D], [N, D] -> [N] squared L2 distances."""
    diff = a - b
    return jnp.sum(diff * diff, axis=-1)


def contrastive_loss_from_squared(sq_dist: jax.Array, similar: jax.Array, margin: float) -> jax.Array:
    """Contrastive loss given squared distances (stable gradient at D = 0)."""
    dist = jnp.sqrt(jnp.maximum(sq_dist, 1e-12))
    similar = similar.astype(sq_dist.dtype)
    return similar * sq_dist + (1.0 - similar) * jnp.square(jnp.maximum(margin - dist, 0.0))


def contrastive_loss(distances: jax.Array, similar: jax.Array, margin: float) -> jax.Array:
    """[N] distances D, [N] labels Y (1 similar, 0 dissimilar) -> [N] losses."""
    return contrastive_loss_from_squared(jnp.square(distances), similar, margin)


def contrastive_pair_loss(emb_a: jax.Array, emb_b: jax.Array, similar: jax.Array, margin: float) -> jax.Array:
    """[N, D] embeddings of both sides of N pairs, [N] labels -> [N] losses."""
    return contrastive_loss_from_squared(squared_distances(emb_a, emb_b), similar, margin)


def triplet_loss(anchors: jax.Array, positives: jax.Array, negatives: jax.Array, margin: float) -> jax.Array:
    """[N, D] x 3 -> [N] triplet losses ``max(D(a,p) - D(a,n) + margin, 0)``."""
    return optax.losses.triplet_margin_loss(anchors, positives, negatives, margin=margin, eps=1e-12)
