"""What an embed run wrote and counted: its embeddings, dead letters and summary."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lookalike.pipeline.items import embeddings_of

log = logging.getLogger(__name__)


class EmbedError(RuntimeError):
    """The embed job could not produce an index; the message says why."""
DEAD_LETTERS_SHOWN = 20  # skipped files named in the log and in summary.json; all are in dead_letter-*.jsonl


@dataclass
class EmbedSummary:
    run: str
    run_dir: str
    model_version: str
    index_version: str | None
    files_matched: int  # files listed; for a TFDS source, the examples its split or slice selects
    # Files whose bytes were read (an --incremental run skips those unchanged by path, size and
    # mtime); for a TFDS source, the examples read from the data set (all of them, --incremental
    # too: an example is only known unchanged once read and hashed). -1: unknown, when the runner
    # reports no metrics (the Dask runner) and the source's count is not known before the run.
    files_read: int
    items: int
    embedded: int
    # Files whose bytes this model embedded before (their cached items reused): those not even read
    # (same path, size, mtime and inode: the "not read" count logged at the start) plus those read and
    # found in the cache by hash (renamed, copied or touched files).
    unchanged: int
    duplicate_files: int  # files embedded in this run whose bytes another file embedded in it has
    failed: int  # dead letters: files, and corpus folders that could not be listed (``unlisted_folders``)
    elapsed_s: float
    items_per_s: float
    runner: str
    dead_letter_examples: list[dict[str, str]]
    # The --metadata file joined onto the items: path, sha256, rows, columns and how many of
    # its ids matched no item (unmatched_ids); None without one.
    metadata: dict[str, Any] | None = None
    # Corpus folders that could not be listed (permissions): one dead letter each among ``failed``,
    # their files unknown, so ``files_matched`` = files indexed + ``failed`` - ``unlisted_folders``.
    unlisted_folders: int = 0


def run_files(run_dir: str | Path, pattern: str) -> list[str]:
    """Paths of the files named ``pattern`` in ``run_dir`` (a folder name with ``[`` or ``?`` is no pattern)."""
    return sorted(str(p) for p in Path(run_dir).glob(pattern))


def counts_from_items(items: pa.Table) -> dict[str, int]:
    """The summary counts, derived from the written items (for runners without metrics)."""
    if items.num_rows == 0:
        return {}
    rows = items.select(["uri", "content_hash", "reused"]).to_pylist()
    new = [r for r in rows if not r["reused"]]
    new_sources = {r["content_hash"].split("#")[0] for r in new}
    return {
        "items_decoded": len({r["content_hash"] for r in new}),
        "files_unchanged": len({r["uri"] for r in rows if r["reused"]}),
        "duplicate_files": len({r["uri"] for r in new}) - len(new_sources),
    }


def counter_values(result: Any) -> dict[str, int]:
    """The pipeline's ``lookalike`` counters (empty where the runner does not report metrics)."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners do not support metrics queries
        return {}
    totals: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace == "lookalike":
            totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(c.committed or c.attempted or 0)
    return totals


def read_embeddings(run_dir: Path) -> tuple[np.ndarray, pa.Table]:
    """Read ``embeddings-*.parquet`` of a run -> ([N, D] float32, items table without embeddings)."""
    files = run_files(run_dir, "embeddings-*.parquet")
    tables = [t for t in (pq.read_table(f) for f in files) if t.num_rows]
    if not tables:
        return np.zeros((0, 0), np.float32), pa.table({"id": pa.array([], pa.string())})
    table = pa.concat_tables(tables).sort_by("id")
    return embeddings_of(table), table.drop(["embedding"])


def count_items(run_dir: Path) -> int:
    """Items in a run's ``embeddings-*.parquet``, from the files' metadata (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in run_files(run_dir, "embeddings-*.parquet"))


def read_items(run_dir: Path, columns: tuple[str, ...] = ("uri", "content_hash", "reused")) -> pa.Table:
    """``columns`` of a run's items table (default: those the counts need; never the embeddings)."""
    files = run_files(run_dir, "embeddings-*.parquet")
    tables = [pq.read_table(f, columns=list(columns)) for f in files]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({"uri": pa.array([], pa.string())})


def read_dead_letters(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for f in run_files(run_dir, "dead_letter-*.jsonl"):
        rows += [json.loads(line) for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def log_dead_letters(dead: list[dict[str, str]], run_dir: Path, shown: int = DEAD_LETTERS_SHOWN) -> None:
    """One warning per skipped file, for the first ``shown``; the rest are counted, with where to find them."""
    for row in dead[:shown]:
        log.warning("skipped %s at %s: %s", row["uri"], row["stage"], row["reason"])
    if len(dead) > shown:
        log.warning("... and %d more skipped file(s): all %d are listed in %s", len(dead) - shown, len(dead),
                    Path(run_dir) / "dead_letter-*.jsonl")


def summarize(run: str, run_dir: Path, model_version: str, total: int, runner: str, counted: dict[str, int],
              elapsed: float, files_read: int | None = None, unlisted_folders: int = 0) -> EmbedSummary:
    """Counts of a finished run: ``counted`` (the runner's counters, plus what was decided
    before it started), else derived from what it wrote. ``files_read``: the number of files
    read when it is known before the run (a TFDS source reads every example it selects), for
    runners without metrics; otherwise such a run's ``files_read`` is -1 (unknown)."""
    if counted:  # the runner counted: only the number of items is needed, from the shards' footers
        num_items = count_items(run_dir)
        counts = counted
    else:
        items = read_items(run_dir)
        num_items, counts = items.num_rows, counts_from_items(items)
    dead = read_dead_letters(run_dir)
    log_dead_letters(dead, run_dir)
    return EmbedSummary(
        run=run,
        run_dir=str(run_dir),
        model_version=model_version,
        index_version=None,
        files_matched=total,
        files_read=counts.get("files_read", 0 if counted else (-1 if files_read is None else files_read)),
        items=int(num_items),
        embedded=counts.get("items_decoded", 0),
        unchanged=counts.get("files_unchanged", 0),
        duplicate_files=counts.get("duplicate_files", 0),
        failed=len(dead),
        elapsed_s=round(elapsed, 3),
        items_per_s=round(num_items / elapsed, 1) if elapsed > 0 else 0.0,
        runner=runner,
        dead_letter_examples=dead[:DEAD_LETTERS_SHOWN],
        unlisted_folders=unlisted_folders,
    )
