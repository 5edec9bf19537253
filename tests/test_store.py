import os
import re
import stat
from pathlib import Path

import pytest

from lookalike.model.store import Store, StoreError, atomic_write_text, check_version_name


def test_pointer_errors_say_which_step_to_run(tmp_path):
    store = Store.at(tmp_path / "missing")
    with pytest.raises(StoreError, match="lookalike demo"):
        store.require_current_index()
    with pytest.raises(StoreError, match="lookalike train"):
        store.require_model()
    store.root.mkdir()
    with pytest.raises(StoreError, match="lookalike embed"):
        store.require_current_index()


def test_current_only_points_at_complete_index(tmp_path):
    store = Store.at(tmp_path)
    with pytest.raises(StoreError, match="not complete"):
        store.set_current_index("i-1")
    store.index_dir("i-1").mkdir(parents=True)
    (store.index_dir("i-1") / "manifest.json").write_text("{}")
    store.set_current_index("i-1")
    assert store.current_index() == "i-1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".CURRENT")]  # no temp files left
    (store.index_dir("i-1") / "manifest.json").unlink()  # deleted since: one message, one set of remedies
    from lookalike.pipeline.versions import served_unusable

    with pytest.raises(StoreError) as lost:
        store.require_current_index()
    said = str(served_unusable(store, "i-1", lost.value))
    assert said == (f"CURRENT names index 'i-1' but {store.index_dir('i-1')} is missing or incomplete (no manifest.json): "
                    f"run `lookalike versions rollback --workdir {tmp_path}` to serve an earlier version, or "
                    f"`lookalike embed --workdir {tmp_path}` to publish a new one")


def test_atomic_write_replaces_whole_file(tmp_path):
    atomic_write_text(tmp_path / "p", "first\n")
    atomic_write_text(tmp_path / "p", "second\n")
    assert (tmp_path / "p").read_text() == "second\n"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_version_names_cannot_escape_the_store(bad):
    with pytest.raises(ValueError):
        check_version_name(bad)


@pytest.mark.parametrize("name, reason", [
    ("x" * 300, "300 characters, at most 128"),
    ("sp ace", "' ' not allowed"),
    ("a/b", "'/' not allowed"),
    (".hidden", "it must start with an ASCII letter or digit"),
    ("ü-1", "it must start with an ASCII letter or digit"),
    ("a-ü", "'ü' not allowed"),
    ("", "it is empty"),
])
def test_a_bad_name_is_refused_with_its_reason(name, reason):
    with pytest.raises(ValueError, match=re.escape(f"({reason}): use ASCII letters, digits")) as caught:
        check_version_name(name, "run name")
    assert str(caught.value).startswith("invalid run name")


def test_remote_store_is_refused_clearly():
    with pytest.raises(ValueError, match="only local paths"):
        Store.at("gs://bucket/lookalike")


def test_garbled_current_names_the_file_and_how_to_repair(tmp_path, caplog):
    store = Store.at(tmp_path)
    (tmp_path / "CURRENT").write_text("../etc\n")
    with pytest.raises(StoreError, match=r"CURRENT is garbled: invalid version name '\.\./etc'.*versions promote"):
        store.current_index()
    with caplog.at_level("WARNING", logger="lookalike.model.store"):
        assert store.current_index_or_none() is None
    assert str(tmp_path / "CURRENT") in caplog.text


def test_set_current_records_history_and_truncated_lines_are_skipped(tmp_path, caplog):
    store = Store.at(tmp_path)
    for v in ("i-1", "i-2"):
        store.index_dir(v).mkdir(parents=True)
        (store.index_dir(v) / "manifest.json").write_text("{}")
        store.set_current_index(v, reason=f"test {v}")
    with store.history_path.open("a") as f:
        f.write('{"version": "i-3", "unix')  # a crash mid-write
    with caplog.at_level("WARNING", logger="lookalike.model.store"):
        entries = store.history()
    assert [(e["version"], e["reason"]) for e in entries] == [("i-1", "test i-1"), ("i-2", "test i-2")]
    assert f"{store.history_path} line 3" in caplog.text
    store.set_current_index("i-1", reason="after the crash")  # not glued onto the truncated line
    assert [e["reason"] for e in store.history()][-1] == "after the crash"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_pointer_files_get_the_umask_mode_like_open(tmp_path, umask, mode):
    """A server running as another user must be able to read CURRENT (mkstemp made it 0600)."""
    old = os.umask(umask)
    try:
        store = Store.at(tmp_path)
        store.index_dir("i-1").mkdir(parents=True)
        (store.index_dir("i-1") / "manifest.json").write_text("{}")
        store.set_current_index("i-1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "CURRENT").stat().st_mode) == mode


def test_resolve_in_store(tmp_path) -> None:
    from lookalike.model.store import resolve_in_store

    root = tmp_path / "new"
    (root / "corpus" / "3").mkdir(parents=True)
    (root / "corpus" / "3" / "x.png").write_bytes(b"x")
    assert resolve_in_store("thumbnails/ab/c.jpg", root) == root / "thumbnails" / "ab" / "c.jpg"
    assert resolve_in_store("/gone/old/corpus/3/x.png", root) == root / "corpus" / "3" / "x.png"  # moved store
    assert resolve_in_store("/gone/old/corpus/3/y.png", root) == Path("/gone/old/corpus/3/y.png")  # not there either
    assert resolve_in_store("/gone/photos/3/x.png", root) == Path("/gone/photos/3/x.png")  # outside the store's folders
    existing = tmp_path / "elsewhere.png"
    existing.write_bytes(b"x")
    assert resolve_in_store(existing, root) == existing


def test_a_mistyped_version_names_the_existing_ones_newest_first(tmp_path):
    """`embed --model m-nope`: not "train again" when models exist, but which ones (at most 5 named)."""
    store = Store.at(tmp_path)
    with pytest.raises(StoreError, match="run `lookalike train"):
        store.require_model("m-nope")  # nothing trained yet: training is the advice
    for i in range(7):
        (store.model_dir(f"m-{i}")).mkdir(parents=True)
        (store.model_dir(f"m-{i}") / "model.json").write_text("{}")
        os.utime(store.model_dir(f"m-{i}") / "model.json", (1_000_000 + i, 1_000_000 + i))
    store.model_dir("m-half").mkdir()  # no model.json: not a version
    with pytest.raises(StoreError) as typo:
        store.require_model("m-nope")
    assert str(typo.value) == (f"no model version 'm-nope' in {store.models_dir}: the existing model versions "
                               "(7 in all, newest first): m-6, m-5, m-4, m-3, m-2, ...")
    with pytest.raises(StoreError, match="'m-half' is missing or incomplete .* run `lookalike train"):
        store.require_model("m-half")  # there but incomplete: trained again
    assert store.require_model("m-3") == store.model_dir("m-3")
