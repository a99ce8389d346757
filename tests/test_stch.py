"""STCH (`--weighting=stch`): 1/L_i during the warm-up, then
T softmax_i(log(L_i/z_i)/mu) / L_i with z the warm-up's mean losses; checked
against NumPy references, the autodiff gradients of both objectives, the
state over a warm-up and after, and degenerate losses."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import weightings
from mtl_dist.methods.weightings import stch

STEP = tf.constant(0, tf.int64)


def reference_weights(losses, nadir, mu):
  """Lin et al. 2024: d/dL_i of T mu log sum_j exp(log(L_j/z_j)/mu)."""
  losses = np.asarray(losses, np.float64)
  logits = np.log(losses / np.asarray(nadir, np.float64)) / mu
  softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  return len(losses) * softmax / losses


def reference_run(sequence, warmup_steps, mu):
  """The weights of each step and the final state: warm-up weights 1/L_i
  and accumulation of the losses, then STCH with z = their mean."""
  total, count, nadir, weights = 0.0, 0, None, []
  for losses in sequence:
    losses = np.asarray(losses, np.float64)
    if count < warmup_steps:
      weights.append(1.0 / losses)
      total, count = total + losses, count + 1
      if count == warmup_steps:
        nadir = total / count
    else:
      weights.append(reference_weights(losses, nadir, mu))
  return weights, total, count, nadir


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
@pytest.mark.parametrize("mu", [0.1, 1.0, 5.0])
def test_weights_match_numpy_reference(num_tasks, mu):
  rng = np.random.default_rng(num_tasks)
  for _ in range(3):
    losses = np.exp(rng.uniform(-4, 4, num_tasks)).astype(np.float32)
    nadir = np.exp(rng.uniform(-4, 4, num_tasks)).astype(np.float32)
    np.testing.assert_allclose(stch.stch_weights(losses, nadir, mu),
                               reference_weights(losses, nadir, mu),
                               rtol=2e-5, atol=1e-30)


@pytest.mark.parametrize("mu", [0.2, 1.0, 3.0])
def test_weighted_sums_have_the_gradients_of_the_papers_objectives(mu):
  rng = np.random.default_rng(1)
  for num_tasks in (2, 3, 5):
    losses = tf.constant(np.exp(rng.uniform(-3, 3, num_tasks)), tf.float64)
    nadir = tf.constant(np.exp(rng.uniform(-3, 3, num_tasks)), tf.float64)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(losses)
      # LibMTL's STCH.backward after the warm-up, and during it.
      paper = mu * tf.math.log(tf.reduce_sum(tf.exp(
          tf.math.log(losses / nadir) / mu))) * num_tasks
      paper_warmup = tf.reduce_sum(tf.math.log(losses))
      weights = tf.cast(stch.stch_weights(losses, nadir, mu), tf.float64)
      warmup = tf.cast(stch.warmup_weights(losses), tf.float64)
      ours = tf.reduce_sum(tf.stop_gradient(weights) * losses)
      ours_warmup = tf.reduce_sum(tf.stop_gradient(warmup) * losses)
    np.testing.assert_allclose(tape.gradient(ours, losses),
                               tape.gradient(paper, losses), rtol=2e-5)
    np.testing.assert_allclose(tape.gradient(ours_warmup, losses),
                               tape.gradient(paper_warmup, losses), rtol=1e-6)


def test_two_task_closed_form():
  # mu = 1: T softmax_i(log r) / L_i = 2 r_i / (r_0 + r_1) / L_i
  # = 2 / (z_i (r_0 + r_1)), r = L / z = (2, 0.5).
  got = stch.stch_weights([2.0, 2.0], [1.0, 4.0], 1.0)
  np.testing.assert_allclose(got, [0.8, 0.2], rtol=1e-6)
  # At the nadir every task has weight 1/L_i.
  np.testing.assert_allclose(stch.stch_weights([2.0, 0.5], [2.0, 0.5], 1.0),
                             [0.5, 2.0], rtol=1e-6)


def test_small_mu_approaches_tchebycheff():
  # mu -> 0: all the weight on the largest L_i / z_i, as T / L_i.
  got = stch.stch_weights([1.0, 3.0, 2.0], [1.0, 1.0, 1.0], 0.01).numpy()
  np.testing.assert_allclose(got, [0.0, 1.0, 0.0], atol=1e-6)


def test_state_over_warmup_and_after():
  rng = np.random.default_rng(7)
  sequence = np.exp(rng.uniform(-2, 2, (6, 3))).astype(np.float32)
  want, total, count, nadir = reference_run(sequence, warmup_steps=3, mu=0.5)
  state = None
  for step, losses in enumerate(sequence):
    weights, state = mtl_dist.loss_weights(
        "stch", losses, step=step, state=state, mu=0.5, warmup_steps=3)
    np.testing.assert_allclose(weights, want[step], rtol=2e-5,
                               err_msg=f"step {step}")
    assert int(state["warmup_count"]) == min(step + 1, 3)
    if step == 1:  # Mid warm-up: no nadir yet.
      np.testing.assert_array_equal(state["nadir"], 0.0)
  np.testing.assert_allclose(state["warmup_sum"], total, rtol=1e-6)
  assert int(state["warmup_count"]) == count == 3
  np.testing.assert_allclose(state["nadir"], nadir, rtol=1e-6)


def test_skipped_and_nonfinite_steps_leave_the_state_unchanged():
  weighting = weightings.create("stch", [None] * 2, warmup_steps=2)
  weighting.update(tf.constant([1.0, 2.0]))

  def state():
    return [v.numpy().copy() for v in weighting.variables]

  before = state()
  weighting.update(tf.constant([5.0, 5.0]), applied=tf.constant(False))
  weighting.update(tf.constant([np.nan, 5.0]))
  weighting.update(tf.constant([np.inf, 5.0]), applied=tf.constant(True))
  for got, want in zip(state(), before):
    np.testing.assert_array_equal(got, want)
  weighting.update(tf.constant([3.0, 4.0]))  # Completes the warm-up.
  np.testing.assert_allclose(weighting.nadir.numpy(), [2.0, 3.0])
  after = state()
  weighting.update(tf.constant([9.0, 9.0]))  # After it nothing changes.
  for got, want in zip(state(), after):
    np.testing.assert_array_equal(got, want)


def test_weights_and_update_run_in_a_tf_function():
  weighting = weightings.create("stch", [None] * 2, warmup_steps=2)

  @tf.function
  def step(losses):
    weights = weighting.weights(STEP, losses)
    weighting.update(losses, tf.constant(True))
    return weights

  np.testing.assert_allclose(step(tf.constant([2.0, 4.0])), [0.5, 0.25])
  np.testing.assert_allclose(step(tf.constant([4.0, 4.0])), [0.25, 0.25])
  np.testing.assert_allclose(step(tf.constant([3.0, 8.0])),
                             reference_weights([3.0, 8.0], [3.0, 4.0], 1.0),
                             rtol=1e-6)


def test_order_invariant():
  losses = np.array([0.3, 2.0, 7.5, 0.01], np.float32)
  nadir = np.array([1.0, 0.5, 3.0, 0.1], np.float32)
  weights = stch.stch_weights(losses, nadir, 1.0).numpy()
  order = [2, 0, 3, 1]
  np.testing.assert_allclose(
      stch.stch_weights(losses[order], nadir[order], 1.0), weights[order],
      rtol=1e-6)


@pytest.mark.parametrize("losses", [
    [0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1e-6, 1.0, 1e6], [1e6, 1e6, 1e6],
    [3.0, 3.0, 3.0], [-1.0, 2.0, 0.5]])
@pytest.mark.parametrize("nadir", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0],
                                   [1e-6, 1.0, 1e6]])
@pytest.mark.parametrize("mu", [0.01, 1.0, 100.0])
def test_degenerate_losses_give_finite_weights(losses, nadir, mu):
  weights = stch.stch_weights(losses, nadir, mu).numpy()
  assert np.isfinite(weights).all() and (weights >= 0).all()
  assert np.isfinite(stch.warmup_weights(losses).numpy()).all()
  floor = stch.LOSS_FLOOR
  want = reference_weights(np.maximum(losses, floor),
                           np.maximum(nadir, floor), mu)
  np.testing.assert_allclose(weights, want, rtol=1e-4, atol=1e-30)


def test_rejects_bad_options():
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.loss_weights("stch", [1.0, 2.0], bogus=1)
  with pytest.raises(ValueError, match="stch_mu"):
    mtl_dist.loss_weights("stch", [1.0, 2.0], mu=0.0)
  with pytest.raises(ValueError, match="stch_warmup_steps"):
    mtl_dist.loss_weights("stch", [1.0, 2.0], warmup_steps=0)
