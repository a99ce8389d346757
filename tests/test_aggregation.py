"""Gradient aggregators against NumPy references of their formulas."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from mtl_dist import aggregation


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
  got = aggregation.pcgrad(tf.constant(grads), tf.constant([3, 7], tf.int64))
  # g1 loses its component along g2 and vice versa: (0.5, 0.5) + (0, 1).
  np.testing.assert_allclose(got.numpy(), [0.5, 1.5], atol=1e-6)
  np.testing.assert_allclose(got.numpy(),
                             _numpy_pcgrad(grads, [[1], [0]]), atol=1e-6)


def test_pcgrad_leaves_agreeing_gradients_alone():
  grads = np.array([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]], np.float32)
  got = aggregation.pcgrad(tf.constant(grads), tf.constant([0, 1], tf.int64))
  np.testing.assert_allclose(got.numpy(), grads.sum(axis=0), atol=1e-6)


def test_pcgrad_with_three_tasks_matches_reference_for_its_order():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(3, 5)).astype(np.float32)
  seed = tf.constant([5, 11], tf.int64)
  got = aggregation.pcgrad(tf.constant(grads), seed).numpy()
  # The order is random: the result must equal the reference for one of
  # the orders, and the same seed must always give the same result.
  candidates = [
      _numpy_pcgrad(grads, [list(a), list(b), list(c)])
      for a in itertools.permutations([1, 2])
      for b in itertools.permutations([0, 2])
      for c in itertools.permutations([0, 1])]
  assert min(np.abs(got - c).max() for c in candidates) < 1e-5
  np.testing.assert_array_equal(
      aggregation.pcgrad(tf.constant(grads), seed).numpy(), got)


def test_mgda_on_orthogonal_gradients_weights_inverse_squared_norms():
  # Orthogonal g_i = a_i e_i: the min-norm point has w_i ~ 1 / a_i^2.
  norms = np.array([1.0, 2.0, 1.0])
  grads = np.diag(norms).astype(np.float32)
  weights = aggregation.min_norm_weights(
      tf.constant(grads @ grads.T)).numpy()
  expected = (1 / norms**2) / (1 / norms**2).sum()
  np.testing.assert_allclose(weights, expected, atol=2e-3)
  np.testing.assert_allclose(aggregation.mgda(tf.constant(grads)).numpy(),
                             expected * norms, atol=2e-3)


def test_mgda_returns_zero_when_a_convex_combination_vanishes():
  grads = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]], np.float32)
  np.testing.assert_allclose(aggregation.mgda(tf.constant(grads)).numpy(),
                             [0.0, 0.0], atol=2e-3)


def _numpy_cagrad(grads: np.ndarray, c: float, grid: int = 300,
                  weights=None) -> np.ndarray:
  """CAGrad's update at `weights`, or at the best point of a 3-task grid."""
  g0 = grads.mean(axis=0)
  best = None if weights is None else (None, weights @ grads)
  for i in range(grid + 1 if weights is None else 0):
    for j in range(grid + 1 - i):
      w = np.array([i, j, grid - i - j]) / grid
      g_w = w @ grads
      value = g_w @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(g_w)
      if best is None or value < best[0]:
        best = (value, g_w)
  g_w = best[1]
  return (g0 + c * np.linalg.norm(g0) / np.linalg.norm(g_w) * g_w) / (1 + c * c)


def test_cagrad_matches_brute_force_on_three_tasks():
  grads = np.array([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.8, 1.0]],
                   np.float32)
  got = aggregation.cagrad(tf.constant(grads), c=0.5).numpy()
  np.testing.assert_allclose(got, _numpy_cagrad(grads, 0.5), atol=2e-3)


def test_cagrad_limits():
  grads = np.array([[1.0, 0.2, 0.0], [-0.5, 1.0, 0.3], [0.1, -0.8, 1.0]],
                   np.float32)
  # c -> 0: plain gradient descent on the mean loss.
  np.testing.assert_allclose(
      aggregation.cagrad(tf.constant(grads), c=1e-6).numpy(),
      grads.mean(axis=0), atol=1e-5)
  # Identical tasks: g0 = g_w = g, so the update is g (1 + c) / (1 + c^2).
  same = np.tile([[0.3, -1.0, 2.0]], (3, 1)).astype(np.float32)
  np.testing.assert_allclose(
      aggregation.cagrad(tf.constant(same), c=0.5).numpy(),
      same[0] * 1.5 / 1.25, atol=1e-5)


@pytest.mark.parametrize("grads, share", [
    ([[1.0, 0.0], [-1.0, 1.0]], 1.0),
    ([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], 2 / 3),
    ([[1.0, 0.0], [0.0, 1.0]], 0.0),
])
def test_conflict_share(grads, share):
  got = aggregation.conflict_share(tf.constant(grads, tf.float32))
  assert float(got) == pytest.approx(share)


@pytest.mark.parametrize("aggregator", ["pcgrad", "cagrad", "mgda"])
def test_aggregated_training_is_the_same_on_1_2_and_4_replicas(
    build_trainer, aggregator):
  tasks = ("shape", "x", "y")
  single, single_its, _, _ = build_trainer(1, "joint", tasks,
                                           aggregator=aggregator)
  initial = single.model.get_weights()
  single.train(single_its, 4)
  assert 0.0 <= single.last_step_metrics["conflict_share"] <= 1.0
  for replicas in (2, 4):
    multi, multi_its, _, _ = build_trainer(replicas, "joint", tasks,
                                           aggregator=aggregator,
                                           initial_weights=initial)
    multi.train(multi_its, 4)
    np.testing.assert_allclose(multi.last_step_metrics["conflict_share"],
                               single.last_step_metrics["conflict_share"])
    # CAGrad's dual solver stops at a tolerance and backtracks: round-off
    # between replica counts can change its path slightly, which moved one
    # hidden unit's weights by 1.3e-4 in one CI run on a loaded machine.
    # Using this replica's matrix instead of the global one is off by 8e-2.
    atol = 1e-3 if aggregator == "cagrad" else 1e-5
    for got, want in zip(multi.model.get_weights(),
                         single.model.get_weights()):
      np.testing.assert_allclose(got, want, atol=atol)
  assert any(not np.allclose(w, i) for w, i in zip(
      single.model.get_weights(), initial)), "training changed nothing"


def test_aggregated_step_differs_from_sum_and_keeps_heads_separate(
    build_trainer):
  summed, summed_its, _, _ = build_trainer(2, "joint", ("shape", "x"))
  initial = summed.model.get_weights()
  pcgrad, pcgrad_its, _, _ = build_trainer(2, "joint", ("shape", "x"),
                                           aggregator="pcgrad",
                                           initial_weights=initial)
  summed.train(summed_its, 1)
  pcgrad.train(pcgrad_its, 1)
  # Heads see only their own task's gradient either way: same head update.
  for task in ("shape", "x"):
    for got, want in zip(pcgrad.model.heads[task].get_weights(),
                         summed.model.heads[task].get_weights()):
      np.testing.assert_allclose(got, want, atol=1e-6)
  # Without conflicts PCGrad is the plain sum; with them the trunk differs.
  share = pcgrad.last_step_metrics["conflict_share"]
  same_trunk = all(np.allclose(a, b, atol=1e-6) for a, b in zip(
      pcgrad.model.trunk.get_weights(), summed.model.trunk.get_weights()))
  assert same_trunk == (share == 0.0)


@pytest.mark.parametrize("name", ["mgda", "cagrad"])
def test_gram_coefficients_reproduce_the_full_update(name):
  rng = np.random.default_rng(3)
  grads = rng.normal(size=(3, 6)).astype(np.float32)
  gram = tf.constant(grads @ grads.T)
  coefficients = aggregation.coefficients_from_gram(name, gram, 0.5)
  matrix = grads.astype(np.float64)
  if name == "mgda":  # The min-norm weights themselves.
    weights = aggregation.min_norm_weights(gram).numpy()
    full = weights @ matrix
  else:  # (g0 + c|g0|/|g_w| g_w) / (1 + c^2), from the vectors in float64.
    weights = aggregation.cagrad_weights(gram, 0.5).numpy().astype(np.float64)
    g0, g_w = matrix.mean(axis=0), weights @ matrix
    full = (g0 + 0.5 * np.linalg.norm(g0) / np.linalg.norm(g_w) * g_w) / 1.25
  np.testing.assert_allclose(coefficients.numpy() @ grads, full, atol=1e-5)
  got = (aggregation.mgda(tf.constant(grads)) if name == "mgda"
         else aggregation.cagrad(tf.constant(grads), 0.5))
  np.testing.assert_allclose(got.numpy(), full, atol=1e-5)


def test_pcgrad_has_no_gram_form():
  with pytest.raises(ValueError, match="no Gram-matrix form"):
    aggregation.coefficients_from_gram("pcgrad", tf.eye(2))


@pytest.mark.parametrize("aggregator", ["mgda", "cagrad"])
def test_rep_grad_training_is_the_same_on_1_2_and_4_replicas(
    build_trainer, aggregator):
  tasks = ("shape", "x", "y")
  single, single_its, _, _ = build_trainer(1, "joint", tasks,
                                           aggregator=aggregator,
                                           rep_grad=True)
  initial = single.model.get_weights()
  single.train(single_its, 4)
  for replicas in (2, 4):
    multi, multi_its, _, _ = build_trainer(replicas, "joint", tasks,
                                           aggregator=aggregator,
                                           rep_grad=True,
                                           initial_weights=initial)
    multi.train(multi_its, 4)
    for got, want in zip(multi.model.get_weights(),
                         single.model.get_weights()):
      np.testing.assert_allclose(got, want, atol=1e-5)
  assert any(not np.allclose(w, i) for w, i in zip(
      single.model.get_weights(), initial)), "training changed nothing"


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


def _numpy_cagrad_weights(gram: np.ndarray, c: float,
                          iterations: int = 20000) -> np.ndarray:
  """Projected gradient with backtracking in float64, run to convergence."""
  num_tasks = len(gram)
  m = gram / np.abs(gram).max()
  b, g0_norm = m.sum(axis=1) / num_tasks, np.sqrt(m.sum()) / num_tasks

  def objective(w):
    return w @ b + c * g0_norm * np.sqrt(max(w @ m @ w, 1e-30))

  def project(v):
    u = np.sort(v)[::-1]
    excess = np.cumsum(u) - 1
    last = np.nonzero(u - excess / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - excess[last] / (last + 1), 0)

  w, rate = np.full(num_tasks, 1 / num_tasks), 1.0
  for _ in range(iterations):
    grad = b + c * g0_norm * (m @ w) / np.sqrt(max(w @ m @ w, 1e-30))
    while True:
      candidate = project(w - rate * grad)
      move = candidate - w
      if objective(candidate) <= objective(w) + grad @ move + move @ move / (
          2 * rate) or rate < 1e-14:
        break
      rate *= 0.5
    w, rate = candidate, rate * 1.2
  return w


def test_cagrad_converges_with_ten_tasks_of_very_different_scales():
  rng = np.random.default_rng(7)
  grads = (rng.normal(size=(10, 40)) *
           np.logspace(0, 2, 10)[:, None]).astype(np.float32)
  grads[1] -= 0.5 * grads[0]  # Some conflicts.
  matrix = grads.astype(np.float64)
  gram = matrix @ matrix.T
  g0 = matrix.mean(axis=0)

  def objective(w):
    g_w = w @ matrix
    return g_w @ g0 + 0.5 * np.linalg.norm(g0) * np.linalg.norm(g_w)

  want = _numpy_cagrad_weights(gram, 0.5)
  got = aggregation.cagrad_weights(tf.constant(gram, tf.float32),
                                   0.5).numpy().astype(np.float64)
  # The weights of the smallest tasks barely change the objective; what
  # counts is the objective and the update (float32 limits both).
  assert abs(objective(got) - objective(want)) <= 1e-4 * abs(objective(want))
  want_update = _numpy_cagrad(matrix, 0.5, weights=want)
  got_update = aggregation.cagrad(tf.constant(grads), 0.5).numpy()
  assert (np.linalg.norm(got_update - want_update) <=
          1e-2 * np.linalg.norm(want_update))


def test_project_to_simplex():
  for v in ([0.2, 0.3, 0.5], [2.0, 0.0, -1.0], [0.4, 0.4, 0.4, -5.0]):
    got = aggregation.project_to_simplex(tf.constant(v)).numpy()
    assert abs(got.sum() - 1.0) < 1e-6 and (got >= 0).all()
  np.testing.assert_allclose(
      aggregation.project_to_simplex(tf.constant([2.0, 0.0, -1.0])),
      [1.0, 0.0, 0.0])
  np.testing.assert_allclose(
      aggregation.project_to_simplex(tf.constant([0.4, 0.4, 0.4, -5.0])),
      [1 / 3, 1 / 3, 1 / 3, 0.0], atol=1e-6)
