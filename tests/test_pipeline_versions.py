"""Promotion's checks (``pipeline.versions.check_version``) on indexes a real collection makes."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest


def test_an_item_with_a_byte_identical_twin_passes_the_smoke_query(tmp_path, indexed_store):
    """A backup copy of a photo (``IMG_1 (1).jpg``) is embedded once and listed under both
    paths, so searching by the probe's embedding may find its twin first: that is the right
    answer, not a broken index, and the version is promoted."""
    from lookalike.index.builder import build_and_publish
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.store import Store
    from lookalike.pipeline.reindex_checks import canary_self_retrieval
    from lookalike.pipeline.versions import check_version, promote

    shutil.copytree(indexed_store.root, tmp_path / "store")
    store = Store.at(tmp_path / "store")
    served = ItemIndex.load(store.require_current_index())
    n = 40
    embeddings = np.concatenate([served.embeddings[:n], served.embeddings[:n]])  # each copy first, then its original
    ids = [f"copies/{i:02d}.png" for i in range(n)] + [f"originals/{i:02d}.png" for i in range(n)]
    hashes = [f"{i:064x}" for i in range(n)] * 2
    version = build_and_publish(store, embeddings, pa.table({"id": ids, "content_hash": hashes}),
                                model_version=served.model_version, make_current=False)
    index = ItemIndex.load(store.index_dir(version))
    probe = index.items[n]["id"]  # the middle item: the first original
    assert probe == "originals/00.png"
    assert index.search(index.embeddings[n], k=1)[0][0].id == "copies/00.png"  # what the check now accepts
    assert check_version(store, version)["count"] == 2 * n
    assert canary_self_retrieval(store, index, count=2 * n) == 1.0  # reindex's validation: copies first are right too
    promote(store, version)
    assert store.current_index() == version


def test_the_smoke_query_refuses_an_index_that_finds_another_picture(tmp_path, indexed_store):
    """The same embeddings under different content hashes (a collapsed model: everything alike):
    the twin found first is another picture, and the version is refused, naming both."""
    from lookalike.index.builder import build_and_publish
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.store import Store
    from lookalike.pipeline.versions import PromotionError, check_version

    shutil.copytree(indexed_store.root, tmp_path / "store")
    store = Store.at(tmp_path / "store")
    served = ItemIndex.load(store.require_current_index())
    embeddings = np.repeat(served.embeddings[:1], 20, axis=0)
    ids = [f"x/{i:02d}.png" for i in range(20)]
    version = build_and_publish(store, embeddings, pa.table({"id": ids, "content_hash": [f"{i:064x}" for i in range(20)]}),
                                model_version=served.model_version, make_current=False)
    with pytest.raises(PromotionError, match=r"stored embedding of item 'x/10.png' found 'x/\d\d.png', another picture"):
        check_version(store, version)


def test_prune_deletes_the_thumbnails_nothing_kept_lists_but_never_recent_ones(tmp_path, indexed_store, monkeypatch):
    """Files deleted from a collection left their thumbnails forever, so `--keep` did not bound
    the store. Prune deletes those no index version or embedding run left lists; a thumbnail
    made in the last hour may be a running `embed --no-publish`'s and stays."""
    import lookalike.pipeline.thumbnails as thumbnails
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.store import Store
    from lookalike.pipeline.versions import prune

    shutil.copytree(indexed_store.root, tmp_path / "store", symlinks=True)
    store = Store.at(tmp_path / "store")
    served = ItemIndex.load(store.require_current_index())
    listed = {store.root / t for t in served.items.table.column("thumbnail").to_pylist()}
    assert listed and all(p.is_file() for p in listed)
    orphan = store.root / "thumbnails" / "zz" / ("f" * 40 + ".jpg")  # of a file deleted since
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"old picture")
    assert prune(store, keep=1) == [] and orphan.exists()  # made just now: maybe a running embed's
    monkeypatch.setattr(thumbnails, "PRUNE_GRACE_S", 0.0)
    assert prune(store, keep=1) == ["thumbnails: 1 file(s)"]
    assert not orphan.exists() and not orphan.parent.exists() and all(p.is_file() for p in listed)
    from lookalike.model.filelock import try_lock_folder

    orphan.parent.mkdir()
    orphan.write_bytes(b"old picture")
    live = store.embeddings_dir / "e-running"  # an embed --no-publish at work: its thumbnails are listed at its end
    live.mkdir()
    fd = try_lock_folder(live)
    try:
        assert prune(store, keep=1) == [] and orphan.exists()
        assert prune(store, keep=1, own_run=live) == ["thumbnails: 1 file(s)"]  # the caller's own run (embed --keep)
    finally:
        os.close(fd)
    (store.indexes_dir / store.current_index() / "shard-00000" / "items.parquet").write_bytes(b"garbled")
    orphan.parent.mkdir()
    orphan.write_bytes(b"old picture")
    assert prune(store, keep=1) == [] and orphan.exists()  # the thumbnails of a version are unknown: none deleted


def test_prune_deletes_cache_files_a_killed_run_left_half_written(tmp_path, indexed_store):
    """A run killed while it wrote a cache file leaves its temporary file (``.tmp-*``) behind;
    prune deletes those not written for an hour, never a live writer's, nor a finished file."""
    from lookalike.model.store import Store
    from lookalike.pipeline.versions import STALE_TEMP_S, prune

    shutil.copytree(indexed_store.root, tmp_path / "store", symlinks=True)
    store = Store.at(tmp_path / "store")
    cache, = [d for d in (store.embeddings_dir / "cache").iterdir() if d.is_dir()]
    finished = sorted(cache.glob("part-*.parquet"))
    assert finished
    stale = cache / ".tmp-0123abcd-part-0123abcd.parquet"
    live = cache / ".tmp-4567cdef-part-4567cdef.parquet"
    stale.write_bytes(b"PAR1 half")
    live.write_bytes(b"PAR1 half")
    old = os.stat(stale).st_mtime - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    assert prune(store, keep=1) == [f"embeddings/cache/{cache.name}: 1 unfinished file(s)"]
    assert not stale.exists() and live.exists() and all(p.is_file() for p in finished)


def test_an_unloadable_only_index_is_told_to_embed_again_not_to_roll_back(tmp_path, indexed_store):
    """Rollback and promote need another version: with none left (``versions prune --keep 1``),
    the way back is a new embed."""
    from lookalike.index.manifest import IndexLoadError
    from lookalike.model.store import Store
    from lookalike.pipeline.versions import served_unusable

    store = Store.at(tmp_path / "w")
    shutil.copytree(indexed_store.root, store.root)
    served = store.current_index()
    for other in store.indexes_dir.iterdir():
        if other.name != served:
            shutil.rmtree(other)
    alone = served_unusable(store, served, IndexLoadError("index file x does not match its manifest checksum"))
    assert isinstance(alone, IndexLoadError) and "versions rollback" not in str(alone)
    assert str(alone).endswith(f"the served index {served} cannot be loaded, and the store holds no other index "
                               f"version: run `lookalike embed --workdir {store.root}` (with the --corpus it was "
                               "embedded from) to build a new one (when its model is what cannot be loaded, "
                               "train one first with `lookalike train`)")
    shutil.copytree(store.index_dir(served), store.indexes_dir / "i-older")
    with_another = served_unusable(store, served, IndexLoadError("x"))
    assert f"run `lookalike versions rollback --workdir {store.root}`" in str(with_another)
