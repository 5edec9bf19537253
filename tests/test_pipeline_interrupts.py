"""Signals held back over a section that must not be cut (a checkpoint being saved)."""

from __future__ import annotations

import os
import signal

import pytest

from lookalike.pipeline.interrupts import interrupts_deferred


def test_a_signal_during_the_section_stops_right_after_it(caplog):
    done = []
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        with interrupts_deferred("the checkpoint is being saved"):
            os.kill(os.getpid(), signal.SIGINT)
            done.append("finished")  # the section is not cut
    assert done == ["finished"]
    assert "SIGINT received while the checkpoint is being saved: stopping once it is done" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in force before


def test_a_second_signal_stops_at_once(caplog):
    done = []
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        with interrupts_deferred("the checkpoint is being saved"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("finished")
    assert done == [] and "SIGINT received again while the checkpoint is being saved: stopping now" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_is_held_without_a_signal():
    with interrupts_deferred("the checkpoint is being saved"):
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_whose_exception_was_swallowed_still_stops_the_embed_before_it_publishes(tmp_path, trained_store,
                                                                                       digits_corpus, monkeypatch):
    """A signal handler's exception can be lost (raised inside a gc callback: "Exception ignored
    in ..."; or caught by library code): the noted stop still ends the run, and nothing is published."""
    import shutil
    import signal

    import lookalike.pipeline.embed as embed_module
    from lookalike.pipeline.embed import EmbedConfig, run_embed
    from lookalike.pipeline.interrupts import request_stop

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    build = embed_module.build_pipeline

    def build_then_lose_a_stop(*args, **kwargs):
        request_stop(signal.SIGINT)  # noted, but its KeyboardInterrupt never reached the job
        return build(*args, **kwargs)

    monkeypatch.setattr(embed_module, "build_pipeline", build_then_lose_a_stop)
    with pytest.raises(KeyboardInterrupt):
        run_embed(EmbedConfig(workdir=str(workdir), corpus=str(digits_corpus), run_name="lost"))
    assert not (workdir / "CURRENT").exists()
    assert not [p for p in (workdir / "indexes").iterdir()] if (workdir / "indexes").exists() else True
    monkeypatch.setattr(embed_module, "build_pipeline", build)
    again = run_embed(EmbedConfig(workdir=str(workdir), corpus=str(digits_corpus), run_name="again"))
    assert again.index_version and (workdir / "CURRENT").exists()  # an earlier stop does not stop the next run


def test_a_worker_starting_after_the_run_was_stopped_exits_at_once(tmp_path):
    import os
    import subprocess
    import sys

    from lookalike.pipeline.worker_main import STOP_FILE, WORKER_PIDS_ENV

    (tmp_path / STOP_FILE).touch()
    done = subprocess.run([sys.executable, "-m", "lookalike.pipeline.worker_main"], env={**os.environ,
                          WORKER_PIDS_ENV: str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
