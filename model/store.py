"""The artifact store: one directory tree that every job reads and writes.

Layout (``--workdir DIR``)::

    DIR/corpus/<label>/*.png        images (the demo writes the digits here)
    DIR/models/<version>/           trained encoders (model.json + orbax params)
    DIR/models/LATEST               version of the newest trained model
    DIR/embeddings/<run>/           Parquet embeddings, dead letters, run summary
    DIR/indexes/<version>/          ScaNN index versions (manifest.json + files)
    DIR/CURRENT                     the index version being served

Pointer files are replaced atomically (write a temporary file, fsync, rename), so
a reader sees either the old or the new version, never half of one. Only local
paths are supported today; ``gs://`` and friends are refused with a clear error
rather than misbehaving.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(RuntimeError):
    """The store lacks what a job needs; the message says which step to run."""


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_version_name(version: str) -> str:
    """Return ``version`` if it is a safe single path component, else raise."""
    if not _VERSION_RE.match(version or ""):
        raise ValueError(f"invalid version name {version!r}: use letters, digits, '.', '_' or '-'")
    return version


@dataclass(frozen=True)
class Store:
    """Paths of one artifact store rooted at ``root``."""

    root: Path

    @classmethod
    def at(cls, workdir: str | os.PathLike) -> "Store":
        text = os.fspath(workdir)
        if "://" in text:
            raise ValueError(
                f"workdir {text!r}: only local paths are supported for now "
                "(remote stores such as gs:// are planned)"
            )
        return cls(Path(text).expanduser().resolve())

    # --- folders -------------------------------------------------------------
    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def indexes_dir(self) -> Path:
        return self.root / "indexes"

    def model_dir(self, version: str) -> Path:
        return self.models_dir / check_version_name(version)

    def embedding_run_dir(self, run: str) -> Path:
        return self.embeddings_dir / check_version_name(run)

    def index_dir(self, version: str) -> Path:
        return self.indexes_dir / check_version_name(version)

    # --- pointers ------------------------------------------------------------
    def _read_pointer(self, path: Path) -> str | None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return check_version_name(text) if text else None

    def latest_model(self) -> str | None:
        return self._read_pointer(self.models_dir / "LATEST")

    def set_latest_model(self, version: str) -> None:
        if not (self.model_dir(version) / "model.json").is_file():
            raise StoreError(f"model {version!r} is not complete in {self.models_dir}")
        atomic_write_text(self.models_dir / "LATEST", version + "\n")

    def current_index(self) -> str | None:
        return self._read_pointer(self.root / "CURRENT")

    def set_current_index(self, version: str) -> None:
        if not (self.index_dir(version) / "manifest.json").is_file():
            raise StoreError(f"index {version!r} is not complete in {self.indexes_dir}")
        atomic_write_text(self.root / "CURRENT", version + "\n")

    # --- lookups with helpful errors -----------------------------------------
    def require_model(self, version: str | None = None) -> Path:
        """Directory of model ``version`` (default: LATEST), or a StoreError saying what to run."""
        version = version or self.latest_model()
        if version is None:
            raise StoreError(
                f"no trained model in {self.models_dir}: run `lookalike train --workdir {self.root}` first"
            )
        path = self.model_dir(version)
        if not (path / "model.json").is_file():
            raise StoreError(
                f"model {version!r} is missing or incomplete at {path}: "
                f"run `lookalike train --workdir {self.root}` again"
            )
        return path

    def require_current_index(self) -> Path:
        """Directory of the served index version, or a StoreError saying what to run."""
        if not self.root.is_dir():
            raise StoreError(
                f"workdir {self.root} does not exist: run `lookalike demo --workdir {self.root} "
                "--no-serve` or `lookalike train` then `lookalike embed` first"
            )
        version = self.current_index()
        if version is None:
            raise StoreError(
                f"no published index in {self.root} (no CURRENT pointer): "
                f"run `lookalike embed --workdir {self.root}` first"
            )
        path = self.index_dir(version)
        if not (path / "manifest.json").is_file():
            raise StoreError(
                f"CURRENT names index {version!r} but {path} is missing or incomplete: "
                f"run `lookalike embed --workdir {self.root}` again"
            )
        return path
