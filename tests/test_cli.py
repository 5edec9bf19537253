"""Smoke tests of whole jobs through the installed ``lookalike`` console script.

``demo --no-serve`` on the real default (all 1,797 bundled digits), then ``serve`` as a
separate process on 127.0.0.1 answering /healthz and finding a corpus image as its
own best match, and ``query`` as its command-line client; ``query``'s input handling
and table also in process (``main``) against the real server on 127.0.0.1 over conftest's
tiny store with metadata.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lookalike.model.data import list_images

REPO = Path(__file__).resolve().parents[1]


def lookalike_exe() -> str:
    exe = Path(sys.executable).with_name("lookalike")
    return str(exe) if exe.exists() else shutil.which("lookalike")


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([lookalike_exe(), *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    out = run_cli("demo", "--workdir", str(workdir), "--no-serve")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "images indexed" in out.stdout
    return workdir


@pytest.fixture(scope="module")
def server_url(demo_workdir):
    port = free_port()
    proc = subprocess.Popen(
        [lookalike_exe(), "serve", "--workdir", str(demo_workdir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:  # /healthz answers at once, /readyz once the model and index are loaded
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server was not ready (/readyz) within 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_every_subcommand_has_help():
    for command in ("demo", "train", "embed", "serve", "query", "reindex", "versions"):
        out = run_cli(command, "--help", timeout=60)
        assert out.returncode == 0 and "--" in out.stdout, (command, out.stderr)
        if command != "query":
            assert "--workdir" in out.stdout
        if command == "embed":  # defaults are shown, once
            flat = " ".join(out.stdout.split())
            assert "files per inference batch (default 256)" in flat and "(default 0.95)" in flat
            assert "(default: one per 50k files)" in flat and "(default: one per 50k files) (default" not in flat


def test_reindex_help_gives_the_readmes_crontab_line_niced_with_the_venvs_absolute_path():
    """cron's PATH does not hold the virtualenv: a bare `lookalike` in a crontab line is not found."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("0 3 * * * ") and "reindex" in x)
    out = run_cli("reindex", "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert line in " ".join(out.stdout.split())
    command = line.split()[5:]
    assert command[:3] == ["nice", "-n", "10"] and command[3].startswith("/") and command[3].endswith("/.venv/bin/lookalike")


def test_demo_leaves_model_embeddings_and_published_index(demo_workdir):
    assert len(list_images(demo_workdir / "corpus")) == 1797
    assert (demo_workdir / "models" / (demo_workdir / "models" / "LATEST").read_text().strip() / "model.json").is_file()
    current = (demo_workdir / "CURRENT").read_text().strip()
    manifest = json.loads((demo_workdir / "indexes" / current / "manifest.json").read_text())
    assert manifest["count"] == 1797
    run_dir = next((demo_workdir / "embeddings").glob("e-*"))
    assert list(run_dir.glob("embeddings-*.parquet"))
    metrics = json.loads((demo_workdir / "models" / manifest["model_version"] / "model.json").read_text())["metrics"]
    assert metrics["precision_at_1"] > 0.9, metrics  # the default model really learned the digits


def test_served_image_search_finds_the_image_itself_first(server_url, demo_workdir):
    assert httpx.get(f"{server_url}/healthz").json()["status"] == "ok"
    image = list_images(demo_workdir / "corpus")[123]
    with image.open("rb") as f:
        response = httpx.post(f"{server_url}/v1/search/image", params={"k": 5}, files={"file": (image.name, f, "image/png")})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["id"] == str(image.relative_to(demo_workdir / "corpus"))
    label = image.parent.name
    assert sum(r["id"].split("/")[0] == label for r in results) >= 4  # neighbours are the same digit


def test_query_cli_against_the_live_server(server_url, demo_workdir):
    image = list_images(demo_workdir / "corpus")[7]
    item_id = str(image.relative_to(demo_workdir / "corpus"))
    out = run_cli("query", "--url", server_url, "--image", str(image), "-k", "3", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["id"] == item_id
    out = run_cli("query", "--url", server_url, "--id", item_id, "-k", "3", timeout=60)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = run_cli("query", "--url", server_url, "--id", item_id, "--group", "clip.mp4", timeout=60)  # no video here
    assert out.returncode == 0 and out.stdout.strip().splitlines()[1:] == [
        "note: no item has group 'clip.mp4' (a group is a video's id, and this index holds no video frames)"], out.stdout


def test_missing_workdir_says_which_step_to_run(tmp_path):
    out = run_cli("serve", "--workdir", str(tmp_path / "nothing"), "--port", str(free_port()), timeout=120)
    assert out.returncode != 0 and "lookalike demo" in out.stderr, out.stderr[-2000:]
    out = run_cli("embed", "--workdir", str(tmp_path), timeout=120)
    assert out.returncode != 0 and "lookalike train" in out.stderr, out.stderr[-2000:]


def test_reindex_publishes_a_new_version(tmp_path, demo_workdir):
    workdir = tmp_path / "w"
    shutil.copytree(demo_workdir / "corpus", workdir / "corpus")
    out = run_cli("reindex", "--workdir", str(workdir), "--config", "tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["outcome"] == "promoted" and report["exit_code"] == 0
    assert (workdir / "CURRENT").read_text().strip() == report["new_index"]
    out = run_cli("versions", "list", "--workdir", str(workdir), "--json", timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["current"] is True


def test_eval_of_the_demo_model_and_index(demo_workdir):
    out = run_cli("eval", "--workdir", str(demo_workdir), "--model", "--episodes", "50", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["map_at_r"] > 0.8 and report["verification_roc_auc"] > 0.9
    # the images the demo's model never trained on, not its training images, and it says so
    assert report["images"] == "held_out" and report["images_in_folder"] == 1797
    assert 0 < report["items"] == report["held_out_in_folder"] < 1797
    assert f"{report['items']} of 1797 images were held out of training; scoring those" in out.stderr
    out = run_cli("eval", "--workdir", str(demo_workdir), "--model", "--episodes", "50", "--all-images", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["images"] == "all" and report["items"] == 1797 and report["optimistic"] is True
    assert "the scores are optimistic" in out.stderr
    out = run_cli("eval", "--workdir", str(demo_workdir), "--index", "--max-queries", "300", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["approximation_loss"]["map_at_r"] <= 0.05


def test_train_without_labels_or_from_tfds_in_process(tmp_path, tfds_dir, capsys):
    from lookalike.pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--unlabelled", "--tfds NAME[:SPLIT]", "--tfds-data-dir")), help_text
    assert main(["train", "--workdir", str(tmp_path / "w"), "--tfds", "mnist", "--tfds-data-dir", str(tmp_path)]) == 1
    assert f"data_dir {tmp_path}" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "w"), "--config", "tiny", "--set", "num_steps=5", "--unlabelled",
                 "--tfds", "lookalike_tiny_shapes", "--tfds-data-dir", str(tfds_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    model = json.loads((Path(out["model_dir"]) / "model.json").read_text())
    assert model["config"]["unlabelled"] is True and out["metrics"]["val_views"] == 18  # 6 held-out images x 3


def test_a_diverging_training_is_a_one_line_error_and_leaves_no_empty_run(tmp_path, digits_corpus, capsys):
    from lookalike.pipeline.cli import main

    workdir = tmp_path / "w"
    assert main(["train", "--workdir", str(workdir), "--data", str(digits_corpus), "--config", "tiny",
                 "--set", "num_steps=20", "--set", "log_every_steps=5", "--set", "checkpoint_every_steps=100",
                 "--set", "learning_rate=1e38", "--set", "warmup_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "lookalike train: error: training diverged at step 5: loss nan" in err and "Traceback" not in err
    assert not (workdir / "models" / ".runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "--k-shot", "0"], "argument --k-shot: must be at least 1, got 0"),
    (["eval", "--model", "--n-way", "1"], "argument --n-way: must be at least 2, got 1"),
    (["eval", "--model", "--episodes", "0"], "argument --episodes: must be at least 1, got 0"),
    (["embed", "--target-recall", "2"], "argument --target-recall: must be in (0, 1], got 2"),
    (["embed", "--shot-threshold", "5"], "argument --shot-threshold: must be in [0, 2], got 5"),
    (["embed", "--frame-interval-s", "-1"], "argument --frame-interval-s: must be in [0.001, inf], got -1"),
    (["embed", "--frame-interval-s", "0.0002"], "argument --frame-interval-s: must be in [0.001, inf], got 0.0002"),
    (["embed", "--max-frames-per-video", "0"], "argument --max-frames-per-video: must be at least 1, got 0"),
    (["embed", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["embed", "--num-shards", "x"], "argument --num-shards: expected an integer, got 'x'"),
    (["embed", "--corpus", "a", "--list-file", "b"], "argument --list-file: not allowed with argument --corpus"),
    (["query", "--id", "a", "-k", "0"], "argument -k: must be between 1 and 100, got 0"),
    (["query", "--id", "a", "-k", "101"], "argument -k: must be between 1 and 100, got 101"),  # as the server says
    (["query", "--id", "a", "--max-per-group", "101"], "argument --max-per-group: must be between 1 and 100, got 101"),
    (["query", "--id", "a", "--source", ""], "argument --source: must not be empty"),  # would match no item
    (["query", "--id", "a", "--tag", "x", "--tag", ""], "argument --tag: must not be empty"),
    (["query", "--id", "a", "--group", ""], "argument --group: must not be empty"),
    (["query", "--id", ""], "argument --id: must not be empty (an unset variable?)"),  # not a traceback
    (["query", "--image", ""], "argument --image: must not be empty"),
    (["query", "--vector", ""], "argument --vector: must not be empty"),
    (["reindex", "--min-canary-overlap", "1.5"], "argument --min-canary-overlap: must be in [0, 1], got 1.5"),
    (["reindex", "--min-items-ratio", "2"], "argument --min-items-ratio: must be in [0, 1], got 2"),
    (["reindex", "--min-canary-self", "-1"], "argument --min-canary-self: must be in [0, 1], got -1"),
    (["reindex", "--metadata", "m.csv", "--no-metadata"], "argument --no-metadata: not allowed with argument --metadata"),
    (["embed", "--metadata", ""], "argument --metadata: must not be empty"),
    (["eval", "--workdir", "/etc/passwd", "--model"], "argument --workdir: /etc/passwd is a file, not a folder"),
    (["reindex", "--min-improvement", "nan"], "argument --min-improvement: must be in [0, 1], got nan"),
    (["reindex", "--min-improvement", "-1"], "argument --min-improvement: must be in [0, 1], got -1"),
    (["train", "--set", "num_steps=0"], "--set: config num_steps=0: must be at least 1"),  # before any work, exit 2
    (["train", "--config", "tiny", "--set", "seed=9223372036854775808"], "--set: config seed=9223372036854775808: must be at most"),
    (["reindex", "--set", "nope=1"], "--set: bad override 'nope=1': expected key=value with key one of"),
    (["demo", "--set", "weight_decay=inf"], "--set: config weight_decay=inf: must be a finite number"),
])
def test_out_of_range_options_are_refused_naming_the_option(argv, message, capsys):
    from lookalike.pipeline.cli import main
    from lookalike.pipeline.cli_options import MAX_RESULTS
    from lookalike.serving.schemas import MAX_K

    assert MAX_RESULTS == MAX_K  # the CLI refuses what the server would

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("typed, message", [
    (["--incremntal"], "unrecognized option --incremntal: did you mean --incremental?"),
    (["--num-workrs", "2"], "unrecognized option --num-workrs: did you mean --num-workers?"),
    (["--corpus", "a", "b"], "unrecognized argument 'b' (only Beam options"),
])
def test_embed_refuses_a_typo_of_its_own_options_instead_of_passing_it_to_beam(typed, message, tmp_path, capsys):
    """Unknown embed options go to Beam, which only warns about what it cannot parse: a
    misspelt --incremental would run a full, non-incremental embed."""
    from lookalike.pipeline.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["embed", "--workdir", str(tmp_path / "none"), *typed])
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["embed"], ["reindex"]])
def test_a_wildcard_the_shell_expanded_gets_a_hint_to_quote_it(command, tmp_path, capsys, monkeypatch):
    """`--corpus photos/*.jpg` unquoted reaches lookalike as one value and more file names."""
    from lookalike.pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    names = [f"photos/{i}.jpg" for i in range(5)]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        main([*command, "--workdir", str(tmp_path / "none"), "--corpus", *names])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "unrecognized arguments after --corpus photos/0.jpg: photos/1.jpg photos/2.jpg photos/3.jpg ... (4 names)" in err
    assert "quote the pattern (--corpus 'photos/*.jpg'), or pass the folder" in err and "also unrecognized" not in err
    with pytest.raises(SystemExit):  # another unknown option is named too
        main([*command, "--workdir", str(tmp_path / "none"), "--corpus", *names[:2], "--bogus"])
    assert "after --corpus photos/0.jpg: photos/1.jpg: existing paths" in capsys.readouterr().err.replace("\n", " ")
    for typed in (["--corpus", "photos", "nightly"], [names[1]], ["--run-name", "x", names[1]]):
        with pytest.raises(SystemExit):  # a word that is no path, or an existing path not after --corpus's value: no hint
            main([*command, "--workdir", str(tmp_path / "none"), *typed])
        assert "quote the pattern" not in capsys.readouterr().err, typed
    if command == ["embed"]:  # an existing path as a Beam option's value is no stray word
        assert main(["embed", "--workdir", str(tmp_path / "none"), "--temp_location", "photos"]) == 1
        assert "quote the pattern" not in capsys.readouterr().err


def test_without_beams_option_list_a_stray_word_is_still_refused(monkeypatch, tmp_path, capsys):
    """A Beam release whose parser internals cannot be read: no typo check (a Beam option might
    look like a typo of ours), but a stray word is still no Beam option."""
    from lookalike.pipeline import cli_options
    from lookalike.pipeline.cli import main

    monkeypatch.setattr(cli_options, "beam_option_names", lambda: None)
    assert cli_options.misspelled_pass_through(["--incremntal"], ["--incremental"]) is None
    with pytest.raises(SystemExit) as exited:
        main(["embed", "--workdir", str(tmp_path / "none"), "--corpus", "a", "b"])
    assert exited.value.code == 2 and "unrecognized argument 'b' (only Beam options" in capsys.readouterr().err


def test_embed_still_passes_beams_own_options_on(tmp_path, capsys):
    """--num_workers (Dataflow's) and --job_name VALUE are Beam's: on to Beam, not typos of ours."""
    from lookalike.pipeline.cli import main

    assert main(["embed", "--workdir", str(tmp_path / "none"), "--num_workers", "2", "--job_name", "nightly"]) == 1
    assert f"store {tmp_path / 'none'} does not exist" in capsys.readouterr().err  # got past parsing


def test_reindex_config_defaults_to_the_served_models():
    from lookalike.pipeline.cli import build_parser

    assert build_parser().parse_args(["reindex"]).config is None  # resolved from the served model's model.json
    assert build_parser().parse_args(["reindex", "--config", "tiny"]).config == "tiny"
    assert build_parser().parse_args(["train"]).config == "digits"


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "--index"], "--model and --index evaluate different things"),
    (["versions", "list", "extra"], "versions list takes no VERSION (got 'extra')"),
    (["versions", "rollback", "i-1"], "versions rollback takes no VERSION (got 'i-1')"),
    (["versions", "promote"], "versions promote needs a VERSION"),
    (["versions"], "the following arguments are required: {list,promote,rollback,prune}"),  # not "action"
])
def test_arguments_that_cannot_go_together_are_a_usage_error(argv, message, tmp_path, capsys):
    """Exit 2 with the command's usage, as argparse's own errors, before anything is read."""
    from lookalike.pipeline.cli import main

    with pytest.raises(SystemExit) as exited:
        main([*argv, "--workdir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and f"usage: lookalike {argv[0]}" in err, err


@pytest.mark.parametrize("argv, message", [
    (["query", "--url", "http://127.0.0.1:9", "--vector", "0.1,abc"], "--vector expects comma-separated numbers: value 1 is 'abc'"),
    (["query", "--url", "http://127.0.0.1:9", "--vector", "0.1,0.2,"],
     "--vector expects comma-separated numbers: value 2 is '' (an empty value: a stray comma?)"),
    (["query", "--url", "127.0.0.1:abc", "--id", "a"], "the server address '127.0.0.1:abc' is not a valid URL"),
    (["query", "--url", "http://127.0.0.1:9/v1/info?x", "--id", "a"], "has a path or query"),
    (["query", "--url", "http://127.0.0.1:9", "--vector", "0.1,nan,0.2"],
     "--vector value nan at position 1 is not a finite number (NaN and infinity are not allowed)"),
    (["query", "--url", "http://127.0.0.1:9", "--vector", "-inf,0.2"], "--vector value -inf at position 0 is not a finite"),
    (["query", "--url", "ftp://127.0.0.1:9", "--id", "a"], "the server address 'ftp://127.0.0.1:9' has scheme ftp://"),
])
def test_contradictory_or_malformed_input_is_a_clear_error(argv, message, tmp_path, capsys):
    from lookalike.pipeline.cli import main

    assert main([*argv, *(["--workdir", str(tmp_path)] if argv[0] != "query" else [])]) == 1
    assert message in capsys.readouterr().err


def test_model_evaluation_refuses_zero_instead_of_using_defaults(demo_workdir):
    import argparse

    from lookalike.model.evaluate import evaluate_model_cli

    args = argparse.Namespace(workdir=str(demo_workdir), model="LATEST", k_shot=0, n_way=5, episodes=10)
    with pytest.raises(ValueError, match="--k-shot must be at least 1, got 0"):
        evaluate_model_cli(args)
    with pytest.raises(ValueError, match="evaluation folder .*nope does not exist"):
        evaluate_model_cli(argparse.Namespace(workdir=str(demo_workdir), model="LATEST", data=str(demo_workdir / "nope")))


def test_an_empty_corpus_is_named_and_nothing_is_written(tmp_path, demo_workdir):
    from lookalike.index.builder import IndexOptions
    from lookalike.pipeline.embed import EmbedConfig, EmbedError, run_embed

    workdir = tmp_path / "w"
    shutil.copytree(demo_workdir / "models", workdir / "models")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbedError, match=r"no files found in .*empty/\*\*; no index published"):
        run_embed(EmbedConfig(workdir=str(workdir), corpus=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match=r"target_recall must be in \(0, 1\], got 2"):
        run_embed(EmbedConfig(workdir=str(workdir), corpus=str(tmp_path / "empty"), index=IndexOptions(target_recall=2)))
    assert len(list((workdir / "embeddings").iterdir())) == 1  # the empty corpus's run; the bad option wrote nothing


def test_output_piped_into_a_reader_that_stops_early_is_not_a_traceback(demo_workdir):
    proc = subprocess.Popen([lookalike_exe(), "versions", "list", "--json", "--workdir", str(demo_workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has read enough, before the command writes
    stderr = proc.communicate(timeout=120)[1].decode()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-2000:]
    assert proc.returncode == 141


def test_store_written_by_root_is_readable_by_another_user_and_denials_name_the_file():
    """Pointer files follow the umask (a server as another user reads them); a file it may
    not read is a one-line error naming it, not a traceback."""
    import os
    import tempfile

    from lookalike.model.store import Store

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as another user")
    root = Path(tempfile.mkdtemp(prefix="lookalike-perm-", dir="/tmp"))
    old = os.umask(0o022)
    try:
        root.chmod(0o755)
        store = Store.at(root / "store")
        store.index_dir("i-1").mkdir(parents=True)
        (store.index_dir("i-1") / "manifest.json").write_text("{}")
        store.set_current_index("i-1")

        def as_nobody(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", lookalike_exe(),
                                   *args], capture_output=True, text=True, timeout=120, cwd="/tmp", check=False)

        listed = as_nobody("versions", "list", "--workdir", str(store.root))
        assert listed.returncode == 0 and listed.stdout.startswith("* i-1"), listed.stderr[-2000:]
        (store.root / "CURRENT").chmod(0o600)  # as a store written with mkstemp's mode was
        denied = as_nobody("versions", "list", "--workdir", str(store.root))
        assert denied.returncode == 1 and "Traceback" not in denied.stderr
        assert f"lookalike versions: error: permission denied: {store.root / 'CURRENT'}" in denied.stderr
    finally:
        os.umask(old)
        shutil.rmtree(root, ignore_errors=True)


def test_a_reindex_stopped_before_any_step_still_names_what_is_served(tmp_path, indexed_store):
    """The outcome line of a locked or read-only store says which version stays served."""
    from lookalike.index.searcher import ItemIndex
    from lookalike.pipeline.cli_store import served_fields

    version = indexed_store.current_index()
    model = ItemIndex.load(indexed_store.index_dir(version)).model_version
    assert served_fields(str(indexed_store.root)) == {"previous_index": version, "current_model": model}
    assert served_fields(str(tmp_path / "no-store")) == {}
    (tmp_path / "CURRENT").write_text("i-gone\n")
    assert served_fields(str(tmp_path)) == {"previous_index": "i-gone"}  # its manifest cannot be read


def test_lock_conflict_has_its_own_exit_code_and_json_line(tmp_path):
    """Cron must tell 'another run is at work' from a failure; log lines carry the date."""
    import re

    from lookalike.model.store_lock import StoreLock

    with StoreLock(tmp_path):
        out = run_cli("reindex", "--workdir", str(tmp_path), timeout=120)
        assert out.returncode == 75, out.stderr[-2000:]
        assert len(out.stdout.splitlines()) == 1  # one JSON line: `tail -1 reindex.log | jq` reads it
        report = json.loads(out.stdout)
        assert report["outcome"] == "locked" and report["exit_code"] == 75 and "another run holds" in report["reason"]
        assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING lookalike: reindex skipped", out.stderr, re.MULTILINE), out.stderr
        out = run_cli("versions", "rollback", "--workdir", str(tmp_path), timeout=120)
        assert out.returncode == 75 and "another run holds" in out.stderr, out.stderr[-2000:]


@pytest.fixture(scope="module")
def tagged_url(tagged_store):
    """The real server on 127.0.0.1 over conftest's tiny store with metadata (source, tags)."""
    from lookalike.serving.app import create_app
    from lookalike.serving.backend import load_backend
    from lookalike.serving.server import serve_in_thread

    backend = load_backend(tagged_store.root)
    with serve_in_thread(create_app(lambda: backend)) as url:
        yield url, backend


def test_query_takes_a_negative_first_vector_value_and_an_address_without_scheme(tagged_url, capsys):
    from lookalike.pipeline.cli import main

    url, backend = tagged_url
    vector = -next(v for v in backend.index.embeddings if v[0] > 0)  # "-0.2,..." looks like an option to argparse
    text = ",".join(f"{v:.6f}" for v in vector)
    assert text.startswith("-")
    assert main(["query", "--url", url, "--vector", text, "-k", "2", "--json"]) == 0
    spaced = json.loads(capsys.readouterr().out)
    assert spaced["query"]["dim"] == len(vector) and len(spaced["results"]) == 2
    assert main(["query", "--url", url, f"--vector={text}", "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == spaced["results"]
    assert main(["query", "--url", url.removeprefix("http://"), "--id", "3/digit_0003.png", "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    with pytest.raises(SystemExit):
        main(["query", "--vector", "--json"])  # not numbers: still an option, so --vector lacks its value
    assert "argument --vector: expected one argument" in capsys.readouterr().err
    code = main(["query", "--url", url, "--id", "-x.png", "-k", "2"])  # an id may start with '-': asked for, not refused
    err = capsys.readouterr().err
    assert code == 1 and "'-x.png'" in err and "expected one argument" not in err, (code, err)
    for typed in (["-k", "2"], ["-k3"], ["--js"], ["--json"]):  # one of query's options (or its abbreviation)
        with pytest.raises(SystemExit):
            main(["query", "--url", url, "--id", *typed])
        assert "argument --id: expected one argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["query", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--vector -0.1,0.2 or --vector=-0.1,0.2" in help_text and "http:// is assumed" in help_text


def test_query_table_shows_item_metadata(tagged_url, capsys, digit_metadata):
    from lookalike.pipeline.cli import main

    url, _ = tagged_url
    assert main(["query", "--url", url, "--id", "3/digit_0003.png", "-k", "5", "--tag", "three"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-1] == "metadata"
    for line in lines[2:]:
        item_id = line.split()[1]
        assert line.endswith("  web #odd #three"), (line, digit_metadata(item_id))


def test_a_job_stopped_while_its_encoder_compiles_exits_143_not_an_abort(tmp_path, demo_workdir):
    """SIGTERM as soon as embed starts, while its encoder still compiles on the preload thread:
    the job stops with its own status (143), not "terminate called ... FATAL: exception not
    rethrown" (134) from tearing the interpreter down under a thread inside XLA (2 of 4 runs
    aborted before the console script skipped that teardown after a failed or stopped job)."""
    import signal

    shutil.copytree(demo_workdir / "models", tmp_path / "models")  # the demo's model: compiling it takes a while
    for attempt in range(3):
        job = subprocess.Popen([lookalike_exe(), "embed", "--workdir", str(tmp_path), "--corpus",
                                str(demo_workdir / "corpus"), "--no-publish", "--run-name", f"stopped-{attempt}"],
                               stderr=subprocess.PIPE, text=True)
        for line in job.stderr:
            if "embedding " in line:  # listed: the encoder is compiling meanwhile
                job.send_signal(signal.SIGTERM)
                break
        stderr = job.stderr.read()
        assert job.wait(timeout=120) == 143, stderr[-2000:]
        assert "FATAL" not in stderr and "terminate called" not in stderr, stderr[-2000:]
        assert "embed stopped by signal 15" in stderr


def test_reindex_set_is_checked_against_the_served_models_config(indexed_store, tmp_path):
    """Without --config, reindex trains from the served model's config (here the tiny preset,
    two conv widths: image_size=4 fits), so its --set is checked against that, not against
    the digits preset (three widths: image_size must be at least 8), which an empty store uses."""
    from lookalike.pipeline.cli import bad_train_overrides, build_parser

    def problem(workdir: Path, *overrides: str) -> str | None:
        args, _ = build_parser().parse_known_args(
            ["reindex", "--workdir", str(workdir), *[a for o in overrides for a in ("--set", o)]])
        return bad_train_overrides(args)

    assert problem(indexed_store.root, "image_size=4") is None
    assert "image_size=2: the conv encoder halves it 2 times" in problem(indexed_store.root, "image_size=2")
    assert "image_size=4: the conv encoder halves it 3 times" in problem(tmp_path / "empty", "image_size=4")


@pytest.mark.parametrize("command, when", [(["embed", "--no-publish"], "cli-started"),
                                           (["reindex", "--set", "num_steps=2"], "cli-parsed")])  # checking --set
def test_sigterm_before_a_job_handles_it_gives_one_line_and_143(trained_store, tmp_path, command, when):
    """SIGTERM in the seconds a job spends importing Beam and JAX (or checking its --set
    overrides), before its own stop handling: one line naming the command and the signal,
    then death by the signal (status 143 in a shell), nothing written (it used to vanish
    silently). In-process, main() leaves the caller's SIGTERM handler as it was."""
    import os
    import signal

    from lookalike.pipeline.cli import main

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root, workdir)
    exe = str(Path(sys.executable).with_name("lookalike"))
    job = subprocess.run([exe, command[0], "--workdir", str(workdir), *command[1:]], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "LOOKALIKE_FAILPOINT": f"{when}:SIGTERM"})
    assert job.returncode == -signal.SIGTERM, job.stderr[-2000:]  # killed by it, as by default (143 in a shell)
    assert job.stderr.strip().endswith(f"lookalike {command[0]}: terminated (SIGTERM)"), job.stderr[-2000:]
    assert not (workdir / "embeddings").exists() and not (workdir / "reports").exists()
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--workdir", str(tmp_path / "none"), "--config", "tiny"]) == 1  # no data: fails at once
    assert signal.getsignal(signal.SIGTERM) is before
