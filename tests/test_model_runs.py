"""Tests of model/runs.py: a job's run id, and a training of the same data with other settings
naming the stopped trainings it does not resume (real tiny training)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from lookalike.model.config import config_to_dict
from lookalike.model.runs import JOB_FILE, run_id, stopped_runs_of
from lookalike.model.train import train_and_evaluate


def stopped_run(runs, name: str, config: dict, source: str, step: int | None) -> None:
    run = runs / name
    (run / "checkpoints" / "latest").mkdir(parents=True)
    if step is not None:
        (run / "checkpoints" / "latest" / str(step)).mkdir()
        (run / "checkpoints" / "latest" / str(step) / "params").write_bytes(b"\0" * 2_000_000)
    (run / JOB_FILE).write_text(json.dumps({"config": config, "source": source}))


def test_a_new_training_names_the_stopped_ones_of_its_data_it_does_not_resume(tmp_path, digits_corpus, tiny_config,
                                                                               caplog):
    config = replace(tiny_config, num_steps=20, eval_every_steps=10)
    runs, source = tmp_path / "w" / "models" / ".runs", str(digits_corpus.absolute())
    stopped_run(runs, "run-aaaaaaaaaaaa", config_to_dict(replace(config, num_steps=300, max_train_minutes=5.0)), source, 33)
    stopped_run(runs, "run-bbbbbbbbbbbb", config_to_dict(replace(config, num_steps=300)), "/other/photos", 40)
    stopped_run(runs, "run-cccccccccccc", config_to_dict(config), source, None)  # never reached a checkpoint
    with caplog.at_level(logging.WARNING, logger="lookalike.model.runs"):
        train_and_evaluate(config, tmp_path / "w", data_dir=digits_corpus)
    warned = [r.getMessage() for r in caplog.records if r.name == "lookalike.model.runs"]
    assert warned == [f"not resumed: 1 stopped training(s) of this data with other settings, kept for their own "
                      f"command to resume (remove the folder to free the space): {runs / 'run-aaaaaaaaaaaa'} "
                      "(step 33, 2.0 MB; other settings: num_steps 300 (now 20))"]  # a time cap is no other job
    assert sorted(p.name for p in runs.iterdir()) == ["run-aaaaaaaaaaaa", "run-bbbbbbbbbbbb", "run-cccccccccccc"]


def test_a_run_folder_without_a_job_record_or_in_progress_is_left_out(tmp_path):
    import fcntl
    import os

    (tmp_path / "run-old" / "checkpoints" / "latest" / "7").mkdir(parents=True)  # from before jobs were recorded
    stopped_run(tmp_path, "run-live", {"num_steps": 2}, "/data", 5)
    assert len(stopped_runs_of(tmp_path, tmp_path / "run-new", {"num_steps": 1}, "/data")) == 1  # run-live: not held
    fd = os.open(tmp_path / "run-live" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as checkpoints.exclusive_run holds it while it trains
        assert stopped_runs_of(tmp_path, tmp_path / "run-new", {"num_steps": 1}, "/data") == []
    finally:
        os.close(fd)


def test_a_job_with_other_held_out_files_is_another_run(tiny_config, tmp_path):
    same = run_id(tiny_config, tmp_path, None)
    assert run_id(tiny_config, tmp_path, None, ()) == same  # no exclusion: the name runs had before
    held_out = run_id(tiny_config, tmp_path, None, ["a/1.png", "b/2.png"])
    assert held_out != same and held_out == run_id(tiny_config, tmp_path, None, ["b/2.png", "a/1.png"])


def test_a_rerun_with_a_time_cap_or_other_logging_is_the_same_job_but_other_steps_are_not(tiny_config, tmp_path):
    """A slow training stopped and rerun with `--set max_train_minutes=3` resumes its checkpoints."""
    same = run_id(tiny_config, tmp_path, None)
    how = replace(tiny_config, max_train_minutes=3.0, log_every_steps=7, checkpoint_every_steps=11, prefetch_batches=5)
    assert run_id(how, tmp_path, None) == same
    for what in ({"num_steps": tiny_config.num_steps + 1}, {"learning_rate": 1e-2}, {"seed": 1}):
        assert run_id(replace(tiny_config, **what), tmp_path, None) != same, what
