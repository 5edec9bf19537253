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


# In-batch mining. Embeddings on a line, labels [0, 0, 1, 1], margin 1:
# x = 0, 1 | 1.5, 3.2 -> d01=1, d02=1.5, d03=3.2, d12=0.5, d13=2.2, d23=1.7.
LINE = jnp.array([[0.0], [1.0], [1.5], [3.2]])
LINE_LABELS = jnp.array([0, 0, 1, 1])


def test_batch_all_is_the_mean_over_positive_triplets():
    from lookalike.model.losses import batch_all_triplet_loss

    # positive triplets (a,p,n): (0,1,2) .5, (1,0,2) 1.5, (2,3,0) 1.2, (2,3,1) 2.2, (3,2,1) .5
    out = batch_all_triplet_loss(LINE, LINE_LABELS, margin=1.0)
    np.testing.assert_allclose(out, (0.5 + 1.5 + 1.2 + 2.2 + 0.5) / 5, rtol=1e-5)


def test_batch_hard_takes_farthest_positive_and_nearest_negative():
    from lookalike.model.losses import batch_hard_triplet_loss

    # anchors: 0 -> 1-1.5+1, 1 -> 1-0.5+1, 2 -> 1.7-0.5+1, 3 -> 1.7-2.2+1
    out = batch_hard_triplet_loss(LINE, LINE_LABELS, margin=1.0)
    np.testing.assert_allclose(out, (0.5 + 1.5 + 2.2 + 0.5) / 4, rtol=1e-5)


def test_semi_hard_falls_back_to_the_hardest_negative():
    from lookalike.model.losses import semi_hard_triplet_loss

    # (1,0): no negative in (1, 2); the hardest is x2 at 0.5 -> 1.5 (the easiest would give 0).
    out = semi_hard_triplet_loss(LINE, LINE_LABELS, margin=1.0)
    np.testing.assert_allclose(out, (0.5 + 1.5 + 2.2 + 0.5) / 4, rtol=1e-5)


def test_semi_hard_prefers_a_negative_beyond_the_positive_over_the_hardest():
    from lookalike.model.losses import batch_hard_triplet_loss, semi_hard_triplet_loss

    # x = 0, 1 | 0.5, 1.5: for (0,1) the semi-hard negative is x3 (1.5, loss .5),
    # the hardest is x2 (0.5, loss 1.5); same for (3,2) with x0.
    emb, labels = jnp.array([[0.0], [1.0], [0.5], [1.5]]), jnp.array([0, 0, 1, 1])
    np.testing.assert_allclose(semi_hard_triplet_loss(emb, labels, 1.0), (0.5 + 1.5 + 1.5 + 0.5) / 4, rtol=1e-5)
    np.testing.assert_allclose(batch_hard_triplet_loss(emb, labels, 1.0), 1.5, rtol=1e-5)


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard", "semi_hard"])
def test_mined_losses_ignore_singletons_jit_and_have_finite_gradients(mining):
    import jax

    from lookalike.model.losses import mined_triplet_loss

    # A singleton label (2) adds no triplet as an anchor; duplicates (distance 0) stay finite.
    emb = jnp.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    labels = jnp.array([0, 0, 1, 1, 2])
    loss, grad = jax.jit(jax.value_and_grad(lambda e: mined_triplet_loss(e, labels, 0.5, mining)))(emb)
    assert np.isfinite(float(loss)) and float(loss) > 0 and np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match="batch_hard"):
        mined_triplet_loss(emb, labels, 0.5, "hardest")


def test_no_valid_triplet_gives_zero_loss():
    from lookalike.model.losses import MINING

    emb, labels = jnp.array([[0.0], [1.0]]), jnp.array([0, 1])
    for fn in MINING.values():
        assert float(fn(emb, labels, 1.0)) == 0.0
