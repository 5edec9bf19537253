"""The artifact store: one directory tree that every job reads and writes.

Layout (``--workdir DIR``)::

    DIR/corpus/<label>/*.png        images (the demo writes the digits here)
    DIR/models/<version>/           trained encoders (model.json + orbax params)
    DIR/models/LATEST               the model embed uses by default: set by train, and on promotion to
                                    the model of the index made CURRENT
    DIR/models/REJECTED             the latest candidate reindex did not promote (kept for inspection)
    DIR/models/ROLLED_BACK.json     models a rollback moved away from (by version): reindex leaves them
    DIR/embeddings/<run>/           Parquet embeddings, dead letters, run summary
    DIR/indexes/<version>/          ScaNN index versions (manifest.json + files)
    DIR/CURRENT                     the index version being served
    DIR/history.jsonl               every move of CURRENT (version, time, reason)
    DIR/thumbnails/                 JPEG previews written by the embed pipeline

Paths the index records for files inside the store (thumbnails) are relative to DIR, so a
store moved or copied elsewhere still finds them; ``resolve_in_store`` reads them, and
also finds a file an older index recorded by its absolute path under the store's old location.

Every path that moves CURRENT goes through ``Store.set_current_index``, which appends the
move to ``history.jsonl`` (rollback and pruning read it). Pointer files are replaced atomically (write a temporary file, fsync, rename), so
a reader sees either the old or the new version, never half of one. Only local
paths are supported today; ``gs://`` and friends are refused with a clear error
rather than misbehaving.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# Folders of the store whose files an index may record (by absolute path, before relative paths).
STORE_FILE_FOLDERS = ("thumbnails", "corpus")


def resolve_in_store(path: str | os.PathLike, root: Path | None) -> Path:
    """The file a path recorded in an index names: a relative path is relative to the store
    ``root``; an absolute one that no longer exists but went through one of the store's own
    folders (``.../corpus/3/x.png``) is looked for at the same place under ``root`` (the
    store was moved or copied); otherwise the path as it is."""
    path = Path(path)
    if root is None:
        return path
    if not path.is_absolute():
        return root / path
    if path.exists():
        return path
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part in STORE_FILE_FOLDERS:
            candidate = root.joinpath(*parts[i:])
            if candidate.exists():
                return candidate
    return path


class StoreError(RuntimeError):
    """The store lacks what a job needs; the message says which step to run."""


class PointerError(StoreError, ValueError):
    """A pointer file (CURRENT, models/LATEST) holds something that is not a version name
    (a ValueError too, as the version-name check raised before)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers never see a partial file. The file gets the
    mode ``open()`` would give it (0666 less the umask), not mkstemp's 0600: a server running
    as another user must be able to read CURRENT, LATEST and manifests."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"cannot create a temporary file beside {path}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_version_name(version: str, what: str = "version name") -> str:
    """Return ``version`` if it is a safe single path component, else ValueError naming
    ``what`` and the reason (its length, its first character, or the characters not allowed)."""
    if not _VERSION_RE.match(version or ""):
        shown = version if len(version or "") <= 60 else f"{version[:60]}..."
        if len(version or "") > 128:
            reason = f"{len(version)} characters, at most 128"
        elif version and not (version[0].isascii() and version[0].isalnum()):
            reason = "it must start with an ASCII letter or digit"
        else:
            bad = sorted(set(ch for ch in version or "" if not (ch.isascii() and (ch.isalnum() or ch in "._-"))))
            reason = f"{', '.join(repr(ch) for ch in bad)} not allowed" if bad else "it is empty"
        raise ValueError(f"invalid {what} {shown!r} ({reason}): use ASCII letters, digits, '.', '_' or '-'")
    return version


# In a model folder: reindex trained this model (``Store.mark_reindex_model``).
REINDEX_MARK = ".trained-by-reindex"
# In an embedding run folder: reindex made this run (``Store.mark_reindex_run``).
REINDEX_RUN_MARK = ".made-by-reindex"
# In models/: the models `versions rollback` moved the served index away from, by version
# (``Store.mark_rolled_back_model``): reindex does not promote them again unless forced. Kept
# outside the model folders: pruning may delete a model that reindex would train again, by the
# same name, from the same inputs.
ROLLED_BACK_FILE = "ROLLED_BACK.json"


def versions_in(folder: Path, marker: str) -> list[str]:
    """Names of the versions in ``folder`` (visible sub-folders holding the file ``marker``:
    ``model.json``, ``manifest.json``), newest first by that file's modification time."""
    found: list[tuple[int, str]] = []
    try:
        for p in folder.iterdir():
            if p.name.startswith(".") or not (p / marker).is_file():
                continue
            found.append(((p / marker).stat().st_mtime_ns, p.name))
    except OSError:
        return []
    return [name for _, name in sorted(found, reverse=True)]


def name_versions(kind: str, names: list[str], limit: int = 5) -> str:
    """``names`` (newest first) for a message: ``the existing model versions (7 in all, newest
    first): a, b, c, d, e, ...``; at most ``limit`` named."""
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"the existing {kind} versions ({len(names)} in all, newest first): {shown}"


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
        except UnicodeDecodeError as e:
            raise PointerError(f"{path} is garbled ({e}): {self._repair_hint(path)}") from None
        try:
            return check_version_name(text) if text else None
        except ValueError as e:
            raise PointerError(f"{path} is garbled: {e}; {self._repair_hint(path)}") from None

    def _repair_hint(self, path: Path) -> str:
        if path.name == "CURRENT":
            return f"repair it with `lookalike versions promote VERSION --workdir {self.root}`"
        return f"repair it with `lookalike train --workdir {self.root}` or by writing a model version into it"

    def latest_model(self) -> str | None:
        return self._read_pointer(self.models_dir / "LATEST")

    def set_latest_model(self, version: str) -> None:
        if not (self.model_dir(version) / "model.json").is_file():
            raise StoreError(f"model {version!r} is not complete in {self.models_dir}")
        atomic_write_text(self.models_dir / "LATEST", version + "\n")

    def rejected_model(self) -> str | None:
        """The latest candidate model reindex rejected or could not promote (None if none or unreadable)."""
        try:
            return self._read_pointer(self.models_dir / "REJECTED")
        except PointerError as e:
            log.warning("%s", e)
            return None

    def set_rejected_model(self, version: str) -> None:
        atomic_write_text(self.models_dir / "REJECTED", check_version_name(version) + "\n")

    def mark_reindex_model(self, version: str) -> None:
        """Note that ``reindex`` trained model ``version`` (``REINDEX_MARK`` in its folder), so
        pruning may delete it once no index uses it; a model trained by hand is never pruned
        unless an index that used it was."""
        (self.model_dir(version) / REINDEX_MARK).touch()

    def is_reindex_model(self, version: str) -> bool:
        return (self.model_dir(version) / REINDEX_MARK).is_file()

    def mark_rolled_back_model(self, version: str, index: str) -> None:
        """Note that a rollback moved the served index away from ``index``, built by model
        ``version`` (``ROLLED_BACK_FILE``: the index and when, by model version), so that
        reindex, which would train or reuse the same model from the same inputs, does not
        promote it again unless forced. Serving the model again clears it."""
        marks = self._rolled_back(for_update=True)
        marks[check_version_name(version)] = {"index": index, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._write_rolled_back(marks)

    def rolled_back_from(self, version: str) -> dict | None:
        """The rollback away from model ``version`` ({"index", "time"}), or None if it has none.
        A ``ROLLED_BACK_FILE`` that cannot be read counts every model as rolled back (with
        an "error"): an operator's rollback is never forgotten by a damaged file."""
        try:
            record = self._rolled_back().get(version)
        except (OSError, ValueError) as e:
            return {"index": None, "time": None, "error": f"{self.models_dir / ROLLED_BACK_FILE} cannot be read ({e}): "
                                                          "fix or delete it"}
        return None if record is None else record if isinstance(record, dict) else {"index": None, "time": None}

    def clear_rolled_back_mark(self, version: str) -> None:
        marks = self._rolled_back(for_update=True)
        if marks.pop(version, None) is not None:
            self._write_rolled_back(marks)

    def _write_rolled_back(self, marks: dict[str, Any]) -> None:
        atomic_write_text(self.models_dir / ROLLED_BACK_FILE, json.dumps(marks, indent=1, sort_keys=True) + "\n")

    def _rolled_back(self, for_update: bool = False) -> dict[str, Any]:
        """The marks by model version; OSError or ValueError if the file cannot be read, unless
        ``for_update``: then a damaged file is moved aside (``.damaged-<time>``, logged) and the
        marks start afresh."""
        path = self.models_dir / ROLLED_BACK_FILE
        try:
            marks = json.loads(path.read_text("utf-8"))
            if not isinstance(marks, dict):
                raise ValueError(f"expected a JSON object, got {type(marks).__name__}")
            return marks
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            if not for_update:
                raise
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
            os.replace(path, aside)
            log.warning("%s could not be read (%s): moved to %s; the rollback marks start afresh", path, e, aside)
            return {}

    def mark_reindex_run(self, run: str) -> None:
        """Note that ``reindex`` made embedding run ``run`` (``REINDEX_RUN_MARK`` in its
        folder): pruning keeps only the latest such runs; a run of `lookalike embed` is the
        user's and never pruned."""
        (self.embedding_run_dir(run) / REINDEX_RUN_MARK).touch()

    def current_index(self) -> str | None:
        """The served index version (None: no CURRENT); PointerError if CURRENT is garbled."""
        return self._read_pointer(self.root / "CURRENT")

    def current_index_or_none(self) -> str | None:
        """Like ``current_index`` but a garbled CURRENT is logged and reads as None (for error
        paths and for commands that repair it)."""
        try:
            return self.current_index()
        except PointerError as e:
            log.warning("%s", e)
            return None

    def set_current_index(self, version: str, reason: str = "set CURRENT") -> None:
        """Point CURRENT at ``version`` (atomically) and append the move to history.jsonl. When
        the history cannot be written (a full disk, a read-only file), CURRENT is put back as
        it was and the OSError raised: a move the history does not record would be a
        promotion that no report names and no rollback can undo."""
        if not (self.index_dir(version) / "manifest.json").is_file():
            raise StoreError(f"index {version!r} is not complete in {self.indexes_dir}")
        current = self.root / "CURRENT"
        try:
            before: bytes | None = current.read_bytes()
        except FileNotFoundError:
            before = None
        atomic_write_text(current, version + "\n")
        try:
            self.record_history(version, reason)
        except BaseException:  # an OSError, or a stop signal between the two writes
            if before is None:
                current.unlink(missing_ok=True)
            else:
                atomic_write_text(current, before.decode("utf-8", errors="replace"))
            log.error("CURRENT stays %s: the move to %s could not be recorded in %s",
                      before.decode("utf-8", errors="replace").strip() if before else "unset", version, self.history_path)
            raise

    # --- promotion history ---------------------------------------------------
    @property
    def history_path(self) -> Path:
        return self.root / HISTORY

    def record_history(self, version: str, reason: str) -> None:
        """Append one entry to history.jsonl, durably; on failure the file is cut back to its
        size before, so no partial or unsynced entry records a move that did not happen."""
        entry = {"version": check_version_name(version), "unix_s": time.time(), "reason": reason}
        with self.history_path.open("a+b") as f:
            size = f.seek(0, os.SEEK_END)
            try:
                if size and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    f.write(b"\n")  # end a line a crash truncated, or this entry would be lost with it
                f.write((json.dumps(entry) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                try:
                    f.truncate(size)
                except OSError:
                    pass
                raise

    def history(self) -> list[dict]:
        """Every recorded move of CURRENT, oldest first. Lines that are not a complete entry
        (e.g. truncated by a crash) are skipped with a warning naming the file and line."""
        try:
            lines = self.history_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                check_version_name(entry["version"])
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s line %d is not a history entry (%s): skipped", self.history_path, number,
                            e if not isinstance(e, KeyError) else f"no {e}")
                continue
            entries.append(entry)
        return entries

    # --- lookups with helpful errors -----------------------------------------
    def require_model(self, version: str | None = None) -> Path:
        """Directory of model ``version`` (default: LATEST), or a StoreError saying what to run."""
        version = version or self.latest_model()
        if version is None:
            raise StoreError(
                f"no trained model in {self.models_dir}: run `lookalike train --workdir {self.root} --data FOLDER` "
                "(labelled sub-folders; `--unlabelled` for a flat photo folder) first"
            )
        path = self.model_dir(version)
        others = versions_in(self.models_dir, "model.json") if not path.exists() else []
        if others:  # a mistyped version: name the ones there are, not "train again"
            raise StoreError(f"no model version {version!r} in {self.models_dir}: {name_versions('model', others)}")
        if not (path / "model.json").is_file():
            raise StoreError(
                f"model {version!r} is missing or incomplete at {path}: "
                f"run `lookalike train --workdir {self.root}` again"
            )
        return path

    def require_current_index(self) -> Path:
        """Directory of the served index version, or a StoreError saying what to run."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"workdir {self.root} is not a folder: give the store's folder (the one holding CURRENT)")
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
                f"CURRENT names index {version!r} but {path} is missing or incomplete (no manifest.json): run "
                f"`lookalike versions rollback --workdir {self.root}` to serve an earlier version, or `lookalike embed "
                f"--workdir {self.root}` to publish a new one"
            )
        return path
