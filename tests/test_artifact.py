import numpy as np
import pytest

from lookalike.model.artifact import load_encoder, read_model_meta, save_model
from lookalike.model.encoder import create_encoder
from lookalike.model.preprocess import ImageDecodeError, PreprocessSpec


def test_save_load_round_trip_and_content_hash_version(tmp_path, tiny_config):
    model = create_encoder(tiny_config)
    spec = PreprocessSpec(tiny_config.image_size, tiny_config.channels)
    v1 = save_model(model, tiny_config, spec, tmp_path, threshold=0.5, metrics={})
    assert save_model(model, tiny_config, spec, tmp_path, threshold=0.5, metrics={}) == v1  # same weights
    other = save_model(create_encoder(tiny_config, seed=1), tiny_config, spec, tmp_path, threshold=0.5, metrics={})
    assert other != v1
    enc = load_encoder(tmp_path / v1)
    x = np.random.default_rng(0).random((3, *spec.shape)).astype(np.float32)
    np.testing.assert_allclose(enc.embed(x), np.asarray(model(x)), atol=1e-5)
    assert enc.version == v1 and enc.same_item_threshold == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_padding_to_buckets_does_not_change_embeddings(encoder):
    x = np.random.default_rng(1).random((7, *encoder.spec.shape)).astype(np.float32)
    batched = encoder.embed(x)
    single = np.concatenate([encoder.embed(x[i : i + 1]) for i in range(7)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert encoder.embed(x[:0]).shape == (0, encoder.embed_dim)


def test_wrong_input_shape_is_refused_with_shapes(encoder):
    with pytest.raises(ValueError, match=r"expected \[N, "):
        encoder.embed(np.zeros((2, 3, 3, 1), np.float32))
    with pytest.raises(ImageDecodeError):
        encoder.embed_bytes([b"garbage"])


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        read_model_meta(tmp_path)


def test_warm_up_compiles_every_shape_a_batch_can_use(tmp_path, tiny_config):
    model = create_encoder(tiny_config)
    spec = PreprocessSpec(tiny_config.image_size, tiny_config.channels)
    enc = load_encoder(tmp_path / save_model(model, tiny_config, spec, tmp_path, threshold=None, metrics={}))
    assert enc.warm_up(10) == [1, 4, 16]
    compiled = enc._forward._cache_size()
    for n in (1, 2, 3, 5, 9, 16):
        enc.embed(np.zeros((n, *spec.shape), np.float32))
    assert enc._forward._cache_size() == compiled  # no query compiles anything new
