"""The search endpoints' fast path (``lookalike.serving.fastpath``) answers exactly as
FastAPI does: the same requests, well-formed and malformed, sent to a server with
fast paths and to one without give the same status and body; well-formed ones are
answered by the fast path and everything else falls back to FastAPI (a fallback after
the fast path has read the body still sees the body)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from lookalike.model.store import Store
from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend, load_backend
from lookalike.serving.engine import NO_FILTERS, Filters
from lookalike.serving.fastpath import FastRoute, fast_routes_first, search_params, set_fast_path
from lookalike.serving.schemas import DEFAULT_K, MAX_K
from lookalike.serving.server import serve_in_thread

QUERY_ID = "3/digit_0003.png"


@pytest.fixture(scope="module")
def backend(tagged_store: Store) -> Backend:
    """The tiny store with source and tags metadata (conftest's ``tagged_store``)."""
    return load_backend(tagged_store.root)


def fast_routes(app: FastAPI) -> dict[str, FastRoute]:
    return {route.path: route for route in app.router.routes if isinstance(route, FastRoute) and route.fast is not None}


class Outcomes:
    """Wraps every fast handler of an app, recording per path whether it answered (or raised) or fell back."""

    def __init__(self, app: FastAPI):
        self.log: list[tuple[str, bool]] = []
        for path, route in fast_routes(app).items():
            route.fast = self._recording(path, route.fast)

    def _recording(self, path, fast):
        async def recorded(request):
            answered = True  # a response, or an HTTPException (e.g. 422 for a bad upload)
            try:
                response = await fast(request)
                answered = response is not None
                return response
            finally:
                self.log.append((path, answered))

        return recorded

    def take(self) -> list[tuple[str, bool]]:
        out, self.log[:] = list(self.log), []
        return out


@pytest.fixture(scope="module")
def servers(backend: Backend) -> Iterator[tuple[httpx.Client, httpx.Client, Outcomes]]:
    fast_app, plain_app = create_app(lambda: backend), create_app(lambda: backend)
    assert set(fast_routes(fast_app)) == {"/v1/search/image", "/v1/search/vector", "/v1/search/batch"}
    for route in fast_routes(plain_app).values():
        route.fast = None  # plain FastAPI
    outcomes = Outcomes(fast_app)
    with serve_in_thread(fast_app) as fast_url, serve_in_thread(plain_app) as plain_url, \
            httpx.Client(base_url=fast_url, timeout=30) as fast, httpx.Client(base_url=plain_url, timeout=30) as plain:
        yield fast, plain, outcomes


def same_answer(servers, method: str, url: str, **kwargs) -> tuple[httpx.Response, list[tuple[str, bool]]]:
    fast, plain, outcomes = servers
    outcomes.take()
    a, b = fast.request(method, url, **kwargs), plain.request(method, url, **kwargs)
    assert a.status_code == b.status_code, (url, a.text, b.text)
    assert a.headers["content-type"] == b.headers["content-type"]
    assert a.content == b.content, (url, a.text, b.text)
    return a, outcomes.take()


@pytest.fixture(scope="module")
def query_png(tagged_store: Store) -> bytes:
    return (tagged_store.corpus_dir / QUERY_ID).read_bytes()


ACCEPTED_QUERIES = ["", "k=5", "k=1", f"k={MAX_K}", "kind=image", "kind=frame&k=3", "group=3&group=7",
                    "max_per_group=2", "k=%35", "kind=image&group=3&max_per_group=1&k=7", "tag=odd", "tag=three&tag=even&k=20",
                    "source=web", "source=web&source=scanner&tag=odd&kind=image&max_per_group=1", "source=nowhere"]
REFUSED_QUERIES = ["k=0", f"k={MAX_K + 1}", "k=05", "k=+5", "k=%205", "k=5&k=6", "k=", "k=1e1", "k=five", "kind=video",
                   "kind=image&kind=frame", "max_per_group=0", "max_per_group=x", "max_per_group=1&max_per_group=2",
                   "&".join(["group=g"] * (MAX_K + 1)), "k=4&unknown=x", "max_per_grop=1", "k=4&K=5",
                   "&".join(["tag=t"] * (MAX_K + 1)), "&".join(["source=s"] * (MAX_K + 1)), "tags=odd", "Tag=odd",
                   "group=", "tag=", "tag=odd&tag="]


@pytest.mark.parametrize("query", ACCEPTED_QUERIES + REFUSED_QUERIES)
def test_image_search_answers_as_fastapi(servers, query_png: bytes, query: str) -> None:
    response, outcomes = same_answer(servers, "POST", f"/v1/search/image?{query}", content=query_png,
                                     headers={"content-type": "image/png"})
    assert outcomes == [("/v1/search/image", query in ACCEPTED_QUERIES)]
    if query in ACCEPTED_QUERIES:
        assert response.status_code == 200


@pytest.mark.parametrize("content, status", [(b"not an image", 422), (b"", 422)])
def test_image_search_errors_are_fastapis(servers, content: bytes, status: int) -> None:
    response, outcomes = same_answer(servers, "POST", "/v1/search/image?k=3", content=content)
    assert response.status_code == status and outcomes == [("/v1/search/image", True)]


def test_multipart_image_search(servers, query_png: bytes) -> None:
    response, _ = same_answer(servers, "POST", "/v1/search/image", files={"file": ("q.png", query_png, "image/png")})
    assert response.json()["query"]["filename"] == "q.png"
    rgb = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(rgb, format="PNG")
    response, _ = same_answer(servers, "POST", "/v1/search/image", files={"other": ("q.png", rgb.getvalue(), "image/png")})
    assert response.status_code == 422


def vector_bodies(dim: int) -> list[tuple[bytes, str, bool]]:
    """(body, content type, whether the fast path answers it)."""
    v = [1.0] + [0.0] * (dim - 1)
    ok = [
        (json.dumps({"vector": v}), "application/json"),
        (json.dumps({"vector": v, "k": 3, "kind": "image", "max_per_group": 1}), "application/json"),
        (json.dumps({"vector": v, "k": "4", "group": ["3"]}), "application/json; charset=utf-8"),
        (json.dumps({"vector": v, "k": 9, "tag": ["three", "even"], "source": ["web"]}), "application/json"),
        (json.dumps({"vector": [str(x) for x in v]}), "Application/JSON"),
        (json.dumps({"vector": [0.0] * dim}), "application/json"),  # 422 from the endpoint itself, on both paths
        (json.dumps({"vector": v[:-1]}), "application/json"),  # wrong length: same
        ('{"vector": [NaN' + ", 0" * (dim - 1) + "]}", "application/json"),
        # invalid JSON bodies: the fast path raises FastAPI's 422 itself (not validating twice)
        (json.dumps({"vector": v, "k": 0}), "application/json"),
        (json.dumps({"vector": v, "k": MAX_K + 1}), "application/json"),
        (json.dumps({"vector": v, "kind": "video"}), "application/json"),
        (json.dumps({"vector": v, "extra": True}), "application/json"),  # unknown fields
        (json.dumps({"vector": v, "tags": ["odd"]}), "application/json"),
        (json.dumps({"vector": v, "tag": "odd"}), "application/json"),  # a list, as group
        (json.dumps({"k": 3}), "application/json"),
        (json.dumps([v]), "application/json"),
        ("{not json", "application/json"),  # the same 400 as FastAPI's JSON decode error, without parsing twice
        ("[" * 100_000 + "]" * 100_000, "application/json"),  # too deep: the same 400, saying so, on both paths
    ]
    refused = [
        ("", "application/json"),
        (json.dumps({"vector": v}), "text/plain"),
        (json.dumps({"vector": v}), "application/vnd.lookalike+json"),
    ]
    return [(b.encode(), ct, True) for b, ct in ok] + [(b.encode(), ct, False) for b, ct in refused]


def test_vector_search_answers_as_fastapi(servers, backend: Backend) -> None:
    for body, content_type, fast in vector_bodies(backend.index.embed_dim):
        response, outcomes = same_answer(servers, "POST", "/v1/search/vector", content=body,
                                         headers={"content-type": content_type})
        # (and a fallback's FastAPI saw the body the fast path had already read: same answer)
        assert outcomes == [("/v1/search/vector", fast)], (body[:80], content_type)


def test_batch_search_answers_as_fastapi(servers, backend: Backend) -> None:
    v = [1.0] + [0.0] * (backend.index.embed_dim - 1)
    bodies = [
        ({"queries": [{"vector": v}, {"id": QUERY_ID}], "k": 3}, True),
        ({"queries": [{"vector": v[:-1]}]}, True),  # the endpoint's own 422
        ({"queries": [{"id": "no/such.png"}]}, True),  # 404
        ({"queries": [{"id": QUERY_ID, "k": 2}]}, True),  # invalid: the fast path raises the same 422
        ({"queries": []}, True),
    ]
    for body, fast in bodies:
        response, outcomes = same_answer(servers, "POST", "/v1/search/batch", json=body)
        assert outcomes == [("/v1/search/batch", fast)], body


def test_vector_search_with_a_query_string_answers_as_fastapi(servers, backend: Backend) -> None:
    body = json.dumps({"vector": [1.0] + [0.0] * (backend.index.embed_dim - 1)}).encode()
    for query, status in [("k=3", 422), ("", 200)]:  # the vector endpoint takes no query parameter
        response, outcomes = same_answer(servers, "POST", f"/v1/search/vector?{query}", content=body,
                                         headers={"content-type": "application/json"})
        assert response.status_code == status and outcomes == [("/v1/search/vector", not query)], response.text


def test_other_endpoints_are_untouched(servers) -> None:
    _, outcomes = same_answer(servers, "GET", f"/v1/items/{QUERY_ID}/similar?k=3")
    assert outcomes == []
    same_answer(servers, "GET", "/v1/search/image")  # 405 from FastAPI on both
    fast, plain, _ = servers
    assert fast.get("/openapi.json").json() == plain.get("/openapi.json").json()


def test_search_params_read_what_fastapi_reads() -> None:
    assert search_params(b"") == (DEFAULT_K, NO_FILTERS)
    assert search_params(b"k=7&other=1") is None  # FastAPI's 422 names it
    assert search_params(b"kind=frame&group=a&group=b%2Fc&max_per_group=2") == (
        DEFAULT_K, Filters.of("frame", ["a", "b/c"], 2))
    assert search_params(b"k=100&max_per_group=100") == (100, Filters.of(max_per_group=100))
    assert search_params(b"tag=a&source=s&tag=b%20c") == (DEFAULT_K, Filters.of(source=["s"], tag=["a", "b c"]))
    assert Filters.of(source=["s"], tag=["a"]).where == {"source": ["s"], "tags": ["a"]}  # tag filters the tags column
    for refused in (b"k=0", b"k=101", b"k=007", b"k=-1", b"k=1.0", b"kind=", b"max_per_group=101"):
        assert search_params(refused) is None, refused


def test_fast_routes_are_matched_first_and_documented_in_declared_order(backend: Backend) -> None:
    app = create_app(lambda: backend)
    assert [route.path for route in app.router.routes[:2]] == ["/v1/search/image", "/v1/search/vector"]
    paths = list(app.openapi()["paths"])
    assert paths.index("/v1/info") < paths.index("/v1/search/image") < paths.index("/v1/search/vector") < paths.index("/v1/search/batch")


def test_a_fast_route_another_route_also_matches_stays_in_place() -> None:
    app = FastAPI()
    app.router.route_class = FastRoute

    @app.get("/{anything:path}")
    def catch_all(anything: str) -> str:
        return anything

    @app.get("/x")
    def x() -> str:
        return "x"

    async def fast(request):
        return None

    set_fast_path(app, "/x", "GET", fast)
    with pytest.raises(ValueError, match="also matched"):
        fast_routes_first(app)
    assert [route.path for route in app.router.routes][-2:] == ["/{anything:path}", "/x"]


def test_a_fast_handler_that_fails_leaves_the_request_to_fastapi_once(backend: Backend) -> None:
    """FastDispatch (outside the middleware) hands a request its fast handler failed on to the
    full stack, body replayed, and FastRoute does not offer it to the handler a second time."""
    app = create_app(lambda: backend)
    calls: list[bytes] = []

    async def broken(request):
        calls.append(await request.body())
        raise RuntimeError("a bug in the fast path")

    set_fast_path(app, "/v1/search/vector", "POST", broken)
    vector = backend.index.embeddings[0].tolist()
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/v1/search/vector", json={"vector": vector, "k": 2})
        metrics = http.get("/metrics").text
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2
    assert len(calls) == 1 and json.loads(calls[0])["k"] == 2
    assert 'lookalike_requests_total{endpoint="/v1/search/vector",method="POST",status="200"} 1.0' in metrics


def test_source_and_tag_are_answered_on_the_fast_path_with_filtered_results(servers, query_png: bytes, backend: Backend) -> None:
    response, outcomes = same_answer(servers, "POST", "/v1/search/image?k=25&tag=odd&source=web", content=query_png,
                                     headers={"content-type": "image/png"})
    assert outcomes == [("/v1/search/image", True)]
    results = response.json()["results"]
    tags = {item["id"]: item["tags"] for item in backend.index.items}
    assert len(results) == 25 and all("odd" in tags[r["id"]] for r in results)
    assert response.json()["query"]["source"] == ["web"]
