import threading

import pytest

from lookalike.model.prefetch import Prefetcher


def test_prefetcher_yields_every_step_in_order_from_another_thread():
    threads = set()

    def make(step):
        threads.add(threading.current_thread().name)
        return step * 10

    with Prefetcher(make, range(3, 8), depth=2) as batches:
        assert list(batches) == [(s, s * 10) for s in range(3, 8)]
    assert threads == {"lookalike-prefetch"}


def test_prefetcher_reraises_the_producer_error_at_its_step():
    def make(step):
        if step == 2:
            raise RuntimeError("bad batch 2")
        return step

    seen = []
    with pytest.raises(RuntimeError, match="bad batch 2"), Prefetcher(make, range(5)) as batches:
        for step, _ in batches:
            seen.append(step)
    assert seen == [0, 1]


def test_prefetcher_stops_early_when_closed():
    made = []
    p = Prefetcher(lambda s: made.append(s) or s, range(10_000), depth=1)
    next(iter(p))
    p.close()
    assert len(made) < 10 and not p._thread.is_alive()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda s: s, range(1), depth=0)
