"""Helpers shared by the benchmarks: result files, timing, real-data lookup."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "results"

log = logging.getLogger("bench")


def require_shared(relative: str) -> Path:
    """Path under ../shared/data, or SystemExit with a clear reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        raise SystemExit(f"benchmark data {path} not found: benchmarks need ../shared/data beside the repository")
    return path


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "host": platform.node(), "unix_s": time.time(), **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", path)
    return path


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.start
