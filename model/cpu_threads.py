"""XLA's CPU thread pool sized for the processes that share the machine.

JAX's CPU client runs every computation on a pool of one thread per CPU. That suits one
process. The embed pipeline's multi-process mode (``lookalike embed --num-workers W``)
starts W worker processes on one machine, each with its own encoder: with a pool per CPU
in each, W x CPUs threads would contend for the cores, each op's work split into more
parts than there are cores to run them, and its threads waiting for descheduled
siblings. Each worker instead gets an equal share of the CPUs (``threads_per_worker``).

The pool size is read once, when JAX starts its backends, from the ``PJRT_NPROC``
environment variable (then ``NPROC``), so ``limit_xla_cpu_threads`` must run in the process
before its first JAX computation, which is where a pipeline worker loads its model. A
size the user set in the environment is kept. GPU and TPU devices are not affected.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

POOL_SIZE_VARIABLES = ("PJRT_NPROC", "NPROC")  # read by JAX's CPU client, in this order


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS)
        return max(1, os.cpu_count() or 1)


def threads_per_worker(num_workers: int) -> int:
    """XLA CPU threads for each of ``num_workers`` processes sharing this machine's CPUs."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    return max(1, available_cpus() // num_workers)


def _backends_initialized() -> bool:
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a JAX without it: assume not started (setting the variable is harmless then)
        return False
    return bool(backends_are_initialized())


def limit_xla_cpu_threads(num_threads: int) -> bool:
    """Size this process's XLA CPU thread pool to ``num_threads``; True if that took effect.

    False, changing nothing, when the user already set a pool size in the environment
    or JAX's backends already started in this process (the pool exists)."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be at least 1, got {num_threads}")
    preset = {name: os.environ[name] for name in POOL_SIZE_VARIABLES if os.environ.get(name)}
    if preset:
        log.info("XLA CPU threads: keeping %s from the environment", preset)
        return False
    if _backends_initialized():
        log.debug("XLA CPU threads: JAX already started in this process; its pool stays as it is")
        return False
    os.environ[POOL_SIZE_VARIABLES[0]] = str(int(num_threads))
    log.info("XLA CPU threads of this process (pid %d): %d of %d CPUs", os.getpid(), num_threads, available_cpus())
    return True


__all__ = ["available_cpus", "limit_xla_cpu_threads", "threads_per_worker"]
