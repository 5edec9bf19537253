"""Small API edges on the real server (conftest's tiny store, 127.0.0.1): media types ignore
case, a JSON body without a JSON content type, scores within [-1, 1], /v1/info's counts,
and the admin endpoint's unknown query parameters."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from lookalike.model.store import Store
from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend
from lookalike.serving.server import serve_in_thread

QUERY_ID = "3/digit_0003.png"
TOKEN = "edge-token-123"


@pytest.fixture(scope="module")
def http(backend: Backend) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(lambda: backend, admin_token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_multipart_media_type_ignores_case(http: httpx.Client, indexed_store: Store) -> None:
    png = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
    request = http.build_request("POST", "/v1/search/image?k=1", files={"file": ("q.png", png)})
    boundary = request.headers["content-type"].split("boundary=")[1]
    response = http.post("/v1/search/image?k=1", content=request.read(),
                         headers={"content-type": f"Multipart/Form-Data; boundary={boundary}"})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["id"] == QUERY_ID and response.json()["query"]["filename"] == "q.png"


@pytest.mark.parametrize("cut", ["closing_boundary", "mid_image", "mid_part_headers"])
def test_a_multipart_body_cut_short_is_a_400_saying_so_not_a_missing_file(http: httpx.Client, indexed_store: Store,
                                                                           cut: str) -> None:
    png = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\nContent-Type: image/png\r\n\r\n'
    whole = head + png + b"\r\n--B--\r\n"
    body = {"closing_boundary": whole[:-4], "mid_image": head + png[:40], "mid_part_headers": head[:40]}[cut]
    response = http.post("/v1/search/image?k=1", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (f"malformed multipart upload: the body ({len(body):,} bytes) ends before the "
                                         "form's closing boundary '--B--' (cut short in transit, or not a multipart form?)")
    complete = http.post("/v1/search/image?k=1", content=whole, headers={"content-type": 'multipart/form-data; boundary="B"'})
    assert complete.status_code == 200 and complete.json()["results"][0]["id"] == QUERY_ID, complete.text
    no_file = b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\nnot a file\r\n--B--\r\n'
    named = http.post("/v1/search/image?k=1", content=no_file, headers={"content-type": "multipart/form-data; boundary=B"})
    assert named.status_code == 422 and named.json()["detail"] == "multipart upload needs a file in field 'file'"


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/x-www-form-urlencoded"}])  # curl -d
def test_a_json_body_without_its_content_type(http: httpx.Client, backend: Backend, headers: dict) -> None:
    body = json.dumps({"vector": [1.0] * backend.index.embed_dim, "k": 2}).encode()
    response = http.post("/v1/search/vector", content=body, headers=headers)
    assert response.status_code == 200, response.text


def test_a_body_that_is_not_json_says_which_content_type_it_needs(http: httpx.Client) -> None:
    response = http.post("/v1/search/vector", content=b"vector=1", headers={"content-type": "text/plain"})
    assert response.status_code == 422
    assert "Content-Type: application/json" in response.json()["detail"] and "text/plain" in response.json()["detail"]


def test_scores_are_within_their_range(http: httpx.Client) -> None:
    for _ in range(3):
        results = http.get(f"/v1/items/{QUERY_ID}/similar", params={"k": 50}).json()["results"]
        results += http.post("/v1/search/batch", json={"queries": [{"id": QUERY_ID}], "k": 50}).json()["responses"][0]["results"]
        assert all(-1.0 <= r["score"] <= 1.0 and r["distance"] >= 0.0 for r in results)


def test_info_reports_batching_counts_as_integers(http: httpx.Client) -> None:
    batching = http.get("/v1/info").json()["batching"]
    assert isinstance(batching["max_batch"], int) and isinstance(batching["max_embed_batch"], int), batching
    assert '"max_batch":64,' in http.get("/v1/info").text.replace(" ", "")


def test_admin_reload_refuses_unknown_query_parameters(http: httpx.Client) -> None:
    response = http.post("/v1/admin/reload?force=true", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "force"]
