"""DB-MTL (`--aggregator=db_mtl`): a NumPy reference of LibMTL's
DB_MTL.backward over a sequence of steps with its state, the log-loss
gradient against autodiff, closed forms, invariances, degenerate inputs and
the state's guard."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods.aggregators import db_mtl


def reference(grads, losses, buffer, k, beta=0.9, beta_sigma=0.0):
  """LibMTL's DB_MTL.backward (LibMTL/weighting/DB_MTL.py) in float64, with
  the gradient of log(L + 1e-8) written as g / (L + 1e-8); k 1-based.

  Returns:
    (update, buffer) after the step.
  """
  grads = grads.astype(np.float64)
  losses = np.asarray(losses, np.float64)
  log_grads = grads / (np.maximum(losses, 0.0) + 1e-8)[:, None]
  buffer = log_grads + beta / k**beta_sigma * (buffer - log_grads)
  norms = np.linalg.norm(buffer, axis=1)
  alpha = norms.max() / (norms + 1e-8)
  return alpha @ buffer, buffer


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("options", [{}, dict(beta=0.5, beta_sigma=0.5)])
def test_a_sequence_of_steps_matches_the_reference(num_tasks, options):
  rng = np.random.default_rng(num_tasks)
  buffer = np.zeros((num_tasks, 30))
  state = None
  for step in range(5):
    grads = (rng.normal(size=(num_tasks, 30)) *
             10.0**rng.uniform(-2, 2, size=(num_tasks, 1))).astype(np.float32)
    losses = 10.0**rng.uniform(-2, 2, size=num_tasks).astype(np.float32)
    want, buffer = reference(grads, losses, buffer, step + 1, **options)
    got, state = mtl_dist.aggregate("db_mtl", grads, step=step, state=state,
                                    losses=losses, **options)
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(state["buffer"], buffer, rtol=1e-4,
                               atol=1e-6 * np.abs(buffer).max())
    assert state["steps"] == step + 1


def test_the_log_gradient_is_autodiffs():
  # Two tasks on a tiny linear model: the buffer's first value (beta's share
  # of a zero buffer removed) is d log L_i / d theta, by autodiff.
  rng = np.random.default_rng(1)
  theta = tf.Variable(rng.normal(size=4).astype(np.float32))
  x = tf.constant(rng.normal(size=(8, 4)).astype(np.float32))
  targets = [tf.constant(rng.normal(size=8).astype(np.float32)),
             tf.constant(5 + rng.normal(size=8).astype(np.float32))]
  grads, log_grads, losses = [], [], []
  for target in targets:
    with tf.GradientTape(persistent=True) as tape:
      loss = tf.reduce_mean((tf.linalg.matvec(x, theta) - target)**2)
      log_loss = tf.math.log(loss + 1e-8)
    grads.append(tape.gradient(loss, theta).numpy())
    log_grads.append(tape.gradient(log_loss, theta).numpy())
    losses.append(float(loss))
  _, state = mtl_dist.aggregate("db_mtl", np.stack(grads), losses=losses)
  np.testing.assert_allclose(state["buffer"] / (1 - 0.9), np.stack(log_grads),
                             rtol=1e-5)


def test_closed_form_on_two_orthogonal_tasks():
  g = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
  losses = np.array([0.5, 4.0], np.float32)
  # beta 0: b = g / L = [6, 8, 0], [0, 0, 0.5]; both scaled to norm 10.
  got, _ = mtl_dist.aggregate("db_mtl", g, losses=losses, beta=0.0)
  np.testing.assert_allclose(got, [6.0, 8.0, 10.0], rtol=1e-6)


def test_invariances():
  rng = np.random.default_rng(5)
  grads = rng.normal(size=(4, 10)).astype(np.float32)
  losses = rng.uniform(0.5, 2, size=4).astype(np.float32)
  perm = np.array([3, 1, 0, 2])
  scales = np.array([1e-3, 1.0, 7.0, 1e2], np.float32)
  state = state_p = state_s = None
  for step in range(3):
    step_grads = grads * np.float32(step + 1)
    got, state = mtl_dist.aggregate("db_mtl", step_grads, step=step,
                                    state=state, losses=losses)
    # Task order does not matter.
    permuted, state_p = mtl_dist.aggregate(
        "db_mtl", step_grads[perm], step=step, state=state_p,
        losses=losses[perm])
    np.testing.assert_allclose(permuted, got, rtol=1e-5, atol=1e-6)
    # Loss-scale balancing: c_i L_i (gradient c_i g_i) changes nothing.
    scaled, state_s = mtl_dist.aggregate(
        "db_mtl", step_grads * scales[:, None], step=step, state=state_s,
        losses=losses * scales)
    np.testing.assert_allclose(scaled, got, rtol=1e-4,
                               atol=1e-6 * np.abs(got).max())
  # Linear in the gradients' scale (losses fixed), from a fresh state.
  fresh, _ = mtl_dist.aggregate("db_mtl", grads, losses=losses)
  double, _ = mtl_dist.aggregate("db_mtl", 1e3 * grads, losses=losses)
  np.testing.assert_allclose(double, 1e3 * fresh.numpy(), rtol=1e-5)


def _degenerate_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  rng = np.random.default_rng(8)
  g, h = rng.normal(size=(2, 6))
  ones = np.ones(3)
  return {
      "zeros": (np.zeros((3, 6)), ones),
      "zero_row": (np.stack([g, np.zeros(6), h]), ones),
      "duplicated": (np.stack([g, g, h]), ones),
      "opposite": (np.stack([g, -g]), np.ones(2)),
      "rank_one": (np.stack([g, 2 * g, -0.5 * g]), ones),
      "wide_norms": (np.stack([1e-6 * g, 1e6 * h, g]), ones),
      "zero_losses": (np.stack([g, h, g + h]), np.zeros(3)),
      "negative_loss": (np.stack([g, h, g + h]), np.array([-1.0, 1.0, 2.0])),
      "wide_losses": (np.stack([g, h, g + h]), np.array([1e-6, 1e6, 1.0])),
      "single": (g[None], np.ones(1)),
  }


@pytest.mark.parametrize("case", sorted(_degenerate_cases()))
def test_degenerate_inputs_stay_finite_and_match_the_reference(case):
  grads, losses = (a.astype(np.float32) for a in _degenerate_cases()[case])
  buffer = np.zeros(grads.shape)
  state = None
  for step in range(4):
    got, state = mtl_dist.aggregate("db_mtl", grads, step=step, state=state,
                                    losses=losses)
    want, buffer = reference(grads, losses, buffer, step + 1)
    assert np.isfinite(got).all() and np.isfinite(state["buffer"]).all()
    # Each term a_i b_i has the largest buffer norm.
    largest = np.linalg.norm(buffer, axis=1).max()
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * max(largest, 1e-30))
  if case == "opposite":  # Equal norms: the balanced sum cancels.
    assert np.abs(got).max() <= 1e-6 * np.abs(buffer).max()


def test_non_finite_input_moves_no_state():
  rng = np.random.default_rng(2)
  grads = rng.normal(size=(3, 5)).astype(np.float32)
  losses = np.array([1.0, 2.0, 0.5], np.float32)
  _, state = mtl_dist.aggregate("db_mtl", grads, losses=losses)
  broken_grads = grads.copy()
  broken_grads[0, 4] = np.inf
  for bad_grads, bad_losses in ((broken_grads, losses),
                                (grads, np.array([1.0, np.nan, 0.5],
                                                 np.float32))):
    _, after = mtl_dist.aggregate("db_mtl", bad_grads, step=1, state=state,
                                  losses=bad_losses)
    for key in ("buffer", "steps"):
      np.testing.assert_array_equal(after[key], state[key])
  _, fresh = mtl_dist.aggregate("db_mtl", broken_grads, losses=losses)
  assert fresh["buffer"].shape == (3, 0) and fresh["steps"] == 0


def test_options_and_contract():
  grads = np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.aggregate("db_mtl", grads, losses=[1.0, 1.0], bogus=1)
  with pytest.raises(ValueError, match="needs losses"):
    mtl_dist.aggregate("db_mtl", grads)
  assert db_mtl.DBMTL.needs_losses and not db_mtl.DBMTL.has_gram_form
  assert {o.name: o.default for o in db_mtl.DBMTL.options} == {
      "beta": 0.9, "beta_sigma": 0.0}
