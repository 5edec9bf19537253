"""The Beam embed pipeline on a tiny real corpus, on the in-process runner."""

import json
import logging
import re
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lookalike.index.searcher import ItemIndex
from lookalike.model.cpu_threads import available_cpus, threads_per_worker
from lookalike.model.data import list_images
from lookalike.model.store import Store
from lookalike.pipeline.embed import EmbedConfig, EmbedError, read_embeddings, run_embed
from lookalike.pipeline.sources import LISTED_FOLDER_REASON, corpus_pattern, corpus_root, item_id_for


def test_one_embedding_per_input_matching_the_encoder(indexed_store, encoder):
    files = list_images(indexed_store.corpus_dir)
    run_dir = next(indexed_store.embeddings_dir.glob("e-*"))
    emb, items = read_embeddings(run_dir)
    ids = items.column("id").to_pylist()
    assert sorted(ids) == sorted(str(f.relative_to(indexed_store.corpus_dir)) for f in files)
    assert emb.shape == (len(files), encoder.embed_dim)
    first = indexed_store.corpus_dir / ids[0]
    np.testing.assert_allclose(emb[0], encoder.embed_bytes([first.read_bytes()])[0], atol=1e-5)
    row = items.slice(0, 1).to_pylist()[0]
    assert row["kind"] == "image" and row["model_version"] == encoder.version and len(row["content_hash"]) == 64
    assert (row["width"], row["height"]) == (32, 32)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["embedded"] == len(files) and summary["failed"] == 0
    assert pq.read_schema(next(run_dir.glob("embeddings-*.parquet"))).field("embedding").type.list_size == encoder.embed_dim


def test_published_index_answers_each_item_with_itself(indexed_store):
    index = ItemIndex.load(indexed_store.require_current_index())
    for row in (0, len(index) // 2, len(index) - 1):
        assert index.search(index.embeddings[row], k=1)[0][0].id == index.items[row]["id"]


def test_bad_files_are_dead_lettered_and_the_rest_indexed(tmp_path, trained_store, caplog):
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root, workdir)
    corpus = workdir / "corpus"
    good = len(list_images(corpus))
    jpeg = corpus / "0" / "truncated.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (corpus / "1" / "zero.png").write_bytes(b"")
    (corpus / "2" / "text.jpg").write_text("just text")
    (corpus / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO):
        summary = run_embed(EmbedConfig(workdir=str(workdir), run_name="with-bad"))
    assert (summary.embedded, summary.failed) == (good, 4)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for name in ("truncated.jpg", "zero.png", "text.jpg", "notes.txt"):  # each named once, with its reason
        assert len([m for m in warned if name in m]) == 1, warned
    dead = {row["uri"].rsplit("/", 1)[-1]: row for row in summary.dead_letter_examples}
    assert set(dead) == {"truncated.jpg", "zero.png", "text.jpg", "notes.txt"}
    assert "empty" in dead["zero.png"]["reason"] and dead["notes.txt"]["stage"] == "filter"
    assert len(ItemIndex.load(workdir / "indexes" / summary.index_version)) == good
    # The embed progress ends short of the files read by the 4 failed; a last line counts them.
    ended = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("read and embed: all ")]
    assert len(ended) == 1 and ended[0].startswith(f"read and embed: all {summary.files_matched} file(s) done by one process in ")
    assert re.search(rf"\({good} item\(s\) in \d+ batch\(es\), 4 file\(s\) failed, not embedded\)$", ended[0]), ended


def test_all_bad_corpus_fails_and_publishes_nothing(tmp_path, trained_store):
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    (workdir / "bad" / "x").mkdir(parents=True)
    (workdir / "bad" / "x" / "a.png").write_text("nope")
    with pytest.raises(EmbedError, match="nothing embedded"):
        run_embed(EmbedConfig(workdir=str(workdir), corpus=str(workdir / "bad"), run_name="all-bad"))
    assert not (workdir / "CURRENT").exists()
    assert not list((workdir / "indexes").glob("*"))  # no half-built index left behind
    kept = workdir / "embeddings" / "all-bad"  # the failed run's dead letters and summary are kept to be read
    assert (kept / "summary.json").is_file() and list(kept.glob("dead_letter-*.jsonl"))


def test_a_failed_run_leaves_no_empty_run_folder(workdir_with_model, digits_corpus, tfds_dir):
    from lookalike.pipeline.tfds_source import TfdsNotAvailableError

    shutil.copytree(digits_corpus, workdir_with_model / "corpus")
    runs = workdir_with_model / "embeddings"
    with pytest.raises(TfdsNotAvailableError, match="no split 'nope'"):  # the source is checked before the folder exists
        run_embed(EmbedConfig(workdir=str(workdir_with_model), tfds="lookalike_tiny_shapes:nope", tfds_data_dir=str(tfds_dir)))
    assert not list(runs.glob("e-*"))
    with pytest.raises(ValueError, match="NoSuchRunner"):  # fails once the corpus is listed into the run folder
        run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="again", runner="NoSuchRunner", publish=False))
    assert not (runs / "again").exists()
    (workdir_with_model / "corpus" / "notes.txt").write_text("not media")  # planned as a dead letter before Beam
    with pytest.raises(ValueError, match="NoSuchRunner"):
        run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="again", runner="NoSuchRunner", publish=False,
                              incremental=True))
    assert not (runs / "again").exists()  # its listing and planned dead letters are written again by the next run
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="again", publish=False))  # the name is free
    assert (summary.items, summary.failed) == (len(list_images(digits_corpus)), 1)


def test_multi_process_runner_gives_the_same_embeddings(tmp_path, indexed_store, caplog, capfd):
    workdir = tmp_path / "w"
    shutil.copytree(indexed_store.root / "models", workdir / "models")
    with caplog.at_level(logging.INFO):
        summary = run_embed(EmbedConfig(workdir=str(workdir), corpus=str(indexed_store.corpus_dir), num_workers=2, publish=False))
    # Each worker process gave XLA its share of the CPUs before its first computation. A
    # worker logs to the stderr it inherited (lookalike.pipeline.worker_main).
    logged = capfd.readouterr().err.splitlines() + [r.getMessage() for r in caplog.records]
    sized = [line for line in logged if "XLA CPU threads of this process (pid " in line]
    assert sized and all(f"): {threads_per_worker(2)} of {available_cpus()} CPUs" in line for line in sized), sized
    emb2, items2 = read_embeddings(workdir / "embeddings" / summary.run)
    emb1, items1 = read_embeddings(next(indexed_store.embeddings_dir.glob("e-*")))
    assert items2.column("id").to_pylist() == items1.column("id").to_pylist()
    np.testing.assert_allclose(emb2, emb1, atol=1e-5)


@pytest.fixture(scope="module")
def two_worker_log(tmp_path_factory, trained_store, digits_corpus) -> list[str]:
    """The stderr lines of ``lookalike embed --num-workers 2`` on the digits corpus."""
    import subprocess
    import sys
    from pathlib import Path

    workdir = tmp_path_factory.mktemp("two-workers") / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    exe = str(Path(sys.executable).with_name("lookalike"))
    run = subprocess.run([exe, "embed", "--workdir", str(workdir), "--corpus", str(digits_corpus), "--num-workers", "2",
                          "--no-publish"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [line for line in run.stderr.splitlines() if line.strip()]


def test_worker_processes_log_like_the_cli_without_harness_noise(two_worker_log):
    lines = two_worker_log
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ", line)
               for line in lines), lines
    assert len([line for line in lines if "XLA CPU threads of this process (pid " in line]) == 2, lines  # the workers'
    for noise in ("sdk harness", "semi_persistent_directory", "apitools", "Resource module", "Worker: severity"):
        assert not [line for line in lines if noise in line], (noise, lines)


def test_each_worker_counts_its_own_share_and_the_main_process_the_whole(two_worker_log, digits_corpus):
    lines = two_worker_log
    assert not [line for line in lines if re.search(r"(read|embed)( \(worker_\d+\))?: \d+/", line)], lines  # no global total
    total = len(list_images(digits_corpus))
    assert [line for line in lines if f"read and embed: all {total} file(s) done by 2 worker processes in " in line], lines


def test_embed_job_on_two_simulated_devices_splits_batches_and_gives_the_same_embeddings(tmp_path, indexed_store):
    """The whole ``lookalike embed`` job where JAX sees two devices (as on a 2-GPU machine)."""
    import os
    import subprocess
    import sys

    workdir = tmp_path / "w"
    shutil.copytree(indexed_store.root / "models", workdir / "models")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "lookalike.pipeline.cli", "embed", "--workdir", str(workdir),
                          "--corpus", str(indexed_store.corpus_dir), "--run-name", "two", "--no-publish"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "runs data-parallel on 2 devices" in run.stderr
    emb2, items2 = read_embeddings(workdir / "embeddings" / "two")
    emb1, items1 = read_embeddings(next(indexed_store.embeddings_dir.glob("e-*")))
    assert items2.column("id").to_pylist() == items1.column("id").to_pylist()
    np.testing.assert_allclose(emb2, emb1, atol=1e-5)


def test_corpus_patterns_and_ids():
    assert corpus_pattern("/data/imgs") == "/data/imgs/**"
    assert corpus_pattern("/data/imgs/*.jpg") == "/data/imgs/*.jpg"
    assert corpus_root("/data/imgs/*.jpg") == "/data/imgs"
    assert item_id_for("/data/imgs/a/b.png", "/data/imgs") == "a/b.png"


def test_an_existing_folder_is_taken_literally_whatever_its_name_holds(tmp_path):
    from apache_beam.io.filesystems import FileSystems

    from lookalike.pipeline.reuse import list_files

    for name in ("photos [2024]", "what?", "a*b"):
        folder = tmp_path / name / "sub"
        folder.mkdir(parents=True)
        (folder / "x.png").write_bytes(b"x")
        (tmp_path / f"{name[0]}-sibling.png").write_bytes(b"y")  # the glob reading of the name would not match it
        corpus = str(tmp_path / name)
        pattern = corpus_pattern(corpus)
        assert corpus_root(corpus) == corpus
        assert [m.path for m in list_files(pattern)] == [f"{corpus}/sub/x.png"]  # walked
        matched = FileSystems.match([pattern])[0].metadata_list  # Beam's match (corpora too big to list first)
        assert [m.path for m in matched] == [f"{corpus}/sub/x.png"]
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "y.png").write_bytes(b"y")
    assert corpus_pattern(f"{tmp_path}/p[0-9]/*.png") == f"{tmp_path}/p[0-9]/*.png"  # a real glob stays one
    assert [m.path for m in list_files(f"{tmp_path}/p[0-9]/*.png")] == [f"{tmp_path}/p1/y.png"]


def test_corpus_and_workdir_named_with_wildcards_are_embedded(tmp_path, trained_store):
    workdir = tmp_path / "w [1]?"
    shutil.copytree(trained_store.root, workdir)
    corpus = tmp_path / "photos [2024]"
    shutil.copytree(workdir / "corpus" / "3", corpus / "3")
    summary = run_embed(EmbedConfig(workdir=str(workdir), corpus=str(corpus), run_name="brackets", incremental=True))
    files = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.png"))
    assert summary.embedded == len(files) > 0
    _, items = read_embeddings(workdir / "embeddings" / "brackets")
    assert sorted(items.column("id").to_pylist()) == files  # ids relative to the folder
    again = run_embed(EmbedConfig(workdir=str(workdir), run_name="again", incremental=True))  # default corpus, in the store
    assert again.embedded == len(list_images(workdir / "corpus")) - len(files)  # its folder 3 came from the cache
    assert again.unchanged == len(files)


CIFAR_TEST = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10_test_jpg.tar.gz"


@pytest.mark.skipif(not CIFAR_TEST.is_file(), reason=f"real CIFAR-10 JPEGs not found at {CIFAR_TEST} (developer/CI data)")
def test_real_cifar_jpegs_are_embedded(tmp_path, trained_store):
    """Real RGB JPEG photos through a grayscale digits model: every file is embedded."""
    import tarfile

    corpus = tmp_path / "cifar"
    with tarfile.open(CIFAR_TEST) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")][:40]
        tar.extractall(corpus, members=members, filter="data")
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), corpus=str(corpus)))
    assert (summary.embedded, summary.failed) == (40, 0)
    index = ItemIndex.load(workdir / "indexes" / summary.index_version)
    assert {item["width"] for item in index.items} == {32}


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = buf.getvalue()
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


@pytest.fixture
def workdir_with_model(tmp_path, trained_store):
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    return workdir


def test_every_kind_of_bad_input_is_dead_lettered(workdir_with_model, digits_corpus, make_audio_only, caplog):
    corpus = workdir_with_model / "corpus"
    shutil.copytree(digits_corpus / "0", corpus / "good")
    good = len(list_images(corpus))
    bad = corpus / "bad"
    bad.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(bad / "truncated.jpg", quality=95)
    (bad / "truncated.jpg").write_bytes((bad / "truncated.jpg").read_bytes()[:300])
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.jpg").write_text("just text")
    (bad / "bomb.png").write_bytes(png_claiming(50000, 50000))
    Image.new("RGB", (1, 1)).save(bad / "tiny.png")
    (bad / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500)
    make_audio_only(bad / "audio.mp4")
    # Float pixels out of [0, 1] and [0, 255]: refused before its thumbnail is queued (whose
    # failure surfaced later as an ERROR and tracebacks of the stage's teardown)
    Image.fromarray(np.linspace(-5, 995, 64 * 64, dtype=np.float32).reshape(64, 64), mode="F").save(bad / "float.tiff")
    with caplog.at_level(logging.WARNING):
        summary = run_embed(EmbedConfig(workdir=str(workdir_with_model)))
    reasons = {row["uri"].rsplit("/", 1)[-1]: row["reason"] for row in read_dead(workdir_with_model, summary.run)}
    assert set(reasons) == {"truncated.jpg", "zero.png", "text.jpg", "bomb.png", "tiny.png", "broken.mp4", "audio.mp4",
                            "float.tiff"}
    assert "decompression bomb" in reasons["bomb.png"] or "exceeds" in reasons["bomb.png"]
    assert "no video stream" in reasons["audio.mp4"] and "1x1" in reasons["tiny.png"]
    assert "float image values from -5 to 995" in reasons["float.tiff"]
    assert (summary.items, summary.failed) == (good, 8)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], [r.getMessage() for r in caplog.records]
    assert len(ItemIndex.load(workdir_with_model / "indexes" / summary.index_version)) == good


def read_dead(workdir, run):
    from lookalike.pipeline.embed import read_dead_letters

    return read_dead_letters(workdir / "embeddings" / run)


@pytest.mark.parametrize("name, message", [("cache", "is the store's embedding cache"), ("", r"'' \(it is empty\)")])
def test_a_reserved_or_empty_run_name_is_refused_before_any_work(workdir_with_model, digits_corpus, name, message):
    with pytest.raises(ValueError, match=f"invalid run name .*{message}"):
        run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus=str(digits_corpus), run_name=name))
    assert not (workdir_with_model / "embeddings").exists() or not any((workdir_with_model / "embeddings").iterdir())


def test_a_folder_passed_as_list_file_is_named_as_such(workdir_with_model, digits_corpus):
    from lookalike.model.store import StoreError

    with pytest.raises(StoreError, match=f"list file {digits_corpus} is a folder: pass it as --corpus {digits_corpus}"):
        run_embed(EmbedConfig(workdir=str(workdir_with_model), list_file=str(digits_corpus)))


def test_listed_paths_include_unreadable_ones(workdir_with_model, digits_corpus):
    files = list_images(digits_corpus)[:5]
    listing = workdir_with_model / "list.txt"
    listing.write_text("# corpus\n" + "\n".join(str(f) for f in files) + "\n/nonexistent/missing.png\n")
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), list_file=str(listing)))
    assert (summary.items, summary.failed) == (5, 1)
    assert summary.dead_letter_examples[0]["stage"] == "read"


def test_a_folder_in_a_list_file_is_named_as_one_and_jfif_files_are_jpegs(workdir_with_model, digits_corpus, tmp_path):
    """A list file names files: a folder in it is a dead letter saying so (not "unsupported
    suffix"). JPEGs saved as .jfif or .JPE (browsers and old cameras) are embedded like .jpg."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(("a.jfif", "b.JPE", "c.jpg")):
        Image.open(list_images(digits_corpus)[i]).convert("RGB").save(photos / name, format="JPEG")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos}\n" + "".join(f"{photos / n}\n" for n in ("a.jfif", "b.JPE", "c.jpg")))
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), list_file=str(listing), publish=False))
    assert (summary.files_matched, summary.items, summary.failed) == (4, 3, 1)
    assert summary.dead_letter_examples == [{"uri": str(photos), "stage": "filter", "reason": LISTED_FOLDER_REASON}]
    folder = run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus=str(photos), publish=False))
    assert (folder.files_matched, folder.items, folder.failed) == (3, 3, 0)


def test_a_dangling_link_in_the_corpus_is_a_dead_letter(workdir_with_model, digits_corpus):
    import os

    corpus = workdir_with_model / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    shutil.copy(list_images(digits_corpus)[0], corpus / "one.png")
    os.symlink(corpus / "gone.png", corpus / "dangling.png")
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), publish=False))
    assert (summary.files_matched, summary.items, summary.failed) == (2, 1, 1)
    letter = summary.dead_letter_examples[0]
    assert letter["uri"].endswith("dangling.png") and letter["stage"] == "read" and "No such file" in letter["reason"]
    assert letter["reason"].startswith(f"dangling symbolic link: its target '{corpus / 'gone.png'}' does not exist")


def test_listed_files_from_different_folders_get_distinct_ids(workdir_with_model, digits_corpus, tmp_path):
    """Same file names in different folders, a file:// URL, a relative path, a path listed twice."""
    sources = list_images(digits_corpus)
    for i, folder in enumerate(("o1/a", "o2/a", "lists/sub")):
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(sources[i], tmp_path / folder / "x.png")
    listing = tmp_path / "lists" / "list.txt"
    listing.write_text(f"{tmp_path}/o1/a/x.png\nfile://{tmp_path}/o2/a/x.png\nsub/x.png\n\n{tmp_path}/o1/a/../a/x.png\n")
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), list_file=str(listing)))
    assert (summary.files_matched, summary.items, summary.failed) == (3, 3, 0)
    index = ItemIndex.load(workdir_with_model / "indexes" / summary.index_version)
    assert sorted(item["id"] for item in index.items) == ["lists/sub/x.png", "o1/a/x.png", "o2/a/x.png"]


def test_videos_become_timestamped_frames_with_thumbnails(workdir_with_model, make_video, digits_corpus):
    corpus = workdir_with_model / "corpus"
    (corpus / "clips").mkdir(parents=True)
    make_video(corpus / "clips" / "a.mp4", seconds=5.0, cut_at_s=1.5)
    make_video(corpus / "clips" / "portrait.mp4", seconds=1.0, rotation=-90)  # a phone's portrait video: stored 64x48
    shutil.copy(list_images(digits_corpus)[0], corpus / "one.png")
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model)))
    index = ItemIndex.load(workdir_with_model / "indexes" / summary.index_version)
    frames = [item for item in index.items if item["group"] == "clips/a.mp4"]
    assert {round(f["timestamp_s"], 1) for f in frames} >= {0.0, 1.5}
    assert all(f["id"] == f"clips/a.mp4#t={f['timestamp_s']:.3f}" and f["kind"] == "frame" for f in frames)
    assert all(Image.open(workdir_with_model / item["thumbnail"]).size[0] <= 128 for item in index.items)
    portrait = [item for item in index.items if item["group"] == "clips/portrait.mp4"]
    assert portrait and all((f["width"], f["height"]) == (48, 64) for f in portrait)  # upright, as a player shows it
    assert all(Image.open(workdir_with_model / f["thumbnail"]).size == (48, 64) for f in portrait)


def test_the_index_mode_follows_the_items_not_the_files(workdir_with_model, make_video, caplog):
    """One video of 40 sampled frames is one file: tree_ah (16 items a shard at least) was
    refused as if the index held one item, and auto chose by the file count."""
    from lookalike.index.builder import IndexOptions
    from lookalike.pipeline.video import FrameSampling

    (workdir_with_model / "corpus" / "clips").mkdir(parents=True)
    make_video(workdir_with_model / "corpus" / "clips" / "a.mp4", seconds=4.0, cut_at_s=None)
    with caplog.at_level(logging.WARNING):
        summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), sampling=FrameSampling(interval_s=0.1),
                                        index=IndexOptions(mode="tree_ah")))
    assert summary.items == 40 and "tree_ah needs at least" not in caplog.text, caplog.text
    manifest = ItemIndex.load(workdir_with_model / "indexes" / summary.index_version).manifest
    assert manifest["build"]["mode"] == "tree_ah" and "fallback" not in manifest["build"]


def test_incremental_rerun_embeds_only_new_files_and_duplicates_once(workdir_with_model, digits_corpus):
    corpus = workdir_with_model / "corpus"
    shutil.copytree(digits_corpus, corpus)
    first = run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="first"))
    files = list_images(corpus)
    shutil.copy(files[0], corpus / "0" / "copy_of_first.png")  # byte-identical: reused, listed twice
    Image.new("L", (32, 32), 128).save(corpus / "0" / "new.png")
    second = run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="second", incremental=True))
    assert second.embedded == 1 and second.unchanged == len(files) + 1
    assert second.items == first.items + 2
    emb1, items1 = read_embeddings(workdir_with_model / "embeddings" / "first")
    emb2, items2 = read_embeddings(workdir_with_model / "embeddings" / "second")
    by_id = dict(zip(items2.column("id").to_pylist(), emb2))
    for item_id, e in zip(items1.column("id").to_pylist(), emb1):
        np.testing.assert_array_equal(by_id[item_id], e)
    first_id = str(files[0].relative_to(corpus))
    np.testing.assert_array_equal(by_id["0/copy_of_first.png"], by_id[first_id])
    third = run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="third"))  # not incremental
    assert third.embedded == len(files) + 1 and third.duplicate_files == 1


def test_incremental_skips_reading_unchanged_files_but_notices_edits(workdir_with_model, digits_corpus):
    corpus = workdir_with_model / "corpus"
    shutil.copytree(digits_corpus / "1", corpus / "1")
    run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="first"))
    files = list_images(corpus)
    edited = files[0]
    Image.new("L", (32, 32), 77).save(edited)  # same path, new bytes and mtime
    second = run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="second", incremental=True))
    assert second.embedded == 1 and second.unchanged == len(files) - 1
    assert second.files_read == 1  # the unchanged files were not even read
    emb, items = read_embeddings(workdir_with_model / "embeddings" / "second")
    new_hash = dict(zip(items.column("id").to_pylist(), items.column("content_hash").to_pylist()))
    import hashlib
    assert new_hash[str(edited.relative_to(corpus))] == hashlib.sha256(edited.read_bytes()).hexdigest()


def test_incremental_sees_two_files_of_one_size_and_mtime_that_swap_names(workdir_with_model):
    """Same size, same mtime, names swapped (BMPs restored from an archive): the inodes moved
    with the bytes, so both files are read again and each path gets its own bytes' hash and
    embedding; nothing is embedded again (both bytes are in the cache)."""
    import hashlib
    import os

    corpus = workdir_with_model / "corpus"
    corpus.mkdir()
    a, b = corpus / "a.bmp", corpus / "b.bmp"
    Image.new("L", (32, 32), 20).save(a)
    Image.fromarray(np.tri(32, dtype=np.uint8) * 200).save(b)
    assert a.stat().st_size == b.stat().st_size
    for f in (a, b):
        os.utime(f, (1_700_000_000, 1_700_000_000))
    run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="first"))
    os.rename(a, corpus / "t.bmp")
    os.rename(b, a)
    os.rename(corpus / "t.bmp", b)
    assert a.stat().st_mtime == b.stat().st_mtime == 1_700_000_000
    second = run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="second", incremental=True))
    assert (second.files_read, second.embedded, second.unchanged) == (2, 0, 2)
    emb, items = read_embeddings(workdir_with_model / "embeddings" / "second")
    first_emb, first_items = read_embeddings(workdir_with_model / "embeddings" / "first")
    hashes = dict(zip(items.column("id").to_pylist(), items.column("content_hash").to_pylist()))
    assert hashes == {name: hashlib.sha256((corpus / name).read_bytes()).hexdigest() for name in ("a.bmp", "b.bmp")}
    ids, first_ids = items.column("id").to_pylist(), first_items.column("id").to_pylist()
    np.testing.assert_array_equal(emb[ids.index("a.bmp")], first_emb[first_ids.index("b.bmp")])  # the embedding moved too


def test_rerun_after_a_crash_redoes_only_unfinished_work(workdir_with_model, digits_corpus):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    corpus = workdir_with_model / "corpus"
    shutil.copytree(digits_corpus, corpus)
    exe = str(Path(sys.executable).with_name("lookalike"))
    tmp = workdir_with_model.parent / "tmp"  # what a SIGKILLed process leaves there (Beam's temp folder) stays in it
    tmp.mkdir()
    killed = subprocess.run([exe, "embed", "--workdir", str(workdir_with_model), "--batch-size", "32", "--run-name", "s1"],
                            env={**os.environ, "LOOKALIKE_FAILPOINT": "embed_batch_2", "TMPDIR": str(tmp)},
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (workdir_with_model / "CURRENT").exists()
    assert [p.name for p in (workdir_with_model / "embeddings" / "s1").iterdir()] == [".listing.arrow"]
    assert [p for p in (workdir_with_model / "indexes").iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    cached = sum(pq.read_metadata(p).num_rows for p in (workdir_with_model / "embeddings" / "cache").rglob("part-*.parquet"))
    total = len(list_images(corpus))
    assert 0 < cached < total  # the two finished batches survived the kill
    # The killed run's name is free again, and its partial index folder (no live writer) is removed.
    rerun = run_embed(EmbedConfig(workdir=str(workdir_with_model), incremental=True, max_batch_size=32, run_name="s1"))
    assert (rerun.embedded, rerun.unchanged, rerun.items) == (total - cached, cached, total)
    assert not [p.name for p in (workdir_with_model / "indexes").iterdir() if p.name.startswith(".tmp-")]


def test_a_terminated_run_removes_its_folder_partial_index_and_beam_temp(workdir_with_model, digits_corpus, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    shutil.copytree(digits_corpus, workdir_with_model / "corpus")
    temp = tmp_path / "temp"
    temp.mkdir()
    exe = str(Path(sys.executable).with_name("lookalike"))
    stopped = subprocess.run([exe, "embed", "--workdir", str(workdir_with_model), "--batch-size", "32", "--run-name", "t1"],
                             env={**os.environ, "LOOKALIKE_FAILPOINT": "embed_batch_2:SIGTERM", "TMPDIR": str(temp)},
                             capture_output=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert b"Traceback" not in stopped.stderr and b"SystemExit" not in stopped.stderr, stopped.stderr[-2000:]
    assert not (workdir_with_model / "embeddings" / "t1").exists()
    assert not [p.name for p in (workdir_with_model / "indexes").iterdir() if p.name.startswith(".tmp-")]
    assert not list(temp.glob("beam-pipeline-temp*"))


def test_a_sigterm_while_pruning_says_the_index_is_published_and_how_to_finish(workdir_with_model, digits_corpus):
    """A signal after publishing (here as --keep starts pruning) must not say "nothing published"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    shutil.copytree(digits_corpus, workdir_with_model / "corpus")
    exe = str(Path(sys.executable).with_name("lookalike"))
    stopped = subprocess.run([exe, "embed", "--workdir", str(workdir_with_model), "--keep", "1", "--run-name", "k1"],
                             env={**os.environ, "LOOKALIKE_FAILPOINT": "embed_prune:SIGTERM"},
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    current = Store.at(str(workdir_with_model)).current_index_or_none()
    assert current is not None
    assert (f"embed stopped by signal 15 after publishing index {current}, which is CURRENT; pruning older versions was "
            f"cut short: `lookalike versions prune --workdir {workdir_with_model} --keep 1 --embedding-runs` finishes it"
            in stopped.stderr), stopped.stderr[-2000:]
    assert "nothing published" not in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    assert (workdir_with_model / "embeddings" / "k1" / "summary.json").exists()


def test_publishing_with_another_model_warns_and_latest_follows_the_served_model(tmp_path, indexed_store, tiny_config,
                                                                                  caplog):
    """``embed --model OLD`` must not leave LATEST on another model, which the next nightly
    embed (no --model) would switch the served index to without a word."""
    from lookalike.model.train import train_and_evaluate

    workdir = tmp_path / "w"
    shutil.copytree(indexed_store.root, workdir)
    store = Store.at(workdir)
    served = store.latest_model()
    train_and_evaluate(replace(tiny_config, seed=1), workdir)  # LATEST: a new model
    newer = store.latest_model()
    assert newer != served
    with caplog.at_level(logging.WARNING):
        back = run_embed(EmbedConfig(workdir=str(workdir), model_version=served, run_name="back"))
    assert store.latest_model() == served  # as promote and rollback do
    assert not [r for r in caplog.records if "instead of" in r.getMessage()]  # the served model did not change
    with caplog.at_level(logging.WARNING):
        moved = run_embed(EmbedConfig(workdir=str(workdir), model_version=newer, run_name="moved"))
    assert store.latest_model() == newer
    assert [r.getMessage() for r in caplog.records if "instead of" in r.getMessage()] == [
        f"index {moved.index_version} serves model {newer} instead of {served} (index {back.index_version}): vectors "
        f"made with {served} are now refused (409); `lookalike versions rollback` serves the previous index again"]
    again = run_embed(EmbedConfig(workdir=str(workdir), model_version=served, run_name="again", incremental=True))
    store.set_latest_model(newer)  # as `train` leaves it
    kept = run_embed(EmbedConfig(workdir=str(workdir), model_version=served, run_name="kept", incremental=True))
    assert kept.index_version == again.index_version and store.latest_model() == served  # kept as CURRENT: followed too


def test_a_run_folder_being_written_is_not_taken_over(workdir_with_model, digits_corpus):
    from lookalike.model.filelock import try_lock_folder

    shutil.copytree(digits_corpus, workdir_with_model / "corpus")
    live = workdir_with_model / "embeddings" / "live"
    live.mkdir(parents=True)
    (live / ".listing.arrow").write_bytes(b"")
    fd = try_lock_folder(live)  # as a running embed holds it
    try:
        with pytest.raises(EmbedError, match="being written by another running embed"):
            run_embed(EmbedConfig(workdir=str(workdir_with_model), run_name="live"))
    finally:
        import os

        os.close(fd)
    assert (live / ".listing.arrow").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_the_run_in_one_line_leaves_no_worker_and_keeps_finished_batches(ctrl_c_as_in_a_terminal, workdir_with_model,
                                                                                      digits_corpus,
                                                                                      workers):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    corpus = workdir_with_model / "corpus"
    shutil.copytree(digits_corpus, corpus)
    exe = str(Path(sys.executable).with_name("lookalike"))
    job = subprocess.Popen([exe, "embed", "--workdir", str(workdir_with_model), "--batch-size", "32", "--num-workers",
                            str(workers)], env={**os.environ, "LOOKALIKE_FAILPOINT": "embed_batch_2:wait"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=ctrl_c_as_in_a_terminal)
    seen = []
    while not any("failpoint embed_batch_2: waiting" in line for line in seen):  # two batches are in the cache
        line = job.stderr.readline()
        assert line, "".join(seen)[-3000:]  # the run ended before the failpoint
        seen.append(line)
    os.killpg(job.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the job
    _, err = job.communicate(timeout=120)
    err = "".join(seen) + err
    assert job.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("lookalike embed: interrupted: nothing published; every finished batch is in "
                                            "the embedding cache: rerun with --incremental to resume where it stopped")
    with pytest.raises(ProcessLookupError):  # no worker process of the job is left
        os.killpg(job.pid, 0)
    assert not (workdir_with_model / "CURRENT").exists()
    rerun = run_embed(EmbedConfig(workdir=str(workdir_with_model), incremental=True, max_batch_size=32))
    total = len(list_images(corpus))
    assert rerun.unchanged >= 2 * 32 and rerun.items == total and rerun.embedded == total - rerun.unchanged


def test_index_is_built_shard_by_shard_in_the_pipeline(workdir_with_model, digits_corpus):
    shutil.copytree(digits_corpus, workdir_with_model / "corpus")
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), num_shards=3))
    index = ItemIndex.load(workdir_with_model / "indexes" / summary.index_version)
    assert [s["name"] for s in index.manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    assert sum(s["count"] for s in index.manifest["shards"]) == len(index) == summary.items
    emb, items = read_embeddings(workdir_with_model / "embeddings" / summary.run)
    found = index.search(emb, k=1)
    assert [f[0].id for f in found] == items.column("id").to_pylist()  # every item finds itself across shards
    assert not list((workdir_with_model / "indexes").glob(".tmp-*"))


def test_a_default_run_name_already_taken_gets_a_number(workdir_with_model, digits_corpus):
    import time

    corpus = workdir_with_model / "corpus"
    shutil.copytree(digits_corpus, corpus)
    now = time.time()
    taken = {time.strftime("e-%Y%m%dT%H%M%S", time.gmtime(now + s)) for s in range(0, 4)}
    for name in taken:
        (workdir_with_model / "embeddings" / name).mkdir(parents=True)
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), publish=False))
    assert summary.run.rsplit("-", 1)[0] in taken and summary.run.endswith("-2"), summary.run
    assert summary.items == len(list_images(corpus))


def test_the_embedding_cache_is_keyed_by_the_image_decoding(tmp_path, monkeypatch) -> None:
    """Embeddings made by another image decoding (an earlier version) are never reused: the
    cache folder names the decoding's version."""
    from lookalike.model import preprocess
    from lookalike.pipeline.cache import cache_dir

    now = cache_dir(tmp_path, "m-1")
    assert now == tmp_path / "cache" / f"m-1~d{preprocess.IMAGE_DECODING_VERSION}"
    monkeypatch.setattr(preprocess, "IMAGE_DECODING_VERSION", preprocess.IMAGE_DECODING_VERSION + 1)
    assert cache_dir(tmp_path, "m-1") != now
    monkeypatch.setattr(preprocess, "IMAGE_DECODING_VERSION", 1)
    assert cache_dir(tmp_path, "m-1") == tmp_path / "cache" / "m-1"  # stores written before the key existed


def test_a_corpus_that_is_a_file_is_named_as_such(workdir_with_model, digits_corpus):
    from lookalike.model.store import StoreError

    picture = next((digits_corpus / "0").glob("*.png"))
    with pytest.raises(StoreError, match=rf"corpus {picture} is a file, not a folder: pass its folder "
                                         rf"\(--corpus {picture.parent}\), or .*--list-file"):
        run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus=str(picture)))
    assert not (workdir_with_model / "embeddings").exists()


@pytest.mark.parametrize("mode", ["auto", "tree_exact"])
def test_a_corpus_of_one_decodable_image_publishes_a_searchable_index(workdir_with_model, digits_corpus, mode, caplog):
    from lookalike.index.builder import IndexOptions

    corpus = workdir_with_model / "one"
    corpus.mkdir()
    Image.open(next((digits_corpus / "0").glob("*.png"))).convert("RGB").save(corpus / "only.jpg", quality=95)
    (corpus / "broken.jpg").write_text("not a jpeg")  # only one file decodes
    with caplog.at_level(logging.INFO, logger="lookalike.index.builder"):
        summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus=str(corpus), run_name="one",
                                        index=IndexOptions(mode=mode)))
    assert (summary.items, summary.failed) == (1, 1)
    built = [r.getMessage() for r in caplog.records if r.name == "lookalike.index.builder" and "shard(s), mode" in r.getMessage()]
    assert built and "recall not measured (too few items" in built[0] and "recall@" not in built[0], built
    assert (workdir_with_model / "embeddings" / "one" / "summary.json").is_file()
    index = ItemIndex.load(workdir_with_model / "indexes" / summary.index_version)
    assert "skipped" in index.manifest["tuning"] and index.manifest["tuning"]["target_met"]
    assert [n.id for n in index.search(index.embeddings[0], 10)[0]] == ["only.jpg"]
    from lookalike.model.store import Store
    from lookalike.pipeline.versions import list_versions

    [row] = [r for r in list_versions(Store.at(workdir_with_model)) if r["version"] == summary.index_version]
    assert row["recall_at_10"] is None and row["recall"] is None  # not measured: no "recall@10 1.0"
    from lookalike.serving.app import index_quality

    quality = index_quality(index.manifest)  # as /v1/info gives it
    assert quality["recall"] is None and quality["target_met"] is None and quality["skipped"]


def test_an_embed_that_publishes_is_refused_before_any_work_while_another_run_holds_the_store_lock(tmp_path,
                                                                                                   indexed_store,
                                                                                                   capsys):
    """A reindex (or versions promote|rollback) holds the lock: an embed publishing meanwhile
    would move CURRENT under it. --no-publish (how reindex embeds, under its own lock) needs none."""
    from lookalike.model.store import Store
    from lookalike.pipeline.cli import main
    from lookalike.model.store_lock import LOCK_NAME, LockHeldError, StoreLock

    workdir = tmp_path / "store"
    shutil.copytree(indexed_store.root, workdir)
    store = Store.at(workdir)
    before, runs = store.current_index(), sorted(p.name for p in store.embeddings_dir.iterdir())
    with StoreLock(workdir, purpose="reindex"):
        with pytest.raises(LockHeldError, match=r"another run holds .*\.reindex\.lock \(reindex, pid"):
            run_embed(EmbedConfig(workdir=str(workdir), run_name="refused"))
        assert main(["embed", "--workdir", str(workdir), "--run-name", "refused", "--incremental"]) == 75
        assert "lookalike embed: error: another run holds" in capsys.readouterr().err
        assert sorted(p.name for p in store.embeddings_dir.iterdir()) == runs  # no run was started
        aside = run_embed(EmbedConfig(workdir=str(workdir), incremental=True, publish=False, run_name="aside"))
        assert aside.items > 0 and aside.index_version is None
    assert store.current_index() == before
    kept = run_embed(EmbedConfig(workdir=str(workdir), incremental=True))  # the lock is free again
    assert kept.index_version == before and not (workdir / LOCK_NAME).exists()


def test_an_embed_holds_the_store_lock_for_its_whole_run(ctrl_c_as_in_a_terminal, workdir_with_model, digits_corpus):
    """So a reindex or versions promote|rollback started meanwhile is refused, naming the embed."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from lookalike.model.store_lock import LockHeldError, StoreLock

    shutil.copytree(digits_corpus, workdir_with_model / "corpus")
    exe = str(Path(sys.executable).with_name("lookalike"))
    job = subprocess.Popen([exe, "embed", "--workdir", str(workdir_with_model), "--batch-size", "32"],
                           env={**os.environ, "LOOKALIKE_FAILPOINT": "embed_batch_2:wait"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        seen = []
        while not any("failpoint embed_batch_2: waiting" in line for line in seen):
            line = job.stderr.readline()
            assert line, "".join(seen)[-3000:]
            seen.append(line)
        with pytest.raises(LockHeldError, match=rf"another run holds .* \(embed, pid {job.pid} "):
            StoreLock(workdir_with_model).acquire()
    finally:
        os.killpg(job.pid, signal.SIGINT)
        job.communicate(timeout=120)
    assert job.returncode == 130
    with StoreLock(workdir_with_model) as lock:  # released by the interrupted run
        assert not lock.took_over_stale


def _embed_within(config: EmbedConfig, timeout_s: float, unblock: list) -> object:
    """``run_embed(config)`` on a daemon thread: the summary, or the test fails after
    ``timeout_s`` instead of hanging on a read that blocks (a named pipe opened for reading
    waits for a writer: the test then opens each pipe in ``unblock`` for writing, to free it)."""
    import os
    import threading

    out: dict = {}

    def run():
        try:
            out["summary"] = run_embed(config)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        for pipe in unblock:
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader sees end of file
            except OSError:
                pass
        thread.join(timeout_s)
        pytest.fail(f"embed still running after {timeout_s}s: blocked opening a named pipe")
    if "error" in out:
        raise out["error"]
    return out["summary"]


@pytest.mark.parametrize("source", ["folder", "incremental", "glob", "list"])
def test_a_named_pipe_in_the_corpus_is_dead_lettered_never_opened(workdir_with_model, digits_corpus, source,
                                                                     monkeypatch):
    """A named pipe (and a link to one) is not a regular file: whether walked, matched by a glob
    or listed, it is never opened (that would block until a writer comes, and opening a device
    may do something), but dead-lettered. Every open in the process is watched: not even a
    non-blocking one reaches the pipe."""
    import os

    corpus = workdir_with_model / "src"
    (corpus / "cat").mkdir(parents=True)
    for i, f in enumerate(list_images(digits_corpus)[:3]):
        shutil.copy(f, corpus / "cat" / f"{i}.png")
    pipes = [corpus / "cat" / "pipe.png"]
    os.mkfifo(pipes[0])
    os.symlink(pipes[0], corpus / "cat" / "link.png")
    config = EmbedConfig(workdir=str(workdir_with_model), corpus=str(corpus), publish=False,
                         incremental=source == "incremental")
    if source == "glob":
        config = replace(config, corpus=f"{corpus}/c*/*.png")
    if source == "list":
        (workdir_with_model / "list.txt").write_text("\n".join(str(p) for p in sorted((corpus / "cat").iterdir())))
        config = replace(config, corpus=None, list_file=str(workdir_with_model / "list.txt"))
    opened_pipes = []
    real_open = os.open

    def watched_open(path, *args, **kwargs):
        if os.path.realpath(path) == os.path.realpath(pipes[0]):
            opened_pipes.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched_open)
    summary = _embed_within(config, 120.0, pipes)
    monkeypatch.undo()
    assert opened_pipes == []
    assert (summary.items, summary.failed) == (3, 2)
    reasons = {row["uri"].rsplit("/", 1)[-1]: row["reason"] for row in read_dead(workdir_with_model, summary.run)}
    assert set(reasons) == {"pipe.png", "link.png"}
    assert set(reasons.values()) == {"not a regular file (named pipe)"}, reasons  # walked, matched or listed alike


@pytest.mark.parametrize("source", ["folder", "incremental", "glob", "file-by-file"])
def test_a_file_name_that_is_not_utf8_is_a_dead_letter_and_the_rest_indexed(workdir_with_model, digits_corpus, source,
                                                                             monkeypatch, caplog):
    """A Latin-1 name (from an old archive) cannot be an id, which is UTF-8 text: that file,
    or every file of such a folder, is reported with its name escaped and left out; the rest
    is indexed. ``file-by-file``: a corpus too big to list first, read through ``read_one``."""
    import os

    corpus = workdir_with_model / "src"
    (corpus / "cat").mkdir(parents=True)
    images = list_images(digits_corpus)
    shutil.copy(images[0], corpus / "cat" / "ok.png")
    shutil.copy(images[1], os.path.join(os.fsencode(corpus / "cat"), b"bad\xffname.png"))
    os.mkdir(os.path.join(os.fsencode(corpus), b"caf\xe9"))
    shutil.copy(images[2], os.path.join(os.fsencode(corpus), b"caf\xe9", b"x.png"))
    config = EmbedConfig(workdir=str(workdir_with_model), corpus=str(corpus), incremental=source == "incremental")
    if source == "glob":
        config = replace(config, corpus=f"{corpus}/*/*.png")
    if source == "file-by-file":
        monkeypatch.setattr("lookalike.pipeline.embed.LISTING_IN_GRAPH_MAX", 0)
    with caplog.at_level(logging.INFO, logger="lookalike.pipeline.embed"):
        summary = run_embed(config)
    assert (summary.items, summary.failed) == (1, 2) and summary.index_version
    assert f"({summary.items_per_s:.1f} items/s)" in caplog.text  # 1 item in seconds: not "(0 items/s)"
    assert summary.files_matched == 3 and summary.unlisted_folders == 0  # each file indexed or dead-lettered (reindex checks)
    letters = sorted(read_dead(workdir_with_model, summary.run), key=lambda row: row["uri"])
    assert [row["uri"] for row in letters] == [f"{corpus}/caf\\xe9/x.png", f"{corpus}/cat/bad\\xffname.png"]
    assert {row["stage"] for row in letters} == {"list"} and all("not valid UTF-8" in row["reason"] for row in letters)


def test_an_unreadable_corpus_folder_is_a_dead_letter_and_the_rest_indexed(workdir_with_model, digits_corpus,
                                                                           refuse_listing, caplog):
    """A folder that cannot be listed (mode 000 for a non-root user; simulated, as tests run
    as root) is reported with its reason, warned about and counted as failed."""
    corpus = workdir_with_model / "corpus"
    for label in ("open", "locked"):
        (corpus / label).mkdir(parents=True)
        for i, f in enumerate(list_images(digits_corpus / "0")[:2]):
            shutil.copy(f, corpus / label / f"{i}.png")
    locked = str(corpus / "locked")
    refuse_listing(locked)
    with caplog.at_level(logging.WARNING):
        summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), publish=False))
    assert (summary.items, summary.failed) == (2, 1)
    assert (summary.files_matched, summary.unlisted_folders) == (2, 1)  # the folder's files are unknown
    [letter] = read_dead(workdir_with_model, summary.run)
    assert letter["uri"] == locked and letter["stage"] == "list" and "Permission denied" in letter["reason"]
    assert any(locked in r.getMessage() and "Permission denied" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["listed", "file-by-file"])
def test_a_globstar_matches_zero_or_more_folders(workdir_with_model, digits_corpus, mode, monkeypatch):
    """``photos/**/*.png`` takes the files at the top of photos/ too, as a shell's globstar does."""
    corpus = workdir_with_model / "photos"
    (corpus / "sub" / "deeper").mkdir(parents=True)
    images = list_images(digits_corpus)
    for i, name in enumerate(("top.png", "sub/mid.png", "sub/deeper/low.png", "sub/skipped.jpg.txt")):
        shutil.copy(images[i], corpus / name)
    if mode == "file-by-file":
        monkeypatch.setattr("lookalike.pipeline.embed.LISTING_IN_GRAPH_MAX", 0)
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus=f"{corpus}/**/*.png", publish=False))
    _, items = read_embeddings(workdir_with_model / "embeddings" / summary.run)
    assert sorted(items.column("id").to_pylist()) == ["sub/deeper/low.png", "sub/mid.png", "top.png"]
    assert summary.failed == 0


def test_a_relative_glob_records_absolute_uris(workdir_with_model, digits_corpus, tmp_path, monkeypatch):
    """A relative glob is made absolute against the current folder, as a relative folder is:
    a relative uri would later be read against the store root."""
    for label in ("airplane", "ship"):
        (tmp_path / "review" / "c3" / label).mkdir(parents=True)
        for i, f in enumerate(list_images(digits_corpus / "1")[:3]):
            shutil.copy(f, tmp_path / "review" / "c3" / label / f"000{i}.png")
    monkeypatch.chdir(tmp_path / "review")
    summary = run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus="c3/*/000[0-1]*.png", publish=False))
    from lookalike.pipeline.summary import read_items

    items = read_items(workdir_with_model / "embeddings" / summary.run, ("id", "uri")).sort_by("id")
    root = tmp_path / "review" / "c3"
    assert items.column("uri").to_pylist() == [str(root / i) for i in items.column("id").to_pylist()]
    assert sorted(items.column("id").to_pylist()) == [f"{c}/000{i}.png" for c in ("airplane", "ship") for i in (0, 1)]


def test_a_corpus_that_is_the_store_itself_is_refused_before_any_work(workdir_with_model, monkeypatch):
    """`--corpus X --workdir X` would embed the store's thumbnails and models as images, more
    every run; the error says where to keep the store instead."""
    from lookalike.model.store import StoreError

    from lookalike.pipeline.reuse import corpus_is_store

    monkeypatch.chdir(workdir_with_model)
    for corpus in (str(workdir_with_model), ".", f"{workdir_with_model}/models/..", f"{workdir_with_model}/**",
                   "**/*.png", f"{workdir_with_model}/*/*.png"):
        with pytest.raises(StoreError, match=rf"corpus {re.escape(corpus)} is the store itself \(--workdir .*"
                                             rf"--workdir {re.escape(str(workdir_with_model / '.lookalike'))} is left out"):
            run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus=corpus))
    assert not (workdir_with_model / "embeddings").exists() and not (workdir_with_model / "thumbnails").exists()
    # a glob that cannot reach into the store's folders, a store not made yet, a folder inside it: no such refusal
    assert not corpus_is_store(f"{workdir_with_model}/*.png", workdir_with_model)
    assert not corpus_is_store(str(workdir_with_model), workdir_with_model / "new")
    assert not corpus_is_store(str(workdir_with_model / "models"), workdir_with_model)


def test_a_missing_corpus_passed_by_the_user_is_named_without_the_demo_hint(workdir_with_model, monkeypatch, tmp_path):
    from lookalike.model.store import StoreError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=re.escape(f"corpus folder {tmp_path / 'nonexist'} does not exist") + "$"):
        run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus="nonexist"))
    with pytest.raises(StoreError, match="corpus folder .*corpus \\(the default\\) does not exist: pass --corpus FOLDER"):
        run_embed(EmbedConfig(workdir=str(workdir_with_model)))  # the default corpus: the hint helps


def test_a_missing_default_corpus_names_the_folder_the_served_index_was_embedded_from(workdir_with_model, digits_corpus,
                                                                                     tmp_path):
    """`lookalike demo` would write the digits into DIR/corpus and publish them over a store
    embedded from the user's own folder: --corpus comes first, and that folder is named."""
    from lookalike.index.manifest import read_manifest
    from lookalike.model.store import Store, StoreError

    store = Store.at(workdir_with_model)
    with pytest.raises(StoreError) as empty:
        run_embed(EmbedConfig(workdir=str(workdir_with_model)))
    assert str(empty.value).index("--corpus") < str(empty.value).index("lookalike demo")  # nothing served: both hints
    photos = tmp_path / "photos"
    for label in ("0", "1"):
        shutil.copytree(digits_corpus / label, photos / label)
    run_embed(EmbedConfig(workdir=str(workdir_with_model), corpus=str(photos)))
    assert read_manifest(store.require_current_index())["source"] == {"corpus": str(photos)}
    with pytest.raises(StoreError) as served:
        run_embed(EmbedConfig(workdir=str(workdir_with_model)))
    message = str(served.value)
    assert message.startswith(f"corpus folder {store.corpus_dir} (the default) does not exist: pass --corpus FOLDER")
    assert f"the served index {store.current_index()} was embedded from {photos}" in message
    assert f"--corpus {photos}" in message and "lookalike demo" not in message


def test_sigterm_stops_a_two_worker_run_at_once_with_its_one_line(tmp_path, trained_store, digits_corpus):
    """`kill PID` reaches only the lookalike process: it must stop its worker processes itself,
    as for Ctrl-C, not leave Beam waiting on their bundles (and a worker aborting, status -6)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    corpus = tmp_path / "corpus"
    for copy in range(3):  # enough files that the workers are mid-run when the signal comes
        shutil.copytree(digits_corpus, corpus / f"copy{copy}")
    exe = str(Path(sys.executable).with_name("lookalike"))
    job = subprocess.Popen([exe, "embed", "--workdir", str(workdir), "--corpus", str(corpus), "--num-workers", "2",
                            "--no-publish", "--run-name", "stopped"], stderr=subprocess.PIPE, text=True)
    lines = []
    for line in job.stderr:
        lines.append(line)
        if "XLA CPU threads of this process (pid " in line:  # a worker is up and embedding
            job.send_signal(signal.SIGTERM)
            break
    signalled = time.monotonic()
    stderr = "".join(lines) + job.stderr.read()
    assert job.wait(timeout=120) == 143, stderr[-3000:]
    stopped_s = time.monotonic() - signalled
    assert "FATAL" not in stderr and "terminate called" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "exited with return code" not in stderr, stderr[-3000:]
    assert "embed stopped by signal 15: nothing published; every finished batch is in the embedding cache" in stderr
    after = [line for line in stderr.splitlines() if "embed stopped by signal" in line]
    assert len(after) == 1 and not (workdir / "embeddings" / "stopped").exists(), stderr[-3000:]
    assert stopped_s < 60, f"stopped {stopped_s:.0f} s after SIGTERM"  # a hang guard, not a speed figure
