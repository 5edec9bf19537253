"""Retrieval metrics of an embedding on labelled items, and the same-item threshold.

Precision@1 (leave-one-out nearest neighbour has the same label) and Recall@K as in
Musgrave et al. 2020; the distance threshold that best separates similar from
dissimilar pairs (max F1) is stored with the model so the server can flag
near-duplicates.
"""

from __future__ import annotations

import numpy as np


def pairwise_sq_distances(emb: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, N] squared L2 distances."""
    sq = np.sum(emb * emb, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T, 0.0)


def retrieval_metrics(emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Leave-one-out Precision@1 and Recall@K of [N, D] embeddings with [N] labels."""
    if len(emb) < 2:
        raise ValueError(f"need at least 2 embeddings for retrieval metrics, got {len(emb)}")
    d = pairwise_sq_distances(emb.astype(np.float64))
    np.fill_diagonal(d, np.inf)
    kmax = min(max(ks), len(emb) - 1)
    nearest = np.argsort(d, axis=1)[:, :kmax]
    hits = labels[nearest] == labels[:, None]
    out = {"precision_at_1": float(hits[:, 0].mean())}
    for k in ks:
        out[f"recall_at_{k}"] = float(hits[:, : min(k, kmax)].any(axis=1).mean())
    return out


def best_f1_threshold(emb: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Distance threshold maximising F1 of 'same class' over all pairs -> (threshold, f1)."""
    d = np.sqrt(pairwise_sq_distances(emb.astype(np.float64)))
    iu = np.triu_indices(len(emb), k=1)
    dist = d[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    order = np.argsort(dist)
    dist, same = dist[order], same[order]
    tp = np.cumsum(same)
    fp = np.cumsum(~same)
    fn = same.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = int(np.argmax(f1))
    upper = dist[best + 1] if best + 1 < len(dist) else dist[best]
    return float((dist[best] + upper) / 2.0), float(f1[best])
