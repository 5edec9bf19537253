"""Thumbnails on the live server for what the pipeline indexed: images and video frames."""

import io
import shutil

import httpx
from PIL import Image

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
        thumb = http.get(f"/v1/items/{frame_id.replace('#', '%23')}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumb.content)).convert("L").getpixel((5, 5)) > 150  # the bright shot
        image = http.get("/v1/items/one.png/thumbnail")
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (32, 32)
