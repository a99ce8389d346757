"""Gradient Vaccine (`--aggregator=gradvac`): a NumPy reference of LibMTL's
loop over a sequence of steps with its state, PCGrad as its first step, the
target cosine it reaches, degenerate inputs and the state's guard."""

from typing import Optional

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods.aggregators import gradvac


def orders(num_tasks: int, seed: int, step: int) -> list[np.ndarray]:
  """Task i's order of the others: PCGrad's draw from (seed, step)."""
  return [tf.random.experimental.stateless_shuffle(
      tf.constant([j for j in range(num_tasks) if j != i], tf.int32),
      seed=tf.constant([seed, step * num_tasks + i], tf.int64)).numpy()
          for i in range(num_tasks)]


def reference(grads: np.ndarray, rho: np.ndarray, task_orders, beta: float,
              corrections: Optional[list] = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """LibMTL's GradVac.backward (group_type 0) in float64, with the module's
  guards: cosines clipped, 0 for a zero norm, targets capped at 1 - 1e-6.

  Args:
    grads: [T, P] gradients.
    rho: [T, T] targets before the step.
    task_orders: Each task's order of the others.
    beta: The targets' moving-average weight.
    corrections: If given, gets the target of every correction made.

  Returns:
    (update, targets after the step).
  """
  grads = grads.astype(np.float64)
  rho = rho.astype(np.float64)
  modified = grads.copy()
  new_rho = rho.copy()
  norms = np.linalg.norm(grads, axis=1)
  for i, order in enumerate(task_orders):
    for j in order:
      denominator = np.linalg.norm(modified[i]) * norms[j]
      cosine = (0.0 if denominator == 0 else
                np.clip(modified[i] @ grads[j] / denominator, -1.0, 1.0))
      target = np.clip(rho[i, j], -1.0, 1.0 - 1e-6)
      if cosine < target and norms[j] > 0:
        w = (np.linalg.norm(modified[i]) *
             (target * np.sqrt(1 - cosine**2) -
              cosine * np.sqrt(1 - target**2)) /
             (norms[j] * np.sqrt(1 - target**2)))
        modified[i] += w * grads[j]
        if corrections is not None:
          corrections.append(target)
      new_rho[i, j] = (1 - beta) * rho[i, j] + beta * cosine
  return modified.sum(axis=0), new_rho


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("beta", [0.01, 0.5])
def test_a_sequence_of_steps_matches_the_reference(num_tasks, beta):
  rng = np.random.default_rng(num_tasks)
  # A common part that fades: targets grow, then corrections occur both on
  # conflicts and on positive cosines below the targets.
  common = rng.normal(size=(1, 8))
  rho = np.zeros((num_tasks, num_tasks))
  state = None
  corrections = []
  for step in range(5):
    grads = rng.normal(size=(num_tasks, 8)) + max(1.5 - 0.5 * step, 0) * common
    grads *= 10.0**rng.uniform(-2, 2, size=(num_tasks, 1))
    grads = grads.astype(np.float32)
    want, rho_next = reference(grads, rho, orders(num_tasks, 3, step), beta,
                               corrections)
    got, state = mtl_dist.aggregate("gradvac", grads, step=step, seed=3,
                                    state=state, beta=beta)
    np.testing.assert_allclose(got, want, rtol=2e-4,
                               atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(state["rho"], rho_next, atol=2e-6)
    rho = state["rho"].astype(np.float64)
  assert len(corrections) >= 2  # The test exercises the corrections,
  if beta == 0.5:  # also towards positive targets (beyond PCGrad).
    assert max(corrections) > 0.1
  assert (np.diag(rho) == 0).all()


@pytest.mark.parametrize("num_tasks", [2, 3, 4])
def test_first_step_from_zero_targets_is_pcgrad(num_tasks):
  # With rho = 0 the test is cos < 0 and w = -g'_i.g_j / |g_j|^2: PCGrad's
  # projection, in the same random orders.
  rng = np.random.default_rng(10 + num_tasks)
  for step in range(3):
    grads = rng.normal(size=(num_tasks, 12)).astype(np.float32)
    got, _ = mtl_dist.aggregate("gradvac", grads, step=step, seed=1)
    want = mtl_dist.aggregate("pcgrad", grads, step=step, seed=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_corrected_gradient_reaches_the_target_cosine():
  # Two tasks (one order each): g'_i = g_i + w g_j has cos(g'_i, g_j) = rho.
  g = np.array([[1.0, 0.2, 0.0, 0.3], [0.1, 1.0, -0.4, 0.0]], np.float32)
  state = {"rho": np.array([[0.0, 0.7], [0.4, 0.0]], np.float32)}
  got, after = mtl_dist.aggregate("gradvac", g, state=state, beta=0.25)
  g64 = g.astype(np.float64)
  cosine = g64[0] @ g64[1] / np.prod(np.linalg.norm(g64, axis=1))
  assert cosine < 0.4
  # Solve for w directly: cos(g_i + w g_j, g_j) = target.
  corrected = []
  for i, j, target in ((0, 1, 0.7), (1, 0, 0.4)):
    ws = np.linspace(0, 5, 500001)
    vecs = g64[i][None] + ws[:, None] * g64[j][None]
    cosines = vecs @ g64[j] / (np.linalg.norm(vecs, axis=1) *
                               np.linalg.norm(g64[j]))
    w = ws[np.argmin(np.abs(cosines - target))]
    corrected.append(g64[i] + w * g64[j])
  np.testing.assert_allclose(got, np.sum(corrected, axis=0), rtol=1e-4)
  np.testing.assert_allclose(
      after["rho"], [[0.0, 0.75 * 0.7 + 0.25 * cosine],
                     [0.75 * 0.4 + 0.25 * cosine, 0.0]], rtol=1e-6)


def test_every_pair_moves_its_target_every_step():
  # No conflict and targets below the cosines: no correction, yet every
  # target still moves (LibMTL once updated them on corrections only).
  g = np.array([[1.0, 0.1, 0.0], [0.9, 0.2, 0.1], [1.0, 0.0, 0.2]],
               np.float32)
  got, state = mtl_dist.aggregate("gradvac", g, beta=0.5)
  np.testing.assert_allclose(got, g.sum(axis=0), rtol=1e-6)
  off = ~np.eye(3, dtype=bool)
  units = g / np.linalg.norm(g, axis=1, keepdims=True)
  np.testing.assert_allclose(state["rho"][off], 0.5 * (units @ units.T)[off],
                             rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-5, 1e5])
def test_linear_in_scale_with_the_same_state(scale):
  rng = np.random.default_rng(4)
  grads = rng.normal(size=(4, 16)).astype(np.float32)
  state = {"rho": rng.uniform(-0.3, 0.6, size=(4, 4)).astype(np.float32)}
  base_update, base_state = mtl_dist.aggregate("gradvac", grads, step=2,
                                               state=state, beta=0.5)
  scaled, scaled_state = mtl_dist.aggregate(
      "gradvac", grads * np.float32(scale), step=2, state=state, beta=0.5)
  np.testing.assert_allclose(scaled, scale * base_update.numpy(), rtol=1e-4,
                             atol=1e-6 * scale * np.abs(base_update).max())
  np.testing.assert_allclose(scaled_state["rho"], base_state["rho"],
                             atol=1e-6)


def _degenerate_matrices() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(8)
  g = rng.normal(size=6)
  h = rng.normal(size=6)
  return {
      "zeros": np.zeros((3, 6)),
      "zero_row": np.stack([g, np.zeros(6), h]),
      "duplicated": np.stack([g, g, h]),
      "opposite": np.stack([g, -g]),
      "all_equal": np.stack([g, g, g]),
      "rank_one": np.stack([g, 2 * g, -0.5 * g]),
      "wide_norms": np.stack([1e-6 * g, 1e6 * h, g]),
      "single": g[None],
  }


@pytest.mark.parametrize("case", sorted(_degenerate_matrices()))
def test_degenerate_inputs_stay_finite_over_many_steps(case):
  matrix = _degenerate_matrices()[case].astype(np.float32)
  state = None
  for step in range(12):  # Targets approach 1 for duplicated tasks.
    update, state = mtl_dist.aggregate("gradvac", matrix, step=step,
                                       state=state, beta=0.5)
    update = update.numpy()
    assert np.isfinite(update).all(), (case, step)
    assert np.isfinite(state["rho"]).all()
    assert np.abs(state["rho"]).max() <= 1.0
    # Corrections stay within the cap's bound: |w g_j| <= ~700 |g'_i|.
    assert np.abs(update).max() <= 1e4 * max(np.abs(matrix).max(), 1e-30)
  if case == "zeros":
    np.testing.assert_array_equal(update, np.zeros(6))
  if case == "zero_row":  # The zero task neither moves nor is moved.
    others = matrix[[0, 2]]
    state = None
    for step in range(12):
      want, state = mtl_dist.aggregate("gradvac", others, step=step,
                                       state=state, beta=0.5)
    np.testing.assert_allclose(update, want, rtol=1e-5)
  if case == "all_equal":  # Aligned tasks: nothing to vaccinate.
    np.testing.assert_allclose(update, matrix.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(state["rho"][~np.eye(3, dtype=bool)],
                               1 - 0.5**12, rtol=1e-5)


def test_non_finite_input_leaves_the_targets_unchanged():
  rng = np.random.default_rng(2)
  grads = rng.normal(size=(3, 5)).astype(np.float32)
  _, state = mtl_dist.aggregate("gradvac", grads, beta=0.5)
  for bad in (np.nan, np.inf):
    broken = grads.copy()
    broken[1, 2] = bad
    _, after = mtl_dist.aggregate("gradvac", broken, step=1, state=state,
                                  beta=0.5)
    np.testing.assert_array_equal(after["rho"], state["rho"])


def test_options_and_contract():
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.aggregate("gradvac", np.ones((2, 3), np.float32), bogus=1)
  with pytest.raises(mtl_dist.ConfigError, match="--gradvac_beta=1.5"):
    mtl_dist.aggregate("gradvac", np.ones((2, 3), np.float32), beta=1.5)
  aggregator = gradvac.GradVac(3)
  assert not aggregator.has_gram_form and not aggregator.needs_losses
  assert [o.default for o in gradvac.GradVac.options] == [0.01]
