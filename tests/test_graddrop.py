"""GradDrop (`--aggregator=graddrop`): against a NumPy reference of the
paper's masking given the draws, TorchJD's published value, the law of its
draws over many steps, their determinism in (seed, step), its properties
and degenerate inputs."""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import aggregators
from mtl_dist.methods.aggregators import graddrop


def reference_update(jacobian: np.ndarray, draws: np.ndarray,
                     leak: float = 0.0) -> np.ndarray:
  """GradDrop (Chen et al. 2020, Algorithm 1, lines 10-15; TorchJD's
  `GradDrop.forward` with f = identity) in float64, given the draws U:
  P = (1 + sum_i g_i / sum_i |g_i|) / 2 per coordinate; where U < P each
  task keeps its positive components, elsewhere its negative ones; dropped
  ones pass at the rate `leak`."""
  jacobian = np.asarray(jacobian, np.float64)
  total = np.abs(jacobian).sum(axis=0)
  purity = 0.5 * (1 + np.divide(jacobian.sum(axis=0), total,
                                out=np.zeros_like(total), where=total > 0))
  update = np.zeros(jacobian.shape[1])
  for row in jacobian:
    kept = np.where(draws < purity, row > 0, row < 0)
    update += (leak + (1 - leak) * kept) * row
  return update


def _draws(size: int, step: int, seed: int = 0) -> np.ndarray:
  """The U of step `step`: uniform [0, 1) from the stateless seed
  (seed, step), as `Aggregator.step_seed` makes it."""
  return tf.random.stateless_uniform(
      [size], seed=tf.constant([seed, step], tf.int64)).numpy()


def _update(jacobian, step=0, seed=0, **options) -> np.ndarray:
  return mtl_dist.aggregate("graddrop", np.asarray(jacobian, np.float32),
                            step=step, seed=seed, **options).numpy()


def test_torchjd_published_value():
  # tests/unit/aggregation/test_values.py at commit 46962c2b (torchjd
  # 0.8.1): GradDrop() on J_base = [[-4, 1, 1], [6, 1, 1]] ->
  # [6.0, 2.0, 2.0], atol 1e-4. Coordinates 1 and 2 have P = 1: both tasks
  # keep them whatever the draw (2 = 1 + 1). Coordinate 0 has P = 0.6: 6 if
  # U_0 < 0.6, else -4. TorchJD's tests seed torch.manual_seed(0)
  # (tests/conftest.py), whose first torch.rand draw is 0.4963 < 0.6.
  j_base = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)
  outcomes = []
  for step in range(40):
    got = _update(j_base, step=step)
    first = _draws(3, step)[0]
    np.testing.assert_array_equal(got,
                                  [6.0 if first < 0.6 else -4.0, 2.0, 2.0])
    outcomes.append(got[0])
  assert {6.0, -4.0} == set(outcomes)
  # Step 0 of seed 0 draws U_0 < 0.6, as TorchJD's seed does.
  np.testing.assert_array_equal(_update(j_base, step=0), [6.0, 2.0, 2.0])


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("leak", [0.0, 0.3, 1.0])
def test_matches_the_reference_over_steps(num_tasks, leak):
  rng = np.random.default_rng(num_tasks)
  for step in range(4):
    jacobian = (rng.normal(size=(num_tasks, 50)) *
                10.0**rng.uniform(-3, 3, size=(num_tasks, 1))).astype(
                    np.float32)
    got = _update(jacobian, step=step, seed=17, leak=leak)
    want = reference_update(jacobian, _draws(50, step, seed=17), leak)
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * np.abs(jacobian).max())


def test_the_positive_side_is_kept_with_probability_purity():
  # Coordinates with purity P = a / (a + b) for g = (a, -b); 100 copies of
  # each, 40 steps: 4000 draws per P. The share that keeps the positive
  # component must be P within 4 standard deviations (seeded: exact).
  purities = np.array([0.05, 0.25, 0.5, 0.6, 0.9])
  copies, steps = 100, 40
  positive = np.tile(purities, copies)
  jacobian = tf.constant(np.stack([positive, -(1 - positive)]), tf.float32)
  kept_positive = np.zeros(len(purities))
  for step in range(steps):
    update = graddrop.graddrop(jacobian, tf.constant([3, step], tf.int64))
    kept = update.numpy() > 0  # Either a or -b survives, never both.
    np.testing.assert_allclose(
        np.abs(update.numpy()),
        np.where(kept, positive, 1 - positive), rtol=1e-6)
    kept_positive += kept.reshape(copies, len(purities)).sum(axis=0)
  share = kept_positive / (copies * steps)
  deviation = np.sqrt(purities * (1 - purities) / (copies * steps))
  assert np.all(np.abs(share - purities) <= 4 * deviation), share


def test_the_same_seed_and_step_draw_the_same():
  rng = np.random.default_rng(2)
  jacobian = rng.normal(size=(3, 200)).astype(np.float32)
  first = _update(jacobian, step=5, seed=1)
  np.testing.assert_array_equal(_update(jacobian, step=5, seed=1), first)
  # In a tf.function (as in the step) too.
  aggregator = aggregators.create("graddrop", 3, seed=1)
  traced = tf.function(aggregator)(tf.constant(jacobian),
                                   tf.constant(5, tf.int64))
  np.testing.assert_array_equal(traced.numpy(), first)
  assert not np.array_equal(_update(jacobian, step=6, seed=1), first)
  assert not np.array_equal(_update(jacobian, step=5, seed=2), first)


def test_agreeing_signs_are_kept_whole():
  # Where every task has the same sign, P is 0 or 1: the sum, every step.
  rng = np.random.default_rng(3)
  magnitudes = np.abs(rng.normal(size=(3, 20)))
  signs = np.where(rng.uniform(size=20) < 0.5, -1.0, 1.0)
  jacobian = (magnitudes * signs).astype(np.float32)
  for step in range(10):
    np.testing.assert_allclose(_update(jacobian, step=step),
                               jacobian.sum(axis=0), rtol=1e-6)


def test_a_leak_of_one_is_the_sum_and_a_leak_above_one_is_refused():
  rng = np.random.default_rng(4)
  jacobian = rng.normal(size=(4, 30)).astype(np.float32)
  np.testing.assert_allclose(_update(jacobian, step=3, leak=1.0),
                             jacobian.sum(axis=0), rtol=1e-5, atol=1e-6)
  for bad in (1.5, -0.1):
    with pytest.raises(ValueError, match="graddrop_leak"):
      aggregators.create("graddrop", 4, leak=bad)


def test_task_order_does_not_matter_and_positive_scale_is_linear():
  # P and the draws do not depend on the order of the tasks, nor on a
  # positive factor: the same coordinates are kept.
  rng = np.random.default_rng(7)
  jacobian = rng.normal(size=(4, 40)).astype(np.float32)
  update = _update(jacobian, step=2)
  for permutation in ([3, 1, 0, 2], [1, 2, 3, 0]):
    np.testing.assert_allclose(_update(jacobian[permutation], step=2),
                               update, rtol=1e-6, atol=1e-6)
  for factor in (1e-3, 7.0, 1e3):
    np.testing.assert_allclose(_update(jacobian * factor, step=2),
                               update * factor, rtol=1e-5,
                               atol=1e-6 * factor)


def _degenerate_jacobians():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(4, 6))
  return {
      "zero": np.zeros((3, 6)),
      "one_zero_task": np.concatenate([base[:2], np.zeros((1, 6))]),
      "duplicated": np.stack([base[0], base[0], base[1]]),
      "opposite": np.stack([base[0], -base[0]]),
      "rank_deficient": np.stack([base[0], base[1], base[0] + base[1]]),
      "scales_1e-6_to_1e6": base[:3] * np.array([[1e-6], [1.0], [1e6]]),
      "all_tiny": base * 1e-6,
      "all_huge": base * 1e6,
  }


@pytest.mark.parametrize("case", sorted(_degenerate_jacobians()))
def test_degenerate_inputs_are_finite_and_match_the_reference(case):
  jacobian = _degenerate_jacobians()[case].astype(np.float32)
  for step in range(3):
    got = _update(jacobian, step=step)
    assert np.all(np.isfinite(got))
    want = reference_update(jacobian, _draws(6, step))
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * max(np.abs(jacobian).max(), 1e-30))
  if case == "opposite":  # P = 1/2: one of the two, whole, per coordinate.
    assert np.all((got == jacobian[0]) | (got == jacobian[1]))


def test_no_gram_form_no_state_and_no_unknown_option():
  aggregator = aggregators.create("graddrop", 2)
  assert not aggregator.has_gram_form
  assert not aggregator.variables
  with pytest.raises(NotImplementedError, match="no Gram-matrix form"):
    aggregator.gram_coefficients(tf.eye(2), 0)
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.aggregate("graddrop", np.eye(2, dtype=np.float32), bogus=1)
