"""Which files of its training folder a model never trained on, saved beside the model.

The reindex job compares a candidate with the served model on a frozen evaluation set
that candidates are trained without. The served model may have been trained outside
that job (``lookalike train``, the demo) on a random 80 % of the corpus: an evaluation set
drawn at random from the whole corpus is then mostly its training images, and the gate
rewards its memory of them over the candidate's generalisation. ``train`` therefore
records the files it held out (its validation images and any excluded ones) in
``<model>/held_out.json``, and the reindex job draws a new evaluation set from the files
the served model never saw first (``files_unseen_by``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.model.config import TrainConfig
from lookalike.model.data import LabelledImages, split_train_val

log = logging.getLogger(__name__)

HELD_OUT_FILE = "held_out.json"
# The training folder relative to the store (``<store>/models/<version>/`` holds the record), when inside it.
IN_STORE_KEY = "data_dir_in_store"


def write_held_out(path: Path, data_dir: str | Path, data: LabelledImages, config: TrainConfig,
                   exclude: Collection[str] = (), store_root: str | Path | None = None,
                   warm_started_from: Path | None = None) -> Path:
    """Write ``path``: ``data_dir`` (absolute, and relative to ``store_root`` when inside it, so a
    moved or copied store still knows its corpus) and the ``data_dir``-relative files a model trained
    on ``data`` with ``config`` does not train on: its validation split (``split_train_val``, as
    ``train.train_on_arrays`` makes it) and ``exclude``; for a model that started from the weights
    of ``warm_started_from``, only those that model never trained on either
    (``unseen_by_ancestors``). Returns ``path``."""
    root = Path(data_dir).absolute()
    _, val_idx = split_train_val(data.labels, config.val_fraction, config.seed)
    files = {os.path.relpath(data.paths[i], root).replace(os.sep, "/") for i in np.asarray(val_idx, np.int64)}
    files |= {str(f) for f in exclude}
    if warm_started_from is not None:
        files = unseen_by_ancestors(files, warm_started_from, root)
    record: dict = {"data_dir": str(root), "files": sorted(files)}
    if store_root is not None and root.resolve().is_relative_to(Path(store_root).resolve()):
        record[IN_STORE_KEY] = root.resolve().relative_to(Path(store_root).resolve()).as_posix()
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class HeldOutRecord:
    """What ``write_held_out`` recorded beside a model: the folder it trained on (absolute) and
    the ``data_dir``-relative files (``/``-separated) of it that the model never trained on."""

    data_dir: Path
    files: frozenset[str]

    def covers(self, folder: str | Path) -> bool:
        """Whether ``folder`` is the folder the model trained on (symlinks resolved)."""
        return self.data_dir.resolve() == Path(folder).resolve()


def read_held_out(model_dir: Path | None) -> HeldOutRecord | None:
    """The held-out record of the model at ``model_dir``; None when it has none (an older model,
    one trained on a TFDS data set or without labels) or it cannot be read (logged)."""
    if model_dir is None or not (model_dir / HELD_OUT_FILE).is_file():
        return None
    try:
        record = json.loads((model_dir / HELD_OUT_FILE).read_text(encoding="utf-8"))
        data_dir = Path(record["data_dir"])
        if isinstance(record.get(IN_STORE_KEY), str):  # the store's own corpus: wherever the store is now
            data_dir = Path(model_dir).absolute().parent.parent / record[IN_STORE_KEY]
        return HeldOutRecord(data_dir, frozenset(str(f) for f in record["files"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("cannot read %s (%s): the files its model held out are unknown", model_dir / HELD_OUT_FILE, e)
        return None


def files_unseen_by(model_dir: Path | None, corpus: Path) -> set[str]:
    """``corpus``-relative files the model at ``model_dir`` never trained on, when it was trained
    on ``corpus`` and recorded them (``write_held_out``); empty otherwise (an older model, another
    folder, a TFDS data set, an unreadable record: logged)."""
    record = read_held_out(model_dir)
    if record is None or not record.covers(corpus):
        return set()
    return set(record.files)


def unseen_by_ancestors(files: set[str], parent_dir: Path, corpus: Path) -> set[str]:
    """Of ``files`` (``corpus``-relative), those the model at ``parent_dir``, whose weights a new
    model started from, never trained on either: in its own record (which, written by this
    rule, leaves out what its ancestors trained on) or written after it was trained
    (``added_since_training``). Each generation of reindex's warm starts draws its validation
    split afresh, so without this a model's "held-out" images included its parent's training
    images and its held-out scores were optimistic. A parent whose record is of another
    folder (it trained elsewhere, or the corpus moved since) or that has no readable record
    (an older model): all kept, as before, since its training files are unknown. A parent
    recorded before this rule (an upgrade) may list its own parent's training images: the
    record is exact from the generation after."""
    record = read_held_out(parent_dir)
    if record is None or not record.covers(corpus):
        return files
    kept = files & record.files
    return kept | added_since_training(parent_dir, corpus, files - kept)


def added_since_training(model_dir: Path | None, corpus: Path, ids: Collection[str]) -> set[str]:
    """Of ``ids`` (``corpus``-relative files), those written after the model at ``model_dir``
    was trained, so it never trained on them though its record cannot list them: their
    modification time is later than the model's ``model.json``. Modification times, which a
    copy of the whole store keeps (``cp -a``), not status-change times, which it resets; a
    photo added with its old time kept (``cp -p``) counts as one the model may have seen."""
    try:
        trained_s = (Path(model_dir) / "model.json").stat().st_mtime if model_dir is not None else None
    except OSError:
        return set()
    added = set()
    for rel in ids if trained_s is not None else ():
        try:
            if (corpus / rel).stat().st_mtime > trained_s:
                added.add(rel)
        except OSError:
            continue
    return added


__all__ = ["HELD_OUT_FILE", "HeldOutRecord", "added_since_training", "files_unseen_by", "read_held_out",
           "unseen_by_ancestors", "write_held_out"]
