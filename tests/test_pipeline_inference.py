"""The Flax model handler's encoder preloading (``lookalike.pipeline.inference``)."""

import shutil
import threading

import numpy as np
import pytest

from lookalike.model.artifact import load_encoder
from lookalike.model.data import list_images
from lookalike.pipeline import inference
from lookalike.pipeline.embed import EmbedConfig, run_embed
from lookalike.pipeline.inference import FlaxEncoderHandler, discard_preloaded, preload_encoder, take_preloaded


@pytest.fixture
def loads(monkeypatch):
    """The threads ``load_encoder`` runs on in the handler's module, in order."""
    threads: list[str] = []

    def counted(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return load_encoder(*args, **kwargs)

    monkeypatch.setattr(inference, "load_encoder", counted)
    yield threads
    discard_preloaded()


def test_preloaded_encoder_is_compiled_and_taken_once(trained_store, loads):
    model_dir = str(trained_store.require_model())
    preload_encoder(model_dir, 8)
    preload_encoder(model_dir, 8)  # one load per key
    assert take_preloaded(model_dir, 4) is None  # another batch size: another key
    encoder = take_preloaded(model_dir, 8)
    assert loads == ["preload-encoder"] and encoder.max_batch == 8
    assert encoder._forward._cache_size() == 1  # compiled for its batch before the first one arrives
    assert take_preloaded(model_dir, 8) is None
    x = np.random.default_rng(0).random((3, *encoder.spec.shape)).astype(np.float32)
    np.testing.assert_allclose(encoder.embed(x), load_encoder(model_dir, max_batch=8).embed(x), atol=1e-6)
    handler = FlaxEncoderHandler(model_dir, max_batch_size=1, encoder_batch=8)
    assert handler.load_model().max_batch == 8 and loads[-1] == threading.current_thread().name  # nothing preloaded


def test_a_failed_preload_falls_back_to_loading(tmp_path, trained_store, loads):
    preload_encoder(str(tmp_path / "missing"), 8)
    assert take_preloaded(str(tmp_path / "missing"), 8) is None  # logged, not raised
    preload_encoder(str(trained_store.require_model()), 16)
    assert discard_preloaded() == 1 and take_preloaded(str(trained_store.require_model()), 16) is None


def test_in_process_run_uses_the_encoder_loaded_while_listing(tmp_path, trained_store, digits_corpus, loads):
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    shutil.copytree(digits_corpus / "1", workdir / "corpus" / "1")
    summary = run_embed(EmbedConfig(workdir=str(workdir), run_name="first", publish=False))
    assert summary.embedded == len(list_images(workdir / "corpus"))
    assert loads == ["preload-encoder"]  # the handler took it: the model was loaded once, in the background
    assert take_preloaded(str(trained_store.require_model()), EmbedConfig.max_batch_size) is None  # nothing left over
    run_embed(EmbedConfig(workdir=str(workdir), run_name="again", publish=False, incremental=True))
    assert loads == ["preload-encoder"]  # nothing changed: a rerun never loads the model
