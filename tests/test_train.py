import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lookalike.model.encoder import create_encoder
from lookalike.model.train import make_optimizer, train_step


def test_encoder_outputs_unit_vectors(tiny_config):
    model = create_encoder(tiny_config)
    x = jnp.asarray(np.random.default_rng(0).random((5, *([tiny_config.image_size] * 2), 1)), jnp.float32)
    emb = model(x)
    assert emb.shape == (5, tiny_config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, rtol=1e-5)


def test_jitted_train_step_lowers_the_loss(tiny_config):
    rng = np.random.default_rng(0)
    size = tiny_config.image_size
    x_a = jnp.asarray(rng.random((16, size, size, 1)), jnp.float32)
    x_b = jnp.asarray(np.concatenate([np.asarray(x_a[:8]), rng.random((8, size, size, 1))]), jnp.float32)
    similar = jnp.asarray([1.0] * 8 + [0.0] * 8)
    model = create_encoder(tiny_config)
    optimizer = make_optimizer(model, tiny_config)
    losses = [float(train_step(model, optimizer, x_a, x_b, similar, jnp.float32(1.0))) for _ in range(tiny_config.num_steps)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_training_learns_digits_and_writes_the_artifact(trained_store, tiny_config):
    model_dir = trained_store.require_model()
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["version"] == model_dir.name and meta["embed_dim"] == tiny_config.embed_dim
    assert meta["preprocess"]["image_size"] == tiny_config.image_size
    assert meta["same_item_threshold"] > 0
    # 10 classes: chance precision@1 is ~0.1; even 30 tiny steps do far better.
    assert meta["metrics"]["precision_at_1"] > 0.4, meta["metrics"]
    assert (model_dir / "params").is_dir() and (model_dir / "training.png").is_file()
    lines = (model_dir / "train_log.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == tiny_config.num_steps


_DATA_PARALLEL_SCRIPT = """
import json, numpy as np, jax
from lookalike.model.config import get_config, apply_overrides
from lookalike.model.data import LabelledImages
from lookalike.model.train import train_on_arrays, embed_numpy
import tempfile, pathlib
import sys
cfg = apply_overrides(get_config("tiny"), ["num_steps=10", "batch_pairs=16", "val_fraction=0", *sys.argv[1:]])
rng = np.random.default_rng(0)
labels = np.repeat(np.arange(4), 6).astype(np.int32)
images = (rng.random((24, 16, 16, 1)) * 0.2 + labels[:, None, None, None] / 4).astype(np.float32)
data = LabelledImages(images, labels, list("abcd"), [], [])
model, metrics, _ = train_on_arrays(cfg, data, pathlib.Path(tempfile.mkdtemp()))
from flax import nnx
on = len(jax.tree_util.tree_leaves(nnx.state(model))[0].sharding.device_set)  # embed_numpy splits batches over these
print(json.dumps({"devices": jax.device_count(), "params_on": on, "emb": embed_numpy(model, images[:4], batch=6).tolist()}))
"""


def run_with_devices(n: int, *overrides: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT, *overrides], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_parallel_training_on_4_devices_matches_1_device():
    one, four = run_with_devices(1), run_with_devices(4)
    assert (one["devices"], four["devices"]) == (1, 4) and four["params_on"] == 4
    np.testing.assert_allclose(np.asarray(four["emb"]), np.asarray(one["emb"]), atol=2e-3)


def test_data_parallel_triplet_training_with_resnet_on_4_devices_matches_1_device():
    overrides = ("architecture=resnet", "resnet_widths=8,16", "loss=triplet", "mining=batch_hard",
                 "pk_classes=4", "pk_images=4")
    one, four = run_with_devices(1, *overrides), run_with_devices(4, *overrides)
    assert (one["devices"], four["devices"]) == (1, 4)
    np.testing.assert_allclose(np.asarray(four["emb"]), np.asarray(one["emb"]), atol=2e-3)


def test_warm_start_copies_weights_and_refuses_other_shapes(trained_store, tiny_config, tmp_path):
    from lookalike.model.artifact import load_model
    from lookalike.model.config import apply_overrides
    from lookalike.model.train import warm_start

    previous, _ = load_model(trained_store.require_model())
    fresh = create_encoder(tiny_config, seed=42)
    assert warm_start(fresh, tiny_config, trained_store.require_model())
    x = jnp.ones((2, tiny_config.image_size, tiny_config.image_size, 1))
    np.testing.assert_allclose(np.asarray(fresh(x)), np.asarray(previous(x)), atol=1e-6)
    other = apply_overrides(tiny_config, ["embed_dim=4"])
    assert not warm_start(create_encoder(other), other, trained_store.require_model())


def test_augmented_batches_are_distorted_and_a_pure_function_of_the_step(tiny_config):
    import dataclasses

    from lookalike.model.train import batch_maker, data_mesh

    rng = np.random.default_rng(0)
    x = rng.random((40, 16, 16, 1)).astype(np.float32)
    y = np.repeat(np.arange(10), 4).astype(np.int32)
    config = dataclasses.replace(tiny_config, loss="triplet", pk_classes=4, pk_images=2, augment_shift=0.1, augment_rotate_deg=10)
    make, _, _ = batch_maker(config, x, y, data_mesh())
    first, again = make(3), make(3)
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))
    plain, _, _ = batch_maker(dataclasses.replace(config, augment_shift=0.0, augment_rotate_deg=0.0), x, y, data_mesh())
    undistorted = np.asarray(plain(3)[0])
    np.testing.assert_array_equal(np.asarray(first[1]), np.asarray(plain(3)[1]))  # same items drawn
    assert not np.allclose(np.asarray(first[0]), undistorted)


def test_a_time_budget_stops_training_early_and_keeps_a_usable_model(tiny_config, tmp_path, caplog):
    import dataclasses
    import logging

    from lookalike.model.data import LabelledImages
    from lookalike.model.train import train_on_arrays

    rng = np.random.default_rng(0)
    x = rng.random((60, 16, 16, 1)).astype(np.float32)
    y = np.repeat(np.arange(6), 10).astype(np.int32)
    config = dataclasses.replace(tiny_config, num_steps=100_000, eval_every_steps=50_000, max_train_minutes=0.002)
    with caplog.at_level(logging.INFO, logger="lookalike.model.train"):  # no class names: the labels are counted
        model, metrics, _ = train_on_arrays(config, LabelledImages(x, y, [], [], []), tmp_path)
    assert "training on 48 images of 6 classes (12 held out)" in caplog.text
    assert (metrics["images_per_step"], metrics["devices"]) == (2 * config.batch_pairs, 1)  # the batch actually used
    last = [m for m in caplog.messages if m.startswith(f"train: {metrics['steps']}/")]
    assert len(last) == 1 and "stopped by the time budget - done in" in last[0] and "ETA" not in last[0], last
    assert 1 <= metrics["steps"] < 100_000 and metrics["planned_steps"] == 100_000
    assert metrics["best_step"] == metrics["steps"]  # the stopping step was evaluated and checkpointed
    assert np.isfinite(metrics["map_at_r"])
    assert (tmp_path / "training.png").is_file()


def test_a_validation_split_of_one_class_reports_no_metrics_and_no_threshold(tiny_config, tmp_path, caplog):
    """200 cats and 3 dogs: the dogs all train, so validation is cats only: any model would score 1.0."""
    import dataclasses
    import logging

    from lookalike.model.data import LabelledImages
    from lookalike.model.train import train_on_arrays

    rng = np.random.default_rng(0)
    x = rng.random((203, 16, 16, 1)).astype(np.float32)
    y = np.array([0] * 200 + [1] * 3, np.int32)
    config = dataclasses.replace(tiny_config, num_steps=10, eval_every_steps=5)
    with caplog.at_level(logging.WARNING):
        _, metrics, threshold = train_on_arrays(config, LabelledImages(x, y, ["cat", "dog"], [], []), tmp_path)
    assert threshold is None and "map_at_r" not in metrics and "precision_at_1" not in metrics
    assert "validation holds 40 image(s) of 1 class(es)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # nothing held out at all: the setting that did it is named
        _, _, threshold = train_on_arrays(dataclasses.replace(config, val_fraction=0.0),
                                          LabelledImages(x, y, ["cat", "dog"], [], []), tmp_path / "none-held-out")
    assert threshold is None and "val_fraction=0: no images are held out" in caplog.text
    assert "add images to more classes" not in caplog.text


def test_progress_counts_steps_done_not_steps_queued(tiny_config, tmp_path, monkeypatch):
    """JAX dispatches steps asynchronously: the loop once ran ~35 steps ahead of the device
    after each evaluation, so the progress line counted queued steps at 10x the real rate.
    When a step is reported, every earlier step's loss has been computed."""
    import dataclasses

    import lookalike.model.train as train_module
    from lookalike.model.data import LabelledImages

    outputs, not_ready = [], []
    real_batch_maker = train_module.batch_maker

    def recording_batch_maker(*args, **kwargs):
        make_batch, step_fn, images_per_step = real_batch_maker(*args, **kwargs)

        def recorded_step(*step_args):
            outputs.append(step_fn(*step_args))
            return outputs[-1]

        return make_batch, recorded_step, images_per_step

    class CheckingProgress(train_module.Progress):
        def update(self, count, extra=""):
            not_ready.extend(step for step, loss in enumerate(outputs[:-1], 1) if not loss.is_ready())
            super().update(count, extra)

    monkeypatch.setattr(train_module, "batch_maker", recording_batch_maker)
    monkeypatch.setattr(train_module, "Progress", CheckingProgress)
    rng = np.random.default_rng(0)
    x = rng.random((64, 32, 32, 1)).astype(np.float32)
    y = np.repeat(np.arange(8), 8).astype(np.int32)
    config = dataclasses.replace(tiny_config, image_size=32, conv_widths=(32, 64), batch_pairs=256, num_steps=12,
                                 log_every_steps=12, eval_every_steps=12)  # slow steps, one sync at the end
    train_module.train_on_arrays(config, LabelledImages(x, y, [], [], []), tmp_path)
    assert len(outputs) == 12 and not_ready == [], not_ready


def test_a_loss_logged_once_is_drawn(tmp_path):
    """A run shorter than log_every_steps logs one loss: a line of one point draws nothing."""
    from PIL import Image

    from lookalike.model.train import plot_history

    def blue_pixels(history) -> int:
        path = tmp_path / "p.png"
        plot_history(history, path)
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(rgb - np.array([31, 119, 180])).sum(axis=-1) < 40).sum())  # tab:blue

    assert blue_pixels([{"step": 40, "loss": 0.5}]) > blue_pixels([]) + 20


def test_a_triplet_batch_too_big_to_mine_is_refused_before_any_work(tiny_config, tmp_path):
    """pk_images=1000 once asked XLA for 67 GB and ended in its raw out-of-memory error."""
    import dataclasses

    from lookalike.model.data import LabelledImages
    from lookalike.model.train import train_on_arrays

    rng = np.random.default_rng(0)
    data = LabelledImages(rng.random((40, 16, 16, 1)).astype(np.float32), np.repeat(np.arange(4), 10).astype(np.int32),
                          list("abcd"), [], [])
    config = dataclasses.replace(tiny_config, loss="triplet", mining="semi_hard", pk_classes=4, pk_images=1000)
    with pytest.raises(ValueError, match=r"pk_classes=4 x pk_images=1000 gives 4000 images/step.*mining=semi_hard.*GiB"):
        train_on_arrays(config, data, tmp_path)
    huge = dataclasses.replace(config, mining="batch_hard", pk_images=1_000_000)  # square, but of a million images
    with pytest.raises(ValueError, match=r"4000000 images/step.*mining=batch_hard compares every pair"):
        train_on_arrays(huge, data, tmp_path)
    assert not (tmp_path / "training.png").exists()
    hard = dataclasses.replace(config, mining="batch_hard", pk_images=4, num_steps=2)  # square memory: fine
    train_on_arrays(hard, data, tmp_path)


def test_a_time_budget_counts_the_compile_and_names_itself_as_set(tiny_config, tmp_path, caplog):
    """A budget shorter than compiling the step stops after the first step, publishing what it
    reached, and says the budget as it was set (0.0001, not rounded to 0.0)."""
    import dataclasses
    import logging

    from lookalike.model.data import LabelledImages
    from lookalike.model.train import train_on_arrays

    rng = np.random.default_rng(0)
    x = rng.random((40, 16, 16, 1)).astype(np.float32)
    y = np.repeat(np.arange(4, dtype=np.int32), 10)
    config = dataclasses.replace(tiny_config, num_steps=50, eval_every_steps=25, max_train_minutes=0.0001)
    with caplog.at_level(logging.WARNING):
        _, metrics, _ = train_on_arrays(config, LabelledImages(x, y, list("abcd"), [], []), tmp_path)
    assert "time budget of 0.0001 min used up (compiling the step included): training stops at step 1 of 50" in caplog.text
