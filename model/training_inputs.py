"""What a training run's result depends on, as one hash, so that the same training is not run twice.

The retrain-and-reindex cron trains a candidate every night. When neither the corpus nor
the served model (the warm start) nor the config changed, that candidate is the one the
previous night already trained and rejected: training is deterministic (batches depend on
seed and step only). ``training_inputs_sha256`` hashes those inputs: the config, every
decoded image and label, the class names and paths, and the warm-start model's version
(itself a content hash of its weights). A saved model records it in its metrics
(``training_inputs_sha256``), and ``model_trained_from`` finds a saved model with the same
hash, which ``train_and_evaluate(reuse_identical=True)`` returns instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from lookalike.model.config import TrainConfig, config_to_dict
from lookalike.model.data import LabelledImages

log = logging.getLogger(__name__)

METRIC_KEY = "training_inputs_sha256"  # in model.json's metrics


def training_inputs_sha256(config: TrainConfig, data: LabelledImages, init_version: str | None) -> str:
    """sha256 (hex) of ``config``, every field of ``data`` (images [N, H, W, C] and labels [N]
    by their bytes, shape and dtype; names, and paths relative to their common folder; not
    the skipped files) and the
    warm-start model's version (None: trained from scratch)."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": config_to_dict(config), "init": init_version}, sort_keys=True).encode())
    for field in dataclasses.fields(data):
        if field.name == "failures":  # files that were not read do not shape the model
            continue
        value = getattr(data, field.name)
        if field.name == "paths" and value:  # relative to their common folder: a store copied or moved reuses its models
            common = os.path.commonpath([str(p) for p in value])
            value = [os.path.relpath(str(p), common) for p in value]
        h.update(field.name.encode())
        if isinstance(value, np.ndarray):
            h.update(f"{value.shape}{value.dtype.str}".encode())
            h.update(np.ascontiguousarray(value).data)
        else:
            h.update(json.dumps(value, default=str).encode())
    return h.hexdigest()


def model_trained_from(models_dir: Path, inputs_sha256: str) -> str | None:
    """The version of a saved model under ``models_dir`` whose training inputs hash to
    ``inputs_sha256``, or None (unreadable model folders are skipped)."""
    for meta_path in sorted(Path(models_dir).glob("m-*/model.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (meta.get("metrics") or {}).get(METRIC_KEY) == inputs_sha256 and (meta_path.parent / "params").is_dir():
            return meta_path.parent.name
    return None


__all__ = ["METRIC_KEY", "model_trained_from", "training_inputs_sha256"]
