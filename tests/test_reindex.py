"""The retrain-and-reindex job: gating, incremental growth, rollback, crash safety, locks,
bad input. Runs the real job (training, Beam pipeline, ScaNN) on the tiny store."""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lookalike.index.searcher import ItemIndex
from lookalike.model.config import apply_overrides
from lookalike.model.store import Store, StoreError
from lookalike.model.store_lock import LockHeldError, StoreLock
from lookalike.pipeline.reindex import STEPS, ReindexConfig, run_reindex
from lookalike.pipeline.versions import PromotionError, list_versions, promote, rollback


@pytest.fixture
def store(tmp_path, indexed_store) -> Store:
    workdir = tmp_path / "store"
    shutil.copytree(indexed_store.root, workdir)
    return Store.at(workdir)


def answers(store: Store, ids: list[str]) -> dict[str, list[str]]:
    index = ItemIndex.load(store.require_current_index())
    return {i: [n.id for n in index.similar_to(i, 5)] for i in ids}


def probe_ids(store: Store) -> list[str]:
    index = ItemIndex.load(store.require_current_index())
    return [index.items[i]["id"] for i in (0, len(index) // 2, len(index) - 1)]


def add_images(store: Store, count: int) -> None:
    for i in range(count):
        Image.new("L", (32, 32), 30 + 20 * i).save(store.corpus_dir / "0" / f"new_{i}.png")


def test_growing_corpus_embeds_only_new_media_and_rollback_restores_answers(store, tiny_config):
    ids = probe_ids(store)
    before = answers(store, ids)
    first_version = store.current_index()
    forced = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))  # default checks
    assert forced.outcome == "promoted" and forced.exit_code == 0, forced.reason
    assert forced.metrics["canary_self_at_1"] >= 0.9 and "canary_overlap_at_10" not in forced.metrics
    assert forced.chosen_model == forced.candidate_model and store.current_index() == forced.new_index
    assert store.latest_model() == forced.chosen_model  # promoted: the model `embed` uses next
    assert (store.root / "reports").is_dir() and list((store.root / "reports").glob("*/examples.png"))
    add_images(store, 3)
    grown = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, min_improvement=1.0))
    # candidate not better: the corpus update is embedded with the served model, its own outcome
    assert (grown.outcome, grown.exit_code) == ("corpus_updated", 4), grown.reason
    assert grown.chosen_model == forced.chosen_model != grown.candidate_model and "not better" in grown.reason
    assert grown.metrics["canary_overlap_at_10"] >= 0.2  # same model: the neighbour-overlap check applies
    # the rejected candidate stays for inspection (the README says so), though this run pruned
    assert (store.models_dir / grown.candidate_model).is_dir() and store.rejected_model() == grown.candidate_model
    assert grown.metrics["embed"]["embedded"] == 3  # only the new media
    assert len(ItemIndex.load(store.require_current_index())) == len(ItemIndex.load(store.index_dir(first_version))) + 3
    rollback(store)
    assert store.current_index() == forced.new_index
    rollback(store)  # walks further back, not forth
    assert store.current_index() == first_version
    assert answers(store, ids) == before


def test_candidate_is_trained_without_the_evaluation_images(store, tiny_config):
    """The gate evaluates on the frozen set: training on it would reward memorisation."""
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert report.outcome == "promoted", report.reason
    frozen = json.loads((store.root / "eval" / "frozen.json").read_text())["ids"]
    metrics = json.loads((store.model_dir(report.candidate_model) / "model.json").read_text())["metrics"]
    corpus = sorted(p.relative_to(store.corpus_dir).as_posix() for p in store.corpus_dir.rglob("*.png"))
    assert metrics["held_out_files"] == len(frozen) > 0
    assert metrics["training_files"] == len(corpus) - len(frozen)


def test_default_training_config_is_the_served_models_own(store, tiny_config):
    """Without a config, the candidate is trained with the served model's config (here the
    tiny preset, not the digits default), so it warm-starts; --set overrides still apply."""
    served = json.loads((store.require_model() / "model.json").read_text())["config"]
    report = run_reindex(ReindexConfig(workdir=str(store.root), train_overrides=["num_steps=3"], force=True))
    assert report.outcome == "promoted", report.reason
    candidate = json.loads((store.model_dir(report.candidate_model) / "model.json").read_text())["config"]
    assert candidate == {**served, "num_steps": 3}


def test_worse_candidate_is_rejected_and_current_kept(store, tiny_config):
    before = store.current_index()
    barely = apply_overrides(tiny_config, ["num_steps=1", "embed_dim=4"])  # other shape: no warm start
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=barely))
    assert report.metrics["candidate_accepted"] is False
    assert report.metrics["candidate"]["map_at_r"] < report.metrics["current"]["map_at_r"]
    assert (report.outcome, report.exit_code) == ("kept_current", 3)
    assert store.current_index() == before
    # the rejected candidate is saved (inspectable) but is not what a later `lookalike embed` uses
    assert (store.models_dir / report.candidate_model).is_dir()
    assert store.latest_model() == report.current_model != report.candidate_model


def test_candidate_of_equal_quality_is_rejected_as_within_noise(store, tiny_config, caplog):
    """Warm-started from the served model and barely moved (a tiny learning rate): its MAP@R
    comes out a little higher (a plain comparison would promote it and re-embed everything),
    but the paired per-query difference is within 2 standard errors."""
    before = store.current_index()
    same = apply_overrides(tiny_config, ["learning_rate=0.0001"])
    with caplog.at_level("INFO", logger="lookalike.pipeline.reindex"):
        report = run_reindex(ReindexConfig(workdir=str(store.root), train=same))
    gate = report.metrics["gate"]
    assert report.metrics["candidate"]["map_at_r"] > report.metrics["current"]["map_at_r"]  # noise, not quality
    assert (report.outcome, report.exit_code) == ("kept_current", 3), report.reason
    assert gate["accepted"] is False and gate["reason"].startswith("within noise"), gate
    assert 0 < gate["mean_diff"] <= gate["noise_margin"] == pytest.approx(2 * gate["stderr"]) and gate["queries"] >= 20
    # the served model (trained by `train`) trained on some evaluation images: the gate compares on the others
    left_out = report.metrics["eval_images_left_out_as_served_training"]
    frozen = json.loads((store.root / "eval" / "frozen.json").read_text())["ids"]
    assert left_out > 0 and gate["queries"] == len(frozen) - left_out
    assert gate["mean_diff"] == pytest.approx(report.metrics["candidate"]["map_at_r"]
                                              - report.metrics["current"]["map_at_r"])
    assert "within noise" in report.reason and store.current_index() == before
    assert any("rejected: within noise" in r.getMessage() and "standard error" in r.getMessage()
               for r in caplog.records)
    report_md = max((store.root / "reports").glob("*/report.md"), key=lambda p: p.stat().st_mtime).read_text()
    assert "Gate: candidate rejected: within noise" in report_md


def test_clearly_better_candidate_is_promoted_without_force(store, tiny_config):
    barely = apply_overrides(tiny_config, ["num_steps=1", "embed_dim=4"])  # a poor model, served by force
    poor = run_reindex(ReindexConfig(workdir=str(store.root), train=barely, force=True))
    assert poor.outcome == "promoted" and poor.metrics["gate"]["reason"].startswith("forced (would be rejected")
    trained = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))  # other shape: trained afresh
    gate = trained.metrics["gate"]
    assert (trained.outcome, trained.exit_code) == ("promoted", 0), trained.reason
    assert gate["accepted"] is True and gate["reason"].startswith("better beyond noise") and not gate["forced"]
    assert gate["mean_diff"] > gate["noise_margin"] > 0
    assert store.latest_model() == trained.candidate_model


def run_cli_reindex(store: Store, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("lookalike"))
    env = {**os.environ, **env_extra}
    return subprocess.run([exe, "reindex", "--workdir", str(store.root), "--config", "tiny", "--force"],
                          capture_output=True, text=True, env=env, timeout=600)


def test_sigkill_at_each_step_leaves_the_served_version_answering(store):
    ids = probe_ids(store)
    before_version, before = store.current_index(), answers(store, ids)
    def unfinished_runs() -> list[str]:
        return [run.name for run in store.embeddings_dir.iterdir() if (run / ".made-by-reindex").is_file()
                and not (run / "summary.json").exists()]

    for step in (*STEPS[:3], "embed_batch_1", *STEPS[3:]):  # and mid-embedding, once a batch is cached
        killed = run_cli_reindex(store, {"LOOKALIKE_FAILPOINT": step})
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr[-2000:])
        assert (store.root / ".reindex.lock").exists()  # the dead run's lock is left behind
        # a run killed while embedding leaves its run folder, marked as reindex's: the next run removes it
        assert len(unfinished_runs()) == (step == "embed_batch_1"), (step, unfinished_runs())
        if step == "prune":  # prune runs after promotion: the new version is served, and answers
            assert store.current_index() != before_version and answers(store, ids)
        else:
            assert store.current_index() == before_version, step
            assert answers(store, ids) == before, step
    again = run_cli_reindex(store, {})  # the next run detects the stale lock, cleans up and completes
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(store.indexes_dir.glob(".tmp-*")) and not list(store.models_dir.glob(".run-*"))
    assert not (store.root / ".reindex.lock").exists()
    served = {e["version"] for e in store.history()}
    assert {r["version"] for r in list_versions(store)} <= served  # candidates killed before promotion are gone


def test_a_takeover_removes_embedding_runs_killed_before_their_pipeline_never_a_live_or_finished_one(store, caplog):
    from lookalike.model.filelock import try_lock_folder
    from lookalike.pipeline.leftovers import clean_leftovers

    runs = store.embeddings_dir
    finished = sorted(p for p in runs.iterdir() if p.is_dir())
    dead, live = runs / "e-20261201T015949", runs / "e-20261201T020000"
    for run in (dead, live):
        run.mkdir()
        (run / ".listing.arrow").write_bytes(b"listing")  # all a run writes before its pipeline starts
    fd = try_lock_folder(live)  # as a starting run holds it
    try:
        with caplog.at_level("WARNING"):
            removed = clean_leftovers(store, took_over_stale=True)
    finally:
        os.close(fd)
    assert removed == [str(dead)] and not dead.exists() and live.exists()
    assert all(run.exists() for run in finished)  # runs with output (the index's own) stay
    assert any(f"partial folder(s): {dead}" in r.getMessage() for r in caplog.records), caplog.records


def test_checkpoints_of_a_stopped_reindex_training_go_once_another_model_serves(store, caplog):
    """Reindex warm-starts only from the served model: once another serves, a stopped training
    of it can never resume. Compared by model version (a store reached by another path is the
    same store). Not a training of `lookalike train` or the API, nor one in progress."""
    from lookalike.model.checkpoints import exclusive_run
    from lookalike.model.runs import record_job
    from lookalike.pipeline.leftovers import clean_leftovers

    served = ItemIndex.load(store.require_current_index()).model_version
    runs = store.models_dir / ".runs"
    folders = {name: runs / f"run-{name}" for name in ("stale", "served", "by-hand", "live", "garbled")}
    for name, run in folders.items():
        (run / "checkpoints" / "latest" / "15").mkdir(parents=True)
        warm_start = {"served": served, "by-hand": None}.get(name, "m-no-longer-served")
        record_job(run, {"seed": 0}, str(store.corpus_dir), warm_start)
    (folders["garbled"] / "job.json").write_text('{"reindex_warm_start": 5}')  # never a reason to fail the run
    with exclusive_run(folders["live"]), caplog.at_level("WARNING"):
        removed = clean_leftovers(store, took_over_stale=False)
    assert removed == [str(folders["stale"])] and not folders["stale"].exists()
    assert all(folders[name].exists() for name in ("served", "by-hand", "live", "garbled"))
    assert any("no run can resume" in r.getMessage() and str(folders["stale"]) in r.getMessage() for r in caplog.records)


def test_unfinished_reindex_runs_are_removed_but_never_a_finished_or_unreadable_one(store, monkeypatch):
    """A folder this user cannot read (another user's run, mode 700) must not fail every run."""
    from lookalike.pipeline.leftovers import clean_unfinished_reindex_runs

    runs = store.embeddings_dir
    unfinished, finished, foreign = runs / "e-20261201T010000", runs / "e-20261201T020000", runs / "other-users-run"
    for run in (unfinished, finished, foreign):
        run.mkdir()
        (run / ".made-by-reindex").touch()
    (finished / "summary.json").write_text("{}")
    real_is_file = Path.is_file

    def is_file(self: Path) -> bool:
        if self.parent == foreign:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert clean_unfinished_reindex_runs(store) == [str(unfinished)]
    assert finished.exists() and foreign.exists() and not unfinished.exists()


def test_ctrl_c_during_a_step_says_in_one_line_what_is_served_and_the_next_run_goes_on(ctrl_c_as_in_a_terminal, store):
    before = store.current_index()
    exe = str(Path(sys.executable).with_name("lookalike"))
    job = subprocess.Popen([exe, "reindex", "--workdir", str(store.root), "--config", "tiny", "--set", "num_steps=2",
                            "--force"], env={**os.environ, "LOOKALIKE_FAILPOINT": "validate:wait"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=ctrl_c_as_in_a_terminal)
    seen = []
    while not any("failpoint validate: waiting" in line for line in seen):  # a candidate index is built
        line = job.stderr.readline()
        assert line, "".join(seen)[-3000:]
        seen.append(line)
    os.killpg(job.pid, signal.SIGINT)
    _, err = job.communicate(timeout=120)
    err = "".join(seen) + err
    assert job.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"lookalike reindex: interrupted: CURRENT is {before}; the next run resumes "
                                            "from what this one finished (its training checkpoint, its embedded "
                                            "batches) and removes the rest"), err[-3000:]
    report = json.loads(sorted(store.root.glob("reports/r-*/report.json"))[-1].read_text())
    assert (report["outcome"], report["reason"], report["exit_code"]) == ("failed", "interrupted (SIGINT)", 130)
    assert report["new_index"] is None and report["rejected_index"] not in (None, before), report  # built, never served
    assert (store.indexes_dir / report["rejected_index"]).is_dir()  # left for the next run, which removes it
    again = run_cli_reindex(store, {})
    assert again.returncode == 0 and store.current_index() != before, again.stderr[-3000:]
    assert not (store.indexes_dir / report["rejected_index"]).exists()
    assert not list(store.indexes_dir.glob(".tmp-*")) and not (store.root / ".reindex.lock").exists()


@pytest.mark.parametrize("signum, failpoint", [
    (signal.SIGTERM, "train.after_checkpoint.15:wait"),  # mid-training (tiny checkpoints at step 15 of 30)
    (signal.SIGTERM, "embed_batch_1:wait"),  # inside the Beam pipeline
    (signal.SIGINT, "train.after_checkpoint.15:wait"),
])
def test_sigterm_or_ctrl_c_mid_step_writes_the_report_and_says_current_is_unchanged(ctrl_c_as_in_a_terminal, store, signum,
                                                                                      failpoint):
    """`kill PID` (systemd, a cron timeout) stops a run as Ctrl-C does: the step's log line and
    the report name the signal, the lock is released, one last line names CURRENT, and the
    exit status is 128 + the signal. Without a handler SIGTERM ended it on the spot."""
    before = store.current_index()
    exe = str(Path(sys.executable).with_name("lookalike"))
    job = subprocess.Popen([exe, "reindex", "--workdir", str(store.root), "--config", "tiny", "--force"],
                           env={**os.environ, "LOOKALIKE_FAILPOINT": failpoint},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=ctrl_c_as_in_a_terminal)
    seen = []
    while not any("waiting" in line and "failpoint" in line for line in seen):
        line = job.stderr.readline()
        assert line, "".join(seen)[-3000:]
        seen.append(line)
    if signum == signal.SIGTERM:
        os.kill(job.pid, signum)  # to the lookalike process only, as `kill PID` does
    else:
        os.killpg(job.pid, signum)  # Ctrl-C: the terminal signals the whole process group
    out, err = job.communicate(timeout=120)
    err = "".join(seen) + err
    reason = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (SIGINT)"
    step = "train" if failpoint.startswith("train") else "embed"
    assert job.returncode == 128 + signum and "Traceback" not in err, (job.returncode, err[-3000:])
    assert f"reindex step {step} {reason} in " in err, err[-3000:]  # not an empty "failed: "
    last = err.strip().splitlines()[-1]
    if signum == signal.SIGTERM:
        assert last == (f"lookalike reindex: terminated (SIGTERM): CURRENT is unchanged ({before}); the next run "
                        "resumes from what this one finished (its training checkpoint, its embedded batches) and "
                        "removes the rest"), err[-3000:]
    else:
        assert last.startswith(f"lookalike reindex: interrupted: CURRENT is {before}"), err[-3000:]
    outcome = json.loads(out)
    assert (outcome["outcome"], outcome["reason"], outcome["exit_code"]) == ("failed", reason, 128 + signum)
    report = json.loads(sorted(store.root.glob("reports/r-*/report.json"))[-1].read_text())
    assert (report["outcome"], report["reason"], report["exit_code"]) == ("failed", reason, 128 + signum)
    assert [s for s in report["steps"] if s["step"] == step][-1]["error"] == reason
    assert not (store.root / ".reindex.lock").exists()  # released on the way out, not left by a dead process
    assert store.current_index() == before


# `kill PID` landing while orbax waits for its save thread (the thread made slow, so the wait is
# certain): the second wait of the run, the latest checkpoint of step 15 (the first is the best model's)
_SIGTERM_WHILE_A_CHECKPOINT_IS_SAVED = """
import os, signal, sys, time
from orbax.checkpoint import checkpoint_manager

thread = checkpoint_manager._FinalizeThread
run, join, waits = thread.run, thread.join, []

def slow_run(self):
    time.sleep(1.0)
    run(self)

def join_after_sigterm(self, *args, **kwargs):
    waits.append(self)
    if len(waits) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return join(self, *args, **kwargs)

thread.run, thread.join = slow_run, join_after_sigterm
from lookalike.pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_a_checkpoint_is_saved_stops_after_it_without_an_error_and_the_next_run_resumes(store):
    """Raised while orbax waited for its save thread, the stop made orbax log "ERROR absl: ...
    Save Finalize thread (save_finalize) failed." and a traceback into the cron log. Held back
    until the save is done, it stops the run a moment later, the checkpoint complete."""
    before = store.current_index()
    job = subprocess.run([sys.executable, "-c", _SIGTERM_WHILE_A_CHECKPOINT_IS_SAVED, "reindex", "--workdir",
                          str(store.root), "--config", "tiny", "--force"], capture_output=True, text=True, timeout=600)
    assert job.returncode == 143, job.stderr[-3000:]
    assert "ERROR" not in job.stderr and "Traceback" not in job.stderr, job.stderr[-3000:]
    assert "SIGTERM received while the checkpoint of step 15 is being saved: stopping once it is done" in job.stderr
    assert "rerun the same command to resume from the checkpoint of step 15" in job.stderr, job.stderr[-3000:]
    assert job.stderr.strip().splitlines()[-1] == (f"lookalike reindex: terminated (SIGTERM): CURRENT is unchanged "
                                                   f"({before}); the next run resumes from what this one finished (its training checkpoint, its embedded batches) and removes the rest")
    assert store.current_index() == before
    [stopped] = (store.models_dir / ".runs").glob("run-*")
    served = ItemIndex.load(store.require_current_index()).model_version
    assert json.loads((stopped / "job.json").read_text())["reindex_warm_start"] == served  # what it can resume from
    again = run_cli_reindex(store, {})  # the same model serves: its checkpoints are resumed, not removed
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed training from the checkpoint of step 15" in again.stderr, again.stderr[-3000:]


def test_a_failed_run_on_a_briefly_vanished_corpus_keeps_the_frozen_evaluation_set(store, tiny_config, tmp_path):
    """Most class folders gone (an unmounted disk): the run fails (fewer items than the served
    index allows) and the evaluation set it had to make from what was left is not saved."""
    barely = apply_overrides(tiny_config, ["num_steps=1"])
    assert run_reindex(ReindexConfig(workdir=str(store.root), train=barely)).outcome in ("kept_current", "corpus_updated")
    frozen = store.root / "eval" / "frozen.json"
    before = frozen.read_text()
    away = tmp_path / "away"
    away.mkdir()
    classes = sorted(p for p in store.corpus_dir.iterdir() if p.is_dir())
    for folder in classes[:-2]:
        shutil.move(str(folder), str(away / folder.name))
    failed = run_reindex(ReindexConfig(workdir=str(store.root), train=barely))
    assert failed.outcome == "failed" and "items" in failed.reason, failed.reason
    assert frozen.read_text() == before
    for folder in away.iterdir():
        shutil.move(str(folder), str(store.corpus_dir / folder.name))
    back = run_reindex(ReindexConfig(workdir=str(store.root), train=barely))
    assert back.outcome in ("kept_current", "corpus_updated"), back.reason
    assert frozen.read_text() == before  # the same images judge the models as before the outage


def test_one_run_at_a_time(store, tiny_config):
    with StoreLock(store.root):
        with pytest.raises(LockHeldError, match="another run holds"):
            run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))


def test_missing_store_is_a_clear_error(tmp_path, tiny_config):
    with pytest.raises(StoreError, match="does not exist"):
        run_reindex(ReindexConfig(workdir=str(tmp_path / "nope"), train=tiny_config))


def test_corrupt_current_version_fails_and_promotes_nothing(store, tiny_config):
    current = store.current_index()
    victim = next(p for p in store.index_dir(current).rglob("*.npy"))
    victim.write_bytes(b"corrupt")
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert report.outcome == "failed" and "checksum" in report.reason
    assert store.current_index() == current


def test_a_served_index_that_cannot_load_says_how_to_serve_a_working_version(store, tiny_config, capsys):
    """A corrupt CURRENT fails every night the same way: the reason, the log line, the JSON
    line and report.md say to roll back (or promote), and nothing is trained."""
    current = store.current_index()
    shutil.copytree(store.index_dir(current), store.indexes_dir / "i-older")  # a version to roll back to
    next(p for p in store.index_dir(current).rglob("*.npy")).write_bytes(b"corrupt")
    hint = (f"the served index {current} cannot be loaded: run `lookalike versions rollback --workdir {store.root}` "
            f"(or `lookalike versions promote VERSION --workdir {store.root}`) to serve a working version")
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))
    assert (report.outcome, report.exit_code) == ("failed", 1)
    assert report.reason.startswith("IndexLoadError: ") and "checksum" in report.reason and hint in report.reason
    assert report.steps == [] and store.current_index() == current
    report_md = max((store.root / "reports").glob("*/report.md"), key=lambda p: p.stat().st_mtime).read_text()
    assert hint in report_md
    cli = run_cli_reindex(store, {})  # the cron line: its log line and JSON line
    assert cli.returncode == 1, cli.stderr[-2000:]
    assert len(cli.stdout.splitlines()) == 1  # one line: `tail -1 reindex.log | jq` reads it
    assert json.loads(cli.stdout)["reason"] == report.reason
    assert any("ERROR" in line and hint in line for line in cli.stderr.splitlines()), cli.stderr[-2000:]


@pytest.mark.parametrize("damage", ["empty", "stale", "garbage"])
def test_unusable_evaluation_set_is_made_again(store, tiny_config, damage):
    frozen = store.root / "eval" / "frozen.json"
    frozen.parent.mkdir(parents=True, exist_ok=True)
    ids = [] if damage == "empty" else ["0/gone_1.png", "1/gone_2.png", "0/gone_3.png"]
    frozen.write_text("{not json" if damage == "garbage" else json.dumps({"ids": ids}))
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert report.outcome == "promoted", report.reason
    remade = json.loads(frozen.read_text())["ids"]
    assert len(remade) >= 2 and all((store.corpus_dir / i).is_file() for i in remade)


def test_evaluation_leaves_out_gone_and_unreadable_images(store, tiny_config, caplog):
    """A file deleted from the corpus, or one that stopped decoding, is left out of the frozen
    set with a warning; the run goes on, and a new set never takes unreadable files."""
    run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    frozen = store.root / "eval" / "frozen.json"
    ids = json.loads(frozen.read_text())["ids"]
    (store.corpus_dir / ids[0]).unlink()
    (store.corpus_dir / ids[1]).write_bytes(b"")  # now an empty file
    (store.corpus_dir / "0" / "text.png").write_text("not an image")
    # A name that is not UTF-8 is dead-lettered by embed: still every file indexed or dead-lettered.
    shutil.copy(store.corpus_dir / ids[2], os.path.join(os.fsencode(store.corpus_dir / "0"), b"caf\xe9.png"))
    odd = store.corpus_dir / "odd"  # one readable image, and broken files: it is kept for training
    odd.mkdir()
    shutil.copy(store.corpus_dir / ids[3], odd / "only.png")
    for i in range(4):
        (odd / f"broken{i}.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="lookalike.pipeline.reindex"):
        report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert report.outcome == "promoted", report.reason
    assert json.loads(frozen.read_text())["ids"] == ids  # the same set, minus what is unusable this run
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of" in warned and "left out" in warned
    frozen.unlink()  # a new set: sampled from readable images only
    run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    remade = json.loads(frozen.read_text())["ids"]
    assert ids[0] not in remade and ids[1] not in remade and "0/text.png" not in remade
    assert not [i for i in remade if i.startswith("odd/") or not i.isascii()], remade


def test_corpus_without_evaluation_images_fails_before_training(store, tiny_config, tmp_path):
    corpus = tmp_path / "flat"
    corpus.mkdir()
    (corpus / "a.png").write_bytes(b"")
    current = store.current_index()
    old_reports = [store.root / "reports" / f"r-20200101T0000{i:02d}" for i in range(35)]  # 35 nights of a cron
    for folder in old_reports:
        folder.mkdir(parents=True)
        (folder / "report.md").write_text("an old night")
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, corpus=str(corpus), force=True))
    assert report.outcome == "failed" and "no evaluation set can be made" in report.reason
    assert not report.steps  # not even training started
    assert store.current_index() == current
    # reports/ stays bounded, after a failed run too: the newest 30 (this run's among them) are kept
    kept = sorted(p.name for p in (store.root / "reports").iterdir())
    assert len(kept) == 30 and kept[-1] > old_reports[-1].name and kept[0] == old_reports[6].name, kept


def test_disk_full_during_embedding_fails_cleanly(store):
    """The embeddings folder on a 32 KiB tmpfs: the embed step hits a real ENOSPC."""
    current = store.current_index()
    ids = probe_ids(store)
    before = answers(store, ids)
    shutil.rmtree(store.embeddings_dir)
    store.embeddings_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(store.embeddings_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        out = run_cli_reindex(store, {})
    finally:
        subprocess.run(["umount", "-l", str(store.embeddings_dir)], check=False)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "nothing promoted" in out.stderr and "No space left" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["reason"].startswith("the disk is full (No space left on device): ")
    assert store.current_index() == current and answers(store, ids) == before


def test_a_full_disk_while_building_the_candidate_fails_the_run_rather_than_keeping_current(store, tmp_path):
    """The indexes folder on a tmpfs that holds only the served index: the accepted candidate's
    build hits ENOSPC (ScaNN says only "I/O error"). The corpus is unchanged, so the fallback
    has nothing to publish; the run once ended kept_current (exit 3, a success to cron)."""
    current = store.current_index()
    backup = tmp_path / "indexes-backup"
    shutil.copytree(store.indexes_dir, backup)
    used_kib = sum(f.stat().st_size for f in backup.rglob("*") if f.is_file()) // 1024
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used_kib + 64}k", "tmpfs", str(store.indexes_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        shutil.copytree(backup, store.indexes_dir, dirs_exist_ok=True)
        out = run_cli_reindex(store, {})
        leftovers = [p.name for p in store.indexes_dir.iterdir() if p.name != current]
    finally:
        subprocess.run(["umount", "-l", str(store.indexes_dir)], check=False)
    assert out.returncode == 1, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "failed" and "No space left on device" in result["reason"], result
    assert ".tmp-i-" in result["reason"]  # the file or folder being written is named
    assert "kept_current" not in out.stdout and store.current_index() == current
    assert leftovers == []  # the failed candidate's folder is removed
    report_md = max((store.root / "reports").glob("*/report.md"), key=lambda p: p.stat().st_mtime).read_text()
    assert "| build |" in report_md and "no: [Errno 28] No space left on device" in report_md
    assert "| prune |" in report_md  # what pruning frees is freed before the run fails: a full store must not stay full


@pytest.mark.parametrize("error, store_fault", [
    (OSError(28, "No space left on device"), True),
    (PermissionError(13, "Permission denied"), True),
    (RuntimeError("OSError: [Errno 28] No space left on device [while running 'ReadChunk']"), True),  # Beam's re-raise
    (RuntimeError("[Errno 122] Disk quota exceeded"), True),
    (RuntimeError("canary self-retrieval 0.5 below 0.9"), False),
    (ValueError("[Errno 2] not a store errno in a message"), False),
])
def test_what_counts_as_the_store_failing_rather_than_the_candidate(error, store_fault):
    from lookalike.pipeline.reindex import store_write_failure

    assert store_write_failure(error) is store_fault
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = error
    assert store_write_failure(wrapped) is (store_fault and isinstance(error, OSError))


def test_versions_list_and_bad_promotion(store):
    rows = list_versions(store)
    assert [r["current"] for r in rows] == [True] and rows[0]["count"] > 0
    with pytest.raises(PromotionError, match="no index version") as typo:
        promote(store, "i-does-not-exist")
    assert str(typo.value) == (f"no index version 'i-does-not-exist' in {store.indexes_dir}: the existing index versions "
                               f"(1 in all, newest first): {rows[0]['version']} (`lookalike versions list` shows them all)")
    with pytest.raises(PromotionError, match=rf"no earlier version to roll back to: {rows[0]['version']} is the "
                                             "first version this store has served"):
        rollback(store)  # not "none ... is still in indexes": there never was one
    promote(store, rows[0]["version"], reason="again")  # promoting the current one is harmless
    assert store.current_index() == rows[0]["version"]


def test_promote_and_rollback_point_latest_at_the_model_of_the_index_they_make_current(store, tiny_config):
    """LATEST is the model `lookalike embed` uses by default: after a rollback it must name the
    model of the index that serves again, or the next embed publishes the rolled-back model."""
    from lookalike.index.builder import build_and_publish
    from lookalike.model.train import train_and_evaluate
    from lookalike.pipeline.cli import main
    from lookalike.pipeline.embed import EmbedConfig, run_embed

    old_index, old_model = store.current_index(), store.latest_model()
    index = ItemIndex.load(store.index_dir(old_index))
    new_model = train_and_evaluate(apply_overrides(tiny_config, ["num_steps=2"]), store.root, set_latest=False).version
    assert new_model != old_model
    new_index = build_and_publish(store, index.embeddings, index.items.table, model_version=new_model,
                                  make_current=False)
    promoted = promote(store, new_index, reason="manual")
    assert promoted["previous_latest_model"] == old_model and store.latest_model() == new_model
    assert main(["versions", "rollback", "--workdir", str(store.root)]) == 0
    assert store.current_index() == old_index and store.latest_model() == old_model
    embedded = run_embed(EmbedConfig(workdir=str(store.root), incremental=True))  # the user's next embed
    assert embedded.index_version == old_index == store.current_index()  # the served model: nothing to publish
    assert main(["versions", "promote", new_index, "--workdir", str(store.root)]) == 0
    assert store.latest_model() == new_model


def test_reindex_failing_before_any_step_still_ends_with_its_json_line(tmp_path, capsys):
    """A cron log's last line is the outcome (`tail -1 reindex.log | jq .outcome`), also for a missing store."""
    import json

    from lookalike.pipeline.cli import main

    missing = tmp_path / "no" / "store"
    assert main(["reindex", "--workdir", str(missing)]) == 1
    out, err = capsys.readouterr()
    line = json.loads(out.strip().splitlines()[-1])
    assert line["outcome"] == "failed" and line["exit_code"] == 1 and "does not exist" in line["reason"]
    assert f"lookalike reindex: error: store {missing} does not exist" in err
    # the night is dated even when no log line came before: the line's UTC time
    import datetime

    ended = datetime.datetime.strptime(line["finished_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - ended).total_seconds()) < 60


def test_versions_list_fails_for_a_missing_store_and_names_a_current_version_whose_folder_is_gone(store, tmp_path,
                                                                                                  caplog, capsys):
    from lookalike.index.builder import build_and_publish
    from lookalike.pipeline.cli import main

    missing = tmp_path / "no" / "such"
    assert main(["versions", "list", "--workdir", str(missing)]) == 1  # not an empty list and exit 0
    assert capsys.readouterr().err.strip() == f"lookalike versions: error: store {missing} does not exist"
    assert not missing.exists()
    first = store.current_index()
    index = ItemIndex.load(store.index_dir(first))
    gone = build_and_publish(store, index.embeddings, index.items.table, model_version=index.model_version)
    assert store.current_index() == gone
    shutil.rmtree(store.index_dir(gone))
    caplog.clear()
    for argv in (["versions", "list"], ["versions", "list", "--json"]):
        assert main([*argv, "--workdir", str(store.root)]) == 0
        out = capsys.readouterr().out
        assert first in out and gone not in out and "*" not in out
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and warned[0].startswith(f"CURRENT names index version {gone}, which is not in "), warned
        caplog.clear()


def test_read_only_store_is_refused_before_anything_runs(tmp_path, indexed_store, tiny_config):
    """A store on a read-only mount (permissions alone do not stop root)."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs to make read-only (needs root)")
    try:
        shutil.copytree(indexed_store.root, mount_point / "store")
        remount = subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], capture_output=True, text=True)
        assert remount.returncode == 0, remount.stderr
        with pytest.raises(StoreError, match="not writable"):
            run_reindex(ReindexConfig(workdir=str(mount_point / "store"), train=tiny_config))
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_corpus_gone_fails_the_run_with_the_served_model_in_its_report(store, tmp_path):
    served = ItemIndex.load(store.require_current_index()).model_version
    report = run_reindex(ReindexConfig(workdir=str(store.root), corpus=str(tmp_path / "gone")))
    assert report.outcome == "failed" and "does not exist" in report.reason, report.reason
    assert (report.previous_index, report.current_model) == (store.current_index(), served)


def publish_one_item_fewer(store: Store, version: str) -> str:
    """A new version of ``version`` without its first item, published by ItemIndex (CURRENT moves)."""
    index = ItemIndex.load(store.index_dir(version))
    index.delete([index.items[0]["id"]])
    return index.publish(store)


def test_a_rollback_from_a_garbled_current_is_followed_by_the_version_it_served(store):
    """A rollback entry names the version rolled back to: the history stack goes back to it,
    not one further (a garbled CURRENT rolls back to the top of the history itself)."""
    from lookalike.pipeline.versions import last_served_present

    a = store.current_index()
    b = publish_one_item_fewer(store, a)
    c = publish_one_item_fewer(store, b)
    (store.root / "CURRENT").write_text("i-garbage\n")
    promote(store, c, reason="rollback from a garbled CURRENT")
    assert last_served_present(store) == c
    rollback(store)
    assert store.current_index() == b and last_served_present(store) == b
    (store.root / "CURRENT").unlink()
    assert last_served_present(store) == b


def test_a_promotion_whose_history_cannot_be_written_moves_no_pointer(store):
    """CURRENT is put back when history.jsonl cannot record the move (here a folder in its place)."""
    a = store.current_index()
    b = publish_one_item_fewer(store, a)
    latest = store.latest_model()
    history = store.history_path.read_bytes()
    store.history_path.unlink()
    store.history_path.mkdir()
    with pytest.raises(OSError):
        promote(store, a)
    assert store.current_index() == b and store.latest_model() == latest
    versions_before = sorted(p.name for p in store.indexes_dir.iterdir())
    with pytest.raises(OSError):  # built and renamed into place, then CURRENT cannot move: no orphan index is left
        publish_one_item_fewer(store, b)
    assert sorted(p.name for p in store.indexes_dir.iterdir()) == versions_before and store.current_index() == b
    store.history_path.rmdir()
    store.history_path.write_bytes(history)
    promote(store, a)
    assert store.current_index() == a and store.history()[-1]["version"] == a


def test_a_history_entry_that_cannot_be_synced_is_cut_off_and_current_put_back(store, monkeypatch):
    import os as os_module

    a = store.current_index()
    b = publish_one_item_fewer(store, a)
    history = store.history_path.read_bytes()

    fsync = os_module.fsync

    def failing_fsync(fd):  # for history.jsonl only, after its entry is written
        if os_module.readlink(f"/proc/self/fd/{fd}") == str(store.history_path):
            assert store.history_path.stat().st_size > len(history)
            raise OSError(5, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os_module, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        promote(store, a)
    monkeypatch.undo()
    assert store.current_index() == b and store.history_path.read_bytes() == history


def test_a_rollback_to_a_version_whose_promotion_the_history_lost_replaces_the_one_rolled_back_from(store):
    from lookalike.pipeline.versions import promotion_stack

    lines = [{"version": "i-a", "unix_s": 1, "reason": "embed"}, {"version": "i-c", "unix_s": 2, "reason": "reindex"},
             {"version": "i-x", "unix_s": 3, "reason": "rollback from i-c"}]  # i-x's own promotion line was lost
    store.history_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert promotion_stack(store) == ["i-a", "i-x"]  # the next rollback goes to i-a, not back to i-c


def test_a_report_that_cannot_be_written_leaves_the_outcome_as_it_was(store, tiny_config, monkeypatch, caplog):
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lookalike.pipeline.reindex.write_report", disk_full)
    with caplog.at_level("WARNING", logger="lookalike.pipeline.reindex"):
        report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert report.outcome == "promoted" and store.current_index() == report.new_index, report.reason
    warned = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(warned) == 1 and "No space left on device" in warned[0] and "outcome: promoted" in warned[0], warned


def test_rollback_returns_to_a_version_published_by_item_index(store):
    """ItemIndex.publish (upsert/delete then publish) is recorded: rollback goes C -> B, not C -> A."""
    a = store.current_index()
    b = publish_one_item_fewer(store, a)
    c = publish_one_item_fewer(store, b)
    assert store.current_index() == c
    rollback(store)
    assert store.current_index() == b
    rollback(store)
    assert store.current_index() == a


def test_garbled_current_is_named_and_promote_repairs_it(store, tiny_config):
    good = store.current_index()
    (store.root / "CURRENT").write_text("../etc\n")
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))  # fails cleanly, no crash
    assert report.outcome == "failed" and f"{store.root / 'CURRENT'} is garbled" in report.reason
    with pytest.raises(StoreError, match="CURRENT is garbled"):
        rollback(store)
    assert [r["version"] for r in list_versions(store)] == [good]  # list still works
    promote(store, good, reason="repair")
    assert store.current_index() == good


def test_candidate_failing_validation_is_removed_and_never_rolled_back_to(store, tiny_config):
    first = store.current_index()
    promoted = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert promoted.outcome == "promoted", promoted.reason
    add_images(store, 3)  # same model (candidate rejected), the corpus grew, and an impossible overlap bar
    failed = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, min_improvement=1.0,
                                       min_canary_overlap=1.01))
    assert (failed.outcome, failed.exit_code) == ("failed", 1) and "canary overlap" in failed.reason
    assert failed.new_index is None  # never the name of a candidate that was deleted
    assert not store.index_dir(failed.rejected_index).exists()  # removed: it can neither serve nor count as kept
    written = json.loads(max(store.root.glob("reports/r-*/report.json")).read_text())
    assert (written["new_index"], written["rejected_index"]) == (None, failed.rejected_index)
    assert [r["version"] for r in list_versions(store)] == sorted([first, promoted.new_index])
    rollback(store)
    assert store.current_index() == first


def test_new_model_is_not_held_to_neighbour_overlap_and_a_failing_one_still_publishes_the_corpus(store, tiny_config):
    """A retrained model changes neighbours (low overlap, by design): it is checked by canary
    self-retrieval instead. When the new model fails its checks, the corpus update embedded
    with the served model is published as its own outcome."""
    served_model = store.latest_model()
    other = apply_overrides(tiny_config, ["num_steps=1", "embed_dim=4"])  # a very different model
    # the strictest overlap bar does not apply to a new model (its neighbours are meant to change)
    changed = run_reindex(ReindexConfig(workdir=str(store.root), train=other, force=True, min_canary_overlap=1.0))
    assert changed.outcome == "promoted", changed.reason
    assert changed.metrics["canary_self_at_1"] >= 0.9 and store.latest_model() == changed.candidate_model
    assert "canary_overlap_at_10" not in changed.metrics
    served_model, served_index = changed.candidate_model, store.current_index()
    add_images(store, 3)
    fallback = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True,
                                         min_canary_self=1.01))  # the new model cannot pass
    assert (fallback.outcome, fallback.exit_code) == ("corpus_updated", 4), fallback.reason
    assert "canary self-retrieval" in fallback.candidate_error and "failed" in fallback.reason
    report_md = max((store.root / "reports").glob("*/report.md"), key=lambda p: p.stat().st_mtime).read_text()
    assert "**Outcome: corpus_updated** (exit 4)" in report_md and "not promoted: ValidationError" in report_md
    assert fallback.chosen_model == served_model == store.latest_model() != fallback.candidate_model
    assert store.current_index() == fallback.new_index != served_index
    assert fallback.rejected_index not in (None, fallback.new_index)  # the new model's index, deleted
    assert not store.index_dir(fallback.rejected_index).exists()
    index = ItemIndex.load(store.require_current_index())
    assert index.model_version == served_model and index.row_of("0/new_2.png") is not None
    assert {r["version"] for r in list_versions(store)} <= {e["version"] for e in store.history()}


def test_corpus_that_mostly_vanished_is_not_promoted(store, tiny_config):
    before = store.current_index()
    files = sorted(store.corpus_dir.rglob("*.png"))
    for f in files[: int(len(files) * 0.7)]:
        f.unlink()
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, min_improvement=1.0))
    assert (report.outcome, report.exit_code) == ("failed", 1) and "vanished" in report.reason
    assert store.current_index() == before
    assert [r["version"] for r in list_versions(store)] == [before]


def test_a_stop_signal_whose_interrupt_was_lost_stops_the_run_before_its_next_step(store, tiny_config, monkeypatch):
    """SIGTERM's KeyboardInterrupt raised while the main thread ran a garbage-collection
    callback is only printed ("Exception ignored in ...") and the run went on to promote.
    The signal is noted all the same: no step starts after it."""
    import lookalike.model.train as train
    import lookalike.pipeline.interrupts as interrupts
    from lookalike.pipeline.reindex import ReindexInterrupted

    before = store.current_index()
    trained = train.train_and_evaluate

    def train_then_lose_a_sigterm(*args, **kwargs):
        result = trained(*args, **kwargs)
        monkeypatch.setattr(interrupts, "_received", signal.SIGTERM)
        interrupts.request_stop(signal.SIGTERM)  # what the handler does before its exception is lost
        return result

    monkeypatch.setattr(train, "train_and_evaluate", train_then_lose_a_sigterm)
    with pytest.raises(ReindexInterrupted) as stopped:
        run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    report = stopped.value.report
    assert [s["step"] for s in report.steps] == ["train"] and report.reason == "terminated (SIGTERM)"
    assert store.current_index() == before and report.new_index is None


def test_a_run_stopped_before_its_first_step_reports_what_serves_and_that_it_promoted_nothing(store, tiny_config,
                                                                                               monkeypatch):
    """Its report and outcome line name the served index and model (not null, not "the store had
    no CURRENT index"), and its last line does not claim a promotion."""
    import lookalike.pipeline.reindex as reindex
    from lookalike.pipeline.cli_store import served_after_stop
    from lookalike.pipeline.reindex import ReindexInterrupted

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reindex, "clean_leftovers", stopped)
    with pytest.raises(ReindexInterrupted) as caught:
        run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))
    report = caught.value.report
    served = ItemIndex.load(store.require_current_index())
    assert (report.previous_index, report.current_model) == (served.version, served.model_version)
    assert served_after_stop(str(store.root), report) == (f"CURRENT is unchanged ({served.version}); the next run "
                                                          "resumes from what this one finished (its training "
                                                          "checkpoint, its embedded batches) and removes the rest")
    assert "promoted" not in served_after_stop(str(store.root), reindex.ReindexReport())  # nothing known yet either


def test_candidate_left_by_a_killed_run_is_removed_by_the_next_run(store, tiny_config, tmp_path):
    from lookalike.index.builder import build_and_publish
    from lookalike.pipeline.leftovers import mark_candidate

    index = ItemIndex.load(store.require_current_index())
    mark_candidate(store, "i-killed-candidate")  # what a run killed between build and promote leaves
    build_and_publish(store, index.embeddings, index.items.table, model_version=index.model_version,
                      make_current=False, version="i-killed-candidate")
    assert store.index_dir("i-killed-candidate").is_dir()
    flat = tmp_path / "flat"
    flat.mkdir()
    run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, corpus=str(flat)))  # fails early
    assert not store.index_dir("i-killed-candidate").exists()
    assert not list(store.indexes_dir.glob(".candidate-*"))


def test_after_a_dead_run_one_log_line_says_everything_that_was_removed(store, tiny_config, tmp_path, caplog):
    """Not "removed its leftovers: none" followed by the candidate it did remove."""
    from lookalike.index.builder import build_and_publish
    from lookalike.model.store_lock import LOCK_NAME
    from lookalike.pipeline.leftovers import mark_candidate

    index = ItemIndex.load(store.require_current_index())
    mark_candidate(store, "i-killed-candidate")
    build_and_publish(store, index.embeddings, index.items.table, model_version=index.model_version,
                      make_current=False, version="i-killed-candidate")
    (store.models_dir / ".run-killed").mkdir()  # a partial model of the dead run
    (store.root / LOCK_NAME).write_text(json.dumps({"host": "h", "pid": 2**22 + 1, "started_unix_s": 1}))
    flat = tmp_path / "flat"
    flat.mkdir()
    caplog.set_level("INFO")
    run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, corpus=str(flat)))  # fails early
    removals = [r.getMessage() for r in caplog.records if "remov" in r.getMessage()]
    assert len(removals) == 1, removals
    assert removals[0].startswith("the run that held the store lock died; removed what it left: index candidate(s) "
                                  "built but never promoted: i-killed-candidate; partial folder(s): "), removals
    assert ".run-killed" in removals[0] and "none" not in removals[0]
    assert not store.index_dir("i-killed-candidate").exists() and not (store.models_dir / ".run-killed").exists()
    caplog.clear()
    (store.root / LOCK_NAME).write_text(json.dumps({"host": "h", "pid": 2**22 + 1, "started_unix_s": 1}))
    run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, corpus=str(flat)))
    assert "the run that held the store lock died; it left nothing to remove" in caplog.text


def test_prune_keeps_the_most_recently_promoted_versions_not_the_newest_names(store):
    from lookalike.index.builder import build_and_publish
    from lookalike.pipeline.versions import prune

    a = store.current_index()
    index = ItemIndex.load(store.index_dir(a))

    def publish(make_current: bool = True) -> str:
        return build_and_publish(store, index.embeddings, index.items.table, model_version=index.model_version,
                                 make_current=make_current)

    b = publish()
    c = publish()
    unpromoted = publish(make_current=False)  # newest name, never served: must not count as kept
    assert prune(store, keep=2) == [a]
    assert {r["version"]: r["served"] for r in list_versions(store)} == {b: True, c: True, unpromoted: False}
    promote(store, b, reason="manual")  # b is the most recently promoted now, then c
    assert prune(store, keep=1) == [c]
    assert {r["version"] for r in list_versions(store)} == {b, unpromoted}


def test_prune_deletes_older_rejected_candidates_and_models_of_pruned_versions_never_one_trained_by_hand(store):
    from lookalike.index.builder import build_and_publish
    from lookalike.pipeline.versions import prune

    first = store.current_index()
    index = ItemIndex.load(store.index_dir(first))
    served_model = index.model_version
    for name in ("m-by-hand", "m-rejected-old", "m-rejected-new", "m-served-once"):
        shutil.copytree(store.model_dir(served_model), store.model_dir(name))
    store.mark_reindex_model("m-rejected-old")
    store.mark_reindex_model("m-rejected-new")
    store.set_rejected_model("m-rejected-new")
    once = build_and_publish(store, index.embeddings, index.items.table, model_version="m-served-once")
    promote(store, first, reason="back")
    store.set_rejected_model("m-served-once")
    promote(store, once, reason="a rejected candidate served after all")
    assert store.rejected_model() is None  # served: no longer the rejected one
    store.set_rejected_model("m-rejected-new")
    promote(store, first, reason="back")
    assert sorted(prune(store, keep=1)) == sorted(["m-rejected-old", "m-served-once", once])
    assert sorted(p.name for p in store.models_dir.iterdir() if p.is_dir()) == sorted(
        ["m-by-hand", "m-rejected-new", served_model])  # the latest rejected one stays for inspection
    assert prune(store, keep=1) == []


def test_a_run_that_keeps_current_prunes_older_rejected_candidates(store, tiny_config):
    """Nightly runs that keep CURRENT (exit 3) must not pile up rejected models."""
    barely = apply_overrides(tiny_config, ["num_steps=1"])
    reports = [run_reindex(ReindexConfig(workdir=str(store.root), train=apply_overrides(barely, [f"seed={seed}"]),
                                         min_improvement=1.0)) for seed in (1, 2)]
    assert [r.outcome for r in reports] == ["kept_current", "kept_current"], [r.reason for r in reports]
    assert reports[1].metrics["pruned"] == [reports[0].candidate_model]
    assert not store.model_dir(reports[0].candidate_model).exists() and store.rejected_model() == reports[1].candidate_model
    # Nor embedding runs and caches: each run embedded the corpus into a run folder of its own.
    from lookalike.pipeline.cache import cache_dir
    from lookalike.pipeline.versions import prune

    runs = {d.name for d in store.embeddings_dir.iterdir() if d.name != "cache"}
    by_reindex = {Path(r.metrics["embed"]["run_dir"]).name for r in reports}
    assert len(by_reindex) == 2 and by_reindex < runs  # the store's first run is by `lookalike embed`
    served_cache = cache_dir(store.embeddings_dir, store.latest_model())
    gone_cache = cache_dir(store.embeddings_dir, "m-deleted-by-hand")
    old_decoding = store.embeddings_dir / "cache" / store.latest_model()  # before IMAGE_DECODING_VERSION 2
    for cache in (gone_cache, old_decoding):
        shutil.copytree(served_cache, cache)
    newest = max(by_reindex, key=lambda run: (store.embeddings_dir / run).stat().st_mtime)
    assert sorted(prune(store, keep=1)) == sorted([f"embeddings/{(by_reindex - {newest}).pop()}",
                                                   f"embeddings/cache/{gone_cache.name}",
                                                   f"embeddings/cache/{old_decoding.name}"])
    assert {d.name for d in store.embeddings_dir.iterdir() if d.name != "cache"} == runs - by_reindex | {newest}
    assert [d.name for d in (store.embeddings_dir / "cache").iterdir()] == [served_cache.name]


def test_a_deleted_current_is_not_replaced_by_a_model_trained_from_scratch(store, tiny_config):
    """A store that served versions but lost CURRENT: reindex refuses and names the version to
    promote again (it used to train from scratch and promote a far worse model); rollback names it too."""
    served = store.current_index()
    models = sorted(p.name for p in store.models_dir.iterdir())
    (store.root / "CURRENT").unlink()
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert (report.outcome, report.exit_code) == ("failed", 1)
    assert f"`lookalike versions promote {served} --workdir {store.root}`" in report.reason, report.reason
    assert sorted(p.name for p in store.models_dir.iterdir()) == models and store.current_index() is None
    with pytest.raises(PromotionError, match=f"has no CURRENT index; .* shows {served} was served last"):
        rollback(store)
    promote(store, served, reason="restored")
    assert store.current_index() == served


@pytest.mark.parametrize("damage", ["json", "weights"])
def test_a_corrupt_served_model_is_named_with_the_file_and_how_to_serve_a_working_version(store, tiny_config, damage):
    from lookalike.model.artifact import load_model

    model_dir = store.require_model(ItemIndex.load(store.require_current_index()).model_version)
    if damage == "json":
        (model_dir / "model.json").write_text("{", encoding="utf-8")
        expected = f"{model_dir / 'model.json'} is not a valid model description (not JSON: "
    else:
        for path in (model_dir / "params").rglob("*"):
            if path.is_file() and path.parent.name == "d":
                os.truncate(path, 10)
        expected = f"the weights of model {model_dir.name} ({model_dir / 'params'}) cannot be read: "
    with pytest.raises(ValueError) as raised:
        load_model(model_dir)
    assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)
    if damage == "json":  # reindex reads the served model's description before anything else
        report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))
        assert report.outcome == "failed" and expected in report.reason and "versions rollback" not in report.reason
        assert "no other index version: run `lookalike embed" in report.reason  # the store holds none to roll back to
        assert "train one first with `lookalike train`" in report.reason


def test_versions_list_shows_why_a_version_cannot_be_served(store, capsys):
    """A version whose manifest is not an object, or which lost a file its manifest lists, is
    listed with the reason, not as a healthy version (nor with "model None  None items")."""
    from lookalike.pipeline.cli import main

    served = store.current_index()
    (store.indexes_dir / "i-broken").mkdir()
    (store.indexes_dir / "i-broken" / "manifest.json").write_text("[]")
    shutil.copytree(store.index_dir(served), store.indexes_dir / "i-lost-a-file")
    lost = next((store.indexes_dir / "i-lost-a-file").rglob("items.parquet"))
    lost.unlink()
    rows = {r["version"]: r for r in list_versions(store)}
    assert rows["i-broken"]["error"].endswith("manifest.json is not a JSON object")
    assert rows["i-lost-a-file"]["error"] == f"index file {lost} listed in the manifest is missing"
    assert "error" not in rows[served]
    assert main(["versions", "list", "--workdir", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"  i-lost-a-file  cannot be served: index file {lost} listed in the manifest is missing" in out
    assert "None" not in out


def test_versions_commands_refuse_while_a_reindex_holds_the_lock(store):
    """A rollback during a reindex would be silently undone by the reindex's promotion."""
    from lookalike.index.builder import build_and_publish
    from lookalike.pipeline.versions import prune

    first = store.current_index()
    index = ItemIndex.load(store.index_dir(first))
    second = build_and_publish(store, index.embeddings, index.items.table, model_version=index.model_version)
    with StoreLock(store.root):
        for attempt in (lambda: rollback(store), lambda: promote(store, first), lambda: prune(store, keep=1)):
            with pytest.raises(LockHeldError, match="another run holds"):
                attempt()
        assert store.current_index() == second and store.index_dir(first).is_dir()
    rollback(store)
    assert store.current_index() == first


def test_a_changed_metadata_file_alone_publishes_and_an_unchanged_one_keeps_current(store, tiny_config, tmp_path, caplog):
    barely = apply_overrides(tiny_config, ["num_steps=1", "embed_dim=4"])  # rejected: the served model re-embeds
    ids = probe_ids(store)
    metadata = tmp_path / "meta.jsonl"
    metadata.write_text("".join(json.dumps({"id": i, "source": "lab", "tags": ["probe"]}) + "\n" for i in ids))
    config = ReindexConfig(workdir=str(store.root), train=barely, metadata=str(metadata))
    with caplog.at_level(logging.INFO, logger="lookalike"):
        tagged = run_reindex(config)
    assert (tagged.outcome, tagged.exit_code) == ("corpus_updated", 4), tagged.reason
    # checked before training and joined by the embed step: its rows and columns logged once
    assert [r.getMessage() for r in caplog.records].count(f"metadata {metadata}: {len(ids)} row(s), column(s) source, tags "
                                                          f"(sha256 {hashlib.sha256(metadata.read_bytes()).hexdigest()[:12]})") == 1
    index = ItemIndex.load(store.require_current_index())
    assert index.manifest["metadata"]["path"] == str(metadata) and tagged.metrics["embed"]["embedded"] == 0
    found = index.search(index.embeddings[0], k=10, where={"tags": "probe", "source": "lab"})[0]
    assert sorted(n.id for n in found) == sorted(ids)
    again = run_reindex(config)
    assert (again.outcome, again.exit_code) == ("kept_current", 3), again.reason
    assert store.current_index() == tagged.new_index


def test_a_cron_line_without_metadata_keeps_the_served_files_metadata_until_told_otherwise(store, tiny_config, tmp_path,
                                                                                           caplog):
    """The crontab line is written once: a run without --metadata joins the file the served
    index joined (tags and filters survive), --no-metadata drops it, and a file gone since
    fails the run before training with CURRENT untouched."""
    barely = apply_overrides(tiny_config, ["num_steps=1", "embed_dim=4"])  # rejected: the served model re-embeds
    ids = probe_ids(store)
    metadata = tmp_path / "meta.csv"
    metadata.write_text("id,tags\n" + "".join(f"{i},probe\n" for i in ids))
    tagged = run_reindex(ReindexConfig(workdir=str(store.root), train=barely, metadata=str(metadata)))
    assert tagged.outcome == "corpus_updated", tagged.reason
    plain = ReindexConfig(workdir=str(store.root), train=barely)
    with caplog.at_level(logging.INFO, logger="lookalike"):
        kept = run_reindex(plain)
    assert (kept.outcome, kept.exit_code) == ("kept_current", 3), kept.reason  # same file joined: nothing new
    # the served index's file, checked before training, is announced once: by the embed step that joins it
    assert sum(r.getMessage().startswith(f"metadata {metadata}: {len(ids)} row(s)") for r in caplog.records) == 1
    index = ItemIndex.load(store.require_current_index())
    assert sorted(n.id for n in index.search(index.embeddings[0], k=10, where={"tags": "probe"})[0]) == sorted(ids)

    metadata.unlink()
    gone = run_reindex(plain)
    assert (gone.outcome, gone.exit_code) == ("failed", 1)
    assert str(metadata) in gone.reason and "--no-metadata" in gone.reason and "does not exist" in gone.reason
    assert store.current_index() == tagged.new_index
    assert not [s for s in gone.steps if s["step"] == "train"]  # failed before its longest step

    dropped = run_reindex(ReindexConfig(workdir=str(store.root), train=barely, no_metadata=True))
    assert dropped.outcome == "corpus_updated", dropped.reason
    index = ItemIndex.load(store.require_current_index())
    assert "metadata" not in index.manifest and "tags" not in index.items.table.column_names
    both = run_reindex(ReindexConfig(workdir=str(store.root), metadata=str(metadata), no_metadata=True))
    assert both.outcome == "failed" and "choose one" in both.reason


def test_report_tiles_refuse_images_over_the_pixel_limit(tmp_path, monkeypatch):
    """Pillow's own bomb check is off (lookalike.model.preprocess): the grid's tiles check ours
    (lowered here to 100 pixels, so a real 20x20 picture stands for a huge one)."""
    from lookalike.pipeline import report

    Image.new("RGB", (20, 20), (0, 90, 0)).save(tmp_path / "big.png")
    Image.new("RGB", (8, 8), (0, 90, 0)).save(tmp_path / "small.png")
    monkeypatch.setattr(report, "DEFAULT_MAX_PIXELS", 100)
    placeholder = report._tile({"thumbnail": "big.png", "uri": None}, tmp_path)
    assert placeholder.size == (report.TILE, report.TILE) and placeholder.getpixel((0, 0)) == (200, 200, 200)
    assert report._tile({"thumbnail": "small.png", "uri": None}, tmp_path).getpixel((0, 0)) == (0, 90, 0)


def test_report_example_grid_titles_each_column_group_and_rules_between_them(store, tmp_path):
    """examples.png: "query", "served VERSION" and "new VERSION" each centred above its columns
    (not one line crammed at the top left), and a grey rule between the groups."""
    from lookalike.pipeline.report import TILE, example_grid

    version, k = store.current_index(), 5
    example_grid(store, version, version, tmp_path / "examples.png", queries=2, k=k)
    picture = Image.open(tmp_path / "examples.png").convert("RGB")
    gap, header = 12, 28
    lefts = (0, TILE + gap, TILE + gap + k * TILE + gap)
    assert picture.size == (lefts[2] + k * TILE, header + 2 * (TILE + 8))
    for left in lefts[1:]:  # the rule runs the full height between two groups
        assert all(picture.getpixel((left - gap // 2, y))[0] < 200 for y in range(picture.height))

    def inked(x0: int, x1: int) -> bool:
        return any(sum(picture.getpixel((x, y))) < 300 for x in range(x0, x1) for y in range(2, header - 4))

    for left, span in zip(lefts, (TILE, k * TILE, k * TILE)):  # each title over the middle of its group
        assert inked(left + span // 2 - 8, left + span // 2 + 8)
    assert not inked(lefts[1], lefts[1] + 40)  # centred, not from the group's left edge (version names are short)


def test_partial_index_folders_of_killed_runs_are_removed_but_never_one_being_written(store):
    from lookalike.index.manifest import publish_atomically
    from lookalike.pipeline.leftovers import clean_partial_indexes

    stale = store.indexes_dir / ".tmp-i-killed"
    (stale / "shard-00000").mkdir(parents=True)
    (store.indexes_dir / ".tmp-i-killed2.lock").write_text("")  # a killed writer's lock file, its folder never made
    source = store.index_dir(store.current_index())
    seen = {}

    def write(tmp: Path) -> None:  # a live writer: another cleaner runs meanwhile
        shutil.copytree(source, tmp)
        seen["removed"] = clean_partial_indexes(store)
        seen["kept"] = tmp.is_dir()

    version = publish_atomically(store, write, make_current=False)
    assert seen == {"removed": [str(stale)], "kept": True}
    assert store.index_dir(version).is_dir()
    assert not [p.name for p in store.indexes_dir.iterdir() if p.name.startswith(".tmp-")]
    (stale / "x").mkdir(parents=True)
    promote(store, version)  # versions promote/rollback clean up too
    assert not stale.exists()


def test_report_md_gives_the_corpus_changes_with_dead_letters_and_rounded_numbers(store, tiny_config):
    """A broken file and two new images: report.md counts them (report.json always did) and names
    the dead-letter file; no float is printed with 16 decimals."""
    from lookalike.pipeline.reindex import ReindexReport
    from lookalike.pipeline.report import write_report

    (store.corpus_dir / "1" / "broken.png").write_text("not an image")
    add_images(store, 2)
    served = len(ItemIndex.load(store.require_current_index()))
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, min_improvement=1.0))
    assert (report.outcome, report.exit_code) == ("corpus_updated", 4), report.reason
    embed = report.metrics["embed"]
    assert (embed["embedded"], embed["failed"], embed["removed"]) == (2, 1, 0)
    assert embed["dead_letters"] and all(Path(p).is_file() for p in embed["dead_letters"])
    report_md = max((store.root / "reports").glob("*/report.md"), key=lambda p: p.stat().st_mtime).read_text()
    assert (f"2 embedded, {served} reused (unchanged), 1 failed, 0 removed since the served index; "
            f"{served + 2} items.") in report_md
    assert f"dead-lettered (skipped, with the reason) in `{embed['dead_letters'][0]}`" in report_md
    # the failed file and its reason are in the report itself: it outlives the run --keep prunes
    assert embed["dead_letter_examples"] == [json.loads(line) for line in Path(embed["dead_letters"][0]).read_text().splitlines()]
    assert f"- `{store.corpus_dir / '1' / 'broken.png'}` at decode: " in report_md
    # every float rounded: the canary overlap, as measured, and any other
    rounded = ReindexReport(outcome="failed", reason="test", metrics={
        "canary_overlap_at_10": 0.9949999999999999, "canary_self_at_1": 1.0,
        "index": {"mode": "scann", "count": 1801, "recall": 0.9812345678, "qps": 1234.5678}},
        steps=[{"step": "train", "seconds": 12.3456789, "ok": True}])
    text = (write_report(store, rounded, 0.0) / "report.md").read_text()
    assert "Canary overlap@10 (served vs new, same model): 0.9950" in text
    assert "Canary self-retrieval@1 (new model): 1.0000" in text  # as many decimals as the other scores
    assert "recall@10 0.9812, 1235 queries/s" in text and "| train | 12.35 | yes |" in text
    assert "99999" not in text and "0.9812345678" not in text


def test_report_md_lists_the_first_dead_letters_one_line_each_and_counts_the_rest():
    """report.md names each failed file with its stage and reason (a multi-line reason on one
    line, backticks that would end the code span replaced), then counts those it does not show."""
    from lookalike.pipeline.report import _corpus_changes

    embed = {"files_matched": 30, "files_read": 30, "embedded": 25, "unchanged": 0, "failed": 3, "items": 25,
             "dead_letters": ["/s/embeddings/e-1/dead_letter-decode.jsonl"],
             "dead_letter_examples": [{"uri": "/c/a.jpg", "stage": "decode", "reason": "cannot identify\n  image `a`"},
                                      {"uri": "/c/it`s\nb.png", "stage": "read", "reason": "Permission denied"}]}
    lines = _corpus_changes(embed)
    assert lines[1] == ("Files that failed are dead-lettered (skipped, with the reason) in "
                        "`/s/embeddings/e-1/dead_letter-decode.jsonl` (until `--keep` prunes that run):")
    assert lines[2:] == ["", "- `/c/a.jpg` at decode: cannot identify image 'a'", "- `/c/it's b.png` at read: Permission denied",
                         "- ... and 1 more", ""]
    embed.pop("dead_letter_examples")  # none carried: the sentence alone
    assert _corpus_changes(embed)[1:] == ["Files that failed are dead-lettered (skipped, with the reason) in "
                                          "`/s/embeddings/e-1/dead_letter-decode.jsonl`.", ""]


def test_a_cron_line_without_corpus_follows_the_folder_the_served_index_was_embedded_from(store, tiny_config, tmp_path,
                                                                                          caplog):
    """`train --data PHOTOS`, `embed --corpus PHOTOS`, then `reindex --workdir DIR` nightly:
    the run trains on and embeds PHOTOS (recorded in the served manifest), not DIR/corpus."""
    import logging

    from lookalike.pipeline.embed import EmbedConfig, run_embed

    photos = tmp_path / "photos"
    shutil.move(store.corpus_dir, photos)
    run_embed(EmbedConfig(workdir=str(store.root), corpus=str(photos)))  # publishes: its manifest records PHOTOS
    barely = apply_overrides(tiny_config, ["num_steps=1", "embed_dim=4"])  # rejected: the served model re-embeds
    with caplog.at_level(logging.INFO, logger="lookalike"):
        kept = run_reindex(ReindexConfig(workdir=str(store.root), train=barely))
    assert (kept.outcome, kept.exit_code) == ("kept_current", 3), kept.reason
    assert kept.metrics["corpus"] == str(photos) and not store.corpus_dir.exists()
    assert f"corpus: {photos} (the corpus the served index {kept.previous_index} was embedded from)" in caplog.text
    other = tmp_path / "other"
    shutil.copytree(photos, other)
    Image.new("L", (32, 32), 99).save(other / "0" / "new.png")
    given = run_reindex(ReindexConfig(workdir=str(store.root), train=barely, corpus=str(other)))  # --corpus wins
    assert (given.outcome, given.exit_code) == ("corpus_updated", 4), given.reason
    assert ItemIndex.load(store.require_current_index()).manifest["source"] == {"corpus": str(other)}
    follows = run_reindex(ReindexConfig(workdir=str(store.root), train=barely))  # and the next night follows it
    assert (follows.outcome, follows.metrics["corpus"]) == ("kept_current", str(other)), follows.reason


def test_corpus_defaults_to_the_store_folder_when_the_served_manifest_records_none(store, tmp_path):
    """Stores indexed before manifests recorded their corpus (or from a list file) keep DIR/corpus."""
    from lookalike.pipeline.reindex_inputs import resolve_corpus

    config = ReindexConfig(workdir=str(store.root))
    assert resolve_corpus(config, store, {"model_version": "m"}, "i-old") == store.corpus_dir
    assert resolve_corpus(config, store, {"source": {"list_file": "/x.txt"}}, "i-old") == store.corpus_dir
    assert resolve_corpus(config, store, None, None) == store.corpus_dir
    # recorded relative to the store (its own corpus/): a copied or moved store follows its own folder
    assert resolve_corpus(config, store, {"source": {"corpus": "corpus"}}, "i-x") == store.corpus_dir
    given = ReindexConfig(workdir=str(store.root), corpus=str(store.corpus_dir / "0"))
    assert resolve_corpus(given, store, {"source": {"corpus": str(tmp_path)}}, "i-x") == store.corpus_dir / "0"
    gone = tmp_path / "gone"
    with pytest.raises(StoreError, match=f"corpus folder {gone} \\(the corpus the served index i-x was embedded from\\) "
                                         "does not exist; pass --corpus FOLDER"):
        resolve_corpus(config, store, {"source": {"corpus": str(gone)}}, "i-x")
    # the store itself, given or recorded: refused before any training (the embed would refuse it after)
    for corpus, why in ((str(store.root), "given by --corpus"), (None, "the corpus the served index i-x was embedded from")):
        with pytest.raises(StoreError, match=rf"corpus {store.root} is the store itself .*\({why}\)$"):
            resolve_corpus(ReindexConfig(workdir=str(store.root), corpus=corpus), store,
                           {"source": {"corpus": str(store.root)}}, "i-x")


@pytest.mark.parametrize("fields, expected", [
    ({"outcome": "kept_current", "previous_index": "i-a", "current_model": "m-a"},
     "- new index: none (the corpus is unchanged: i-a stays CURRENT)"),
    ({"outcome": "failed", "previous_index": "i-a", "rejected_index": "i-b"}, "- new index: none (the candidate index was rejected)"),
    ({"outcome": "failed", "reason": "StoreError: no corpus"}, "- new index: none (nothing promoted: the run failed)"),
])
def test_report_md_says_in_words_why_no_index_was_promoted(tmp_path, fields, expected):
    """Never a raw Python None in report.md."""
    from lookalike.pipeline.reindex import ReindexReport
    from lookalike.pipeline.report import write_report

    store = Store.at(tmp_path)
    md = (write_report(store, ReindexReport(**fields), 0.0) / "report.md").read_text()
    assert expected in md.splitlines() and "None" not in md
    if "previous_index" not in fields:
        assert "- served before: nothing (the store had no CURRENT index)" in md
        assert "- candidate model: none (not trained); chosen: none" in md


def test_keep_1_report_still_shows_the_version_served_before(store, tiny_config, caplog):
    """--keep 1 prunes the version served before; the report's example queries, which show
    it beside the new one, are drawn before the prune, so the served column is not empty."""
    from lookalike.pipeline.report import TILE

    previous = store.current_index()
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True, keep_versions=1))
    assert report.outcome == "promoted", report.reason
    assert not store.index_dir(previous).exists()  # pruned
    [picture_path] = (store.root / "reports").glob("*/examples.png")
    assert "could not draw" not in caplog.text and "examples.png" in (picture_path.parent / "report.md").read_text()
    picture = Image.open(picture_path).convert("L")
    served = picture.crop((TILE + 12, 28, TILE + 12 + 5 * TILE, 28 + TILE))  # first query's served results
    assert len(set(served.getdata())) > 8  # pictures, not "no served version" on white


def test_an_unlabelled_served_model_is_not_retrained_by_folder_names(tmp_path, digits_corpus, tiny_config):
    """A model trained with --unlabelled, on a corpus nested by year or trip: reindex must not
    take those folders for classes (hold out half of each, judge by them, promote). It stops
    before training, naming the nightly embed line and how to retrain; the reason is the
    store error itself, without its class name."""
    from lookalike.model.train import train_and_evaluate
    from lookalike.pipeline.embed import EmbedConfig, run_embed

    store = Store.at(tmp_path / "store")
    shutil.copytree(digits_corpus, store.corpus_dir)  # folders "0".."9": years or trips here, not classes
    train_and_evaluate(apply_overrides(tiny_config, ["unlabelled=true", "num_steps=2"]), store.root)
    run_embed(EmbedConfig(workdir=str(store.root)))
    models, before = sorted(p.name for p in store.models_dir.iterdir()), store.current_index()
    report = run_reindex(ReindexConfig(workdir=str(store.root)))
    assert (report.outcome, report.exit_code) == ("failed", 1)
    assert report.reason.startswith(f"the served model {report.current_model} was trained with unlabelled=true"), report.reason
    assert f"`lookalike embed --workdir {store.root} --corpus {store.corpus_dir} --incremental --keep 5`" in report.reason
    assert sorted(p.name for p in store.models_dir.iterdir()) == models and store.current_index() == before
    assert not (store.root / "eval" / "frozen.json").exists()
    asked = run_reindex(ReindexConfig(workdir=str(store.root), train_overrides=["unlabelled=true"]))
    assert asked.reason.startswith("the training config asks for unlabelled=true"), asked.reason
    labelled = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))  # asked for labels: fine
    assert labelled.outcome in ("promoted", "kept_current", "corpus_updated"), labelled.reason


def accept_every_candidate(monkeypatch) -> None:
    """The gate accepts whatever the numbers (these tests are about what happens around it)."""
    from lookalike.pipeline.reindex_checks import GateDecision

    monkeypatch.setattr("lookalike.pipeline.reindex.gate", lambda *args, **kwargs: GateDecision(True, "better (test)"))


def test_a_rollback_is_not_undone_by_the_next_run_reusing_the_model_rolled_back_from(store, tiny_config, monkeypatch):
    """The next night trains from the same inputs and reuses the model an operator rolled back
    from: the gate alone would promote it again. It is rejected unless forced; serving it again
    on purpose clears the mark."""
    first = store.current_index()
    forced = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert forced.outcome == "promoted", forced.reason
    rollback(store)
    assert store.current_index() == first and store.rolled_back_from(forced.chosen_model)["index"] == forced.new_index
    accept_every_candidate(monkeypatch)
    again = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))
    assert again.candidate_model == forced.chosen_model and again.metrics["candidate_reused"], again.metrics
    assert (again.outcome, again.exit_code) == ("kept_current", 3), again.reason
    assert store.current_index() == first and "rolled back before" in again.reason
    assert again.metrics["gate"]["accepted"] is False and "versions rollback" in again.metrics["gate"]["reason"]
    # Pruned with the index that used it, the model is trained again by the same name: still rejected.
    from lookalike.pipeline.versions import prune

    (store.models_dir / "REJECTED").unlink()  # else pruning spares the latest rejected candidate
    assert forced.chosen_model in prune(store, keep=1) and not store.model_dir(forced.chosen_model).exists()
    retrained = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config))
    assert retrained.candidate_model == forced.chosen_model and not retrained.metrics["candidate_reused"]
    assert retrained.outcome == "kept_current" and store.current_index() == first, retrained.reason
    forced_again = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert forced_again.outcome == "promoted" and forced_again.chosen_model == forced.chosen_model
    assert store.rolled_back_from(forced.chosen_model) is None  # served again: no longer marked
    rollback(store)
    promote(store, forced_again.new_index)  # by hand: the operator's own word
    assert store.rolled_back_from(forced.chosen_model) is None


def test_a_damaged_rollback_record_holds_every_model_back_until_the_next_mark_moves_it_aside(store):
    store.mark_rolled_back_model("m-a", "i-1")
    path = store.models_dir / "ROLLED_BACK.json"
    path.write_text('{"m-a": {"index": "i-1"')  # cut short (a restore, a hand edit)
    held = store.rolled_back_from("m-other")
    assert held is not None and "ROLLED_BACK.json cannot be read" in held["error"] and "fix or delete it" in held["error"]
    store.mark_rolled_back_model("m-b", "i-2")
    [aside] = store.models_dir.glob("ROLLED_BACK.json.damaged-*")
    assert aside.read_text() == '{"m-a": {"index": "i-1"'  # kept for the operator
    assert store.rolled_back_from("m-b")["index"] == "i-2" and store.rolled_back_from("m-other") is None


def test_a_rollback_between_versions_of_one_model_marks_no_model(store):
    served = ItemIndex.load(store.require_current_index()).model_version
    publish_one_item_fewer(store, store.current_index())
    rollback(store)
    assert store.rolled_back_from(served) is None


def disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failure_after_promotion_keeps_the_outcome_and_exits_1_naming_what_serves(store, monkeypatch, capsys):
    """Saving the new evaluation set and pruning run once CURRENT moved: a full disk there is
    reported with the outcome (exit 1), never as "nothing promoted", and pruning still runs."""
    import json

    from lookalike.pipeline.cli import main

    assert not (store.root / "eval" / "frozen.json").exists()  # this first run saves a new one
    monkeypatch.setattr("lookalike.pipeline.reindex.save_eval_set", disk_full)
    pruned = []
    monkeypatch.setattr("lookalike.pipeline.reindex.prune", lambda *args, **kwargs: pruned.append(1) or disk_full())
    code = main(["reindex", "--workdir", str(store.root), "--config", "tiny", "--force"])
    out, err = capsys.readouterr()
    line = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and line["exit_code"] == 1 and line["outcome"] == "promoted", line
    assert store.current_index() == line["new_index"] and pruned == [1]
    assert [e.split(" failed")[0] for e in line["errors_after_outcome"]] == [
        "the disk is full (No space left on device): saving the new evaluation set",
        "the disk is full (No space left on device): pruning"], line["errors_after_outcome"]
    assert "nothing promoted" not in err and "lookalike reindex: promoted (new model" in err and "then failed" in err
    [report_md] = (store.root / "reports").glob("*/report.md")
    assert "**Outcome: promoted** (exit 1)" in report_md.read_text() and "Then failed (the outcome stands): the disk" \
        in report_md.read_text()


def test_latest_failing_after_current_moved_is_a_promotion_not_a_rejected_candidate(store, tiny_config, monkeypatch):
    """CURRENT moves first, then models/LATEST: a full disk in between leaves the candidate
    serving. The run says so (promoted, exit 1), and does not record the served model as rejected
    nor fall back to the model it replaced."""
    served_model = ItemIndex.load(store.require_current_index()).model_version
    monkeypatch.setattr(Store, "set_latest_model", disk_full)
    report = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
    assert (report.outcome, report.exit_code) == ("promoted", 1), report.reason
    assert store.current_index() == report.new_index is not None
    assert ItemIndex.load(store.require_current_index()).model_version == report.candidate_model != served_model
    assert store.rejected_model() != report.candidate_model and report.candidate_error is None
    [error] = report.errors_after_outcome
    assert error.startswith(f"the disk is full (No space left on device): promoting {report.new_index} (CURRENT moved")
    assert "models/LATEST was not updated either" in error
    monkeypatch.undo()
    rollback(store)  # the history knows it served: the operator can go back
    assert ItemIndex.load(store.require_current_index()).model_version == served_model
