"""How good is a trained model: retrieval, verification and few-shot accuracy on labelled images.

``evaluate_embeddings(emb, labels)`` reports the leave-one-out retrieval metrics of
``metrics.retrieval_metrics`` (Precision@1, Recall@K, R-Precision, MAP@R, Musgrave et
al. 2020), the verification ROC AUC over all pairs (is the pair the same class, scored
by minus the distance) and N-way K-shot accuracy over seeded random episodes (nearest
class prototype, the mean of the K support embeddings, as in Prototypical Networks;
for K = 1 that is the nearest neighbour). ``evaluate_model(model_path, folder)`` does
it for a model artifact on a ``<label>/<file>`` folder (on the folder it trained on, only
the images it held out of training, unless ``all_images``: ``choose_images``);
``evaluate_model_cli(args)`` is the command-line entry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from lookalike.model.metrics import json_ready, pairwise_sq_distances, retrieval_metrics

log = logging.getLogger(__name__)


def verification_roc_auc(emb: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of "same class" over all unordered pairs of [N, D] embeddings, score -distance.

    The Mann-Whitney statistic with average ranks for ties; NaN without both kinds of pair."""
    iu = np.triu_indices(len(emb), k=1)
    score = -pairwise_sq_distances(np.asarray(emb, np.float64))[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def nearest_prototype_accuracy(
    support: np.ndarray, support_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray
) -> float:
    """Fraction of [Q, D] queries whose nearest class prototype (mean of that class's
    [S, D] support embeddings) has the query's label."""
    classes = np.unique(support_labels)
    protos = np.stack([support[support_labels == c].mean(axis=0) for c in classes])
    d = np.sum((queries[:, None, :] - protos[None, :, :]) ** 2, axis=-1)
    return float(np.mean(classes[np.argmin(d, axis=1)] == query_labels))


def few_shot_problem(labels: np.ndarray, n_way: int, k_shot: int, queries_per_class: int = 1) -> str | None:
    """Why N-way K-shot episodes cannot be drawn from items with [N] ``labels`` (too few
    classes, or too few with ``k_shot + queries_per_class`` items), or None when they can.
    Needs the labels only, so it can be asked before anything is embedded."""
    need = k_shot + queries_per_class
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    usable = int(np.sum(counts >= need))
    if len(counts) < n_way:
        return (f"{n_way}-way {k_shot}-shot needs {n_way} classes, the data has {len(counts)}: "
                "n-way is larger than the number of classes")
    if usable < n_way:
        return (f"{n_way}-way {k_shot}-shot needs {n_way} classes with {need}+ items; found {usable} "
                f"(of {len(counts)} classes)")
    return None


def require_few_shot(labels: np.ndarray, n_way: int, k_shot: int) -> None:
    """The ValueError for a few-shot setting the user asked for (``--n-way``/``--k-shot``) that
    items with ``labels`` cannot give, naming the numbers; nothing when they can give it."""
    problem = few_shot_problem(labels, n_way, k_shot)
    if problem is not None:
        raise ValueError(f"few-shot accuracy cannot be computed: {problem}; give a smaller --n-way or --k-shot, or "
                         "neither to skip it with a warning")


def few_shot_accuracy(
    emb: np.ndarray, labels: np.ndarray, n_way: int, k_shot: int, episodes: int = 1000,
    queries_per_class: int = 1, seed: int = 0,
) -> float:
    """Mean accuracy of ``episodes`` random N-way K-shot episodes over [N, D] embeddings.

    Each episode draws ``n_way`` classes having at least ``k_shot + queries_per_class``
    items, then ``k_shot`` support and ``queries_per_class`` query items per class."""
    problem = few_shot_problem(labels, n_way, k_shot, queries_per_class)
    if problem is not None:
        raise ValueError(problem)
    need = k_shot + queries_per_class
    usable = [idx for idx in (np.flatnonzero(labels == c) for c in np.unique(labels)) if len(idx) >= need]
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(episodes):
        chosen = rng.choice(len(usable), size=n_way, replace=False)
        sup, qry = [], []
        for c in chosen:
            pick = rng.choice(usable[c], size=need, replace=False)
            sup.append(pick[:k_shot])
            qry.append(pick[k_shot:])
        sup_i, qry_i = np.concatenate(sup), np.concatenate(qry)
        accs.append(nearest_prototype_accuracy(emb[sup_i], labels[sup_i], emb[qry_i], labels[qry_i]))
    return float(np.mean(accs))


def evaluate_embeddings(
    emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10), n_way: int = 5, k_shot: int = 1,
    episodes: int = 1000, seed: int = 0, few_shot_required: bool = False,
) -> dict[str, Any]:
    """All model-quality figures for [N, D] embeddings with [N] labels.

    N-way K-shot accuracy the data cannot give (too few classes) is left out with a
    warning, or, with ``few_shot_required`` (the user asked for it), a ValueError."""
    labels = np.asarray(labels)
    if few_shot_required:
        require_few_shot(labels, n_way, k_shot)  # before the O(N^2) metrics
    out: dict[str, Any] = {"items": int(len(emb)), "classes": int(len(np.unique(labels)))}
    out.update(retrieval_metrics(emb, labels, ks))
    out["verification_roc_auc"] = verification_roc_auc(emb, labels)
    try:
        out[f"few_shot_{n_way}way_{k_shot}shot_acc"] = few_shot_accuracy(emb, labels, n_way, k_shot, episodes, seed=seed)
    except ValueError as e:
        log.warning("few-shot accuracy skipped: %s", e)
    return out


def folder_images(folder: str | Path) -> list[str]:
    """The ``folder``-relative paths (``/``-separated) of the images ``load_labelled_folder``
    would read from the labelled ``folder`` (unreadable sub-folders: left to it to report)."""
    from lookalike.model.data import class_folders, list_class_images

    root = Path(folder)
    class_dirs = class_folders(root)
    _, files = list_class_images(root, class_dirs, {class_dir: [] for class_dir in class_dirs}, warn=False)
    return [p.relative_to(root).as_posix() for class_files in files for p in class_files]


def choose_images(model_path: str | Path, folder: str | Path, *, all_images: bool = False) -> tuple[
        frozenset[str] | None, dict[str, Any]]:
    """Which images of ``folder`` to score the model at ``model_path`` on: (the ``folder``-relative
    files to keep, or None for all; the report's fields saying which).

    A model trained on ``folder`` that recorded the files it held out (``held_out.json``) is
    scored on those, unless ``all_images``: its own training images would flatter it. Scores
    that may include training images (that record missing, or ``all_images``) are logged as
    optimistic; a folder with none of the held-out files is a ValueError saying what to do."""
    from lookalike.model.held_out import HELD_OUT_FILE, read_held_out

    model_path, folder = Path(model_path), Path(folder)
    files = folder_images(folder)
    record = read_held_out(model_path)
    fields: dict[str, Any] = {"images": "all", "images_in_folder": len(files), "held_out_in_folder": None,
                              "optimistic": False}
    if record is None:
        log.warning("model %s has no readable %s, so which of the %d images in %s it trained on is unknown: "
                    "scoring all of them; the scores are optimistic if it trained on any (a model scores its own "
                    "training images better)", model_path, HELD_OUT_FILE, len(files), folder)
        fields["optimistic"] = True
        return None, fields
    if not record.covers(folder):
        log.info("model %s was trained on %s, not %s: scoring all %d images", model_path, record.data_dir, folder,
                 len(files))
        return None, fields
    held = frozenset(f for f in files if f in record.files)
    fields["held_out_in_folder"] = len(held)
    if all_images:
        seen = len(files) - len(held)
        fields["optimistic"] = seen > 0
        if seen:
            log.warning("--all-images: %d of the %d images scored were not held out of training (the model trained on "
                        "them, or they were added since): the scores are optimistic; without --all-images only the "
                        "%d held-out images are scored", seen, len(files), len(held))
        return None, fields
    if not held:
        raise ValueError(f"none of the {len(record.files)} images model {model_path.name} held out of training "
                         f"({model_path / HELD_OUT_FILE}) are in {folder} any more: give --all-images to score all "
                         f"{len(files)} images (optimistic: the model trained on them), or --data another labelled "
                         "folder")
    log.info("%d of %d images were held out of training; scoring those (--all-images scores all of them, "
             "optimistic)", len(held), len(files))
    fields["images"] = "held_out"
    return held, fields


def evaluate_model(
    model_path: str | Path, folder: str | Path, *, max_items: int = 5000, seed: int = 0, n_way: int = 5,
    k_shot: int = 1, few_shot_required: bool = False, all_images: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """Embed the labelled ``folder`` (``<label>/<file>``) with the model at ``model_path``
    and evaluate; at most ``max_items`` items (a seeded sample) since metrics are O(N^2).
    Only the images the model held out of training when ``folder`` is its training folder,
    unless ``all_images`` (``choose_images``; the report says which: ``images``).
    With ``few_shot_required``, an N-way K-shot setting the folder's labels cannot give is
    a ValueError before anything is embedded."""
    from lookalike.model.artifact import load_encoder
    from lookalike.model.data import load_labelled_folder

    encoder = load_encoder(model_path)
    include, which = choose_images(model_path, folder, all_images=all_images)
    data = load_labelled_folder(folder, encoder.spec, max_items=max_items, seed=seed, include=include,
                                role="evaluation")  # only the sample is decoded
    if few_shot_required:
        require_few_shot(data.labels, n_way, k_shot)  # from the labels: embedding a big folder takes long
    report = evaluate_embeddings(encoder.embed(data.images), data.labels, seed=seed, n_way=n_way, k_shot=k_shot,
                                 few_shot_required=few_shot_required, **kwargs)
    report.update({"model": encoder.version, "data_dir": str(folder), "skipped_files": len(data.failures), **which})
    return report


def evaluate_model_cli(args: argparse.Namespace) -> int:
    """``lookalike eval --model [VERSION] [--data DIR] [--n-way N --k-shot K] [--all-images]``: print JSON.

    Reads ``args.workdir``, ``args.model`` (a version, a model folder, or "LATEST"),
    ``args.data`` (default WORKDIR/corpus) and optional ``k``, ``n_way``, ``k_shot``,
    ``episodes``, ``max_items`` (None: the default; an ``n_way`` or ``k_shot`` given makes
    a few-shot score the data cannot give an error rather than a warning) and ``all_images``
    (score the model's training images too; ``evaluate_model``)."""
    from lookalike.model.artifact import read_model_meta
    from lookalike.model.data import not_a_folder
    from lookalike.model.store import Store

    store = Store.at(args.workdir)
    choice = getattr(args, "model", None) or "LATEST"
    if Path(choice).is_dir():
        model_path = Path(choice)
    elif os.sep in choice or (os.altsep and os.altsep in choice):
        raise FileNotFoundError(f"model folder {choice} {not_a_folder(choice)} (give a folder, a version of "
                                f"{store.models_dir}, or nothing for LATEST)")
    else:
        model_path = store.require_model(None if choice == "LATEST" else choice)
    folder = Path(getattr(args, "data", None) or store.corpus_dir)
    if not folder.is_dir():
        given = getattr(args, "data", None)
        trained_on = None if given else (read_model_meta(model_path).get("metrics") or {}).get("data_dir")
        hint = (f"; model {model_path.name} was trained on {trained_on}: `--data {trained_on}`"
                if isinstance(trained_on, str) and Path(trained_on).is_dir() else "")
        raise ValueError(f"evaluation folder {folder} {not_a_folder(folder)} (--data: a folder with one sub-folder per "
                         f"label){hint}")

    def option(name: str, default: int, low: int) -> int:  # None means the default; 0 is not "unset"
        value = getattr(args, name, None)
        value = default if value is None else int(value)
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        return value

    k = option("k", 10, 1)
    # --n-way or --k-shot on the command line asks for that score: an error if it cannot be had
    asked = any(getattr(args, name, None) is not None for name in ("n_way", "k_shot"))
    report = evaluate_model(
        model_path, folder,
        ks=tuple(sorted({1, 5, k})),
        n_way=option("n_way", 5, 2),
        k_shot=option("k_shot", 1, 1),
        episodes=option("episodes", 1000, 1),
        max_items=option("max_items", 5000, 2),
        few_shot_required=asked,
        all_images=bool(getattr(args, "all_images", False)),
    )
    print(json.dumps(json_ready(report), indent=2, sort_keys=True, allow_nan=False))
    return 0
