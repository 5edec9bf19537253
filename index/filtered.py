"""Filtered and crowded search: metadata filters (``where``) and at most M results per group.

``where`` maps a column to a value or a list of values (any of them; AND across columns); a
list column (``tags``) passes when its list contains one (``rows.ItemTable.rows_where``).
ScaNN knows nothing of metadata, so a filter is applied to its results. How depends on
how many items the filter keeps: a selective one (at most ``EXACT_FILTER_MAX_FRACTION``
of the items: the frames of one video, a list of ids) is answered by scoring exactly the
matching items, which is exact and cheap; a broad one, and crowding, by over-fetching
from ScaNN and filtering, fetching 4x more and searching 4x more tree leaves each round
until k results are kept. The last round searches every leaf for every item, so a
result is only short when the corpus has no more matching items.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.index.manifest import TREE_MODES

if TYPE_CHECKING:
    from lookalike.index.searcher import ItemIndex, Neighbor

EXACT_FILTER_MAX_FRACTION = 0.1
MATCH_CACHE_SIZE = 16  # filters whose matching rows are kept per index (1 byte per item each)


def filtered_search(index: ItemIndex, queries: np.ndarray, k: int, where: Mapping[str, Any] | None,
                    max_per_group: int | None, group_by: str, exclude_row: int | None = None) -> list[list[Neighbor]]:
    """[Q, D] checked unit queries -> Q lists of at most k neighbours passing the filters, best
    first; ``exclude_row`` (the item of a similar-item query) is never a result nor takes a
    slot of its group."""
    accept = {key: set(v) if isinstance(v, (list, tuple, set)) else {v} for key, v in (where or {}).items()}
    mask = None
    if accept:
        mask, matching = live_matches(index, accept)
        if len(matching) <= max(EXACT_FILTER_MAX_FRACTION * len(index), 4 * k):
            if exclude_row is not None:
                matching = matching[matching != exclude_row]
            return [exact_among(index, query, matching, k, max_per_group, group_by) for query in queries]
    return [widening_search(index, query, k, mask, max_per_group, group_by, exclude_row) for query in queries]


def live_matches(index: ItemIndex, accept: dict[str, set]) -> tuple[np.ndarray, np.ndarray]:
    """([rows] bool, [M] rows) of the live items passing ``accept``. Cached per index and
    filter (the last ``MATCH_CACHE_SIZE``): rows are append-only and every update appends a
    row or deletes one, so (rows, deleted) identifies the index's state."""
    key = (len(index.items), index.num_deleted, tuple(sorted((k, frozenset(v)) for k, v in accept.items())))
    lock = index.__dict__.setdefault("_match_lock", threading.Lock())
    with lock:
        cache: OrderedDict = index.__dict__.setdefault("_match_cache", OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    mask = np.zeros(len(index.items), bool)
    mask[index.items.rows_where(accept)] = True
    if index.num_deleted:
        mask &= index.live_mask()[: len(mask)]
    found = (mask, np.flatnonzero(mask))
    with lock:
        cache[key] = found
        while len(cache) > MATCH_CACHE_SIZE:
            cache.popitem(last=False)
    return found


def exact_among(index: ItemIndex, query: np.ndarray, rows: np.ndarray, k: int, max_per_group: int | None,
                group_by: str) -> list[Neighbor]:
    """The best k of ``rows`` ([M] live rows) for one [D] query, scored exactly."""
    if not len(rows):
        return []
    scores = index.embeddings[rows] @ query
    order = np.argsort(-scores, kind="stable")
    if not max_per_group:
        order = order[:k]
    return keep(index, rows[order], scores[order], k, None, max_per_group, group_by)


def widening_search(index: ItemIndex, query: np.ndarray, k: int, mask: np.ndarray | None,
                    max_per_group: int | None, group_by: str, exclude_row: int | None = None) -> list[Neighbor]:
    """Over-fetch from ScaNN and keep rows where ``mask`` ([rows] bool, None: all) holds but
    ``exclude_row``, widening the fetch and the searched leaves until k are kept or every
    item was searched."""
    fetch = max(4 * k, 32)
    leaves = (index.manifest.get("tuning") or {}).get("leaves_to_search")
    while True:
        exhaustive = fetch >= len(index)
        if exhaustive and index.mode in TREE_MODES:
            leaves = len(index.items)  # more than a shard's leaves: ScaNN searches them all
        rows, scores = index.search_rows(query[None, :], min(fetch, len(index)), leaves_to_search=leaves)
        found = (rows[0] >= 0) & (rows[0] != (-1 if exclude_row is None else exclude_row))
        kept = keep(index, rows[0][found], scores[0][found], k, mask, max_per_group, group_by)
        if len(kept) >= k or exhaustive:
            return kept
        fetch *= 4
        leaves = leaves * 4 if leaves else leaves


def keep(index: ItemIndex, rows: np.ndarray, scores: np.ndarray, k: int, mask: np.ndarray | None,
         max_per_group: int | None, group_by: str) -> list[Neighbor]:
    """The first k of ``rows`` (ranked) where ``mask`` holds, at most ``max_per_group`` per
    ``group_by`` value (an item without one is its own group)."""
    from lookalike.index.searcher import Neighbor

    if mask is not None:
        # rows an update appended after the mask was made are left out: this search's snapshot
        passing = np.zeros(len(rows), bool)
        inside = rows < len(mask)
        passing[inside] = mask[rows[inside]]
        rows, scores = rows[passing], scores[passing]
    if not max_per_group:
        rows, scores = rows[:k], scores[:k]
    ids = index.items.ids_of(rows)
    groups = index.items.column_values(group_by, rows) if max_per_group else [None] * len(rows)
    kept: list[Neighbor] = []
    per_group: dict[Any, int] = {}
    for row, item_id, group, score in zip(rows.tolist(), ids, groups, scores.tolist()):
        if max_per_group:
            group = group or item_id
            if per_group.get(group, 0) >= max_per_group:
                continue
            per_group[group] = per_group.get(group, 0) + 1
        kept.append(Neighbor(row, item_id, float(score)))
        if len(kept) == k:
            break
    return kept
