"""The on-disk index format: manifest, checksums, verification and atomic publishing.

An index version is a folder holding ``manifest.json`` and one sub-folder per shard
(``shard-00000/`` with ``scann/``, ``items.parquet``, ``embeddings.npy``). The manifest
lists the shards with their counts and the SHA-256 of every file, plus the model
version, embedding dim and metric; ``verify_index_dir`` checks all of it before a
byte is trusted. Format 1 (one shard stored at the top of the folder, written before
shards existed) still loads. Versions are written into a hidden temporary folder and
renamed into place, so readers never see half an index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lookalike.model.filelock import try_lock, unlock
from lookalike.model.store import Store, StoreError, atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "lookalike-index/2"
LEGACY_FORMAT = "lookalike-index/1"
METRIC = "dot_product"
SHARD_FILES = ("items.parquet", "embeddings.npy")
TREE_MODES = ("tree_exact", "tree_ah")  # build modes searched by leaves (leaves_to_search applies)
REORDER_MODES = ("ah", "tree_ah")  # build modes scored by AH then reordered exactly (reorder applies)


class IndexLoadError(RuntimeError):
    """An index folder is missing, incomplete, inconsistent or tampered with; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        block = bytearray(4 << 20)
        view = memoryview(block)
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def file_checksums(root: Path, sub: str) -> dict[str, str]:
    """SHA-256 of every file under ``root/sub``, keyed by path relative to ``root``."""
    base = root / sub if sub not in ("", ".") else root
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(root)): sha256_file(p) for p in files}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in an index manifest")


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and structurally check ``path/manifest.json``; format 1 is upgraded in memory."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise IndexLoadError(f"index folder {path} does not exist")
    if not manifest_path.is_file():
        raise IndexLoadError(f"{path} is not a complete index: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexLoadError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise IndexLoadError(f"{manifest_path} is not a JSON object")
    fmt = manifest.get("format")
    if fmt == LEGACY_FORMAT:
        manifest = dict(manifest, shards=[{"name": ".", "count": manifest.get("count"), "files": manifest.get("files", {})}])
    elif fmt != FORMAT:
        raise IndexLoadError(f"{manifest_path}: unsupported format {fmt!r} (expected {FORMAT!r})")
    for key in ("model_version", "count", "embed_dim", "metric", "shards"):
        if key not in manifest:
            raise IndexLoadError(f"{manifest_path}: required field {key!r} is missing")
    if manifest["metric"] != METRIC:
        raise IndexLoadError(f"{manifest_path}: unsupported metric {manifest['metric']!r} (expected {METRIC!r})")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise IndexLoadError(f"{manifest_path}: 'shards' must be a non-empty list")
    if sum(int(s.get("count", -1)) for s in shards) != manifest["count"]:
        raise IndexLoadError(f"{manifest_path}: shard counts {[s.get('count') for s in shards]} do not add up to count {manifest['count']}")
    return manifest


def corpus_source(corpus: str, root: Path) -> dict[str, str]:
    """A manifest's ``source`` for items embedded from the folder (or pattern) ``corpus``: a
    corpus inside the store ``root`` is recorded relative to it (``corpus``), so a store
    moved or copied elsewhere follows its own folder; one elsewhere by its absolute path."""
    if "://" not in corpus and Path(corpus).is_absolute() and Path(corpus).is_relative_to(root):
        return {"corpus": Path(corpus).relative_to(root).as_posix() or "."}
    return {"corpus": corpus}


def recorded_corpus(manifest: dict[str, Any], root: Path) -> str | None:
    """The corpus folder (or pattern) an index's items were embedded from, as its manifest
    records it (``source.corpus``; a relative one is under the store ``root``); None for an
    index built from a list file or a TFDS data set, or by a version that did not record it."""
    source = manifest.get("source")
    corpus = source.get("corpus") if isinstance(source, dict) else None
    if not isinstance(corpus, str) or not corpus:
        return None
    return corpus if "://" in corpus or Path(corpus).is_absolute() else str(root / corpus)


def current_corpus(store: Store) -> str | None:
    """``recorded_corpus`` of the index CURRENT names; None when there is none or it cannot be read."""
    try:
        version = store.current_index()
        return recorded_corpus(read_manifest(store.index_dir(version)), store.root) if version else None
    except (StoreError, IndexLoadError, OSError, ValueError):
        return None


def verify_files(path: Path, manifest: dict[str, Any], verify_checksums: bool = True) -> None:
    """Every file every shard lists exists (and matches its checksum); required files are listed."""
    for shard in manifest["shards"]:
        files = shard.get("files", {})
        prefix = "" if shard["name"] == "." else shard["name"] + "/"
        for required in (*SHARD_FILES, "scann/scann_assets.pbtxt"):
            if prefix + required not in files:
                raise IndexLoadError(f"{path / MANIFEST}: shard {shard['name']!r} does not list {prefix + required}")
        scann_dir = path / prefix / "scann"  # ScaNN loads every file of it (a pickle among them): each one checksummed
        for file in sorted(scann_dir.iterdir()) if scann_dir.is_dir() else []:
            if file.is_file() and f"{prefix}scann/{file.name}" not in files:
                raise IndexLoadError(f"{path / MANIFEST}: shard {shard['name']!r} does not list {prefix}scann/{file.name}, "
                                     "which ScaNN would load unchecked")
        for name in files:
            if not (path / name).is_file():
                raise IndexLoadError(f"index file {path / name} listed in the manifest is missing")
    if not verify_checksums:
        return
    listed = sorted(((path / name, digest) for shard in manifest["shards"] for name, digest in shard.get("files", {}).items()),
                    key=lambda f: -f[0].stat().st_size)  # largest first: the pool finishes together
    with ThreadPoolExecutor(min(len(listed), os.cpu_count() or 1) or 1, thread_name_prefix="sha256") as pool:
        # hashlib releases the GIL on large blocks: the files hash in parallel
        for (file, digest), actual in zip(listed, pool.map(lambda f: sha256_file(f[0]), listed)):
            if actual != digest:
                raise IndexLoadError(f"index file {file} does not match its manifest checksum (corrupt or tampered)")


def new_index_version() -> str:
    return time.strftime("i-%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


WRITER_LOCK_SUFFIX = ".lock"  # indexes/.tmp-<version>.lock: held by the live writer of indexes/.tmp-<version>


def writer_lock_path(tmp: Path) -> Path:
    """The lock file a writer of the temporary folder ``tmp`` holds while it lives."""
    return tmp.with_name(tmp.name + WRITER_LOCK_SUFFIX)


def publish_atomically(store: Store, write: Callable[[Path], Any], *, make_current: bool = True,
                       reason: str = "publish", version: str | None = None, store_locked: bool = False) -> str:
    """Run ``write(tmp_dir)``, rename ``tmp_dir`` to ``indexes/<version>`` (default: a new
    version name), then move CURRENT (recorded in history.jsonl with ``reason``).

    With ``make_current``, the store lock (``lookalike.model.store_lock``) is held from the
    start, so nothing is built while a reindex, a publishing embed or ``versions promote``
    owns the store: ``LockHeldError`` naming the holder. ``store_locked``: the caller holds it.

    Nothing is left behind if ``write`` raises. From before ``tmp_dir`` exists until it is
    renamed or removed, this process holds an OS lock on ``writer_lock_path(tmp_dir)`` (the
    kernel releases it if the process is killed): a folder whose lock can be taken has no live
    writer, and ``pipeline.leftovers.clean_partial_indexes`` may remove it.
    """
    if make_current and not store_locked:
        from lookalike.model.store_lock import StoreLock

        with StoreLock(store.root, purpose="publish"):
            return publish_atomically(store, write, make_current=True, reason=reason, version=version,
                                      store_locked=True)
    store.indexes_dir.mkdir(parents=True, exist_ok=True)
    version = version or new_index_version()
    tmp = store.indexes_dir / f".tmp-{version}"
    lock = writer_lock_path(tmp)
    fd = try_lock(lock)
    if fd is None:
        raise RuntimeError(f"cannot write index {version}: another live process is writing {tmp}")
    try:
        try:
            write(tmp)
            tmp.rename(store.index_dir(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        unlock(lock, fd)
    if make_current:
        try:
            store.set_current_index(version, reason)
        except BaseException:  # CURRENT stays (a full disk for history.jsonl): leave no orphan index behind
            shutil.rmtree(store.index_dir(version), ignore_errors=True)
            raise
    return version
