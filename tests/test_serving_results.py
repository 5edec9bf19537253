"""Search responses built without pydantic: per-row metadata columns, the response
shape against the documented schema, no thread hop for dependencies, and the heap
settling that keeps full garbage collections short."""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pytest
from fastapi.dependencies import utils as fastapi_utils
from fastapi.testclient import TestClient

from lookalike.index.searcher import Neighbor
from lookalike.model.store import Store
from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend
from lookalike.serving.heap import settle
from lookalike.serving.results import ResultRows, ResultsJSON, search_json
from lookalike.serving.schemas import BatchSearchResponse, SearchResponse

ITEMS = [
    {"id": "a", "kind": "frame", "group": "v1.mp4", "timestamp_s": 1.5},
    {"id": "b", "kind": None, "group": None, "timestamp_s": None},
    {"id": "c", "kind": "image", "group": 7},
    {"id": "d", "kind": "frame", "group": "v1.mp4", "timestamp_s": 0.0},
]


def expected(item: dict[str, Any]) -> tuple[str, float | None, str | None]:
    group = item.get("group")
    return item.get("kind") or "image", item.get("timestamp_s"), None if group is None else str(group)


class ArrowItems(list):
    """Items backed by an Arrow table in chunks (as the index's ItemTable), plus rows added later."""

    def __init__(self, rows: list[dict[str, Any]], added: list[dict[str, Any]]):
        super().__init__(rows + added)
        schema = pa.schema([("id", pa.string()), ("kind", pa.string()), ("group", pa.string()), ("timestamp_s", pa.float64()),
                            ("tags", pa.list_(pa.string()))])
        rows = [dict(r, group=None if r.get("group") is None else str(r["group"])) for r in rows]
        self.table = pa.concat_tables([pa.Table.from_pylist(rows[:2], schema), pa.Table.from_pylist(rows[2:], schema)])


def test_result_rows_from_dicts_match_the_items() -> None:
    rows = ResultRows(ITEMS)
    assert len(rows) == len(ITEMS)
    assert [rows.row(i) for i in range(len(ITEMS))] == [expected(it) for it in ITEMS]
    assert ResultRows([{"id": "a", "kind": "image", "source": "web", "tags": None}]).metadata(0) == {"source": "web"}


def test_result_rows_from_an_arrow_table_and_rows_added_later() -> None:
    added = {"id": "e", "kind": "frame", "group": "v2.mp4", "timestamp_s": 4.0}
    rows = ResultRows(ArrowItems(ITEMS, [added]))
    assert len(rows) == len(ITEMS)  # read from the table; the added row from the items
    assert [rows.row(i) for i in range(len(ITEMS) + 1)] == [expected(it) for it in [*ITEMS, added]]


def test_result_rows_without_metadata_columns() -> None:
    items = ArrowItems([{"id": "x"}, {"id": "y"}], [])
    items.table = pa.table({"id": ["x", "y"]})
    assert [ResultRows(items).row(i) for i in range(2)] == [("image", None, None)] * 2
    assert len(ResultRows([])) == 0


def test_results_json_writes_what_json_writes() -> None:
    items = [*ITEMS, {"id": "e f/é?#1", "kind": "frame", "group": "v 2", "timestamp_s": 2.25, "tags": ["x", "ü"]}]
    added = {"id": "g", "kind": "frame", "group": "v1.mp4", "timestamp_s": 9.5, "source": "cam", "tags": None}
    results = ResultsJSON(ResultRows(ArrowItems(items, [added])))
    neighbors = [Neighbor(row, it["id"], score) for row, it, score in
                 zip(range(6), [*items, added], [1.0000001192092896, 0.5, -0.25, 0.1 + 0.2, 0.9999, 0.75])]
    for threshold in (None, 0.8):
        expected_results = []
        for n in neighbors:
            kind, timestamp_s, group = expected([*items, added][n.row])
            expected_results.append({
                "id": n.id, "score": min(1.0, n.score), "distance": n.distance,  # float32's 1.0000001 is 1
                "same_item": None if threshold is None else n.distance <= threshold, "kind": kind,  # unknown: null
                "timestamp_s": timestamp_s, "group": group, "thumbnail_url": f"/v1/items/{quote(n.id, safe='/')}/thumbnail",
                "metadata": {"e f/é?#1": {"tags": ["x", "ü"]}, "g": {"source": "cam"}}.get(n.id),  # user columns, no nulls
            })
        for _ in range(2):  # written, then from the remembered row fragments
            text = results.encode(threshold, neighbors)
            assert text == json.dumps(expected_results, ensure_ascii=False, separators=(",", ":"))
    query = {"type": "image", "k": 3, "filename": "é.png", "group": ["a"]}
    response = search_json(query, results.encode(0.8, neighbors[:2]), "m-1", "i-\"2")
    assert json.loads(response) == {"query": query, "results": json.loads(results.encode(0.8, neighbors[:2])),
                                    "model_version": "m-1", "index_version": 'i-"2', "note": None}
    noted = json.loads(search_json(query, "[]", "m-1", "i-2", note="no item has group 'a' (\"quoted\")"))
    assert noted["results"] == [] and noted["note"] == "no item has group 'a' (\"quoted\")"
    assert results.encode(None, []) == "[]"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            results.encode(None, [Neighbor(0, "a", bad)])


def test_responses_have_exactly_the_documented_shape(backend: Backend, indexed_store: Store, monkeypatch) -> None:
    thread_hops = []
    real = fastapi_utils.run_in_threadpool

    async def counting(func, *args, **kwargs):
        thread_hops.append(getattr(func, "__name__", func))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(fastapi_utils, "run_in_threadpool", counting)
    vector = backend.index.embeddings[3].tolist()
    image = next((indexed_store.root / "corpus").rglob("*.png")).read_bytes()
    item_id = backend.index.items[5]["id"]
    with TestClient(create_app(lambda: backend)) as client:
        answers = {
            "vector": client.post("/v1/search/vector", json={"vector": vector, "k": 4}),
            "image": client.post("/v1/search/image?k=3&max_per_group=2", content=image, headers={"content-type": "image/png"}),
            "similar": client.get(f"/v1/items/{item_id}/similar", params={"k": 2, "kind": "image"}),
        }
        batch = client.post("/v1/search/batch", json={"queries": [{"vector": vector}, {"id": item_id}], "k": 2})
    assert thread_hops == []  # dependencies of the search endpoints run on the event loop
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
        body = response.json()
        assert SearchResponse.model_validate(body).model_dump(mode="json") == body  # no missing or extra field
        for result in body["results"]:
            assert (result["kind"], result["timestamp_s"], result["group"]) == expected(backend.index.items[backend.index.row_of(result["id"])])
    assert answers["vector"].json()["results"][0]["id"] == backend.index.items[3]["id"]
    assert answers["image"].json()["query"] | {"filename": None} == {
        "type": "image", "k": 3, "filename": None, "bytes": len(image), "dim": None, "id": None,
        "kind": None, "group": None, "source": None, "tag": None, "max_per_group": 2,
    }
    assert batch.status_code == 200
    assert BatchSearchResponse.model_validate(batch.json()).model_dump(mode="json") == batch.json()


def test_settle_freezes_survivors_and_never_unfreezes_them() -> None:
    """A second settle (a restart of the app in one process) must not unfreeze: that is a full
    collection, a pause for every request in flight."""
    class Node:
        pass

    try:
        cycle = Node()
        cycle.self = cycle
        alive = weakref.ref(cycle)
        settle()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        del cycle
        gc.collect()
        assert alive() is not None  # frozen: full collections no longer look at it
        settle()
        assert alive() is not None and gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()


def test_a_version_no_longer_served_is_freed_without_a_collection(indexed_store: Store) -> None:
    """The served version is frozen after loading (``settle``) and never unfrozen: once swapped
    out it must be freed by reference counting alone, its result rows (the index's item
    metadata) included, so it holds no reference cycle."""
    from lookalike.serving.backend import load_backend

    loaded = load_backend(indexed_store.root)
    loaded.results_json  # built before serving, as the loaders do
    parts = [weakref.ref(x) for x in (loaded, loaded.results_json, loaded.rows, loaded.index)]
    gc.collect()
    gc.freeze()
    try:
        del loaded
        assert [part() is None for part in parts] == [True] * len(parts)
    finally:
        gc.unfreeze()


def test_app_settles_the_heap_after_loading_only_when_asked(backend: Backend) -> None:
    try:
        gc.unfreeze()
        with TestClient(create_app(lambda: backend)):
            assert gc.get_freeze_count() == 0
        with TestClient(create_app(lambda: backend, settle_heap=True)):
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
