"""A trailing slash names the same resource (``lookalike.serving.slashes``), on the real
server: a POST to ``/v1/search/image/`` is answered, not redirected with an empty body."""

from __future__ import annotations

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from lookalike.model.store import Store


def test_a_search_with_a_trailing_slash_is_answered_not_redirected(http: httpx.Client, indexed_store: Store) -> None:
    query = (indexed_store.corpus_dir / "3" / "digit_0003.png").read_bytes()
    plain = http.post("/v1/search/image", params={"k": 3}, files={"file": ("q.png", query, "image/png")})
    slashed = http.post("/v1/search/image/", params={"k": 3}, files={"file": ("q.png", query, "image/png")})
    assert slashed.status_code == 200, (slashed.status_code, slashed.headers, slashed.text)
    assert [r["id"] for r in slashed.json()["results"]] == [r["id"] for r in plain.json()["results"]]
    dim = http.get("/v1/info").json()["embed_dim"]
    vector = http.post("/v1/search/vector/", json={"vector": np.ones(dim).tolist(), "k": 2})
    assert vector.status_code == 200 and len(vector.json()["results"]) == 2, vector.text
    for path in ("/healthz/", "/readyz/", "/v1/info/"):
        response = http.get(path)
        assert response.status_code == 200 and response.json() == http.get(path[:-1]).json(), path


def test_included_routers_and_item_urls_take_a_trailing_slash_too(http: httpx.Client) -> None:
    """The admin and item routes come from included routers; an item id never ends in '/'."""
    reload = http.post("/v1/admin/reload/")  # no token configured: the route's own answer, not a redirect
    assert reload.status_code == http.post("/v1/admin/reload").status_code != 307, reload.text
    item = http.get("/v1/items/3/digit_0003.png/")
    assert item.status_code == 200 and item.json()["id"] == "3/digit_0003.png", item.text
    assert http.get("/healthz//").status_code == 200


def test_only_known_paths_lose_their_slash(http: httpx.Client) -> None:
    assert http.get("/").status_code == 200
    for path in ("/no/such/page/", "/v1/search/", "/v1/items/"):
        response = http.get(path)
        assert response.status_code == 404, (path, response.status_code)
    wrong_method = http.get("/v1/search/image/")  # the route exists: its own 405, not a redirect
    assert wrong_method.status_code == 405


def test_metrics_label_a_slashed_request_by_its_route(http: httpx.Client) -> None:
    similar = http.get("/v1/items/3/digit_0003.png/similar/", params={"k": 2})
    assert similar.status_code == 200
    assert 'endpoint="/v1/items/{item_id}/similar/"' not in http.get("/metrics").text  # one series per resource

    def count() -> float:
        for family in text_string_to_metric_families(http.get("/metrics").text):
            for s in family.samples:
                if s.name == "lookalike_requests_total" and s.labels == {"endpoint": "/healthz", "method": "GET", "status": "200"}:
                    return s.value
        return 0.0

    before = count()
    assert http.get("/healthz/").status_code == 200
    assert count() == before + 1
