"""/metrics and /readyz on a live server over the tiny real store: counters per route
template and status, stage and batch histograms, queue gauges, the served versions;
readiness only once a backend is loaded (background loading held back by a gate).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lookalike.model.store import Store
from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend
from lookalike.serving.server import serve_in_thread

QUERY_ID = "3/digit_0003.png"


@pytest.fixture(scope="module")
def url(backend: Backend) -> Iterator[str]:
    with serve_in_thread(create_app(lambda: backend)) as u:
        yield u


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_stages_batches_and_versions(url: str, backend: Backend, indexed_store: Store) -> None:
    with httpx.Client(base_url=url) as http:
        query_png = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
        assert http.post("/v1/search/image?k=3", content=query_png).status_code == 200
        assert http.post("/v1/search/image?k=3", content=b"not an image").status_code == 422
        for _ in range(2):
            assert http.get(f"/v1/items/{QUERY_ID}/similar").status_code == 200
        assert http.get("/v1/items/9/nope.png/similar").status_code == 404
        assert http.get("/openapi.json").status_code == 200
        assert http.head("/openapi.json").status_code == 200
        assert http.get("/no/such/page").status_code == 404
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    m = samples(response.text)

    def requests(endpoint: str, method: str, status: str) -> float:
        key = ("lookalike_requests_total", (("endpoint", endpoint), ("method", method), ("status", status)))
        return m.get(key, 0.0)

    assert requests("/v1/search/image", "POST", "200") == 1
    assert requests("/v1/search/image", "POST", "422") == 1
    # Route templates, never raw ids, label the requests.
    assert requests("/v1/items/{item_id}/similar", "GET", "200") == 2
    assert requests("/v1/items/{item_id}/similar", "GET", "404") == 1
    # Starlette's own routes (the OpenAPI spec) by their path; no route at all is one label.
    assert requests("/openapi.json", "GET", "200") == 1
    assert requests("/openapi.json", "HEAD", "200") == 1  # answered as a GET, counted as what the client sent
    assert requests("unmatched", "GET", "404") == 1
    assert not any("nope.png" in str(labels) or QUERY_ID in str(labels) for _, labels in m)
    assert m[("lookalike_request_seconds_count", (("endpoint", "/v1/search/image"),))] == 2
    for stage, count in (("decode", 2), ("embed", 1), ("search", 3)):
        assert m[("lookalike_stage_seconds_count", (("stage", stage),))] == count, stage
    assert m[("lookalike_batch_size_count", (("batcher", "embed"),))] == 1
    assert m[("lookalike_queue_depth", (("batcher", "search"),))] == 0
    info_key = ("lookalike_index_info", (("index_version", backend.index.version), ("model_version", backend.encoder.version)))
    assert m[info_key] == 1
    assert m[("lookalike_index_items", ())] == len(backend.index)


def test_readyz_waits_for_the_backend(backend: Backend) -> None:
    gate = threading.Event()

    def slow_load() -> Backend:
        gate.wait(60)
        return backend

    app = create_app(slow_load, load_in_background=True)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        try:
            assert http.get("/healthz").json() == {"status": "ok"}  # alive while loading
            not_ready = http.get("/readyz")
            assert not_ready.status_code == 503 and "still loading" in not_ready.json()["detail"]
            assert http.get(f"/v1/items/{QUERY_ID}/similar").status_code == 503
            assert http.get("/v1/info").status_code == 503
        finally:
            gate.set()
        ready = None
        for _ in range(200):
            ready = http.get("/readyz")
            if ready.status_code == 200:
                break
            threading.Event().wait(0.05)
        assert ready.json() == {"status": "ready", "index_version": backend.index.version}
        assert http.get(f"/v1/items/{QUERY_ID}/similar").status_code == 200
