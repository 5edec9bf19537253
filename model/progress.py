"""Progress of long work as periodic log lines with count, rate and ETA."""

from __future__ import annotations

import logging
import sys
import time


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# Away from a terminal (a cron mail, a service's journal) lines come less often as the work
# goes on: every ``every_s`` for the first ten times that, then every tenth of the time the
# work has run, at most every LOG_EVERY_MAX_S: ~150 lines for an hour instead of 1,800.
LOG_EVERY_MAX_S = 30.0
# An ETA needs this many units done (and 1 % of the total, or half of what a resumed run has
# left): from the first video of a folder, decoded while others are still in flight, it said
# 13 minutes for 5 seconds of work.
MIN_UNITS_FOR_ETA = 3


class Progress:
    """Logs ``name: done/total unit, rate/s, ETA`` at most every ``every_s`` seconds (on a
    terminal; elsewhere less often as the work goes on, see LOG_EVERY_MAX_S); ``already``:
    done before this process started (a resumed run), counted as done but not in the rate."""

    def __init__(self, name: str, total: int | None, unit: str, logger: logging.Logger, every_s: float = 2.0,
                 already: int = 0):
        self.name, self.total, self.unit, self.log, self.every_s = name, total, unit, logger, every_s
        self.created = self.start = time.perf_counter()
        self.last = self.start
        self.already = self.count = already
        self.on_terminal = _stderr_is_a_terminal()

    def interval_s(self, now: float) -> float:
        """Seconds between two lines at ``now`` (perf_counter)."""
        if self.on_terminal:
            return self.every_s
        return max(self.every_s, min(LOG_EVERY_MAX_S, (now - self.start) / 10))

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
            needed = min(max(MIN_UNITS_FOR_ETA, self.total // 100), max(1, (self.total - self.already) // 2))
            measured = self.count - self.already >= needed  # half the units left, for a resumed run near its end
            left = (self.total - self.count) / rate if rate > 0 and measured else float("nan")
            text += f", ETA {format_seconds(left) if left == left else '?'}" if eta else ""
        else:
            text += f" {self.unit}, {rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}"
        return text + (f", {extra}" if extra else "")

    def update(self, count: int, extra: str = "") -> None:
        self.count = count
        now = time.perf_counter()
        if now - self.last >= self.interval_s(now):
            self.last = now
            self.log.info(self.line(extra))

    def done(self, extra: str = "") -> None:
        """The last line: no ETA (a job that stops short of its total, e.g. on a time budget, has none left)."""
        self.log.info(self.line(extra, eta=False) + f" - done in {format_seconds(time.perf_counter() - self.created)}")


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def last_value_note(history: list[dict], key: str, step: int) -> str:
    """``"loss 0.1234"`` for the newest record of ``history`` holding ``key``, naming its step
    when that is not ``step`` (progress lines come more often than values are recorded), or ""."""
    record = next((r for r in reversed(history) if key in r), None)
    if record is None:
        return ""
    return f"{key} {record[key]:.4f}" + (f" (step {record['step']})" if record.get("step") != step else "")
