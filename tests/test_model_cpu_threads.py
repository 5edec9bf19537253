"""XLA's CPU thread pool per process: sized before JAX starts, a user's setting kept.

Each case runs in a fresh Python process (the pool is made once per process, when JAX
starts) and counts the pool's threads, which XLA names ``tf_XLAEigen``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lookalike.model.cpu_threads import available_cpus, threads_per_worker

CHILD = """
import collections, json, os, sys
from lookalike.model.cpu_threads import limit_xla_cpu_threads
first = limit_xla_cpu_threads(int(sys.argv[1]))
import jax, jax.numpy as jnp
x = jnp.ones((64, 64))
jax.jit(lambda a: a @ a)(x).block_until_ready()
again = limit_xla_cpu_threads(1)  # JAX runs now: too late, nothing changes
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print(json.dumps({"first": first, "again": again, "pool": names["tf_XLAEigen"], "env": os.environ.get("PJRT_NPROC")}))
"""


def run_child(threads: int, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads)], env={**clean, "JAX_PLATFORMS": "cpu", **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from Linux's /proc")


@needs_proc
def test_pool_takes_the_size_set_before_jax_starts():
    # 3 is more threads than this 2-CPU machine has and differs from JAX's default of one per CPU
    got = run_child(3)
    assert got == {"first": True, "again": False, "pool": 3, "env": "3"}


@needs_proc
def test_a_size_the_user_set_is_kept():
    got = run_child(3, PJRT_NPROC="2")
    assert got == {"first": False, "again": False, "pool": 2, "env": "2"}


def test_threads_per_worker_shares_the_cpus():
    cpus = available_cpus()
    assert threads_per_worker(1) == cpus
    assert threads_per_worker(cpus) == 1
    assert threads_per_worker(cpus * 4) == 1  # never zero
    if cpus >= 4:
        assert threads_per_worker(2) == cpus // 2
    with pytest.raises(ValueError, match="num_workers must be at least 1, got 0"):
        threads_per_worker(0)
