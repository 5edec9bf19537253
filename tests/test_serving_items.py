"""The item endpoints (``lookalike.serving.items``) for ids a URL path carries only with
care, on the real server: every indexed id answers its metadata, similar items and thumbnail."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from .conftest import ODD_ITEM_IDS  # noqa: TID252
from lookalike.serving.app import create_app
from lookalike.serving.backend import load_backend
from lookalike.serving.client import SearchClient
from lookalike.serving.server import serve_in_thread


@pytest.fixture(scope="module")
def base_url(odd_ids_store):
    backend = load_backend(odd_ids_store.root)
    with serve_in_thread(create_app(lambda: backend)) as url:
        yield url


@pytest.mark.parametrize("item_id", ODD_ITEM_IDS)
def test_every_indexed_id_has_its_item_urls(base_url: str, item_id: str) -> None:
    with httpx.Client(base_url=base_url) as http:
        meta = http.get(f"/v1/items/{quote(item_id, safe='/')}")
        assert meta.status_code == 200, meta.text
        assert meta.json()["id"] == item_id
        similar = http.get(meta.json()["similar_url"], params={"k": 3})  # the URLs the server gives
        assert similar.status_code == 200, similar.text
        ids = [r["id"] for r in similar.json()["results"]]
        assert len(ids) == 3 and item_id not in ids and set(ids) <= set(ODD_ITEM_IDS)
        for result in similar.json()["results"]:
            thumbnail = http.get(result["thumbnail_url"])
            assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png", result["id"]
    with SearchClient(base_url) as client:  # `lookalike query --id`
        assert client.item(item_id)["id"] == item_id
        assert [r["id"] for r in client.similar(item_id, k=3)["results"]] == ids


def test_an_id_typed_in_another_unicode_normal_form_finds_the_item(base_url: str) -> None:
    """The file 'café.png' named decomposed on disk (macOS: NFD), its id typed composed (NFC)."""
    nfd, nfc = "cafe\u0301.png", "caf\u00e9.png"
    assert nfd in ODD_ITEM_IDS and nfc not in ODD_ITEM_IDS
    with httpx.Client(base_url=base_url) as http:
        meta = http.get(f"/v1/items/{quote(nfc)}")
        assert meta.status_code == 200, meta.text
        assert meta.json()["id"] == nfd  # the id as indexed
        assert http.get(f"/v1/items/{quote(nfc)}/thumbnail").status_code == 200
        similar = http.get(f"/v1/items/{quote(nfc)}/similar", params={"k": 2})
        assert similar.status_code == 200 and nfd not in [r["id"] for r in similar.json()["results"]]
        assert http.get(f"/v1/items/{quote('cafe.png')}").status_code == 404  # no accent: another name
    with SearchClient(base_url) as client:  # `lookalike query --id café.png`
        assert client.item(nfc)["id"] == nfd


def test_a_trailing_slash_after_similar_or_thumbnail_is_the_same_resource(base_url: str) -> None:
    """Not the metadata of an id ending in '/similar/' (no id ends in '/'), which refused k."""
    with httpx.Client(base_url=base_url) as http:
        plain = http.get("/v1/items/plain.png/similar", params={"k": 2})
        slashed = http.get("/v1/items/plain.png/similar/", params={"k": 2})
        assert slashed.status_code == 200, slashed.text
        assert slashed.json()["results"] == plain.json()["results"]
        thumbnail = http.get("/v1/items/plain.png/thumbnail/")
        assert thumbnail.status_code == 200 and thumbnail.content == http.get("/v1/items/plain.png/thumbnail").content
        assert "/v1/items/{item_id}/similar/" not in http.get("/openapi.json").json()["paths"]
        unknown = http.get("/v1/items/no%0Asuch.png/similar")
        assert unknown.status_code == 404 and unknown.json()["detail"] == "unknown item id 'no\\nsuch.png'"


def test_the_items_collection_itself_is_a_404_saying_what_an_item_url_is(base_url: str) -> None:
    """Not a 307 to /v1/items/ and then "unknown item id ''"."""
    with httpx.Client(base_url=base_url) as http:
        for path in ("/v1/items", "/v1/items/", "/v1/items//"):
            response = http.get(path)
            assert response.status_code == 404, (path, response.status_code, response.headers)
            assert response.json()["detail"].startswith("no item id in the URL: an item is /v1/items/{id}"), path
        assert "/v1/items" not in http.get("/openapi.json").json()["paths"]
