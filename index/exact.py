"""Exact top-k by inner product, blocked so the full score matrix never exists.

The ground truth for autotuning and evaluation, and the reference the benchmark
compares brute force against. Scores are computed one corpus block at a time (a BLAS
matmul) and merged into a running top-k with ``argpartition``, so memory is
O(Q * (block + k)) rather than O(Q * N).
"""

from __future__ import annotations

import numpy as np


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int, *, block_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """[Q, D] x [N, D] -> (rows [Q, k'] int64, scores [Q, k'] float32), best first; k' = min(k, N)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    x = np.asarray(corpus, dtype=np.float32)
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"exact_topk needs [Q, D] queries and [N, D] corpus, got {q.shape} and {x.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, len(x))
    best_rows = np.empty((len(q), 0), np.int64)
    best_scores = np.empty((len(q), 0), np.float32)
    for start in range(0, len(x), block_rows):
        scores = q @ x[start:start + block_rows].T
        rows = np.arange(start, start + scores.shape[1], dtype=np.int64)
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(rows, (len(q), len(rows)))], axis=1)
        if scores.shape[1] > k:
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            scores = np.take_along_axis(scores, part, axis=1)
            rows = np.take_along_axis(rows, part, axis=1)
        best_rows, best_scores = rows, scores
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, axis=1), np.take_along_axis(best_scores, order, axis=1)


def recall_at_k(found_rows: np.ndarray, true_rows: np.ndarray) -> float:
    """Mean fraction of the true top-k rows ([Q, k]) present among the found rows ([Q, >=k]; -1 = none)."""
    if len(true_rows) == 0:
        raise ValueError("recall_at_k needs at least one query")
    k = true_rows.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found_rows[:, :k], true_rows))
    return hits / (k * len(true_rows))
