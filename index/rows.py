"""Row storage of a loaded index: item metadata, growable arrays and a reader-writer lock.

Rows are append-only and immutable: a row's id, metadata and embedding never change
once written. An update appends a row (and marks the replaced one deleted), a delete
only marks its row deleted, so a row number returned by a search stays valid for the
life of the ``ItemIndex`` even while other threads update it. ``save`` compacts.

``ItemTable`` keeps the loaded metadata as the Arrow table it was read as (no Python
dict per item at load: 1M items load in ~0.1 s instead of seconds) and turns single rows
into dicts on access (~6 us); rows added by updates are kept as dicts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


# The built-in columns of an index's items, written by the embed pipeline for every item
# (lookalike.pipeline.items) besides its embedding; any other column is user metadata
# (embed --metadata, upsert), which search results show as ``metadata``.
ITEM_FIELDS = [
    ("id", pa.string()),
    ("uri", pa.string()),
    ("kind", pa.string()),
    ("timestamp_s", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("content_hash", pa.string()),
    ("group", pa.string()),
    ("thumbnail", pa.string()),
    ("model_version", pa.string()),
    ("reused", pa.bool_()),  # True: embedding taken from the cache (--incremental)
]
BUILT_IN_COLUMNS = frozenset([name for name, _ in ITEM_FIELDS] + ["embedding"])


def user_columns(names: Sequence[str]) -> list[str]:
    """The user metadata among column (or field) ``names``: those not built in."""
    return [n for n in names if n not in BUILT_IN_COLUMNS]


# Items columns with few distinct values; ids, paths, hashes and embeddings are unique per row.
LOW_CARDINALITY_COLUMNS = ("kind", "model_version", "group", "reused")


def write_items_parquet(items: pa.Table, path: str | Any) -> None:
    """Write an items table as Parquet: dictionary encoding only for LOW_CARDINALITY_COLUMNS,
    no column statistics (items are read whole, never filtered on read) and no compression of
    the embedding column (float noise; strings keep snappy). 50,000 items in 60 instead of
    105 ms, and a smaller file than with pyarrow's defaults."""
    names = items.column_names
    from lookalike.index.writes import failures_named

    # Arrow's "Error writing bytes to file ... [errno 28]" names no file
    with failures_named(Path(path)) if isinstance(path, (str, os.PathLike)) else nullcontext():
        pq.write_table(items, path, use_dictionary=[c for c in LOW_CARDINALITY_COLUMNS if c in names],
                       write_statistics=False, compression={c: "none" if c == "embedding" else "snappy" for c in names})


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    Not re-entrant: a thread holding the read side must not take it again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Growable:
    """An array of rows that grows by appending ([n, ...] visible, spare capacity behind it).

    ``view()`` is valid forever: appends write past the visible end, or into a new
    buffer, never into rows a reader may hold.
    """

    def __init__(self, initial: np.ndarray):
        self._buf = initial
        self._n = len(initial)

    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def extend(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, self._buf.dtype)
        need = self._n + len(rows)
        if need > len(self._buf) or not self._buf.flags.writeable:
            grown = np.empty((max(need, self._n + self._n // 4 + 16),) + self._buf.shape[1:], self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n:need] = rows
        self._n = need

    def set(self, index: np.ndarray | int, value: Any) -> None:
        """Write into visible rows (copying a read-only buffer, e.g. a memory map, first)."""
        if not self._buf.flags.writeable:
            self._buf = self._buf[: self._n].copy()
        self._buf[index] = value


def string_slices(column: pa.ChunkedArray) -> tuple[np.ndarray, memoryview] | None:
    """A string column without nulls as ([rows + 1] offsets, UTF-8 bytes): value i is
    ``data[offsets[i]:offsets[i + 1]]``. Slicing out the ten ids of a search result this
    way takes ~4 us, an Arrow ``take`` ~12 us. None for other columns. A column of
    several chunks is combined (a copy of its bytes)."""
    if column.null_count or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    _, offsets, data = array.buffers()
    dtype = np.int64 if pa.types.is_large_string(array.type) else np.int32
    if offsets is None:  # an empty array
        return np.zeros(1, dtype), memoryview(b"")
    offsets = np.frombuffer(offsets, dtype)[array.offset: array.offset + len(array) + 1]
    return offsets, memoryview(data if data is not None else b"")


class ItemTable:
    """[rows] item metadata: an Arrow table for the loaded rows, dicts for rows appended since."""

    def __init__(self, table: pa.Table):
        if "id" not in table.column_names:
            raise ValueError(f"items table needs an 'id' column, has {table.column_names}")
        self.table = table
        self.schema = table.schema
        self._base = table.num_rows
        self._ids = table.column("id")
        self._id_slices = string_slices(self._ids)
        self._added: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return self._base + len(self._added)

    @overload
    def __getitem__(self, row: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, row: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"item row {row} out of range for {len(self)} rows")
        if row >= self._base:
            return self._added[row - self._base]
        return self.table.slice(row, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.table.to_batches(max_chunksize=65_536):
            yield from batch.to_pylist()
        yield from list(self._added)

    def append(self, item: Mapping[str, Any]) -> None:
        self._added.append(dict(item))

    def check_new_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Raise ValueError naming the item and field when a value does not fit its column's
        type; fields the table lacks become new columns (typed from these rows, null in
        the others), so what an update adds is kept when the index is written."""
        names = {f for row in rows for f in row}
        for name in sorted(names):
            values = [row.get(name) for row in rows]
            if name in self.schema.names:
                column_type = self.schema.field(name).type
                value_type = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
                try:
                    pa.array(values, type=value_type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                    for row, value in zip(rows, values):
                        try:
                            pa.array([value], type=value_type)
                        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                            raise ValueError(f"item {row.get('id')!r}: {name}={value!r} is not a {value_type} "
                                             f"(the type of the index's {name!r} column)") from None
                    raise
                continue
            try:
                column_type = pa.array(values).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"new field {name!r} has values of different types ({e})") from None
            if pa.types.is_null(column_type):
                continue  # only None: nothing to keep
            self.schema = self.schema.append(pa.field(name, column_type))
            self.table = self.table.append_column(self.schema.field(name), pa.nulls(self.table.num_rows, column_type))

    def ids(self) -> list[str]:
        """Every row's id, in row order."""
        return self._ids.to_pylist() + [a["id"] for a in self._added]

    def ids_of(self, rows: np.ndarray) -> list[str]:
        """Ids of ``rows`` ([M] int), sliced from the id column's bytes (rows < 0 are not allowed)."""
        rows = np.asarray(rows, np.int64)
        if not (rows >= self._base).any():
            if self._id_slices is not None:
                offsets, data = self._id_slices
                return [str(data[a:b], "utf-8") for a, b in zip(offsets[rows].tolist(), offsets[rows + 1].tolist())]
            return self._ids.take(pa.array(rows)).to_pylist()
        return [self[int(r)]["id"] for r in rows]

    def rows_where(self, accept: Mapping[str, set]) -> np.ndarray:
        """[M] int64 rows (deleted ones included) whose ``key`` value is in ``accept[key]``
        for every key (AND across keys, any of a key's values); a missing column or a null
        is the value None. A list value (a ``list<...>`` column such as ``tags``) matches
        when it contains any of the key's values; a null or missing list matches only None."""
        mask = np.ones(len(self), bool)
        for key, values in accept.items():
            if key in self.table.column_names:
                mask[: self._base] &= _column_in(self.table.column(key), values)
            elif None not in values:
                mask[: self._base] = False
            if self._added:
                mask[self._base:] &= np.array([_value_in(a.get(key), values) for a in self._added], bool)
        return np.flatnonzero(mask)

    def distinct_values(self, key: str, rows: np.ndarray | None = None) -> set[Any]:
        """The distinct non-null values of scalar column ``key`` over the rows where ``rows``
        ([len(self)] bool, e.g. the live ones) holds, or over all rows (the rows added since
        loading too); empty when no such row has the column."""
        found: set[Any] = set()
        if key in self.table.column_names:
            column = self.table.column(key)
            if rows is not None:
                column = column.filter(pa.array(np.asarray(rows[: self._base], bool)))
            found.update(v for v in pc.unique(column).to_pylist() if v is not None)
        found.update(a[key] for i, a in enumerate(self._added)
                     if a.get(key) is not None and (rows is None or rows[self._base + i]))
        return found

    def column_values(self, key: str, rows: np.ndarray) -> list[Any]:
        """Column ``key`` of ``rows`` ([M] int) as Python values (None where absent)."""
        if key not in self.table.column_names and not self._added:
            return [None] * len(rows)
        if key not in self.table.column_names:
            return [self._added[r - self._base].get(key) if r >= self._base else None for r in np.asarray(rows).tolist()]
        return self.take(rows).column(key).to_pylist()

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows ([M] int, any order) as an Arrow table with the loaded schema."""
        rows = np.asarray(rows, np.int64)
        base, added = rows[rows < self._base], rows[rows >= self._base]
        parts = [self.table.take(pa.array(base))] if len(base) else []
        if len(added):
            parts.append(pa.Table.from_pylist([self._added[r - self._base] for r in added], schema=self.schema))
        if not parts:
            return self.schema.empty_table()
        order = np.argsort(np.concatenate([np.flatnonzero(rows < self._base), np.flatnonzero(rows >= self._base)]),
                           kind="stable")
        return pa.concat_tables(parts).take(pa.array(order)) if len(parts) > 1 else parts[0]


def _value_in(value: Any, values: set) -> bool:
    """Whether one row's ``value`` passes: equal to one of ``values``, or for a list (a row of
    a list column) containing one of them (its None elements never match)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return any(_hashable_in(v, values) for v in value if v is not None)
    return _hashable_in(value, values)


def _hashable_in(value: Any, values: set) -> bool:
    try:
        return value in values
    except TypeError:  # an unhashable value (a nested list, a dict) equals no filter value
        return False


def _is_list_type(column_type: pa.DataType) -> bool:
    return pa.types.is_list(column_type) or pa.types.is_large_list(column_type) or pa.types.is_fixed_size_list(column_type)


def _column_in(column: pa.ChunkedArray, values: set) -> np.ndarray:
    """[rows] bool: which values of ``column`` are in ``values`` (Python equality, None for
    null); for a list column, which lists contain one of ``values`` (``_list_column_in``)."""
    if _is_list_type(column.type):
        return _list_column_in(column, values)
    value_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    try:
        value_set = pa.array([v for v in values if v is not None], type=value_type)
        mask = pc.is_in(column, value_set=value_set).fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
        return np.array([_value_in(v, values) for v in column.to_pylist()], bool)  # e.g. "1" asked of an int column
    if None in values:
        mask |= column.is_null().to_numpy(zero_copy_only=False).astype(bool)
    return mask


def _list_column_in(column: pa.ChunkedArray, values: set) -> np.ndarray:
    """[rows] bool for a list column: the rows whose list holds one of ``values`` (its
    elements flattened, tested with ``is_in`` and mapped back to their rows by
    ``list_parent_indices``: no Python per row), or that are null when None is asked."""
    mask = np.zeros(len(column), bool)
    element_type = column.type.value_type
    if pa.types.is_dictionary(element_type):
        element_type = element_type.value_type
    wanted = [v for v in values if v is not None]
    if wanted:
        try:
            value_set = pa.array(wanted, type=element_type)
            hits = pc.is_in(pc.list_flatten(column), value_set=value_set).fill_null(False)
            parents = pc.list_parent_indices(column)  # global row numbers, across chunks
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
            return np.array([_value_in(v, values) if v is not None else None in values for v in column.to_pylist()], bool)
        rows = pc.filter(parents, hits)
        if isinstance(rows, pa.ChunkedArray):
            rows = rows.combine_chunks()
        mask[rows.to_numpy(zero_copy_only=False).astype(np.int64)] = True
    if None in values:
        mask |= column.is_null().to_numpy(zero_copy_only=False).astype(bool)
    return mask
