"""Thumbnails on the live server for what the pipeline indexed: images and video frames."""

import io
import shutil

import httpx
from PIL import Image

from lookalike.index.searcher import ItemIndex
from lookalike.model.data import list_images
from lookalike.pipeline.embed import EmbedConfig, run_embed
from lookalike.serving.app import create_app
from lookalike.serving.backend import load_backend
from lookalike.serving.server import serve_in_thread


def test_frames_and_images_have_thumbnails(tmp_path, trained_store, digits_corpus, make_video):
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    (workdir / "corpus" / "clips").mkdir(parents=True)
    make_video(workdir / "corpus" / "clips" / "a.mp4", seconds=3.0, cut_at_s=1.5)
    shutil.copy(list_images(digits_corpus)[0], workdir / "corpus" / "one.png")
    run_embed(EmbedConfig(workdir=str(workdir)))
    with serve_in_thread(create_app(lambda: load_backend(workdir))) as url, httpx.Client(base_url=url) as http:
        frame = http.get("/v1/items/clips/a.mp4/similar", params={"k": 1})  # not an item: the video itself
        assert frame.status_code == 404
        frame_id = "clips/a.mp4#t=1.500"
        meta = http.get(f"/v1/items/{frame_id.replace('#', '%23')}")
        assert meta.status_code == 200 and meta.json()["kind"] == "frame", meta.text
        for loose in ("clips/a.mp4%23t=1.5", "clips/a.mp4%23t=1.50000"):  # seconds written otherwise: the same frame
            assert http.get(f"/v1/items/{loose}").json()["id"] == frame_id
            assert http.get(f"/v1/items/{loose}/similar", params={"k": 1}).status_code == 200
        assert http.get("/v1/items/clips/a.mp4%23t=1.4/similar").status_code == 404  # no frame there
        thumb = http.get(f"/v1/items/{frame_id.replace('#', '%23')}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumb.content)).convert("L").getpixel((5, 5)) > 150  # the bright shot
        image = http.get("/v1/items/one.png/thumbnail")
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (32, 32)
        (workdir / "corpus" / "one.png").unlink()  # the original is gone: the stored thumbnail stands in
        gone = http.get("/v1/items/one.png/thumbnail")
        assert gone.status_code == 200, gone.text
        assert Image.open(io.BytesIO(gone.content)).size == (32, 32)


def test_tfds_items_have_thumbnails(tmp_path, trained_store, tfds_dir):
    """A TFDS item's uri (tfds://...) is no local file: its stored thumbnail is served."""
    import numpy as np

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_shapes:train", tfds_data_dir=str(tfds_dir)))
    items = ItemIndex.load(workdir / "indexes" / summary.index_version).items
    with serve_in_thread(create_app(lambda: load_backend(workdir))) as url, httpx.Client(base_url=url) as http:
        brightness = {}
        for label in ("light", "dark"):
            item = next(i for i in items if i["id"].startswith(label + "/"))
            assert item["uri"].startswith("tfds://")
            thumb = http.get(f"/v1/items/{item['id']}/thumbnail")
            assert thumb.status_code == 200, thumb.text
            assert thumb.headers["content-type"] == "image/png"
            img = Image.open(io.BytesIO(thumb.content))
            assert img.size == (16, 16)
            brightness[label] = np.asarray(img.convert("L")).mean()
        assert brightness["light"] > brightness["dark"] + 50


def test_a_moved_store_serves_its_thumbnails(tmp_path, trained_store, digits_corpus, make_video):
    """Thumbnails are recorded relative to the store; a corpus file recorded by its absolute
    path is found at the same place under the store's new location."""
    old = tmp_path / "old"
    shutil.copytree(trained_store.root / "models", old / "models")
    (old / "corpus" / "clips").mkdir(parents=True)
    make_video(old / "corpus" / "clips" / "a.mp4", seconds=1.0, cut_at_s=None)
    shutil.copy(list_images(digits_corpus)[0], old / "corpus" / "one.png")
    summary = run_embed(EmbedConfig(workdir=str(old)))
    items = ItemIndex.load(old / "indexes" / summary.index_version).items
    assert all(item["thumbnail"].startswith("thumbnails/") for item in items)  # relative to the store
    assert sorted(item["uri"] for item in items if item["kind"] == "image") == ["corpus/one.png"]  # so is the corpus
    moved = tmp_path / "moved"
    old.rename(moved)  # mv old moved: nothing is left at the recorded absolute paths
    with serve_in_thread(create_app(lambda: load_backend(moved))) as url, httpx.Client(base_url=url) as http:
        image = http.get("/v1/items/one.png/thumbnail")  # small image: from its corpus file
        assert image.status_code == 200, image.text
        frame = http.get("/v1/items/clips/a.mp4%23t=0.000/thumbnail")  # a frame: its stored thumbnail
        assert frame.status_code == 200, frame.text
        (moved / "corpus" / "one.png").unlink()
        assert http.get("/v1/items/one.png/thumbnail").status_code == 200  # the stored thumbnail stands in


def test_a_replaced_photo_never_shows_a_stale_thumbnail(tmp_path, trained_store, digits_corpus):
    """The thumbnail shows what the index holds (the stored one), and its URL carries the
    content's version: cached for long when versioned, revalidated otherwise."""
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    (workdir / "corpus").mkdir()
    for i, name in enumerate(("one.png", "two.png", "three.png")):
        shutil.copy(list_images(digits_corpus)[i], workdir / "corpus" / name)
    run_embed(EmbedConfig(workdir=str(workdir)))
    with serve_in_thread(create_app(lambda: load_backend(workdir))) as url, httpx.Client(base_url=url) as http:
        meta = http.get("/v1/items/one.png").json()
        versioned = meta["thumbnail_url"]
        assert versioned == f"/v1/items/one.png/thumbnail?v={meta['content_hash'][:12]}"
        similar = http.get("/v1/items/one.png/similar", params={"k": 1})
        assert similar.status_code == 200
        before = http.get(versioned)
        assert before.status_code == 200 and "immutable" in before.headers["cache-control"]
        for other in ("/v1/items/one.png/thumbnail", "/v1/items/one.png/thumbnail?v=000000000000",
                      f"{versioned.replace('?v=', '?v=000000000000&v=')}"):  # the right version, and another
            assert http.get(other).headers["cache-control"] == "public, no-cache"
        Image.new("L", (20, 20), 255).save(workdir / "corpus" / "one.png")  # replaced, not yet re-indexed
        after = http.get("/v1/items/one.png/thumbnail")
        assert after.status_code == 200 and after.content == before.content  # the indexed picture
        assert Image.open(io.BytesIO(after.content)).size == (32, 32)


def test_a_linked_thumbnail_survives_its_source_moving_but_never_shows_an_edit(tmp_path, trained_store, digits_corpus):
    """A small plain JPEG's thumbnail is a hard link to it: it outlives a rename or delete of
    the source, and when the source is edited in place (same inode: the thumbnail's bytes
    change too) the server says the picture is gone instead of showing the new one."""
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    corpus = workdir / "corpus"
    corpus.mkdir()
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        Image.open(list_images(digits_corpus)[i]).convert("RGB").resize((32, 32)).save(corpus / name, quality=90)
    run_embed(EmbedConfig(workdir=str(workdir)))
    with serve_in_thread(create_app(lambda: load_backend(workdir))) as url, httpx.Client(base_url=url) as http:
        before = {name: http.get(f"/v1/items/{name}/thumbnail") for name in ("a.jpg", "b.jpg")}
        assert all(r.status_code == 200 for r in before.values())
        (corpus / "a.jpg").rename(tmp_path / "moved.jpg")  # moved away: the link keeps the picture
        assert http.get("/v1/items/a.jpg/thumbnail").content == before["a.jpg"].content
        with open(corpus / "b.jpg", "r+b") as f:  # edited in place, as `cp other.jpg b.jpg` does
            other = io.BytesIO()
            Image.new("RGB", (32, 32), (250, 0, 0)).save(other, format="JPEG")
            f.write(other.getvalue())
            f.truncate()
        gone = http.get("/v1/items/b.jpg/thumbnail")
        assert gone.status_code == 404 and "changed in place" in gone.json()["detail"]
        assert http.get("/v1/items/c.jpg/thumbnail").status_code == 200
