"""Retrieval metrics of an embedding on labelled items, and the same-item threshold.

Leave-one-out retrieval as in Musgrave et al. 2020 ("A Metric Learning Reality
Check"), each item a query against all others: Precision@1 (the nearest neighbour has
the query's label), Recall@K (one of the K nearest has it), R-Precision (the fraction
of the R nearest that have it, R = number of other items with the label) and MAP@R
(``(1/R) sum_{i<=R} P(i) rel(i)``). Items alone in their class are not queries for
R-Precision and MAP@R. The distance threshold that best separates similar from
dissimilar pairs (max F1) is stored with the model so the server can flag
near-duplicates.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def json_ready(value: Any) -> Any:
    """``value`` with every NaN or infinite float (a metric with no evidence, e.g. MAP@R
    when every class has one item) turned into None: JSON has no NaN, and strict parsers
    (JavaScript's JSON.parse, Go, Rust) refuse Python's ``NaN``."""
    if isinstance(value, float) or isinstance(value, np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def pairwise_sq_distances(emb: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, N] squared L2 distances."""
    sq = np.sum(emb * emb, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T, 0.0)


def retrieval_metrics(emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Leave-one-out Precision@1, Recall@K, R-Precision and MAP@R of [N, D] embeddings
    with [N] labels (O(N^2) memory: meant for validation sets of a few thousand)."""
    if len(emb) < 2:
        raise ValueError(f"need at least 2 embeddings for retrieval metrics, got {len(emb)}")
    labels = np.asarray(labels)
    d = pairwise_sq_distances(emb.astype(np.float64))
    np.fill_diagonal(d, np.inf)
    counts = np.unique(labels, return_inverse=True, return_counts=True)
    r = counts[2][counts[1]] - 1  # [N] other items with the query's label
    kmax = min(max(max(ks), int(r.max())), len(emb) - 1)
    nearest = np.argsort(d, axis=1, kind="stable")[:, :kmax]
    hits = labels[nearest] == labels[:, None]
    out = {"precision_at_1": float(hits[:, 0].mean())}
    for k in ks:
        out[f"recall_at_{k}"] = float(hits[:, : min(k, kmax)].any(axis=1).mean())
    out.update(r_precision_and_map_at_r(hits, r))
    return out


def r_precision_and_map_at_r(hits: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """[Q, M] ranked relevance (M >= max R) and [Q] R per query -> R-Precision, MAP@R
    averaged over queries with R >= 1 (NaN when there are none)."""
    queries = r > 0
    if not queries.any():
        return {"r_precision": float("nan"), "map_at_r": float("nan")}
    hits, r = hits[queries].astype(np.float64), r[queries]
    rank = np.arange(1, hits.shape[1] + 1)
    within = rank[None, :] <= r[:, None]
    rel = hits * within
    precision_at_i = np.cumsum(rel, axis=1) / rank[None, :]
    return {
        "r_precision": float(np.mean(rel.sum(axis=1) / r)),
        "map_at_r": float(np.mean((precision_at_i * rel).sum(axis=1) / r)),
    }


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
