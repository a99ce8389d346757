"""Every registered aggregator on degenerate and badly scaled inputs.

Each aggregator's update is finite on every input below: all-zero,
rank-deficient, duplicated, near-duplicate and exactly opposite gradients,
a zero row, and gradients whose norms span 1e-6 to 1e6. The properties an
aggregator declares in `promises` (`base.ORDER_INVARIANT`,
`base.NON_CONFLICTING`, `base.HOMOGENEOUS`) are checked on the same inputs;
each method's own test file checks its values. A method that needs the
losses gets positive ones; a method that works on K sub-batches gets its
[K*T, P] matrix with the same gradients in each sub-batch.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from mtl_dist.methods import aggregators
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base

NAMES = [name for name in registry.AGGREGATORS.names()
         if not name.startswith("test_")]


def _inputs() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(2026)
  random = rng.normal(size=(3, 5))
  scattered = rng.normal(size=(4, 6)) * np.array([1e-6, 1e-2, 1e2, 1e6])[
      :, None]
  near = random.copy()
  near[1] = near[0] + 1e-4 * rng.normal(size=5)
  return {
      "random": random,
      "all_zero": np.zeros((3, 5)),
      "zero_row": np.concatenate([random[:2], np.zeros((1, 5))]),
      "duplicated": random[[0, 0, 1]],
      "near_duplicate": near,
      "opposite": np.stack([random[0], -random[0], random[1]]),
      "rank_deficient": np.outer([1.0, -2.0, 0.5], random[0]) + np.outer(
          [0.3, 0.1, -1.0], random[1]),
      "more_tasks_than_dimensions": rng.normal(size=(5, 2)),
      "norms_1e-6_to_1e6": scattered,
      "tiny": random * 1e-6,
      "huge": random * 1e6,
  }


INPUTS = _inputs()


def _update(name: str, jacobian: np.ndarray, order=None) -> np.ndarray:
  """The aggregator's first update (a fresh state) for a [T, P] Jacobian,
  its rows (and the losses, for a method that needs them) in `order`."""
  num_tasks = len(jacobian)
  order = list(order or range(num_tasks))
  aggregator = aggregators.create(name, num_tasks, seed=5)
  matrix = np.tile(jacobian[order],
                   (getattr(aggregator, "sub_batches", 1), 1))
  losses = (tf.constant(np.linspace(0.5, 2.0, num_tasks)[order], tf.float32)
            if aggregator.needs_losses else None)
  return aggregator(tf.constant(matrix, tf.float32),
                    tf.constant(0, tf.int64), losses).numpy()


def _promises(name: str) -> frozenset:
  return registry.AGGREGATORS.get(name).promises


@pytest.mark.parametrize("case", sorted(INPUTS))
@pytest.mark.parametrize("name", NAMES)
def test_the_update_is_finite(name, case):
  update = _update(name, INPUTS[case])
  assert update.shape == (INPUTS[case].shape[1],)
  assert np.isfinite(update).all(), update
  if case == "all_zero":
    np.testing.assert_array_equal(update, 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_gradient_does_not_stop_the_aggregator(name, bad):
  """An overflow gives a non-finite update, which the step then skips, not
  an error (TensorFlow's eigh raises on such a matrix)."""
  jacobian = INPUTS["random"].copy()
  jacobian[1, 2] = bad
  update = _update(name, jacobian)
  assert update.shape == (jacobian.shape[1],)
  assert not np.isfinite(update).all()


def _check_order_invariant(name, jacobian):
  want = _update(name, jacobian)
  atol = 1e-4 * np.abs(want).max() + 1e-6 * np.abs(jacobian).max() + 1e-30
  for order in itertools.islice(itertools.permutations(range(len(jacobian))),
                                1, 4):
    np.testing.assert_allclose(_update(name, jacobian, order), want,
                               atol=atol, rtol=1e-4)


def _check_non_conflicting(name, jacobian):
  """g_i . d >= 0 for every task, up to rounding and any regularisation.

  Rounding: the solvers' answer is exact to float32 rounding of the Gram
  matrix, ~1e-6 |g|max where the exact update is 0 (0 in the tasks' hull).
  Regularisation: UPGrad and DualProj solve with G / trace(G) + reg_eps I,
  which allows g_i . d >= -reg_eps trace(G) |a_i|, a the coefficients of
  d = sum_i a_i g_i (Quinton & Rey 2024's KKT conditions).
  """
  jacobian = jacobian.astype(np.float32).astype(np.float64)
  update = _update(name, jacobian).astype(np.float64)
  norms = np.linalg.norm(jacobian, axis=1)
  tolerance = norms * (1e-4 * np.linalg.norm(update) + 1e-6 * norms.max())
  aggregator = aggregators.create(name, len(jacobian))
  reg_eps = getattr(aggregator, "reg_eps", 0.0)
  if reg_eps:
    gram = jacobian @ jacobian.T
    coefficients = aggregator.gram_coefficients(
        tf.constant(gram, tf.float32), 0).numpy()
    tolerance += 1.01 * reg_eps * np.trace(gram) * np.abs(coefficients)
  assert (jacobian @ update >= -tolerance).all(), (jacobian @ update,
                                                   tolerance)


def _check_homogeneous(name, jacobian):
  """A(c J) = c A(J) for c > 0, to solver precision on ill-conditioned
  inputs (1e-3) and float32 rounding where the update is 0 (1e-6 |g|max)."""
  want = _update(name, jacobian).astype(np.float64)
  atol = 1e-3 * np.abs(want).max() + 1e-6 * np.abs(jacobian).max() + 1e-30
  for factor in (1e-3, 7.0, 1e3):
    got = _update(name, jacobian * factor) / factor
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)


_CHECKS = {base.ORDER_INVARIANT: _check_order_invariant,
           base.NON_CONFLICTING: _check_non_conflicting,
           base.HOMOGENEOUS: _check_homogeneous}
_PROMISED = [(name, promise) for name in NAMES for promise in sorted(_CHECKS)
             if promise in _promises(name)]


@pytest.mark.parametrize("case", sorted(INPUTS))
@pytest.mark.parametrize("name, promise", _PROMISED,
                         ids=[f"{n}-{p}" for n, p in _PROMISED])
def test_promised_properties_hold(name, promise, case):
  _CHECKS[promise](name, INPUTS[case])


def test_every_promise_is_one_the_tests_check():
  for name in NAMES:
    assert _promises(name) <= set(_CHECKS), name


def test_the_checks_catch_a_broken_property():
  """The checks fail on the methods that do not promise a property."""
  conflicting = np.array([[1.0, 0.0], [-2.0, 0.1]])
  with pytest.raises(AssertionError):
    _check_non_conflicting("sum", conflicting)
  # PCGrad's random order changes its update for three tasks.
  rng = np.random.default_rng(0)
  with pytest.raises(AssertionError):
    for _ in range(5):
      _check_order_invariant("pcgrad", rng.normal(size=(3, 4)))
