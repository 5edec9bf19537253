"""Let ScaNN use the AVX2 / AVX-512 kernels the CPU has.

ScaNN picks its distance kernels (float dot products of the tree's leaves, brute force,
AH lookup tables) from two process-wide switches, ``should_use_avx2`` and
``should_use_avx512``, that its static initialisers set from a CPU feature test. In the
installed ScaNN wheel that test is a stub returning false, so every search ran the AVX1
kernels even on AVX-512 machines. ``enable_scann_simd`` sets the switches from the CPU
features numpy detects (which include the operating system's support for the wider
registers, the XCR0 test), once per process, before any searcher is built or loaded.

Results are the same up to float rounding (the kernels sum in another order: scores
differ by ~1e-7, ids agree), so indexes built with either setting load and search with
the other. On CIFAR-10 50k x 64 (one thread): tree_exact +13-14%, tree_ah +30%, brute
force +78%. ``LOOKALIKE_SCANN_SIMD=0`` keeps ScaNN's own (AVX1) choice.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

ENV = "LOOKALIKE_SCANN_SIMD"
# switch -> CPU features (numpy's names) it needs: ScaNN's AVX2 kernels use FMA, its AVX-512 ones F, DQ and BW
SWITCHES = {"should_use_avx2": ("AVX2", "FMA3"), "should_use_avx512": ("AVX2", "FMA3", "AVX512F", "AVX512DQ", "AVX512BW")}
_lock = threading.Lock()
_state: dict[str, bool] | None = None


def _switch(lib: ctypes.CDLL, name: str) -> ctypes.c_bool:
    return ctypes.c_bool.in_dll(lib, f"_ZN14research_scann14flags_internal{len(name)}{name}E")  # mangled C++ name


def cpu_features() -> dict[str, bool]:
    from numpy._core._multiarray_umath import __cpu_features__

    return dict(__cpu_features__)


def scann_kernels(state: dict[str, bool]) -> str:
    return "avx512" if state.get("should_use_avx512") else "avx2" if state.get("should_use_avx2") else "avx1"


def enable_scann_simd(features: dict[str, bool] | None = None) -> str:
    """Turn on the ScaNN kernels this CPU supports (once per process); returns "avx512", "avx2" or "avx1".

    ``features`` (numpy's CPU feature names -> supported) is for tests; by default the
    running CPU's. Never turns a switch off that ScaNN turned on itself.
    """
    global _state
    with _lock:
        if _state is not None and features is None:
            return scann_kernels(_state)
        from lookalike.index.scann_module import scann_ops_pybind

        try:
            lib = ctypes.CDLL(scann_ops_pybind().scann_pybind.__file__)
            switches = {name: _switch(lib, name) for name in SWITCHES}
        except (OSError, ValueError, AttributeError) as e:  # another ScaNN build without these symbols
            log.info("ScaNN kernel switches not found (%s); keeping ScaNN's own kernel choice", e)
            _state = {}
            return "unknown"
        if os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off"):
            have = cpu_features() if features is None else features
            for name, needs in SWITCHES.items():
                if all(have.get(f, False) for f in needs) and not switches[name].value:
                    switches[name].value = True
        _state = {name: bool(s.value) for name, s in switches.items()}
        log.debug("ScaNN kernels: %s", scann_kernels(_state))
        return scann_kernels(_state)


__all__ = ["enable_scann_simd", "scann_kernels"]
