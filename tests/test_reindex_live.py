"""reindex under a live server: the Done-when scenario of the reindex issue.

A real ``lookalike serve`` process follows CURRENT while a client thread keeps asking it
for neighbours. Two reindex runs on a growing corpus (the second embeds only the new
media), a worse candidate rejected, a rollback that restores the earlier answers and a
SIGKILLed run: the server switches versions and never fails a request.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lookalike.model.config import apply_overrides
from lookalike.model.store import Store
from lookalike.pipeline.reindex import ReindexConfig, run_reindex
from lookalike.pipeline.versions import rollback


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hammer(threading.Thread):
    """Asks the server for neighbours of ``ids`` until stopped; counts failures (bounded)."""

    def __init__(self, url: str, ids: list[str], max_requests: int = 20_000, max_s: float = 600):
        super().__init__(daemon=True)
        self.url, self.ids, self.max_requests, self.max_s = url, ids, max_requests, max_s
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        started = time.monotonic()
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self.stop.is_set() and i < self.max_requests and time.monotonic() - started < self.max_s:
                item_id = self.ids[i % len(self.ids)]
                i += 1
                try:
                    r = client.get(f"{self.url}/v1/items/{item_id}/similar", params={"k": 5})
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                time.sleep(0.005)


@pytest.fixture
def live(tmp_path, indexed_store):
    store = Store.at(tmp_path / "store")
    shutil.copytree(indexed_store.root, store.root)
    port = free_port()
    exe = str(Path(sys.executable).with_name("lookalike"))
    proc = subprocess.Popen([exe, "serve", "--workdir", str(store.root), "--port", str(port)],
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    yield store, url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def served_version(url: str) -> str:
    return httpx.get(f"{url}/v1/info", timeout=10).json()["index_version"]


def wait_for_version(url: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served_version(url) == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"server still serves {served_version(url)}, expected {version}")


def served_answers(url: str, ids: list[str]) -> dict[str, list[str]]:
    return {i: [r["id"] for r in httpx.get(f"{url}/v1/items/{i}/similar", params={"k": 5}).json()["results"]] for i in ids}


def test_reindex_twice_under_a_live_server(live, tiny_config):
    store, url = live
    info = httpx.get(f"{url}/v1/info").json()
    ids = [p.relative_to(store.corpus_dir).as_posix() for p in sorted(store.corpus_dir.rglob("*.png"))[:: 40]]
    assert served_version(url) == store.current_index() == info["index_version"]
    before = served_answers(url, ids)
    first_version = store.current_index()
    hammer = Hammer(url, ids)
    hammer.start()
    try:
        first = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, force=True))
        assert first.outcome == "promoted", first.reason
        wait_for_version(url, first.new_index)
        for i in range(3):  # the corpus grows
            Image.new("L", (32, 32), 40 + 60 * i).save(store.corpus_dir / "5" / f"grown_{i}.png")
        second = run_reindex(ReindexConfig(workdir=str(store.root), train=tiny_config, min_improvement=1.0))
        assert second.outcome == "corpus_updated" and second.metrics["embed"]["embedded"] == 3, second.reason
        wait_for_version(url, second.new_index)
        worse = apply_overrides(tiny_config, ["num_steps=1", "embed_dim=4"])
        rejected = run_reindex(ReindexConfig(workdir=str(store.root), train=worse))
        assert rejected.outcome == "kept_current" and rejected.metrics["candidate_accepted"] is False
        assert served_version(url) == second.new_index
        exe = str(Path(sys.executable).with_name("lookalike"))
        killed = subprocess.run([exe, "reindex", "--workdir", str(store.root), "--config", "tiny", "--force"],
                                env={**os.environ, "LOOKALIKE_FAILPOINT": "promote"}, capture_output=True, timeout=600)
        assert killed.returncode == -signal.SIGKILL
        assert served_version(url) == second.new_index
        rollback(store)  # second -> first reindex's version
        assert store.current_index() == first.new_index
        rollback(store)  # -> the version served before the first reindex
        assert store.current_index() == first_version
        wait_for_version(url, first_version)
        assert served_answers(url, ids) == before
    finally:
        hammer.stop.set()
        hammer.join(timeout=60)
    assert hammer.ok > 50 and not hammer.failures, hammer.failures[:5]
