"""Micro-batching: the batcher itself (on a real event loop), the batch functions over
the real tiny backend, and concurrent HTTP queries that must get exactly what
one-at-a-time queries get.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow as pa
import pytest

from lookalike.model.store import Store
from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend, load_backend
from lookalike.serving.batcher import MicroBatcher
from lookalike.model.preprocess import ImageDecodeError
from lookalike.serving.engine import (
    BatchingConfig,
    NO_FILTERS,
    Filters,
    ImageQuery,
    QueryEngine,
    SearchItem,
    run_embed_batch,
    run_search_batch,
    search_one,
)
from lookalike.serving.metrics import ServingMetrics
from lookalike.serving.queries import search_by_image
from lookalike.serving.server import serve_in_thread


def run(coro):
    return asyncio.run(coro)


def test_concurrent_submits_form_one_batch() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        gate.wait(10)  # the first batch blocks until everything else is queued
        return [2 * i for i in items]

    async def main() -> list[int]:
        batcher = MicroBatcher("t", double, max_batch=8, max_wait_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(0))
        while not sizes:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 20)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 20  # 19 queued + 1 running
        gate.set()
        out = await asyncio.gather(first, *rest)
        await batcher.stop()
        return out

    assert run(main()) == [2 * i for i in range(20)]
    assert sizes == [1, 8, 8, 3]  # arrivals during a batch become the next batch, at most max_batch


def test_announced_items_are_waited_for_and_lone_items_are_not() -> None:
    sizes: list[int] = []

    async def main() -> None:
        batcher = MicroBatcher("t", lambda items: sizes.append(len(items)) or items, max_batch=8, max_wait_s=1.0)
        batcher.start()
        assert await batcher.submit("alone") == "alone"  # nothing announced: runs at once

        async def announced(i: int) -> int:
            with batcher.expect() as expected:
                await asyncio.sleep(0.001 * i)  # "decoding" takes a while
                return await expected.submit(i)

        assert await asyncio.gather(*(announced(i) for i in range(5))) == list(range(5))

        async def withdrawn() -> None:
            with batcher.expect():
                raise ValueError("bad upload")  # leaving the block withdraws the announcement

        with pytest.raises(ValueError):
            await withdrawn()
        assert await batcher.submit("after") == "after"
        await batcher.stop()

    run(main())
    assert sizes == [1, 5, 1]


def test_errors_reach_only_their_caller() -> None:
    def run_batch(items: list[int]) -> list[object]:
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    def broken(items: list[int]) -> list[int]:
        raise RuntimeError("boom")

    async def main() -> None:
        batcher = MicroBatcher("t", run_batch, max_batch=4)
        failing = MicroBatcher("f", broken)
        batcher.start()
        failing.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True)
        assert results[0] == 1 and results[2] == 3 and str(results[1]) == "bad -2"
        with pytest.raises(RuntimeError, match="boom"):
            await failing.submit(1)
        await batcher.stop()
        await failing.stop()

    run(main())
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher("t", run_batch, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher("t", run_batch, max_wait_s=-0.001)
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        create_app(lambda: None, batching=BatchingConfig(max_embed_batch=0))
    with pytest.raises(ValueError, match="watch_interval_s"):
        create_app(lambda: None, watch_interval_s=-1)


def test_a_lone_item_runs_inline_and_concurrent_ones_are_batched_in_the_worker() -> None:
    calls: list[tuple[int, bool]] = []  # (batch size, ran on the event loop's thread)
    loop_thread: list[threading.Thread] = []

    def double(items: list[int]) -> list[object]:
        calls.append((len(items), threading.current_thread() is loop_thread[0]))
        return [ValueError(f"bad {i}") if i < 0 else 2 * i for i in items]

    async def main() -> None:
        loop_thread.append(threading.current_thread())
        batcher = MicroBatcher("t", double, max_batch=8, max_wait_s=0.0, inline_max_s=0.5)
        batcher.start()
        assert await batcher.submit(1, inline=True) == 2
        assert calls == [(1, True)] and batcher.inline_runs == 1
        with pytest.raises(ValueError, match="bad -1"):  # an inline item's error reaches its caller
            await batcher.submit(-1, inline=True)
        assert await batcher.submit(2) == 4  # not allowed inline: the worker thread
        assert calls[-1] == (1, False)
        # Submitted together (as requests read in one loop iteration): one batch, in the worker.
        calls.clear()
        assert await asyncio.gather(*(batcher.submit(i, inline=True) for i in range(5))) == [0, 2, 4, 6, 8]
        assert calls == [(5, False)] and batcher.inline_runs == 2
        # Announced items on their way (an image being decoded) keep a lone item off the loop.
        with batcher.expect():
            assert await batcher.submit(3, inline=True) == 6
        assert calls[-1] == (1, False)
        await batcher.stop()

    run(main())


def test_inline_stops_while_lone_items_are_slow() -> None:
    ran_inline: list[bool] = []
    delays = iter([0.03, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])

    def slow(items: list[int]) -> list[int]:
        ran_inline.append(threading.current_thread() is threading.main_thread())
        threading.Event().wait(next(delays))
        return items

    async def main() -> None:
        batcher = MicroBatcher("t", slow, inline_max_s=0.002)
        batcher.start()
        for i in range(12):
            await batcher.submit(i, inline=True)
        await batcher.stop()

    run(main())
    # The first (30 ms) ran inline; the running average then exceeded 2 ms, so the next ones
    # went to the worker until fast items brought the average back under the limit.
    assert ran_inline[0] and not ran_inline[1] and ran_inline[-1]
    with pytest.raises(ValueError, match="inline_max_s"):
        MicroBatcher("t", slow, inline_max_s=2.0)


class Upload:
    """An item standing for a query's upload and backend (big things a batch must not keep)."""

    def __init__(self, usable: bool):
        self.usable = usable


def answer_or_fail(items: list[Upload]) -> list:
    """As the engine's batch functions do: an unusable item's exception stored in the results."""
    results: list = []
    for item in items:
        try:
            if not item.usable:
                raise ValueError("not a usable image")
            results.append(("found", item))
        except ValueError as e:
            results.append(e)
    return results


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "batched"])
@pytest.mark.parametrize("usable", [True, False], ids=["answered", "failed"])
def test_an_answered_or_failed_item_is_freed_without_a_garbage_collection(inline: bool, usable: bool) -> None:
    """A version swapped out is freed when its last request ends: neither the batcher's last
    batch nor a reference cycle through a failed item's exception may keep its items alive
    (with gc.freeze, only a rare full collection would free a cycle)."""

    async def main() -> bool:
        batcher = MicroBatcher("t", answer_or_fail, max_batch=4, max_wait_s=0.0)
        batcher.start()
        upload = Upload(usable)
        alive = weakref.ref(upload)
        try:
            await batcher.submit(upload, inline=inline)
        except ValueError:
            pass
        del upload
        await asyncio.sleep(0.05)  # the batcher goes back to waiting for the next batch
        kept = alive() is not None
        await batcher.stop()
        return kept

    gc.disable()
    try:
        kept = run(main())
    finally:
        gc.enable()
    assert not kept


# --- batch functions over the real backend ------------------------------------


def test_batched_search_equals_one_at_a_time(backend: Backend) -> None:
    index = backend.index
    rows = [0, 5, 17, 40, 99]
    items = [SearchItem(backend, index.embeddings[r], k) for r, k in zip(rows, [1, 3, 10, 7, 2])]
    items.append(SearchItem(backend, index.embeddings[3], 4, exclude_row=3))
    items.append(SearchItem(backend, index.embeddings[8], 5, Filters.of(max_per_group=1)))
    items.append(SearchItem(backend, index.embeddings[9], 5, Filters.of(kind="frame")))
    batched = run_search_batch(items)
    for item, got in zip(items, batched):
        assert [n.id for n in got] == [n.id for n in search_one(item)]
        assert len(got) == (0 if item.filters.where.get("kind") == "frame" else item.k)
    assert 3 not in [n.row for n in batched[5]]
    bad = run_search_batch([SearchItem(backend, np.full(8, np.nan, np.float32), 3), items[0]])
    assert isinstance(bad[0], ValueError) and bad[1][0].row == 0  # one bad query fails alone... in its group


def test_batched_search_on_a_tree_index_equals_one_at_a_time_whatever_the_other_ks(tmp_path) -> None:
    """A tree index searches more leaves for a deep k: a k=5 query batched with a k=100 one
    must still get its own answers, not the deeper search's."""
    from types import SimpleNamespace

    from lookalike.index.builder import IndexOptions, build_index
    from lookalike.index.searcher import ItemIndex

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 16))
    x = (centres[rng.integers(30, size=3000)] + 0.5 * rng.normal(size=(3000, 16))).astype(np.float32)
    build_index(x, pa.table({"id": [f"i{j}" for j in range(3000)]}), model_version="m", out_dir=tmp_path / "tree",
                options=IndexOptions(mode="tree_ah", num_leaves=60, target_recall=0.6, tune_queries=200))
    backend = SimpleNamespace(index=ItemIndex.load(tmp_path / "tree"))  # all a search reads of a backend
    queries = rng.normal(size=(60, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for q, deep in zip(queries[:30], queries[30:]):
        items = [SearchItem(backend, q, 5), SearchItem(backend, deep, 100), SearchItem(backend, q, 5, exclude_row=7)]
        batched = run_search_batch(items)
        for item, got in zip(items, batched):
            assert [n.id for n in got] == [n.id for n in search_one(item)]


def test_the_engine_runs_only_lone_unfiltered_queries_inline(backend: Backend, indexed_store: Store) -> None:
    query = backend.index.embeddings[5]
    upload = (indexed_store.root / "corpus" / backend.index.items[5]["id"]).read_bytes()

    async def main() -> None:
        engine = QueryEngine(ServingMetrics())
        engine.start()
        plain = await engine.search(SearchItem(backend, query, 3))
        crowded = await engine.search(SearchItem(backend, query, 3, Filters.of(max_per_group=1)))
        by_image = await search_by_image(engine, backend, upload, 3, NO_FILTERS)
        await search_by_image(engine, backend, upload, 3, Filters.of(kind="image"))
        await engine.stop()
        assert engine.searcher.inline_runs == 1  # the filtered one, whose fetch may widen, went to the thread
        assert engine.images.inline_runs == 1
        assert [n.id for n in by_image] == [n.id for n in search_one(SearchItem(backend, backend.encoder.embed_bytes([upload])[0], 3))]
        assert [n.id for n in plain] == [n.id for n in search_one(SearchItem(backend, query, 3))]
        assert [n.id for n in crowded] == [n.id for n in search_one(SearchItem(backend, query, 3, Filters.of(max_per_group=1)))]
        off = QueryEngine(ServingMetrics(), BatchingConfig(inline_max_s=0.0))
        off.start()
        await off.search(SearchItem(backend, query, 3))
        await search_by_image(off, backend, upload, 3, NO_FILTERS)
        await off.stop()
        assert off.searcher.inline_runs == off.images.inline_runs == 0

    run(main())


def test_a_batch_spanning_two_backends_answers_each_from_its_own(backend: Backend, indexed_store: Store) -> None:
    workdir = indexed_store.root
    other = load_backend(workdir)  # a second loaded version, as during a hot swap
    rows = [1, 2, 3, 4]
    items = [SearchItem(b, backend.index.embeddings[r], 3) for r, b in zip(rows, [backend, other, backend, other])]
    assert [[n.id for n in got] for got in run_search_batch(items)] == [[n.id for n in search_one(i)] for i in items]
    pixels = [backend.encoder.preprocess((workdir / "corpus" / backend.index.items[r]["id"]).read_bytes()) for r in rows]
    embedded = run_embed_batch([(b, p) for b, p in zip([backend, other, backend, other], pixels)])
    for p, vector in zip(pixels, embedded):
        np.testing.assert_allclose(vector, backend.encoder.embed(p[None])[0], atol=1e-5)


def test_an_image_batch_answers_each_query_as_if_alone(backend: Backend, indexed_store: Store) -> None:
    workdir = indexed_store.root
    ids = [item["id"] for item in backend.index.items[:5]]
    uploads = [(workdir / "corpus" / i).read_bytes() for i in ids]
    items = [
        ImageQuery(backend, uploads[0], 3),
        ImageQuery(backend, b"not an image", 3),  # fails alone
        ImageQuery(backend, uploads[1], 7, Filters.of(max_per_group=1)),
        ImageQuery(backend, backend.encoder.preprocess(uploads[2]), 5),  # a large upload arrives decoded
        ImageQuery(backend, uploads[3], 4, Filters.of(kind="frame")),
        ImageQuery(backend, uploads[4], 10),
    ]
    metrics = ServingMetrics()
    results = QueryEngine(metrics).run_image_batch(items)
    assert isinstance(results[1], ImageDecodeError)
    for i, (item, got) in enumerate(zip(items, results)):
        if i == 1:
            continue
        pixels = item.image if isinstance(item.image, np.ndarray) else backend.encoder.preprocess(item.image)
        alone = search_one(SearchItem(backend, backend.encoder.embed(pixels[None])[0], item.k, item.filters))
        assert [n.id for n in got] == [n.id for n in alone]
        np.testing.assert_allclose([n.score for n in got], [n.score for n in alone], atol=1e-5)
    # One forward of the five decoded images, one search stage, a decode for each of the five uploads.
    text = metrics.render().decode()
    assert 'lookalike_batch_size_sum{batcher="embed"} 5.0' in text
    assert 'lookalike_stage_seconds_count{stage="decode"} 5.0' in text
    assert 'lookalike_stage_seconds_count{stage="search"} 1.0' in text
    assert QueryEngine(metrics).run_image_batch([ImageQuery(backend, b"", 3)])[0].__class__ is ImageDecodeError


def test_concurrent_http_queries_equal_sequential_ones(backend: Backend, indexed_store: Store) -> None:
    workdir = indexed_store.root
    ids = [item["id"] for item in backend.index.items[:24]]
    images = {i: (workdir / "corpus" / i).read_bytes() for i in ids}
    app = create_app(lambda: backend, batching=BatchingConfig(max_batch=16, max_wait_s=0.02))
    with serve_in_thread(app) as url:
        def image_query(item_id: str) -> list[tuple[str, float]]:
            r = httpx.post(f"{url}/v1/search/image?k=6", content=images[item_id], timeout=60)
            assert r.status_code == 200, r.text
            return [(x["id"], x["score"]) for x in r.json()["results"]]

        def vector_query(item_id: str) -> list[str]:
            vector = backend.index.embeddings[backend.index.row_of(item_id)].tolist()
            r = httpx.post(f"{url}/v1/search/vector", json={"vector": vector, "k": 4}, timeout=60)
            assert r.status_code == 200, r.text
            return [x["id"] for x in r.json()["results"]]

        with ThreadPoolExecutor(12) as pool:
            concurrent_images = list(pool.map(image_query, ids))
            concurrent_vectors = list(pool.map(vector_query, ids))
        metrics = httpx.get(f"{url}/metrics").text
    for item_id, got in zip(ids, concurrent_images):
        expected = backend.index.search(backend.encoder.embed(backend.encoder.preprocess(images[item_id])[None]), 6)[0]
        assert [i for i, _ in got] == [n.id for n in expected]
        np.testing.assert_allclose([s for _, s in got], [n.score for n in expected], atol=1e-5)
    for item_id, got in zip(ids, concurrent_vectors):
        assert got == [n.id for n in backend.index.search(backend.index.embeddings[backend.index.row_of(item_id)], 4)[0]]
    # Some batches really held more than one query (12 clients at once).
    batch_counts = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line.startswith("lookalike_batch_size_")
    }
    embed_batches = batch_counts['lookalike_batch_size_count{batcher="embed"}']
    assert batch_counts['lookalike_batch_size_sum{batcher="embed"}'] == len(ids)
    assert embed_batches < len(ids)
