from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pytest

from lookalike.index import simd
from lookalike.index.builder import IndexOptions, build_index, build_searcher, resolve_options
from lookalike.index.searcher import ItemIndex

scann = pytest.importorskip("scann")
ALL = {f: True for needs in simd.SWITCHES.values() for f in needs}
CPU = simd.cpu_features()
# Only kernels this CPU can run may be forced on: an AVX-512 kernel on a CPU without it dies of SIGILL
RUNNABLE = [(False, False)] + [flags for flags, switch in (((True, False), "should_use_avx2"), ((True, True), "should_use_avx512"))
                               if all(CPU.get(f, False) for f in simd.SWITCHES[switch])]


@contextmanager
def switches(avx2: bool, avx512: bool):
    """Set ScaNN's kernel switches for the block, then restore them."""
    from scann.scann_ops.py import scann_ops_pybind
    import ctypes

    lib = ctypes.CDLL(scann_ops_pybind.scann_pybind.__file__)
    s2, s512 = simd._switch(lib, "should_use_avx2"), simd._switch(lib, "should_use_avx512")
    saved = (s2.value, s512.value)
    s2.value, s512.value = avx2, avx512
    try:
        yield s2, s512
    finally:
        s2.value, s512.value = saved


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_enable_follows_the_cpu_features_and_the_environment(monkeypatch):
    with switches(False, False) as (s2, s512):
        monkeypatch.setenv(simd.ENV, "0")
        assert simd.enable_scann_simd(ALL) == "avx1" and not s2.value  # opted out: ScaNN's own choice stays
        monkeypatch.delenv(simd.ENV)
        assert simd.enable_scann_simd({**ALL, "AVX512BW": False}) == "avx2" and s2.value and not s512.value
        assert simd.enable_scann_simd(ALL) == "avx512" and s512.value
        assert simd.enable_scann_simd({}) == "avx512"  # never switched off again
    expected = {1: "avx1", 2: "avx2", 3: "avx512"}[len(RUNNABLE)]
    assert simd.enable_scann_simd(CPU) == expected


@pytest.mark.parametrize("mode", ["brute_force", "tree_exact", "tree_ah"])
def test_wider_kernels_return_the_same_neighbours(mode):
    if len(RUNNABLE) == 1:
        pytest.skip("this CPU has neither ScaNN's AVX2 nor its AVX-512 kernel features, only AVX1 to compare with")
    x, q = unit(3000, 24), unit(40, 24, seed=1)
    params = resolve_options(len(x), IndexOptions(mode=mode, num_leaves=20, leaves_to_search=5, reorder=60))
    searcher = build_searcher(x, params).searcher
    pre = params.get("reorder", -1) if mode == "tree_ah" else -1
    leaves = 5 if mode != "brute_force" else -1
    results = []
    for flags in RUNNABLE:
        with switches(*flags):
            idx, dist = searcher.search_batched(q, 10, pre, leaves, False, 256)
        results.append((np.asarray(idx), np.asarray(dist)))
    for idx, dist in results[1:]:
        assert (idx == results[0][0]).mean() >= 0.99  # random data: no ties, only float rounding differs
        np.testing.assert_allclose(dist, results[0][1], atol=1e-5)
    if mode == "brute_force":
        exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
        assert (results[-1][0] == exact).all()


def test_manifest_records_the_kernels(tmp_path):
    x = unit(300, 8)
    build_index(x, pa.table({"id": [str(i) for i in range(300)]}), model_version="m", out_dir=tmp_path / "i")
    index = ItemIndex.load(tmp_path / "i")
    assert index.manifest["scann_kernels"] == simd.enable_scann_simd()
    assert index.manifest["scann_kernels"] in ("avx1", "avx2", "avx512", "unknown")
