"""ConFIG (`--aggregator=conflict_free`): against a NumPy reference of the
paper's formula through the pseudo-inverse of the unit gradients, TorchJD's
published value, closed forms, its defining property (equal cosine with
every task, hence no conflict) and degenerate inputs."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import aggregators
from mtl_dist.methods.aggregators import conflict_free


def reference_update(jacobian: np.ndarray) -> np.ndarray:
  """ConFIG (Liu et al. 2024, Eq. 2) as TorchJD's `ConFIG.forward`, in
  float64 on the unit gradients themselves (not the Gram matrix):
  d = pinv(U) 1, update = (sum_i g_i . d^) d^; a zero row's unit vector is
  0 (TorchJD's nan_to_num), and d = 0 gives 0.

  The pseudo-inverse drops the singular values s_k of U with
  s_k^2 <= s_max^2 T eps32, as the method drops the eigenvalues of
  C = U U^T (TorchJD's float32 torch.linalg.pinv drops
  s_k <= s_max max(T, P) eps32): below that, U's rows are dependent up to
  float32 rounding (a sum of two gradients rounded to float32, a gradient
  times 1 + 1e-6) and the least-squares solution counts."""
  jacobian = np.asarray(jacobian, np.float64)
  norms = np.linalg.norm(jacobian, axis=1)
  units = np.divide(jacobian, norms[:, None],
                    out=np.zeros_like(jacobian), where=norms[:, None] > 0)
  rcond = np.sqrt(len(jacobian) * 2.0**-23)
  direction = np.linalg.pinv(units, rcond=rcond) @ np.ones(len(jacobian))
  length = np.linalg.norm(direction)
  if length < 1e-12:
    return np.zeros(jacobian.shape[1])
  unit = direction / length
  return np.sum(jacobian @ unit) * unit


def _update(jacobian: np.ndarray) -> np.ndarray:
  return mtl_dist.aggregate("conflict_free",
                            np.asarray(jacobian, np.float32)).numpy()


def _cosines(jacobian: np.ndarray, update: np.ndarray) -> np.ndarray:
  jacobian = np.asarray(jacobian, np.float64)
  update = np.asarray(update, np.float64)
  return jacobian @ update / (np.linalg.norm(jacobian, axis=1) *
                              np.linalg.norm(update))


def test_torchjd_published_value():
  # tests/unit/aggregation/test_values.py at commit 46962c2b (torchjd
  # 0.8.1): ConFIG() on J_base -> [0.1588, 2.0706, 2.0706], atol 1e-4.
  j_base = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)
  np.testing.assert_allclose(_update(j_base), [0.1588, 2.0706, 2.0706],
                             atol=1e-4)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5])
def test_matches_the_reference_and_has_equal_cosines(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(5):
    scales = 10.0**rng.uniform(-3, 3, size=(num_tasks, 1))
    jacobian = (rng.normal(size=(num_tasks, 12)) * scales).astype(np.float32)
    want = reference_update(jacobian)
    got = _update(jacobian)
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())
    # The defining property: the same positive cosine with every task.
    cosines = _cosines(jacobian, got)
    assert cosines.min() > 0
    np.testing.assert_allclose(cosines, cosines.mean(), rtol=1e-4)


def test_two_tasks_closed_form():
  # u1 . d = u2 . d in span(u1, u2): d along the bisector u1 + u2, and the
  # update is the projection of g1 + g2 on it.
  rng = np.random.default_rng(1)
  for _ in range(5):
    g = rng.normal(size=(2, 5)) * np.array([[0.01], [30.0]])
    units = g / np.linalg.norm(g, axis=1, keepdims=True)
    bisector = units.sum(axis=0) / np.linalg.norm(units.sum(axis=0))
    want = (g.sum(axis=0) @ bisector) * bisector
    np.testing.assert_allclose(_update(g), want, rtol=1e-4,
                               atol=1e-6 * np.abs(want).max())


def test_orthogonal_tasks_closed_form():
  # d = sum_i u_i: the update is (sum_i |g_i| / T) sum_i u_i.
  jacobian = np.diag([3.0, 0.5, 2.0]).astype(np.float32)
  np.testing.assert_allclose(_update(jacobian), [11 / 6] * 3, rtol=1e-6)
  g = np.array([[0.5, -2.0, 1.0]], np.float32)  # One task: itself.
  np.testing.assert_allclose(_update(g), g[0], rtol=1e-6)


def test_only_the_length_depends_on_the_tasks_norms():
  rng = np.random.default_rng(4)
  jacobian = rng.normal(size=(3, 8))
  update = _update(jacobian)
  rescaled = _update(jacobian * np.array([[1e-3], [1.0], [50.0]]))
  np.testing.assert_allclose(
      rescaled / np.linalg.norm(rescaled), update / np.linalg.norm(update),
      rtol=1e-4, atol=1e-6)


def test_task_order_does_not_matter_and_scale_is_linear():
  rng = np.random.default_rng(7)
  jacobian = rng.normal(size=(4, 10)).astype(np.float32)
  update = _update(jacobian)
  for permutation in ([3, 1, 0, 2], [1, 2, 3, 0]):
    np.testing.assert_allclose(_update(jacobian[permutation]), update,
                               rtol=1e-4, atol=1e-6)
  for factor in (1e-3, 7.0, 1e3):
    np.testing.assert_allclose(_update(jacobian * factor), update * factor,
                               rtol=1e-4, atol=1e-6 * factor)


def test_a_zero_task_asks_nothing():
  # No unit vector: it takes no part, the others are as without it.
  rng = np.random.default_rng(6)
  others = rng.normal(size=(2, 6))
  jacobian = np.stack([others[0], np.zeros(6), others[1]])
  np.testing.assert_allclose(_update(jacobian), reference_update(others),
                             rtol=1e-5)
  weights = conflict_free.conflict_free_weights(
      tf.constant((jacobian @ jacobian.T).astype(np.float32))).numpy()
  assert weights[1] == 0.0


def test_duplicated_tasks_keep_the_direction_and_add_to_the_length():
  rng = np.random.default_rng(8)
  g1, g2 = rng.normal(size=(2, 6))
  update = _update(np.stack([g1, g2]))
  unit = update / np.linalg.norm(update)
  want = ((2 * g1 + g2) @ unit) * unit
  np.testing.assert_allclose(_update(np.stack([g1, g1, g2])), want,
                             rtol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 3.0, 1e-3, 1e3])
def test_unit_gradients_summing_to_zero_give_zero(scale):
  # No direction has a positive cosine with both: pinv(U) 1 = 0.
  g = np.random.default_rng(9).normal(size=1000)
  assert not np.any(_update(np.stack([g, -scale * g])))
  # Three at 120 degrees in a plane, with norms 1, 2 and 5.
  angles = np.deg2rad([90.0, 210.0, 330.0])
  star = np.stack([np.cos(angles), np.sin(angles), 0 * angles], axis=1)
  assert not np.any(_update(star * np.array([[1.0], [2.0], [5.0]])))


def test_the_same_through_rep_grad_coefficients():
  rng = np.random.default_rng(5)
  jacobian = rng.normal(size=(3, 30)).astype(np.float32)
  aggregator = aggregators.create("conflict_free", 3)
  assert aggregator.has_gram_form
  coefficients = aggregator.gram_coefficients(
      tf.constant(jacobian @ jacobian.T), tf.constant(0, tf.int64)).numpy()
  np.testing.assert_allclose(coefficients @ jacobian,
                             reference_update(jacobian), rtol=1e-4,
                             atol=1e-6)


def _degenerate_jacobians():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(4, 6))
  return {
      "zero": np.zeros((3, 6)),
      "one_zero_task": np.concatenate([base[:2], np.zeros((1, 6))]),
      "duplicated": np.stack([base[0], base[0], base[1]]),
      "near_duplicate": np.stack([base[0], base[0] * (1 + 1e-6), base[1]]),
      "opposite": np.stack([base[0], -base[0]]),
      "opposite_and_another": np.stack([base[0], -1e3 * base[0], base[1]]),
      "rank_deficient": np.stack([base[0], base[1], base[0] + base[1]]),
      "more_tasks_than_dims": rng.normal(size=(5, 3)),
      "scales_1e-6_to_1e6": base[:3] * np.array([[1e-6], [1.0], [1e6]]),
      "all_tiny": base * 1e-6,
      "all_huge": base * 1e6,
  }


# Where u_i . d = 1 has a solution, the update conflicts with no task;
# otherwise d is the least-squares solution, which may (here it does not:
# opposite tasks get d . u = 0).
_CONSISTENT = {"one_zero_task", "duplicated", "near_duplicate",
               "scales_1e-6_to_1e6", "all_tiny", "all_huge", "zero",
               "opposite", "opposite_and_another"}


@pytest.mark.parametrize("case", sorted(_degenerate_jacobians()))
def test_degenerate_inputs(case):
  jacobian = _degenerate_jacobians()[case].astype(np.float32)
  got = _update(jacobian).astype(np.float64)
  assert np.all(np.isfinite(got))
  largest = max(np.linalg.norm(jacobian.astype(np.float64), axis=1).max(),
                1e-30)
  np.testing.assert_allclose(got, reference_update(jacobian), rtol=1e-4,
                             atol=1e-6 * largest)
  # |update| <= |sum_i g_i|: a projection of the sum.
  assert np.linalg.norm(got) <= np.linalg.norm(
      jacobian.astype(np.float64).sum(axis=0)) * (1 + 1e-5) + 1e-30
  if case in _CONSISTENT:
    products = jacobian.astype(np.float64) @ got
    assert np.all(products >= -1e-6 * largest * np.linalg.norm(got))


def test_it_has_no_state_and_refuses_a_wrong_option():
  assert not aggregators.create("conflict_free", 3).variables
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.aggregate("conflict_free", np.eye(2, dtype=np.float32), bogus=1)
