"""ScaNN's searcher API without TensorFlow: building, loading and searching an index never
imports it (4-5 s per command otherwise), and a later ``import scann`` still works."""

from __future__ import annotations

import subprocess
import sys

BUILD_LOAD_SEARCH = """
import sys, tempfile
import numpy as np, pyarrow as pa
from lookalike.index.builder import IndexOptions, build_index
from lookalike.index.searcher import ItemIndex
x = np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
out = tempfile.mkdtemp() + "/index"
build_index(x, pa.table({"id": [str(i) for i in range(500)]}), model_version="m", out_dir=out,
            options=IndexOptions(mode="tree_exact"))
rows = ItemIndex.load(out).search_rows(x[:3], 1)[0]
assert rows[:, 0].tolist() == [0, 1, 2], rows
print("tensorflow" in sys.modules)
import scann
from lookalike.index.scann_module import scann_ops_pybind
assert scann.scann_ops_pybind is scann_ops_pybind() and scann.ScannBuilder is not None
"""


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_an_index_is_built_loaded_and_searched_without_tensorflow() -> None:
    assert run(BUILD_LOAD_SEARCH) == "False"


def test_a_scann_imported_before_is_used_as_it_is() -> None:
    code = ("import scann\nfrom lookalike.index.scann_module import scann_ops_pybind\n"
            "assert scann_ops_pybind() is scann.scann_ops_pybind\nprint('ok')")
    assert run(code) == "ok"
