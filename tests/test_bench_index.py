"""bench.index's comparison: contenders are re-timed fairly before the best is picked."""

from __future__ import annotations

import numpy as np

from bench.index import best_at, refine


def _point(method: str, recall: float, qps: float, calls: list) -> dict:
    def search(queries, threads):
        calls.append((method, recall, threads))
        return np.zeros((len(queries), 10), np.int64)
    return {"method": method, "params": {"recall": recall}, "recall": recall, "qps_1t": qps, "qps_2t": qps, "_search": search}


def test_refine_retimes_the_cheapest_setting_too_and_takes_the_median():
    calls: list = []
    lucky = _point("a", 0.99, 1e12, calls)  # an absurd sweep timing: noise
    cheap = _point("a", 0.91, 1.0, calls)  # the least work reaching 0.90, timed during a burst of load
    slow = _point("a", 0.85, 5.0, calls)  # reaches no target
    peer = _point("b", 0.96, 1e12, calls)
    points = [lucky, cheap, slow, peer]
    refine(points, np.zeros((4, 8), np.float32), rounds=3, per_method=1)
    assert {c[:2] for c in calls} == {("a", 0.99), ("a", 0.91), ("b", 0.96)}
    assert all(p["refined"] == ["qps_1t", "qps_2t"] for p in (lucky, cheap, peer)) and "refined" not in slow
    # re-timed values replace the sweep's, which are kept aside
    assert lucky["qps_1t"] < 1e12 and lucky["qps_1t_sweep"] == 1e12 and cheap["qps_1t_sweep"] == 1.0
    # each contender was timed in every round, for both thread counts, rounds alternating between methods
    assert sum(1 for c in calls if c[:2] == ("a", 0.91) and c[2] == 1) >= 3
    blocks = [c[:2] for i, c in enumerate(calls) if c[2] == 1 and (i == 0 or calls[i - 1] != c)]
    assert blocks[:6] == [("a", 0.99), ("b", 0.96), ("a", 0.91)] * 2


def test_best_at_compares_retimed_points_only():
    calls: list = []
    retimed = _point("a", 0.95, 100.0, calls)
    retimed["refined"] = ["qps_1t"]
    unrefined = _point("a", 0.97, 1e6, calls)  # a noisy sweep value never re-timed
    assert best_at([retimed, unrefined], 0.90, "qps_1t") is retimed
    assert best_at([unrefined], 0.90, "qps_1t") is unrefined  # nothing re-timed: the sweep decides
    assert best_at([retimed, unrefined], 0.99, "qps_1t") is None
