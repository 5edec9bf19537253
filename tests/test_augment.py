"""Tests for lookalike.model.augment: random training distortions in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.model.augment import UNLABELLED_VIEWS, AugmentSpec, augment_batch, color_jitter, random_affine, warp_affine


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).random((6, 12, 12, 3)).astype(np.float32)


def test_off_spec_returns_the_input(images):
    assert not AugmentSpec().enabled
    np.testing.assert_array_equal(augment_batch(images, AugmentSpec(), np.random.default_rng(1)), images)


def test_identity_map_is_exact(images):
    eye = np.tile(np.asarray([[1.0, 0, 0], [0, 1.0, 0]]), (len(images), 1, 1))
    np.testing.assert_allclose(warp_affine(images, eye), images, atol=1e-6)


def test_flip_only_mirrors_left_right(images):
    out = augment_batch(images, AugmentSpec(flip=True), np.random.default_rng(3))
    flipped = [np.allclose(o, i[:, ::-1], atol=1e-5) for o, i in zip(out, images)]
    kept = [np.allclose(o, i, atol=1e-5) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_integer_shift_moves_pixels():
    img = np.zeros((1, 8, 8, 1), np.float32)
    img[0, 3, 3, 0] = 1.0
    shift = np.asarray([[[1.0, 0, -2.0], [0, 1.0, 0]]])  # output x reads source x - 2
    out = warp_affine(img, shift)
    assert out[0, 3, 5, 0] == pytest.approx(1.0) and out.sum() == pytest.approx(1.0)


def test_random_maps_stay_near_identity_for_small_settings():
    spec = AugmentSpec(shift=0.05, scale=0.05, rotate_deg=5, shear_deg=5)
    mats = random_affine(200, 28, spec, np.random.default_rng(0))
    assert np.abs(mats[:, :, :2] - np.eye(2)).max() < 0.2
    assert np.abs(mats[:, :, 2]).max() < 28 * 0.2


def test_views_are_deterministic_in_range_and_differ(images):
    a = augment_batch(images, UNLABELLED_VIEWS, np.random.default_rng(7))
    b = augment_batch(images, UNLABELLED_VIEWS, np.random.default_rng(7))
    c = augment_batch(images, UNLABELLED_VIEWS, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert a.shape == images.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.allclose(a, c)


def test_jitter_keeps_grayscale_shape():
    gray = np.full((4, 5, 5, 1), 0.5, np.float32)
    out = color_jitter(gray, 0.5, np.random.default_rng(0))
    assert out.shape == gray.shape and np.all((out >= 0) & (out <= 1))


@pytest.mark.parametrize("field,value", [("crop_area", 0.0), ("shift", 1.5), ("rotate_deg", -1.0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentSpec(**{field: value})


def test_bad_shapes_are_refused(images):
    with pytest.raises(ValueError, match="square"):
        augment_batch(images[:, :, :10], UNLABELLED_VIEWS, np.random.default_rng(0))
