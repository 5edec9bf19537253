"""Shared fixtures: a tiny real store (digits corpus, trained model, published index).

Everything is real: PNG files on disk, a Flax model trained for a few steps, the Beam
pipeline on the in-process runner, a ScaNN index. Session-scoped so it is built once.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent XLA compilation cache for the session, new and empty each time, shared with
# every job a test starts as a subprocess (they inherit the environment): the same train step,
# forward and initialiser compile once for the suite, not once per `lookalike reindex`, `train`
# or `demo` process (a tiny reindex run: 25 s -> 18 s). JAX reads these at import; the
# executables are the same ones a compile gives.
_JAX_CACHE_DIR = tempfile.mkdtemp(prefix="lookalike-tests-xla-cache-")
atexit.register(shutil.rmtree, _JAX_CACHE_DIR, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_CORPUS_SIZE = 200


def _sigint_by_default() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """``preexec_fn`` of a job a test stops with SIGINT, as a terminal's Ctrl-C: SIGINT acts by
    default in it, even when the tests themselves run as a background job (``make test &``,
    nohup), which starts every child with SIGINT ignored."""
    return _sigint_by_default


@pytest.fixture
def refuse_listing(monkeypatch):
    """``refuse_listing(folder)``: listing ``folder`` (``os.scandir``, as ``os.walk`` lists)
    raises PermissionError from then on, as a folder of mode 000 does for a non-root user
    (the tests run as root, who reads it anyway)."""
    scandir = os.scandir
    refused: set[str] = set()

    def guarded(path="."):
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    return lambda folder: refused.add(os.path.abspath(folder))


@pytest.fixture
def watch_decode_pools(monkeypatch):
    """``watch_decode_pools(module)`` -> a list that records, per call of the module's
    ``ordered_map`` (``lookalike.model.parallel``), whether it ran on a thread pool."""

    def watch(module) -> list[bool]:
        used: list[bool] = []
        real_ordered_map = module.ordered_map

        def spy(fn, items, pool, ahead):
            used.append(pool is not None)
            return real_ordered_map(fn, items, pool, ahead)

        monkeypatch.setattr(module, "ordered_map", spy)
        return used

    return watch


@pytest.fixture(scope="session")
def tiny_config():
    from lookalike.model.config import get_config

    return get_config("tiny")


@pytest.fixture(scope="session")
def digits_corpus(tmp_path_factory) -> Path:
    """200 real digit images as PNG files under corpus/<label>/."""
    from lookalike.model.datasets import write_digits_corpus

    root = tmp_path_factory.mktemp("digits") / "corpus"
    write_digits_corpus(root, limit=TINY_CORPUS_SIZE)
    return root


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory, digits_corpus, tiny_config):
    """A store with the tiny corpus and a tiny trained model (LATEST), no index yet."""
    from lookalike.model.store import Store
    from lookalike.model.train import train_and_evaluate

    workdir = tmp_path_factory.mktemp("store")
    shutil.copytree(digits_corpus, workdir / "corpus")
    train_and_evaluate(tiny_config, workdir)
    return Store.at(workdir)


@pytest.fixture(scope="session")
def encoder(trained_store):
    from lookalike.model.artifact import load_encoder

    return load_encoder(trained_store.require_model())


@pytest.fixture(scope="session")
def indexed_store(tmp_path_factory, trained_store):
    """A copy of ``trained_store`` embedded by the real Beam pipeline, with a CURRENT index."""
    from lookalike.model.store import Store
    from lookalike.pipeline.embed import EmbedConfig, run_embed

    workdir = tmp_path_factory.mktemp("indexed")
    shutil.copytree(trained_store.root, workdir, dirs_exist_ok=True)
    run_embed(EmbedConfig(workdir=str(workdir)))
    return Store.at(workdir)



@pytest.fixture(scope="module")
def backend(indexed_store):
    """``indexed_store`` loaded for serving (a test module may define its own ``backend``)."""
    from lookalike.serving.backend import load_backend

    return load_backend(indexed_store.root)


@pytest.fixture(scope="module")
def http(backend):
    """An HTTP client of the real server on 127.0.0.1 serving ``backend``."""
    import httpx

    from lookalike.serving.app import create_app
    from lookalike.serving.server import serve_in_thread

    with serve_in_thread(create_app(lambda: backend)) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client

def digit_metadata(item_id: str) -> dict | None:
    """The sidecar metadata ``tagged_store`` gives an item of the digits corpus: source
    'scanner' for even digits and 'web' for odd ones, tags ['even'] or ['odd'] plus 'three'
    for the 3s; the 9s get no row (null metadata)."""
    digit = int(item_id.split("/")[0])
    if digit == 9:
        return None
    tags = ["odd" if digit % 2 else "even"] + (["three"] if digit == 3 else [])
    return {"id": item_id, "source": "web" if digit % 2 else "scanner", "tags": tags}


@pytest.fixture(name="digit_metadata", scope="session")
def digit_metadata_fixture():
    """``digit_metadata``, the rule ``tagged_store`` tags items by, for tests to compare with."""
    return digit_metadata


@pytest.fixture(scope="session")
def tagged_store(tmp_path_factory, indexed_store):
    """A copy of ``indexed_store`` whose CURRENT index carries ``digit_metadata``, joined by
    ``embed --metadata`` (incremental: every embedding reused from the cache)."""
    import json

    from lookalike.model.store import Store
    from lookalike.pipeline.embed import EmbedConfig, run_embed

    workdir = tmp_path_factory.mktemp("tagged")
    shutil.copytree(indexed_store.root, workdir, dirs_exist_ok=True)
    ids = sorted(p.relative_to(workdir / "corpus").as_posix() for p in (workdir / "corpus").rglob("*.png"))
    rows = [row for row in map(digit_metadata, ids) if row is not None]
    metadata = workdir / "metadata.jsonl"
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = run_embed(EmbedConfig(workdir=str(workdir), metadata=str(metadata), incremental=True))
    assert summary.embedded == 0 and summary.metadata["unmatched_ids"] == 0
    return Store.at(workdir)


# Item ids a URL path carries only with care: a newline (%0A), spaces at either end, '#', '?', '%'.
# "cafe\u0301.png": a name as macOS writes it, decomposed (NFD); a keyboard types it composed (NFC).
ODD_ITEM_IDS = ("new\nline.png", " top.png", "tail .png", "odd/x#t=5?.png", "100%.png", "plain.png", "cafe\u0301.png")


@pytest.fixture(scope="session")
def odd_ids_store(tmp_path_factory, trained_store, digits_corpus):
    """A store whose CURRENT index holds one digit image under each of ``ODD_ITEM_IDS``."""
    from lookalike.model.data import list_images
    from lookalike.model.store import Store
    from lookalike.pipeline.embed import EmbedConfig, run_embed

    workdir = tmp_path_factory.mktemp("odd-ids")
    shutil.copytree(trained_store.root / "models", workdir / "models")
    for item_id, image in zip(ODD_ITEM_IDS, list_images(digits_corpus)):
        target = workdir / "corpus" / item_id
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    summary = run_embed(EmbedConfig(workdir=str(workdir)))
    assert summary.items == len(ODD_ITEM_IDS) and summary.failed == 0
    return Store.at(workdir)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_video(path: Path, seconds: float = 3.0, fps: int = 10, cut_at_s: float | None = 1.5,
                rotation: int | None = None) -> Path:
    """An H.264 MP4 of 64x48 textured frames: dark before ``cut_at_s``, bright after (a shot
    change); with ``rotation``, a display matrix turning them that many degrees counter-clockwise."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        rng = np.random.default_rng(0)
        for i in range(int(seconds * fps)):
            base = 230 if cut_at_s is not None and i / fps >= cut_at_s else 25
            frame = np.clip(base + rng.integers(-15, 15, (48, 64, 3)), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _noisy_video(path: Path, frames: int = 24, fps: int = 8) -> Path:
    """An MPEG-4 MP4 of 320x240 noise frames: megabytes for a few seconds (noise barely compresses)."""
    import av
    import numpy as np

    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.bit_rate = 50_000_000
        for _ in range(frames):
            frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _make_audio_only(path: Path) -> Path:
    """An MP4 holding one AAC audio stream and no video."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


@functools.cache
def tiny_tfds_builders() -> tuple[type, ...]:
    """Four TFDS builders prepared offline in tests (defined once: TFDS registers them by name).

    ``lookalike_tiny_shapes``: 30 16x16 grayscale images of 3 classes (light, mid and dark
    squares with noise) with a ``label`` feature. ``lookalike_tiny_patterns``: 12 16x16
    grayscale images (stripes of varying period and phase) and no label. ``lookalike_tiny_floats``:
    12 16x16 float32 grayscale images in [0, 1] (light and dark) with a ``label``, except
    example 5 (a value of 3.0) and example 8 (all NaN), which cannot be converted.
    ``lookalike_tiny_counts``: a ``train`` split of 12 and a ``test`` split of 6 distinct 16x16
    grayscale images whose ``label`` is a plain int64 (no ClassLabel): 3 for light, 7 for dark."""
    import numpy as np
    import tensorflow_datasets as tfds

    class LookalikeTinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 1)),
                "label": tfds.features.ClassLabel(names=["light", "mid", "dark"]),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(30):
                label = i % 3
                image = np.clip(220 - 90 * label + rng.integers(-20, 20, (16, 16, 1)), 0, 255).astype(np.uint8)
                yield i, {"image": image, "label": label}

    class LookalikeTinyPatterns(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 1)),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            x = np.arange(16)
            for i in range(12):
                stripes = 127 + 120 * np.sin(2 * np.pi * (x / (3 + i % 4) + i / 5))
                yield i, {"image": np.tile(stripes, (16, 1))[:, :, None].astype(np.uint8)}

    class LookalikeTinyFloats(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 1), dtype=np.float32),
                "label": tfds.features.ClassLabel(names=["light", "dark"]),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for i in range(12):
                image = np.clip(0.85 - 0.7 * (i % 2) + rng.uniform(-0.1, 0.1, (16, 16, 1)), 0, 1).astype(np.float32)
                if i == 5:
                    image[0, 0] = 3.0  # outside [0, 1]: not an image lookalike can convert
                if i == 8:
                    image[:] = np.nan
                yield i, {"image": image, "label": i % 2}

    class LookalikeTinyCounts(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 1)),
                "label": np.int64,  # a plain integer Tensor feature, not a ClassLabel
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12, seed=0), "test": self._generate_examples(6, seed=1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                dark = i % 2
                image = np.clip(210 - 150 * dark + rng.integers(-25, 25, (16, 16, 1)), 0, 255).astype(np.uint8)
                yield i, {"image": image, "label": 7 if dark else 3}

    return LookalikeTinyShapes, LookalikeTinyPatterns, LookalikeTinyFloats, LookalikeTinyCounts


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> Path:
    """A TFDS data_dir with conftest's tiny data sets prepared (no download)."""
    pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    for builder in tiny_tfds_builders():
        builder(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir


@pytest.fixture
def make_video():
    """``make_video(path, seconds=3.0, fps=10, cut_at_s=1.5, rotation=None)`` writes a real H.264 MP4."""
    return _make_video


@pytest.fixture
def make_noisy_video():
    """``make_noisy_video(path, frames=24, fps=8)`` writes a real MPEG-4 MP4 of megabytes."""
    return _noisy_video


@pytest.fixture
def make_audio_only():
    """``make_audio_only(path)`` writes an audio-only MP4."""
    return _make_audio_only
