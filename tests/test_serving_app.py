"""The HTTP API and its client end to end: the tiny real store from conftest (model
trained for a few steps, index built by the Beam pipeline), a real uvicorn server on
a free port, requests over HTTP. Nothing is mocked.
"""

from __future__ import annotations

import base64
import copy
import inspect
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from PIL import Image

from lookalike.index.searcher import ItemIndex
from lookalike.model.data import list_images
from lookalike.model.store import Store, StoreError
from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend, BackendMismatchError, check_compatible, load_backend
from lookalike.serving.client import ClientError, SearchClient, format_results
from lookalike.serving.server import ServerStartError, serve, serve_in_thread

QUERY_ID = "3/digit_0003.png"


@pytest.fixture(scope="module")
def workdir(indexed_store: Store) -> Path:
    """The shared tiny store from conftest (digits, tiny model, Beam-built index); read only."""
    return indexed_store.root


@pytest.fixture(scope="module")
def backend(workdir: Path) -> Backend:
    return load_backend(workdir)


@pytest.fixture(scope="module")
def base_url(backend: Backend) -> Iterator[str]:
    with serve_in_thread(create_app(lambda: backend)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        yield client


@pytest.fixture(scope="module")
def query_bytes(workdir: Path) -> bytes:
    return (workdir / "corpus" / QUERY_ID).read_bytes()


def detail_of(response: httpx.Response) -> str:
    return str(response.json()["detail"])


# --- service endpoints -------------------------------------------------------


def test_healthz_and_info(http: httpx.Client, backend: Backend, workdir: Path) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    info = http.get("/v1/info").json()
    assert info["model_version"] == backend.encoder.version == backend.index.model_version
    assert info["index_version"] == backend.index.version
    assert info["item_count"] == len(list_images(workdir / "corpus"))
    assert info["embed_dim"] == 8
    assert info["same_item_threshold"] == pytest.approx(backend.encoder.same_item_threshold)
    assert info["same_item_means"] == "same class"  # trained on labelled classes (an --unlabelled model: "same image")
    assert info["index_quality"]["recall"] == backend.index.manifest["tuning"]["recall"]  # measured at build
    assert info["last_reload_error"] is None and info["reload_count"] == 0
    assert info["frame_count"] == 0  # digits only
    assert backend.index.row_of(info["example_item_id"]) is not None


def test_page_is_self_contained_html(http: httpx.Client) -> None:
    response = http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<title>lookalike" in page and 'id="file-input"' in page
    assert "image-rendering: pixelated" in page
    inline_svg = "http://www.w3.org/2000/svg"  # the inline icon's XML namespace: a name, never fetched
    assert "http://" not in page.replace(inline_svg, "") and "https://" not in page  # no CDN, no external resources


def test_openapi_documents_every_endpoint(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    assert set(spec["paths"]) >= {
        "/healthz", "/v1/info", "/v1/search/image", "/v1/search/vector",
        "/v1/items/{item_id}", "/v1/items/{item_id}/similar", "/v1/items/{item_id}/thumbnail",
    }
    body = spec["paths"]["/v1/search/image"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body
    assert "SearchResponse" in spec["components"]["schemas"]


# --- search ------------------------------------------------------------------


def check_found_itself(response: httpx.Response, k: int) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert len(results) == k
    assert results[0]["id"] == QUERY_ID
    assert results[0]["same_item"] is True
    assert results[0]["distance"] < 1e-3 and results[0]["score"] > 0.999
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert results[0]["thumbnail_url"].startswith(f"/v1/items/{QUERY_ID}/thumbnail?v=")  # versioned by content
    assert results[0]["kind"] == "image" and results[0]["timestamp_s"] is None
    assert "uri" not in results[0]
    return body


def test_image_search_multipart_finds_the_file_itself(http: httpx.Client, query_bytes: bytes, backend: Backend) -> None:
    response = http.post("/v1/search/image", params={"k": 5}, files={"file": ("q.png", query_bytes, "image/png")})
    body = check_found_itself(response, 5)
    assert body["query"] == {
        "type": "image", "k": 5, "filename": "q.png", "bytes": len(query_bytes), "dim": None, "id": None,
        "kind": None, "group": None, "source": None, "tag": None, "max_per_group": None,
    }
    assert body["model_version"] == backend.encoder.version
    assert body["index_version"] == backend.index.version


def test_image_search_raw_body(http: httpx.Client, query_bytes: bytes) -> None:
    response = http.post("/v1/search/image?k=3", content=query_bytes, headers={"content-type": "image/png"})
    check_found_itself(response, 3)


def test_vector_search_with_stored_embedding(http: httpx.Client, workdir: Path) -> None:
    index = ItemIndex.load(Store.at(workdir).require_current_index())
    vector = index.embeddings[index.row_of(QUERY_ID)]
    response = http.post("/v1/search/vector", json={"vector": vector.tolist(), "k": 4})
    body = check_found_itself(response, 4)
    assert body["query"]["type"] == "vector" and body["query"]["dim"] == 8
    # Length does not matter: the query is normalised.
    scaled = http.post("/v1/search/vector", json={"vector": (vector * 7).tolist(), "k": 4}).json()
    assert [r["id"] for r in scaled["results"]] == [r["id"] for r in body["results"]]


def test_similar_excludes_the_item_itself(http: httpx.Client, backend: Backend) -> None:
    response = http.get(f"/v1/items/{QUERY_ID}/similar", params={"k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    ids = [r["id"] for r in body["results"]]
    assert len(ids) == 7 and QUERY_ID not in ids
    assert ids == [n.id for n in backend.index.similar_to(QUERY_ID, 7)]
    assert body["query"]["type"] == "item" and body["query"]["id"] == QUERY_ID
    # An id with '/' may also arrive percent-encoded.
    encoded = http.get(f"/v1/items/{quote(QUERY_ID, safe='')}/similar", params={"k": 7}).json()
    assert [r["id"] for r in encoded["results"]] == ids


# --- items -------------------------------------------------------------------


def test_thumbnail_is_a_png(http: httpx.Client) -> None:
    response = http.get(f"/v1/items/{QUERY_ID}/thumbnail")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(response.content))
    assert img.format == "PNG" and img.size == (32, 32)  # 8x8 digits written 4x, never upscaled


def test_thumbnail_is_a_cacheable_static_resource(http: httpx.Client) -> None:
    """HEAD works, a cache-busting query string is ignored, and a revalidation with the ETag is a 304."""
    url = f"/v1/items/{QUERY_ID}/thumbnail"
    full = http.get(url)
    head = http.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "image/png"
    busted = http.get(url, params={"v": "1732800000"})
    assert busted.status_code == 200 and busted.content == full.content
    etag = full.headers["etag"]
    assert http.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert http.get(url, headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304
    assert http.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    neighbour = http.get(f"/v1/items/{QUERY_ID}/similar", params={"k": 1}).json()["results"][0]["thumbnail_url"]
    assert http.get(neighbour, headers={"If-None-Match": etag}).status_code == 200  # another item, another tag


def test_item_metadata_hides_server_paths(http: httpx.Client, workdir: Path) -> None:
    response = http.get(f"/v1/items/{QUERY_ID}")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == QUERY_ID and body["kind"] == "image"
    assert (body["width"], body["height"]) == (32, 32) and len(body["content_hash"]) == 64
    assert body["similar_url"] == f"/v1/items/{QUERY_ID}/similar"
    assert str(workdir) not in response.text


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"files": {"file": ("notes.txt", b"hello, not an image", "text/plain")}}, "file 'notes.txt': not a usable image"),
        ({"content": b"hello, not an image"}, "not a usable image"),
        ({"content": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}, "not a usable image"),  # truncated PNG
        ({"files": {"file": ("empty.png", b"", "image/png")}}, "file 'empty.png': not a usable image: empty file"),
        ({"content": b""}, "no image in the request: send the image file as the body or as multipart field 'file'"),
        ({"files": {"other": ("q.png", b"x", "image/png")}}, "field 'file'"),
    ],
    ids=["text-upload", "text-body", "truncated-png", "empty-upload", "empty-body", "wrong-field"],
)
def test_image_search_rejects_non_images(http: httpx.Client, kwargs: dict, reason: str) -> None:
    response = http.post("/v1/search/image", **kwargs)
    assert response.status_code == 422, response.text
    assert reason in detail_of(response)


@pytest.mark.parametrize("data, named", [({"k": "2"}, "'k'"), ({"foo": "bar"}, "'foo'")], ids=["k-as-a-field", "unknown"])
def test_a_multipart_field_besides_the_file_is_refused_by_name(http: httpx.Client, query_bytes: bytes, data: dict,
                                                               named: str) -> None:
    """``curl -F file=@q.png -F k=2``: k is a query parameter; the form field is not silently ignored."""
    response = http.post("/v1/search/image?k=5", data=data, files={"file": ("q.png", query_bytes, "image/png")})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", named.strip("'")] and named in error["msg"] and "query parameter" in error["msg"]
    assert error["input"] == next(iter(data.values()))


@pytest.mark.parametrize("headers", [{}, {"content-type": "image/png"}, {"content-length": "0"}],
                         ids=["bare", "typed", "declared-empty"])
def test_image_search_without_a_body_says_no_image_was_sent(base_url: str, headers: dict) -> None:
    """``curl -X POST .../v1/search/image`` sends no body (and no content-length): the answer
    says the request holds no image, not that an (unsent) file is empty."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        request = client.build_request("POST", "/v1/search/image?k=5", headers=headers)
        if "content-length" not in headers:
            request.headers.pop("content-length", None)  # as curl -X POST sends it
        response = client.send(request)
    assert response.status_code == 422, response.text
    assert detail_of(response) == "no image in the request: send the image file as the body or as multipart field 'file'"


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"vector": [0.1, 0.2, 0.3]}', "3 values"),
        ('{"vector": []}', "0 values"),
        ('{"vector": [NaN, 1, 1, 1, 1, 1, 1, 1]}', "NaN"),
        ('{"vector": [1e999, 1, 1, 1, 1, 1, 1, 1]}', "infinite"),
        ('{"vector": [1e39, 1, 1, 1, 1, 1, 1, 1]}', "overflows float32"),  # finite in JSON, not in float32
        ('{"vector": [0, 0, 0, 0, 0, 0, 0, 0]}', "zero"),
        ('{"vector": [1, 1, 1, 1, 1, 1, 1, 1], "k": 0}', "greater than or equal to 1"),
        ('{"vector": "no"}', "list"),
    ],
    ids=["short", "empty", "nan", "inf", "float32-overflow", "zero", "k0", "not-a-list"],
)
def test_vector_search_rejects_bad_vectors(http: httpx.Client, content: str, reason: str) -> None:
    response = http.post("/v1/search/vector", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert reason in detail_of(response)


LONG_BROKEN_VECTOR = '{"vector": [' + "0.1, " * 20_000  # over 64 KiB: parsed off the event loop


@pytest.mark.parametrize("path", ["/v1/search/vector", "/v1/search/batch"])
@pytest.mark.parametrize("body, reason", [
    ('{"vector":[0.1,', "invalid JSON body at character 15: Expecting value"),
    ('{"queries": [{"id": "3/digit_0003.png"},', "invalid JSON body at character 40: Expecting value"),
    ("{not json", "invalid JSON body at character 1: Expecting property name enclosed in double quotes"),
    ('{"k": 5} 7', "invalid JSON body at character 9: Extra data"),
    (LONG_BROKEN_VECTOR, f"invalid JSON body at character {len(LONG_BROKEN_VECTOR)}: Expecting value"),
], ids=["cut-vector", "cut-batch", "not-json", "extra-data", "long"])
@pytest.mark.parametrize("headers, query", [
    ({"content-type": "application/json"}, ""),  # the fast path parses it
    ({"content-type": "application/json"}, "?k=2"),  # FastAPI parses it (a query parameter: no fast path)
    ({"content-type": "application/x-www-form-urlencoded"}, ""),  # curl -d without -H: taken as JSON
    ({}, ""),
], ids=["fast", "fastapi", "curl-d", "no-type"])
def test_a_body_that_is_not_json_is_a_400_saying_where(http: httpx.Client, path: str, body: str, reason: str,
                                                        headers: dict, query: str) -> None:
    """Malformed JSON is a malformed request (400, as a malformed multipart form), with the parser's
    reason and position, on every JSON endpoint and whichever path parses it."""
    response = http.post(path + query, content=body.encode(), headers=headers)
    assert response.status_code == 400, response.text
    assert response.json() == {"detail": reason}


@pytest.mark.parametrize("path, body, where", [
    ("/v1/search/vector", {"vector": [0.1] * 8, "kinds": "image"}, ["body", "kinds"]),
    ("/v1/search/batch", {"queries": [{"id": QUERY_ID, "k": 2}]}, ["body", "queries", 0, "k"]),
    ("/v1/search/batch", {"queries": [{"id": QUERY_ID}], "knd": "frame"}, ["body", "knd"]),
])
def test_unknown_body_fields_are_422_not_ignored(http: httpx.Client, path: str, body: dict, where: list) -> None:
    """A typo, or k given per query of a batch (it is the batch's), must not be silently dropped."""
    response = http.post(path, json=body)
    assert response.status_code == 422, response.text
    assert any(e["loc"] == where and e["type"] == "extra_forbidden" for e in response.json()["detail"]), response.text


@pytest.mark.parametrize("method, path, params, unknown", [
    ("POST", "/v1/search/image", "k=2&max_per_grop=1", "max_per_grop"),
    ("POST", "/v1/search/vector", "k=2", "k"),  # k goes in the body of a vector search
    ("POST", "/v1/search/batch", "kind=image", "kind"),
    ("GET", f"/v1/items/{QUERY_ID}/similar", "k=2&knd=frame&group=3", "knd"),
    ("GET", f"/v1/items/{QUERY_ID}", "fields=all", "fields"),
])
def test_unknown_query_parameters_are_422_not_ignored(http: httpx.Client, query_bytes: bytes, workdir: Path,
                                                        method: str, path: str, params: str, unknown: str) -> None:
    """A typo in a filter must not silently run an unfiltered search: the 422 names the parameter."""
    body = {}
    if path == "/v1/search/image":
        body = {"content": query_bytes}
    elif path == "/v1/search/vector":
        body = {"json": {"vector": [0.1] * load_backend(workdir).index.embed_dim}}
    elif path == "/v1/search/batch":
        body = {"json": {"queries": [{"id": QUERY_ID}]}}
    response = http.request(method, f"{path}?{params}", **body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [e["loc"] for e in errors] == [["query", unknown]], response.text
    assert errors[0]["type"] == "extra_forbidden" and repr(unknown) in errors[0]["msg"]
    assert http.request(method, path, **body).status_code == 200  # the same request without it is fine


@pytest.mark.parametrize("k", [0, -1, 101, 1000])
def test_k_out_of_range_is_422(http: httpx.Client, query_bytes: bytes, k: int) -> None:
    assert http.post("/v1/search/image", params={"k": k}, content=query_bytes).status_code == 422
    assert http.get(f"/v1/items/{QUERY_ID}/similar", params={"k": k}).status_code == 422


@pytest.mark.parametrize("suffix", ["", "/similar", "/thumbnail"])
def test_unknown_item_is_404(http: httpx.Client, suffix: str) -> None:
    response = http.get(f"/v1/items/9/no_such_digit.png{suffix}")
    assert response.status_code == 404
    assert detail_of(response) == "unknown item id '9/no_such_digit.png'"


def test_a_long_unknown_id_is_not_echoed_whole(http: httpx.Client) -> None:
    response = http.get(f"/v1/items/{'a' * 20_000}/similar")
    assert response.status_code == 404
    assert detail_of(response) == f"unknown item id '{'a' * 100}... (20000 characters)'"


def test_unknown_video_id_explains_frame_ids(http: httpx.Client) -> None:
    response = http.get("/v1/items/clips/walk.mp4/similar")
    assert response.status_code == 404
    assert detail_of(response) == ("unknown item id 'clips/walk.mp4': a video's frames are the items "
                                   "'clips/walk.mp4#t=<seconds>' (in a URL, send '#' as %23)")


@pytest.mark.parametrize("item_id", ["../../../../etc/passwd", "/etc/passwd", "3/../3/digit_0003.png", "ABSOLUTE"])
def test_thumbnail_never_follows_paths_from_the_request(http: httpx.Client, workdir: Path, item_id: str) -> None:
    if item_id == "ABSOLUTE":  # a real file's absolute path is still not an id
        item_id = str(workdir / "corpus" / QUERY_ID)
    response = http.get(f"/v1/items/{quote(item_id, safe='')}/thumbnail")
    assert response.status_code == 404
    assert "unknown item id" in detail_of(response)


def test_upload_limit_is_413(backend: Backend, query_bytes: bytes) -> None:
    limit = 1000
    with serve_in_thread(create_app(lambda: backend, max_upload_bytes=limit)) as url, httpx.Client(base_url=url) as http:
        assert http.get("/v1/info").json()["max_upload_bytes"] == limit
        # Under the limit: fine.
        check_found_itself(http.post("/v1/search/image?k=2", files={"file": ("q.png", query_bytes)}), 2)
        over = b"\x89PNG" + b"\0" * (limit + 10)
        refused = [
            http.post("/v1/search/image", files={"file": ("big.png", over)}),  # file checked exactly
            http.post("/v1/search/image", content=over * 30),  # Content-Length refused up front
            http.post("/v1/search/image", content=iter([over] * 30)),  # chunked, counted while streaming
            http.post("/v1/search/vector", content=b"[" * 100_000, headers={"content-type": "application/json"}),
        ]
        for response in refused:
            assert response.status_code == 413, response.text
            assert detail_of(response) == f"the request body exceeds the limit of {limit} bytes"


def test_size_limits_read_in_mib_or_kib() -> None:
    from lookalike.serving.limits import PayloadTooLarge, size_text

    assert PayloadTooLarge(10 << 20).detail == "the request body exceeds the limit of 10 MiB (10485760 bytes)"
    assert size_text(64 << 10) == "64 KiB (65536 bytes)" and size_text(1000) == "1000 bytes"
    assert size_text((1 << 20) + 1) == "1048577 bytes"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused(http: httpx.Client) -> None:
    bomb = png_header_only(30_000, 30_000)  # 900 megapixels declared in under 100 bytes
    response = http.post("/v1/search/image", content=bomb)
    assert response.status_code == 422 and "decompression bomb" in detail_of(response)
    encoded = base64.b64encode(bomb).decode()
    response = http.post("/v1/search/batch", json={"queries": [{"image_base64": encoded}]})
    assert response.status_code == 422 and "decompression bomb" in detail_of(response)


def test_binds_loopback_by_default(backend: Backend) -> None:
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    with serve_in_thread(create_app(lambda: backend)) as url:
        assert url.startswith("http://127.0.0.1:")


# --- loading and startup -----------------------------------------------------


def test_mismatched_model_and_index_are_refused(backend: Backend) -> None:
    other = copy.copy(backend.index)
    other.model_version = "m-000000000000"
    with pytest.raises(BackendMismatchError, match="lookalike embed"):
        check_compatible(backend.encoder, other, "/w")
    check_compatible(backend.encoder, backend.index, "/w")  # the real pair is fine


def test_serve_fails_fast_without_an_index(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist: run `lookalike demo"):
        serve(tmp_path / "missing", port=0)
    with pytest.raises(StoreError, match="lookalike embed"):
        serve(tmp_path, port=0)


def test_startup_failure_is_reported_with_its_cause() -> None:
    def broken() -> Backend:
        raise StoreError("no trained model: run `lookalike train` first")

    with pytest.raises(ServerStartError) as caught:
        with serve_in_thread(create_app(broken)):
            pass
    assert isinstance(caught.value.__cause__, ServerStartError)
    assert isinstance(caught.value.__cause__.__cause__, StoreError)


# --- client ------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[SearchClient]:
    with SearchClient(base_url) as c:
        yield c


def test_client_searches(client: SearchClient, workdir: Path, query_bytes: bytes, backend: Backend) -> None:
    assert client.health() == {"status": "ok"}
    assert client.info()["item_count"] == len(backend.index)
    by_path = client.search_image(workdir / "corpus" / QUERY_ID, k=3)
    by_bytes = client.search_image(query_bytes, k=3)
    assert by_path["results"] == by_bytes["results"]
    assert by_path["results"][0]["id"] == QUERY_ID
    vector = backend.index.embeddings[backend.index.row_of(QUERY_ID)]
    assert client.search_vector(vector, k=2)["results"][0]["id"] == QUERY_ID
    similar = client.similar(QUERY_ID, k=4)["results"]
    assert len(similar) == 4 and QUERY_ID not in [r["id"] for r in similar]
    assert client.item(QUERY_ID)["id"] == QUERY_ID


def test_client_batch_filters_and_reload(client: SearchClient, workdir: Path, backend: Backend) -> None:
    vector = backend.index.embeddings[backend.index.row_of(QUERY_ID)]
    responses = client.search_batch(vectors=[vector], ids=[QUERY_ID], images=[workdir / "corpus" / QUERY_ID], k=3)
    assert [r["query"]["type"] for r in responses] == ["vector", "item", "image"]
    assert responses[0]["results"][0]["id"] == QUERY_ID and responses[2]["results"][0]["id"] == QUERY_ID
    crowded = client.similar(QUERY_ID, k=5, kind="image", max_per_group=1)
    assert crowded["query"]["kind"] == "image" and crowded["query"]["max_per_group"] == 1
    assert client.search_vector(vector, k=2, group=["no-such-video"])["results"] == []
    for one_value in ("no-such-video", ("no-such-video",)):  # one value alone, or a tuple: as image and similar take it
        assert client.search_vector(vector, k=2, group=one_value)["results"] == []
        assert client.search_batch(ids=[QUERY_ID], k=2, group=one_value)[0]["results"] == []
    served = client.info()["model_version"]
    assert client.search_vector(vector, k=1, model_version=served)["results"][0]["id"] == QUERY_ID
    assert client.search_batch(vectors=[vector], k=1, model_version=served)[0]["results"][0]["id"] == QUERY_ID
    for search in (lambda: client.search_vector(vector, model_version="m-other"),
                   lambda: client.search_batch(vectors=[vector], model_version="m-other")):
        with pytest.raises(ClientError) as stale:
            search()
        assert stale.value.status == 409 and "m-other" in stale.value.message
    with pytest.raises(TypeError, match="unknown search filter"):
        client.similar(QUERY_ID, colour="red")
    with pytest.raises(ClientError) as caught:
        client.reload("some-token")
    assert caught.value.status in (401, 403)


def test_client_errors_carry_status_and_reason(client: SearchClient, tmp_path: Path) -> None:
    with pytest.raises(ClientError) as caught:
        client.similar("9/no_such_digit.png")
    assert caught.value.status == 404 and "unknown item id" in str(caught.value)
    with pytest.raises(ClientError) as caught:
        client.search_image(b"not an image")
    assert caught.value.status == 422 and "not a usable image" in caught.value.message
    with pytest.raises(ClientError) as caught:
        client.search_vector([1.0, 2.0], k=1000)
    assert caught.value.status == 422 and "k: Input should be less than or equal to 100" in caught.value.message
    with pytest.raises(ClientError, match="cannot read query image"):
        client.search_image(tmp_path / "missing.png")


def test_client_assumes_http_for_an_address_without_scheme_and_refuses_nan(client: SearchClient, base_url: str) -> None:
    bare = base_url.removeprefix("http://") + "/"
    with SearchClient(bare) as c:  # 127.0.0.1:PORT/
        assert c.base_url == base_url and c.health() == {"status": "ok"}
    for url, reason in [("", "the server address is empty"), ("ftp://127.0.0.1:9", "only http:// and https://"),
                        ("127.0.0.1:abc", "'127.0.0.1:abc' is not a valid URL: Invalid port: 'abc'"),
                        ("http://", "names no host"),
                        (f"{base_url}/v1/info?x", rf"has a path or query: give the server's root \({base_url}\)")]:
        with pytest.raises(ValueError, match=reason):
            SearchClient(url)
    with pytest.raises(ValueError) as caught:  # before any request, not json's "Out of range float values"
        client.search_vector([0.5, float("nan")] + [0.5] * 6)
    assert str(caught.value) == "vector value nan at position 1 is not a finite number (NaN and infinity are not allowed)"
    with pytest.raises(ValueError, match=r"vectors\[1\] value inf at position 0"):
        client.search_batch(vectors=[[0.5] * 8, [float("inf")] + [0.5] * 7])


def test_client_reports_an_unreachable_server() -> None:
    with SearchClient("http://127.0.0.1:9", timeout_s=2) as c, pytest.raises(ClientError) as caught:
        c.health()
    assert caught.value.status is None and "lookalike serve" in caught.value.message


def test_format_results_table(client: SearchClient) -> None:
    text = format_results(client.similar(QUERY_ID, k=3))
    lines = text.splitlines()
    assert lines[0].startswith(f"items like {QUERY_ID}, k=3: 3 result(s) from model m-")
    assert lines[1].split() == ["#", "id", "score", "distance", "same", "item"]
    assert len(lines) == 5 and lines[2].split()[0] == "1"
    empty = format_results({"query": {"type": "vector", "dim": 8, "k": 1}, "results": []})
    assert "0 result(s)" in empty
    frames = format_results({"query": {"type": "id", "id": "v.mp4#t=0.000", "k": 2}, "results": [
        {"id": "v.mp4#t=2.000", "score": 0.9, "distance": 0.4, "same_item": True, "timestamp_s": 2.0},
        {"id": "a.png", "score": 0.5, "distance": 1.0, "same_item": False, "timestamp_s": None},
        {"id": "b.png", "score": 0.4, "distance": 1.1, "same_item": None, "timestamp_s": None}]}).splitlines()
    assert frames[1].split()[-2:] == ["video", "time"]  # the time has a column of its own, not the "same item" one
    assert frames[2].split()[-2:] == ["yes", "2.00s"] and frames[3].split()[-1] == "-"
    assert frames[4].split()[-1] == "unknown"  # a model without a threshold: not "no"
    assert "metadata" not in "\n".join(frames) and "metadata" not in text  # no column when no result has any


def test_format_results_keeps_one_row_per_result_whatever_the_id() -> None:
    """A file name holding a newline split its row in two; spaces at its ends vanished."""
    results = [{"id": i, "score": 0.5, "distance": 1.0, "same_item": False} for i in ("nl\nname.png", " lead.png", "b c.png")]
    lines = format_results({"query": {"type": "vector", "dim": 8, "k": 3}, "results": results}).splitlines()
    assert len(lines) == 5
    width = len("'nl\\nname.png'")
    assert [line[5:5 + width] for line in lines[2:]] == [c.ljust(width) for c in ("'nl\\nname.png'", "' lead.png'", "b c.png")]


def test_format_results_shows_metadata_in_a_last_column() -> None:
    lines = format_results({"query": {"type": "item", "id": "a.png", "k": 3}, "results": [
        {"id": "b.png", "score": 0.9, "distance": 0.4, "same_item": True, "timestamp_s": None,
         "metadata": {"tags": ["cat", "indoor"], "source": "scanner", "year": 2020}},
        {"id": "v.mp4#t=2.000", "score": 0.5, "distance": 1.0, "same_item": False, "timestamp_s": 2.0, "metadata": None},
        {"id": "c.png", "score": 0.4, "distance": 1.1, "same_item": False, "metadata": {"source": "web", "tags": []}}],
    }).splitlines()
    assert lines[1].split()[-3:] == ["video", "time", "metadata"]
    column = lines[1].index("metadata")
    assert lines[2][column:] == "scanner #cat #indoor year=2020"  # source first, then #tags, then other fields
    assert lines[3][column:] == "-" and lines[3].split()[-2] == "2.00s"
    assert lines[4][column:] == "web"
