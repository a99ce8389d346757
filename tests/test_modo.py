"""MoDo (`--aggregator=modo`) and the simplex projection MoDo and SDMGrad
share: against NumPy references over several steps of state, an exact
two-task case, a bisection projection, degenerate inputs and the state
contract (training on 1, 2 and 4 replicas and on 2 workers:
tests/test_method_distribution.py)."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods.aggregators import modo


def bisection_projection(values: np.ndarray) -> np.ndarray:
  """proj_simplex(v) = max(v - theta, 0), theta by bisection on
  sum(max(v - theta, 0)) = 1 (no sorting), in float64."""
  values = np.asarray(values, np.float64)
  low, high = values.min() - 1.0, values.max()  # Sums >= 1 and 0.
  for _ in range(200):
    middle = 0.5 * (low + high)
    if np.maximum(values - middle, 0.0).sum() > 1.0:
      low = middle
    else:
      high = middle
  return np.maximum(values - 0.5 * (low + high), 0.0)


def numpy_modo(jacobian: np.ndarray, weights: np.ndarray, gamma: float,
               rho: float) -> tuple[np.ndarray, np.ndarray]:
  """One MoDo step as LibMTL's MoDo.backward (LibMTL/weighting/MoDo.py):
  lambda <- proj(lambda - gamma (J1 J2^T lambda + rho lambda)); J3^T lambda.

  Returns:
    (update, new lambda), float64.
  """
  jacobian = jacobian.astype(np.float64)
  first, second, third = np.split(jacobian, 3)
  weights = bisection_projection(
      weights - gamma * (first @ (second.T @ weights) + rho * weights))
  return third.T @ weights, weights


def _run(jacobians, **options):
  """MoDo's updates and states over a sequence of [3T, P] matrices."""
  state, updates, states = None, [], []
  for step, jacobian in enumerate(jacobians):
    update, state = mtl_dist.aggregate("modo", jacobian, step=step,
                                       state=state, **options)
    updates.append(update.numpy())
    states.append(state["weights"])
  return updates, states


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
def test_projection_matches_bisection(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for scale in (1e-3, 1.0, 10.0, 1e4):
    values = rng.normal(size=num_tasks) * scale
    got = modo.project_to_simplex(tf.constant(values)).numpy()
    np.testing.assert_allclose(got, bisection_projection(values),
                               atol=1e-9 * max(scale, 1.0))
    assert got.min() >= 0.0 and abs(got.sum() - 1.0) < 1e-12


def test_projection_exact_cases():
  def project(values):
    return modo.project_to_simplex(tf.constant(values, tf.float64)).numpy()
  # Points of the simplex stay; a shift along (1, ..., 1) is removed.
  np.testing.assert_allclose(project([0.2, 0.3, 0.5]), [0.2, 0.3, 0.5])
  np.testing.assert_allclose(project([5.2, 5.3, 5.5]), [0.2, 0.3, 0.5],
                             atol=1e-12)
  np.testing.assert_allclose(project([7.0, 7.0, 7.0, 7.0]), [0.25] * 4)
  # Two entries: (clip((x - y + 1) / 2, 0, 1), the rest).
  for x, y in ((0.3, -0.4), (3.0, -1.0), (-2.0, 0.5)):
    first = np.clip((x - y + 1.0) / 2.0, 0.0, 1.0)
    np.testing.assert_allclose(project([x, y]), [first, 1.0 - first],
                               atol=1e-12)
  np.testing.assert_allclose(project([1e300, -1e300, 0.0]), [1.0, 0.0, 0.0])


@pytest.mark.parametrize("num_tasks, gamma, rho", [
    (3, 1e-3, 0.1), (4, 0.05, 0.1), (5, 0.2, 0.0), (3, 1.0, 2.0)])
def test_matches_numpy_over_steps(num_tasks, gamma, rho):
  rng = np.random.default_rng(10 * num_tasks)
  jacobians = [rng.normal(size=(3 * num_tasks, 9)).astype(np.float32)
               for _ in range(5)]
  updates, states = _run(jacobians, gamma=gamma, rho=rho)
  weights = np.full(num_tasks, 1.0 / num_tasks)
  for jacobian, update, state in zip(jacobians, updates, states):
    want, weights = numpy_modo(jacobian, weights, gamma, rho)
    np.testing.assert_allclose(state, weights, atol=2e-6)
    np.testing.assert_allclose(update, want, rtol=1e-5, atol=1e-5)
  if gamma >= 0.05:  # lambda moved away from the uniform start.
    assert np.abs(states[-1] - 1.0 / num_tasks).max() > 0.05


def test_two_tasks_exact():
  # J1 = J2 = diag(2, 1): lambda - gamma (diag(4, 1) lambda + rho lambda),
  # from (0.5, 0.5) with gamma 0.1, rho 0: (0.3, 0.45), projected with the
  # two-entry closed form to (0.425, 0.575); the update is J3^T lambda.
  first = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
  third = np.array([[1.0, 3.0], [-2.0, 0.5]], np.float32)
  update, state = mtl_dist.aggregate(
      "modo", np.concatenate([first, first, third]), gamma=0.1, rho=0.0)
  np.testing.assert_allclose(state["weights"], [0.425, 0.575], atol=1e-7)
  np.testing.assert_allclose(update, 0.425 * third[0] + 0.575 * third[1],
                             atol=1e-6)


def test_task_order_does_not_matter():
  rng = np.random.default_rng(1)
  jacobians = [rng.normal(size=(12, 6)).astype(np.float32) for _ in range(3)]
  order = [2, 0, 3, 1]
  rows = [k * 4 + i for k in range(3) for i in order]
  updates, states = _run(jacobians, gamma=0.1)
  permuted_updates, permuted_states = _run([j[rows] for j in jacobians],
                                           gamma=0.1)
  np.testing.assert_allclose(permuted_updates, updates, atol=1e-5)
  np.testing.assert_allclose(np.array(permuted_states),
                             np.array(states)[:, order], atol=1e-6)


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
  yield rng.normal(size=(9, 5)) * 1e6


@pytest.mark.parametrize("gamma", [1e-3, 1.0])
def test_degenerate_inputs_stay_finite(gamma):
  for jacobian in _degenerate():
    updates, states = _run([jacobian.astype(np.float32)] * 3, gamma=gamma)
    for update, state in zip(updates, states):
      assert np.isfinite(update).all() and np.isfinite(state).all()
      assert state.min() >= 0.0 and abs(state.sum() - 1.0) < 1e-5


def test_nonfinite_input_leaves_the_state_unchanged():
  rng = np.random.default_rng(3)
  _, state = mtl_dist.aggregate(
      "modo", rng.normal(size=(9, 4)).astype(np.float32), gamma=0.5)
  bad = rng.normal(size=(9, 4)).astype(np.float32)
  bad[7, 2] = np.nan  # Only the third sub-batch: lambda would be finite.
  _, after = mtl_dist.aggregate("modo", bad, step=1, state=state, gamma=0.5)
  np.testing.assert_array_equal(after["weights"], state["weights"])
  bad[1, 0] = np.inf
  _, after = mtl_dist.aggregate("modo", bad, step=1, state=state, gamma=0.5)
  np.testing.assert_array_equal(after["weights"], state["weights"])


def test_options_are_checked():
  with pytest.raises(ValueError, match="has no option bogus"):
    mtl_dist.aggregate("modo", np.ones((3, 2), np.float32), bogus=1)
  config = mtl_dist.TrainConfig(model_dir="/tmp/unused", aggregator="modo",
                                global_batch_size=48, modo_gamma=0.0)
  with pytest.raises(mtl_dist.ConfigError, match="--modo_gamma=0.0"):
    config.validate()


