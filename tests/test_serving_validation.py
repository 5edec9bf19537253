"""Malformed JSON bodies cost bounded work and get bounded answers: a huge invalid vector is
refused by its length before any element is validated, a 422 reports at most the first
errors (and how many there were) without echoing huge inputs, and the server keeps
answering other requests meanwhile. Real server on 127.0.0.1, the tiny store from conftest."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from lookalike.model.store import Store
from lookalike.serving.backend import Backend
from lookalike.serving.schemas import DEFAULT_K, MAX_DIM
from lookalike.serving.validation import MAX_REPORTED_ERRORS, short_input

QUERY_ID = "3/digit_0003.png"


@pytest.mark.parametrize("path, body", [
    ("/v1/search/vector", {"vector": ["x"] * 1_000_000}),
    ("/v1/search/batch", {"queries": [{"vector": ["x"] * 200_000}] * 3}),
])
def test_a_huge_invalid_vector_is_refused_by_its_length(http: httpx.Client, path: str, body: dict) -> None:
    content = json.dumps(body).encode()
    started = time.perf_counter()
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    assert response.status_code == 422, response.text[:500]
    assert len(response.content) < 10_000, len(response.content)
    errors = response.json()["detail"]
    assert errors[0]["type"] == "too_long" and str(MAX_DIM) in errors[0]["msg"], errors[0]
    assert "array of" in str(errors[0]["input"])  # summarised, not echoed
    assert elapsed < 5, elapsed


def test_many_errors_are_capped_and_counted(http: httpx.Client, backend: Backend) -> None:
    dim = backend.index.embed_dim
    body = {"queries": [{"vector": ["x" * 10_000] * dim} for _ in range(20)]}
    response = http.post("/v1/search/batch", json=body)
    assert response.status_code == 422
    payload = response.json()
    assert len(payload["detail"]) == MAX_REPORTED_ERRORS
    assert payload["error_count"] == 20 * dim
    assert all(len(str(e["input"])) < 200 for e in payload["detail"])
    assert payload["detail"][0]["loc"] == ["body", "queries", 0, "vector", 0]


def test_the_server_answers_while_a_large_body_is_validated(http: httpx.Client, backend: Backend) -> None:
    """A batch of valid-looking but wrong vectors near the body limit: /healthz stays quick meanwhile."""
    content = json.dumps({"queries": [{"vector": [0.5] * MAX_DIM}] * 64}).encode()  # ~3 MB of floats
    done = threading.Event()
    results: list[int] = []

    def post() -> None:
        results.append(http.post("/v1/search/batch", content=content, headers={"content-type": "application/json"}).status_code)
        done.set()

    thread = threading.Thread(target=post)
    thread.start()
    worst = 0.0
    while not done.is_set():
        started = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        worst = max(worst, time.perf_counter() - started)
    thread.join()
    assert results == [422]  # wrong dimension
    assert worst < 1.0, worst


def test_short_input() -> None:
    assert short_input("x" * 5) == "x" * 5
    assert short_input("x" * 1000).endswith("(1000 characters)")
    assert short_input(list(range(100))) == "<array of 100 values>"
    assert short_input({"a": [1, 2]}) == {"a": [1, 2]}
    assert short_input([float("nan"), float("inf"), -float("inf"), 1.5]) == ["NaN", "Infinity", "-Infinity", 1.5]
    assert short_input(10**30) == 10**30  # a number of ordinary size is echoed as it is
    assert short_input(-(10**4000)) == "-1" + "0" * 19 + "... (4001 digits)"


@pytest.mark.parametrize("path", ["/v1/search/vector", "/v1/search/batch"])
def test_an_integer_too_large_for_a_float_is_named_so_and_echoed_short(http: httpx.Client, backend: Backend,
                                                                        path: str) -> None:
    vector = ", ".join(["9" * 4000] * backend.index.embed_dim)
    body = f'{{"vector": [{vector}]}}' if path.endswith("vector") else f'{{"queries": [{{"vector": [{vector}]}}]}}'
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 5000  # not 10 echoes of 4000 digits
    first = response.json()["detail"][0]
    assert first["loc"][-1] == 0 and "overflows float32" in first["msg"], first
    assert first["input"] == "9" * 20 + "... (4000 digits)"


@pytest.mark.parametrize("path, body", [
    ("/v1/search/vector", '{"vector": VECTOR, "k": NaN}'),
    ("/v1/search/vector", '{"vector": VECTOR, "k": 1e400}'),
    ("/v1/search/vector", '{"vector": VECTOR, "max_per_group": -Infinity}'),
    ("/v1/search/vector", '{"vector": [[NaN]]}'),
    ("/v1/search/vector", '{"vector": VECTOR, "tag": [1e400]}'),
    ("/v1/search/batch", '{"queries": [{"id": NaN}]}'),
    ("/v1/search/batch", '{"queries": [{"vector": VECTOR}], "k": NaN}'),
])
def test_a_non_finite_number_in_a_wrong_place_is_a_422_naming_it(http: httpx.Client, backend: Backend, path: str,
                                                                   body: str) -> None:
    content = body.replace("VECTOR", json.dumps([1.0] * backend.index.embed_dim))
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text  # was a 500: the 422 echoed the NaN, which JSON cannot hold
    inputs = json.dumps([error.get("input") for error in response.json()["detail"]])
    assert any(name in inputs for name in ("NaN", "Infinity")), response.text


def test_vector_queries_may_name_their_model(http: httpx.Client, backend: Backend) -> None:
    v = [1.0] + [0.0] * (backend.index.embed_dim - 1)
    served = backend.encoder.version
    ok = http.post("/v1/search/vector", json={"vector": v, "k": 2, "model_version": served})
    assert ok.status_code == 200, ok.text
    for path, body in [
        ("/v1/search/vector", {"vector": v, "model_version": "m-000000000000"}),
        ("/v1/search/batch", {"queries": [{"vector": v}], "model_version": "m-000000000000"}),
    ]:
        response = http.post(path, json=body)
        assert response.status_code == 409, response.text
        assert "m-000000000000" in response.json()["detail"] and served in response.json()["detail"]
    batch = http.post("/v1/search/batch", json={"queries": [{"vector": v}, {"id": QUERY_ID}], "model_version": served})
    assert batch.status_code == 200, batch.text


def test_large_values_normalise_and_messages_are_exact(http: httpx.Client, backend: Backend) -> None:
    dim = backend.index.embed_dim
    big = http.post("/v1/search/vector", json={"vector": [1e20] + [0.0] * (dim - 1), "k": 1})
    assert big.status_code == 200, big.text  # its length overflows float32, not float64
    small = http.post("/v1/search/vector", json={"vector": [1.0] + [0.0] * (dim - 1), "k": 1})
    assert big.json()["results"] == small.json()["results"]
    overflow = http.post("/v1/search/vector", json={"vector": [1e39] + [1.0] * (dim - 1)})
    assert overflow.status_code == 422 and "overflows float32" in overflow.json()["detail"]
    huge = http.post("/v1/search/vector", json={"vector": [1.0, -1e300] + [1.0] * (dim - 2)})
    assert huge.status_code == 422  # a plain number, not numpy's repr np.float64(-1e+300)
    assert huge.json()["detail"].startswith("vector value -1e+300 at position 1 overflows float32"), huge.text
    nan = http.post("/v1/search/vector", content='{"vector": [1, NaN' + ", 1" * (dim - 2) + "]}",
                    headers={"content-type": "application/json"})
    assert nan.status_code == 422
    assert "position 1" in nan.json()["detail"] and "query embedding 0" not in nan.json()["detail"]


@pytest.mark.parametrize("body", [
    {"k": True}, {"k": "5"}, {"k": 5.0}, {"vector": ["1"]}, {"vector": [True]}, {"max_per_group": "2"},
])
def test_json_bodies_are_strictly_typed(http: httpx.Client, backend: Backend, body: dict) -> None:
    dim = backend.index.embed_dim
    full = {"vector": [1.0] * dim, **body}
    if "vector" in body:
        full["vector"] = body["vector"] * dim
    response = http.post("/v1/search/vector", json=full)
    assert response.status_code == 422, response.text
    batch = {"queries": [{"vector": full["vector"]}], **{k: v for k, v in body.items() if k != "vector"}}
    assert http.post("/v1/search/batch", json=batch).status_code == 422


@pytest.mark.parametrize("method, path", [
    ("GET", f"/v1/items/{QUERY_ID}/similar?k=5&k=6"),
    ("POST", "/v1/search/image?k=5&k=6"),
    ("GET", f"/v1/items/{QUERY_ID}/similar?kind=image&kind=frame"),
])
def test_a_repeated_single_query_parameter_is_422(http: httpx.Client, indexed_store: Store, method: str, path: str) -> None:
    content = (indexed_store.corpus_dir / QUERY_ID).read_bytes() if method == "POST" else None
    response = http.request(method, path, content=content)
    assert response.status_code == 422, response.text
    assert "takes one value" in response.json()["detail"][0]["msg"]
    assert http.get(f"/v1/items/{QUERY_ID}/similar?group=3&group=7&k=2").status_code == 200  # lists repeat


@pytest.mark.parametrize("value", ["5.0", "1_0", "+5", "1e1", "٥"])
@pytest.mark.parametrize("name", ["k", "max_per_group"])
def test_query_counts_are_whole_numbers_as_written(http: httpx.Client, indexed_store: Store, name: str, value: str) -> None:
    """k=5.0 or k=1_0 is refused as the web page and JSON bodies refuse it (pydantic's lax int
    would read them as 5 and 10); digits with leading zeros or spaces around are numbers."""
    from urllib.parse import quote

    png = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
    for method, path, content in (("GET", f"/v1/items/{QUERY_ID}/similar", None), ("POST", "/v1/search/image", png)):
        refused = http.request(method, f"{path}?{name}={quote(value)}", content=content)
        assert refused.status_code == 422, refused.text
        assert f"expected a whole number such as 5, got {value!r}" in refused.json()["detail"][0]["msg"]
        assert refused.json()["detail"][0]["ctx"] == {"error": f"expected a whole number such as 5, got {value!r}"}
        for plain in ("05", " 5"):
            answered = http.request(method, f"{path}?{name}={quote(plain)}", content=content)
            assert answered.status_code == 200, answered.text
            assert len(answered.json()["results"]) == (5 if name == "k" else DEFAULT_K)
        told = []
        for low in ("0", "-1"):  # a negative count is a whole number too: told it is too small, as 0 is
            refused = http.request(method, f"{path}?{name}={low}", content=content)
            assert refused.status_code == 422, refused.text
            told.append({key: refused.json()["detail"][0][key] for key in ("type", "msg", "ctx")})
        assert told[0] == told[1] and told[0]["type"] == "greater_than_equal", told


def test_broken_json_is_parsed_once(http: httpx.Client) -> None:
    content = b'{"queries": [' + b'{"id": "x"},' * 200_000  # ~2.4 MB, never closed
    response = http.post("/v1/search/batch", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400  # malformed: the parser's reason and where it stopped
    assert response.json() == {"detail": f"invalid JSON body at character {len(content)}: Expecting value"}


@pytest.mark.parametrize("content, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON body: nested too deep"),
    (b'{"vector": [1' + b"0" * 5000 + b"]}", "invalid JSON body: Exceeds the limit (4300 digits) for integer string "
                                             "conversion: value has 5001 digits (the number at character 12)"),
    (b'{"vector": [0.5], "k": 1' + b"0" * 5000 + b"}", "invalid JSON body: Exceeds the limit (4300 digits) for integer "
                                                   "string conversion: value has 5001 digits (the number at character 23)"),
    (b'{"vector": [0.1], "x": "\xff"}', "invalid JSON body: not UTF-8 at byte 24 (invalid start byte)"),
])
@pytest.mark.parametrize("query", ["", "?k=2"], ids=["fast", "fastapi"])  # a query parameter: FastAPI parses it
def test_a_body_json_cannot_parse_is_a_400_saying_why(http: httpx.Client, content: bytes, reason: str, query: str) -> None:
    response = http.post("/v1/search/vector" + query, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text  # was FastAPI's "There was an error parsing the body"
    assert response.json()["detail"].startswith(reason), response.text


@pytest.mark.parametrize("query, field", [("tag=", "tag"), ("group=&k=2", "group"), ("source=web&source=", "source")])
def test_an_empty_filter_value_is_a_422_naming_it(http: httpx.Client, indexed_store: Store, query: str, field: str) -> None:
    """No item has an empty group, source or tag: an empty value is a mistake (a form field
    left blank), refused rather than matching nothing. On every search endpoint, query or body."""
    image = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
    answers = [http.post(f"/v1/search/image?{query}", files={"file": ("q.png", image)}),
               http.post(f"/v1/search/image?{query}", content=image),
               http.get(f"/v1/items/{QUERY_ID}/similar?{query}")]
    values = [value for name, _, value in (pair.partition("=") for pair in query.split("&")) if name == field]
    answers.append(http.post("/v1/search/vector", json={"vector": [0.5] * 8, field: values}))
    answers.append(http.post("/v1/search/batch", json={"queries": [{"id": QUERY_ID}], field: values}))
    for response in answers:
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"][-2:] == [field, len(values) - 1] and error["type"] == "string_too_short", error
    assert http.get(f"/v1/items/{QUERY_ID}/similar?source=web&tag=odd").status_code == 200


@pytest.mark.parametrize("field", ["group", "source", "tag"])
def test_an_empty_filter_list_in_a_json_body_is_a_422_not_no_filter(http: httpx.Client, field: str) -> None:
    """"tag": [] names no value: refused, as an empty value is, rather than searching unfiltered."""
    answers = [http.post("/v1/search/vector", json={"vector": [0.5] * 8, field: []}),
               http.post("/v1/search/batch", json={"queries": [{"id": QUERY_ID}], field: []})]
    for response in answers:
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"][-1] == field and error["type"] == "too_short", error
    assert http.post("/v1/search/vector", json={"vector": [0.5] * 8, field: None}).status_code != 422  # null: no filter


@pytest.mark.parametrize("path", ["/v1/search/vector", "/v1/search/batch"])
def test_a_multipart_upload_to_a_json_endpoint_says_where_images_go(http: httpx.Client, indexed_store: Store,
                                                                     path: str) -> None:
    image = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
    response = http.post(path, files={"file": ("q.png", image)})
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": "the body must be JSON sent with 'Content-Type: application/json' (got "
                                         "multipart/form-data); an image file is searched for by a multipart upload to "
                                         "/v1/search/image"}


@pytest.mark.parametrize("content, headers", [
    (b'{"id": "3/digit_0003.png"}', {"content-type": "application/json"}),
    (b'{"vector": [0.5, 0.5]}', {"content-type": "application/x-www-form-urlencoded"}),  # curl -d's default type
    (b'  [1, 2]', {"content-type": "application/json"}),
    (b' {"vector": [1]}', {"content-type": "application/x-www-form-urlencoded"}),
])
def test_a_json_query_sent_to_the_image_endpoint_says_where_it_goes(http: httpx.Client, content: bytes,
                                                                    headers: dict) -> None:
    """The reverse of the mistake above: not "not a recognised image format", but where it goes."""
    response = http.post("/v1/search/image", content=content, headers=headers)
    assert response.status_code == 415, response.text
    detail = response.json()["detail"]
    assert detail.startswith("a JSON body is not an image: /v1/search/image takes the image file as the body")
    assert "/v1/search/vector" in detail and "/v1/items/{id}/similar" in detail



def test_an_image_is_searched_whatever_its_content_type_or_first_byte(http: httpx.Client, indexed_store: Store) -> None:
    """The 415 goes by the bytes, not the label: a PNG sent as application/json, and a TGA (no
    magic number) whose first byte is '{', are images."""
    import io

    from PIL import Image

    png = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
    labelled_json = http.post("/v1/search/image?k=2", content=png, headers={"content-type": "application/json"})
    assert labelled_json.status_code == 200, labelled_json.text
    tga = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(tga, format="TGA", id_section=b"x" * ord("{"))
    assert tga.getvalue()[:1] == b"{"
    for headers in ({"content-type": "image/x-tga"}, {}):
        answered = http.post("/v1/search/image?k=2", content=tga.getvalue(), headers=headers)
        assert answered.status_code != 415, answered.text
