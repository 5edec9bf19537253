"""The checks of the reindex job: the frozen evaluation set, model evaluation, canary
queries and the validation a new index version must pass before it is promoted.

``DIR/eval/frozen.json`` holds the evaluation images (corpus-relative ids) and
``DIR/eval/canaries.json`` the canary queries, both kept across runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from lookalike.model.preprocess import SHRINK_MIN_SIDE_PX, ImageDecodeError, open_image

    usable, rejected = [], {}
    for i in ids:
        try:
            open_image((corpus / i).read_bytes(), min_side_px=SHRINK_MIN_SIDE_PX)  # decodable? (shrunk: faster)
        except FileNotFoundError:
            rejected[i] = "file is gone"
        except OSError as e:
            rejected[i] = f"unreadable: {e.strerror or e}"
        except ImageDecodeError as e:
            rejected[i] = str(e)
        else:
            usable.append(i)
    return usable, rejected


def _images_by_class(corpus: Path) -> dict[str, list[str]]:
    """Image ids of each class folder; a name that is not UTF-8 is no id (embed dead-letters it)."""
    from lookalike.pipeline.sources import utf8_name  # imports Beam: only when a set is made

    by_class: dict[str, list[str]] = {}
    for f in list_images(corpus):
        rel = f.relative_to(corpus).as_posix()
        if "/" in rel and utf8_name(rel):
            by_class.setdefault(rel.split("/", 1)[0], []).append(rel)
    return by_class


def _held_out(per_class: int, class_size: int) -> int:
    """Evaluation images taken from a class: at most half of it, the rest is for training."""
    return min(per_class, class_size // 2)


def _sample_size(by_class: dict[str, list[str]], per_class: int) -> int:
    """How many images a new set would take (before dropping unreadable ones)."""
    return sum(_held_out(per_class, len(members)) for members in by_class.values())


def _sample_eval_set(corpus: Path, per_class: int, seed: int, unseen: Collection[str] = ()) -> list[str]:
    """Up to ``per_class`` readable images of each class folder (at most half of its readable
    ones: a class of one readable image and broken files keeps it for training), at random,
    those in ``unseen`` (the served model never trained on them) first. Up to twice
    ``per_class`` of a class are decoded to tell (all of a smaller class)."""
    rng = np.random.default_rng(seed)
    by_class = _images_by_class(corpus)
    unseen = frozenset(unseen)
    ids = []
    for members in by_class.values():
        readable: list[str] = []
        shuffled = rng.permutation(members).tolist()
        for rel in [m for m in shuffled if m in unseen] + [m for m in shuffled if m not in unseen]:
            if len(readable) == 2 * per_class:  # enough to take per_class and leave as many
                break
            if usable_eval_ids(corpus, [rel])[0]:
                readable.append(rel)
        ids += readable[:_held_out(per_class, len(readable))]
    return sorted(ids)


def frozen_eval_set(store: Store, corpus: Path, per_class: int, seed: int = 0,
                    unseen: Collection[str] = ()) -> list[str]:
    """``choose_eval_set``, a new set saved at once (``save_eval_set``)."""
    ids, new = choose_eval_set(store, corpus, per_class, seed, unseen)
    if new:
        save_eval_set(store, ids, corpus)
    return ids


def save_eval_set(store: Store, ids: list[str], corpus: Path) -> None:
    """Write ``ids`` as the frozen evaluation set (``DIR/eval/frozen.json``)."""
    path = store.root / "eval" / "frozen.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ids": ids, "held_out": True, "created_unix_s": time.time()}, indent=1) + "\n")
    log.info("evaluation set %s: %d images of %s", path, len(ids), corpus)


def choose_eval_set(store: Store, corpus: Path, per_class: int, seed: int = 0,
                    unseen: Collection[str] = ()) -> tuple[list[str], bool]:
    """Corpus-relative ids of the frozen evaluation images: made once (``per_class`` readable
    images of each class folder, at most half of it) and reused, so runs compare models on
    the same images. They are held out: the reindex job trains candidates without them, so
    the gate does not reward memorising them. A set made before sets were held out (no
    ``held_out`` mark; it may hold whole classes) is made again.

    Images that are gone or no longer decode are left out, with a warning naming them
    (candidate and current model are still compared on the same images). When fewer than
    half of the set (or fewer than 2 images) are usable, a new set is made from the corpus;
    likewise when the set is smaller than a new one would be by half or more (it was made
    while the corpus was small, e.g. mostly vanished, and the corpus has grown since), so a
    tiny set does not stay for good. A new set takes the images in ``unseen`` first: those the
    served model never trained on (``model.held_out.files_unseen_by``), so that the gate does not
    reward the served model's memory of its own training images either.
    StoreError if the corpus has no 2 readable images in class folders.
    Returns (ids, True for a new set, not saved yet: the reindex job saves it only when the run
    succeeds, so a failed run on a corpus that is briefly mostly gone keeps the old set)."""
    path = store.root / "eval" / "frozen.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            ids = [str(i) for i in stored["ids"]]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("evaluation set %s is unreadable (%s): making a new one", path, e)
            ids, stored = [], {}
        if ids and not stored.get("held_out"):
            log.info("evaluation set %s was made before evaluation images were held out of training: "
                     "making a new one", path)
        else:
            usable, rejected = usable_eval_ids(corpus, ids)
            if rejected:
                first = next(iter(rejected.items()))
                log.warning("evaluation set %s: %d of %d images left out (e.g. %s: %s)", path, len(rejected), len(ids),
                            *first)
            if len(usable) >= 2 and 2 * len(usable) >= len(ids):
                possible = _sample_size(_images_by_class(corpus), per_class)
                if 2 * possible < 3 * len(usable):
                    return usable, False
                log.info("evaluation set %s has %d image(s) and the corpus now gives %d: making a new one", path,
                         len(usable), possible)
            else:
                log.warning("evaluation set %s has %d usable image(s) of %d: making a new one from %s", path,
                            len(usable), len(ids), corpus)
    ids = _sample_eval_set(corpus, per_class, seed, unseen)
    if unseen:
        log.info("new evaluation set: %d of its %d images were held out of the served model's training too",
                 len(set(unseen).intersection(ids)), len(ids))
    if len(ids) < 2:
        raise StoreError(f"no evaluation set can be made from {corpus}: it needs at least 2 readable images in "
                         f"class sub-folders, found {len(ids)}")
    return ids, True


def evaluate_model(model_dir: Path, corpus: Path, ids: list[str], k: int = 10) -> tuple[dict[str, float], np.ndarray]:
    """MAP@R, Precision@1, Recall@{1,k} of a model on the evaluation images (labels = folders),
    and the AP@R of each of them as a query ([len(ids)] float64, in the order of ``ids``; NaN
    for an image alone in its class), for ``gate`` to pair two models' values query by query."""
    from lookalike.index.evaluate import ap_at_r_per_query, label_from_id, retrieval_scores
    from lookalike.index.exact import exact_topk
    from lookalike.model.artifact import load_encoder

    encoder = load_encoder(model_dir)
    emb = encoder.embed_bytes([(corpus / i).read_bytes() for i in ids])
    labels = np.array([label_from_id(i) for i in ids])
    depth = min(len(ids) - 1, max(k, int(max(np.unique(labels, return_counts=True)[1]))))
    rows = exact_topk(emb, emb, depth + 1)[0]
    neighbors = np.array([[r for r in row if r != q][:depth] for q, row in enumerate(rows)])
    scores = retrieval_scores(neighbors, labels, labels, tuple(sorted({1, min(k, depth)})))
    return scores, ap_at_r_per_query(neighbors, labels, labels)


# Evaluation queries (images with a class mate) the served model never trained on that the gate
# needs to compare on them alone (``ids_unseen_by_served``).
MIN_UNSEEN_QUERIES = 20


def ids_unseen_by_served(ids: list[str], unseen: Collection[str]) -> list[str] | None:
    """The evaluation ids the served model never trained on (``unseen``: its held-out record,
    ``model.held_out.files_unseen_by``), when some of ``ids`` are its training images and the
    rest still has ``MIN_UNSEEN_QUERIES`` queries with a class mate: the gate then compares the
    models on those alone, since the served model's memory of its own training images would
    favour it over any candidate. None when all are unseen (nothing to leave out), the
    record is unknown (empty), or too few are unseen to judge on (the caller warns)."""
    from lookalike.index.evaluate import label_from_id

    if not unseen:
        return None
    kept = [i for i in ids if i in unseen]
    if len(kept) == len(ids):
        return None
    per_class: dict[str, int] = {}
    for i in kept:
        per_class[label_from_id(i)] = per_class.get(label_from_id(i), 0) + 1
    queries = sum(n for n in per_class.values() if n >= 2)
    return kept if queries >= MIN_UNSEEN_QUERIES else None


NOISE_STANDARD_ERRORS = 2.0  # the noise margin: this many standard errors of the paired mean difference


@dataclass(frozen=True)
class GateDecision:
    """The evaluation gate's verdict on a candidate model, with its evidence.

    ``mean_diff`` is the mean over the evaluation queries of AP@R(candidate) - AP@R(current)
    (= the difference of their MAP@R), ``stderr`` its standard error, ``noise_margin``
    ``NOISE_STANDARD_ERRORS * stderr``, ``queries`` the number of paired queries; all None/0
    when there is no served model to compare with."""

    accepted: bool
    reason: str
    mean_diff: float | None = None
    stderr: float | None = None
    noise_margin: float | None = None
    min_improvement: float = 0.0
    queries: int = 0
    forced: bool = False

    def as_metrics(self) -> dict[str, Any]:
        """For the report's metrics (JSON: no NaN or infinity)."""
        from lookalike.model.metrics import json_ready

        return json_ready(asdict(self))


def gate(candidate_ap: np.ndarray, current_ap: np.ndarray | None, min_improvement: float = 0.0, force: bool = False,
         noise_standard_errors: float = NOISE_STANDARD_ERRORS) -> GateDecision:
    """Accept the candidate only if it is better than the served model by more than noise.

    ``candidate_ap`` and ``current_ap`` are [Q] AP@R of the same evaluation queries under
    each model (NaN: not a query, e.g. alone in its class; ``current_ap`` None: nothing is
    served, so the candidate is accepted). A paired comparison: the per-query differences
    d_q = AP@R_candidate(q) - AP@R_current(q) remove what makes some queries hard for both
    models, so their mean is measured far more precisely than either MAP@R alone. Its
    standard error is SE = std(d, ddof=1) / sqrt(Q). The candidate is accepted when
    mean(d) > min_improvement and mean(d) > ``noise_standard_errors`` * SE (a one-sided
    paired z-test, about 2.3% false acceptance for a candidate of equal quality at the
    default 2); fewer than 2 paired queries cannot tell and reject. ``force`` accepts
    whatever the numbers, and the reason still says what they were."""
    if current_ap is None:
        return GateDecision(True, "no served model to compare with", min_improvement=min_improvement, forced=force)
    if candidate_ap.shape != current_ap.shape:
        raise ValueError(f"AP@R of {candidate_ap.shape} and {current_ap.shape} queries: the models must be evaluated "
                         "on the same queries")
    paired = ~np.isnan(candidate_ap) & ~np.isnan(current_ap)
    d = candidate_ap[paired] - current_ap[paired]
    n = int(len(d))
    if n < 2:
        verdict = False
        reason = f"{n} paired evaluation queries (images with a class mate): too few to tell an improvement from noise"
        mean = float(d.mean()) if n else None
        stderr = margin = None
    else:
        mean = float(d.mean())
        stderr = float(d.std(ddof=1) / np.sqrt(n))
        margin = noise_standard_errors * stderr
        diff = (f"mean AP@R difference {mean:+.4f} (candidate - served; standard error {stderr:.4f} over {n} "
                "paired queries)")
        if mean <= 0:
            verdict, reason = False, f"not better: {diff}"
        elif mean <= margin:
            verdict, reason = False, (f"within noise: {diff} is not above {noise_standard_errors:g} standard errors "
                                      f"({margin:.4f})")
        elif mean <= min_improvement:
            verdict, reason = False, f"too small: {diff} is not above the minimum improvement {min_improvement:g}"
        else:
            verdict, reason = True, (f"better beyond noise: {diff} is above {noise_standard_errors:g} standard errors "
                                     f"({margin:.4f}) and the minimum improvement {min_improvement:g}")
    if force:
        verdict, reason = True, f"forced (would be {'accepted' if verdict else 'rejected'}: {reason})"
    return GateDecision(verdict, reason, mean, stderr, margin, min_improvement, n, force)


CANARIES = "canaries.json"


def canary_ids(store: Store, indexes: list, count: int) -> list[str]:
    """The canary queries (``DIR/eval/canaries.json``) that every one of ``indexes`` holds.

    When fewer than half of the stored canaries are left in them (the corpus changed under
    them) or none are stored, ``count`` new ones are picked at random from the items all of
    ``indexes`` hold, saved, and a warning says so. [] only when the indexes share no item."""
    path = store.root / "eval" / CANARIES
    stored: list[str] = []
    if path.is_file():
        try:
            stored = [str(i) for i in json.loads(path.read_text(encoding="utf-8"))["ids"]]
        except (ValueError, KeyError, TypeError) as e:
            log.warning("canaries %s are unreadable (%s): picking new ones", path, e)
    present = [i for i in stored if all(ix.row_of(i) is not None for ix in indexes)]
    if present and 2 * len(present) >= len(stored):
        return present
    common = sorted(set(indexes[0].items.ids()).intersection(*(ix.items.ids() for ix in indexes[1:])))
    common = [i for i in common if all(ix.row_of(i) is not None for ix in indexes)]  # not deleted
    if not common:
        return []
    rng = np.random.default_rng(0)
    chosen = sorted(common[i] for i in rng.choice(len(common), size=min(count, len(common)), replace=False))
    if stored:
        log.warning("canaries %s: %d of %d left in the indexes compared: picked %d new ones", path, len(present),
                    len(stored), len(chosen))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ids": chosen}, indent=1) + "\n")
    return chosen


def canary_overlap(store: Store, old, new, k: int, count: int) -> float | None:
    """Mean overlap@k of the canaries' neighbours in the old and new index (None: the two
    indexes share no item to ask about)."""
    overlaps = []
    for item_id in canary_ids(store, [old, new], count):
        a = {n.id for n in old.similar_to(item_id, k)}
        b = {n.id for n in new.similar_to(item_id, k)}
        overlaps.append(len(a & b) / max(1, min(k, len(a), len(b))))
    return float(np.mean(overlaps)) if overlaps else None


def canary_self_retrieval(store: Store, index, count: int) -> float | None:
    """Share of the canaries that ``index`` returns first (or a byte-identical copy of, embedded
    once: the same content hash) when asked with their own stored embedding: what must hold for any sane model and index, whatever the model (None: no
    canary). A collapsed model (everything alike) or a broken index fails it."""
    hits = []
    for item_id in canary_ids(store, [index], count):
        found = index.search(index.embeddings[index.row_of(item_id)], k=1)[0]
        hits.append(bool(found) and index.same_content(item_id, found[0].id))  # or a byte-identical copy
    return float(np.mean(hits)) if hits else None


def validate(store: Store, report: ReindexReport, summary, current_index, config: ReindexConfig,
             model_changed: bool) -> None:
    """Raise ValidationError unless the new index is fit to serve.

    Always: ANN recall, every file indexed or dead-lettered, index and model compatible, and
    (with a served index) not shrunk below ``min_items_ratio`` of it. Same model as served:
    canary neighbours overlap the served ones by ``min_canary_overlap`` (re-embedding must not
    change answers much). New model: each canary finds itself first (``min_canary_self``);
    whether its answers are better was judged by the evaluation gate."""
    from lookalike.index.searcher import ItemIndex
    from lookalike.pipeline.versions import check_version

    new = ItemIndex.load(store.index_dir(report.new_index))
    tuning = new.manifest.get("tuning") or {}
    recall = tuning.get("recall")
    report.metrics["index"] = {"recall": recall, "qps": tuning.get("qps"), "mode": new.manifest["build"]["mode"], "count": len(new)}
    if recall is not None and recall < config.target_recall:
        raise ValidationError(f"ANN recall {recall:.3f} is below the target {config.target_recall}")
    indexed_files = len({item["uri"] for item in new.items})
    failed_files = summary.failed - summary.unlisted_folders  # a folder that could not be listed is one dead letter
    if indexed_files + failed_files != summary.files_matched:
        raise ValidationError(f"{summary.files_matched} files matched but {indexed_files} indexed + {failed_files} dead-lettered")
    check_version(store, report.new_index)
    if current_index is not None and len(new) < config.min_items_ratio * len(current_index):
        raise ValidationError(f"the new index has {len(new)} items, fewer than {config.min_items_ratio:g} of the "
                              f"{len(current_index)} served by {current_index.version}: has most of the corpus "
                              "vanished? (use --min-items-ratio 0 to accept)")
    if model_changed:
        share = canary_self_retrieval(store, new, count=config.num_canaries)
        report.metrics["canary_self_at_1"] = share
        if share is None or share < config.min_canary_self:
            raise ValidationError(f"canary self-retrieval@1 {share if share is None else f'{share:.3f}'} is below "
                                  f"{config.min_canary_self}: the new model or index does not find items by their own "
                                  "embedding (use --min-canary-self to accept)")
    elif current_index is not None:
        overlap = canary_overlap(store, current_index, new, k=10, count=config.num_canaries)
        report.metrics["canary_overlap_at_10"] = overlap
        if overlap is None:
            raise ValidationError(f"no canary query is left: the served index {current_index.version} and the new one "
                                  "share no item")
        if overlap < config.min_canary_overlap:
            raise ValidationError(f"canary overlap@10 {overlap:.3f} is below {config.min_canary_overlap}: with the same "
                                  "model the neighbours changed too much (use --min-canary-overlap to accept)")
