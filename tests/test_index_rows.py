import threading

import numpy as np
import pyarrow as pa
import pytest

import pyarrow.parquet as pq

from lookalike.index.rows import Growable, ItemTable, ReadWriteLock, string_slices, write_items_parquet


def test_item_table_serves_loaded_and_appended_rows_alike():
    items = ItemTable(pa.table({"id": ["a", "b", "c"], "kind": ["image", "frame", "image"]}))
    items.append({"id": "d", "kind": "frame", "extra": 1})
    assert len(items) == 4 and items[1] == {"id": "b", "kind": "frame"} and items[-1]["id"] == "d"
    assert [i["id"] for i in items] == ["a", "b", "c", "d"] == items.ids()
    assert [i["id"] for i in items[1:3]] == ["b", "c"]
    assert items.ids_of(np.array([2, 0])) == ["c", "a"] and items.ids_of(np.array([3, 1])) == ["d", "b"]
    taken = items.take(np.array([3, 0, 2]))
    assert taken.column("id").to_pylist() == ["d", "a", "c"] and taken.schema == items.schema  # new keys are dropped
    assert items.distinct_values("kind") == {"image", "frame"} and items.distinct_values("extra") == {1}
    assert items.distinct_values("group") == set()
    assert items.distinct_values("kind", np.array([True, False, True, False])) == {"image"}  # e.g. the live rows
    assert items.distinct_values("kind", np.array([False, False, False, True])) == {"frame"}  # an added row
    with pytest.raises(IndexError, match="item row 4 out of range for 4 rows"):
        items[4]
    with pytest.raises(ValueError, match="needs an 'id' column"):
        ItemTable(pa.table({"uri": ["x"]}))


@pytest.mark.parametrize("column", [
    pa.chunked_array([pa.array(["a/1", "bé/2", ""]), pa.array(["c/3", "d/4"])]),  # shards' tables concatenated
    pa.chunked_array([pa.array(["x", "y", "z", "w"]).slice(1)]),  # a slice: offsets start past 0
    pa.chunked_array([pa.array(["p", "q", "r"], pa.large_string())]),
])
def test_ids_are_sliced_from_the_columns_bytes(column: pa.ChunkedArray) -> None:
    items = ItemTable(pa.table({"id": column}))
    rows = np.arange(len(column))[::-1]
    assert string_slices(column) is not None
    assert items.ids_of(rows) == [column.to_pylist()[r] for r in rows] == column.take(pa.array(rows)).to_pylist()
    assert string_slices(pa.chunked_array([pa.array(["a", None])])) is None  # nulls: Arrow's take instead
    assert string_slices(pa.chunked_array([pa.array([1, 2])])) is None
    numeric = ItemTable(pa.table({"id": pa.array([7, 8])}))
    assert numeric.ids_of(np.array([1])) == [8]


def test_growable_never_changes_rows_a_reader_holds():
    base = np.arange(6, dtype=np.float32).reshape(3, 2)
    base.flags.writeable = False  # like a memory-mapped file
    g = Growable(base)
    before = g.view()
    g.extend(np.ones((2, 2), np.float32))
    assert before.shape == (3, 2) and g.view().shape == (5, 2) and (g.view()[3:] == 1).all()
    held = g.view()
    for _ in range(20):
        g.extend(np.full((1, 2), 7, np.float32))
    assert (held == g.view()[:5]).all() and len(g.view()) == 25
    g.set(0, -1)
    assert g.view()[0, 0] == -1 and base[0, 0] == 0


def test_read_write_lock_excludes_writers_from_readers_and_each_other():
    lock, inside, seen = ReadWriteLock(), {"readers": 0, "writers": 0}, []
    guard = threading.Lock()

    def enter(kind, other):
        with guard:
            inside[kind] += 1
            seen.append((inside["readers"], inside["writers"]))
        with guard:
            inside[kind] -= 1

    def reader():
        for _ in range(300):
            with lock.read():
                enter("readers", "writers")

    def writer():
        for _ in range(300):
            with lock.write():
                enter("writers", "readers")

    threads = [threading.Thread(target=f) for f in (reader, reader, writer, writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(seen) == 1200
    assert all(w == 0 or (w == 1 and r == 0) for r, w in seen)  # never a writer beside anyone


def test_items_parquet_round_trips_with_dictionaries_only_where_values_repeat(tmp_path):
    n, dim = 300, 8
    emb = np.random.default_rng(0).random((n, dim), dtype=np.float32)
    items = pa.table({
        "id": pa.array([f"photos/{i:04d}.jpg" for i in range(n)]),
        "kind": pa.array(["frame" if i % 3 else "image" for i in range(n)]),
        "timestamp_s": pa.array([float(i) if i % 3 else None for i in range(n)], pa.float64()),
        "model_version": pa.array(["m-1"] * n),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
    })
    path = tmp_path / "items.parquet"
    write_items_parquet(items, path)
    assert pq.read_table(path).equals(items)
    columns = pq.ParquetFile(path).metadata.row_group(0)
    chunk = {columns.column(i).path_in_schema.split(".")[0]: columns.column(i) for i in range(columns.num_columns)}
    dictionary = {name for name, c in chunk.items() if c.has_dictionary_page}
    assert dictionary == {"kind", "model_version"}
    assert chunk["embedding"].compression == "UNCOMPRESSED" and chunk["id"].compression == "SNAPPY"
    assert not any(c.is_stats_set for c in chunk.values())


def test_rows_where_matches_like_python_equality_on_every_column_kind():
    table = pa.table({"id": ["a", "b", "c", "d"],
                      "kind": pa.array(["image", "frame", None, "frame"]).dictionary_encode(),
                      "width": pa.array([1, 2, 3, None], pa.int32()),
                      "tags": pa.array([["x"], ["y"], [], None])})
    items = ItemTable(table)
    items.append({"id": "e", "kind": "frame", "width": 2, "tags": ["x"]})
    assert items.rows_where({"kind": {"frame"}}).tolist() == [1, 3, 4]
    assert items.rows_where({"kind": {None}}).tolist() == [2]  # a null is the value None
    assert items.rows_where({"width": {2, "x"}}).tolist() == [1, 4]  # mixed types: compared in Python
    assert items.rows_where({"width": {"2"}}).tolist() == []
    assert items.rows_where({"kind": {"frame"}, "width": {2}}).tolist() == [1, 4]
    assert items.rows_where({"missing": {None}}).tolist() == [0, 1, 2, 3, 4]
    assert items.rows_where({"missing": {1}}).tolist() == []
    assert items.rows_where({"tags": {"x"}}).tolist() == [0, 4]  # a list matches the values it contains
    assert items.column_values("kind", np.array([4, 1, 2])) == ["frame", "frame", None]


def test_list_columns_match_by_membership_on_loaded_and_appended_rows():
    tags = pa.chunked_array([pa.array([["x", "y"], [], None]), pa.array([["y", None], ["z", "x"]])])  # two chunks
    table = pa.table({"id": list("abcde"), "tags": tags,
                      "sizes": pa.array([[1, 2], [3], None, [], [1]], pa.large_list(pa.int64()))})
    items = ItemTable(table.slice(0))
    items.append({"id": "f", "tags": ["x"], "sizes": [3]})
    items.append({"id": "g", "tags": None})
    items.append({"id": "h", "tags": ("z",)})
    assert items.rows_where({"tags": {"x"}}).tolist() == [0, 4, 5]
    assert items.rows_where({"tags": {"y", "z"}}).tolist() == [0, 3, 4, 7]  # any of a key's values
    assert items.rows_where({"tags": {None}}).tolist() == [2, 6]  # only a null list is None; [] and [None] are not
    assert items.rows_where({"tags": {"x"}, "sizes": {1}}).tolist() == [0, 4]  # keys AND together
    assert items.rows_where({"sizes": {3}}).tolist() == [1, 5]
    assert items.rows_where({"sizes": {"3"}}).tolist() == []  # Python equality, as for scalar columns
    assert items.rows_where({"tags": {1}}).tolist() == []


def test_list_membership_is_vectorised_on_a_large_table():
    import time

    n = 300_000
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.array([f"t{i}" for i in range(50)])[rng.integers(0, 50, int(lengths.sum()))])
    tags = pa.ListArray.from_arrays(offsets, values)
    items = ItemTable(pa.table({"id": pa.array(np.arange(n).astype(str)), "tags": tags}))
    started = time.perf_counter()
    rows = items.rows_where({"tags": {"t3"}})
    elapsed = time.perf_counter() - started
    started = time.perf_counter()
    python_rows = tags.to_pylist()  # what any loop over the rows in Python has to do first
    to_python = time.perf_counter() - started
    np.testing.assert_array_equal(rows, np.flatnonzero([("t3" in row) for row in python_rows]))
    assert elapsed < to_python, f"{elapsed:.3f}s, slower than converting the column to Python ({to_python:.3f}s)"
