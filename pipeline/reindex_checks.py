"""The checks of the reindex job: the frozen evaluation set, model evaluation, canary
queries and the validation a new index version must pass before it is promoted.

``DIR/eval/frozen.json`` holds the evaluation images (corpus-relative ids) and
``DIR/eval/canaries.json`` the canary queries, both kept across runs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.model.data import list_images
from lookalike.model.store import Store, StoreError

if TYPE_CHECKING:
    from lookalike.pipeline.reindex import ReindexConfig, ReindexReport

log = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """The new version failed a check; it is not promoted."""


def usable_eval_ids(corpus: Path, ids: list[str]) -> tuple[list[str], dict[str, str]]:
    """(ids whose file under ``corpus`` exists and decodes as an image, {other id: reason})."""
    from lookalike.model.preprocess import ImageDecodeError, open_image

    usable, rejected = [], {}
    for i in ids:
        try:
            open_image((corpus / i).read_bytes())
        except FileNotFoundError:
            rejected[i] = "file is gone"
        except OSError as e:
            rejected[i] = f"unreadable: {e.strerror or e}"
        except ImageDecodeError as e:
            rejected[i] = str(e)
        else:
            usable.append(i)
    return usable, rejected


def _sample_eval_set(corpus: Path, per_class: int, seed: int) -> list[str]:
    """Up to ``per_class`` readable images of each class folder, at random (unreadable ones skipped)."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    for f in list_images(corpus):
        rel = f.relative_to(corpus).as_posix()
        if "/" in rel:
            by_class.setdefault(rel.split("/", 1)[0], []).append(rel)
    ids = []
    for members in by_class.values():
        chosen: list[str] = []
        for rel in rng.permutation(members).tolist():
            if len(chosen) == per_class:
                break
            if usable_eval_ids(corpus, [rel])[0]:
                chosen.append(rel)
        ids += chosen
    return sorted(ids)


def frozen_eval_set(store: Store, corpus: Path, per_class: int, seed: int = 0) -> list[str]:
    """Corpus-relative ids of the frozen evaluation images: made once (``per_class`` readable
    images of each class folder) and reused, so runs compare models on the same images.

    Images that are gone or no longer decode are left out, with a warning naming them
    (candidate and current model are still compared on the same images). When fewer than
    half of the set (or fewer than 2 images) are usable, a new set is made from the corpus.
    StoreError if the corpus has no 2 readable images in class folders."""
    path = store.root / "eval" / "frozen.json"
    if path.is_file():
        try:
            ids = [str(i) for i in json.loads(path.read_text(encoding="utf-8"))["ids"]]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("evaluation set %s is unreadable (%s): making a new one", path, e)
            ids = []
        usable, rejected = usable_eval_ids(corpus, ids)
        if rejected:
            first = next(iter(rejected.items()))
            log.warning("evaluation set %s: %d of %d images left out (e.g. %s: %s)", path, len(rejected), len(ids), *first)
        if len(usable) >= 2 and 2 * len(usable) >= len(ids):
            return usable
        log.warning("evaluation set %s has %d usable image(s) of %d: making a new one from %s", path, len(usable), len(ids), corpus)
    ids = _sample_eval_set(corpus, per_class, seed)
    if len(ids) < 2:
        raise StoreError(f"no evaluation set can be made from {corpus}: it needs at least 2 readable images in "
                         f"class sub-folders, found {len(ids)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ids": ids, "created_unix_s": time.time()}, indent=1) + "\n")
    log.info("evaluation set %s: %d images of %s", path, len(ids), corpus)
    return ids


def evaluate_model(model_dir: Path, corpus: Path, ids: list[str], k: int = 10) -> dict[str, float]:
    """MAP@R, Precision@1, Recall@{1,k} of a model on the evaluation images (labels = folders)."""
    from lookalike.index.evaluate import label_from_id, retrieval_scores
    from lookalike.index.exact import exact_topk
    from lookalike.model.artifact import load_encoder

    encoder = load_encoder(model_dir)
    emb = encoder.embed_bytes([(corpus / i).read_bytes() for i in ids])
    labels = np.array([label_from_id(i) for i in ids])
    depth = min(len(ids) - 1, max(k, int(max(np.unique(labels, return_counts=True)[1]))))
    rows = exact_topk(emb, emb, depth + 1)[0]
    neighbors = np.array([[r for r in row if r != q][:depth] for q, row in enumerate(rows)])
    return retrieval_scores(neighbors, labels, labels, tuple(sorted({1, min(k, depth)})))


def canary_overlap(store: Store, old_version: str, new_version: str, k: int, count: int) -> float | None:
    """Mean overlap@k of the canaries' neighbours in the old and new index (None: no canaries)."""
    from lookalike.index.searcher import ItemIndex

    old, new = ItemIndex.load(store.index_dir(old_version)), ItemIndex.load(store.index_dir(new_version))
    path = store.root / "eval" / "canaries.json"
    if path.is_file():
        canaries = json.loads(path.read_text(encoding="utf-8"))["ids"]
    else:
        rng = np.random.default_rng(0)
        canaries = sorted(old.items[i]["id"] for i in rng.choice(len(old), size=min(count, len(old)), replace=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"ids": canaries}, indent=1) + "\n")
    overlaps = []
    for item_id in canaries:
        if old.row_of(item_id) is None or new.row_of(item_id) is None:
            continue
        a = {n.id for n in old.similar_to(item_id, k)}
        b = {n.id for n in new.similar_to(item_id, k)}
        overlaps.append(len(a & b) / max(1, min(k, len(a), len(b))))
    return float(np.mean(overlaps)) if overlaps else None


def validate(store: Store, report: "ReindexReport", summary, current_index, config: "ReindexConfig") -> None:
    """Raise ValidationError unless the new index is fit to serve."""
    from lookalike.index.searcher import ItemIndex
    from lookalike.pipeline.versions import check_version

    new = ItemIndex.load(store.index_dir(report.new_index))
    tuning = new.manifest.get("tuning") or {}
    recall = tuning.get("recall")
    report.metrics["index"] = {"recall": recall, "qps": tuning.get("qps"), "mode": new.manifest["build"]["mode"], "count": len(new)}
    if recall is not None and recall < config.target_recall:
        raise ValidationError(f"ANN recall {recall:.3f} is below the target {config.target_recall}")
    indexed_files = len({item["uri"] for item in new.items})
    if indexed_files + summary.failed != summary.files_matched:
        raise ValidationError(f"{summary.files_matched} files matched but {indexed_files} indexed + {summary.failed} dead-lettered")
    check_version(store, report.new_index)
    if current_index is not None:
        overlap = canary_overlap(store, current_index.version, report.new_index, k=10, count=config.num_canaries)
        report.metrics["canary_overlap_at_10"] = overlap
        if overlap is not None and overlap < config.min_canary_overlap:
            raise ValidationError(f"canary overlap@10 {overlap:.3f} is below {config.min_canary_overlap}: the new "
                                  "neighbours changed too much (use --min-canary-overlap to accept)")
