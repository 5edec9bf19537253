"""Tests of pipeline/summary.py: how a run's skipped files and counts are reported."""

import logging

from lookalike.pipeline.summary import log_dead_letters, summarize


def letters(n: int) -> list[dict[str, str]]:
    return [{"uri": f"/c/{i}.jpg", "stage": "decode", "reason": "truncated"} for i in range(n)]


def test_every_skipped_file_is_named_when_there_are_few(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        log_dead_letters(letters(3), tmp_path, shown=5)
    assert [r.getMessage() for r in caplog.records] == [f"skipped /c/{i}.jpg at decode: truncated" for i in range(3)]


def test_many_skipped_files_are_counted_after_the_first_few(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        log_dead_letters(letters(25), tmp_path, shown=5)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 6 and messages[4] == "skipped /c/4.jpg at decode: truncated"
    assert messages[5] == f"... and 20 more skipped file(s): all 25 are listed in {tmp_path}/dead_letter-*.jsonl"


def test_files_read_is_unknown_only_when_nothing_counted_it(tmp_path):
    def files_read(counted: dict[str, int], **known: int) -> int:
        return summarize("r", tmp_path, "m-1", 12, "dask", counted, 1.0, **known).files_read

    assert files_read({}) == -1  # a runner without metrics (Dask) on files: unknown
    assert files_read({}, files_read=12) == 12  # known before the run (TFDS: every selected example is read)
    assert files_read({"files_read": 7, "items_decoded": 7}, files_read=12) == 7  # the runner's counter
    assert files_read({"files_unchanged": 12}) == 0  # counted, and nothing read
