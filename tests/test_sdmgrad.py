"""SDMGrad (`--aggregator=sdmgrad`): against a NumPy port of LibMTL's
SDMGrad over several steps of state, an exact small case, its properties
(task order, scale), degenerate inputs, the state contract and its inner
rate (training on 1, 2 and 4 replicas and on 2 workers:
tests/test_method_distribution.py)."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods.aggregators import sdmgrad
from test_modo import bisection_projection


def numpy_sdmgrad(jacobian: np.ndarray, weights: np.ndarray, lamda: float,
                  niter: int) -> tuple[np.ndarray, np.ndarray]:
  """One step of LibMTL's SDMGrad.backward (LibMTL/weighting/SDMGrad.py) in
  float64: zeta, xi1, xi2 = the 3 batches' Jacobians; a new
  torch.optim.SGD([w], lr=5, momentum=0.5) each step (its momentum buffer
  starts at the first gradient); the projection by bisection.

  Returns:
    (update, new w).
  """
  zeta, xi1, xi2 = np.split(jacobian.astype(np.float64), 3)
  gg = xi1 @ xi2.T
  scale = np.mean(np.sqrt(np.maximum(np.diag(gg), 0.0)))
  gg = gg / (scale**2 + 1e-8)
  gg_mean = gg.mean(axis=1)
  buffer = None
  for _ in range(niter):
    gradient = gg @ weights + lamda * gg_mean
    buffer = gradient if buffer is None else 0.5 * buffer + gradient
    weights = bisection_projection(weights - 5.0 * buffer)
  update = (zeta.T @ weights + lamda * zeta.mean(axis=0)) / (1.0 + lamda)
  return update, weights


def _run(jacobians, **options):
  state, updates, states = None, [], []
  for step, jacobian in enumerate(jacobians):
    update, state = mtl_dist.aggregate("sdmgrad", jacobian, step=step,
                                       state=state, **options)
    updates.append(update.numpy())
    states.append(state["weights"])
  return updates, states


@pytest.mark.parametrize("num_tasks, lamda, niter", [
    (3, 0.3, 20), (4, 0.3, 20), (5, 1.0, 5), (3, 0.0, 1)])
def test_matches_numpy_over_steps(num_tasks, lamda, niter):
  rng = np.random.default_rng(num_tasks + niter)
  # Correlated tasks, as in training: w settles inside the simplex.
  common = rng.normal(size=(1, 8))
  jacobians = [(common + 0.7 * rng.normal(size=(3 * num_tasks, 8))
                ).astype(np.float32) for _ in range(4)]
  updates, states = _run(jacobians, lamda=lamda, niter=niter)
  weights = np.full(num_tasks, 1.0 / num_tasks)
  for jacobian, update, state in zip(jacobians, updates, states):
    want, weights = numpy_sdmgrad(jacobian, weights, lamda, niter)
    np.testing.assert_allclose(state, weights, atol=1e-5)
    np.testing.assert_allclose(update, want, rtol=1e-5, atol=1e-5)
    weights = state.astype(np.float64)  # Continue from the same point.
  assert np.abs(states[-1] - 1.0 / num_tasks).max() > 1e-2


def test_exact_small_cases():
  # xi1 = xi2 = diag(2, 1): GG = diag(4, 1) / 1.5^2 (+1e-8), so from
  # (0.5, 0.5) one step with lamda 0.3 reaches 0.5 - 5 * 1.3 * (8/9, 2/9),
  # whose projection is (0, 1); the update is (zeta_2 + 0.3 mean) / 1.3.
  xi = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
  zeta = np.array([[1.0, 3.0], [-2.0, 0.5]], np.float32)
  update, state = mtl_dist.aggregate("sdmgrad",
                                     np.concatenate([zeta, xi, xi]), niter=1)
  np.testing.assert_allclose(state["weights"], [0.0, 1.0])
  np.testing.assert_allclose(update, (zeta[1] + 0.3 * zeta.mean(axis=0)) / 1.3,
                             atol=1e-6)
  # Symmetric tasks keep w uniform: the update is the mean of zeta's rows.
  xi = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
  update, state = mtl_dist.aggregate("sdmgrad",
                                     np.concatenate([zeta[:, :1].repeat(3, 1),
                                                     xi, xi]))
  np.testing.assert_allclose(state["weights"], [0.5, 0.5], atol=1e-7)
  np.testing.assert_allclose(update, zeta[:, :1].repeat(3, 1).mean(axis=0),
                             atol=1e-6)


def test_task_order_does_not_matter_and_scale_is_linear():
  rng = np.random.default_rng(1)
  common = rng.normal(size=(1, 6))
  jacobians = [(common + rng.normal(size=(12, 6))).astype(np.float32)
               for _ in range(3)]
  order = [2, 0, 3, 1]
  rows = [k * 4 + i for k in range(3) for i in order]
  updates, states = _run(jacobians)
  permuted_updates, permuted_states = _run([j[rows] for j in jacobians])
  np.testing.assert_allclose(permuted_updates, updates, atol=1e-5)
  np.testing.assert_allclose(np.array(permuted_states),
                             np.array(states)[:, order], atol=1e-6)
  # w depends on GG / s^2 only: linear in the gradients' scale (where s^2
  # is far above the 1e-8 LibMTL adds).
  for scale in (1e-2, 1e3):
    scaled_updates, scaled_states = _run([j * scale for j in jacobians])
    np.testing.assert_allclose(scaled_states, states, atol=1e-5)
    np.testing.assert_allclose(np.array(scaled_updates) / scale, updates,
                               rtol=1e-5, atol=1e-5)


def _degenerate():
  rng = np.random.default_rng(2)
  base = rng.normal(size=(3, 5))
  yield np.zeros((9, 5))  # All zero.
  with_zero = np.tile(base, (3, 1))
  with_zero[[1, 4, 7]] = 0.0  # A task with zero gradients.
  yield with_zero
  yield np.tile(base[:1], (9, 1))  # Duplicated rows.
  yield np.tile(np.stack([base[0], -base[0], base[1]]), (3, 1))  # Opposite.
  yield np.tile(np.outer(rng.normal(size=3), base[0]), (3, 1))  # Rank 1.
  yield np.tile(base * np.array([[1e-6], [1.0], [1e6]]), (3, 1))  # Scales.
  yield np.concatenate([base, -base, base])  # xi1 = -xi2: GG_ii < 0.
  yield rng.normal(size=(9, 5)) * 1e-6


def test_degenerate_inputs_stay_finite():
  for jacobian in _degenerate():
    updates, states = _run([jacobian.astype(np.float32)] * 3)
    for update, state in zip(updates, states):
      assert np.isfinite(update).all() and np.isfinite(state).all()
      assert state.min() >= 0.0 and abs(state.sum() - 1.0) < 1e-5


def test_nonfinite_input_leaves_the_state_unchanged():
  rng = np.random.default_rng(3)
  _, state = mtl_dist.aggregate(
      "sdmgrad", rng.normal(size=(9, 4)).astype(np.float32))
  bad = rng.normal(size=(9, 4)).astype(np.float32)
  bad[1, 2] = np.nan  # Only zeta: w would be finite.
  _, after = mtl_dist.aggregate("sdmgrad", bad, step=1, state=state)
  np.testing.assert_array_equal(after["weights"], state["weights"])
  bad[5, 0] = np.inf
  _, after = mtl_dist.aggregate("sdmgrad", bad, step=1, state=state)
  np.testing.assert_array_equal(after["weights"], state["weights"])


def test_options_are_checked():
  with pytest.raises(ValueError, match="has no option bogus"):
    mtl_dist.aggregate("sdmgrad", np.ones((3, 2), np.float32), bogus=1)
  for flags, message in (({"sdmgrad_niter": 0}, "--sdmgrad_niter=0"),
                         ({"sdmgrad_lamda": -0.1}, "--sdmgrad_lamda=-0.1")):
    config = mtl_dist.TrainConfig(model_dir="/tmp/unused",
                                  aggregator="sdmgrad", global_batch_size=48,
                                  **flags)
    with pytest.raises(mtl_dist.ConfigError, match=message):
      config.validate()


def test_the_inner_steps_converge_below_a_rate_of_one_over_t():
  """sdmgrad.py's account of LibMTL's rate 5: over random 5-task problems
  it amplifies a 1e-7 change of the gradients to more than 1e-4 of w; at
  0.2 the steps converge and the change stays below 1e-5."""
  rng = np.random.default_rng(0)
  start = tf.fill([5], 0.2)
  changes = {0.2: [], 5.0: []}
  for _ in range(6):
    first = rng.normal(size=(5, 50)).astype(np.float32)
    second = (first + 0.5 * rng.normal(size=(5, 50))).astype(np.float32)
    nudged = (first * (1 + 1e-7 * rng.normal(size=first.shape))).astype(
        np.float32)
    for lr, niter in ((0.2, 200), (5.0, 20)):
      changes[lr].append(np.abs(
          sdmgrad.sdmgrad_weights(first, second, start, 0.3, niter, lr) -
          sdmgrad.sdmgrad_weights(nudged, second, start, 0.3, niter,
                                  lr)).max())
  assert max(changes[0.2]) < 1e-5
  assert max(changes[5.0]) > 1e-4
