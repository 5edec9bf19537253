"""Index files whose write fails (``lookalike.index.writes``) name the file and the cause."""

from __future__ import annotations

import errno
import subprocess

import numpy as np
import pytest

from lookalike.index.builder import build_searcher
from lookalike.index.writes import save_array, save_searcher, write_failure


@pytest.fixture
def full_folder(tmp_path):
    """A 64 KiB tmpfs (root only), filled to the last byte."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        with (folder / "filler").open("wb") as f:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_is_named_with_the_file(full_folder):
    path = full_folder / "embeddings.npy"
    with pytest.raises(OSError) as raised:
        save_array(path, np.ones((1000, 8), np.float32))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    assert "No space left on device" in str(raised.value)


def test_scann_failing_on_a_full_disk_is_an_oserror_naming_the_folder(full_folder):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    searcher = build_searcher(emb, {"mode": "brute_force", "num_neighbors": 10}, docids=[str(i) for i in range(300)])
    with pytest.raises(OSError) as raised:
        save_searcher(searcher, full_folder / "scann")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(full_folder / "scann")


def test_a_failure_with_room_left_is_an_io_error_that_keeps_the_cause(tmp_path):
    error = write_failure(tmp_path / "x.npy", RuntimeError("Failed to extract: I/O error"))
    assert error.errno == errno.EIO and error.filename == str(tmp_path / "x.npy")
    assert "RuntimeError: Failed to extract: I/O error" in str(error)


def test_a_parquet_write_on_a_full_disk_names_the_file(full_folder):
    """Arrow says "Error writing bytes to file ... [errno 28]" and names no file."""
    import pyarrow as pa

    from lookalike.index.rows import write_items_parquet
    from lookalike.pipeline.writers import write_items_shard

    items = pa.table({"id": [f"{i:06d}" for i in range(20_000)], "embedding": [[0.5] * 8] * 20_000})
    with pytest.raises(OSError) as raised:
        write_items_parquet(items, full_folder / "items.parquet")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(full_folder / "items.parquet")
    with pytest.raises(OSError) as shard:
        write_items_shard(str(full_folder / "embeddings"), 0, 1, items)
    assert shard.value.errno == errno.ENOSPC and "embeddings-00000-of-00001.parquet" in shard.value.filename
    assert [p.name for p in full_folder.iterdir()] == ["filler"]  # no partial file left
