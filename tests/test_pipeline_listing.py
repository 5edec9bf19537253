"""The listed corpus: chunks of a listing, and reading it range by range (lean and general paths alike)."""

import io
import os
import shutil

import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata
from PIL import Image

from lookalike.model.preprocess import PreprocessSpec
from lookalike.pipeline.batches import BATCH, DecodeBatchFn
from lookalike.pipeline.listing import ListingReader, ReadChunkFn, read_listing, write_listing
from lookalike.pipeline.sources import CACHED, DEAD
from lookalike.pipeline.video import FrameSampling

SPEC = PreprocessSpec(8, 3)


def test_listing_chunks_never_split_files_of_one_size(tmp_path):
    sizes = [5] * 7 + [3] * 2 + [9] * 4 + [1]
    files = [FileMetadata(f"/c/{i:02d}.png", size, 100.0 + i) for i, size in enumerate(sizes)]
    chunks = write_listing(str(tmp_path / "l.arrow"), files, chunk_files=3)
    paths, got_sizes, mtimes, _ = read_listing(str(tmp_path / "l.arrow"))
    assert got_sizes == sorted(sizes) and sorted(paths) == sorted(f.path for f in files)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(files)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, nothing left out
    for _, stop in chunks[:-1]:
        assert got_sizes[stop - 1] != got_sizes[stop]  # a size never spans two chunks
    assert mtimes[paths.index("/c/13.png")] == 113.0
    assert write_listing(str(tmp_path / "empty.arrow"), []) == []


def jpeg(pixels: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


@pytest.fixture
def mixed_corpus(tmp_path) -> list[FileMetadata]:
    """Plain JPEGs of the model's shape (the lean path) among every file that must leave it:
    another size, grayscale, EXIF, PNG, truncated, not an image, empty, not media, missing,
    and byte-identical copies."""
    rng = np.random.default_rng(7)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"plain{i:02d}.jpg").write_bytes(jpeg(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    shutil.copy(corpus / "plain03.jpg", corpus / "copy03.jpg")
    shutil.copy(corpus / "plain07.jpg", corpus / "sub-copy07.jpeg")
    (corpus / "bigger.jpg").write_bytes(jpeg(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)))
    (corpus / "gray.jpg").write_bytes(jpeg(rng.integers(0, 256, (8, 8), dtype=np.uint8)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter turn
    (corpus / "exif.jpg").write_bytes(jpeg(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), exif=exif))
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(corpus / "image.png")
    (corpus / "cut.jpg").write_bytes((corpus / "bigger.jpg").read_bytes()[:200])
    (corpus / "text.jpg").write_text("not a picture")
    (corpus / "empty.jpg").write_bytes(b"")
    (corpus / "notes.txt").write_text("not media")
    files = [FileMetadata(str(p), p.stat().st_size, p.stat().st_mtime) for p in sorted(corpus.iterdir())]
    return files + [FileMetadata(str(corpus / "gone.jpg"), 900, 1.0)]  # listed, then deleted


def make_reader(cache: set[str] | None = None, undecodable: dict | None = None, force_general: bool = False,
                listed: list[FileMetadata] = ()) -> ListingReader:
    reader = ListingReader(None, 0, FrameSampling())
    reader.setup()
    reader._cache = cache or set()
    reader._undecodable = undecodable or {}
    if force_general:  # every path known to the file index, with another size: read_one reads each again
        reader._files = {m.path: (-1, -1.0, "0" * 64, None) for m in listed}
    return reader


def test_lean_reads_give_what_read_one_gives(tmp_path, mixed_corpus):
    """read_range's lean path and ``read_one`` give the same entries, file index rows, cached
    files and dead letters, with and without an embedding cache that knows some bytes."""
    listing = str(tmp_path / "l.arrow")
    chunks = write_listing(listing, mixed_corpus)
    listed = read_listing(listing)
    stop = chunks[-1][1]
    first = make_reader().read_range(listed, 0, stop, 1 << 30)
    hashes = {uri: h for h, uri, _ in first.entries}
    cache = {hashes[str(tmp_path / "corpus" / "plain05.jpg")]}
    undecodable = {hashes[str(tmp_path / "corpus" / "text.jpg")]: ("decode", "not a recognised image format")}
    for known in ({}, {"cache": cache, "undecodable": undecodable}):
        reader = make_reader(**known)
        read_one_calls = []
        real_read_one = reader.read_one
        reader.read_one = lambda uri, *args, **kwargs: read_one_calls.append(uri) or real_read_one(uri, *args, **kwargs)
        lean = reader.read_range(listed, 0, stop, 1 << 30)
        assert sorted(os.path.basename(uri) for uri in read_one_calls) == ["gone.jpg", "notes.txt"]  # the rest: lean
        general = make_reader(**known, force_general=True, listed=mixed_corpus).read_range(listed, 0,
                                                                                           stop, 1 << 30)
        assert lean.entries == general.entries
        assert lean.file_rows == general.file_rows and lean.cached == general.cached
        assert sorted(map(repr, lean.others)) == sorted(map(repr, general.others))
    assert len(first.entries) == 21 and len(first.file_rows) == 21  # every readable media file; none for gone.jpg
    dead = {value["uri"].rsplit("/", 1)[1]: value["stage"] for tag, value in first.others if tag == DEAD}
    assert dead == {"notes.txt": "filter", "gone.jpg": "read"}
    assert [uri.rsplit("/", 1)[1] for uri, _ in lean.cached] == ["plain05.jpg"]
    assert [(t, v["uri"].rsplit("/", 1)[1]) for t, v in lean.others if v["stage"] == "decode"] == [(DEAD, "text.jpg")]


def test_an_embedding_wins_over_a_failure_record_of_the_same_bytes(tmp_path, mixed_corpus):
    """Bytes with both an embedding and a failure record (one that failed once, then decoded in a
    run without --incremental) are reused on the lean and the general path alike, as
    ``reuse.plan_reuse`` does, not dead-lettered: every path holding them is an item."""
    listing = str(tmp_path / "l.arrow")
    chunks = write_listing(listing, mixed_corpus)
    listed = read_listing(listing)
    stop = chunks[-1][1]
    hashes = {uri: h for h, uri, _ in make_reader().read_range(listed, 0, stop, 1 << 30).entries}
    known = hashes[str(tmp_path / "corpus" / "plain03.jpg")]  # copy03.jpg holds the same bytes
    for general in (False, True):
        reader = make_reader(cache={known}, undecodable={known: ("decode", "it failed once")}, force_general=general,
                             listed=mixed_corpus)
        out = reader.read_range(listed, 0, stop, 1 << 30)
        assert sorted(os.path.basename(uri) for uri, h in out.cached if h == known) == ["copy03.jpg", "plain03.jpg"]
        assert not [v for tag, v in out.others if tag == DEAD and "failed once" in v["reason"]]


def test_lean_reads_carry_bytes_up_to_the_budget(tmp_path, mixed_corpus):
    listing = str(tmp_path / "l.arrow")
    write_listing(listing, mixed_corpus)
    listed = read_listing(listing)
    paths = listed.paths
    out = make_reader().read_range(listed, 0, len(paths), 1000)
    carried = [len(data) for _, _, data in out.entries if data is not None]
    assert carried and sum(carried[:-1]) < 1000 <= sum(carried)  # the last file carried crossed the budget
    assert any(data is None for _, _, data in out.entries)  # the rest are read again where decoded
    assert out.carried == sum(carried)


def chunk_outputs(listing: str, chunks, thumbnails: str, general: bool, monkeypatch) -> dict:
    """Everything ``ReadChunkFn`` yields for ``chunks``: batches as (metas, pixels), dead letters."""
    if general:  # decode every source as a photo or video would be
        monkeypatch.setattr(DecodeBatchFn, "_decode_small", DecodeBatchFn._decode)
    fn = ReadChunkFn(listing, None, 0, SPEC, thumbnails, FrameSampling(), batch_size=5, decode_threads=1)
    fn.setup()
    fn.start_bundle()
    try:
        outputs = [o for c in chunks for o in fn.process(c)] + [w.value for w in fn.finish_bundle()]
    finally:
        fn.teardown()
        monkeypatch.undo()
    batches = [value for tag, value in outputs if tag == BATCH]
    return {"metas": [m for b in batches for m in b.metas],
            "pixels": np.concatenate([b.pixels for b in batches]),
            "dead": sorted((v["uri"], v["stage"], v["reason"]) for tag, v in outputs if tag == DEAD),
            "cached": [v for tag, v in outputs if tag == CACHED]}


def test_lean_decodes_give_what_decode_source_gives(tmp_path, mixed_corpus, monkeypatch):
    """A plain JPEG (of the model's shape or not) is decoded on the lean path
    (``_decode_small``): the same metas, pixels, dead letters and thumbnails as
    ``decode_source`` gives, in the same batches; every other file still goes through
    ``decode_source``."""
    listing = str(tmp_path / "l.arrow")
    chunks = write_listing(listing, mixed_corpus, chunk_files=4)
    assert len(chunks) > 2
    import lookalike.pipeline.batches as batches

    lean_calls, general_calls = [], []
    real_small, real_decode_source = DecodeBatchFn._decode_small, batches.decode_source
    monkeypatch.setattr(DecodeBatchFn, "_decode_small", lambda self, s: lean_calls.append(s[1][0]) or real_small(self, s))
    monkeypatch.setattr(batches, "decode_source", lambda h, uris, *a, **k: general_calls.append(uris[0])
                        or real_decode_source(h, uris, *a, **k))
    lean = chunk_outputs(listing, chunks, str(tmp_path / "t-lean"), False, monkeypatch)
    assert sorted(os.path.basename(uri) for uri in general_calls) == ["cut.jpg", "empty.jpg", "exif.jpg", "gray.jpg",
                                                                       "image.png", "text.jpg"]
    general = chunk_outputs(listing, chunks, str(tmp_path / "t-general"), True, monkeypatch)
    assert lean["metas"] == general["metas"] and len(lean["metas"]) == 16  # 12 plain, bigger, gray, exif, png
    np.testing.assert_array_equal(lean["pixels"], general["pixels"])
    assert lean["dead"] == general["dead"]
    assert {os.path.basename(uri) for uri, _, _ in lean["dead"]} == {"cut.jpg", "text.jpg", "empty.jpg", "notes.txt",
                                                                      "gone.jpg"}
    assert sorted(len(m["uris"]) for m in lean["metas"])[-2:] == [2, 2]  # the copies: decoded once each
    assert len(lean_calls) == 19  # every source (copies are one) of a small group goes to _decode_small first
    for folder in ("t-lean", "t-general"):
        assert len(list((tmp_path / folder).rglob("*.jpg"))) == 16
    lean_thumbs = {p.relative_to(tmp_path / "t-lean"): p.read_bytes() for p in (tmp_path / "t-lean").rglob("*.jpg")}
    general_thumbs = {p.relative_to(tmp_path / "t-general"): p.read_bytes()
                      for p in (tmp_path / "t-general").rglob("*.jpg")}
    assert lean_thumbs == general_thumbs


def test_big_files_are_read_and_hashed_on_the_pool_in_order(tmp_path, watch_decode_pools):
    """With a pool, a range is read and hashed several files at once: the same outputs, in
    the listing's order, as one file at a time (and a file that cannot be read still goes
    through ``read_one``, which says why)."""
    from concurrent.futures import ThreadPoolExecutor

    import lookalike.pipeline.listing as listing

    rng = np.random.default_rng(5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(7):  # noise PNGs of ~49 KB
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(corpus / f"big{i}.png")
    files = [FileMetadata(str(p), p.stat().st_size, p.stat().st_mtime) for p in sorted(corpus.iterdir())]
    files.append(FileMetadata(str(corpus / "gone.png"), 60_000, 1.0))
    write_listing(str(tmp_path / "l.arrow"), files)
    listed = read_listing(str(tmp_path / "l.arrow"))
    paths = listed.paths
    used = watch_decode_pools(listing)
    one = make_reader().read_range(listed, 0, len(paths), 100_000)
    with ThreadPoolExecutor(3) as pool:
        several = make_reader().read_range(listed, 0, len(paths), 100_000, pool)
    assert used == [False, True]
    assert several.entries == one.entries and [uri for _, uri, _ in one.entries] == sorted(paths)[:-1]
    assert several.file_rows == one.file_rows and several.others == one.others and len(one.others) == 1
    assert several.carried == one.carried and 0 < one.carried < sum(listed.sizes)
