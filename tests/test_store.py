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


def test_atomic_write_replaces_whole_file(tmp_path):
    atomic_write_text(tmp_path / "p", "first\n")
    atomic_write_text(tmp_path / "p", "second\n")
    assert (tmp_path / "p").read_text() == "second\n"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_version_names_cannot_escape_the_store(bad):
    with pytest.raises(ValueError):
        check_version_name(bad)


def test_remote_store_is_refused_clearly():
    with pytest.raises(ValueError, match="only local paths"):
        Store.at("gs://bucket/lookalike")
