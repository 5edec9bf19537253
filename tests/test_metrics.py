import pytest
import numpy as np

from lookalike.model.metrics import best_f1_threshold, retrieval_metrics


def test_perfect_and_broken_embeddings():
    labels = np.array([0, 0, 1, 1])
    good = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]], np.float32)
    assert retrieval_metrics(good, labels)["precision_at_1"] == 1.0
    swapped = good[[0, 2, 1, 3]]
    assert retrieval_metrics(swapped, labels)["precision_at_1"] == 0.0


def test_threshold_separates_close_from_far_pairs():
    labels = np.array([0, 0, 1, 1])
    emb = np.array([[0, 0], [0.1, 0], [5, 0], [5.1, 0]], np.float32)
    threshold, f1 = best_f1_threshold(emb, labels)
    assert 0.1 < threshold < 4.9 and f1 == 1.0


def test_r_precision_and_map_at_r_match_hand_computed_values():
    # 1-D points, R = 2 for every query. Top-2 relevance per query:
    # q0 [1,0] q1 [1,0] q2 [0,0] q3 [0,1] q4 [1,0] q5 [1,0]
    emb = np.array([[0.0], [1.0], [2.2], [3.0], [10.0], [11.0]])
    labels = np.array([0, 0, 1, 0, 1, 1])
    m = retrieval_metrics(emb, labels)
    assert m["precision_at_1"] == pytest.approx(4 / 6)
    assert m["r_precision"] == pytest.approx(2.5 / 6)
    assert m["map_at_r"] == pytest.approx((0.5 + 0.5 + 0 + 0.25 + 0.5 + 0.5) / 6)


def test_map_at_r_skips_singleton_queries_and_is_1_for_a_perfect_embedding():
    emb = np.array([[0.0], [0.1], [5.0], [5.1], [9.0]])
    m = retrieval_metrics(emb, np.array([0, 0, 1, 1, 2]))
    assert m["map_at_r"] == 1.0 and m["r_precision"] == 1.0
