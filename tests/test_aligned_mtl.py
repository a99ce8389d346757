"""Aligned-MTL (`--aggregator=aligned_mtl`): against a NumPy reference of the
paper's algorithm through the singular value decomposition of the Jacobian,
TorchJD's published values, closed forms, its properties (and the one it
lacks) and degenerate inputs."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import aggregators
from mtl_dist.methods.aggregators import aligned_mtl

EPS32 = 2.0**-23


def reference_update(jacobian: np.ndarray, scale_mode: str = "min"
                     ) -> np.ndarray:
  """Aligned-MTL (Senushkin et al. 2023, Algorithm 1) in float64, from the
  SVD J = A S R^T instead of the Gram matrix's eigendecomposition.

  M = J J^T = A S^2 A^T, so B = s A S^-1 A^T and the update
  J^T B w = s R A^T w (w = 1/T): the mean of the aligned gradients, the
  rows of s A R^T, orthogonal and of norm s (s^2 the smallest kept
  eigenvalue of M, or the lower median / the mean of them). Singular
  values with s_k^2 <= s_max^2 T eps32 are dropped, as TorchJD's `tol`.
  """
  jacobian = np.asarray(jacobian, np.float64)
  num_tasks = len(jacobian)
  left, singular, right_t = np.linalg.svd(jacobian, full_matrices=False)
  keep = singular**2 > singular.max()**2 * num_tasks * EPS32
  if not keep.any():
    return jacobian.mean(axis=0)
  left, singular, right_t = left[:, keep], singular[keep], right_t[keep]
  eigenvalues = np.sort(singular**2)
  scale = {"min": eigenvalues[0],
           "median": eigenvalues[(len(eigenvalues) - 1) // 2],
           "rmse": eigenvalues.mean()}[scale_mode]
  return np.sqrt(scale) * right_t.T @ left.T @ np.full(num_tasks,
                                                       1 / num_tasks)


def _update(jacobian: np.ndarray) -> np.ndarray:
  return mtl_dist.aggregate("aligned_mtl",
                            np.asarray(jacobian, np.float32)).numpy()


def test_torchjd_published_values():
  # tests/unit/aggregation/test_values.py at commit 46962c2b (torchjd
  # 0.8.1): AlignedMTL() on J_base -> [0.2133, 0.9673, 0.9673] and
  # AlignedMTLWeighting() on G_base = J_base J_base^T -> [0.5591, 0.4083],
  # atol 1e-4.
  j_base = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)
  np.testing.assert_allclose(_update(j_base), [0.2133, 0.9673, 0.9673],
                             atol=1e-4)
  weights = aligned_mtl.aligned_mtl_weights(tf.constant(j_base @ j_base.T))
  np.testing.assert_allclose(weights.numpy(), [0.5591, 0.4083], atol=1e-4)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 5])
def test_matches_the_svd_reference(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(5):
    scales = 10.0**rng.uniform(-2, 2, size=(num_tasks, 1))
    jacobian = (rng.normal(size=(num_tasks, 12)) * scales).astype(np.float32)
    want = reference_update(jacobian)
    np.testing.assert_allclose(_update(jacobian), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_scale_modes_match_the_reference(scale_mode):
  rng = np.random.default_rng(11)
  for num_tasks in (2, 3, 4):
    jacobian = rng.normal(size=(num_tasks, 7)).astype(np.float32)
    weights = aligned_mtl.aligned_mtl_weights(
        tf.constant(jacobian @ jacobian.T), scale_mode).numpy()
    want = reference_update(jacobian, scale_mode)
    np.testing.assert_allclose(weights @ jacobian.astype(np.float64), want,
                               rtol=1e-4, atol=1e-5 * np.abs(want).max())
  with pytest.raises(ValueError, match="scale_mode"):
    aligned_mtl.aligned_mtl_weights(tf.eye(2), "max")


def test_orthogonal_tasks_closed_form():
  # M = diag(n1^2, n2^2): B = n_min diag(1/n1, 1/n2), the update is
  # n_min (u1 + u2) / 2.
  jacobian = np.array([[3.0, 0.0, 0.0], [0.0, -0.5, 0.0]], np.float32)
  np.testing.assert_allclose(_update(jacobian), [0.25, -0.25, 0.0],
                             rtol=1e-6)
  # A single task is left alone (B = 1).
  g = np.array([[0.5, -2.0, 1.0]], np.float32)
  np.testing.assert_allclose(_update(g), g[0], rtol=1e-6)


def test_aligned_gradients_are_orthogonal_with_equal_norms():
  # Full rank: the aligned gradients s A R^T are orthogonal with norm
  # s = sigma_min, so their mean has norm sigma_min / sqrt(T); and
  # J update = s M^1/2 w (the aligned Gram matrix is s^2 I).
  rng = np.random.default_rng(3)
  for num_tasks in (2, 3, 5):
    jacobian = rng.normal(size=(num_tasks, 9)) * rng.uniform(
        0.1, 10, size=(num_tasks, 1))
    jacobian = jacobian.astype(np.float32)
    matrix = jacobian.astype(np.float64)
    sigma_min = np.linalg.svd(matrix, compute_uv=False).min()
    got = _update(jacobian)
    np.testing.assert_allclose(np.linalg.norm(got),
                               sigma_min / np.sqrt(num_tasks), rtol=1e-4)
    eigenvalues, vectors = np.linalg.eigh(matrix @ matrix.T)
    root = vectors @ np.diag(np.sqrt(eigenvalues)) @ vectors.T
    np.testing.assert_allclose(
        matrix @ got, sigma_min * root @ np.full(num_tasks, 1 / num_tasks),
        rtol=1e-4, atol=1e-6 * np.abs(matrix).max()**2)


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


def test_it_can_conflict_with_a_task():
  # Not a non-conflicting method: g_i . update = s (M^1/2 w)_i, and the
  # square root of M can make it negative. On 2 tasks,
  # (M^1/2 1)_1 is proportional to M_11 + M_12 + sqrt(det M): negative for
  # a small task nearly opposite a large one (here 1 - 9.9 + 1.4).
  jacobian = np.array([[1.0, 0.0], [-9.9, 1.4]], np.float32)
  want = reference_update(jacobian)
  got = _update(jacobian)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  products = jacobian.astype(np.float64) @ got
  assert products.min() < -1e-3 * np.abs(products).max(), products


def test_the_same_through_rep_grad_coefficients():
  rng = np.random.default_rng(5)
  jacobian = rng.normal(size=(3, 30)).astype(np.float32)
  aggregator = aggregators.create("aligned_mtl", 3)
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
      "opposite_scaled": np.stack([base[0], -1e3 * base[0], base[1]]),
      "rank_deficient": np.stack([base[0], base[1], base[0] + base[1]]),
      "more_tasks_than_dims": rng.normal(size=(5, 3)),
      "scales_1e-6_to_1e6": base[:3] * np.array([[1e-6], [1.0], [1e6]]),
      "all_tiny": base * 1e-6,
      "all_huge": base * 1e6,
  }


@pytest.mark.parametrize("case", sorted(_degenerate_jacobians()))
def test_degenerate_inputs_are_finite_and_match_the_reference(case):
  jacobian = _degenerate_jacobians()[case].astype(np.float32)
  got = _update(jacobian)
  assert np.all(np.isfinite(got))
  want = reference_update(jacobian)
  largest = np.linalg.norm(jacobian.astype(np.float64), axis=1).max()
  # The dropped directions (rank deficiency) are float32 rounding in the
  # Gram matrix and float64 in the SVD: both drop them.
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-6 * max(largest, 1e-30))


def test_a_wrong_option_is_refused():
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.aggregate("aligned_mtl", np.eye(2, dtype=np.float32), bogus=1)


def test_it_has_no_state():
  # Stateless: no variables to keep through a skipped step.
  assert not aggregators.create("aligned_mtl", 3).variables
  assert isinstance(mtl_dist.aggregate("aligned_mtl", np.eye(3)), tf.Tensor)
