"""Nash-MTL and FairGrad (`--aggregator=nash_mtl|fairgrad`) and their shared
solver of (G w)_i = w_i^-p (bargaining.py): against a NumPy solver of the
system written here, TorchJD's published value, closed forms, the residual
of the system over wide scales, Nash-MTL's `update_every` state over a
sequence of steps, and their properties on degenerate inputs. Training on
1, 2 and 4 replicas is checked with the other aggregators' in
tests/test_aggregation.py."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist import errors
from mtl_dist.methods import aggregators
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import bargaining
from mtl_dist.methods.aggregators import fairgrad
from mtl_dist.methods.aggregators import nash_mtl

METHODS = ("nash_mtl", "fairgrad")
J_BASE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)


def reference_solve(gram: np.ndarray, power: float) -> np.ndarray:
  """The w > 0 with (G w)_i = w_i^-p, in float64, another way than
  bargaining.py: exact coordinate minimisation of the convex objective
  0.5 w^T G w - sum_i f(w_i) (each coordinate's equation
  G_ii w_i + sum_{j != i} G_ij w_j = w_i^-p is increasing minus decreasing
  in w_i: bisection on log w_i), on G itself (no scaling, no ridge), then
  plain Newton steps on the system."""
  gram = np.asarray(gram, np.float64)
  num_tasks = len(gram)
  w = np.diag(gram)**(-1.0 / (1.0 + power))
  for _ in range(300):
    previous = w.copy()
    for i in range(num_tasks):
      rest = gram[i] @ w - gram[i, i] * w[i]
      low, high = np.log(w[i]) - 40.0, np.log(w[i]) + 40.0
      for _ in range(90):
        middle = 0.5 * (low + high)
        value = gram[i, i] * np.exp(middle) + rest - np.exp(-power * middle)
        low, high = (middle, high) if value < 0 else (low, middle)
      w[i] = np.exp(0.5 * (low + high))
    if np.max(np.abs(w - previous) / w) < 1e-9:
      break
  for _ in range(10):
    residual = gram @ w - w**-power
    step = np.linalg.solve(gram + np.diag(power * w**(-power - 1.0)),
                           residual)
    while np.any(w - step <= 0):
      step = step / 2.0
    w = w - step
  return w


def relative_residual(gram: np.ndarray, w: np.ndarray, power: float) -> float:
  """max_i |(G w)_i - w_i^-p| relative to the size of equation i's terms,
  sum_j |G_ij w_j| + w_i^-p (where the terms cancel, as for a tiny task
  whose gain g_i . d must be tiny, no solution in floating point does
  better relative to w_i^-p alone)."""
  gram = np.asarray(gram, np.float64)
  w = np.asarray(w, np.float64)
  return float(np.max(np.abs(gram @ w - w**-power) /
                      (np.abs(gram) @ w + w**-power)))


def reference_nash(jacobian: np.ndarray, max_norm: float = 1.0) -> np.ndarray:
  """Nash-MTL's coefficients as the references compute them: the solution
  for G / |G|_F, the update clipped to max_norm."""
  jacobian = jacobian.astype(np.float64)
  gram = jacobian @ jacobian.T
  alpha = reference_solve(gram / np.linalg.norm(gram), 1.0)
  norm = np.linalg.norm(alpha @ jacobian)
  if max_norm > 0 and norm > max_norm:
    alpha = alpha * max_norm / norm
  return alpha


def _gram(jacobian: np.ndarray) -> np.ndarray:
  jacobian = jacobian.astype(np.float32)
  return (tf.constant(jacobian) @ tf.transpose(jacobian)).numpy()


def _coefficients(name: str, jacobian: np.ndarray, **options) -> np.ndarray:
  aggregator = aggregators.create(name, len(jacobian), **options)
  return aggregator.gram_coefficients(tf.constant(_gram(jacobian)),
                                      tf.constant(0, tf.int64)).numpy()


def _update(name: str, jacobian: np.ndarray, **options) -> np.ndarray:
  got = mtl_dist.aggregate(name, jacobian.astype(np.float32), **options)
  return (got[0] if isinstance(got, tuple) else got).numpy()


def _random_jacobian(rng, num_tasks, width=32, spread=3.0):
  scales = 10.0**rng.uniform(-spread, spread, size=(num_tasks, 1))
  return (rng.normal(size=(num_tasks, width)) * scales).astype(np.float32)


def test_torchjd_published_value():
  # TorchJD 0.8.1 (commit 46962c2b), tests/unit/aggregation/test_values.py:
  # NashMTL(n_tasks=2) (max_norm=1.0, update_weights_every=1,
  # optim_niter=20) on J_base gives tensor([0.0542, 0.7061, 0.7061]),
  # checked there with atol=1e-4.
  update, state = mtl_dist.aggregate("nash_mtl", J_BASE)
  np.testing.assert_allclose(update, [0.0542, 0.7061, 0.7061], atol=1e-4)
  assert set(state) == {"alpha"}


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
def test_nash_mtl_matches_the_numpy_reference(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for max_norm in (1.0, 0.0, 1e3):
    for _ in range(3):
      jacobian = _random_jacobian(rng, num_tasks, spread=1.0)
      want = reference_nash(jacobian, max_norm)
      got = _coefficients("nash_mtl", jacobian, max_norm=max_norm)
      np.testing.assert_allclose(got, want, rtol=2e-5)
      np.testing.assert_allclose(
          _update("nash_mtl", jacobian, max_norm=max_norm),
          want @ jacobian.astype(np.float64), rtol=1e-4,
          atol=1e-5 * np.abs(want @ jacobian).max())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_matches_the_numpy_reference(alpha):
  rng = np.random.default_rng(int(alpha * 10))
  for num_tasks in (3, 4, 5):
    jacobian = _random_jacobian(rng, num_tasks, spread=1.0)
    want = reference_solve(jacobian.astype(np.float64) @ jacobian.T.astype(
        np.float64), 1.0 / alpha)
    got = _coefficients("fairgrad", jacobian, alpha=alpha)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    np.testing.assert_allclose(_update("fairgrad", jacobian, alpha=alpha),
                               want @ jacobian, rtol=1e-4,
                               atol=1e-5 * np.abs(want @ jacobian).max())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_orthogonal_gradients_closed_form(alpha):
  # G = diag(|g_i|^2): |g_i|^2 w_i = w_i^(-1/alpha), so
  # w_i = |g_i|^(-2 alpha / (1 + alpha)).
  norms = np.array([1e-3, 0.5, 2.0, 1e3])
  jacobian = np.diag(norms).astype(np.float32)
  np.testing.assert_allclose(
      _coefficients("fairgrad", jacobian, alpha=alpha),
      norms**(-2.0 * alpha / (1.0 + alpha)), rtol=1e-6)
  # Nash-MTL: alpha_i = sqrt(|G|_F) / |g_i| (the update before clipping is
  # sqrt(|G|_F) sum_i u_i, u_i the unit gradients).
  np.testing.assert_allclose(
      _coefficients("nash_mtl", jacobian, max_norm=0.0),
      np.sqrt(np.linalg.norm(norms**2)) / norms, rtol=1e-6)


@pytest.mark.parametrize("cosine", [-0.9, -0.3, 0.0, 0.5, 0.99])
def test_two_tasks_closed_form(cosine):
  # Two tasks, |g_1| = a, |g_2| = b, cos c: w_1 (G w)_1 = w_2 (G w)_2 = 1
  # gives a^2 w_1^2 = b^2 w_2^2, so w_i = 1 / (|g_i| sqrt(1 + c)) and the
  # update is the bisector (u_1 + u_2) / sqrt(1 + c).
  a, b = 0.02, 30.0
  u1 = np.array([1.0, 0.0])
  u2 = np.array([cosine, np.sqrt(1.0 - cosine**2)])
  jacobian = np.stack([a * u1, b * u2]).astype(np.float32)
  want = np.array([1 / a, 1 / b]) / np.sqrt(1.0 + cosine)
  np.testing.assert_allclose(_coefficients("fairgrad", jacobian), want,
                             rtol=1e-5)
  np.testing.assert_allclose(_update("fairgrad", jacobian),
                             (u1 + u2) / np.sqrt(1.0 + cosine), rtol=1e-5,
                             atol=1e-6)
  frobenius = np.linalg.norm(_gram(jacobian).astype(np.float64))
  np.testing.assert_allclose(
      _coefficients("nash_mtl", jacobian, max_norm=0.0),
      np.sqrt(frobenius) * want, rtol=1e-5)
  # FairGrad with equal norms n: w_1 = w_2 = (n^2 (1 + c))^(-alpha/(1+alpha)).
  equal = np.stack([u1, u2]).astype(np.float32) * 4.0
  for alpha in (0.5, 2.0):
    w = (16.0 * (1.0 + cosine))**(-alpha / (1.0 + alpha))
    np.testing.assert_allclose(
        _coefficients("fairgrad", equal, alpha=alpha), [w, w], rtol=1e-5)


@pytest.mark.parametrize("num_tasks", range(2, 11))
def test_residual_of_the_system_over_wide_scales(num_tasks):
  rng = np.random.default_rng(num_tasks)
  jacobian = _random_jacobian(rng, num_tasks, width=64)
  gram = _gram(jacobian)
  for power in (1.0, 0.5, 2.0, 5.0):
    # The solver, with a ridge too small to matter: the system for the
    # float32 Gram matrix it was given holds to 1e-9 relatively.
    w = bargaining.solve(gram, power, reg_eps=1e-14).numpy()
    assert np.all(w > 0)
    assert relative_residual(gram, w, power) < 1e-9, power
  # With the default ridge (1e-8), Nash-MTL's system (p = 1) to 1e-6.
  w = bargaining.solve(gram, 1.0).numpy()
  assert relative_residual(gram, w, 1.0) < 1e-6
  alpha = nash_mtl.nash_mtl_weights(gram).numpy()
  normalised = gram.astype(np.float64) / np.linalg.norm(
      gram.astype(np.float64))
  assert relative_residual(normalised, alpha, 1.0) < 1e-6


def test_fairgrad_with_alpha_1_is_nash_mtl_unclipped_and_unnormalised():
  rng = np.random.default_rng(3)
  jacobian = _random_jacobian(rng, 4, spread=2.0)
  frobenius = np.linalg.norm(_gram(jacobian).astype(np.float64))
  np.testing.assert_allclose(
      _coefficients("nash_mtl", jacobian, max_norm=0.0),
      np.sqrt(frobenius) * _coefficients("fairgrad", jacobian), rtol=1e-5)


def test_nash_mtl_update_every_reuses_the_weights_between_updates():
  rng = np.random.default_rng(12)
  jacobians = [rng.normal(size=(3, 6)).astype(np.float32) * (k + 1)
               for k in range(6)]
  state = None
  kept = None
  for step, jacobian in enumerate(jacobians):
    update, state = mtl_dist.aggregate("nash_mtl", jacobian, step=step,
                                       state=state, update_every=3)
    j64 = jacobian.astype(np.float64)
    if step % 3 == 0:  # Recomputed from this step's matrix ...
      gram = j64 @ j64.T
      kept = reference_solve(gram / np.linalg.norm(gram), 1.0)
    # ... else TorchJD's prvs_alpha: the last computed, unclipped, is kept
    # and clipped with this step's matrix.
    np.testing.assert_allclose(state["alpha"], kept, rtol=2e-5)
    want = kept @ j64
    want = want / max(1.0, np.linalg.norm(want))
    np.testing.assert_allclose(update, want, rtol=1e-4, atol=1e-6)
  # A state never computed is computed whatever the step.
  update, state = mtl_dist.aggregate("nash_mtl", jacobians[1], step=1,
                                     update_every=3)
  np.testing.assert_allclose(update,
                             reference_nash(jacobians[1]) @ jacobians[1],
                             rtol=1e-4, atol=1e-6)


def test_nash_mtl_non_finite_input_leaves_the_state_unchanged():
  _, state = mtl_dist.aggregate("nash_mtl", J_BASE)
  for bad in (np.nan, np.inf):
    jacobian = J_BASE.copy()
    jacobian[1, 2] = bad
    for step in (0, 1):
      update, after = mtl_dist.aggregate("nash_mtl", jacobian, step=step,
                                         state=state, update_every=2)
      np.testing.assert_array_equal(after["alpha"], state["alpha"])
      assert not np.all(np.isfinite(update))


@pytest.mark.parametrize("name", METHODS)
def test_wrong_options_are_refused(name):
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.aggregate(name, J_BASE, bogus=1)
  flags = {"nash_mtl": ("nash_mtl_update_every", 0),
           "fairgrad": ("fairgrad_alpha", 0.0)}
  flag, value = flags[name]
  with pytest.raises(errors.ConfigError, match=flag):
    registry.AGGREGATORS.resolve_options(name, {flag: value}.get)
  with pytest.raises(errors.ConfigError, match=f"{name}_reg_eps"):
    registry.AGGREGATORS.resolve_options(name,
                                         {f"{name}_reg_eps": 0.0}.get)


def _degenerate_jacobians():
  rng = np.random.default_rng(9)
  base = rng.normal(size=(4, 6))
  return {
      "all_zero": np.zeros((3, 6)),
      "zero_row": np.stack([base[0], np.zeros(6), base[1]]),
      "duplicated": np.stack([base[0], base[0], base[1]]),
      "opposite": np.stack([base[0], -base[0]]),
      "opposite_scaled": np.stack([base[0], -3.0 * base[0], base[1]]),
      "rank_deficient": np.stack([base[0], base[1], base[0] + base[1]]),
      "more_tasks_than_parameters": rng.normal(size=(5, 2)),
      "scales_1e-6_to_1e6": base[:3] * np.array([[1e-6], [1.0], [1e6]]),
      "all_tiny": base * 1e-6,
      "all_huge": base * 1e6,
  }


# Cases where a positive combination of the gradients vanishes: there the
# system has no solution and only its regularisation does.
_NO_SOLUTION = ("opposite", "opposite_scaled", "more_tasks_than_parameters")


@pytest.mark.parametrize("case", sorted(_degenerate_jacobians()))
@pytest.mark.parametrize("name", METHODS)
def test_degenerate_inputs_give_finite_non_conflicting_updates(name, case):
  jacobian = _degenerate_jacobians()[case].astype(np.float32)
  coefficients = _coefficients(name, jacobian)
  assert np.all(np.isfinite(coefficients)) and np.all(coefficients >= 0)
  update = _update(name, jacobian).astype(np.float64)
  assert np.all(np.isfinite(update))
  norms = np.linalg.norm(jacobian.astype(np.float64), axis=1)
  if name == "nash_mtl":
    assert np.linalg.norm(update) <= 1.0 + 1e-5
  if case == "all_zero":
    assert not update.any() and not coefficients.any()
  if case in _NO_SOLUTION:
    return
  # Every task gains: g_i . d > 0 (= w_i^-p), relative to |g_i| |d|.
  gains = jacobian.astype(np.float64) @ update
  live = norms > 1e-8 * norms.max()
  assert np.all(gains[live] > 1e-6 * norms[live] * np.linalg.norm(update))
  assert np.all(coefficients[~live] == 0.0)


def test_without_a_solution_the_update_stays_bounded():
  g = np.array([1.0, 2.0, -0.5, 0.25])
  for jacobian in (np.stack([g, -g]), np.stack([g, -3.0 * g]),
                   np.stack([g, -g, 0.5 * g])):
    jacobian = jacobian.astype(np.float32)
    # FairGrad (alpha = 1): (C + reg I) y = 1/y gives
    # |sum_i y_i u_i|^2 <= T, and d = sum_i y_i u_i.
    update = _update("fairgrad", jacobian)
    assert np.linalg.norm(update) <= np.sqrt(len(jacobian)) * 1.01
    assert np.all(np.isfinite(_update("nash_mtl", jacobian)))


@pytest.mark.parametrize("name", METHODS)
def test_task_order_does_not_matter(name):
  rng = np.random.default_rng(21)
  jacobian = _random_jacobian(rng, 5, spread=1.0)
  update = _update(name, jacobian)
  coefficients = _coefficients(name, jacobian)
  for permutation in ([4, 2, 0, 1, 3], [1, 2, 3, 4, 0]):
    np.testing.assert_allclose(_update(name, jacobian[permutation]), update,
                               rtol=1e-4, atol=1e-6 * np.abs(update).max())
    np.testing.assert_allclose(
        _coefficients(name, jacobian[permutation]),
        coefficients[permutation], rtol=1e-5)


def test_scaling():
  rng = np.random.default_rng(22)
  jacobian = _random_jacobian(rng, 4, spread=1.0)
  nash = _update("nash_mtl", jacobian, max_norm=0.0)
  for factor in (1e-3, 7.0, 1e3):
    scaled = jacobian * np.float32(factor)
    # Nash-MTL without clipping is linear (G / |G|_F does not scale).
    np.testing.assert_allclose(_update("nash_mtl", scaled, max_norm=0.0),
                               nash * factor, rtol=1e-4)
    # FairGrad: d -> c^((1 - alpha) / (1 + alpha)) d.
    for alpha in (0.5, 1.0, 2.0):
      want = _update("fairgrad", jacobian, alpha=alpha) * factor**(
          (1.0 - alpha) / (1.0 + alpha))
      np.testing.assert_allclose(_update("fairgrad", scaled, alpha=alpha),
                                 want, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_gram_form(name):
  assert name in registry.gram_forms()
  rng = np.random.default_rng(5)
  jacobian = _random_jacobian(rng, 3, spread=1.0)
  np.testing.assert_allclose(
      _update(name, jacobian),
      _coefficients(name, jacobian) @ jacobian.astype(np.float64),
      rtol=1e-5, atol=1e-6)


def test_module_functions():
  gram = tf.constant(_gram(J_BASE))
  np.testing.assert_allclose(
      nash_mtl.nash_mtl_weights(gram).numpy(),
      reference_solve(_gram(J_BASE) / np.linalg.norm(_gram(J_BASE)), 1.0),
      rtol=1e-6)
  np.testing.assert_allclose(
      fairgrad.fairgrad_weights(gram, 2.0).numpy(),
      reference_solve(_gram(J_BASE), 0.5), rtol=1e-6)
  coefficients = tf.constant([3.0, 1.0])
  clipped = bargaining.clip_to_norm(coefficients, gram, 0.5).numpy()
  assert np.linalg.norm(clipped @ J_BASE) == pytest.approx(0.5, rel=1e-6)
  assert bargaining.clip_to_norm(coefficients, gram, 0.0) is coefficients
