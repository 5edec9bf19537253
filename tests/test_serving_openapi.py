"""/openapi.json describes what the server answers (422 bodies, multipart 400s, one
operation per route and method) and every GET resource answers HEAD. Real server on
127.0.0.1, conftest's tiny store."""

from __future__ import annotations

import json
import warnings

import httpx
import pytest

from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend

QUERY_ID = "3/digit_0003.png"


def test_operation_ids_are_unique_and_no_warning(backend: Backend) -> None:
    app = create_app(lambda: backend)
    app.openapi_schema = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns "Duplicate Operation ID"
        spec = app.openapi()
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), ids
    assert list(spec["paths"]["/v1/items/{item_id}/thumbnail"]) == ["get"]


def test_422_is_documented_as_answered(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    ref = spec["paths"]["/v1/search/vector"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    detail_types = {option.get("type") for option in schema["properties"]["detail"]["anyOf"]}
    assert detail_types == {"string", "array"}
    assert "error_count" in schema["properties"]
    listed = http.post("/v1/search/vector", json={"vector": "no"})
    assert listed.status_code == 422 and isinstance(listed.json()["detail"], list)
    reason = http.post("/v1/search/vector", json={"vector": [1.0]})
    assert reason.status_code == 422 and isinstance(reason.json()["detail"], str)


def test_multipart_400s_are_documented(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    assert "400" in spec["paths"]["/v1/search/image"]["post"]["responses"]
    response = http.post("/v1/search/image", content=b"x", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400 and "boundary" in response.json()["detail"].lower()


@pytest.mark.parametrize("path", ["/v1/search/vector", "/v1/search/batch"])
def test_json_400s_are_documented(http: httpx.Client, path: str) -> None:
    spec = http.get("/openapi.json").json()
    assert "400" in spec["paths"][path]["post"]["responses"]
    response = http.post(path, content=b'{"vector":[0.1,', headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["detail"].startswith("invalid JSON body at character 15")


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz", "/v1/info", "/metrics", "/openapi.json",
                                  f"/v1/items/{QUERY_ID}", f"/v1/items/{QUERY_ID}/thumbnail"])
def test_head_on_get_resources(http: httpx.Client, path: str) -> None:
    get, head = http.get(path), http.head(path)
    assert get.status_code == 200 and head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path.endswith("/thumbnail"):
        assert head.headers["content-length"] == get.headers["content-length"] and head.headers["etag"] == get.headers["etag"]
    for method in ("OPTIONS", "POST", "DELETE"):  # a 405 lists every method the resource answers
        refused = http.request(method, path)
        allowed = {m.strip() for m in refused.headers["allow"].split(",")}
        assert refused.status_code == 405 and allowed == {"GET", "HEAD"}, (method, refused.headers)


def test_head_on_a_post_endpoint_is_405(http: httpx.Client) -> None:
    refused = http.head("/v1/search/vector")
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    assert http.options("/v1/search/vector").headers["allow"] == "POST"


def test_every_numeric_limit_is_json_schema_minimum_and_maximum(http: httpx.Client) -> None:
    """Generated clients read ``minimum``/``maximum``; ``ge``/``le`` are no JSON Schema keywords."""
    spec = http.get("/openapi.json").json()
    text = json.dumps(spec)
    assert '"ge":' not in text and '"le":' not in text
    for path, method in [("/v1/search/image", "post"), ("/v1/items/{item_id}/similar", "get")]:
        params = {p["name"]: p["schema"] for p in spec["paths"][path][method]["parameters"]}
        assert (params["k"]["minimum"], params["k"]["maximum"]) == (1, 100), params["k"]
        per_group = next(option for option in params["max_per_group"]["anyOf"] if option.get("type") == "integer")
        assert (per_group["minimum"], per_group["maximum"]) == (1, 100), params["max_per_group"]
    assert http.get("/v1/items/3/digit_0003.png/similar", params={"k": 101}).status_code == 422
    assert http.get("/v1/items/3/digit_0003.png/similar", params={"max_per_group": 0}).status_code == 422


def test_every_endpoint_documents_its_422_as_answered(http: httpx.Client) -> None:
    """A 422 body carries ``error_count`` (``ValidationErrorMessage``), the admin endpoint's too."""
    spec = http.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            schema = operation["responses"].get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            assert schema.get("$ref", "").endswith("/ValidationErrorMessage") or "422" not in operation["responses"], (path, method)
    thumbnail = spec["paths"]["/v1/items/{item_id}/thumbnail"]["get"]
    assert "v" in {p["name"] for p in thumbnail["parameters"]}
    for model in ("SearchResult", "ItemMetadata"):
        assert spec["components"]["schemas"][model]["properties"]["kind"]["enum"] == ["image", "frame"], model
