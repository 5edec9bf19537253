"""Whether a triplet batch's mining fits in memory, checked before any work.

batch_all and semi_hard mining compare every (anchor, positive, negative) of a batch in
[B, B, B] tensors, batch_hard every pair in [B, B] ones: ``pk_images=1000`` once ended in a
raw XLA out-of-memory error (67 GB) after the data had loaded. ``check_triplet_memory``
estimates the peak from the batch size and refuses a batch that needs more than half the
memory of the devices (a CPU's share of the host's RAM, or of the container's limit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jax.sharding import Mesh
from lookalike.model.config import TrainConfig

# batch_all and semi_hard mining build [B, B, B] tensors (every anchor, positive, negative):
# about a float32 and a bool per element at their peak.
CUBIC_MINING = ("batch_all", "semi_hard")
CUBIC_BYTES_PER_ELEMENT = 5
SQUARE_BYTES_PER_ELEMENT = 16  # batch_hard: distances, masks and the masked copies, [B, B] each
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def memory_bytes(device: Any) -> int | None:
    """The memory a computation on ``device`` can use: a GPU's or TPU's own; for a CPU the
    host's RAM, or the container's memory limit (cgroup) when lower."""
    if device.platform == "cpu":
        try:
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        for limit_file in CGROUP_MEMORY_LIMITS:  # a container's limit (docker --memory) is below the host's RAM
            try:
                text = Path(limit_file).read_text().strip()
            except OSError:
                continue
            if text.isdigit():
                ram = min(ram, int(text))
        return ram
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def check_triplet_memory(config: TrainConfig, images_per_step: int, mesh: Mesh) -> None:
    """Refuse, before any work, a triplet batch whose mining needs more than half the
    device's memory: ``pk_images=1000`` once ended in a raw XLA out-of-memory error (67 GB).
    batch_all and semi_hard hold [B, B, B] tensors, batch_hard [B, B] ones."""
    if config.loss != "triplet":
        return
    power, per_element = (3, CUBIC_BYTES_PER_ELEMENT) if config.mining in CUBIC_MINING else (2, SQUARE_BYTES_PER_ELEMENT)
    needed = images_per_step ** power * per_element
    device = mesh.devices.flat[0]
    available = memory_bytes(device)  # CPU devices share the host's RAM; accelerators each have their own
    if available is not None and device.platform != "cpu":
        available *= mesh.devices.size
    if available is not None and needed > available / 2:
        largest = int((available / 2 / per_element) ** (1 / power))
        what = "every (anchor, positive, negative)" if power == 3 else "every pair"
        other = " or use mining=batch_hard (memory grows with the square)" if power == 3 else ""
        raise ValueError(
            f"config pk_classes={config.pk_classes} x pk_images={config.pk_images} gives {images_per_step} images/step "
            f"(P at most the classes that have images), and mining={config.mining} compares {what} of a batch: about "
            f"{needed / 2**30:,.0f} GiB, more than half of the {available / 2**30:.0f} GiB here; keep a batch under "
            f"~{largest:,} images (lower pk_classes or pk_images){other}")
