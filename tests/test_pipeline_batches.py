"""Batching in the embed pipeline: full batches, duplicates decoded once, asynchronous inference."""

import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from lookalike.model.preprocess import PreprocessSpec, pixels_to_array
from lookalike.pipeline.batches import stack_model_input
from lookalike.pipeline.embed import EmbedConfig, read_embeddings, run_embed
from lookalike.pipeline.inference import FlaxEncoderHandler


def test_uint8_batches_convert_exactly_as_one_image():
    spec = PreprocessSpec(8, 3)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    expected = np.stack([pixels_to_array(p, spec) for p in pixels])
    np.testing.assert_array_equal(stack_model_input(pixels), expected)
    mixed = [pixels[0], pixels_to_array(pixels[1], spec)]
    np.testing.assert_array_equal(stack_model_input(mixed), expected[:2])
    assert stack_model_input(pixels).dtype == np.float32


def test_async_inference_equals_embed_and_pickles_as_an_array(trained_store, encoder):
    handler = FlaxEncoderHandler(str(trained_store.require_model()), min_batch_size=1, max_batch_size=1,
                                 encoder_batch=16)
    model = handler.load_model()
    images = np.random.default_rng(1).random((11, *model.spec.shape), dtype=np.float32)
    [result] = handler.run_inference([images], model)
    assert len(result.inference) == 11
    np.testing.assert_allclose(np.asarray(result.inference), encoder.embed(images), atol=1e-6)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(result.inference)), np.asarray(result.inference))
    [big] = handler.run_inference([np.concatenate([images, images])], model)  # over encoder_batch: in chunks
    np.testing.assert_allclose(np.asarray(big.inference)[11:], encoder.embed(images), atol=1e-6)


@pytest.mark.parametrize("chunk_files, batch_size", [(4, 5), (1000, 2)])
def test_duplicates_are_embedded_once_across_many_chunks(tmp_path, trained_store, monkeypatch, chunk_files, batch_size):
    """(4, 5): many chunks, many batches; (1000, 2): one chunk decoded in many groups."""
    import lookalike.pipeline.listing as listing

    monkeypatch.setattr(listing, "CHUNK_FILES", chunk_files)
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    corpus = workdir / "corpus"
    corpus.mkdir()
    for i in range(23):
        img = Image.new("RGB", (32, 32), (i * 10, 255 - i * 10, 7))
        for x in range(i):  # file sizes differ: several size runs in one chunk
            img.putpixel((x, (x * 7) % 32), (255, 255, 255))
        img.save(corpus / f"img{i:02d}.jpg", quality=90)
    for i in (0, 5, 17):  # byte-identical copies under other names
        shutil.copy(corpus / f"img{i:02d}.jpg", corpus / f"copy{i:02d}.jpg")
    summary = run_embed(EmbedConfig(workdir=str(workdir), run_name="r", publish=False, max_batch_size=batch_size))
    assert (summary.items, summary.embedded, summary.duplicate_files, summary.failed) == (26, 23, 3, 0)
    emb, items = read_embeddings(workdir / "embeddings" / "r")
    by_id = dict(zip(items.column("id").to_pylist(), emb))
    for i in (0, 5, 17):
        np.testing.assert_array_equal(by_id[f"copy{i:02d}.jpg"], by_id[f"img{i:02d}.jpg"])
    assert not (workdir / "embeddings" / "r" / ".listing.arrow").exists()


def test_embed_progress_counts_files_not_items(tmp_path):
    """A video's frames are one file: the embed stage's count never passes the files read."""
    from apache_beam.ml.inference.base import PredictionResult

    from lookalike.pipeline.batches import BatchRowsFn

    image = {"source_hash": "a" * 64, "content_hash": "a" * 64, "kind": "image", "timestamp_s": None, "width": 8,
             "height": 8, "uris": ["/c/x/a.png", "/c/y/copy.png"]}
    frames = [{"source_hash": "b" * 64, "content_hash": f"{'b' * 64}#t={t:.3f}", "kind": "frame", "timestamp_s": t,
               "width": 8, "height": 8, "uris": ["/c/v.mp4"]} for t in (0.0, 2.0, 4.0)]
    fn = BatchRowsFn(3, str(tmp_path), 4, 1, root="/c", thumbnails_dir="/t", model_version="m-1")
    fn.setup()
    metas = [image, *frames]
    list(fn._rows((metas, PredictionResult(None, np.ones((len(metas), 4), np.float32)))))
    assert fn._count == 3  # two paths of one image + one video, not 5 items
    lines = {total: BatchRowsFn(total, str(tmp_path), 4, 1, root="/c", thumbnails_dir="/t", model_version="m-1")
             for total in (54, None, 0)}
    for fn in lines.values():
        fn.setup()
        fn._progress.count = 3
    assert lines[54]._progress.line().startswith("embed: 3/54 files (6%)")
    # --incremental in one process: files known by their bytes are never embedded, so no total (no false ETA)
    assert lines[None]._progress.line().startswith("embed: 3 files, ")
    assert lines[0]._progress.line().startswith("embed (") and "%" not in lines[0]._progress.line()  # a worker's share


def test_cache_writes_land_before_each_batch_counts_and_before_the_bundle_ends(tmp_path, monkeypatch):
    """Each batch's cache file is written on a thread of its own; the failpoint of batch N (what
    the crash tests kill at) fires only once N files are in the cache, the bundle ends only
    once all are, and a failed write fails the bundle."""
    from apache_beam.ml.inference.base import PredictionResult

    import lookalike.pipeline.batches as batches

    cache = tmp_path / "cache"
    cache.mkdir()
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(batches, "failpoint", lambda name: seen.append((name, len(list(cache.glob("part-*.parquet"))))))
    fn = batches.BatchRowsFn(None, str(cache), 4, 1, root="/c", thumbnails_dir="/t", model_version="m-1")
    fn.setup()
    fn.start_bundle()
    for b in range(7):
        metas = [{"source_hash": f"{b}{i}".ljust(64, "0"), "content_hash": f"{b}{i}".ljust(64, "0"), "kind": "image",
                  "timestamp_s": None, "width": 8, "height": 8, "uris": [f"/c/{b}-{i}.png"]} for i in range(3)]
        list(fn.process((metas, PredictionResult(None, np.full((3, 4), b, np.float32)))))
    list(fn.finish_bundle())
    assert [name for name, _ in seen] == [f"embed_batch_{n}" for n in range(1, 8)]
    assert all(files >= n for n, (_, files) in enumerate(seen, 1)), seen
    assert len(list(cache.glob("part-*.parquet"))) == 7
    fn.teardown()

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    fn = batches.BatchRowsFn(None, str(blocked), 4, 1, root="/c", thumbnails_dir="/t", model_version="m-1")
    fn.setup()
    fn.start_bundle()
    list(fn.process(([{"source_hash": "a" * 64, "content_hash": "a" * 64, "kind": "image", "timestamp_s": None,
                       "width": 8, "height": 8, "uris": ["/c/a.png"]}], PredictionResult(None, np.ones((1, 4), np.float32)))))
    with pytest.raises(OSError, match="not-a-folder"):
        list(fn.finish_bundle())
    fn.teardown()


@pytest.fixture
def pools_used(watch_decode_pools) -> list[bool]:
    """Whether each group the decode stage decoded went to its thread pool (in order)."""
    import lookalike.pipeline.batches as batches

    return watch_decode_pools(batches)


def test_big_sources_decoded_on_several_threads_give_what_one_thread_gives(tmp_path, trained_store, pools_used,
                                                                          make_video):
    """Photos and videos go to the decode pool (``model.parallel``), in order: the same
    items, embeddings, duplicates and dead letters as decoding them one at a time."""
    from lookalike.pipeline.embed import read_dead_letters

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):  # noise PNGs of ~49 KB: each worth a thread
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(corpus / f"photo{i}.png")
    shutil.copy(corpus / "photo3.png", corpus / "copy3.png")
    (corpus / "cut.png").write_bytes((corpus / "photo5.png").read_bytes()[:40_000])  # truncated, still big
    shutil.copy(corpus / "cut.png", corpus / "cut-copy.png")  # failed files are no duplicates (as on Dask)
    make_video(corpus / "clip.mp4")
    results = {}
    for threads in (1, 3):
        workdir = tmp_path / f"w{threads}"
        shutil.copytree(trained_store.root / "models", workdir / "models")
        summary = run_embed(EmbedConfig(workdir=str(workdir), corpus=str(corpus), run_name="r", publish=False,
                                        max_batch_size=4, decode_threads=threads))
        emb, items = read_embeddings(workdir / "embeddings" / "r")
        dead = sorted((d["uri"], d["stage"]) for d in read_dead_letters(workdir / "embeddings" / "r"))
        results[threads] = (summary, dict(zip(items.column("id").to_pylist(), emb)), dead)
    (one, by_id_one, dead_one), (three, by_id_three, dead_three) = results[1], results[3]
    assert pools_used and any(pools_used)  # three threads: big sources went to the pool
    assert (three.embedded, three.duplicate_files, three.failed) == (one.embedded, one.duplicate_files, one.failed)
    assert one.failed == 2 and one.duplicate_files == 1
    assert dead_three == dead_one == [(str(corpus / "cut-copy.png"), "decode"), (str(corpus / "cut.png"), "decode")]
    assert sorted(by_id_three) == sorted(by_id_one) and any("#t=" in i for i in by_id_one)
    for item_id, embedding in by_id_one.items():
        np.testing.assert_array_equal(by_id_three[item_id], embedding)


def test_small_files_are_decoded_inline_and_two_big_ones_on_the_pool(tmp_path, pools_used):
    """A thread hand-off costs more than decoding a small JPEG: a group of small files never
    goes to the pool, a group holding at least two big sources does."""
    import hashlib
    import io

    import lookalike.pipeline.batches as batches
    from lookalike.model.parallel import PARALLEL_MIN_BYTES
    from lookalike.pipeline.video import FrameSampling

    rng = np.random.default_rng(3)

    def png(side: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, format="PNG")
        return out.getvalue()

    def entries(blobs: list[bytes]) -> list[tuple[str, str, bytes]]:
        return [(hashlib.sha256(b).hexdigest(), f"/c/{i}.png", b) for i, b in enumerate(blobs)]

    small, big = [png(16) for _ in range(4)], [png(128) for _ in range(2)]
    assert max(map(len, small)) < PARALLEL_MIN_BYTES <= min(map(len, big))
    fn = batches.DecodeBatchFn(PreprocessSpec(8, 3), str(tmp_path / "t"), FrameSampling(), batch_size=100,
                               decode_threads=2)
    fn.setup()
    try:
        for blobs in (small, small + big[:1], small + big):
            fn.start_bundle()
            list(fn.process((0, entries(blobs))))
            [windowed] = list(fn.finish_bundle())
            tag, batch = windowed.value
            assert tag == batches.BATCH and len(batch.metas) == len(blobs)
    finally:
        fn.teardown()
    assert pools_used == [False, False, True]


def test_running_out_of_memory_on_a_picture_is_a_dead_letter_not_recorded_as_undecodable(tmp_path, monkeypatch):
    """A MemoryError while decoding one source (a huge picture, memory short at that moment)
    is not the bytes' fault: that source is a dead letter saying so, the rest of the bundle is
    decoded, and nothing is recorded as undecodable, so the next run tries it again. A
    corrupt source beside it is recorded."""
    import hashlib
    import io

    import lookalike.pipeline.batches as batches
    from lookalike.pipeline.cache import load_failed
    from lookalike.pipeline.sources import DEAD
    from lookalike.pipeline.video import FrameSampling

    def png(value: int) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (16, 16), (value, value, value)).save(out, format="PNG")
        return out.getvalue()

    blobs = {"big.png": png(10), "ok.png": png(200), "cut.png": png(90)[:40]}
    hashes = {name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()}
    real_decode = batches.decode_source

    def decode(source_hash, uris, *args, **kwargs):
        if uris[0].endswith("big.png"):
            raise MemoryError()
        return real_decode(source_hash, uris, *args, **kwargs)

    monkeypatch.setattr(batches, "decode_source", decode)
    fn = batches.DecodeBatchFn(PreprocessSpec(8, 3), str(tmp_path / "t"), FrameSampling(), batch_size=100,
                               failures_dir=str(tmp_path / "cache"), decode_threads=1)
    (tmp_path / "cache").mkdir()
    fn.setup()
    try:
        fn.start_bundle()
        outputs = list(fn.process((0, [(hashes[n], f"/c/{n}", b) for n, b in blobs.items()])))
        outputs += [w.value for w in fn.finish_bundle()]
    finally:
        fn.teardown()
    dead = {v["uri"]: v for tag, v in outputs if tag == DEAD}
    assert set(dead) == {"/c/big.png", "/c/cut.png"}
    assert "out of memory decoding it" in dead["/c/big.png"]["reason"]
    [batch] = [v for tag, v in outputs if tag == batches.BATCH]
    assert [m["uris"] for m in batch.metas] == [["/c/ok.png"]]
    assert set(load_failed(tmp_path / "cache")) == {hashes["cut.png"]}
