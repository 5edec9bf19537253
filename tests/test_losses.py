import jax.numpy as jnp
import numpy as np
import pytest

from lookalike.model.losses import contrastive_loss, contrastive_pair_loss, triplet_loss


def test_contrastive_matches_hand_computed_values_with_margin_1000():
    d = jnp.array([200.0, 2000.0, 1200.0, 200.0, 3.0])
    y = jnp.array([0.0, 0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(contrastive_loss(d, y, margin=1000.0), [640000.0, 0.0, 0.0, 40000.0, 9.0], rtol=1e-6)


def test_contrastive_at_margin_is_zero_and_just_inside_is_positive():
    out = contrastive_loss(jnp.array([1.0, 0.5]), jnp.array([0.0, 0.0]), margin=1.0)
    np.testing.assert_allclose(out, [0.0, 0.25], rtol=1e-6)


def test_pair_loss_uses_l2_distance_of_embeddings():
    a = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    b = jnp.array([[3.0, 4.0], [0.3, 0.4]])  # distances 5 and 0.5
    out = contrastive_pair_loss(a, b, jnp.array([1.0, 0.0]), margin=2.0)
    np.testing.assert_allclose(out, [25.0, 1.5**2], rtol=1e-5)


def test_pair_loss_gradient_is_finite_for_identical_embeddings():
    import jax

    a = jnp.ones((2, 3))
    grad = jax.grad(lambda x: contrastive_pair_loss(x, a, jnp.array([0.0, 1.0]), 1.0).sum())(a)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize(
    "p, n, expected",
    [([0.0, 1.0], [0.0, 3.0], 0.0), ([0.0, 2.0], [0.0, 1.0], 1.0 + 0.5), ([0.0, 1.0], [0.0, 1.0], 0.5)],
)
def test_triplet_matches_hand_computed_values(p, n, expected):
    a = jnp.array([[0.0, 0.0]])
    out = triplet_loss(a, jnp.array([p]), jnp.array([n]), margin=0.5)
    np.testing.assert_allclose(out, [expected], atol=1e-5)
