"""Ordered decoding on a thread pool (``lookalike.model.parallel``)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lookalike.model.parallel import ordered_map


def test_results_come_in_order_however_long_each_takes():
    def slow_for_small(n: int) -> tuple[int, str]:
        time.sleep(0.002 * (10 - n))  # the first items finish last
        return n * n, threading.current_thread().name

    with ThreadPoolExecutor(3, thread_name_prefix="decode") as pool:
        results = list(ordered_map(slow_for_small, range(10), pool, ahead=4))
    assert [r for r, _ in results] == [n * n for n in range(10)]
    assert all(name.startswith("decode") for _, name in results)
    assert list(ordered_map(lambda n: n + 1, range(5), None, ahead=4)) == [1, 2, 3, 4, 5]  # inline


def test_at_most_ahead_items_run_beyond_the_one_waited_for():
    started: list[int] = []

    def record(n: int) -> int:
        started.append(n)
        return n

    with ThreadPoolExecutor(2) as pool:
        results = ordered_map(record, range(100), pool, ahead=3)
        assert next(results) == 0
        time.sleep(0.05)
        assert max(started) <= 4  # items 0..3 submitted before the first result was taken, then one more
        assert list(results) == list(range(1, 100))


def test_an_exception_is_raised_where_its_result_is_due_and_later_work_is_dropped():
    done: list[int] = []

    def fail_at_two(n: int) -> int:
        if n == 2:
            raise ValueError(f"bad item {n}")
        time.sleep(0.01)
        done.append(n)
        return n

    with ThreadPoolExecutor(1) as pool:
        results = ordered_map(fail_at_two, range(50), pool, ahead=2)
        assert [next(results), next(results)] == [0, 1]
        with pytest.raises(ValueError, match="bad item 2"):
            next(results)
    assert max(done) < 10  # the window's queued items were cancelled, not all 50 run


def test_a_folder_holds_big_files_when_one_of_its_first_files_is_big(tmp_path):
    from lookalike.model.parallel import PARALLEL_MIN_BYTES, holds_big_files

    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    small.write_bytes(b"x" * 100)
    big.write_bytes(b"x" * PARALLEL_MIN_BYTES)
    assert holds_big_files([tmp_path / "gone.jpg", small, big])  # a missing file is left for its decode to report
    assert not holds_big_files([small] * 8 + [big])  # only the first 8 are looked at
    assert not holds_big_files([])
