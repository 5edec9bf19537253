"""Filters, crowding and batch search over HTTP, on an index that mixes images and
video frames: the tiny store's embeddings republished with 60 items relabelled as
frames of three videos (ids ``video<n>#t=<seconds>``, group = video id); and the
``source`` and ``tag`` filters on conftest's ``tagged_store`` (``embed --metadata``).
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pyarrow as pa
import pytest

from lookalike.index.builder import build_and_publish
from lookalike.index.searcher import ItemIndex
from lookalike.model.store import Store
from lookalike.serving.app import create_app
from lookalike.serving.backend import Backend, load_backend
from lookalike.serving.schemas import MAX_BATCH_QUERIES, MAX_K
from lookalike.serving.server import serve_in_thread

FRAMES = 60
VIDEOS = 3


def video(i: int) -> str:
    """The group of a video's frames: its id, the path under the corpus."""
    return f"clips/video{i}.mp4"


def as_frame(item: dict, row: int) -> dict:
    group = video(row % VIDEOS)
    return dict(item, id=f"{group}#t={row / 2:.1f}", kind="frame", group=group, timestamp_s=row / 2)


@pytest.fixture(scope="module")
def backend(indexed_store: Store, tmp_path_factory) -> Backend:
    root = tmp_path_factory.mktemp("frames") / "store"
    shutil.copytree(indexed_store.root, root, symlinks=True)
    store = Store.at(root)
    index = ItemIndex.load(store.require_current_index())
    items = [as_frame(item, row) if row < FRAMES else dict(item, group=None) for row, item in enumerate(index.items)]
    build_and_publish(store, index.embeddings, pa.Table.from_pylist(items), model_version=index.model_version)
    return load_backend(root)


@pytest.fixture(scope="module")
def http(backend: Backend) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(lambda: backend)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def frame_row(backend: Backend) -> int:
    return next(r for r, item in enumerate(backend.index.items) if item["kind"] == "frame")


def test_frame_results_carry_video_and_timestamp(http: httpx.Client, backend: Backend) -> None:
    row = frame_row(backend)
    item_id = backend.index.items[row]["id"]
    body = http.get(f"/v1/items/{quote(item_id, safe='')}/similar", params={"k": 20, "kind": "frame"}).json()
    assert len(body["results"]) == 20 and body["query"]["kind"] == "frame"
    for r in body["results"]:
        assert r["kind"] == "frame" and r["id"].startswith(r["group"] + "#t=")
        assert r["timestamp_s"] == pytest.approx(float(r["id"].split("#t=")[1]))
    meta = http.get(f"/v1/items/{quote(item_id, safe='')}").json()
    assert meta["group"] == item_id.split("#")[0] and meta["kind"] == "frame"
    thumb = http.get(body["results"][0]["thumbnail_url"])  # '#' is escaped in the URL
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    images = http.get(f"/v1/items/{quote(item_id, safe='')}/similar", params={"k": 10, "kind": "image"}).json()
    assert {r["kind"] for r in images["results"]} == {"image"} and all(r["timestamp_s"] is None for r in images["results"])


def test_crowding_and_group_filter(http: httpx.Client, backend: Backend) -> None:
    vector = backend.index.embeddings[frame_row(backend)].tolist()
    crowded = http.post("/v1/search/vector", json={"vector": vector, "k": 10, "kind": "frame", "max_per_group": 1}).json()
    groups = [r["group"] for r in crowded["results"]]
    assert sorted(groups) == [video(i) for i in range(VIDEOS)]  # only three videos exist
    two = http.post("/v1/search/vector", json={"vector": vector, "k": 30, "max_per_group": 2}).json()["results"]
    per_video = [r["group"] for r in two if r["group"]]
    assert all(per_video.count(g) <= 2 for g in per_video) and len(two) == 30
    only = http.post("/v1/search/vector", json={"vector": vector, "k": 50, "group": [video(1)]}).json()["results"]
    assert len(only) == FRAMES // VIDEOS and {r["group"] for r in only} == {video(1)}
    image_query = http.post(
        "/v1/search/image", params=[("k", 5), ("group", video(2)), ("max_per_group", 3)],
        content=(backend.store_root / backend.index.items[FRAMES]["uri"]).read_bytes(),
    ).json()
    assert [r["group"] for r in image_query["results"]] == [video(2)] * 3
    assert image_query["query"]["group"] == [video(2)] and image_query["query"]["max_per_group"] == 3
    bad = http.post("/v1/search/vector", json={"vector": vector, "kind": "audio"})
    assert bad.status_code == 422 and "kind" in bad.text
    assert http.get(f"/v1/items/{quote(backend.index.items[0]['id'], safe='')}/similar?max_per_group=0").status_code == 422


def test_a_filter_no_item_passes_gives_a_note_beside_no_results(http: httpx.Client, backend: Backend) -> None:
    vector = backend.index.embeddings[frame_row(backend)].tolist()
    named = http.post("/v1/search/vector", json={"vector": vector, "group": ["video1.mp4"]}).json()
    assert named["results"] == [] and named["note"] == (
        "no item has group 'video1.mp4' (a group is a video's id, its path in the corpus: did you mean "
        "'clips/video1.mp4'?)")
    unknown = http.post("/v1/search/vector", json={"vector": vector, "group": ["nope", "other"]}).json()
    assert unknown["note"] == ("no item has group 'nope' or 'other' (a group is a video's id, its path in the corpus, "
                               "such as 'clips/video0.mp4')")
    item_id = quote(backend.index.items[0]["id"], safe="")
    tagged = http.get(f"/v1/items/{item_id}/similar", params=[("tag", "x"), ("source", "web")]).json()
    assert tagged["results"] == [] and tagged["note"] == "no item has source 'web'; no item has tag 'x'"
    some = http.post("/v1/search/vector", json={"vector": vector, "group": ["nope", video(1)]}).json()
    assert some["results"] and some["note"] is None  # one of the values matches
    apart = http.post("/v1/search/vector", json={"vector": vector, "kind": "image", "group": [video(1)]}).json()
    assert apart["results"] == [] and apart["note"] is None  # each filter matches items, none passes both


def test_batch_mixes_vectors_ids_and_images(http: httpx.Client, backend: Backend) -> None:
    image_item = backend.index.items[FRAMES + 5]
    png = (backend.store_root / image_item["uri"]).read_bytes()
    vector = backend.index.embeddings[7].tolist()
    frame_id = backend.index.items[frame_row(backend)]["id"]
    body = {
        "queries": [{"vector": vector}, {"id": frame_id}, {"image_base64": base64.b64encode(png).decode()}],
        "k": 4,
    }
    response = http.post("/v1/search/batch", json=body)
    assert response.status_code == 200, response.text
    responses = response.json()["responses"]
    singles = [
        http.post("/v1/search/vector", json={"vector": vector, "k": 4}).json(),
        http.get(f"/v1/items/{quote(frame_id, safe='')}/similar", params={"k": 4}).json(),
        http.post("/v1/search/image", params={"k": 4}, content=png).json(),
    ]
    for got, single in zip(responses, singles):
        assert [r["id"] for r in got["results"]] == [r["id"] for r in single["results"]]
    assert [r["query"]["type"] for r in responses] == ["vector", "item", "image"]
    assert responses[2]["results"][0]["id"] == image_item["id"]
    crowded = http.post("/v1/search/batch", json=dict(body, k=5, kind="frame", max_per_group=1)).json()["responses"]
    for r in crowded:
        assert len(r["results"]) == VIDEOS and {x["kind"] for x in r["results"]} == {"frame"}


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"queries": [{"id": "nope"}]}, 404, "queries[0]: unknown item id 'nope'"),
        ({"queries": [{"vector": [1.0] * 8}, {"vector": [1.0, 2.0]}]}, 422, "queries[1]: vector has 2 values"),
        ({"queries": [{"image_base64": "***"}]}, 422, "queries[0]: image_base64 is not valid base64"),
        ({"queries": [{"image_base64": base64.b64encode(b"text").decode()}]}, 422, "queries[0]: not a usable image"),
        ({"queries": [{}]}, 422, "exactly one of vector, id or image_base64"),
        ({"queries": [{"id": "a", "vector": [1.0]}]}, 422, "got vector, id"),
        ({"queries": []}, 422, "at least 1"),
        ({"queries": [{"id": "x"}] * (MAX_BATCH_QUERIES + 1)}, 422, f"at most {MAX_BATCH_QUERIES}"),
        ({"queries": [{"vector": [1.0] * 8}], "k": 101}, 422, "less than or equal to 100"),
    ],
    ids=["unknown-id", "short-vector", "bad-base64", "not-image", "no-query", "two-queries", "empty", "too-many", "k"],
)
def test_batch_rejects_bad_queries(http: httpx.Client, body: dict, status: int, reason: str) -> None:
    response = http.post("/v1/search/batch", json=body)
    assert response.status_code == status, response.text
    assert reason in response.text


def test_batch_images_in_base64_as_people_send_it(http: httpx.Client, indexed_store: Store) -> None:
    """A browser's data: URL, `base64`'s 76-column lines, URL-safe base64 without padding."""
    item = next(i for i in http.post("/v1/search/vector", json={"vector": [1.0] * 8, "k": 50}).json()["results"]
                if i["kind"] == "image")
    data = (indexed_store.corpus_dir / item["id"]).read_bytes()
    plain = base64.b64encode(data).decode()
    forms = [plain, " data:image/png;base64," + plain, "\n".join(plain[i:i + 76] for i in range(0, len(plain), 76)),
             base64.urlsafe_b64encode(data).decode().rstrip("=")]
    tops = []
    for text in forms:
        response = http.post("/v1/search/batch", json={"queries": [{"image_base64": text}], "k": 1})
        assert response.status_code == 200, response.text
        tops.append(response.json()["responses"][0]["results"][0]["id"])
    assert tops == [item["id"]] * len(forms)
    for text, reason in ((plain[:8] + "*" + plain[8:], "character '*' at position 8 is not base64"),
                         ("data:image/png;base64,\n" + plain[:8] + "*", "character '*' at position 31 is not base64"),
                         ("QUJD-+/_", "it mixes the standard alphabet (+ /) with the URL-safe one (- _)")):
        refused = http.post("/v1/search/batch", json={"queries": [{"image_base64": text}]})
        assert refused.status_code == 422 and reason in refused.json()["detail"], refused.text


def test_a_video_id_in_a_batch_is_not_told_to_escape_its_hash(http: httpx.Client) -> None:
    """'#' needs %23 in a URL, not in a JSON body."""
    in_json = http.post("/v1/search/batch", json={"queries": [{"id": video(0)}]})
    in_url = http.get(f"/v1/items/{quote(video(0), safe='')}/similar")
    assert in_json.status_code == in_url.status_code == 404
    assert f"a video's frames are the items '{video(0)}#t=<seconds>'" in in_json.json()["detail"]
    assert "%23" not in in_json.json()["detail"] and "send '#' as %23" in in_url.json()["detail"]


def test_a_moment_of_a_video_that_was_not_sampled_names_the_nearest_frames(http: httpx.Client) -> None:
    """Frames of video 0 are at 0.0, 1.5, 3.0, ... s (``as_frame``): 0.7 s lies between the first two."""
    hint = f": {video(0)} has no frame at 0.700 s; its nearest sampled frames are '{video(0)}#t=0.0' and '{video(0)}#t=1.5'"
    for response in (http.get(f"/v1/items/{quote(video(0) + '#t=0.7', safe='')}/similar"),
                     http.get(f"/v1/items/{quote(video(0) + '#t=0.7', safe='')}"),
                     http.post("/v1/search/batch", json={"queries": [{"id": video(0) + "#t=0.7"}]})):
        assert response.status_code == 404 and response.json()["detail"].endswith(hint), response.text
    for other in ("clips/other.mp4#t=0.7", f"{video(0)}#t=1.5e0", f"{video(0)}#t=+1.5", "3/digit_0003.png#t=1"):
        plain = http.get(f"/v1/items/{quote(other, safe='')}/similar")  # another video, or seconds no frame id has
        assert plain.status_code == 404 and plain.json()["detail"] == f"unknown item id {other!r}", plain.text


# --- sidecar metadata: source and tag ----------------------------------------


@pytest.fixture(scope="module")
def tagged(tagged_store: Store) -> Iterator[tuple[httpx.Client, Backend]]:
    """The real server on ``tagged_store`` (conftest: digits with source and tags from ``embed --metadata``)."""
    backend = load_backend(tagged_store.root)
    with serve_in_thread(create_app(lambda: backend)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, backend


def digits_of(results: list[dict]) -> set[int]:
    return {int(r["id"].split("/")[0]) for r in results}


def test_source_and_tag_filter_every_search_endpoint(tagged) -> None:
    http, backend = tagged
    query_id = "3/digit_0003.png"
    png = (backend.store_root / backend.index.items[backend.index.row_of(query_id)]["uri"]).read_bytes()
    vector = backend.index.embeddings[backend.index.row_of(query_id)].tolist()
    odd = http.post("/v1/search/image", params=[("k", 30), ("tag", "odd")], content=png).json()
    assert len(odd["results"]) == 30 and digits_of(odd["results"]) <= {1, 3, 5, 7}  # 9s have no metadata
    assert odd["query"]["tag"] == ["odd"] and odd["query"]["source"] is None
    either = http.post("/v1/search/image?k=40&tag=three&tag=even", content=png).json()["results"]
    assert len(either) == 40 and digits_of(either) <= {0, 2, 3, 4, 6, 8} and 3 in digits_of(either)
    assert http.post("/v1/search/image?k=5&source=web&tag=even", content=png).json()["results"] == []  # AND
    sources = http.post("/v1/search/image?k=40&source=scanner&source=web", content=png).json()["results"]
    assert len(sources) == 40 and 9 not in digits_of(sources)
    threes = http.post("/v1/search/vector", json={"vector": vector, "k": 50, "tag": ["three"], "source": ["web"]}).json()
    assert digits_of(threes["results"]) == {3} and threes["results"][0]["id"] == query_id
    assert len(threes["results"]) == sum(1 for item in backend.index.items if item["id"].startswith("3/"))
    assert threes["query"]["source"] == ["web"]
    similar = http.get(f"/v1/items/{query_id}/similar", params=[("k", 10), ("tag", "three")]).json()
    assert len(similar["results"]) == 10 and digits_of(similar["results"]) == {3}
    assert query_id not in [r["id"] for r in similar["results"]] and similar["query"]["tag"] == ["three"]
    batch = http.post("/v1/search/batch", json={"queries": [{"vector": vector}, {"id": query_id}], "k": 8,
                                                "source": ["scanner"], "kind": "image"}).json()["responses"]
    assert all(len(r["results"]) == 8 and digits_of(r["results"]) <= {0, 2, 4, 6, 8} for r in batch)
    assert http.post("/v1/search/image?k=5&tag=purple", content=png).json()["results"] == []


def test_results_and_item_metadata_show_the_user_metadata(tagged, http: httpx.Client, backend: Backend,
                                                           digit_metadata) -> None:
    """What a search filtered on is shown with each result (nulls left out); none without metadata."""
    tagged_http, tagged_backend = tagged
    vector = tagged_backend.index.embeddings[tagged_backend.index.row_of("3/digit_0003.png")].tolist()
    results = tagged_http.post("/v1/search/vector", json={"vector": vector, "k": 100}).json()["results"]
    for result in results:
        expected = digit_metadata(result["id"])
        assert result["metadata"] == (None if expected is None else {"source": expected["source"], "tags": expected["tags"]})
    assert tagged_http.get("/v1/items/3/digit_0003.png").json()["metadata"] == {"source": "web", "tags": ["odd", "three"]}
    assert tagged_http.get("/v1/items/9/digit_0009.png").json()["metadata"] is None
    plain = http.post("/v1/search/vector", json={"vector": backend.index.embeddings[0].tolist(), "k": 5}).json()["results"]
    assert plain and all(r["metadata"] is None for r in plain)


def test_metadata_of_any_column_type_is_shown_as_json_never_a_500(tmp_path, indexed_store: Store) -> None:
    """A metadata file's dates (pyarrow reads a CSV date column as date32), times, decimals,
    bytes and NaN reach every result and item: as ISO text, numbers, base64 and nulls (dropped)."""
    import datetime
    import decimal

    import pyarrow.parquet as pq

    from lookalike.pipeline.embed import EmbedConfig, run_embed

    workdir = tmp_path / "store"
    shutil.copytree(indexed_store.root, workdir)
    ids = sorted(p.relative_to(workdir / "corpus").as_posix() for p in (workdir / "corpus").rglob("*.png"))
    n = len(ids)
    table = pa.table({
        "id": ids,
        "scanned": pa.array([datetime.date(2024, 5, 1)] * n, pa.date32()),
        "at": pa.array([datetime.datetime(2024, 5, 1, 12, 30, 5)] * n, pa.timestamp("ms")),
        "price": pa.array([decimal.Decimal("1.25")] * n, pa.decimal128(5, 2)),
        "raw": pa.array([b"\x00\xff"] * n, pa.binary()),
        "rating": pa.array([float("nan")] * n, pa.float64()),
        "scores": pa.array([[1.5, float("inf")]] * n, pa.list_(pa.float64())),
    })
    pq.write_table(table, workdir / "metadata.parquet")
    run_embed(EmbedConfig(workdir=str(workdir), metadata=str(workdir / "metadata.parquet"), incremental=True))
    expected = {"scanned": "2024-05-01", "at": "2024-05-01T12:30:05", "price": 1.25, "raw": "AP8=", "scores": [1.5, None]}
    backend = load_backend(workdir)
    with serve_in_thread(create_app(lambda: backend)) as url, httpx.Client(base_url=url, timeout=30) as client:
        item_id = ids[0]
        similar = client.get(f"/v1/items/{quote(item_id, safe='/')}/similar", params={"k": 3})
        assert similar.status_code == 200, similar.text
        assert [r["metadata"] for r in similar.json()["results"]] == [expected] * 3
        png = (workdir / "corpus" / item_id).read_bytes()
        by_image = client.post("/v1/search/image", params={"k": 2}, files={"file": ("q.png", png, "image/png")})
        assert by_image.status_code == 200 and by_image.json()["results"][0]["metadata"] == expected, by_image.text
        item = client.get(f"/v1/items/{quote(item_id, safe='/')}")
        assert item.status_code == 200 and item.json()["metadata"] == expected, item.text


def test_a_metadata_filter_on_an_index_without_that_column_matches_nothing(http: httpx.Client, backend: Backend) -> None:
    vector = backend.index.embeddings[0].tolist()
    response = http.post("/v1/search/vector", json={"vector": vector, "k": 5, "tag": ["odd"]})
    assert response.status_code == 200 and response.json()["results"] == []
    item_id = quote(backend.index.items[0]["id"], safe="")
    assert http.get(f"/v1/items/{item_id}/similar?source=web").json()["results"] == []


def test_source_and_tag_are_documented_and_checked(tagged) -> None:
    http, _ = tagged
    spec = http.get("/openapi.json").json()
    for path, method in (("/v1/search/image", "post"), ("/v1/items/{item_id}/similar", "get")):
        params = {p["name"]: p for p in spec["paths"][path][method]["parameters"]}
        assert "repeatable" in params["tag"]["description"] and "tags" in params["tag"]["description"]
        assert "source" in params["source"]["description"] and params["source"]["schema"]["anyOf"][0]["type"] == "array"
    for model in ("VectorQuery", "BatchSearch"):
        fields = spec["components"]["schemas"][model]["properties"]
        assert "--metadata" in fields["tag"]["description"] and "--metadata" in fields["source"]["description"]
    typo = http.post("/v1/search/image?k=2&tags=odd", content=b"x")
    assert typo.status_code == 422 and "(this endpoint takes: group, k, kind, max_per_group, source, tag)" in typo.text
    too_many = http.post("/v1/search/vector", json={"vector": [1.0] * 8, "tag": ["t"] * (MAX_K + 1)})
    assert too_many.status_code == 422


def test_client_and_query_command_pass_source_and_tag(tagged, capsys) -> None:
    from lookalike.pipeline.cli import main
    from lookalike.serving.client import SearchClient

    http, _ = tagged
    url = str(http.base_url).rstrip("/")
    with SearchClient(url) as client:
        found = client.similar("3/digit_0003.png", k=5, tag=["three"], source=["web"])
    assert digits_of(found["results"]) == {3} and found["query"]["tag"] == ["three"]
    assert main(["query", "--url", url, "--id", "2/digit_0002.png", "-k", "4", "--tag", "odd", "--tag", "three",
                 "--source", "web", "--json"]) == 0
    response = json.loads(capsys.readouterr().out)
    assert len(response["results"]) == 4 and digits_of(response["results"]) <= {1, 3, 5, 7}
    assert response["query"]["tag"] == ["odd", "three"]
