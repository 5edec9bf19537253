"""Tests of model/progress.py: the periodic count, rate and ETA lines."""

import logging

from lookalike.model.progress import Progress, last_value_note


def test_a_resumed_count_shows_the_total_done_and_the_rate_of_this_process(caplog, monkeypatch):
    clock = iter([100.0, 110.0, 110.0, 120.0])  # the start, then each read of the time
    monkeypatch.setattr("lookalike.model.progress.time.perf_counter", lambda: next(clock))
    progress = Progress("train", total=300, unit="steps", logger=logging.getLogger("t"), every_s=2.0, already=200)
    with caplog.at_level(logging.INFO):
        progress.update(250)  # 50 steps in the 10 s of this process: 5 steps/s, 50 to go
    assert caplog.messages == ["train: 250/300 steps (83%), 5.0 steps/s, ETA 10s"]
    assert progress.line().startswith("train: 250/300 steps (83%), 2.5 steps/s")  # 20 s in


def test_a_slow_first_step_is_kept_out_of_the_eta_but_not_out_of_the_total_time(caplog, monkeypatch):
    """A training's first step compiles (60 s here); an ETA from it promised 400 steps in hours."""
    now = [0.0]
    monkeypatch.setattr("lookalike.model.progress.time.perf_counter", lambda: now[0])
    progress = Progress("train", total=401, unit="steps", logger=logging.getLogger("t"), every_s=2.0)
    now[0] = 60.0
    progress.restart_rate(1)
    with caplog.at_level(logging.INFO):
        progress.update(1)  # not 2 s since the restart: no line with a rate of nothing
        now[0] = 64.0
        progress.update(201)  # 200 steps in 4 s: 50 steps/s, 200 to go
        progress.done("stopped by the time budget")  # short of its total: no ETA on the last line
    assert caplog.messages == ["train: 201/401 steps (50%), 50.0 steps/s, ETA 4s",
                               "train: 201/401 steps (50%), 50.0 steps/s, stopped by the time budget - done in 1m04s"]


def test_a_value_recorded_at_an_earlier_step_names_that_step():
    history = [{"step": 50, "loss": 0.141}, {"step": 100, "precision_at_1": 0.5}]
    assert last_value_note(history, "loss", 95) == "loss 0.1410 (step 50)"
    assert last_value_note(history, "loss", 50) == "loss 0.1410"
    assert last_value_note([], "loss", 3) == ""


def test_away_from_a_terminal_lines_come_less_often_as_the_work_goes_on(caplog, monkeypatch):
    """An hour of work: a line every 2 s on a terminal, ~150 lines in a cron mail or journal."""
    now = [0.0]
    monkeypatch.setattr("lookalike.model.progress.time.perf_counter", lambda: now[0])
    counts = {}
    for on_terminal in (True, False):
        progress = Progress("train", total=3600, unit="steps", logger=logging.getLogger("t"), every_s=2.0)
        progress.on_terminal = on_terminal
        caplog.clear()
        with caplog.at_level(logging.INFO):
            for second in range(1, 3601):
                now[0] = float(second)
                progress.update(second)
        counts[on_terminal] = [int(m.split(":")[1].split("/")[0]) for m in caplog.messages]
        now[0] = 0.0
    assert len(counts[True]) == 1800
    away = counts[False]
    assert away[:10] == list(range(2, 21, 2))  # the first 20 s as on a terminal
    assert 120 <= len(away) <= 170 and away[-1] - away[-2] == 30, (len(away), away[-5:])


def test_no_eta_from_a_first_unit_or_two(caplog, monkeypatch):
    """1 of 210 files after 3 s promised 10 minutes; that folder took 5 s."""
    now = [0.0]
    monkeypatch.setattr("lookalike.model.progress.time.perf_counter", lambda: now[0])
    progress = Progress("reading", total=210, unit="files", logger=logging.getLogger("t"), every_s=2.0)
    with caplog.at_level(logging.INFO):
        for count, now[0] in ((1, 3.0), (2, 5.5), (3, 8.0)):
            progress.update(count)
    assert caplog.messages == ["reading: 1/210 files (0%), 0.3 files/s, ETA ?",
                               "reading: 2/210 files (1%), 0.4 files/s, ETA ?",
                               "reading: 3/210 files (1%), 0.4 files/s, ETA 9m12s"]
    big = Progress("embed", total=1_000_000, unit="items", logger=logging.getLogger("t"))
    big.count, now[0] = 9_999, 20.0
    assert big.line().endswith("ETA ?")  # under 1 % of the total: not yet
    big.count = 10_000
    assert "ETA ?" not in big.line()
    near_end = Progress("train", total=20_000, unit="steps", logger=logging.getLogger("t"), already=19_900)
    near_end.count, now[0] = 19_950, 30.0  # resumed 100 steps from the end: half of them give an ETA
    assert near_end.line() == "train: 19950/20000 steps (100%), 5.0 steps/s, ETA 10s"
