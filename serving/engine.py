"""The query path behind the endpoints: image queries (decode -> embed -> search, batched)
and vector or item queries (search, batched).

``QueryEngine`` owns two micro-batchers. One takes concurrent image queries as they
arrive (the upload's bytes) and answers a batch in its worker thread: decodes every
upload, embeds them in one encoder forward and searches them in one ScaNN call, so
the event loop only reads and writes HTTP. The other turns concurrent vector and
item searches into one ScaNN call. Every item carries the Backend its request
started with, and a batch is split by backend, so a request in flight during a hot
swap is answered entirely by the old version.

Batched answers equal one-at-a-time answers: unfiltered queries of one backend go
through one ``search`` call with the largest ``k`` of the batch and each is cut to
its own ``k`` (ScaNN's final neighbour count only truncates its reordered list);
filtered or crowded queries are searched one by one inside the same worker call.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lookalike.index.searcher import Neighbor
from lookalike.model.preprocess import decode_image
from lookalike.serving.backend import DEFAULT_MAX_EMBED_BATCH, Backend
from lookalike.serving.batcher import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_S, MicroBatcher
from lookalike.serving.decode import DecodeSlots
from lookalike.serving.metrics import ServingMetrics


# A lone query shorter than this runs on the event loop: a ScaNN search of 100k items takes
# ~0.1-0.6 ms here, an image query of the digits model (decode, forward, search) ~0.5-1.5 ms.
DEFAULT_INLINE_MAX_S = 0.002

# A CPU forward is cheapest per image around 4-16 images; at 64 the XLA CPU convolutions
# of a wider encoder get slower per image than one at a time (measured, bench/serving.py).


@dataclass(frozen=True)
class BatchingConfig:
    """Micro-batching limits: searches per ScaNN call, images per encoder forward, and the
    longest wait for announced queries. Both maxima at 1 turn batching off.
    ``inline_max_s``: a lone unfiltered query (a search, or an image's decode, forward and
    search) runs on the event loop, skipping the hand-off to the batcher's thread, while
    such queries take at most this long (0: never; see ``lookalike.serving.batcher``)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    max_embed_batch: int = DEFAULT_MAX_EMBED_BATCH
    inline_max_s: float = DEFAULT_INLINE_MAX_S

    @classmethod
    def off(cls) -> "BatchingConfig":
        return cls(max_batch=1, max_wait_s=0.0, max_embed_batch=1)


@dataclass(frozen=True)
class Filters:
    """Metadata filters and crowding applied to a search (all optional)."""

    where: Mapping[str, Any] = field(default_factory=dict)
    max_per_group: int | None = None

    @classmethod
    def of(cls, kind: str | None = None, group: Sequence[str] | None = None, max_per_group: int | None = None,
           source: Sequence[str] | None = None, tag: Sequence[str] | None = None) -> "Filters":
        """The filters of a request: ``kind`` (one), ``group``, ``source`` and ``tag`` (any of the
        values given; the ``tags`` column's lists must hold one), ANDed together."""
        where: dict[str, Any] = {}
        if kind is not None:
            where["kind"] = kind
        if group:
            where["group"] = list(group)
        if source:
            where["source"] = list(source)
        if tag:
            where["tags"] = list(tag)
        return cls(where, max_per_group)

    @property
    def active(self) -> bool:
        return bool(self.where) or self.max_per_group is not None


NO_FILTERS = Filters()


@dataclass(frozen=True)
class ImageQuery:
    """An image search: the uploaded bytes (decoded in the batch) or, for a large upload
    decoded beforehand, its [H, W, C] model input."""

    backend: Backend
    image: bytes | np.ndarray
    k: int
    filters: Filters = NO_FILTERS


@dataclass(frozen=True)
class SearchItem:
    backend: Backend
    query: np.ndarray  # [D] unit vector
    k: int
    filters: Filters = NO_FILTERS
    exclude_row: int | None = None  # similar-item queries leave the item itself out


def search_one(item: SearchItem) -> list[Neighbor]:
    f = item.filters
    return item.backend.index.search(item.query[None, :], item.k, where=f.where or None, max_per_group=f.max_per_group,
                                     exclude_row=item.exclude_row)[0]


def run_search_batch(items: list[SearchItem]) -> list[list[Neighbor] | BaseException]:
    """Answer every item as ``search_one`` would; unfiltered items of one backend that ask for
    as many neighbours share one ScaNN call. (Not items asking for more: a tree index widens
    the leaves it searches for a deep k, so a k=5 query batched with a k=100 one would get
    other, better, answers than alone.)"""
    results: list[list[Neighbor] | BaseException | None] = [None] * len(items)
    plain: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if item.filters.active:
            try:
                results[i] = search_one(item)
            except Exception as e:
                results[i] = e
        else:  # a similar-item query asks for one more: the item itself, left out below
            plain[id(item.backend), item.k + (item.exclude_row is not None)].append(i)
    for (_, count), positions in plain.items():
        group = [items[i] for i in positions]
        extra = [0 if it.exclude_row is None else 1 for it in group]
        try:
            queries = group[0].query[None, :] if len(group) == 1 else np.stack([it.query for it in group])
            found = group[0].backend.index.search(queries, count)
        except Exception:  # e.g. one bad query: answer one by one so only its caller fails
            for i in positions:
                try:
                    results[i] = search_one(items[i])
                except Exception as e:
                    results[i] = e
            continue
        for i, it, e, neighbors in zip(positions, group, extra, found):
            results[i] = [n for n in neighbors[: it.k + e] if n.row != it.exclude_row][: it.k]
    return results  # type: ignore[return-value]


def run_embed_batch(items: list[tuple[Backend, np.ndarray]]) -> list[np.ndarray | BaseException]:
    """[H, W, C] model inputs -> [D] embeddings, one forward per encoder in the batch."""
    results: list[np.ndarray | BaseException | None] = [None] * len(items)
    by_encoder: dict[int, list[int]] = defaultdict(list)
    for i, (backend, _) in enumerate(items):
        by_encoder[id(backend.encoder)].append(i)
    for positions in by_encoder.values():
        encoder = items[positions[0]][0].encoder
        try:
            vectors = encoder.embed(np.stack([items[i][1] for i in positions]))
        except Exception as e:
            vectors = [e] * len(positions)
        for i, v in zip(positions, vectors):
            results[i] = v
    return results  # type: ignore[return-value]


class QueryEngine:
    """Batched image queries and searches for one app (start/stop on its event loop)."""

    def __init__(self, metrics: ServingMetrics, batching: BatchingConfig = BatchingConfig()):
        self.metrics = metrics
        self.batching = batching
        self.decode_slots = DecodeSlots()  # large images decode one per CPU at most
        # Image queries: the "embed" batcher (its batch sizes are images per forward).
        self.images: MicroBatcher[ImageQuery, list[Neighbor]] = MicroBatcher(
            "embed", self.run_image_batch, max_batch=batching.max_embed_batch, max_wait_s=batching.max_wait_s,
            inline_max_s=batching.inline_max_s,
        )
        self.searcher: MicroBatcher[SearchItem, list[Neighbor]] = MicroBatcher(
            "search", self._timed(run_search_batch, "search"), max_batch=batching.max_batch,
            max_wait_s=batching.max_wait_s, on_batch=metrics.batch_observer("search"),
            inline_max_s=batching.inline_max_s,
        )
        self._observe_decode = metrics.stage_observer("decode")
        self._observe_embed = metrics.stage_observer("embed")
        self._observe_search = metrics.stage_observer("search")
        self._observe_embed_batch = metrics.batch_observer("embed")
        metrics.watch_queue("embed", lambda: self.images.queue_depth)
        metrics.watch_queue("search", lambda: self.searcher.queue_depth)

    def run_image_batch(self, items: list[ImageQuery]) -> list[list[Neighbor] | BaseException]:
        """Decode, embed (one forward per encoder) and search (one ScaNN call per backend) a
        batch of image queries; an upload that is not an image fails alone (ImageDecodeError)."""
        results: list[list[Neighbor] | BaseException | None] = [None] * len(items)
        pixels: list[np.ndarray | None] = [None] * len(items)
        clock, observe_decode = time.perf_counter, self._observe_decode
        for i, item in enumerate(items):
            if isinstance(item.image, np.ndarray):
                pixels[i] = item.image
                continue
            started = clock()
            try:
                pixels[i] = item.backend.encoder.preprocess(item.image)
            except Exception as e:
                results[i] = e
            finally:
                observe_decode(clock() - started)
        decoded = [i for i in range(len(items)) if results[i] is None]
        if not decoded:
            return results  # type: ignore[return-value]
        self._observe_embed_batch(len(decoded))
        started = clock()
        vectors = run_embed_batch([(items[i].backend, pixels[i]) for i in decoded])
        self._observe_embed(clock() - started)
        searches, positions = [], []
        for i, vector in zip(decoded, vectors):
            if isinstance(vector, BaseException):
                results[i] = vector
            else:
                item = items[i]
                searches.append(SearchItem(item.backend, vector, item.k, item.filters))
                positions.append(i)
        if searches:
            started = clock()
            for i, found in zip(positions, run_search_batch(searches)):
                results[i] = found
            self._observe_search(clock() - started)
        return results  # type: ignore[return-value]

    def _timed(self, run, stage: str):
        observe = self.metrics.stage_observer(stage)

        def timed(items):
            started = time.perf_counter()
            try:
                return run(items)
            finally:
                observe(time.perf_counter() - started)

        return timed

    def start(self) -> None:
        self.images.start()
        self.searcher.start()

    async def stop(self) -> None:
        await self.images.stop()
        await self.searcher.stop()

    def decode(self, backend: Backend, data: bytes) -> np.ndarray:
        """Image bytes -> [H, W, C] model input (blocking; ImageDecodeError if unusable); a large
        image is shrunk while decoding (``lookalike.model.preprocess.decode_image``)."""
        started = time.perf_counter()
        try:
            return decode_image(data, backend.encoder.spec)
        finally:
            self._observe_decode(time.perf_counter() - started)

    async def search(self, item: SearchItem) -> list[Neighbor]:
        """``item``'s neighbours; a lone unfiltered search may run on the loop (filtered ones
        widen their fetch until k are found, which can take long)."""
        return await self.searcher.submit(item, inline=not item.filters.active)
