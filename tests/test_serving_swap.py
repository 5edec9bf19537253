"""Hot swap, end to end: a live server follows the store's CURRENT pointer while clients
hammer it. New versions are published with the real index builder; broken ones
(tampered files, an unknown model) must be refused while the old version keeps
serving. Admin reload needs the token. Nothing is mocked.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

from lookalike.index.builder import build_and_publish
from lookalike.index.searcher import ItemIndex
from lookalike.model.store import Store
from lookalike.serving.app import create_app
from lookalike.serving.backend import load_backend
from lookalike.serving.server import serve_in_thread
from lookalike.serving.swap import BackendSlot, StoreReloader, without_store_root

QUERY_ID = "3/digit_0003.png"
TOKEN = "test-admin-token-123"
WATCH_S = 0.1


@pytest.fixture()
def store(indexed_store: Store, tmp_path: Path) -> Store:
    """A private, writable copy of conftest's tiny indexed store."""
    root = tmp_path / "store"
    shutil.copytree(indexed_store.root, root, symlinks=True)
    return Store.at(root)


def publish_subset(store: Store, count: int, model_version: str | None = None, make_current: bool = True) -> str:
    """Publish a new index holding ``count`` items of the store's first (Beam-built) index."""
    first = min(p for p in store.indexes_dir.iterdir() if p.name.startswith("i-"))
    index = ItemIndex.load(first)
    keep = sorted(range(count), key=lambda r: index.items[r]["id"])
    if index.row_of(QUERY_ID) not in keep:
        keep[-1] = index.row_of(QUERY_ID)
    items = pa.Table.from_pylist([index.items[r] for r in keep])
    return build_and_publish(
        store, index.embeddings[keep], items, model_version=model_version or index.model_version, make_current=make_current
    )


@pytest.fixture()
def live(store: Store) -> Iterator[tuple[str, Store]]:
    app = create_app(
        lambda: load_backend(store.root), reloader=StoreReloader(store.root), watch_interval_s=WATCH_S, admin_token=TOKEN
    )
    with serve_in_thread(app) as url:
        yield url, store


def wait_for(check, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_swap_under_load_fails_no_request(live, tmp_path: Path) -> None:
    url, store = live
    query_png = (store.corpus_dir / QUERY_ID).read_bytes()
    old = httpx.get(f"{url}/v1/info").json()
    vector = ItemIndex.load(store.require_current_index()).embeddings[0].tolist()
    failures: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def hammer(kind: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                if kind == "vector":
                    r = http.post("/v1/search/vector", json={"vector": vector, "k": 5})
                elif kind == "image":
                    r = http.post("/v1/search/image?k=5", content=query_png)
                else:
                    r = http.get(f"/v1/items/{QUERY_ID}/similar", params={"k": 5})
                if r.status_code != 200 or len(r.json()["results"]) != 5:
                    failures.append(f"{kind}: {r.status_code} {r.text[:200]}")
                else:
                    seen.append(r.json()["index_version"])

    threads = [threading.Thread(target=hammer, args=(kind,)) for kind in ("vector", "image", "similar", "vector")]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(seen) > 20)
        new_version = publish_subset(store, 120)
        info = wait_for(lambda: (i := httpx.get(f"{url}/v1/info").json())["index_version"] == new_version and i)
        count_at_swap = len(seen)
        wait_for(lambda: len(seen) > count_at_swap + 20)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    assert info["item_count"] == 120 and info["reload_count"] == 1 and info["last_reload_error"] is None
    assert set(seen) == {old["index_version"], new_version}
    assert seen[-1] == new_version
    metrics = httpx.get(f"{url}/metrics").text
    assert f'lookalike_index_info{{index_version="{new_version}"' in metrics
    assert 'lookalike_reloads_total{outcome="swapped"} 1.0' in metrics
    assert 'outcome="unchanged"' not in metrics  # the watcher's many checks of an unchanged CURRENT are no reloads


def tamper(store: Store, version: str) -> None:
    parquet = next(store.index_dir(version).rglob("items.parquet"))  # wherever the index format keeps it
    with parquet.open("ab") as f:
        f.write(b"tampered")


def test_broken_versions_are_refused_and_old_keeps_serving(live) -> None:
    url, store = live
    http = httpx.Client(base_url=url, timeout=30)
    served = http.get("/v1/info").json()["index_version"]

    def refused(reason: str) -> dict:
        info = wait_for(lambda: reason in ((i := http.get("/v1/info").json())["last_reload_error"] or "") and i)
        assert info["index_version"] == served
        r = http.get(f"/v1/items/{QUERY_ID}/similar", params={"k": 3})
        assert r.status_code == 200 and r.json()["index_version"] == served
        return info

    # A tampered index: the checksum check refuses it.
    bad = publish_subset(store, 100, make_current=False)
    tamper(store, bad)
    store.set_current_index(bad)
    refused("does not match its manifest checksum")
    assert "refused" in http.get("/metrics").text

    # An index built by a model the store does not have.
    unknown_model = publish_subset(store, 100, model_version="m-000000000000")
    info = refused("m-000000000000")
    assert unknown_model in info["last_reload_error"]

    # Then a good version swaps in and clears the error.
    good = publish_subset(store, 110)
    info = wait_for(lambda: (i := http.get("/v1/info").json())["index_version"] == good and i)
    assert info["last_reload_error"] is None and info["item_count"] == 110
    http.close()


def test_admin_reload_needs_the_token(live) -> None:
    url, store = live
    http = httpx.Client(base_url=url, timeout=30)
    no_header = http.post("/v1/admin/reload")
    assert no_header.status_code == 401 and "Bearer" in no_header.json()["detail"]
    wrong = http.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = http.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "unchanged"
    # A forced reload of a broken version answers 409 with the reason.
    bad = publish_subset(store, 100, make_current=False)
    tamper(store, bad)
    store.set_current_index(bad)
    refused = http.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 409 and "checksum" in refused.json()["detail"]
    assert str(store.root) not in refused.text and f"indexes/{bad}/" in refused.json()["detail"]  # as /v1/info says it
    assert refused.json()["detail"] == http.get("/v1/info").json()["last_reload_error"]
    http.close()


def test_admin_is_disabled_without_a_token(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_ADMIN_TOKEN", raising=False)
    backend = load_backend(store.root)
    with serve_in_thread(create_app(lambda: backend, reloader=StoreReloader(store.root))) as url:
        r = httpx.post(f"{url}/v1/admin/reload", headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and "LOOKALIKE_ADMIN_TOKEN" in r.json()["detail"]
    monkeypatch.setenv("LOOKALIKE_ADMIN_TOKEN", TOKEN)
    with serve_in_thread(create_app(lambda: backend)) as url:  # token from the environment, but no store
        r = httpx.post(f"{url}/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404 and "nothing to reload" in r.json()["detail"]


def test_reloader_outcomes(store: Store) -> None:
    reloader = StoreReloader(store.root)
    slot = BackendSlot()
    first = reloader.reload(slot)
    assert first.status == "swapped" and slot.backend.index.version == store.current_index()
    assert reloader.reload(slot).status == "unchanged"
    encoder = slot.backend.encoder
    bad = publish_subset(store, 90, make_current=False)
    tamper(store, bad)
    store.set_current_index(bad)
    assert reloader.reload(slot).status == "refused"
    assert reloader.reload(slot).status == "skipped"  # not retried until CURRENT moves or forced
    assert reloader.reload(slot, force=True).status == "refused"
    assert slot.backend.index.version == first.index_version
    good = publish_subset(store, 95)
    outcome = reloader.reload(slot)
    assert outcome.status == "swapped" and slot.backend.index.version == good
    assert slot.backend.encoder is encoder  # same model: reused, not reloaded
    assert slot.last_reload_error is None and slot.reload_count == 1
    assert np.isfinite(slot.backend.index.embeddings).all()


def test_a_missing_current_pointer_is_refused_once(store: Store) -> None:
    reloader = StoreReloader(store.root)
    slot = BackendSlot()
    assert reloader.reload(slot).status == "swapped"
    (store.root / "CURRENT").unlink()
    first = reloader.reload(slot)
    assert first.status == "refused" and "no CURRENT pointer" in first.error
    assert reloader.reload(slot).status == "skipped"  # not logged again every watch interval
    assert slot.backend is not None  # still serving


def test_pointing_current_back_clears_the_reload_error(live) -> None:
    """After a refused version, CURRENT pointed back at the served one clears last_reload_error
    (the watcher, and POST /v1/admin/reload), which never shows the server's paths."""
    url, store = live
    http = httpx.Client(base_url=url, timeout=30)
    served = http.get("/v1/info").json()["index_version"]
    bad = publish_subset(store, 100, make_current=False)
    tamper(store, bad)
    store.set_current_index(bad)
    info = wait_for(lambda: (i := http.get("/v1/info").json())["last_reload_error"] and i)
    assert "checksum" in info["last_reload_error"]
    assert str(store.root) not in info["last_reload_error"], info["last_reload_error"]
    assert f"indexes/{bad}/" in info["last_reload_error"]
    store.set_current_index(served)  # back to the good one: the watcher clears the error
    wait_for(lambda: http.get("/v1/info").json()["last_reload_error"] is None)
    store.set_current_index(bad)
    wait_for(lambda: http.get("/v1/info").json()["last_reload_error"])
    store.set_current_index(served)
    reload = http.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reload.status_code == 200 and reload.json()["status"] == "unchanged"
    assert http.get("/v1/info").json()["last_reload_error"] is None
    http.close()


def test_an_unchanged_reload_clears_a_refusal(store: Store) -> None:
    reloader, slot = StoreReloader(store.root), BackendSlot()
    served = reloader.reload(slot).index_version
    store.root.joinpath("CURRENT").unlink()
    assert reloader.reload(slot).status == "refused"
    assert slot.last_reload_error == "no CURRENT pointer in the store"  # no server path
    store.set_current_index(served)
    assert reloader.reload(slot, force=True).status == "unchanged"  # as POST /v1/admin/reload does
    assert slot.last_reload_error is None


def test_a_suggested_command_in_a_reload_error_still_reads_as_a_command() -> None:
    """Clients see no server paths, but `--workdir the store` was no command anyone could run."""
    root = "/srv/photos/store"
    text = (f"cannot read the CURRENT pointer in {root}: {root}/CURRENT is garbled; repair it with "
            f"`lookalike versions promote VERSION --workdir {root}`")
    assert without_store_root(text, root + "/") == ("cannot read the CURRENT pointer in the store: CURRENT is garbled; "
                                                    "repair it with `lookalike versions promote VERSION --workdir DIR`")
