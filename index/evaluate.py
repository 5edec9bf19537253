"""How much retrieval quality the approximate index costs: ``lookalike eval --index``.

For every item (or a seeded sample) used as a query, its own item excluded, the
neighbours are taken twice: by exact search over the index's embeddings and by the
index's ANN search with its tuned settings (ANN recall@k, Precision@1 and Recall@K from a
k-deep search as served; MAP@R from a search R deep, for which the index widens its searched tree
leaves, and a report naming any list still short of R). Reported: ANN recall@k against exact, and
the retrieval metrics of Musgrave et al. 2020 ("A Metric Learning Reality Check") on
both result lists, with their difference as the approximation loss:

- Precision@1: the nearest neighbour has the query's label.
- Recall@K: at least one of the K nearest neighbours has the query's label.
- MAP@R: with R the number of other items sharing the query's label,
  ``(1/R) * sum_{i<=R} P(i) * rel(i)`` over the R nearest neighbours, where P(i) is the
  precision of the first i results and rel(i) is 1 when result i has the label.

Labels come from a metadata column (``label_column``, ``eval --label-column``) or an
explicit function of the item id; for a labelled corpus laid out
as ``<label>/<file>`` (the digits and CIFAR-10 corpora) that is ``label_from_id``. When
some item has no label (a file at the corpus's top level), or every item has the same
one (one class folder: any model would score 1.0), only the ANN recall is reported,
with the reason (``label_metrics``: "not computed: ..."); ``label_function``, where the
labels came from, is reported only with the label metrics computed from them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from lookalike.index.autotune import drop_self
from lookalike.index.exact import exact_topk, recall_per_query

if TYPE_CHECKING:
    from lookalike.index.searcher import ItemIndex

log = logging.getLogger(__name__)


def label_from_id(item_id: str) -> str:
    """The first path component of an item id: ``'3/digit_0042.png' -> '3'``."""
    head, sep, _ = item_id.partition("/")
    if not sep or not head:
        raise ValueError(f"item id {item_id!r} has no '<label>/' prefix: lay the corpus out as <label>/<file>, "
                         "or name a metadata column that holds each item's label (lookalike eval --index "
                         "--label-column COLUMN, e.g. a column joined by embed --metadata)")
    return head


def column_labels(index: "ItemIndex", column: str) -> Callable[[str], str]:
    """A label function reading the items' metadata ``column`` (ValueError naming an item without a
    value, how many items lack one and what to do).

    A column the items do not have at all is a mistyped name rather than missing labels:
    ValueError naming it and the columns there are, at once."""
    columns = index.items.schema.names
    if column not in columns:
        raise ValueError(f"label column {column!r} does not exist in the items of index {index.version}; "
                         f"its columns are: {', '.join(columns)}")
    values = dict(zip(index.items.ids(), index.items.column_values(column, np.arange(len(index.items)))))
    lacking = sum(1 for value in values.values() if value is None or value == "")
    others = [name for name in columns if name not in ("id", column)]

    def label(item_id: str) -> str:
        value = values.get(item_id)
        if value is None or value == "":
            raise ValueError(
                f"item {item_id!r} has no value in the label column {column!r} ({lacking} of the {len(values)} items "
                f"have none): name a column every item has a value in (--label-column; the items' other columns: "
                f"{', '.join(others) or 'none'}), or give every item a {column!r} value in the metadata file and "
                "publish it with lookalike embed --incremental --metadata FILE (nothing is embedded again)")
        return str(value)

    label.__name__ = f"column {column}"
    return label


def retrieval_scores(neighbors: np.ndarray, query_labels: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Precision@1, Recall@K and MAP@R of [Q, M] neighbour rows (self excluded, -1 = none).

    ``labels`` is [N] (per corpus row), ``query_labels`` [Q]; M must be at least the
    largest R (other items with the query's label) for MAP@R to be exact.
    """
    valid = neighbors >= 0
    hits = valid & (labels[np.maximum(neighbors, 0)] == query_labels[:, None])
    out = {"precision_at_1": float(hits[:, 0].mean())}
    for k in ks:
        out[f"recall_at_{k}"] = float(hits[:, :k].any(axis=1).mean())
    ap = ap_at_r_per_query(neighbors, query_labels, labels)
    out["map_at_r"] = float(np.nanmean(ap)) if not np.isnan(ap).all() else float("nan")
    return out


def ap_at_r_per_query(neighbors: np.ndarray, query_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP@R of each query: [Q, M] neighbour rows (self excluded, -1 = none), [Q] query labels
    and [N] corpus labels -> [Q] float64, ``(1/R) * sum_{i<=R} P(i) * rel(i)``; NaN for a
    query whose label no other item has (R = 0: nothing to retrieve). MAP@R is their mean
    over the other queries; two models' values on the same queries pair up query by query."""
    counts = Counter(labels.tolist())
    valid = neighbors >= 0
    hits = valid & (labels[np.maximum(neighbors, 0)] == query_labels[:, None])
    ap = np.full(len(query_labels), np.nan)
    for q, (q_hits, label) in enumerate(zip(hits, query_labels.tolist())):
        r = counts[label] - 1
        if r <= 0:
            continue  # a label with a single item has nothing to retrieve
        rel = q_hits[:r].astype(np.float64)
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        ap[q] = float((precision * rel).sum() / r)
    return ap


def evaluate_index(
    index: "ItemIndex",
    *,
    k: int = 10,
    label_fn: Callable[[str], str] = label_from_id,
    label_column: str | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """ANN recall@k vs exact, and Precision@1 / Recall@{1,k} / MAP@R on exact and ANN neighbours.

    Labels come from ``label_column`` (a metadata column of the items; ValueError when the
    items have no such column) when given, else from ``label_fn`` of each item id. Without
    usable labels (an item has none, or all share one) the result has ``label_metrics``
    "not computed: <reason>" and neither label metrics nor ``label_function``."""
    n = len(index)
    if n < 2:
        raise ValueError(f"index {index.version} has {n} item(s); evaluation needs at least 2")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if index.num_deleted:
        raise ValueError(f"index {index.version} has {index.num_deleted} deleted row(s) in memory; save or publish it "
                         "and load the result to evaluate it")
    if label_column is not None:
        label_fn = column_labels(index, label_column)
    try:
        labels: np.ndarray | None = np.array([label_fn(item_id) for item_id in index.items.ids()])
        no_labels = None
    except ValueError as e:  # e.g. a file at the corpus top level: ANN recall needs no labels
        labels, no_labels = None, str(e)
    label_name = getattr(label_fn, "__name__", repr(label_fn))
    if labels is not None and len(distinct := np.unique(labels)) < 2:
        # every neighbour shares the query's label: P@1, Recall@K and MAP@R would be 1.0 for any model
        no_labels = (f"label metrics need at least 2 labels, found 1: every item has the label {str(distinct[0])!r} "
                     f"({label_name}); lay the corpus out as <label>/<file> with 2 or more classes, or name a "
                     "metadata column holding 2 or more labels (lookalike eval --index --label-column COLUMN)")
        log.warning("eval %s: %s", index.version, no_labels)
        labels = None
    rows = np.arange(n)
    if max_queries is not None and max_queries < n:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))
    r_max = 0
    if labels is not None:
        counts = Counter(labels.tolist())
        r_max = max(counts[labels[r]] - 1 for r in rows)
    depth = min(n - 1, max(k, r_max))
    queries = index.embeddings[rows]
    exact = drop_self(exact_topk(queries, index.embeddings, depth + 1)[0], rows, depth)
    ann = drop_self(index.search_rows(queries, depth + 1)[0], rows, depth)
    k = min(k, depth)
    # a k-deep search as served: a deeper one searches more tree leaves (ItemIndex.search_rows)
    ann_k = ann[:, :k] if depth == k else drop_self(index.search_rows(queries, k + 1)[0], rows, k)
    result: dict[str, Any] = {
        "index": index.version, "mode": index.mode, "count": n, "num_queries": int(len(rows)), "k": k,
        # the share of the exact k nearest neighbours the index finds (not a label metric)
        f"ann_recall_at_{k}": round(float(recall_per_query(ann_k, exact[:, :k], queries, index.embeddings).mean()), 4),
        "depth": depth,  # neighbours compared per query: MAP@R needs R, the other items of the query's label
    }
    short = int((ann < 0).any(axis=1).sum())
    if short:  # the ANN side is not comparable at full depth: say so rather than report a loss that is not one
        result["ann_short_lists"] = (f"{short} of {len(rows)} ANN result lists hold fewer than {depth} neighbours: "
                                     "metrics past their end count the missing results as misses")
        log.warning("eval %s: %s", index.version, result["ann_short_lists"])
    if labels is None:  # no label_function either: no label was used (the reason names where they were read)
        result["label_metrics"] = f"not computed: {no_labels}"
        log.info("eval %s: ANN recall@%d %.4f (no label metrics: %s)", index.version, k, result[f"ann_recall_at_{k}"], no_labels)
        return result
    ks = tuple(sorted({1, k}))
    exact_scores = retrieval_scores(exact, labels[rows], labels, ks)
    ann_scores = retrieval_scores(ann, labels[rows], labels, ks)
    served = retrieval_scores(ann_k, labels[rows], labels, ks)  # Precision@1, Recall@K as a k-deep search finds them
    ann_scores.update({m: v for m, v in served.items() if m != "map_at_r"})
    result.update({
        "label_function": label_name,
        "exact": exact_scores, "ann": ann_scores,
        # + 0.0: no "-0.0" when both agree
        "approximation_loss": {m: round(exact_scores[m] - ann_scores[m], 4) + 0.0 for m in exact_scores},
    })
    log.info("eval %s: ANN recall@%d %.4f, MAP@R exact %.4f ann %.4f", index.version, k,
             result[f"ann_recall_at_{k}"], exact_scores["map_at_r"], ann_scores["map_at_r"])
    return result
