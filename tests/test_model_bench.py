"""The Omniglot benchmark's data readers, on the real data (skipped when it is absent), and its documented budget."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
needs_omniglot = pytest.mark.skipif(not (OMNIGLOT / "one_shot_runs.zip").is_file(),
                                    reason=f"Omniglot benchmark data not found at {OMNIGLOT}")


@pytest.fixture(scope="module")
def bench_model():
    sys.path.insert(0, str(REPO))
    try:
        import bench.model as module
    finally:
        sys.path.remove(str(REPO))
    return module


@needs_omniglot
def test_lake_runs_parse_and_raw_pixels_score_near_the_published_baseline(bench_model):
    from lookalike.model.preprocess import PreprocessSpec

    runs = bench_model.load_lake_runs(PreprocessSpec(image_size=28, channels=1))
    assert len(runs) == 20
    train, test, answer = runs[0]
    assert train.shape == (20, 28, 28, 1) and test.shape == (20, 28, 28, 1) and sorted(answer) == list(range(20))
    assert 0.7 < float(train.mean()) < 1.0  # white background, dark strokes, like every other input
    # 1-NN on raw pixels: about 22 % in the literature; a wrong test -> training mapping gives ~5 %.
    acc = bench_model.lake_accuracy(lambda x: x.reshape(len(x), -1), runs)
    assert 0.12 < acc < 0.45, acc


@needs_omniglot
def test_background_set_is_augmented_with_rotated_classes(bench_model):
    from lookalike.model.preprocess import PreprocessSpec

    x, y = bench_model.load_background(PreprocessSpec(image_size=28, channels=1))
    assert x.shape == (964 * 20 * 4, 28, 28, 1) and len(np.unique(y)) == 964 * 4
    np.testing.assert_allclose(x[964 * 20], np.rot90(x[0], 1, axes=(0, 1)))


def test_the_quick_training_budget_is_the_same_in_the_help_the_readme_and_build_md(bench_model, capsys):
    with pytest.raises(SystemExit):
        bench_model.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    minutes = bench_model.QUICK_MINUTES
    assert f"--quick a {minutes}-minute training budget" in help_text and f"or {minutes} with --quick" in help_text
    for doc in ("README.md", "BUILD.md"):
        assert f"`--quick` (a {minutes}-minute training budget" in " ".join((REPO / doc).read_text().split()), doc
