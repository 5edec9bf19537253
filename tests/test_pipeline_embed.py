"""The Beam embed pipeline on a tiny real corpus, on the in-process runner."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lookalike.index.searcher import ItemIndex
from lookalike.model.data import list_images
from lookalike.pipeline.embed import EmbedConfig, EmbedError, read_embeddings, run_embed
from lookalike.pipeline.sources import corpus_pattern, corpus_root, item_id_for


def test_one_embedding_per_input_matching_the_encoder(indexed_store, encoder):
    files = list_images(indexed_store.corpus_dir)
    run_dir = next(indexed_store.embeddings_dir.iterdir())
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


def test_bad_files_are_dead_lettered_and_the_rest_indexed(tmp_path, trained_store):
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
    summary = run_embed(EmbedConfig(workdir=str(workdir), run_name="with-bad"))
    assert (summary.embedded, summary.failed) == (good, 4)
    dead = {row["uri"].rsplit("/", 1)[-1]: row for row in summary.dead_letter_examples}
    assert set(dead) == {"truncated.jpg", "zero.png", "text.jpg", "notes.txt"}
    assert "empty" in dead["zero.png"]["reason"] and dead["notes.txt"]["stage"] == "filter"
    assert len(ItemIndex.load(workdir / "indexes" / summary.index_version)) == good


def test_all_bad_corpus_fails_and_publishes_nothing(tmp_path, trained_store):
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    (workdir / "bad" / "x").mkdir(parents=True)
    (workdir / "bad" / "x" / "a.png").write_text("nope")
    with pytest.raises(EmbedError, match="nothing embedded"):
        run_embed(EmbedConfig(workdir=str(workdir), corpus=str(workdir / "bad")))
    assert not (workdir / "CURRENT").exists()


def test_multi_process_runner_gives_the_same_embeddings(tmp_path, indexed_store):
    workdir = tmp_path / "w"
    shutil.copytree(indexed_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), corpus=str(indexed_store.corpus_dir), num_workers=2, publish=False))
    emb2, items2 = read_embeddings(workdir / "embeddings" / summary.run)
    emb1, items1 = read_embeddings(next(indexed_store.embeddings_dir.iterdir()))
    assert items2.column("id").to_pylist() == items1.column("id").to_pylist()
    np.testing.assert_allclose(emb2, emb1, atol=1e-5)


def test_corpus_patterns_and_ids():
    assert corpus_pattern("/data/imgs") == "/data/imgs/**"
    assert corpus_pattern("/data/imgs/*.jpg") == "/data/imgs/*.jpg"
    assert corpus_root("/data/imgs/*.jpg") == "/data/imgs"
    assert item_id_for("/data/imgs/a/b.png", "/data/imgs") == "a/b.png"


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
