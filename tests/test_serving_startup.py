"""``serve`` accepts connections at once and loads in the background: /healthz answers 200
and /readyz 503 while the model and index load, then 200; a failed first load stops the
server with its error (the CLI then exits non-zero). The real ``serve`` in a thread, on
127.0.0.1, with the tiny store from conftest and a load slowed down (or failing) on purpose."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

import lookalike.serving.server as server_module
from lookalike.model.store import Store, StoreError
from lookalike.serving.backend import load_backend
from lookalike.serving.client import ClientError, SearchClient

from .conftest import free_port  # noqa: TID252


def start(workdir, monkeypatch, load) -> tuple[str, threading.Thread, list, list]:
    servers, failures = [], []
    make = server_module.make_server

    def capturing_make_server(*args, **kwargs):
        servers.append(make(*args, **kwargs))
        return servers[-1]

    monkeypatch.setattr(server_module, "make_server", capturing_make_server)
    monkeypatch.setattr(server_module, "load_backend", load)
    port = free_port()

    def run() -> None:
        try:
            server_module.serve(workdir, port=port, log_level="warning", watch_interval_s=None)
        except BaseException as e:  # checked by the test
            failures.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{port}", thread, servers, failures


def wait_for(url: str, path: str, timeout_s: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url + path, timeout=5)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_health_answers_while_loading(indexed_store: Store, monkeypatch) -> None:
    loading = threading.Event()

    def slow_load(workdir, max_embed_batch):
        loading.wait(30)
        return load_backend(workdir, max_embed_batch)

    url, thread, servers, failures = start(indexed_store.root, monkeypatch, slow_load)
    try:
        assert wait_for(url, "/healthz").status_code == 200
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503 and "loading" in ready.json()["detail"]
        search = httpx.post(url + "/v1/search/vector", json={"vector": [1.0] * 8})
        assert search.status_code == 503 and "still loading" in search.json()["detail"]
        info = httpx.get(url + "/v1/info")
        assert info.status_code == 503 and "still loading" in info.json()["detail"]
        for answer in (ready, search, info):  # when to ask again (the web page's footer does)
            assert answer.headers["retry-after"] == "2", answer.headers
        with pytest.raises(ClientError, match="still loading") as refused:  # a client that does not wait
            SearchClient(url).info()
        assert refused.value.status == 503
        waited: list = []  # `lookalike query` right after `lookalike serve`: it asks again after Retry-After
        asker = threading.Thread(target=lambda: waited.append(SearchClient(url, retry_busy_s=30).info()))
        asker.start()
        time.sleep(0.5)
        assert not waited
        loading.set()
        asker.join(30)
        assert waited and waited[0]["index_version"] == indexed_store.current_index()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline and not failures
            time.sleep(0.05)
    finally:
        loading.set()
        if servers:
            servers[0].should_exit = True
        thread.join(30)
    assert not failures


def test_a_failed_first_load_stops_the_server(indexed_store: Store, monkeypatch) -> None:
    loading = threading.Event()

    def failing_load(workdir, max_embed_batch):
        loading.wait(30)
        raise StoreError("model m-x is missing: run `lookalike train`")

    url, thread, servers, failures = start(indexed_store.root, monkeypatch, failing_load)
    try:
        assert wait_for(url, "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").status_code == 503
        loading.set()
        thread.join(30)
    finally:
        loading.set()
        if servers and thread.is_alive():
            servers[0].should_exit = True
    assert not thread.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], StoreError), failures
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)


def test_the_server_imports_no_jax_before_it_listens() -> None:
    """`lookalike serve` listens (and answers /healthz) after importing FastAPI and uvicorn;
    JAX, Flax and orbax (2-3 s of imports) come with the model, in the background load, and
    Apache Beam never (the embed job's, ~1 s and pandas, grpc)."""
    import subprocess
    import sys

    code = ("import sys, lookalike.serving.server, lookalike.pipeline.cli; "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'tensorflow', 'scann', 'apache_beam') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_corrupt_index_is_one_error_line_with_how_to_recover(indexed_store: Store, tmp_path, monkeypatch,
                                                               caplog) -> None:
    """A first load that fails on a corrupt embeddings.npy: one ERROR line naming the file, the reason and
    `versions rollback`/`promote` (as reindex says it), the traceback only at DEBUG (-v); serve raises the same."""
    import logging
    import shutil

    from lookalike.index.manifest import IndexLoadError

    workdir = tmp_path / "store"
    shutil.copytree(indexed_store.root, workdir)
    version = Store.at(workdir).current_index()
    shutil.copytree(workdir / "indexes" / version, workdir / "indexes" / "i-older")  # a version to roll back to
    embeddings = next((workdir / "indexes" / version).rglob("embeddings.npy"))
    embeddings.write_bytes(b"not the embeddings")
    caplog.set_level(logging.DEBUG, logger="lookalike")
    url, thread, servers, failures = start(workdir, monkeypatch, load_backend)
    thread.join(120)
    if thread.is_alive() and servers:
        servers[0].should_exit = True
    assert not thread.is_alive()
    hint = (f"the served index {version} cannot be loaded: run `lookalike versions rollback --workdir {workdir}` "
            f"(or `lookalike versions promote VERSION --workdir {workdir}`) to serve a working version")
    assert len(failures) == 1 and isinstance(failures[0], IndexLoadError), failures
    assert str(embeddings) in str(failures[0]) and hint in str(failures[0])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("lookalike")]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert str(embeddings) in message and "does not match its manifest checksum" in message and hint in message
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]  # the traceback, with -v


def test_retry_after_is_read_strictly_and_never_makes_a_busy_loop() -> None:
    """A proxy's Retry-After: 0 would make the client ask thousands of times; a header that is
    no count of seconds, or another status, is no invitation to ask again."""
    from lookalike.serving.client import MIN_RETRY_WAIT_S, retry_after_s

    def answer(status: int, value: str | None) -> httpx.Response:
        return httpx.Response(status, headers={} if value is None else {"retry-after": value.encode()})

    assert retry_after_s(answer(503, "2")) == 2.0 and retry_after_s(answer(503, " 3 ")) == 3.0
    assert retry_after_s(answer(503, "0")) == MIN_RETRY_WAIT_S == 0.5
    for value in ("\u00b2", "", "1.5", "-1", "Wed, 21 Oct 2026 07:28:00 GMT", None):
        assert retry_after_s(answer(503, value)) is None, value
    assert retry_after_s(answer(500, "2")) is None and retry_after_s(answer(429, "2")) is None
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="retry_busy_s must be a finite number of seconds >= 0"):
            SearchClient("127.0.0.1:9", retry_busy_s=bad)
