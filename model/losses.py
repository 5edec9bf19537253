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


# --- In-batch triplet mining over a batch of embeddings with labels ------------------
# Every function below takes [B, D] embeddings and [B] integer labels (a P x K batch
# from ``PKSampler``) and returns a scalar mean loss; items whose label has no other
# member in the batch simply contribute no triplet.

_EPS = 1e-12


def pairwise_distances(emb: jax.Array) -> jax.Array:
    """[B, D] -> [B, B] Euclidean distances, gradient-safe at 0 (diagonal is ~0)."""
    sq = jnp.sum(emb * emb, axis=-1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T, 0.0)
    return jnp.sqrt(d2 + _EPS)


def _masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B] labels -> (positive [B, B]: same label, not self; negative [B, B]: other label)."""
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(labels.shape[0], dtype=bool)
    return same & ~eye, ~same


def batch_all_triplet_loss(emb: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
    """Mean of ``max(D(a,p) - D(a,n) + margin, 0)`` over the valid triplets whose loss is
    positive (Hermans et al. 2017 "batch all"); 0 when no triplet is positive."""
    dist = pairwise_distances(emb)
    pos, neg = _masks(labels)
    loss = jnp.maximum(dist[:, :, None] - dist[:, None, :] + margin, 0.0)  # [a, p, n]
    valid = pos[:, :, None] & neg[:, None, :]
    loss = jnp.where(valid, loss, 0.0)
    n_positive = jnp.sum((loss > 1e-16).astype(loss.dtype))
    return jnp.sum(loss) / jnp.maximum(n_positive, 1.0)


def batch_hard_triplet_loss(emb: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
    """Per anchor: its farthest positive and nearest negative (Hermans et al. 2017
    "batch hard"); mean over anchors that have both."""
    dist = jax.lax.stop_gradient(pairwise_distances(emb))
    pos, neg = _masks(labels)
    hard_p = jnp.argmax(jnp.where(pos, dist, -jnp.inf), axis=1)
    hard_n = jnp.argmin(jnp.where(neg, dist, jnp.inf), axis=1)
    valid = (pos.any(axis=1) & neg.any(axis=1)).astype(emb.dtype)
    loss = optax.losses.triplet_margin_loss(emb, emb[hard_p], emb[hard_n], margin=margin, eps=_EPS)
    return jnp.sum(loss * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def semi_hard_triplet_loss(emb: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
    """FaceNet semi-hard mining (Schroff et al. 2015): for every (anchor, positive) pair
    the nearest negative that is farther than the positive but within the margin,
    ``D(a,p) < D(a,n) < D(a,p) + margin``; where none exists, the hardest (nearest)
    negative. Mean over all (anchor, positive) pairs whose anchor has a negative."""
    b = emb.shape[0]
    dist = jax.lax.stop_gradient(pairwise_distances(emb))
    pos, neg = _masks(labels)
    d_ap = dist[:, :, None]  # [a, p, 1]
    d_an = dist[:, None, :]  # [a, 1, n]
    semi = neg[:, None, :] & (d_an > d_ap) & (d_an < d_ap + margin)  # [a, p, n]
    semi_n = jnp.argmin(jnp.where(semi, d_an, jnp.inf), axis=2)  # [a, p]
    hard_n = jnp.argmin(jnp.where(neg, dist, jnp.inf), axis=1)  # [a]
    chosen = jnp.where(semi.any(axis=2), semi_n, hard_n[:, None])  # [a, p]
    valid = (pos & neg.any(axis=1)[:, None]).reshape(-1).astype(emb.dtype)
    anchors = jnp.repeat(emb, b, axis=0)  # row a*b + p
    positives = jnp.tile(emb, (b, 1))
    negatives = emb[chosen.reshape(-1)]
    loss = optax.losses.triplet_margin_loss(anchors, positives, negatives, margin=margin, eps=_EPS)
    return jnp.sum(loss * valid) / jnp.maximum(jnp.sum(valid), 1.0)


MINING = {
    "batch_all": batch_all_triplet_loss,
    "batch_hard": batch_hard_triplet_loss,
    "semi_hard": semi_hard_triplet_loss,
}


def mined_triplet_loss(emb: jax.Array, labels: jax.Array, margin: float, mining: str) -> jax.Array:
    """Dispatch on ``mining`` (one of ``MINING``); ValueError names the choices."""
    try:
        fn = MINING[mining]
    except KeyError:
        raise ValueError(f"unknown triplet mining {mining!r}; choose one of {sorted(MINING)}") from None
    return fn(emb, labels, margin)
