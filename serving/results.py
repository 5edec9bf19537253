"""Search responses as JSON bytes, built without pydantic on the hot path.

A search endpoint answers thousands of times a second; constructing a pydantic model
per result and serialising it again costs more than the search itself, and reading
an item's metadata row from the index's items table costs a table slice per result.
So each Backend keeps a ``ResultRows``: the per-row fields a result shows (kind,
video timestamp, group), read from the items once when the backend is loaded, in
compact columns (dictionary codes and a float array, not a dict per item). Responses
are plain dicts with exactly the ``SearchResponse`` shape of ``schemas.py`` (which
documents them in /openapi.json; the tests validate responses against it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fastapi.responses import Response

from lookalike.index.searcher import Neighbor

Row = tuple[str, float | None, str | None]  # kind, timestamp_s, group


def item_url(item_id: str, suffix: str = "") -> str:
    return f"/v1/items/{quote(item_id, safe='/')}{suffix}"


@lru_cache(maxsize=1 << 16)
def thumbnail_url(item_id: str) -> str:
    """``item_url(item_id, "/thumbnail")``, remembered for the most recently answered ids."""
    return item_url(item_id, "/thumbnail")


def group_of(item: dict[str, Any]) -> str | None:
    group = item.get("group")
    return None if group is None else str(group)


def _coded(column: pa.ChunkedArray | pa.Array, convert: Callable[[Any], Any] | None = None) -> tuple[np.ndarray, list[Any]]:
    """Dictionary-encode a column: int32 codes per row (-1 for null) and the distinct values."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    values = encoded.dictionary.to_pylist()
    if convert is not None:
        values = [None if v is None else convert(v) for v in values]
    return codes, values


class ResultRows:
    """The kind, video timestamp and group of every row of an index's items, for responses.

    ``items`` is the index's ``items`` (indexable by row, giving a dict); when it is
    backed by an Arrow table (``items.table``) the columns are read from it directly.
    Rows added after construction are read from ``items`` itself.
    """

    def __init__(self, items: Sequence[dict[str, Any]]):
        self._items = items
        table = getattr(items, "table", None)
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist([
                {"kind": it.get("kind"), "group": group_of(it), "timestamp_s": it.get("timestamp_s")} for it in items
            ]) if len(items) else pa.table({})
        self._base = table.num_rows

        def column(name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
            if name in table.column_names:
                return table.column(name)
            return pa.nulls(self._base, type_)

        self._kind_codes, self._kinds = _coded(column("kind", pa.string()))
        self._group_codes, self._groups = _coded(column("group", pa.string()), convert=str)
        stamps = column("timestamp_s", pa.float64()).cast(pa.float64())
        self._stamp_valid = np.asarray(stamps.is_valid(), dtype=bool)
        self._stamps = np.asarray(stamps.fill_null(math.nan), dtype=np.float64)

    def __len__(self) -> int:
        return self._base

    def row(self, row: int) -> Row:
        if row >= self._base:
            item = self._items[row]
            return item.get("kind") or "image", item.get("timestamp_s"), group_of(item)
        kind_code, group_code = int(self._kind_codes[row]), int(self._group_codes[row])
        return (
            (self._kinds[kind_code] if kind_code >= 0 else None) or "image",
            float(self._stamps[row]) if self._stamp_valid[row] else None,
            self._groups[group_code] if group_code >= 0 else None,
        )


def results_of(rows: ResultRows, threshold: float | None, neighbors: list[Neighbor]) -> list[dict[str, Any]]:
    """The ``results`` list of a SearchResponse."""
    out = []
    for n in neighbors:
        kind, timestamp_s, group = rows.row(n.row)
        distance = n.distance
        out.append({
            "id": n.id,
            "score": float(n.score),
            "distance": distance,
            "same_item": threshold is not None and distance <= threshold,
            "kind": kind,
            "timestamp_s": timestamp_s,
            "group": group,
            "thumbnail_url": thumbnail_url(n.id),
        })
    return out


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_response(content: Any) -> Response:
    """``content`` (dicts, lists, str, finite numbers, None) as an application/json response."""
    return Response(_JSON.encode(content).encode(), media_type="application/json")
