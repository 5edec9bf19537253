"""Tests of model/progress.py: the periodic count, rate and ETA lines."""

import logging

from lookalike.model.progress import Progress


def test_a_resumed_count_shows_the_total_done_and_the_rate_of_this_process(caplog, monkeypatch):
    clock = iter([100.0, 110.0, 110.0, 120.0])  # the start, then each read of the time
    monkeypatch.setattr("lookalike.model.progress.time.perf_counter", lambda: next(clock))
    progress = Progress("train", total=300, unit="steps", logger=logging.getLogger("t"), every_s=2.0, already=200)
    with caplog.at_level(logging.INFO):
        progress.update(250)  # 50 steps in the 10 s of this process: 5 steps/s, 50 to go
    assert caplog.messages == ["train: 250/300 steps (83%), 5.0 steps/s, ETA 10s"]
    assert progress.line().startswith("train: 250/300 steps (83%), 2.5 steps/s")  # 20 s in
