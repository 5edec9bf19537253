"""ResNet encoder and triplet training end to end on tiny shapes."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lookalike.model.config import apply_overrides, get_config
from lookalike.model.encoder import ResNetEncoder, create_encoder


def _blobs(n_classes=4, per_class=8, size=16, channels=1, seed=0):
    from lookalike.model.data import LabelledImages

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.int32)
    protos = rng.random((n_classes, size, size, channels))
    images = np.clip(protos[labels] + 0.15 * rng.standard_normal((len(labels), size, size, channels)), 0, 1)
    return LabelledImages(images.astype(np.float32), labels, [str(c) for c in range(n_classes)], [], [])


def test_resnet_encoder_shapes_and_unit_norm():
    cfg = apply_overrides(get_config("tiny"), ["architecture=resnet", "resnet_widths=8,16", "resnet_blocks=2",
                                               "image_size=20", "channels=3"])
    model = create_encoder(cfg)
    assert isinstance(model, ResNetEncoder) and len(model.blocks) == 4
    emb = np.asarray(model(jnp.ones((3, 20, 20, 3)) * 0.3))
    assert emb.shape == (3, cfg.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard", "semi_hard"])
def test_triplet_training_with_resnet_learns_and_round_trips_through_the_artifact(tmp_path, mining):
    from lookalike.model.artifact import load_encoder, save_model
    from lookalike.model.preprocess import PreprocessSpec
    from lookalike.model.train import embed_numpy, train_on_arrays

    cfg = apply_overrides(get_config("tiny"), [
        "architecture=resnet", "resnet_widths=8,16", "loss=triplet", f"mining={mining}", "pk_classes=4",
        "pk_images=4", "margin=0.5", "num_steps=40", "eval_every_steps=20", "val_fraction=0.25"])
    data = _blobs()
    model, metrics, threshold = train_on_arrays(cfg, data, tmp_path / "run")
    assert metrics["precision_at_1"] >= 0.75 and metrics["map_at_r"] > 0.5, metrics
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0], losses
    version = save_model(model, cfg, PreprocessSpec(16, 1), tmp_path / "models", threshold=threshold, metrics=metrics)
    enc = load_encoder(tmp_path / "models" / version)
    assert enc.meta["architecture"] == "ResNetEncoder" and enc.meta["config"]["loss"] == "triplet"
    np.testing.assert_allclose(enc.embed(data.images[:5]), embed_numpy(model, data.images[:5]), atol=1e-5)


def test_old_model_json_without_new_fields_loads_as_the_conv_net():
    from lookalike.model.config import config_from_dict

    old = {"image_size": 16, "channels": 1, "conv_widths": [8, 16], "hidden_dim": 32, "embed_dim": 8, "margin": 1.0}
    cfg = config_from_dict(old)
    assert (cfg.architecture, cfg.loss, cfg.conv_widths) == ("conv", "contrastive", (8, 16))


def test_presets_build_and_bad_choices_are_named():
    for name in ("tiny", "digits", "omniglot", "photos"):
        cfg = get_config(name)
        create_encoder(cfg)
    assert get_config("photos").channels == 3
    with pytest.raises(ValueError, match="architecture='vit'"):
        apply_overrides(get_config("tiny"), ["architecture=vit"])
    with pytest.raises(ValueError, match="pk_images"):
        apply_overrides(get_config("tiny"), ["loss=triplet", "pk_images=1"])
