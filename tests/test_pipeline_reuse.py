"""Columnar item tables and --incremental reuse decided before the pipeline starts."""

import hashlib
import logging
import os
import shutil
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lookalike.pipeline.cache import (WriteFileIndexFn, file_index_table, load_cache_table, load_file_index,
                                      write_cache_table)
from lookalike.pipeline.embed import EmbedConfig, read_dead_letters, read_embeddings, run_embed
from lookalike.pipeline.reuse import list_files, plan_reuse
from lookalike.pipeline.thumbnails import thumbnail_path
from lookalike.pipeline.items import (concat_sorted, embedding_schema, embeddings_of, expand_items, items_of_batch, rows_table,
                                      shard_of, split_by_shard)


@pytest.fixture
def corpus_store(tmp_path, trained_store, digits_corpus):
    """A store with the tiny model and 3 digit classes as its corpus (no run yet)."""
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    for label in ("0", "1", "2"):
        shutil.copytree(digits_corpus / label, workdir / "corpus" / label)
    return workdir


def _no_beam(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was started")

    monkeypatch.setattr(beam, "Pipeline", refuse)


def test_items_table_has_one_row_per_path_and_frame_ids():
    metas = [
        {"source_hash": "a" * 64, "content_hash": "a" * 64, "kind": "image", "timestamp_s": None, "width": 8, "height": 9},
        {"source_hash": "b" * 64, "content_hash": "b" * 64 + "#t=1.500", "kind": "frame", "timestamp_s": 1.5,
         "width": 64, "height": 48},
    ]
    emb = np.arange(2 * 4, dtype=np.float32).reshape(2, 4)
    rows = rows_table(metas, emb, 4)
    take, uris = items_of_batch([{**metas[0], "uris": ["/c/x/a.png", "/c/y/copy.png"]}, {**metas[1], "uris": ["/c/v.mp4"]}])
    items = expand_items(rows, take, uris, root="/c", thumbnails_dir="/t", model_version="m-1", reused=False)
    assert items.schema == embedding_schema(4)
    assert items.column("id").to_pylist() == ["x/a.png", "y/copy.png", "v.mp4#t=1.500"]
    assert items.column("group").to_pylist() == [None, None, "v.mp4"]
    h = hashlib.sha256(("a" * 64).encode()).hexdigest()[:40]
    assert items.column("thumbnail").to_pylist()[0] == thumbnail_path("/t/", "a" * 64) == os.path.join("/t", h[:2], f"{h}.jpg")
    np.testing.assert_array_equal(embeddings_of(items), emb[[0, 0, 1]])
    parts = dict(split_by_shard(items, 3))
    merged = concat_sorted(list(parts.values()), items.schema)
    assert merged.column("id").to_pylist() == sorted(items.column("id").to_pylist())
    assert all(len(t) for t in parts.values()) and sum(len(t) for t in parts.values()) == 3
    assert all(shard_of(i, 3) == shard for shard, t in parts.items() for i in t.column("id").to_pylist())
    assert [(shard, t.equals(items)) for shard, t in split_by_shard(items, 1)] == [(0, True)]
    assert list(split_by_shard(items.slice(0, 0), 1)) == list(split_by_shard(items.slice(0, 0), 3)) == []
    assert concat_sorted([], items.schema).num_rows == 0


def test_unchanged_corpus_reuses_items_and_index_without_the_pipeline(corpus_store, monkeypatch):
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="first"))
    _no_beam(monkeypatch)
    again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="again", incremental=True))
    assert again.index_version == first.index_version  # CURRENT kept, nothing rebuilt
    assert (again.files_read, again.embedded, again.unchanged, again.items) == (0, 0, first.items, first.items)
    emb1, items1 = read_embeddings(corpus_store / "embeddings" / "first")
    emb2, items2 = read_embeddings(corpus_store / "embeddings" / "again")
    assert items2.column("id").to_pylist() == items1.column("id").to_pylist()
    assert items2.column("thumbnail").to_pylist() == items1.column("thumbnail").to_pylist()
    assert all(items2.column("reused").to_pylist())
    np.testing.assert_array_equal(emb2, emb1)
    versions = sorted(p.name for p in (corpus_store / "indexes").iterdir())
    assert versions == [first.index_version]


def test_unchanged_bad_files_are_reported_again_without_reading_and_current_is_kept(corpus_store, monkeypatch):
    good = next((corpus_store / "corpus" / "0").glob("*.png")).read_bytes()
    bad = corpus_store / "corpus" / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not a picture")
    (bad / "cut.png").write_bytes(good[: len(good) // 2])
    (bad / "README.txt").write_text("notes")
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="first", incremental=True))
    assert first.failed == 4
    reasons = {Path(r["uri"]).name: r for r in read_dead_letters(corpus_store / "embeddings" / "first")}
    _no_beam(monkeypatch)
    again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="again", incremental=True))
    assert again.index_version == first.index_version  # CURRENT kept: the same items
    assert (again.files_read, again.embedded, again.failed, again.items) == (0, 0, 4, first.items)
    letters = {Path(r["uri"]).name: r for r in read_dead_letters(corpus_store / "embeddings" / "again")}
    assert letters["README.txt"] == reasons["README.txt"]
    for name in ("empty.png", "text.jpg", "cut.png"):
        assert letters[name]["stage"] == reasons[name]["stage"] == "decode"
        assert letters[name]["reason"] == reasons[name]["reason"] + " (the same bytes failed in an earlier run)"
    monkeypatch.undo()
    (bad / "cut-copy.png").write_bytes((bad / "cut.png").read_bytes())  # new path, known bad bytes: read, not decoded
    third = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="third", incremental=True))
    assert (third.files_read, third.embedded, third.failed) == (1, 0, 5)
    letters = {Path(r["uri"]).name: r for r in read_dead_letters(corpus_store / "embeddings" / "third")}
    assert letters["cut-copy.png"]["reason"].endswith("(the same bytes failed in an earlier run)")


def test_unchanged_corpus_with_a_dangling_link_takes_the_fast_path_and_the_link_is_embedded_once_valid(
        corpus_store, monkeypatch):
    target = corpus_store / "elsewhere" / "x.png"
    os.symlink(target, corpus_store / "corpus" / "0" / "dangling.png")
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="first", incremental=True))
    assert first.failed == 1
    _no_beam(monkeypatch)
    again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="again", incremental=True))
    assert again.index_version == first.index_version  # CURRENT kept, the pipeline not started
    assert (again.files_read, again.embedded, again.failed, again.items) == (0, 0, 1, first.items)
    (letter,) = read_dead_letters(corpus_store / "embeddings" / "again")
    assert letter["uri"].endswith("0/dangling.png") and letter["stage"] == "read" and "No such file" in letter["reason"]
    monkeypatch.undo()
    target.parent.mkdir()
    shutil.copy(next((corpus_store / "corpus" / "1").glob("*.png")), target)  # the link is valid now
    third = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="third", incremental=True))
    assert (third.files_read, third.failed, third.items) == (1, 0, first.items + 1)


def test_start_line_and_summary_name_their_counts_alike_when_files_are_renamed_or_touched(corpus_store, caplog):
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="first", incremental=True, publish=False))
    pictures = sorted((corpus_store / "corpus" / "0").glob("*.png"))
    pictures[0].rename(pictures[0].with_name("renamed.png"))
    os.utime(pictures[1], (1_000_000, 1_000_000))  # touched: read again, its bytes found in the cache
    with caplog.at_level(logging.INFO, logger="lookalike"):
        again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="again", incremental=True, publish=False))
    total = first.files_matched
    assert (again.files_read, again.embedded, again.unchanged) == (2, 0, total)
    assert f"({total - 2} not read: same path, size, mtime and inode as cached; 0 known to fail)" in caplog.text
    assert f"reused from {total} file(s) whose bytes were embedded before," in caplog.text


def test_unchanged_corpus_with_other_index_options_builds_a_new_index(corpus_store, monkeypatch):
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="first"))
    _no_beam(monkeypatch)
    again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="again", incremental=True, num_shards=2))
    assert again.index_version != first.index_version and again.files_read == 0
    from lookalike.index.searcher import ItemIndex

    index = ItemIndex.load(corpus_store / "indexes" / again.index_version)
    assert len(index.manifest["shards"]) == 2 and len(index) == first.items


def test_items_cached_twice_are_reused_once(corpus_store):
    run_embed(EmbedConfig(workdir=str(corpus_store), run_name="a", publish=False))
    run_embed(EmbedConfig(workdir=str(corpus_store), run_name="b", publish=False))  # caches every item again
    (corpus_store / "corpus" / "2" / "new.png").write_bytes((corpus_store / "corpus" / "0").glob("*.png").__next__().read_bytes())
    rerun = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="c", publish=False, incremental=True))
    _, items = read_embeddings(corpus_store / "embeddings" / "c")
    ids = items.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == rerun.items and rerun.embedded == 0 and rerun.files_read == 1
    assert pa.compute.all(items.column("reused")).as_py()


def test_local_folder_listing_equals_beams_match(tmp_path):
    from apache_beam.io.filesystems import FileSystems

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.png", ".hidden.jpg", "top.txt"):
        (tmp_path / name).write_bytes(b"12345")
    ours = [(m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in list_files(f"{tmp_path}/**")]
    beams = sorted((m.path, m.size_in_bytes, m.last_updated_in_seconds)
                   for r in FileSystems.match([f"{tmp_path}/**"]) for m in r.metadata_list)
    assert ours == beams and len(ours) == 4
    assert [m.path for m in list_files(f"{tmp_path}/a/*.jpg")] == [f"{tmp_path}/a/x.jpg"]  # other patterns: Beam's match


def test_listing_follows_folder_links_once_and_keeps_dangling_links(tmp_path):
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "real" / "deep" / "a.jpg").write_bytes(b"1")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.jpg").write_bytes(b"22")
    os.symlink(tmp_path / "real", tmp_path / "corpus" / "linked")  # a linked folder: walked
    os.symlink(tmp_path / "corpus", tmp_path / "real" / "loop")  # a loop back: each folder once
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "corpus" / "dangling.jpg")
    listed = {m.path[len(str(tmp_path / "corpus")) + 1:]: (m.size_in_bytes, m.last_updated_in_seconds)
              for m in list_files(f"{tmp_path / 'corpus'}/**")}
    assert sorted(listed) == ["b.jpg", "dangling.jpg", "linked/deep/a.jpg"]
    assert listed["linked/deep/a.jpg"][0] == 1 and listed["dangling.jpg"] == (0, 0.0)


@pytest.mark.parametrize("pattern", ["*.jpg", "**/*.jpg", "sub/*.jpg"])
def test_a_glob_lists_a_dangling_link_to_be_dead_lettered(tmp_path, pattern):
    """Beam's local match drops a dangling link; a glob corpus lists it, as a folder does, so
    the run reports it (a dead letter naming where it points) instead of losing it."""
    from lookalike.pipeline.reuse import UnreadableFile

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"1")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "sub" / "dangling.jpg")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "top.jpg")
    os.symlink("..", tmp_path / "sub" / "up")  # link loops: never followed (two made a recursive glob endless)
    os.symlink(tmp_path, tmp_path / "sub" / "root")
    listed = {m.path: m for m in list_files(f"{tmp_path}/{pattern}")}
    expected = {"*.jpg": ["top.jpg"], "**/*.jpg": ["sub/a.jpg", "sub/dangling.jpg", "top.jpg"],
                "sub/*.jpg": ["sub/a.jpg", "sub/dangling.jpg"]}[pattern]
    assert sorted(p[len(str(tmp_path)) + 1:] for p in listed) == expected
    for path, m in listed.items():
        if path.endswith(("/dangling.jpg", "/top.jpg")):
            assert isinstance(m, UnreadableFile) and m.error.startswith("dangling symbolic link: its target")
        else:
            assert not isinstance(m, UnreadableFile)


@pytest.mark.parametrize("link_first", [True, False])
def test_a_folder_reached_directly_and_through_a_link_keeps_its_direct_path(tmp_path, link_first):
    """Adding ``alias -> real`` must not rename real/'s files (their ids), whichever is walked first."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if link_first:
        os.symlink(corpus / "real", corpus / "alias")  # made before its target: listed first on some filesystems
    (corpus / "real" / "deep").mkdir(parents=True)
    (corpus / "real" / "deep" / "a.jpg").write_bytes(b"1")
    if not link_first:
        os.symlink(corpus / "real", corpus / "alias")
    os.symlink(corpus / "real" / "deep", corpus / "alias-deep")
    listed = sorted(m.path[len(str(corpus)) + 1:] for m in list_files(f"{corpus}/**"))
    assert listed == ["real/deep/a.jpg"]


def test_file_index_chunks_as_tables_or_rows_land_in_one_index_file(tmp_path):
    """The chunked reader hands over file index rows as a table, the file-by-file reader as lists
    of rows: one index file holds both, and the newest entry of a path wins on load."""
    rows = [{"uri": f"/c/{i}.jpg", "size": 100 + i, "mtime_s": 1.5 * i, "source_hash": f"h{i}"} for i in range(5)]
    chunks = [file_index_table(rows[:3]), rows[3:]]
    (path,) = WriteFileIndexFn(str(tmp_path)).process((0, chunks))
    assert pq.read_table(path).num_rows == 5
    assert load_file_index(tmp_path) == {r["uri"]: (r["size"], r["mtime_s"], r["source_hash"], None) for r in rows}


def test_the_newest_cached_row_of_an_item_wins(tmp_path):
    """Rows cached by several runs (files in modification order) come back once each, with
    the embedding of the newest file."""
    def rows(value: float, hashes: list[str]) -> pa.Table:
        metas = [{"source_hash": h, "content_hash": h, "kind": "image", "timestamp_s": None, "width": 4, "height": 4}
                 for h in hashes]
        return rows_table(metas, np.full((len(hashes), 2), value, np.float32), 2)

    for age_s, (value, hashes) in enumerate([(3.0, ["a", "b"]), (2.0, ["b", "c"]), (1.0, ["a"])]):
        path = write_cache_table(str(tmp_path), rows(value, hashes))
        os.utime(path, (1_000_000 - age_s * 10, 1_000_000 - age_s * 10))  # the first written is the newest
    table = load_cache_table(tmp_path, 2)
    got = dict(zip(table.column("source_hash").to_pylist(), embeddings_of(table)[:, 0].tolist()))
    assert got == {"a": 3.0, "b": 3.0, "c": 2.0} and len(table) == 3


def _cache_rows(value: float, hashes: list[str]) -> pa.Table:
    metas = [{"source_hash": h, "content_hash": h, "kind": "image", "timestamp_s": None, "width": 4, "height": 4}
             for h in hashes]
    return rows_table(metas, np.full((len(hashes), 2), value, np.float32), 2)


def test_many_cache_files_read_in_one_scan_keep_file_order(tmp_path):
    """60 runs cached item "a" (and one item of their own): the newest file's row wins."""
    for i in range(60):
        path = write_cache_table(str(tmp_path), _cache_rows(float(i), ["a", f"own-{i}"]))
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # written in order i
    table = load_cache_table(tmp_path, 2)
    got = dict(zip(table.column("source_hash").to_pylist(), embeddings_of(table)[:, 0].tolist()))
    assert len(table) == 61 and got["a"] == 59.0 and got["own-7"] == 7.0


def test_a_torn_cache_file_is_skipped_and_the_rest_read(tmp_path, caplog):
    good = write_cache_table(str(tmp_path), _cache_rows(1.0, ["a", "b"]))
    torn = write_cache_table(str(tmp_path), _cache_rows(2.0, ["c"]))
    with open(torn, "r+b") as f:  # a crash mid-write: the footer is gone
        f.truncate(os.path.getsize(torn) // 2)
    os.utime(good, (1_000_000, 1_000_000))
    table = load_cache_table(tmp_path, 2)
    assert sorted(table.column("source_hash").to_pylist()) == ["a", "b"]
    assert f"ignoring unreadable cache file {torn}" in caplog.text


def test_video_frames_are_reused_only_for_the_same_frame_sampling(corpus_store, make_video):
    """--frame-interval-s (or the shot threshold) changed: an --incremental run samples the video
    again, and going back reuses the first sampling's frames, never a mix of both."""
    from lookalike.pipeline.video import FrameSampling

    (corpus_store / "corpus" / "clips").mkdir()
    make_video(corpus_store / "corpus" / "clips" / "v.mp4", seconds=5.0, cut_at_s=None)

    def frames(run: str, interval_s: float):
        summary = run_embed(EmbedConfig(workdir=str(corpus_store), run_name=run, publish=False, incremental=True,
                                        sampling=FrameSampling(interval_s=interval_s)))
        _, items = read_embeddings(corpus_store / "embeddings" / run)
        kept = items.filter(pa.compute.equal(items.column("kind"), "frame"))
        return summary, sorted(round(t, 1) for t in kept.column("timestamp_s").to_pylist())

    first, every_2s = frames("a", 2.0)
    assert every_2s == [0.0, 2.0, 4.0]
    finer, every_1s = frames("b", 1.0)
    assert every_1s == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert finer.files_read == 1 and finer.embedded == 5  # only the video, sampled again
    back, again_2s = frames("c", 2.0)
    # the first sampling's frames, reused (the file is read to hash it: its file index row was for the 1 s run)
    assert again_2s == every_2s and back.embedded == 0 and back.files_read == 1


@pytest.mark.parametrize("source", ["corpus", "touched", "list_file"])
def test_items_whose_thumbnails_are_gone_are_decoded_again_not_reused(corpus_store, make_video, caplog, source):
    """thumbnails/ deleted or moved: an --incremental run must not publish items without
    pictures; their files are decoded and embedded again (same embeddings), the rest reused.
    Also when the files are read again (touched): found in the cache by their bytes."""
    (corpus_store / "corpus" / "clips").mkdir()
    make_video(corpus_store / "corpus" / "clips" / "v.mp4", seconds=3.0, cut_at_s=None)
    listing = corpus_store / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((corpus_store / "corpus").rglob("*.*"))))
    options = {"list_file": str(listing)} if source == "list_file" else {}
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="a", **options))
    thumbnails = corpus_store / "thumbnails"
    shutil.rmtree(thumbnails / sorted(os.listdir(thumbnails))[0])  # one folder of thumbnails gone
    gone = {p for p in [i for i in _thumbnails_of(corpus_store, first.index_version)] if not (corpus_store / p).exists()}
    assert gone
    if source == "touched":
        for path in (corpus_store / "corpus").rglob("*.*"):
            os.utime(path, (1e9, 1e9))
    with caplog.at_level(logging.WARNING, logger="lookalike.pipeline.embed"):
        again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="b", incremental=True, **options))
    assert "have no thumbnail under" in caplog.text and 0 < again.embedded < first.items
    assert all((corpus_store / p).exists() for p in _thumbnails_of(corpus_store, again.index_version))
    before, after = (read_embeddings(corpus_store / "embeddings" / run) for run in ("a", "b"))
    order = [after[1].column("id").to_pylist().index(i) for i in before[1].column("id").to_pylist()]
    np.testing.assert_allclose(after[0][order], before[0], atol=1e-5)  # the same embeddings
    quiet = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="c", incremental=True, **options))
    assert quiet.embedded == 0  # all there again: reused


def _thumbnails_of(store_root: Path, index_version: str) -> list[str]:
    from lookalike.index.searcher import ItemIndex

    return [item["thumbnail"] for item in ItemIndex.load(store_root / "indexes" / index_version).items]


def test_plan_reuse_keeps_only_files_whose_path_size_mtime_and_hash_are_known(tmp_path):
    from apache_beam.io.filesystem import FileMetadata

    from lookalike.pipeline.reuse import plan_reuse

    def index(rows: list[tuple[str, int, float, str]], age_s: int) -> None:
        (path,) = WriteFileIndexFn(str(tmp_path)).process(
            (0, [[{"uri": u, "size": s, "mtime_s": m, "source_hash": h} for u, s, m, h in rows]]))
        os.utime(path, (1_000_000 - age_s, 1_000_000 - age_s))

    index([("/c/a.jpg", 10, 5.0, "ha"), ("/c/b.JPG", 20, 5.0, "old")], age_s=10)
    index([("/c/b.JPG", 20, 6.0, "hb"), ("/c/c.png", 30, 5.0, "hc"), ("/c/d.png", 40, 5.0, "gone"),
           ("/c/notes.txt", 5, 5.0, "ht"), ("/c/e.mp4", 50, 5.0, "he"), ("/c/1965.jpg", 15, -144_806_400.0, "h65")],
          age_s=0)
    files = [FileMetadata("/c/e.mp4", 50, 5.0), FileMetadata("/c/a.jpg", 10, 5.0), FileMetadata("/c/b.JPG", 20, 6.0),
             FileMetadata("/c/c.png", 31, 5.0), FileMetadata("/c/d.png", 40, 5.0), FileMetadata("/c/notes.txt", 5, 5.0),
             FileMetadata("/c/new.jpg", 1, 1.0), FileMetadata("/c/a-again.jpg", 10, 0.0),
             FileMetadata("/c/1965.jpg", 15, -144_806_400.0)]  # modified before 1970: a known time all the same
    hashes = {"ha", "hb", "hc", "ht", "he", "old", "h65"}
    plan = plan_reuse(files, str(tmp_path), hashes)
    assert plan.unchanged == [("/c/e.mp4", "he"), ("/c/a.jpg", "ha"), ("/c/b.JPG", "hb"), ("/c/1965.jpg", "h65")]  # listing order; newest index row
    assert [m.path for m in plan.changed] == ["/c/c.png", "/c/d.png", "/c/new.jpg", "/c/a-again.jpg"]
    assert plan.dead == [{"uri": "/c/notes.txt", "stage": "filter", "reason": "not an image or video file (unsupported suffix)"}]
    assert plan_reuse(files, str(tmp_path), pa.array(sorted(hashes))).unchanged == plan.unchanged
    assert [m.path for m in plan_reuse(files, str(tmp_path / "none")).changed] == [m.path for m in files if m.path != "/c/notes.txt"]
    # unchanged bytes that failed to decode before: a dead letter at once, not read again
    failed = plan_reuse(files, str(tmp_path), hashes - {"hc"}, failed={"gone": ("decode", "empty file (0 bytes)")})
    assert [m.path for m in failed.changed] == ["/c/c.png", "/c/new.jpg", "/c/a-again.jpg"]
    assert failed.dead[0] == {"uri": "/c/d.png", "stage": "decode",
                              "reason": "empty file (0 bytes) (the same bytes failed in an earlier run)"}
    # a video's hash carries its frame sampling: cached frames of another sampling are not reused
    from lookalike.pipeline.video import FrameSampling, video_source_hash

    now, before = FrameSampling(interval_s=1.0), FrameSampling(interval_s=2.0)
    index([("/c/now.mp4", 60, 5.0, video_source_hash("hn", now)), ("/c/before.mp4", 70, 5.0, video_source_hash("hb4", before))],
          age_s=0)
    videos = [FileMetadata("/c/now.mp4", 60, 5.0), FileMetadata("/c/before.mp4", 70, 5.0), FileMetadata("/c/a.jpg", 10, 5.0)]
    known = {"ha", video_source_hash("hn", now), video_source_hash("hb4", before)}
    for given in (known, pa.array(sorted(known))):
        plan = plan_reuse(videos, str(tmp_path), given, now)
        assert plan.unchanged == [("/c/now.mp4", video_source_hash("hn", now)), ("/c/a.jpg", "ha")]
        assert [m.path for m in plan.changed] == ["/c/before.mp4"]


def test_plan_reuse_compares_inodes_and_rereads_files_of_an_index_without_them(tmp_path):
    """A listed inode must equal the recorded one (unknown on both sides, as for a remote file,
    counts as equal). A file index written before inodes were recorded (no such column) is
    still read, and its local files count as changed: read and hashed again once."""
    from apache_beam.io.filesystem import FileMetadata

    from lookalike.pipeline.reuse import ListedFile, plan_reuse

    (path,) = WriteFileIndexFn(str(tmp_path)).process((0, [[
        {"uri": "/c/a.jpg", "size": 10, "mtime_s": 5.0, "source_hash": "ha", "inode": 11},
        {"uri": "/c/b.jpg", "size": 10, "mtime_s": 5.0, "source_hash": "hb", "inode": 12},
        {"uri": "gs://c/r.jpg", "size": 10, "mtime_s": 5.0, "source_hash": "hr", "inode": None}]]))
    hashes = {"ha", "hb", "hr"}
    swapped = [ListedFile("/c/a.jpg", 10, 5.0, 12), ListedFile("/c/b.jpg", 10, 5.0, 11), FileMetadata("gs://c/r.jpg", 10, 5.0)]
    plan = plan_reuse(swapped, str(tmp_path), hashes)
    assert plan.unchanged == [("gs://c/r.jpg", "hr")] and [m.path for m in plan.changed] == ["/c/a.jpg", "/c/b.jpg"]
    same = [ListedFile("/c/a.jpg", 10, 5.0, 11), ListedFile("/c/b.jpg", 10, 5.0, 12)]
    assert plan_reuse(same, str(tmp_path), hashes).unchanged == [("/c/a.jpg", "ha"), ("/c/b.jpg", "hb")]
    assert [m.path for m in plan_reuse([ListedFile("gs://c/r.jpg", 10, 5.0, 3)], str(tmp_path), hashes).changed] == [
        "gs://c/r.jpg"]
    os.remove(path)
    old = pa.table({"uri": ["/c/a.jpg", "gs://c/r.jpg"], "size": pa.array([10, 10], pa.int64()), "mtime_s": [5.0, 5.0],
                    "source_hash": ["ha", "hr"]})
    pq.write_table(old, tmp_path / "files-old.parquet")
    assert load_file_index(tmp_path) == {"/c/a.jpg": (10, 5.0, "ha", None), "gs://c/r.jpg": (10, 5.0, "hr", None)}
    plan = plan_reuse(same[:1] + swapped[2:], str(tmp_path), hashes)
    assert plan.unchanged == [("gs://c/r.jpg", "hr")] and [m.path for m in plan.changed] == ["/c/a.jpg"]


def test_listing_records_local_inodes_for_a_folder_and_a_glob(tmp_path):
    from lookalike.pipeline.reuse import inode_of

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jpg").write_bytes(b"1")
    (tmp_path / "c" / "b.png").write_bytes(b"2")
    for pattern in (f"{tmp_path / 'c'}/**", f"{tmp_path / 'c'}/*.jpg", f"{tmp_path}/**/*.png"):
        listed = list_files(pattern)
        assert listed and [inode_of(m) for m in listed] == [os.stat(m.path).st_ino for m in listed], pattern


def test_expanded_items_ids_groups_and_thumbnails(tmp_path):
    """Paths under the root get relative ids (computed in Arrow), others their file name; a
    frame's id carries its time and its group is its video's id; a source under two paths gives
    two items sharing a thumbnail."""
    metas = [{"source_hash": "v", "content_hash": "v#t=1.500", "kind": "frame", "timestamp_s": 1.5, "width": 4, "height": 4},
             {"source_hash": "p", "content_hash": "p", "kind": "image", "timestamp_s": None, "width": 4, "height": 4}]
    rows = rows_table(metas, np.ones((2, 2), np.float32), 2)
    expand = {"root": "/c", "thumbnails_dir": str(tmp_path), "model_version": "m", "reused": True}
    items = expand_items(rows, [0, 1, 1], ["/c/clips/v.mp4", "/c/a/p.jpg", "/c/b/p.jpg"], **expand)
    assert items.column("id").to_pylist() == ["clips/v.mp4#t=1.500", "a/p.jpg", "b/p.jpg"]
    assert items.column("group").to_pylist() == ["clips/v.mp4", None, None]
    assert items.column("thumbnail").to_pylist() == [thumbnail_path(str(tmp_path), h) for h in ("v#t=1.500", "p", "p")]
    elsewhere = expand_items(rows, [1, 1], ["/c/a/p.jpg", "/elsewhere/q.jpg"], **expand)
    assert elsewhere.column("id").to_pylist() == ["a/p.jpg", "q.jpg"]
    assert elsewhere.column("reused").to_pylist() == [True, True] and len(expand_items(rows, [], [], **expand)) == 0


def test_listing_marks_what_is_not_a_regular_file_and_reports_unlistable_folders(tmp_path, refuse_listing):
    """A named pipe (or a link to one) is listed as unreadable with its reason, so it is
    dead-lettered and never opened; a folder that cannot be listed goes to ``onerror``."""
    from lookalike.pipeline.reuse import UnreadableFile

    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "hidden.jpg").write_bytes(b"1")
    (tmp_path / "a.jpg").write_bytes(b"22")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink(tmp_path / "pipe.jpg", tmp_path / "link.jpg")
    refuse_listing(tmp_path / "locked")
    errors: list[OSError] = []
    listed = {m.path.rsplit("/", 1)[-1]: m for m in list_files(f"{tmp_path}/**", errors.append)}
    assert sorted(listed) == ["a.jpg", "link.jpg", "pipe.jpg"]
    assert type(listed["a.jpg"]) is not UnreadableFile
    for name in ("pipe.jpg", "link.jpg"):
        assert type(listed[name]) is UnreadableFile and listed[name].error == "not a regular file (named pipe)"
    assert [(e.filename, type(e)) for e in errors] == [(str(tmp_path / "locked"), PermissionError)]
    plan = plan_reuse(list(listed.values()), str(tmp_path / "no-cache"))
    assert sorted((d["uri"].rsplit("/", 1)[-1], d["reason"]) for d in plan.dead) == [
        ("link.jpg", "not a regular file (named pipe)"), ("pipe.jpg", "not a regular file (named pipe)")]


def test_globstar_variants_drop_each_folder_level_once():
    from lookalike.pipeline.reuse import globstar_variants

    assert globstar_variants("/p/**/*.jpg") == ["/p/**/*.jpg", "/p/*.jpg"]
    assert sorted(globstar_variants("/p/**/raw/**/*.jpg")) == sorted(
        ["/p/**/raw/**/*.jpg", "/p/**/raw/*.jpg", "/p/raw/**/*.jpg", "/p/raw/*.jpg"])
    assert globstar_variants("/p/**") == ["/p/**"] and globstar_variants("gs://b/x*.png") == ["gs://b/x*.png"]


def test_an_incremental_run_after_deletions_says_so(corpus_store, monkeypatch, caplog):
    """Files deleted and none added: the run reuses every cached item without Beam, and its log
    says no file is new or changed (not "nothing changed") and that the new index holds fewer
    items than the one before, since the run's own counts only say what was read."""
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="first"))
    for gone in sorted((corpus_store / "corpus" / "1").iterdir())[:2]:
        gone.unlink()
    _no_beam(monkeypatch)
    with caplog.at_level("INFO", logger="lookalike.pipeline.embed"):
        again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="again", incremental=True))
    assert again.index_version != first.index_version and again.items == first.items - 2
    assert f"no new or changed file among the {first.items - 2} listed" in caplog.text
    assert (f"the new index holds {first.items - 2} item(s), 2 fewer than index {first.index_version} before it "
            "(files removed from the corpus or failing now, or videos sampled into fewer frames)") in caplog.text


def test_a_nightly_incremental_embed_with_keep_bounds_the_store(corpus_store, capsys):
    """`embed --incremental` every night writes a run (a full Parquet copy) and, when something
    changed, an index version; with --keep N both stay at N. `versions prune` does the same by
    hand, sparing embed runs unless --embedding-runs."""
    import json

    from PIL import Image

    from lookalike.pipeline.cli import main

    def night(name: str, keep: int | None = None):
        Image.new("L", (16, 16), 10 * len(name)).save(corpus_store / "corpus" / "0" / f"new_{name}.png")
        return run_embed(EmbedConfig(workdir=str(corpus_store), run_name=name, incremental=True, keep_versions=keep))

    first, second, third = night("n1"), night("n2"), night("n3", keep=2)
    runs = sorted(p.name for p in (corpus_store / "embeddings").iterdir() if p.name != "cache")
    indexes = sorted(p.name for p in (corpus_store / "indexes").iterdir())
    assert runs == ["n2", "n3"] and indexes == sorted([second.index_version, third.index_version])
    assert first.index_version not in indexes
    assert main(["versions", "prune", "--workdir", str(corpus_store), "--keep", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == [second.index_version]
    assert sorted(p.name for p in (corpus_store / "embeddings").iterdir() if p.name != "cache") == ["n2", "n3"]
    assert main(["versions", "prune", "--workdir", str(corpus_store), "--keep", "1", "--embedding-runs"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == ["embeddings/n2"]
    assert [p.name for p in (corpus_store / "indexes").iterdir()] == [third.index_version]
    with pytest.raises(ValueError, match="cannot go with publish=False"):
        run_embed(EmbedConfig(workdir=str(corpus_store), publish=False, keep_versions=1))


def test_a_prune_that_fails_after_publishing_is_a_warning_not_a_failed_run(corpus_store, monkeypatch, caplog):
    import lookalike.pipeline.embed as embed_module

    def broken_prune(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(corpus_store / "history.jsonl"))

    monkeypatch.setattr(embed_module, "prune", broken_prune)
    summary = run_embed(EmbedConfig(workdir=str(corpus_store), keep_versions=1))
    from lookalike.model.store import Store

    assert summary.index_version == Store.at(corpus_store).current_index()
    assert f"index {summary.index_version} is published, but pruning older versions failed: PermissionError" in caplog.text


@pytest.mark.parametrize("listing_max", [2, 0])
def test_an_incremental_run_on_a_corpus_too_big_to_list_in_the_graph_indexes_each_file_once(corpus_store, monkeypatch,
                                                                                            listing_max):
    """A corpus of more files than ``embed.LISTING_IN_GRAPH_MAX`` (500k; here 2 or 0), embedded
    before, gains 2 files. With 2, those two are few enough to be read from a listing; with
    0, Beam matches the corpus again and ``read_one`` settles each file. Either way every file
    is one item (the unchanged ones were also added from the plan: "duplicate item id" when
    publishing), unchanged files are not read again, and a file that is not media is one dead letter."""
    (corpus_store / "corpus" / "README.txt").write_text("notes")
    first = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="first", incremental=True))
    monkeypatch.setattr("lookalike.pipeline.embed.LISTING_IN_GRAPH_MAX", listing_max)
    for i, f in enumerate(sorted((corpus_store / "corpus" / "0").glob("*.png"))[:2]):
        shutil.copy(f, corpus_store / "corpus" / f"new{i}.png")  # known bytes at a new path
    again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="again", incremental=True))
    assert again.index_version and again.index_version != first.index_version
    assert (again.items, again.files_read, again.embedded, again.failed) == (first.items + 2, 2, 0, 1)
    assert again.unchanged == first.items + 2  # the new paths hold known bytes: reused too
    _, items = read_embeddings(corpus_store / "embeddings" / "again")
    ids = items.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == first.items + 2
    assert [Path(r["uri"]).name for r in read_dead_letters(corpus_store / "embeddings" / "again")] == ["README.txt"]
    assert not [p.name for p in (corpus_store / "embeddings" / "again").iterdir() if p.name.endswith(".arrow")]


@pytest.mark.parametrize("layout", ["folder", "glob", "untidy glob", "linked store", "matched by beam", "glob missing it"])
def test_a_store_inside_its_corpus_folder_is_left_out_of_the_corpus(tmp_path, trained_store, digits_corpus, caplog,
                                                                    monkeypatch, layout):
    """``lookalike embed --corpus . --workdir ./lookalike-data`` in a photo folder: the store's
    thumbnails, caches and models are not photos. Left out (with a warning), a rerun finds the
    same items, nothing new, instead of indexing its own files more every run: for a folder,
    a glob, a store reached through a link, and a corpus too big to list (Beam matches it)."""
    import lookalike.pipeline.embed as embed

    corpus = tmp_path / "photos"
    shutil.copytree(digits_corpus / "0", corpus / "zeros")
    if layout == "linked store":
        store = tmp_path / "elsewhere"
        (corpus / ".lookalike").symlink_to(store)
    else:
        store = corpus / ".lookalike"
    shutil.copytree(trained_store.root / "models", store / "models")
    if layout == "matched by beam":
        monkeypatch.setattr(embed, "LISTING_IN_GRAPH_MAX", 0)
    source = {"glob": str(corpus / "**" / "*.png"), "untidy glob": f"{tmp_path}//photos/./**/*.png",
              "glob missing it": str(corpus / "zer*" / "*.png")}.get(layout, str(corpus))
    with caplog.at_level(logging.WARNING):
        first = run_embed(EmbedConfig(workdir=str(store), corpus=source, run_name="first"))
        again = run_embed(EmbedConfig(workdir=str(store), corpus=source, run_name="again", incremental=True))
    photos = len(list((corpus / "zeros").iterdir()))
    assert (first.items, first.failed) == (photos, 0)
    assert (again.items, again.failed, again.unchanged) == (photos, 0, photos)
    assert again.index_version == first.index_version  # nothing changed: CURRENT kept
    warned = any(f"the store {store} lies inside the corpus" in r.getMessage() for r in caplog.records)
    # (a link reached by the walk is left out by its inode; a glob that cannot match the store has nothing to leave out)
    assert warned is (layout not in ("linked store", "glob missing it"))

def test_a_photo_edited_in_place_leaves_its_unchanged_copys_picture_intact(corpus_store):
    """A small JPEG's thumbnail is a hard link to the photo. Edited in place (same inode), the
    photo would change the picture its byte-identical backup, untouched and reused by an
    --incremental run, is shown with. The stale link is removed and the backup gets its own
    picture again; the edited photo gets its new one."""
    import io

    from PIL import Image

    def jpeg(seed: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(out, "JPEG")
        return out.getvalue()

    photos = corpus_store / "corpus" / "photos"
    photos.mkdir()
    (photos / "photo.jpg").write_bytes(jpeg(1))
    run_embed(EmbedConfig(workdir=str(corpus_store), run_name="a", incremental=True))
    (photos / "photo-backup.jpg").write_bytes(jpeg(1))  # backed up later: its picture is the photo's link
    run_embed(EmbedConfig(workdir=str(corpus_store), run_name="backup", incremental=True))
    with open(photos / "photo.jpg", "r+b") as f:  # in place: the same inode
        f.truncate(0)
        f.write(jpeg(2))
    again = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="b", incremental=True))
    thumbnails = {item["id"]: corpus_store / item["thumbnail"] for item in
                  __import__("lookalike.index.searcher", fromlist=["ItemIndex"]).ItemIndex.load(
                      corpus_store / "indexes" / again.index_version).items}
    assert thumbnails["photos/photo-backup.jpg"].read_bytes() == jpeg(1)
    assert thumbnails["photos/photo.jpg"].read_bytes() == jpeg(2)
    assert run_embed(EmbedConfig(workdir=str(corpus_store), run_name="c", incremental=True)).embedded == 0  # settled
    for photo in photos.iterdir():  # touched: the same bytes, so their linked pictures are intact
        os.utime(photo, (1e9, 1e9))
    touched = run_embed(EmbedConfig(workdir=str(corpus_store), run_name="d", incremental=True))
    assert (touched.embedded, touched.index_version) == (0, again.index_version)
