"""Reading corpus files: whole, whatever the size the listing saw, with errors naming the path."""

import os

import pytest

from lookalike.pipeline.sources import read_bytes


@pytest.mark.parametrize("size_hint", [0, 10, 3_000_000, 5_000_000])
def test_a_local_file_is_read_whole_whatever_its_listed_size(tmp_path, size_hint):
    """A listed size that is right, too small (the file grew) or too large (it shrank) or
    unknown (0) still gives every byte; so does an empty file."""
    data = os.urandom(3_000_000)
    (tmp_path / "f.bin").write_bytes(data)
    assert read_bytes(str(tmp_path / "f.bin"), size_hint) == data
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert read_bytes(str(tmp_path / "empty.jpg"), size_hint) == b""


def test_unreadable_paths_raise_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_bytes(str(tmp_path / "missing.jpg"))
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.jpg"):
        read_bytes(str(tmp_path / "folder.jpg"), 4096)
