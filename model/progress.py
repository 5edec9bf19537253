"""Progress of long work as periodic log lines with count, rate and ETA."""

from __future__ import annotations

import logging
import time


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Logs ``name: done/total unit, rate/s, ETA`` at most every ``every_s`` seconds;
    ``already``: done before this process started (a resumed run), counted as done but not
    in the rate."""

    def __init__(self, name: str, total: int | None, unit: str, logger: logging.Logger, every_s: float = 2.0,
                 already: int = 0):
        self.name, self.total, self.unit, self.log, self.every_s = name, total, unit, logger, every_s
        self.created = self.start = time.perf_counter()
        self.last = self.start
        self.already = self.count = already

    def restart_rate(self, count: int) -> None:
        """Measure the rate (and ETA) from now, ``count`` done: after a slow first unit such as
        an XLA compile, which would otherwise put hours into the first ETA. The next line comes
        ``every_s`` later; ``done`` still gives the time since creation."""
        self.start = self.last = time.perf_counter()
        self.already = self.count = count

    def line(self, extra: str = "", eta: bool = True) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (self.count - self.already) / elapsed if elapsed > 0 else 0.0
        text = f"{self.name}: {self.count}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.count / self.total:.0f}%), {rate:.1f} {self.unit}/s"
            left = (self.total - self.count) / rate if rate > 0 else float("nan")
            text += f", ETA {format_seconds(left) if left == left else '?'}" if eta else ""
        else:
            text += f" {self.unit}, {rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}"
        return text + (f", {extra}" if extra else "")

    def update(self, count: int, extra: str = "") -> None:
        self.count = count
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.info(self.line(extra))

    def done(self, extra: str = "") -> None:
        """The last line: no ETA (a job that stops short of its total, e.g. on a time budget, has none left)."""
        self.log.info(self.line(extra, eta=False) + f" - done in {format_seconds(time.perf_counter() - self.created)}")


def last_value_note(history: list[dict], key: str, step: int) -> str:
    """``"loss 0.1234"`` for the newest record of ``history`` holding ``key``, naming its step
    when that is not ``step`` (progress lines come more often than values are recorded), or ""."""
    record = next((r for r in reversed(history) if key in r), None)
    if record is None:
        return ""
    return f"{key} {record[key]:.4f}" + (f" (step {record['step']})" if record.get("step") != step else "")
