"""Gradient aggregators against NumPy references of their formulas.

MGDA's and CAGrad's solvers are checked against exact float64 solutions
computed here another way: MGDA's min-norm point by enumerating every face
of the simplex (the affine minimiser of each subset of tasks, kept where
its weights are non-negative), CAGrad's update by its duality gap (which is
0 exactly at the optimum, whatever solved it), by a closed-form solution
of its optimality conditions on each support, and on three tasks by a grid
over the simplex.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from mtl_dist.methods import aggregators
from mtl_dist.methods.aggregators import base as base_lib
from mtl_dist.methods.aggregators import cagrad as cagrad_lib
from mtl_dist.methods.aggregators import mgda as mgda_lib
from mtl_dist.methods.aggregators import pcgrad as pcgrad_lib


def _numpy_pcgrad(grads: np.ndarray, orders: list[list[int]]) -> np.ndarray:
  result = []
  for i, order in enumerate(orders):
    g_i = grads[i].astype(np.float64).copy()
    for j in order:
      dot = g_i @ grads[j]
      if dot < 0:
        g_i -= dot / (grads[j] @ grads[j]) * grads[j]
    result.append(g_i)
  return np.sum(result, axis=0)


def test_pcgrad_projects_two_conflicting_gradients():
  grads = np.array([[1.0, 0.0], [-1.0, 1.0]], np.float32)
  got = pcgrad_lib.pcgrad(tf.constant(grads), tf.constant([3, 7], tf.int64))
  # g1 loses its component along g2 and vice versa: (0.5, 0.5) + (0, 1).
  np.testing.assert_allclose(got.numpy(), [0.5, 1.5], atol=1e-6)
  np.testing.assert_allclose(got.numpy(),
                             _numpy_pcgrad(grads, [[1], [0]]), atol=1e-6)


def test_pcgrad_leaves_agreeing_gradients_alone():
  grads = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]], np.float32)
  got = pcgrad_lib.pcgrad(tf.constant(grads), tf.constant([0, 1], tf.int64))
  np.testing.assert_allclose(got.numpy(), grads.sum(axis=0), atol=1e-6)


def test_pcgrad_with_three_tasks_matches_reference_for_its_order():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(3, 5)).astype(np.float32)
  seed = tf.constant([5, 11], tf.int64)
  got = pcgrad_lib.pcgrad(tf.constant(grads), seed).numpy()
  # The order is random: the result must equal the reference for one of
  # the orders, and the same seed must always give the same result.
  candidates = [
      _numpy_pcgrad(grads, [list(a), list(b), list(c)])
      for a in itertools.permutations([1, 2])
      for b in itertools.permutations([0, 2])
      for c in itertools.permutations([0, 1])]
  assert min(np.abs(got - c).max() for c in candidates) < 1e-5
  np.testing.assert_array_equal(
      pcgrad_lib.pcgrad(tf.constant(grads), seed).numpy(), got)


def test_mgda_on_orthogonal_gradients_weights_inverse_squared_norms():
  # Orthogonal g_i = a_i e_i: the min-norm point has w_i ~ 1 / a_i^2.
  norms = np.array([1.0, 2.0, 1.0])
  grads = np.diag(norms).astype(np.float32)
  weights = mgda_lib.min_norm_weights(
      tf.constant(grads @ grads.T)).numpy()
  expected = (1 / norms**2) / (1 / norms**2).sum()
  np.testing.assert_allclose(weights, expected, atol=1e-6)
  np.testing.assert_allclose(mgda_lib.mgda(tf.constant(grads)).numpy(),
                             expected * norms, atol=1e-6)


def test_mgda_returns_zero_when_a_convex_combination_vanishes():
  grads = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]], np.float32)
  np.testing.assert_allclose(mgda_lib.mgda(tf.constant(grads)).numpy(),
                             [0.0, 0.0], atol=1e-6)


def _numpy_cagrad(grads: np.ndarray, c: float, grid: int = 300) -> np.ndarray:
  """CAGrad's update at the best point of a 3-task grid over the simplex."""
  g0 = grads.mean(axis=0)
  best = None
  for i in range(grid + 1):
    for j in range(grid + 1 - i):
      w = np.array([i, j, grid - i - j]) / grid
      g_w = w @ grads
      value = g_w @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(g_w)
      if best is None or value < best[0]:
        best = (value, g_w)
  return _cagrad_update(grads, best[1], c)


def test_cagrad_matches_brute_force_on_three_tasks():
  grads = np.array([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.8, 1.0]],
                   np.float32)
  got = cagrad_lib.cagrad(tf.constant(grads), c=0.5).numpy()
  # The grid's spacing (1/300) bounds its own error.
  np.testing.assert_allclose(got, _numpy_cagrad(grads, 0.5), atol=2e-3)
  np.testing.assert_allclose(got, _exact_cagrad(grads, 0.5), atol=1e-5)


def test_cagrad_limits():
  grads = np.array([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.8, 1.0]],
                   np.float32)
  # c -> 0: plain gradient descent on the mean loss.
  np.testing.assert_allclose(
      cagrad_lib.cagrad(tf.constant(grads), c=1e-6).numpy(),
      grads.mean(axis=0), atol=1e-5)
  # Identical tasks: g0 = g_w = g, so the update is g (1 + c) / (1 + c^2).
  same = np.tile([[0.3, -1.0, 2.0]], (3, 1)).astype(np.float32)
  np.testing.assert_allclose(
      cagrad_lib.cagrad(tf.constant(same), c=0.5).numpy(),
      same[0] * 1.5 / 1.25, atol=1e-5)


@pytest.mark.parametrize("grads, share", [
    ([[1.0, 0.0], [-1.0, 1.0]], 1.0),
    ([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], 2 / 3),
    ([[1.0, 0.0], [0.0, 1.0]], 0.0),
])
def test_conflict_share(grads, share):
  got = base_lib.conflict_share(tf.constant(grads, tf.float32))
  assert float(got) == pytest.approx(share)


def test_aggregated_step_differs_from_sum_and_keeps_heads_separate(
    build_trainer):
  summed, summed_its, _, _ = build_trainer(2, "joint", ("shape", "x"))
  initial = summed.model.get_weights()
  pcgrad, pcgrad_its, _, _ = build_trainer(2, "joint", ("shape", "x"),
                                           aggregator="pcgrad",
                                           initial_weights=initial)
  summed.train(summed_its, 1)
  share = pcgrad.train(pcgrad_its, 1).step_metrics["conflict_share"]
  # Heads see only their own task's gradient either way: same head update.
  for task in ("shape", "x"):
    for got, want in zip(pcgrad.model.heads[task].get_weights(),
                         summed.model.heads[task].get_weights()):
      np.testing.assert_allclose(got, want, atol=1e-6)
  # Without conflicts PCGrad is the plain sum; with them the trunk differs.
  same_trunk = all(np.allclose(a, b, atol=1e-6) for a, b in zip(
      pcgrad.model.trunk.get_weights(), summed.model.trunk.get_weights()))
  assert same_trunk == (share == 0.0)


@pytest.mark.parametrize("name", ["mgda", "cagrad"])
def test_gram_coefficients_reproduce_the_full_update(name):
  rng = np.random.default_rng(3)
  grads = rng.normal(size=(3, 6)).astype(np.float32)
  gram = tf.constant(grads @ grads.T)
  coefficients = aggregators.create(name, 3).gram_coefficients(gram, 0)
  matrix = grads.astype(np.float64)
  if name == "mgda":  # The min-norm weights themselves.
    weights = mgda_lib.min_norm_weights(gram).numpy()
    full = weights @ matrix
  else:  # (g0 + c|g0|/|g_w| g_w) / (1 + c^2), from the vectors in float64.
    weights = cagrad_lib.cagrad_weights(gram, 0.5).numpy().astype(np.float64)
    g0, g_w = matrix.mean(axis=0), weights @ matrix
    full = (g0 + 0.5 * np.linalg.norm(g0) / np.linalg.norm(g_w) * g_w) / 1.25
  np.testing.assert_allclose(coefficients.numpy() @ grads, full, atol=1e-5)
  got = (mgda_lib.mgda(tf.constant(grads)) if name == "mgda"
         else cagrad_lib.cagrad(tf.constant(grads), 0.5))
  np.testing.assert_allclose(got.numpy(), full, atol=1e-5)


def test_only_combinations_from_the_gram_matrix_have_a_gram_form():
  assert {name for name in aggregators.registry.AGGREGATORS.names()
          if aggregators.create(name, 2).has_gram_form} >= {"mgda", "cagrad"}
  pcgrad = aggregators.create("pcgrad", 2)
  assert not pcgrad.has_gram_form
  with pytest.raises(NotImplementedError, match="no Gram-matrix form"):
    pcgrad.gram_coefficients(tf.eye(2), 0)


def test_rep_grad_with_one_task_is_plain_gradient_descent(build_trainer):
  """One task: MGDA's coefficient is 1, so the update is the plain one."""
  plain, plain_its, _, _ = build_trainer(2, "joint", ("x",))
  rep, rep_its, _, _ = build_trainer(2, "joint", ("x",), aggregator="mgda",
                                     rep_grad=True,
                                     initial_weights=plain.model.get_weights())
  plain.train(plain_its, 3)
  rep.train(rep_its, 3)
  for got, want in zip(rep.model.get_weights(), plain.model.get_weights()):
    np.testing.assert_allclose(got, want, atol=1e-6)


def _exact_min_norm(grads: np.ndarray) -> np.ndarray:
  """MGDA's min-norm point, in float64, by enumerating the simplex's faces."""
  matrix = np.asarray(grads, np.float64)
  num_tasks = len(matrix)
  gram = matrix @ matrix.T
  best = None
  for size in range(1, num_tasks + 1):
    for support in itertools.combinations(range(num_tasks), size):
      support = list(support)
      kkt = np.zeros((size + 1, size + 1))
      kkt[:size, :size] = gram[np.ix_(support, support)]
      kkt[:size, size] = kkt[size, :size] = 1.0
      rhs = np.zeros(size + 1)
      rhs[size] = 1.0
      solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
      if np.abs(kkt @ solution - rhs).max() > 1e-9 * (1 + np.abs(gram).max()):
        continue  # No affine minimiser on this face's span.
      weights = solution[:size]
      if (weights < -1e-12).any():
        continue
      point = np.maximum(weights, 0.0) @ matrix[support] / np.maximum(
          weights, 0.0).sum()
      if best is None or np.linalg.norm(point) < np.linalg.norm(best):
        best = point
  return best


def _cagrad_update(matrix: np.ndarray, point: np.ndarray, c: float):
  """(g0 + c|g0| g_w/|g_w|) / (1 + c^2), g0 / (1 + c^2) where g_w = 0."""
  g0 = matrix.mean(axis=0)
  norm = np.linalg.norm(point)
  direction = point / norm if norm > 0 else np.zeros_like(point)
  return (g0 + c * np.linalg.norm(g0) * direction) / (1 + c * c)


def _exact_cagrad(grads: np.ndarray, c: float) -> np.ndarray:
  """CAGrad's update, in float64, from the closed-form optimum on each support.

  On a support S with g_w != 0, optimality reads b_S + rho M_SS w / |g_w|
  = lambda 1 (b = G g0, rho = c|g0|); with alpha = w / |g_w| that is
  alpha = M_SS^-1 (lambda 1 - b_S) / rho with alpha^T M_SS alpha = 1, a
  quadratic in lambda. The best feasible candidate over all supports (and
  g_w = 0 where 0 is in the hull) is the optimum. Needs linearly
  independent gradients on the optimal support.
  """
  matrix = np.asarray(grads, np.float64)
  num_tasks = len(matrix)
  g0 = matrix.mean(axis=0)
  rho = c * np.linalg.norm(g0)
  gram, b = matrix @ matrix.T, matrix @ g0
  candidates = []
  if np.linalg.norm(_exact_min_norm(matrix)) <= 1e-12 * np.abs(matrix).max():
    candidates.append((0.0, np.zeros_like(g0)))
  for size in range(1, num_tasks + 1):
    for support in itertools.combinations(range(num_tasks), size):
      support = list(support)
      norms = np.sqrt(np.diag(gram)[support])
      if (norms == 0).any():
        continue
      cosines = gram[np.ix_(support, support)] / np.outer(norms, norms)
      if np.linalg.cond(cosines) > 1e12:
        continue
      inverse = np.linalg.inv(cosines) / np.outer(norms, norms)
      ones = np.ones(size)
      a2, a1 = ones @ inverse @ ones, ones @ inverse @ b[support]
      a0 = b[support] @ inverse @ b[support] - rho**2
      discriminant = a1 * a1 - a2 * a0
      if discriminant < 0:
        continue
      for lam in ((a1 + np.sqrt(discriminant)) / a2,
                  (a1 - np.sqrt(discriminant)) / a2):
        alpha = inverse @ (lam * ones - b[support]) / rho
        if alpha.sum() <= 0 or (alpha < -1e-9 * np.abs(alpha).max()).any():
          continue
        point = np.maximum(alpha, 0) @ matrix[support] / np.maximum(
            alpha, 0).sum()
        candidates.append((point @ g0 + rho * np.linalg.norm(point), point))
  return _cagrad_update(matrix, min(candidates, key=lambda x: x[0])[1], c)


def _cagrad_gap(grads: np.ndarray, c: float) -> tuple[float, float]:
  """The duality gap of `cagrad_lib.cagrad_weights`' solution, and a scale.

  For the dual point g_w, the primal point d = g0 + c|g0| g_w/|g_w| is in
  the ball; the dual value g_w . d minus the primal value min_i g_i . d is
  >= 0, and 0 only at the optimum.
  """
  matrix = np.asarray(grads, np.float64)
  gram = tf.constant(np.asarray(grads, np.float32) @ np.asarray(
      grads, np.float32).T)
  weights = cagrad_lib.cagrad_weights(gram, c).numpy().astype(np.float64)
  point = weights @ matrix / weights.sum()  # float32 weights: sum 1 +- 1e-7
  update = _cagrad_update(matrix, point, c) * (1 + c * c)
  gap = point @ update - (matrix @ update).min()
  scale = np.linalg.norm(matrix.mean(axis=0)) * np.linalg.norm(
      matrix, axis=1).max()
  return gap, scale


def _scattered(rng, num_tasks: int, size: int) -> np.ndarray:
  """Random gradients whose norms span 1e-3 to 1e3, in a random order."""
  norms = np.logspace(-3, 3, num_tasks)[rng.permutation(num_tasks)]
  return (rng.normal(size=(num_tasks, size)) * norms[:, None]).astype(
      np.float32)


def _in_ball(update: np.ndarray, grads: np.ndarray, c: float) -> bool:
  g0 = grads.astype(np.float64).mean(axis=0)
  radius = c * np.linalg.norm(g0) / (1 + c * c)
  return (np.linalg.norm(update - g0 / (1 + c * c)) <=
          radius * (1 + 1e-5) + 1e-30)


def test_cagrad_of_exactly_cancelling_tasks_is_the_mean_scaled():
  # The dual optimum has g_w = 0: the update is g0 / (1 + c^2), not a
  # coefficient of ~1e12 times rounding noise (was [98304, 0.267]).
  grads = np.array([[100.0, 0.0], [-100.0, 0.0], [0.0, 1.0]], np.float32)
  got = cagrad_lib.cagrad(tf.constant(grads), 0.5).numpy()
  np.testing.assert_allclose(got, [0.0, 0.8 / 3], atol=1e-7)
  np.testing.assert_allclose(got, _exact_cagrad(grads, 0.5), atol=1e-7)
  gram = tf.constant(grads @ grads.T)
  np.testing.assert_allclose(
      cagrad_lib.gram_coefficients(gram, 0.5).numpy() @ grads,
      got, atol=1e-6)


def test_cagrad_with_norms_three_thousand_times_apart():
  # Was [914.7, -279.5]: the old solver stopped at weights [0.5, 0, 0.5].
  grads = np.array([[2.3, 2.4], [2400.0, -2400.0], [-0.7, -0.3]], np.float32)
  got = cagrad_lib.cagrad(tf.constant(grads), 0.5).numpy()
  want = _exact_cagrad(grads, 0.5)
  np.testing.assert_allclose(want, [303.57, -337.30], atol=0.01)
  # The float32 Gram matrix alone moves the exact answer by 9e-5 relative.
  np.testing.assert_allclose(got, want, rtol=2e-4)
  gap, scale = _cagrad_gap(grads, 0.5)
  assert abs(gap) <= 1e-9 * scale


@pytest.mark.parametrize("num_tasks", [3, 5, 10])
def test_mgda_is_exact_for_norms_spanning_a_million(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for trial in range(8):
    grads = _scattered(rng, num_tasks, num_tasks + 2 + trial)
    got = mgda_lib.mgda(tf.constant(grads)).numpy()
    want = _exact_min_norm(grads)
    largest = np.linalg.norm(grads, axis=1).max()
    assert np.linalg.norm(got - want) <= 1e-6 * largest, trial
    # The min-norm point is near the smallest gradient: relative to itself.
    assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want), trial


@pytest.mark.parametrize("num_tasks", [3, 5, 10])
def test_mgda_finds_the_origin_inside_the_hull(num_tasks):
  # More tasks than dimensions: the hull of random gradients holds 0.
  rng = np.random.default_rng(10 + num_tasks)
  grads = _scattered(rng, num_tasks, 2)
  grads = np.concatenate([grads, -grads[:1] * 0.5], axis=0)
  assert np.linalg.norm(_exact_min_norm(grads)) < 1e-9
  got = mgda_lib.mgda(tf.constant(grads)).numpy()
  assert np.linalg.norm(got) <= 1e-6 * np.linalg.norm(grads, axis=1).max()


@pytest.mark.parametrize("num_tasks", [3, 5, 10])
def test_cagrad_is_optimal_for_norms_spanning_a_million(num_tasks):
  rng = np.random.default_rng(100 + num_tasks)
  for trial in range(6):
    grads = _scattered(rng, num_tasks, num_tasks + 3 + trial)
    got = cagrad_lib.cagrad(tf.constant(grads), 0.5).numpy()
    gap, scale = _cagrad_gap(grads, 0.5)
    assert abs(gap) <= 1e-7 * scale, (trial, gap / scale)
    assert _in_ball(got, grads, 0.5), trial
    want = _exact_cagrad(grads, 0.5)
    assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want), trial


@pytest.mark.parametrize("grads", [
    [[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [-3.0, 0.1, 1.0]],  # duplicated
    [[1.0, 2.0, 0.5], [-1.0, -2.0, -0.5], [0.3, 0.1, 1.0]],  # mirrored
    [[0.0, 0.0, 0.0], [1.0, -1.0, 0.5], [0.2, 0.4, 3.0]],  # a zero gradient
    [[1e3, 0.0, 0.0], [-1e3, 0.0, 0.0], [0.0, 1e-3, 0.0]],  # cancel, scaled
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # all zero
])
def test_degenerate_gradients(grads):
  grads = np.array(grads, np.float32)
  largest = max(np.linalg.norm(grads, axis=1).max(), 1e-30)
  mgda = mgda_lib.mgda(tf.constant(grads)).numpy()
  np.testing.assert_allclose(mgda, _exact_min_norm(grads),
                             atol=1e-6 * largest)
  cagrad = cagrad_lib.cagrad(tf.constant(grads), 0.5).numpy()
  assert np.isfinite(cagrad).all() and _in_ball(cagrad, grads, 0.5)
  np.testing.assert_allclose(cagrad, _exact_cagrad(grads, 0.5),
                             atol=1e-5 * largest)


def test_cagrad_stays_in_its_ball_for_every_input():
  rng = np.random.default_rng(5)
  for trial in range(40):
    num_tasks = int(rng.integers(2, 8))
    grads = _scattered(rng, num_tasks, int(rng.integers(1, 12)))
    if trial % 3 == 0:
      grads[1] = -grads[0]  # mirrored
    if trial % 4 == 0:
      grads[-1] = grads[0]  # duplicated
    got = cagrad_lib.cagrad(tf.constant(grads), 0.5).numpy()
    assert np.isfinite(got).all() and _in_ball(got, grads, 0.5), trial


def test_exact_references_agree_with_a_grid_on_three_tasks():
  """The closed-form CAGrad reference against the independent grid search."""
  rng = np.random.default_rng(11)
  for _ in range(3):
    grads = rng.normal(size=(3, 4))
    np.testing.assert_allclose(_exact_cagrad(grads, 0.5),
                               _numpy_cagrad(grads, 0.5), atol=2e-3)


def test_cagrad_where_its_dual_objective_is_zero_at_the_optimum():
  """Found on the 2-D toy problem (docs/toy_2d.md): the dual's optimum is
  a vertex where its two terms cancel, f(w*) ~ 0, so a duality gap relative
  to |f| was never reached and the barrier ran on until rounding gave NaN
  (was [nan, nan])."""
  grads = np.array([[11.14419, -9.193356], [-0.04272335, 2.9747345]],
                   np.float32)
  got = cagrad_lib.cagrad(tf.constant(grads), 0.5).numpy()
  np.testing.assert_allclose(got, _exact_cagrad(grads, 0.5), rtol=1e-5)
  gap, scale = _cagrad_gap(grads, 0.5)
  assert abs(gap) <= 1e-7 * scale
