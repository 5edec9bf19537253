"""The store lock with real concurrent processes: never two holders, a SIGKILLed holder's
lock is taken over (and says so), a live holder's is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lookalike.model.store_lock import LOCK_NAME, LockHeldError, StoreLock

WORKER = """
import json, os, sys, time
from lookalike.model.store_lock import LockHeldError, StoreLock
root, start, hold_s, log = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
while time.time() < start:
    pass
try:
    with StoreLock(root) as lock:
        got = time.time()
        time.sleep(hold_s)
        line = {"pid": os.getpid(), "got": got, "released": time.time(), "stale": lock.took_over_stale}
        with open(log, "a") as f:
            f.write(json.dumps(line) + "\\n")
except LockHeldError:
    pass
"""


def race(tmp_path: Path, processes: int, hold_s: float = 0.2) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "holders.jsonl"
    log.unlink(missing_ok=True)
    start = time.time() + 1.0  # every worker is up and spinning when the moment comes
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), str(start), str(hold_s), str(log)])
               for _ in range(processes)]
    for w in workers:
        assert w.wait(timeout=60) == 0
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("stale_lock", [False, True], ids=["free", "left_by_a_dead_run"])
def test_concurrent_processes_never_both_hold_the_lock(tmp_path, stale_lock):
    (tmp_path / "store").mkdir()
    for _ in range(12):
        if stale_lock:  # what a SIGKILLed run leaves: its owner line, and a pid that is gone
            (tmp_path / "store" / LOCK_NAME).write_text(json.dumps({"host": "h", "pid": 2**22 + 1, "started_unix_s": 1}))
        holders = race(tmp_path, processes=3)
        assert len(holders) == 1, holders  # all start together, one holds it for longer than the others try
        assert holders[0]["stale"] is stale_lock
        assert not (tmp_path / "store" / LOCK_NAME).exists()  # released


def test_a_sigkilled_holder_is_taken_over_and_a_live_one_is_refused(tmp_path):
    code = ("import sys, time\n"
            "from lookalike.model.store_lock import StoreLock\n"
            "StoreLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError, match=rf"another run holds .*pid {holder.pid}"):
            StoreLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the dead run
    with StoreLock(tmp_path) as lock:
        assert lock.took_over_stale
    with StoreLock(tmp_path) as lock:  # released cleanly: nothing to take over
        assert not lock.took_over_stale


def test_a_holder_that_recorded_nothing_is_said_to_be_so_not_given_invented_details(tmp_path):
    """`flock DIR/.reindex.lock sleep 25`: no purpose, pid, host or start time to report."""
    import fcntl

    path = tmp_path / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LockHeldError) as held:
            StoreLock(tmp_path).acquire()
        message = str(held.value)
        assert message == (f"another run holds {path} (held by another process that recorded no details): "
                           "try again when it has finished")
        os.write(fd, json.dumps({"purpose": "embed", "pid": 4242}).encode())  # partly recorded: only what it says
        with pytest.raises(LockHeldError, match=r"\(embed, pid 4242\): try again") as partly:
            StoreLock(tmp_path).acquire()
        assert "None" not in str(partly.value) and "just now" not in str(partly.value)
    finally:
        os.close(fd)
