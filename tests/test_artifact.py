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
    assert enc.version == v1 and enc.same_item_threshold == 0.5 and enc.same_item_means == "same class"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    from lookalike.model.config import apply_overrides

    unlabelled = save_model(model, apply_overrides(tiny_config, ["unlabelled=true"]), spec, tmp_path, threshold=0.5, metrics={})
    assert load_encoder(tmp_path / unlabelled).same_item_means == "same image"  # calibrated on views of one image


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


_DEVICES_SCRIPT = """
import json, sys, numpy as np, jax
from lookalike.model.artifact import load_encoder
enc = load_encoder(sys.argv[1], max_batch=8)
x = np.load(sys.argv[2])
padded = np.zeros((enc._buckets[-1], *enc.spec.shape), np.float32)
out = enc._forward(enc._state, padded)
print(json.dumps({"devices": len(enc.devices), "buckets": enc._buckets, "output_devices": len(out.sharding.device_set),
                  "emb": enc.embed(x).tolist(), "async": np.asarray(enc.embed_async(x[:5])).tolist()}))
"""


@pytest.mark.parametrize("num_devices", [3])
def test_encoder_is_data_parallel_over_every_device_with_the_same_embeddings(tmp_path, tiny_config, num_devices):
    import json
    import os
    import subprocess
    import sys

    model = create_encoder(tiny_config)
    spec = PreprocessSpec(tiny_config.image_size, tiny_config.channels)
    model_dir = tmp_path / save_model(model, tiny_config, spec, tmp_path, threshold=None, metrics={})
    x = np.random.default_rng(2).random((11, *spec.shape)).astype(np.float32)  # 8 + 3: a full and a padded batch
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, str(model_dir), str(tmp_path / "x.npy")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["devices"] == got["output_devices"] == num_devices  # every batch is split over all of them
    assert got["buckets"] == [3, 6, 9]  # 1, 4 and 8 rounded up to multiples of 3
    one_device = load_encoder(model_dir, max_batch=8)
    assert len(one_device.devices) == 1 and one_device._buckets == [1, 4, 8]
    np.testing.assert_allclose(np.asarray(got["emb"]), one_device.embed(x), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["async"]), one_device.embed(x[:5]), atol=1e-5)
