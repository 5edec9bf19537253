"""``lookalike serve``'s argument and start-up errors name the problem (main() in process;
each case fails before a model is loaded)."""

from __future__ import annotations

import socket

import pytest

from lookalike.model.store import Store
from lookalike.pipeline.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("port", ["99999", "-1", "x"])
def test_port_out_of_range(capsys, port: str) -> None:
    code, err = run(capsys, "serve", "--port", port)
    assert code == 2 and "--port" in err and "Traceback" not in err and "OverflowError" not in err, err


def test_workdir_that_is_a_file(capsys, tmp_path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x")
    code, err = run(capsys, "serve", "--workdir", str(photo), "--port", "0")
    assert code == 2 and "is a file, not a folder" in err and "does not exist" not in err, err  # a usage error


@pytest.mark.parametrize("host, says", [
    ("nosuchhost.invalid", "is not a known name or address"),
    ("10.9.9.9", "is not an address of this machine"),
])
def test_unusable_host_is_named(capsys, indexed_store: Store, host: str, says: str) -> None:
    code, err = run(capsys, "serve", "--workdir", str(indexed_store.root), "--host", host, "--port", "0")
    assert code == 1 and says in err and "another server" not in err, err


def test_port_in_use_hints_at_another_server(capsys, indexed_store: Store) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(capsys, "serve", "--workdir", str(indexed_store.root), "--port", str(port))
    assert code == 1 and "another server" in err, err


@pytest.mark.parametrize("flag", ["--batch-wait-ms", "--inline-max-ms", "--watch-interval-s"])
def test_negative_waits_name_the_flag(capsys, flag: str) -> None:
    code, err = run(capsys, "serve", flag, "-5")
    assert code == 2 and flag in err and "-5" in err and "max_wait_s" not in err, err


def test_unknown_flag_shows_serves_usage(capsys) -> None:
    code, err = run(capsys, "serve", "--prot", "8000")
    assert code == 2 and "usage: lookalike serve" in err and "--prot" in err, err


@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_a_lost_current_on_a_store_that_served_names_the_version_to_promote(capsys, tmp_path, indexed_store: Store,
                                                                           damage: str) -> None:
    """Not "no published index: run `lookalike embed` first": its versions are all there."""
    import shutil

    store = Store.at(tmp_path / "store")
    shutil.copytree(indexed_store.root, store.root)
    served = store.current_index()
    if damage == "delete":
        (store.root / "CURRENT").unlink()
    else:
        (store.root / "CURRENT").write_text("\n")
    code, err = run(capsys, "serve", "--workdir", str(store.root), "--port", "0")
    assert code == 1 and "CURRENT is missing or empty, but this store has served versions" in err, err
    assert f"lookalike versions promote {served} --workdir {store.root}" in err and "lookalike embed" not in err, err


@pytest.mark.parametrize("quiet", [False, True])
def test_the_access_log_is_time_stamped_or_off(indexed_store: Store, quiet: bool) -> None:
    """One time-stamped line per request on stdout (so a failed request can be matched to a
    swap in the log), or none with --no-access-log."""
    import re
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from .conftest import free_port  # noqa: TID252

    port = free_port()
    exe = str(Path(sys.executable).with_name("lookalike"))
    proc = subprocess.Popen([exe, "serve", "--workdir", str(indexed_store.root), "--port", str(port),
                             *(["--no-access-log"] if quiet else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/info").status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    requests = [line for line in out.splitlines() if '"GET /v1/info HTTP/1.1" 200' in line]
    if quiet:
        assert requests == [], out[-2000:]
    else:
        assert len(requests) == 1 and re.match(rf"{stamp} INFO: +127\.0\.0\.1:\d+ - ", requests[0]), out[-2000:]
    uvicorn_lines = [line for line in err.splitlines() if "Uvicorn running" in line or "Shutting down" in line]
    assert uvicorn_lines and all(re.match(rf"{stamp} INFO: ", line) for line in uvicorn_lines), err[-2000:]


@pytest.mark.parametrize("value, ok", [("0", True), ("0.1", True), ("3600", True), ("1e-9", False), ("0.05", False)])
def test_the_watch_interval_is_never_or_at_least_a_tenth_of_a_second(capsys, value: str, ok: bool) -> None:
    """1e-9 kept a core busy polling CURRENT."""
    from lookalike.pipeline.cli import build_parser

    if ok:
        assert build_parser().parse_args(["serve", "--watch-interval-s", value]).watch_interval_s == float(value)
        return
    code, err = run(capsys, "serve", "--watch-interval-s", value)
    assert code == 2 and "--watch-interval-s" in err and "must be 0 (never) or from 0.1 to 3600 seconds" in err, err


def test_a_failed_first_load_is_said_once(indexed_store: Store, tmp_path) -> None:
    """A corrupt served index: `lookalike serve` exits 1 after one ERROR line naming the file
    and the remedy, not that line and then the same message again as the CLI's error."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import free_port  # noqa: TID252

    workdir = tmp_path / "store"
    shutil.copytree(indexed_store.root, workdir)
    version = Store.at(workdir).current_index()
    shutil.copytree(workdir / "indexes" / version, workdir / "indexes" / "i-older")  # a version to roll back to
    next((workdir / "indexes" / version).rglob("embeddings.npy")).write_bytes(b"not the embeddings")
    exe = str(Path(sys.executable).with_name("lookalike"))
    done = subprocess.run([exe, "serve", "--workdir", str(workdir), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if "does not match its manifest checksum" in line]
    assert len(said) == 1 and " ERROR lookalike.serving.app: loading the model and index failed: " in said[0], done.stderr
    assert f"the served index {version} cannot be loaded: run `lookalike versions rollback" in said[0]
