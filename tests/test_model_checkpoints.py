"""Training resumes after a SIGKILL from its last orbax checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lookalike.model.config import get_config

_SCRIPT = """
import json, sys
from lookalike.model.config import apply_overrides, get_config
from lookalike.model.train import train_and_evaluate
cfg = apply_overrides(get_config("tiny"), ["num_steps=30", "checkpoint_every_steps=10", "eval_every_steps=10", *sys.argv[3:]])
r = train_and_evaluate(cfg, sys.argv[1], data_dir=sys.argv[2])
print(json.dumps({"version": r.version, "metrics": r.metrics}))
"""


def _train(workdir, corpus, failpoint=None, overrides=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("LOOKALIKE_FAILPOINT", None)
    if failpoint:
        env["LOOKALIKE_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-c", _SCRIPT, str(workdir), str(corpus), *overrides], env=env,
                          capture_output=True, text=True, timeout=300)


def test_training_killed_after_a_checkpoint_resumes_and_matches_an_uninterrupted_run(tmp_path, digits_corpus):
    killed = _train(tmp_path / "a", digits_corpus, failpoint="train.after_checkpoint.20")
    assert killed.returncode == -9, killed.stderr[-2000:]
    runs = list((tmp_path / "a" / "models" / ".runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "latest" / "20").is_dir()
    assert not (tmp_path / "a" / "models" / "LATEST").exists()

    resumed = _train(tmp_path / "a", digits_corpus, overrides=["max_train_minutes=30"])  # a time cap: the same job
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "training data changed" not in resumed.stderr and "not resumed" not in resumed.stderr, resumed.stderr[-2000:]
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["metrics"]["resumed_from_step"] == 20 and out["metrics"]["steps"] == 30
    model_dir = tmp_path / "a" / "models" / out["version"]
    steps = [json.loads(line)["step"] for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30 and 10 in steps  # history from before the kill kept
    assert not runs[0].exists()  # the run folder is removed once the model is published

    straight = _train(tmp_path / "b", digits_corpus, overrides=["max_train_minutes=30"])  # the config the model records
    assert straight.returncode == 0, straight.stderr[-2000:]
    ref = json.loads(straight.stdout.strip().splitlines()[-1])
    assert ref["metrics"]["resumed_from_step"] == 0
    # Batches depend only on (seed, step) and the optimizer state is restored: same training.
    np.testing.assert_allclose(out["metrics"]["map_at_r"], ref["metrics"]["map_at_r"], atol=1e-3)
    assert out["metrics"]["best_step"] == ref["metrics"]["best_step"]
    assert out["version"] == ref["version"]  # bit-identical weights (content hash)


def test_a_killed_training_whose_data_changed_starts_again_rather_than_resuming(tmp_path, digits_corpus):
    """Same config and folder, another image in it: the checkpoints were trained on other data,
    and the saved model records the new data's inputs hash, so it must not resume them."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(digits_corpus, corpus)
    killed = _train(tmp_path / "a", corpus, failpoint="train.after_checkpoint.20")
    assert killed.returncode == -9, killed.stderr[-2000:]
    shutil.copy(next((corpus / "1").iterdir()), corpus / "1" / "added.png")
    rerun = _train(tmp_path / "a", corpus)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    out = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert out["metrics"]["resumed_from_step"] == 0, out["metrics"]
    assert "the training data changed since the checkpoints in" in rerun.stderr


def test_checkpoints_keep_the_latest_and_the_best_by_validation_metric(tmp_path, tiny_config):
    import jax.numpy as jnp
    from flax import nnx

    from lookalike.model.checkpoints import TrainCheckpoints
    from lookalike.model.encoder import create_encoder
    from lookalike.model.train import make_optimizer

    model = create_encoder(tiny_config)
    optimizer = make_optimizer(model, tiny_config)
    ckpt = TrainCheckpoints(tmp_path, "map_at_r")
    x = jnp.ones((1, tiny_config.image_size, tiny_config.image_size, 1))
    outputs, history = {}, []
    for step, value in ((10, 0.5), (20, 0.8), (30, 0.6)):
        nnx.update(model, nnx.state(create_encoder(tiny_config, seed=step)))  # different weights per step
        outputs[step] = np.asarray(model(x))
        history.append({"step": step, "map_at_r": value})
        ckpt.offer_best(step, model, history[-1])
        ckpt.save(step, model, optimizer, history)
    ckpt.close()

    again = TrainCheckpoints(tmp_path, "map_at_r")  # a new process sees the same state
    fresh = create_encoder(tiny_config, seed=99)
    step, restored_history = again.restore_latest(fresh, make_optimizer(fresh, tiny_config))
    assert step == 30 and restored_history == history and again.best_value == 0.8
    np.testing.assert_allclose(np.asarray(fresh(x)), outputs[30], atol=1e-6)
    assert again.restore_best(fresh) == 20
    np.testing.assert_allclose(np.asarray(fresh(x)), outputs[20], atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["30"]
    again.close()


def test_a_corrupt_checkpoint_is_dropped_with_a_warning_and_training_starts_afresh(tmp_path, tiny_config, caplog):
    """A truncated checkpoint (a disk that filled up, a copy cut short) made every rerun of the
    same training fail with a traceback. Now: one warning naming it, then a fresh start that
    can save the same step again."""
    from lookalike.model.checkpoints import TrainCheckpoints
    from lookalike.model.encoder import create_encoder
    from lookalike.model.train import make_optimizer

    model = create_encoder(tiny_config)
    optimizer = make_optimizer(model, tiny_config)
    ckpt = TrainCheckpoints(tmp_path, "map_at_r")
    ckpt.offer_best(10, model, {"step": 10, "map_at_r": 0.5})
    ckpt.save(10, model, optimizer, [{"step": 10}])
    ckpt.close()
    for kind in ("latest", "best"):
        for path in (tmp_path / "checkpoints" / kind / "10").rglob("*"):
            if path.is_file() and (path.parent.name == "d" or path.name.endswith(".json") or "meta" in path.parts):
                os.truncate(path, min(10, path.stat().st_size))
    caplog.set_level("WARNING")
    again = TrainCheckpoints(tmp_path, "map_at_r")
    assert again.best_value is None and again.best_step() is None
    assert again.restore_latest(model, optimizer) == (0, [])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("cannot be read" in w and "10" in w for w in warnings), warnings
    again.save(10, model, optimizer, [{"step": 10}])  # the same step saved again, from the fresh start
    assert again.offer_best(10, model, {"step": 10, "map_at_r": 0.4})
    again.close()
    assert TrainCheckpoints(tmp_path, "map_at_r").restore_latest(model, optimizer) == (10, [{"step": 10}])


def test_a_nan_validation_metric_never_becomes_the_best(tmp_path, tiny_config):
    from lookalike.model.checkpoints import TrainCheckpoints
    from lookalike.model.encoder import create_encoder

    model = create_encoder(tiny_config)
    ckpt = TrainCheckpoints(tmp_path, "map_at_r")
    assert not ckpt.offer_best(5, model, {"step": 5, "map_at_r": float("nan")})
    assert ckpt.best_step() is None and ckpt.best_value is None
    ckpt.close()


def test_the_best_evaluation_is_published_even_on_a_step_without_a_checkpoint(tmp_path, monkeypatch):
    """Evaluating every 20 steps, checkpointing every 60: the best MAP@R (step 40) must win."""
    import dataclasses

    import lookalike.model.train as train
    from lookalike.model.data import LabelledImages

    scores = {20: 0.3, 40: 0.9, 60: 0.5, 80: 0.4, 100: 0.45, 120: 0.5}
    evaluated: list[float] = []

    def scripted_evaluate(model, x, y):  # the validation metric, scripted; training itself is real
        value = scores[20 * (len(evaluated) + 1)]
        evaluated.append(value)
        return {"precision_at_1": value, "map_at_r": value}

    monkeypatch.setattr(train, "evaluate", scripted_evaluate)
    rng = np.random.default_rng(0)
    data = LabelledImages(rng.random((200, 16, 16, 1), dtype=np.float32), np.repeat(np.arange(10), 20).astype(np.int32),
                          [str(i) for i in range(10)], [], [])
    config = dataclasses.replace(get_config("tiny"), num_steps=120, eval_every_steps=20, checkpoint_every_steps=60,
                                 log_every_steps=20)
    _, metrics, _ = train.train_on_arrays(config, data, tmp_path / "run")
    assert len(evaluated) == 6 and metrics["best_step"] == 40


def test_a_checkpoint_is_saved_at_least_every_few_minutes_between_evaluations(tmp_path, monkeypatch):
    """Evaluating (and so checkpointing) every 1,000 steps, as a preset may, is many minutes of
    a ResNet on a CPU: a checkpoint also comes once CHECKPOINT_EVERY_S has passed since the last,
    so a killed run loses minutes, not its whole interval."""
    import dataclasses

    import lookalike.model.train as train
    from lookalike.model.checkpoints import TrainCheckpoints
    from lookalike.model.data import LabelledImages

    saved: list[int] = []
    save = TrainCheckpoints.save

    def recording_save(self, step, *args, **kwargs):
        saved.append(step)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(TrainCheckpoints, "save", recording_save)
    monkeypatch.setattr(train, "CHECKPOINT_EVERY_S", 0.0)  # always due: a checkpoint after every step
    rng = np.random.default_rng(0)
    data = LabelledImages(rng.random((200, 16, 16, 1), dtype=np.float32), np.repeat(np.arange(10), 20).astype(np.int32),
                          [str(i) for i in range(10)], [], [])
    config = dataclasses.replace(get_config("tiny"), num_steps=12, eval_every_steps=1000, log_every_steps=1000)
    train.train_on_arrays(config, data, tmp_path / "run")
    assert saved == list(range(1, 13)), saved  # not only at the end (step 12)
    monkeypatch.setattr(train, "CHECKPOINT_EVERY_S", 1e9)
    saved.clear()
    train.train_on_arrays(config, data, tmp_path / "run2")
    assert saved == [12]


def test_a_second_training_of_the_same_run_is_refused_until_the_first_dies(tmp_path):
    import pytest

    from lookalike.model.checkpoints import RunInUseError, exclusive_run

    run_dir = tmp_path / "models" / ".runs" / "run-x"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, pathlib\n"
        "from lookalike.model.checkpoints import exclusive_run\n"
        f"with exclusive_run(pathlib.Path({str(run_dir)!r})):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match="another training is using .*run-x"):
            with exclusive_run(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_run(run_dir):  # the kernel released the dead holder's lock
        assert (run_dir / ".lock").exists()
    assert not (run_dir / ".lock").exists()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_training_says_in_one_line_that_nothing_was_published_and_how_to_resume(
        ctrl_c_as_in_a_terminal, tmp_path, digits_corpus, signum):
    """Ctrl-C, or SIGTERM (kill, systemd, a timeout: it ended the process without a word)."""
    import signal
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("lookalike"))
    job = subprocess.Popen([exe, "train", "--workdir", str(tmp_path), "--data", str(digits_corpus), "--config", "tiny",
                            "--set", "num_steps=30", "--set", "checkpoint_every_steps=10", "--set", "eval_every_steps=10"],
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "LOOKALIKE_FAILPOINT": "train.after_checkpoint.10:wait"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=ctrl_c_as_in_a_terminal)
    seen = []
    while not any("failpoint train.after_checkpoint.10: waiting" in line for line in seen):
        line = job.stderr.readline()
        assert line, "".join(seen)[-3000:]  # training ended before the failpoint
        seen.append(line)
    if signum == "SIGINT":
        os.killpg(job.pid, signal.SIGINT)  # as a terminal's Ctrl-C
    else:
        job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    err = "".join(seen) + err
    assert job.returncode == (130 if signum == "SIGINT" else 143), err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1] == ("lookalike train: interrupted: no model published" if signum == "SIGINT" else
                         "lookalike train: terminated (SIGTERM): no model published"), err[-3000:]
    run_dir = next((tmp_path / "models" / ".runs").iterdir())
    assert lines[-2].endswith(f"training interrupted: rerun the same command to resume from the checkpoint of step 10 "
                              f"({run_dir})"), err[-3000:]
    assert not (tmp_path / "models" / "LATEST").exists()
