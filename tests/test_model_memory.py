"""Freed memory is reused by the next batch instead of faulted in again."""

import subprocess
import sys

import pytest

from lookalike.model.memory import keep_freed_memory

# A fresh process allocates and frees 24 blocks of 1 MiB, 20 times over, and prints how many
# page faults that took (every page would fault again if freed memory went back to the OS).
BATCHES = 20
PAGES_PER_BATCH = 24 * (1 << 20) // 4096
SCRIPT = f"""
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from lookalike.model.memory import keep_freed_memory
    assert keep_freed_memory()
elif sys.argv[1] == "encoder":  # loading an encoder to run it sets malloc up as well
    from lookalike.model.artifact import load_encoder
    load_encoder(sys.argv[2])
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


def page_faults(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.fixture(scope="module")
def glibc():
    if not keep_freed_memory():
        pytest.skip("malloc is not glibc's: nothing to set")


def test_batches_reuse_freed_memory_without_page_faults(glibc):
    kept = page_faults("keep")
    assert kept < BATCHES * PAGES_PER_BATCH // 20, f"{kept} page faults for {BATCHES} batches of {PAGES_PER_BATCH} pages"
    # glibc's defaults hand the freed blocks back and fault them in again, batch after batch.
    assert page_faults("default") > BATCHES * PAGES_PER_BATCH // 2


def test_loading_an_encoder_keeps_freed_memory(glibc, trained_store):
    kept = page_faults("encoder", str(trained_store.require_model()))
    assert kept < BATCHES * PAGES_PER_BATCH // 20


FREEZE_SCRIPT = """
import gc
from lookalike.model.memory import long_lived_objects_frozen
before = len(gc.get_objects())
with long_lived_objects_frozen() as froze:
    inside = gc.get_freeze_count()
    assert froze and inside >= before // 2 and len(gc.get_objects()) < inside // 10, (froze, inside, before)
after = gc.get_freeze_count()
gc.freeze()  # something else froze objects (a server's settle): left frozen, nothing more frozen
frozen = gc.get_freeze_count()
with long_lived_objects_frozen() as froze_again:
    assert not froze_again and gc.get_freeze_count() == frozen
print(after, gc.get_freeze_count() == frozen)
"""


def test_long_lived_objects_are_frozen_out_of_collections_only_within_the_block():
    """The objects alive on entry are skipped by collections inside the block, collectable again
    after it; objects frozen by someone else before stay frozen (a fresh process: pytest's own
    fixtures may have frozen objects here)."""
    out = subprocess.run([sys.executable, "-c", FREEZE_SCRIPT], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "True"]
