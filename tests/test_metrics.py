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
