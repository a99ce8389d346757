"""IMTL-L (`--weighting=imtl_l`): objective sum_i (e^{s_i} L_i - s_i) with
learned s_i, weights e^{s_i}; the objective and its gradients in s_i and in
the losses against NumPy formulas."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import mtl_dist
from mtl_dist.methods import weightings
from mtl_dist.methods.weightings import imtl_l

STEP = tf.constant(0, tf.int64)


def reference_objective(losses, scales):
  """Liu et al. 2021, the loss scale part: sum_i e^{s_i} L_i - s_i."""
  return np.sum(np.exp(scales) * losses - scales)


def reference_scale_gradient(losses, scales):
  """d/ds_i of the objective: e^{s_i} L_i - 1."""
  return np.exp(scales) * losses - 1.0


def _objective_and_gradients(losses, scales):
  weighting = weightings.create("imtl_l", [None] * len(losses))
  weighting.loss_scales.assign(scales)
  losses = tf.constant(losses, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(losses)
    objective = weighting.objective(losses, STEP)
  by_scale, by_loss = tape.gradient(objective, [weighting.loss_scales, losses])
  return weighting, objective.numpy(), by_scale.numpy(), by_loss.numpy()


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
def test_objective_and_gradients_match_numpy(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(4):
    losses = np.exp(rng.uniform(-4, 4, num_tasks)).astype(np.float32)
    scales = rng.uniform(-3, 3, num_tasks).astype(np.float32)
    weighting, objective, by_scale, by_loss = _objective_and_gradients(
        losses, scales)
    want = reference_objective(losses.astype(np.float64), scales)
    np.testing.assert_allclose(objective, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        by_scale, reference_scale_gradient(losses.astype(np.float64), scales),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(by_loss, np.exp(scales), rtol=1e-6)
    np.testing.assert_allclose(weighting.weights(STEP), np.exp(scales),
                               rtol=1e-6)
    np.testing.assert_allclose(imtl_l.imtl_l_objective(losses, scales), want,
                               rtol=1e-5, atol=1e-5)


def test_scales_are_trained_by_the_model_optimizer_towards_minus_log_loss():
  weighting = weightings.create("imtl_l", [None] * 2)
  assert weighting.trainable == [weighting.loss_scales]
  assert not weighting.loss_scales.numpy().any()  # s = 0: weights 1.
  # The minimiser of e^s L - s is s = -log L: the gradient is zero there.
  losses = np.array([0.25, 8.0], np.float32)
  _, _, by_scale, _ = _objective_and_gradients(losses, -np.log(losses))
  np.testing.assert_allclose(by_scale, 0.0, atol=1e-6)
  # Gradient descent on s alone converges there.
  optimizer = tf_keras.optimizers.SGD(0.1)
  for _ in range(300):
    with tf.GradientTape() as tape:
      objective = weighting.objective(tf.constant(losses), STEP)
    optimizer.apply_gradients([(tape.gradient(objective,
                                              weighting.loss_scales),
                                weighting.loss_scales)])
  np.testing.assert_allclose(weighting.loss_scales.numpy(), -np.log(losses),
                             atol=1e-3)


def test_api_returns_weights_and_state():
  weights, state = mtl_dist.loss_weights(
      "imtl_l", [1.0, 2.0, 3.0],
      state={"loss_scales": np.array([0.5, 0.0, -1.0], np.float32)})
  np.testing.assert_allclose(weights, np.exp([0.5, 0.0, -1.0]), rtol=1e-6)
  np.testing.assert_array_equal(state["loss_scales"], [0.5, 0.0, -1.0])


@pytest.mark.parametrize("losses", [
    [0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1e-6, 1.0, 1e6], [1e6, 1e6, 1e6],
    [3.0, 3.0, 3.0]])
@pytest.mark.parametrize("scales", [[0.0, 0.0, 0.0], [-10.0, 0.0, 10.0]])
def test_degenerate_losses_stay_finite(losses, scales):
  losses = np.array(losses, np.float32)
  scales = np.array(scales, np.float32)
  _, objective, by_scale, by_loss = _objective_and_gradients(losses, scales)
  for value in (objective, by_scale, by_loss):
    assert np.isfinite(value).all()
  np.testing.assert_allclose(
      by_scale, reference_scale_gradient(losses.astype(np.float64), scales),
      rtol=1e-5, atol=1e-5)


def test_rejects_an_unknown_option():
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.loss_weights("imtl_l", [1.0, 2.0], bogus=1)
