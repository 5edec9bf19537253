"""The reindex run report: JSON, Markdown, the training curve and example queries as PNGs.

``DIR/reports/<UTC time>/`` holds ``report.json`` (everything), ``report.md`` (current vs
candidate side by side, steps with timings, what the embed step did to the corpus with the
first failed files named, the index's recall/QPS point),
``training.png`` (the candidate's training curve) and ``examples.png`` (a few queries
with their top results from the served and the new version).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from lookalike.model.preprocess import DEFAULT_MAX_PIXELS, to_mode
from lookalike.model.store import Store, resolve_in_store

if TYPE_CHECKING:
    from lookalike.pipeline.reindex import ReindexReport

log = logging.getLogger(__name__)

TILE = 64


def _tile(item: dict[str, Any], root: Path) -> Image.Image:
    for key in ("thumbnail", "uri"):
        path = resolve_in_store(str(item[key]), root) if item.get(key) else None
        if path and path.is_file():
            try:
                with Image.open(path) as img:
                    if img.width * img.height > DEFAULT_MAX_PIXELS:  # Pillow's own check is off (preprocess)
                        continue
                    return to_mode(img, 3).resize((TILE, TILE), Image.Resampling.NEAREST)
            except OSError:
                continue
    return Image.new("RGB", (TILE, TILE), (200, 200, 200))


def example_grid(store: Store, old_version: str | None, new_version: str, path: Path, queries: int = 4, k: int = 5) -> None:
    """Rows: query | top-k in the served version | top-k in the new version; each column group
    has its title above it and a grey rule between groups."""
    from lookalike.index.searcher import ItemIndex

    new = ItemIndex.load(store.index_dir(new_version))
    old = ItemIndex.load(store.index_dir(old_version)) if old_version else None
    picks = [new.items[i * len(new) // queries] for i in range(queries)]
    gap, header, row_gap = 12, 28, 8
    lefts = (0, TILE + gap, TILE + gap + k * TILE + gap)  # query, served, new
    width, height = lefts[2] + k * TILE, header + queries * (TILE + row_gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    titles = ("query", f"served {old_version or '(none)'}", f"new {new_version}")
    for left, span, title in zip(lefts, (TILE, k * TILE, k * TILE), titles):
        text_width = draw.textlength(title)
        draw.text((left + max(0, (span - text_width) / 2), (header - 12) / 2), title, fill="black")
    draw.line([(0, header - 3), (width, header - 3)], fill=(160, 160, 160), width=1)
    for left in lefts[1:]:
        draw.line([(left - gap // 2, 0), (left - gap // 2, height)], fill=(120, 120, 120), width=2)
    for r, item in enumerate(picks):
        y = header + r * (TILE + row_gap)
        canvas.paste(_tile(item, store.root), (0, y))
        for left, index in zip(lefts[1:], (old, new)):
            if index is None or index.row_of(item["id"]) is None:
                note = "no served version" if index is None else "not in this version"
                draw.text((left + 4, y + TILE // 2 - 6), note, fill=(120, 120, 120))
                continue
            for j, n in enumerate(index.similar_to(item["id"], k)):
                canvas.paste(_tile(index.items[n.row], store.root), (left + j * TILE, y))
    canvas.save(path)


def fmt(value: Any) -> str:
    """A value as report.md shows it: floats rounded for reading (4 decimals up to 1, so scores
    line up, 2 below 100, none above: 0.9949999999999999 is 0.9950, 1234.567 queries/s is
    1235), None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value):
        size = abs(value)
        return f"{value:.4f}" if size <= 1 else f"{value:.2f}" if size < 100 else f"{value:.0f}"
    return str(value)


def _side_by_side(metrics: dict[str, Any]) -> list[str]:
    cur, cand = metrics.get("current") or {}, metrics.get("candidate") or {}
    names = sorted(set(cur) | set(cand))
    lines = ["| metric (frozen evaluation set) | current | candidate |", "|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {fmt(cur.get(n))} | {fmt(cand.get(n))} |")
    return lines


def _corpus_changes(embed: dict[str, Any]) -> list[str]:
    """report.md's lines on what the embed step did to the corpus (``metrics["embed"]``)."""
    def count(key: str) -> str:
        value = embed.get(key)
        return "?" if value is None or value == -1 else str(value)

    line = (f"Corpus: {count('files_matched')} files listed, {count('files_read')} read; "
            f"{count('embedded')} embedded, {count('unchanged')} reused (unchanged), {count('failed')} failed")
    if embed.get("removed") is not None:
        line += f", {embed['removed']} removed since the served index"
    lines = [line + f"; {count('items')} items."]
    if embed.get("failed"):
        letters = embed.get("dead_letters") or []
        where = (", ".join(f"`{p}`" for p in letters) if letters
                 else f"`{embed.get('run_dir', '?')}/dead_letter-*.jsonl`")
        examples = embed.get("dead_letter_examples") or []
        lines.append(f"Files that failed are dead-lettered (skipped, with the reason) in {where}"
                     + (" (until `--keep` prunes that run):" if examples else "."))
        if examples:
            lines += [""] + [f"- `{_one_line(row.get('uri'))}` at {row.get('stage')}: {_one_line(row.get('reason'))}"
                             for row in examples]  # exact in report.json
            if embed["failed"] > len(examples):
                lines.append(f"- ... and {embed['failed'] - len(examples)} more")
    return lines + [""]


def _one_line(text: Any) -> str:
    """Text as one line of markdown that cannot end a code span: whitespace runs (newlines in a
    multi-line error or a file name) become one space, backticks quotes."""
    return " ".join(str(text).split()).replace("`", "'")


def new_index_line(report: ReindexReport) -> str:
    """report.md's words for the index a run promoted, or why it promoted none."""
    if report.new_index:
        return report.new_index
    if report.outcome == "kept_current":
        return f"none (the corpus is unchanged: {report.previous_index} stays CURRENT)"
    if report.rejected_index:
        return "none (the candidate index was rejected)"
    if report.stopped_status is not None:
        return "none (the run was stopped before promoting one)"
    return "none (nothing promoted: the run failed)"


EXAMPLES_PNG = "examples.png"


def report_folder(store: Store, started_unix_s: float) -> Path:
    """Where the report of a run started at ``started_unix_s`` goes: ``DIR/reports/r-<UTC time>``."""
    return store.root / "reports" / time.strftime("r-%Y%m%dT%H%M%S", time.gmtime(started_unix_s))


# The reports a reindex --keep leaves: a month of nightly runs (the rest stays in history.jsonl).
REPORTS_KEPT = 30


def prune_reports(store: Store, keep: int = REPORTS_KEPT) -> list[str]:
    """Delete the report folders (``DIR/reports/r-<UTC time>``) beyond the ``keep`` newest;
    returns them as ``reports/<name>``."""
    folder = store.root / "reports"
    if not folder.is_dir():
        return []
    runs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("r-")), key=lambda p: p.name)
    removed = []
    for old in runs[: max(0, len(runs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
        if not old.exists():
            removed.append(f"reports/{old.name}")
    return removed


def draw_examples(store: Store, report, folder: Path) -> bool:
    """Draw ``examples.png`` (served vs the new index) into ``folder`` once the run has a new
    index; True if it is there. Reindex calls this before it prunes, which may delete the
    version served before (``--keep 1``); a failure is a warning, never the run's."""
    if (folder / EXAMPLES_PNG).is_file():
        return True
    if "examples_drawn" in report.metrics:  # tried before the prune and failed (warned then): not again
        return False
    if not (report.new_index and store.index_dir(report.new_index).is_dir()):
        return False
    previous = report.previous_index
    if previous and previous != report.new_index and not store.index_dir(previous).is_dir():
        log.warning("the report's example queries show only the new index: the version served before, %s, "
                    "was pruned before they were drawn", previous)
        previous = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        example_grid(store, previous, report.new_index, folder / EXAMPLES_PNG)
        report.metrics["examples_drawn"] = True
    except Exception as e:  # the report must never turn a good run into a failure
        log.warning("could not draw the report's example queries: %s", e)
        report.metrics["examples_drawn"] = False
    return report.metrics["examples_drawn"]


def write_report(store: Store, report, started_unix_s: float) -> Path:
    from lookalike.pipeline.reindex import report_dict

    folder = report_folder(store, started_unix_s)
    folder.mkdir(parents=True, exist_ok=True)
    data = report_dict(report)
    (folder / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    md = [f"# lookalike reindex {folder.name}", "",
          f"**Outcome: {report.outcome}** (exit {report.exit_code}). {report.reason}", "",
          *([f"Then failed (the outcome stands): {'; '.join(report.errors_after_outcome)}", ""]
            if report.errors_after_outcome else []),
          "- served before: " + (f"index {report.previous_index} (model {report.current_model or 'unknown: the index did not load'})"
                                  if report.previous_index else "nothing (the store had no CURRENT index)"),
          f"- candidate model: {report.candidate_model or 'none (not trained)'}; "
          f"chosen: {report.chosen_model or 'none'}",
          f"- new index: {new_index_line(report)}"]
    if report.metrics.get("corpus"):
        md.append(f"- corpus: {report.metrics['corpus']}")
    if report.rejected_index:
        fate = "left for the next run to delete" if report.stopped_status is not None else "deleted"
        md.append(f"- candidate index built but not promoted ({fate}): {report.rejected_index}")
    md.append("")
    md += _side_by_side(report.metrics) + [""]
    gate = report.metrics.get("gate")
    if gate:
        md += [f"Gate: candidate {'accepted' if gate.get('accepted') else 'rejected'}: {gate.get('reason')}", ""]
    if report.metrics.get("embed"):
        md += _corpus_changes(report.metrics["embed"])
    index = report.metrics.get("index")
    if index:
        md += [f"Index: {index.get('mode')}, {index.get('count')} items, recall@10 {fmt(index.get('recall'))}, "
               f"{fmt(index.get('qps'))} queries/s", ""]
    if report.candidate_error:
        md += [f"Candidate model {report.candidate_model} not promoted: {report.candidate_error}", ""]
    if "canary_self_at_1" in report.metrics:
        md += [f"Canary self-retrieval@1 (new model): {fmt(report.metrics['canary_self_at_1'])}", ""]
    if "canary_overlap_at_10" in report.metrics:
        md += [f"Canary overlap@10 (served vs new, same model): {fmt(report.metrics['canary_overlap_at_10'])}", ""]
    md += ["| step | seconds | ok |", "|---|---|---|"] + [
        f"| {s['step']} | {fmt(s['seconds'])} | {'yes' if s['ok'] else 'no: ' + s.get('error', '')} |"
        for s in report.steps]
    try:
        if report.candidate_model and (store.model_dir(report.candidate_model) / "training.png").is_file():
            shutil.copyfile(store.model_dir(report.candidate_model) / "training.png", folder / "training.png")
            md += ["", "![training curve](training.png)"]
        if draw_examples(store, report, folder):
            md += ["", f"![example queries: served vs new]({EXAMPLES_PNG})"]
    except Exception as e:  # the report must never turn a good run into a failure
        log.warning("could not draw the report's pictures: %s", e)
    (folder / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    log.info("reindex report: %s", folder / "report.md")
    return folder
