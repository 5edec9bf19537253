"""The retrain-and-reindex cron job: only ever make things better, never break serving.

Steps (each timed, logged and written into the run report):

1. ``train``: a candidate model, warm-started from the served one, on the corpus.
2. ``evaluate``: candidate and current model on the frozen evaluation set
   (``DIR/eval/frozen.json``: readable images of each class, made on the first run and
   checked before training; images gone or unreadable since are left out, and a set with
   less than half left is made again): MAP@R and Recall@K. The candidate
   goes on only if its MAP@R beats the current one by ``min_improvement`` (or ``force``).
3. ``embed``: the Beam pipeline, incremental (the cache is per model version, so a new
   model re-embeds everything and an unchanged one embeds only new or changed media).
4. ``build``: a new index version, autotuned, written aside (not yet served).
5. ``validate``: ANN recall at or above target, every matched file either indexed or
   dead-lettered, overlap@k of canary queries (``DIR/eval/canaries.json``) between the
   served and the new index at or above ``min_canary_overlap``, encoder and index compatible.
6. ``promote``: ``CURRENT`` replaced atomically (a running server hot-swaps to it), and
   ``models/LATEST`` set to its model. Only then: a rejected or failed candidate never
   becomes the model a later ``lookalike embed`` uses by default.
7. ``prune``: keep the newest ``keep_versions`` versions.

The store lock allows one run at a time and detects a dead run's lock; temporary folders
a killed run left are removed. A kill at any step leaves ``CURRENT`` untouched, because
nothing but step 6 writes it. For crash tests, ``LOOKALIKE_FAILPOINT=<step>`` makes the
process SIGKILL itself as that step starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.model.config import TrainConfig
from lookalike.model.data import list_images
from lookalike.model.store import Store, StoreError
from lookalike.pipeline.failpoints import failpoint
from lookalike.pipeline.lock import StoreLock
from lookalike.pipeline.versions import (
    clean_candidates, clean_partial, discard_candidate, mark_candidate, promote, prune, unmark_candidate,
)

log = logging.getLogger(__name__)

EXIT_PROMOTED, EXIT_FAILED, EXIT_KEPT_CURRENT = 0, 1, 3
STEPS = ("train", "evaluate", "embed", "build", "validate", "promote", "prune")


class ValidationError(RuntimeError):
    """The new version failed a check; it is not promoted."""


@dataclass
class ReindexConfig:
    workdir: str
    train: TrainConfig
    corpus: str | None = None
    min_improvement: float = 0.0  # candidate MAP@R must exceed current by more than this
    force: bool = False
    target_recall: float = 0.95
    min_canary_overlap: float = 0.2
    keep_versions: int = 5
    num_workers: int = 1
    eval_per_class: int = 30
    num_canaries: int = 20


@dataclass
class ReindexReport:
    outcome: str = "failed"  # promoted | kept_current | failed
    reason: str = ""
    current_model: str | None = None
    candidate_model: str | None = None
    chosen_model: str | None = None
    previous_index: str | None = None
    new_index: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"promoted": EXIT_PROMOTED, "kept_current": EXIT_KEPT_CURRENT}.get(self.outcome, EXIT_FAILED)


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


class _Steps:
    """Times each step into the report and honours failpoints."""

    def __init__(self, report: ReindexReport):
        self.report = report

    def __call__(self, name: str):
        steps = self

        class _Step:
            def __enter__(self):
                failpoint(name)
                log.info("reindex step %s ...", name)
                self.start = time.perf_counter()
                return self

            def __exit__(self, exc_type, exc, tb):
                elapsed = round(time.perf_counter() - self.start, 3)
                steps.report.steps.append({"step": name, "seconds": elapsed, "ok": exc is None,
                                           **({"error": str(exc)} if exc else {})})
                log.info("reindex step %s %s in %.1fs", name, "done" if exc is None else f"failed: {exc}", elapsed)

        return _Step()


def run_reindex(config: ReindexConfig) -> ReindexReport:
    """Run every step under the store lock; returns the report (also written to DIR/reports/)."""
    store = Store.at(config.workdir)
    if not store.root.is_dir():
        raise StoreError(f"store {store.root} does not exist: run `lookalike demo --workdir {store.root} --no-serve` first")
    if not os.access(store.root, os.W_OK):
        raise StoreError(f"store {store.root} is not writable")
    report = ReindexReport()
    started = time.time()
    with StoreLock(store.root) as lock:
        if lock.took_over_stale:
            log.warning("a previous run died; removed its leftovers: %s", clean_partial(store) or "none")
        try:
            if leftover := clean_candidates(store):
                log.warning("removed index candidate(s) an earlier run built but never promoted: %s", ", ".join(leftover))
            _run_steps(config, store, report)
        except Exception as e:
            report.outcome, report.reason = "failed", f"{type(e).__name__}: {e}"
            log.error("reindex failed, CURRENT unchanged (%s): %s", store.current_index_or_none(), report.reason)
        finally:
            from lookalike.pipeline.report import write_report

            report.metrics["elapsed_s"] = round(time.time() - started, 2)
            write_report(store, report, started)
    return report


def _run_steps(config: ReindexConfig, store: Store, report: ReindexReport) -> None:
    from lookalike.index.builder import IndexOptions, build_and_publish
    from lookalike.index.manifest import new_index_version
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.train import train_and_evaluate
    from lookalike.pipeline.embed import EmbedConfig, read_embeddings, run_embed

    step = _Steps(report)
    corpus = Path(config.corpus).resolve() if config.corpus else store.corpus_dir
    if not corpus.is_dir():
        raise StoreError(f"corpus folder {corpus} does not exist")
    report.previous_index = store.current_index()
    current_index = ItemIndex.load(store.require_current_index()) if report.previous_index else None
    report.current_model = current_index.model_version if current_index else None
    current_model_dir = store.require_model(report.current_model) if report.current_model else None
    ids = frozen_eval_set(store, corpus, config.eval_per_class)  # a corpus that cannot be evaluated fails before training
    with step("train"):
        # not LATEST yet: a candidate that is rejected or fails validation must not become what `embed` uses
        trained = train_and_evaluate(config.train, store.root, data_dir=corpus, init_from=current_model_dir,
                                     set_latest=False)
        report.candidate_model = trained.version
    with step("evaluate"):
        ids, gone = usable_eval_ids(corpus, ids)  # files that went away while training are left out of both
        if len(ids) < 2:
            raise StoreError(f"evaluation images in {corpus} went away during training: {len(gone)} unusable, "
                             f"{len(ids)} left (e.g. {next(iter(gone.items()), ('-', '-'))})")
        cand = evaluate_model(trained.model_dir, corpus, ids)
        report.metrics["candidate"] = cand
        accept = True
        if current_model_dir is not None:
            cur = evaluate_model(current_model_dir, corpus, ids)
            report.metrics["current"] = cur
            accept = config.force or cand["map_at_r"] > cur["map_at_r"] + config.min_improvement
        report.chosen_model = trained.version if accept else report.current_model
        report.metrics["candidate_accepted"] = accept
        current_map = report.metrics.get("current", {}).get("map_at_r")
        log.info("candidate %s %s (MAP@R %.4f vs current %s, on %d evaluation images)", trained.version,
                 "accepted" if accept else "rejected", cand["map_at_r"],
                 "none" if current_map is None else f"{current_map:.4f}", len(ids))
    with step("embed"):
        summary = run_embed(EmbedConfig(workdir=str(store.root), corpus=str(corpus), model_version=report.chosen_model,
                                        incremental=True, publish=False, num_workers=config.num_workers))
        report.metrics["embed"] = {k: getattr(summary, k) for k in ("run", "files_matched", "items", "embedded", "unchanged", "failed")}
        embeddings, items = read_embeddings(Path(summary.run_dir))
    new_items = set(zip(items.column("id").to_pylist(), items.column("content_hash").to_pylist()))
    if current_index is not None and report.chosen_model == report.current_model \
            and new_items == {(i["id"], i.get("content_hash")) for i in current_index.items}:
        report.outcome, report.reason = "kept_current", "candidate not better and the corpus is unchanged"
        return
    candidate = new_index_version()
    mark_candidate(store, candidate)  # a kill from here to promotion leaves it for the next run to remove
    try:
        with step("build"):
            options = IndexOptions(target_recall=config.target_recall)
            report.new_index = build_and_publish(store, embeddings, items, model_version=report.chosen_model,
                                                 options=options, make_current=False, version=candidate)
        with step("validate"):
            validate(store, report, summary, current_index, config)
        with step("promote"):
            promote(store, report.new_index, reason=f"reindex: model {report.chosen_model}")
    except Exception:
        discard_candidate(store, candidate)  # a failed candidate never serves and never counts as kept
        raise
    unmark_candidate(store, candidate)
    if store.latest_model() != report.chosen_model:
        store.set_latest_model(report.chosen_model)  # the served model is the one `embed` uses next
    report.outcome = "promoted"
    report.reason = ("new model " if report.chosen_model != report.current_model else "same model, updated corpus ") + str(report.chosen_model)
    with step("prune"):
        report.metrics["pruned"] = prune(store, config.keep_versions)


def validate(store: Store, report: ReindexReport, summary, current_index, config: ReindexConfig) -> None:
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


def report_dict(report: ReindexReport) -> dict[str, Any]:
    return {**asdict(report), "exit_code": report.exit_code}
