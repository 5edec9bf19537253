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


@pytest.mark.parametrize("flag", ["--batch-wait-ms", "--inline-max-ms"])
def test_negative_waits_name_the_flag(capsys, flag: str) -> None:
    code, err = run(capsys, "serve", flag, "-5")
    assert code == 2 and flag in err and "-5" in err and "max_wait_s" not in err, err


def test_unknown_flag_shows_serves_usage(capsys) -> None:
    code, err = run(capsys, "serve", "--prot", "8000")
    assert code == 2 and "usage: lookalike serve" in err and "--prot" in err, err
