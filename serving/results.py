"""Search responses as JSON bytes, built without pydantic on the hot path.

A search endpoint answers thousands of times a second; constructing a pydantic model
per result and serialising it again costs more than the search itself, and reading
an item's metadata row from the index's items table costs a table slice per result.
So each Backend keeps a ``ResultRows``: the per-row fields a result shows (kind,
video timestamp, group), read from the items once when the backend is loaded, in
compact columns (dictionary codes and a float array, not a dict per item), and a
``ResultsJSON`` that writes results straight to JSON text, each row's fixed fields
encoded once. Responses have exactly the ``SearchResponse`` shape of ``schemas.py``
(which documents them in /openapi.json; the tests validate responses against it).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fastapi.responses import Response

from lookalike.index.rows import user_columns
from lookalike.index.searcher import Neighbor

Row = tuple[str, float | None, str | None]  # kind, timestamp_s, group


def item_url(item_id: str, suffix: str = "", version: str | None = None) -> str:
    """The URL of an item (``suffix``: of its thumbnail or similar items), with ``?v=version``."""
    return f"/v1/items/{quote(item_id, safe='/')}{suffix}" + (f"?v={version}" if version else "")


def thumbnail_url(item_id: str, content_hash: str | None) -> str:
    """An item's thumbnail URL, versioned by its content (``?v=`` and the first 12 hex of the
    hash): a replaced picture gets a new URL, so the old one can be cached for long."""
    return item_url(item_id, "/thumbnail", content_hash[:12] if content_hash else None)


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
        self._from_dicts = not isinstance(table, pa.Table)  # user metadata is then read from the item dicts
        if self._from_dicts:
            table = pa.Table.from_pylist([
                {"kind": it.get("kind"), "group": group_of(it), "timestamp_s": it.get("timestamp_s"),
                 "content_hash": it.get("content_hash")} for it in items
            ]) if len(items) else pa.table({})
        self._base = table.num_rows

        def column(name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
            if name in table.column_names:
                return table.column(name)
            return pa.nulls(self._base, type_)

        self._kind_codes, self._kinds = _coded(column("kind", pa.string()))
        self._group_codes, self._groups = _coded(column("group", pa.string()), convert=str)
        self._hashes = column("content_hash", pa.string())
        self._user = table.select(user_columns(table.column_names))
        stamps = column("timestamp_s", pa.float64()).cast(pa.float64())
        self._stamp_valid = np.asarray(stamps.is_valid(), dtype=bool)
        self._stamps = np.asarray(stamps.fill_null(math.nan), dtype=np.float64)

    def __len__(self) -> int:
        return self._base

    def content_hash(self, row: int) -> str | None:
        if row >= self._base:
            value = self._items[row].get("content_hash")
            return None if value is None else str(value)
        return self._hashes[row].as_py()

    def metadata(self, row: int) -> dict[str, Any] | None:
        """The row's user metadata (columns not built in: ``source``, ``tags``, ... from embed
        --metadata or upsert) without its nulls; None when it has none."""
        if row >= self._base or self._from_dicts:
            item = self._items[row]
            values = {key: item[key] for key in user_columns(list(item))}
        elif self._user.num_columns:
            values = self._user.slice(row, 1).to_pylist()[0]
        else:
            return None
        return json_metadata(values)

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


def json_metadata(values: dict[str, Any]) -> dict[str, Any] | None:
    """User metadata as JSON can hold it, without its nulls (None when nothing is left): a
    metadata file's dates and times (pyarrow reads a CSV date column as date32) as ISO 8601
    text, durations in seconds, decimals as numbers, bytes as base64, NaN and infinities as
    nulls (dropped at the top level); lists and structs converted inside."""
    converted = {key: json_value(value) for key, value in values.items()}
    return {key: value for key, value in converted.items() if value is not None} or None


def json_value(value: Any) -> Any:
    """One metadata value as JSON can write it (see ``json_metadata``)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime.date, datetime.time)):  # datetime too (a subclass of date)
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return json_value(float(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(key): json_value(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(inner) for inner in value]
    if isinstance(value, np.generic):
        return json_value(value.item())
    if isinstance(value, np.ndarray):
        return json_value(value.tolist())
    return str(value)


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_encode = _JSON.encode
# Pre-encoded result fields of the most recently answered rows (key: row and id).
ROW_FRAGMENTS_CACHED = 1 << 16


class ResultsJSON:
    """The ``results`` of SearchResponses, written straight to JSON text.

    The fields a row always shows (id, kind, timestamp, group, thumbnail URL) are
    encoded once per row and remembered for recently answered rows; per result only
    the score, distance and same-item flag are written (as ``json`` writes floats:
    ``repr``; non-finite numbers raise ValueError, as ``json`` with allow_nan=False).
    """

    def __init__(self, rows: ResultRows):
        self.rows = rows
        # Cached on ``rows``, not on a bound method of self: no reference cycle, so a version
        # no longer served is freed as soon as its last request ends (``serving.heap``).
        self._fragment = partial(_row_fragment, rows)
        self._fragments = lru_cache(maxsize=ROW_FRAGMENTS_CACHED)(self._fragment)

    def encode(self, threshold: float | None, neighbors: list[Neighbor]) -> str:
        """The ``results`` list of a SearchResponse, as JSON text."""
        out = []
        loaded, fragments = len(self.rows), self._fragments
        unknown = "null" if threshold is None else ""  # no threshold: whether it is the same item is unknown
        for n in neighbors:
            score = float(n.score)
            if not math.isfinite(score):  # the distance, derived from the score, is finite with it
                raise ValueError(f"Out of range float values are not JSON compliant: {score!r}")
            # float32 rounding puts an identical item's cosine a hair above 1: clip to what they can be
            score, distance = min(1.0, max(-1.0, score)), max(0.0, float(n.distance))
            head, tail = fragments(n.row, n.id) if n.row < loaded else self._fragment(n.row, n.id)
            out.append(f'{head}{score!r},"distance":{distance!r},"same_item":{unknown or ("true" if distance <= threshold else "false")},{tail}')
        return "[" + ",".join(out) + "]"


def _row_fragment(rows: ResultRows, row: int, item_id: str) -> tuple[str, str]:
    """The JSON text of a result row before and after its score: (head, tail)."""
    kind, timestamp_s, group = rows.row(row)
    fields = {"kind": kind, "timestamp_s": timestamp_s, "group": group,
              "thumbnail_url": thumbnail_url(item_id, rows.content_hash(row)), "metadata": rows.metadata(row)}
    tail = _encode(fields)
    return '{"id":' + _encode(item_id) + ',"score":', tail[1:]


def search_json(query: dict[str, Any], results: str, model_version: str, index_version: str,
                note: str | None = None) -> str:
    """A SearchResponse as JSON text, ``results`` already written (``ResultsJSON.encode``);
    ``note``: why nothing was found, or None (null)."""
    return (f'{{"query":{_encode(query)},"results":{results},'
            f'"model_version":{_encode(model_version)},"index_version":{_encode(index_version)},"note":{_encode(note)}}}')


def json_text_response(text: str) -> Response:
    """JSON text already written as an application/json response."""
    return Response(text.encode(), media_type="application/json")
