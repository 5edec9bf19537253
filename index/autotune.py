"""Choose the query-time ScaNN knobs that meet a recall target at the highest throughput.

Recall@k is measured against exact search (``lookalike.index.exact``) on held-out
queries: queries the caller provides, or a seeded sample of the corpus where each
query's own item is removed from both the exact and the approximate result (so the
sample behaves like unseen queries). A candidate meets the target when its recall minus
one standard error (over the queries) does.

Tuning is cheap because it uses monotonicity instead of timing everything: searching
more leaves, or reordering more AH candidates, only adds candidates, so recall never
drops. ``tree_exact`` has one knob: the smallest ``leaves_to_search`` that meets the
target is the fastest, found by doubling then bisecting (recall only, no timing). ``ah``
likewise bisects the reorder count. ``tree_ah`` bisects the smallest reorder for each
``leaves_to_search`` on a x1.5 ladder and times only those candidates, stopping once more
leaves get slower. Brute force is exact. If nothing meets the target, the candidate with
the highest recall is kept and flagged. Explicit ``leaves_to_search`` / ``reorder`` in
``IndexOptions`` are kept fixed. A one-item corpus tuned on its own sample has no
held-out neighbour to measure: tuning is skipped, every leaf is searched (exact), and the
record says so (``skipped``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.index.exact import exact_topk, recall_per_query
from lookalike.index.manifest import REORDER_MODES, TREE_MODES

if TYPE_CHECKING:
    from lookalike.index.builder import IndexOptions
    from lookalike.index.searcher import ItemIndex

log = logging.getLogger(__name__)


def ladder(lo: int, hi: int, factor: float = 1.5) -> list[int]:
    """lo, ~1.5 lo, ~2.25 lo, ... then hi: distinct integers, all <= hi."""
    out, v = [], float(max(1, lo))
    while round(v) < hi:
        if not out or round(v) > out[-1]:
            out.append(int(round(v)))
        v *= factor
    return out + [hi]


def held_out_queries(index: "ItemIndex", num_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries [Q, D], their corpus rows [Q]) sampled without replacement."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(index), size=min(num_queries, len(index)), replace=False))
    return index.embeddings[rows], rows


def drop_self(rows: np.ndarray, self_rows: np.ndarray | None, k: int) -> np.ndarray:
    """Remove each query's own row from its [Q, k+1] result (else its last entry) -> [Q, k]."""
    if self_rows is None:
        return rows[:, :k]
    keep = rows != self_rows[:, None]
    keep[keep.all(axis=1), -1] = False
    return rows[keep].reshape(len(rows), -1)[:, :k]


def recall_of(index: "ItemIndex", queries: np.ndarray, truth: np.ndarray, self_rows: np.ndarray | None, k: int,
              leaves: int | None, reorder: int | None) -> dict[str, Any]:
    """Recall@k (mean and standard error over the [Q] queries) of one configuration."""
    rows, _ = index.search_rows(queries, k + (0 if self_rows is None else 1), leaves_to_search=leaves, reorder=reorder)
    found = drop_self(rows, self_rows, k)
    per_query = recall_per_query(found, truth, queries, index.embeddings)  # ties with the k-th count
    stderr = float(per_query.std() / np.sqrt(len(per_query)))
    return {"leaves_to_search": leaves, "reorder": reorder, "recall": round(float(per_query.mean()), 4),
            "recall_stderr": round(stderr, 4)}


def qps_of(index: "ItemIndex", queries: np.ndarray, k: int, leaves: int | None, reorder: int | None,
           repeats: int = 3, min_seconds: float = 0.02) -> float:
    """Single-thread batched queries per second: best of ``repeats`` runs and at least ``min_seconds``."""
    best, spent, i = np.inf, 0.0, 0
    while i < repeats or (spent < min_seconds and i < 100):
        started = time.perf_counter()
        index.search_rows(queries, k, leaves_to_search=leaves, reorder=reorder)
        elapsed = time.perf_counter() - started
        best, spent, i = min(best, elapsed), spent + elapsed, i + 1
    return round(len(queries) / best, 1)


def meets(c: dict[str, Any], target: float) -> bool:
    """Recall reaches the target with a margin of one standard error (the queries are a sample)."""
    return c["recall"] - c["recall_stderr"] >= target or c["recall"] >= 1.0


def smallest_meeting(values: list[int], evaluate: Callable[[int], dict[str, Any]], target: float
                     ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The first of the sorted ``values`` whose candidate meets ``target`` (recall is monotone in them).

    Gallops (1st, 2nd, 4th, 8th, ... value) then bisects, so about 2 log2(len) evaluations.
    Returns (that candidate or None, every candidate evaluated).
    """
    seen: dict[int, dict[str, Any]] = {}

    def ok(i: int) -> bool:
        if i not in seen:
            seen[i] = evaluate(values[i])
        return meets(seen[i], target)

    lo, hi, step = -1, None, 1  # values[lo] fails (or lo = -1), values[hi] meets
    i = 0
    while i < len(values):
        if ok(i):
            hi = i
            break
        lo, i, step = i, i + step, step * 2
    if hi is None:
        if not ok(len(values) - 1):
            return None, [seen[j] for j in sorted(seen)]
        hi = len(values) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return seen[hi], [seen[j] for j in sorted(seen)]


def tune_index(index: "ItemIndex", options: "IndexOptions", queries: np.ndarray | None = None) -> dict[str, Any]:
    """Measure candidates on ``index`` and return the tuning record for the manifest."""
    if index.num_deleted:
        raise ValueError(f"index {index.version} has {index.num_deleted} deleted row(s) in memory; tune a saved index")
    if queries is None and len(index) < 2:
        return untuned_record(index, options)
    k = min(options.tune_k, max(1, len(index) - 1))
    if queries is not None:
        q, self_rows, source = index.check_queries(queries), None, "user"
    else:
        q, self_rows = held_out_queries(index, options.tune_queries, options.seed)
        source = "corpus sample"
    extra = 0 if self_rows is None else 1
    truth = drop_self(exact_topk(q, index.embeddings, k + extra)[0], self_rows, k)
    build = index.manifest["build"]
    mode = build["mode"]
    target = options.target_recall
    record: dict[str, Any] = {"k": k, "target_recall": target, "num_queries": int(len(q)),
                              "query_source": source, "autotuned": options.autotune and mode != "brute_force"}

    def evaluate(leaves: int | None, reorder: int | None) -> dict[str, Any]:
        return recall_of(index, q, truth, self_rows, k, leaves, reorder)

    n_max = max(len(s.rows) for s in index.shards)
    leaves_fixed = options.leaves_to_search or (build.get("leaves_to_search") if not options.autotune else None)
    reorder_fixed = options.reorder or (build.get("reorder") if not options.autotune else None)
    leaves_all = [leaves_fixed] if leaves_fixed else list(range(1, build.get("num_leaves", 1) + 1))
    reorders = [reorder_fixed] if reorder_fixed else ladder(k, min(n_max, max(16 * k, 256)), 1.25)
    if mode == "brute_force":
        candidates = [evaluate(None, None)]
    elif mode == "tree_exact":
        pick, candidates = smallest_meeting(leaves_all, lambda leaves: evaluate(leaves, None), target)
    elif mode == "ah":
        pick, candidates = smallest_meeting(reorders, lambda reorder: evaluate(None, reorder), target)
    else:
        pick, candidates = tune_tree_ah(index, q, k, leaves_all if leaves_fixed else ladder(1, build["num_leaves"]),
                                        reorders, evaluate, target)
    met = [c for c in candidates if meets(c, target) and "qps" in c]
    if mode == "tree_ah" and met:
        best = max(met, key=lambda c: c["qps"])
    elif mode in ("tree_exact", "ah") and pick is not None:
        best = pick
    else:
        best = max(candidates, key=lambda c: c["recall"])
    if "qps" not in best:
        best["qps"] = qps_of(index, q, k + extra, best["leaves_to_search"], best["reorder"])
    record.update(best, target_met=meets(best, target), candidates=[{**c} for c in candidates])
    if not record["target_met"]:
        log.warning("index %s: recall@%d %.3f does not reach the target %.2f (best candidate kept)",
                    index.version, k, best["recall"], target)
    return record


def untuned_record(index: "ItemIndex", options: "IndexOptions") -> dict[str, Any]:
    """The tuning record of an index too small to measure: with a single item and no user
    queries, a held-out corpus query has no neighbour left once its own item is excluded,
    so there is no recall to measure. Every leaf is searched and every candidate reordered
    (with one item that is exact and costs nothing), and the record says tuning was skipped."""
    build = index.manifest["build"]
    mode = build["mode"]
    leaves = build.get("num_leaves") if mode in TREE_MODES else None
    reorder = max(1, len(index)) if mode in REORDER_MODES else None
    reason = f"{len(index)} item(s): no held-out neighbour to measure recall against; every item is searched (exact)"
    log.info("index %s: autotuning skipped (%s)", index.version, reason)
    q = index.embeddings[:1]
    return {"k": 1, "target_recall": options.target_recall, "num_queries": 0, "query_source": None,
            "autotuned": False, "skipped": reason, "leaves_to_search": leaves, "reorder": reorder,
            "recall": 1.0, "recall_stderr": 0.0, "qps": qps_of(index, q, 1, leaves, reorder) if len(q) else 0.0,
            "target_met": True, "candidates": []}


def tune_tree_ah(index: "ItemIndex", q: np.ndarray, k: int, leaves_list: list[int], reorders: list[int],
                 evaluate: Callable[[int | None, int | None], dict[str, Any]], target: float
                 ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Per ``leaves_to_search``: the smallest reorder meeting ``target``, timed; stop once more leaves are slower."""
    candidates: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for leaves in leaves_list:
        pick, tried = smallest_meeting(reorders, lambda reorder: evaluate(leaves, reorder), target)
        candidates += tried
        if pick is None:
            continue
        pick["qps"] = qps_of(index, q, k, leaves, pick["reorder"])
        if best is not None and pick["qps"] < best["qps"]:
            break  # searching more leaves only gets slower from here
        best = pick
        if pick["reorder"] == reorders[0]:
            break  # the fewest candidates already suffice: more leaves cannot help
    return best, candidates
