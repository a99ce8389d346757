"""MoCo (`--aggregator=moco`): a NumPy reference of LibMTL's MoCo.backward
over a sequence of steps with its state, closed forms, degenerate inputs and
the state's guard (a skipped step moves neither y, lambda nor k)."""

import numpy as np
import pytest

import mtl_dist
from mtl_dist.methods.aggregators import moco

DEFAULTS = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0)


def reference(grads, losses, y, lam, k, beta=0.5, beta_sigma=0.5, gamma=0.1,
              gamma_sigma=0.5, rho=0.0):
  """LibMTL's MoCo.backward (LibMTL/weighting/MoCo.py) in float64, k the
  1-based step.

  Returns:
    (update, y, lambda) after the step.
  """
  grads = grads.astype(np.float64)
  losses = np.asarray(losses, np.float64)
  h = grads / (np.linalg.norm(grads, axis=1, keepdims=True) + 1e-8)
  h *= losses[:, None]
  y = y - beta / k**beta_sigma * (y - h)
  z = lam - gamma / k**gamma_sigma * (y @ y.T + rho * np.eye(len(lam))) @ lam
  lam = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  return y.T @ lam, y, lam


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
@pytest.mark.parametrize("options", [
    {}, dict(beta=0.9, beta_sigma=0.3, gamma=2.0, gamma_sigma=0.2, rho=0.5)])
def test_a_sequence_of_steps_matches_the_reference(num_tasks, options):
  rng = np.random.default_rng(num_tasks)
  hyper = dict(DEFAULTS, **options)
  y = np.zeros((num_tasks, 30))
  lam = np.full(num_tasks, 1.0 / num_tasks)
  state = None
  for step in range(5):
    grads = (rng.normal(size=(num_tasks, 30)) *
             10.0**rng.uniform(-2, 2, size=(num_tasks, 1))).astype(np.float32)
    losses = rng.uniform(0.1, 3.0, size=num_tasks).astype(np.float32)
    want, y, lam = reference(grads, losses, y, lam, step + 1, **hyper)
    got, state = mtl_dist.aggregate("moco", grads, step=step, state=state,
                                    losses=losses, **options)
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(state["y"], y, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state["lambd"], lam, rtol=1e-4)
    assert state["steps"] == step + 1
  assert not np.allclose(lam, 1.0 / num_tasks)  # The weights moved.


def test_closed_forms():
  g = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
  losses = np.array([2.0, 0.5], np.float32)
  h = np.array([[1.2, 1.6, 0.0], [0.0, 0.0, 0.5]])  # g/|g| * L.
  # beta 1, no decay: y = h; gamma 0: lambda stays 1/T; the update is mean h.
  got, state = mtl_dist.aggregate("moco", g, losses=losses, beta=1.0,
                                  beta_sigma=0.0, gamma=0.0)
  np.testing.assert_allclose(got, h.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(state["y"], h, rtol=1e-6)
  # First step with defaults: y = h / 2; orthogonal rows, so y y^T is
  # diag(|y_i|^2) = diag(1, 1/16) and lambda = softmax(1/2 - 0.1 * that / 2).
  got, state = mtl_dist.aggregate("moco", g, losses=losses)
  z = 0.5 - 0.05 * np.array([1.0, 1.0 / 16])
  lam = np.exp(z) / np.exp(z).sum()
  np.testing.assert_allclose(state["lambd"], lam, rtol=1e-6)
  np.testing.assert_allclose(got, (h / 2).T @ lam, rtol=1e-6)
  # The second step's sizes decay as 1/sqrt(2): y = h/2 - (0.5/sqrt 2)(h/2 - h)
  # = h (1/2 + 1/(4 sqrt 2)).
  _, state = mtl_dist.aggregate("moco", g, losses=losses, state=state)
  np.testing.assert_allclose(state["y"], h * (0.5 + 0.25 / np.sqrt(2)),
                             rtol=1e-6)


def test_task_order_does_not_matter():
  rng = np.random.default_rng(3)
  grads = rng.normal(size=(4, 10)).astype(np.float32)
  losses = rng.uniform(0.5, 2, size=4).astype(np.float32)
  perm = np.array([2, 0, 3, 1])
  state = state_p = None
  for step in range(3):
    got, state = mtl_dist.aggregate("moco", grads * (step + 1), step=step,
                                    state=state, losses=losses)
    permuted, state_p = mtl_dist.aggregate(
        "moco", grads[perm] * (step + 1), step=step, state=state_p,
        losses=losses[perm])
    np.testing.assert_allclose(permuted, got, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state_p["lambd"], state["lambd"][perm],
                             rtol=1e-5)


def _degenerate_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  rng = np.random.default_rng(8)
  g, h = rng.normal(size=(2, 6))
  ones = np.ones(3)
  return {
      "zeros": (np.zeros((3, 6)), ones),
      "zero_row": (np.stack([g, np.zeros(6), h]), ones),
      "duplicated": (np.stack([g, g, h]), ones),
      "opposite": (np.stack([g, -g]), np.ones(2)),
      "rank_one": (np.stack([g, 2 * g, -0.5 * g]), ones),
      "wide_norms": (np.stack([1e-6 * g, 1e6 * h, g]), ones),
      "zero_losses": (np.stack([g, h, g + h]), np.zeros(3)),
      "wide_losses": (np.stack([g, h, g + h]), np.array([1e-6, 1e6, 1.0])),
      "single": (g[None], np.ones(1)),
  }


@pytest.mark.parametrize("case", sorted(_degenerate_cases()))
def test_degenerate_inputs_stay_finite_and_match_the_reference(case):
  grads, losses = (a.astype(np.float32) for a in _degenerate_cases()[case])
  num_tasks = len(grads)
  y = np.zeros(grads.shape)
  lam = np.full(num_tasks, 1.0 / num_tasks)
  state = None
  for step in range(4):
    got, state = mtl_dist.aggregate("moco", grads, step=step, state=state,
                                    losses=losses)
    want, y, lam = reference(grads, losses, y, lam, step + 1)
    assert np.isfinite(got).all() and np.isfinite(state["y"]).all()
    assert np.isfinite(state["lambd"]).all()
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * max(np.abs(want).max(), 1e-30))


def test_non_finite_input_moves_no_state():
  rng = np.random.default_rng(2)
  grads = rng.normal(size=(3, 5)).astype(np.float32)
  losses = np.array([1.0, 2.0, 0.5], np.float32)
  _, state = mtl_dist.aggregate("moco", grads, losses=losses)
  broken_grads = grads.copy()
  broken_grads[1, 2] = np.nan
  for bad_grads, bad_losses in ((broken_grads, losses),
                                (grads, np.array([1.0, np.inf, 0.5],
                                                 np.float32))):
    _, after = mtl_dist.aggregate("moco", bad_grads, step=1, state=state,
                                  losses=bad_losses)
    for key in ("y", "lambd", "steps"):
      np.testing.assert_array_equal(after[key], state[key])
  # A non-finite first step leaves the fresh state (y still empty).
  _, fresh = mtl_dist.aggregate("moco", broken_grads, losses=losses)
  assert fresh["y"].shape == (3, 0) and fresh["steps"] == 0
  np.testing.assert_allclose(fresh["lambd"], 1 / 3)


def test_options_and_contract():
  grads = np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.aggregate("moco", grads, losses=[1.0, 1.0], bogus=1)
  with pytest.raises(ValueError, match="needs losses"):
    mtl_dist.aggregate("moco", grads)
  assert moco.MoCo.needs_losses and not moco.MoCo.has_gram_form
  assert {o.name: o.default for o in moco.MoCo.options} == DEFAULTS
