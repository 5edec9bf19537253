"""The memory a triplet batch's mining may use: the device's, capped by a container's limit."""

import os


def test_the_memory_a_cpu_computation_can_use_is_capped_by_a_container_limit(tmp_path, monkeypatch):
    import jax
    import lookalike.model.mining_memory as mining_memory

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = tmp_path / "memory.max"
    limit.write_text(f"{ram // 4}\n")
    monkeypatch.setattr(mining_memory, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "absent"), str(limit)))
    assert mining_memory.memory_bytes(jax.devices("cpu")[0]) == ram // 4
    limit.write_text("max\n")  # cgroup v2: no limit
    assert mining_memory.memory_bytes(jax.devices("cpu")[0]) == ram


def test_a_triplet_batch_is_refused_by_its_mining_s_peak_memory_and_a_pair_batch_never():
    import dataclasses

    import pytest

    from lookalike.model.config import get_config
    from lookalike.model.mining_memory import check_triplet_memory, memory_bytes
    from lookalike.model.sharding import data_mesh

    mesh = data_mesh()
    device = mesh.devices.flat[0]  # CPU devices share the host's RAM; accelerators each have their own
    half_gib = memory_bytes(device) * (1 if device.platform == "cpu" else mesh.devices.size) / 2 / 2**30
    config = dataclasses.replace(get_config("tiny"), loss="triplet", mining="batch_all")
    check_triplet_memory(config, 64, mesh)  # 64^3 x 5 bytes: 1.3 MB
    cube = round((half_gib * 2**30 / 5) ** (1 / 3)) + 50  # just past half the memory as [B, B, B]
    with pytest.raises(ValueError, match=rf"gives {cube} images/step .*mining=batch_all compares every \(anchor, "
                                         r"positive, negative\).*more than half of the .*or use mining=batch_hard"):
        check_triplet_memory(config, cube, mesh)
    check_triplet_memory(dataclasses.replace(config, mining="batch_hard"), cube, mesh)  # [B, B]: fits
    check_triplet_memory(dataclasses.replace(config, loss="contrastive"), 10**6, mesh)  # pairs: nothing mined
