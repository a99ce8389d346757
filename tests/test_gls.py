"""GLS (`--weighting=gls`): w_i = (prod_j L_j)^(1/T) / (T L_i), checked
against a NumPy reference, the autodiff gradient of the geometric mean, a
two-task closed form and degenerate losses."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods.weightings import gls


def reference_weights(losses: np.ndarray) -> np.ndarray:
  """Chennupati et al. 2019: d/dL_i (prod_j L_j)^(1/T), in float64."""
  losses = np.asarray(losses, np.float64)
  num_tasks = len(losses)
  return np.prod(losses) ** (1.0 / num_tasks) / (num_tasks * losses)


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
def test_weights_match_numpy_reference(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(4):
    losses = np.exp(rng.uniform(-5, 5, num_tasks)).astype(np.float32)
    got = mtl_dist.loss_weights("gls", losses)
    np.testing.assert_allclose(got, reference_weights(losses), rtol=2e-5)


def test_weighted_sum_has_the_gradient_and_value_of_the_geometric_mean():
  rng = np.random.default_rng(0)
  for num_tasks in (2, 3, 5):
    losses = tf.constant(np.exp(rng.uniform(-3, 3, num_tasks)), tf.float64)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(losses)
      paper = tf.pow(tf.reduce_prod(losses), 1.0 / num_tasks)
      weights = tf.cast(gls.gls_weights(losses), tf.float64)
      ours = tf.reduce_sum(tf.stop_gradient(weights) * losses)
    np.testing.assert_allclose(tape.gradient(ours, losses),
                               tape.gradient(paper, losses), rtol=1e-5)
    np.testing.assert_allclose(ours, paper, rtol=1e-5)


def test_two_task_closed_form():
  # sqrt(L_0 L_1): d/dL_0 = sqrt(L_1 / L_0) / 2.
  got = mtl_dist.loss_weights("gls", [0.25, 4.0])
  np.testing.assert_allclose(got, [2.0, 0.125], rtol=1e-6)


def test_order_invariant_and_scale_free():
  losses = np.array([0.3, 2.0, 7.5, 0.01], np.float32)
  weights = mtl_dist.loss_weights("gls", losses).numpy()
  order = [2, 0, 3, 1]
  np.testing.assert_allclose(mtl_dist.loss_weights("gls", losses[order]),
                             weights[order], rtol=1e-6)
  # (prod c L_j)^(1/T) / (T c L_i): the weights do not change with c.
  np.testing.assert_allclose(mtl_dist.loss_weights("gls", losses * 1e3),
                             weights, rtol=1e-5)


@pytest.mark.parametrize("losses", [
    [0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1e-6, 1.0, 1e6], [1e6, 1e6, 1e6],
    [3.0, 3.0, 3.0], [-1.0, 2.0, 0.5], [1e-30, 1e30, 1.0]])
def test_degenerate_losses_give_finite_weights(losses):
  weights = mtl_dist.loss_weights("gls", losses).numpy()
  assert np.isfinite(weights).all() and (weights > 0).all()
  floored = np.maximum(np.asarray(losses, np.float64), gls.LOSS_FLOOR)
  np.testing.assert_allclose(weights, reference_weights(floored), rtol=1e-4)
  if len(set(losses)) == 1:  # Equal losses: 1/T each.
    np.testing.assert_allclose(weights, 1 / 3, rtol=1e-6)


def test_runs_in_a_tf_function():
  weighting = mtl_dist.methods.weightings.create("gls", [None] * 3)
  assert weighting.needs_losses and not weighting.variables
  step = tf.constant(0, tf.int64)
  traced = tf.function(lambda l: weighting.objective(l, step, l))
  losses = tf.constant([0.5, 2.0, 8.0])
  np.testing.assert_allclose(traced(losses), 2.0, rtol=1e-6)  # GLS value.


def test_rejects_an_unknown_option():
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.loss_weights("gls", [1.0, 2.0], bogus=1)
