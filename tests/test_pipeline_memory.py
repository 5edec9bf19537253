"""Freed memory is reused by the next batch instead of faulted in again."""

import subprocess
import sys

import pytest

from lookalike.pipeline.memory import keep_freed_memory

# A fresh process allocates and frees 24 blocks of 1 MiB, 20 times over, and prints how many
# page faults that took (every page would fault again if freed memory went back to the OS).
BATCHES = 20
PAGES_PER_BATCH = 24 * (1 << 20) // 4096
SCRIPT = f"""
import resource, sys
import numpy as np
from lookalike.pipeline.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    blocks = [np.ones(1 << 17) for _ in range(24)]
    del blocks
before = faults()
for _ in range({BATCHES}):
    blocks = [np.ones(1 << 17) for _ in range(24)]
    del blocks
print(faults() - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_batches_reuse_freed_memory_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("malloc is not glibc's: nothing to set")
    kept = page_faults("keep")
    assert kept < BATCHES * PAGES_PER_BATCH // 20, f"{kept} page faults for {BATCHES} batches of {PAGES_PER_BATCH} pages"
    # glibc's defaults hand the freed blocks back and fault them in again, batch after batch.
    assert page_faults("default") > kept
