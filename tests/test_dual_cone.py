"""UPGrad and DualProj (`--aggregator=upgrad|dualproj`): TorchJD's published
values, exact solutions of their quadratic programs found another way, their
promised properties on degenerate and badly scaled inputs, and the launcher.
Training on 1, 2 and 4 replicas and on 2 workers, with and without
--rep_grad, is checked with every method's in
tests/test_method_distribution.py."""

import itertools
import json
import os
import subprocess
import sys

from conftest import time_limit
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import aggregators
from mtl_dist.methods.aggregators import dual_cone

METHODS = ("upgrad", "dualproj")
# TorchJD's fixed outputs on J_base = [[-4, 1, 1], [6, 1, 1]]:
# tests/unit/aggregation/test_values.py at commit 46962c2b (torchjd 0.8.1),
# AGGREGATOR_PARAMETRIZATIONS and WEIGHTING_PARAMETRIZATIONS, atol 1e-4.
TORCHJD_UPDATES = {"upgrad": [0.2929, 1.9004, 1.9004],
                   "dualproj": [0.5563, 1.1109, 1.1109]}
TORCHJD_WEIGHTS = {"upgrad": [1.1109, 0.7894], "dualproj": [0.6109, 0.5000]}


def _exact_projection(lower: np.ndarray, gram: np.ndarray) -> np.ndarray:
  """min v^T G v s.t. v >= lower, by trying every set of free coordinates
  (the KKT conditions on each support), in float64."""
  num_tasks = len(lower)
  best = None
  for free in itertools.product([False, True], repeat=num_tasks):
    free = np.array(free)
    v = lower.copy()
    if free.any():
      v[free] = np.linalg.solve(gram[np.ix_(free, free)],
                                -gram[np.ix_(free, ~free)] @ lower[~free])
    multipliers = gram @ v  # Must be >= 0 where v sits on its bound.
    slack = 1e-10 * np.abs(gram).max() * (np.abs(v).max() + 1.0)
    if np.all(v >= lower - 1e-10 * (1.0 + np.abs(lower))) and np.all(
        multipliers[~free] >= -slack):
      value = v @ gram @ v
      if best is None or value < best[0]:
        best = (value, v)
  return best[1]


def _exact_weights(name: str, jacobian: np.ndarray) -> np.ndarray:
  """The method's weights from the exact projections (TorchJD's recipe:
  the Gram matrix divided by its trace, plus 1e-4 on the diagonal)."""
  jacobian = jacobian.astype(np.float64)
  gram = jacobian @ jacobian.T
  gram = gram / np.trace(gram) + 1e-4 * np.eye(len(gram))
  num_tasks = len(gram)
  if name == "upgrad":
    return sum(_exact_projection(row, gram)
               for row in np.eye(num_tasks) / num_tasks)
  return _exact_projection(np.full(num_tasks, 1.0 / num_tasks), gram)


def _weights(name: str, jacobian: np.ndarray) -> np.ndarray:
  jacobian = jacobian.astype(np.float32)
  gram = tf.constant(jacobian @ jacobian.T)
  return aggregators.create(name, len(jacobian)).gram_coefficients(
      gram, 0).numpy()


@pytest.mark.parametrize("name", METHODS)
def test_torchjd_published_values(name):
  jacobian = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)
  np.testing.assert_allclose(mtl_dist.aggregate(name, jacobian).numpy(),
                             TORCHJD_UPDATES[name], atol=1e-4)
  np.testing.assert_allclose(_weights(name, jacobian), TORCHJD_WEIGHTS[name],
                             atol=1e-4)


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 7])
@pytest.mark.parametrize("name", METHODS)
def test_weights_equal_the_exact_solution(name, num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(4):
    scales = 10.0**rng.uniform(-2, 2, size=(num_tasks, 1))
    jacobian = rng.normal(size=(num_tasks, 8)) * scales
    want = _exact_weights(name, jacobian)
    np.testing.assert_allclose(_weights(name, jacobian), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def _degenerate_jacobians():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(4, 6))
  return {
      "zero": np.zeros((3, 6)),
      "one_zero_task": np.concatenate([base[:2], np.zeros((1, 6))]),
      "duplicated": np.stack([base[0], base[0], base[1]]),
      "near_duplicate": np.stack([base[0], base[0] * (1 + 1e-6), base[1]]),
      "opposite": np.stack([base[0], -base[0]]),
      "rank_deficient": np.stack([base[0], base[1], base[0] + base[1]]),
      "scales_1e-6_to_1e6": base[:3] * np.array([[1e-6], [1.0], [1e6]]),
      "all_tiny": base * 1e-6,
      "all_huge": base * 1e6,
  }


@pytest.mark.parametrize("case", sorted(_degenerate_jacobians()))
@pytest.mark.parametrize("name", METHODS)
def test_updates_are_finite_and_conflict_with_no_task(name, case):
  jacobian = _degenerate_jacobians()[case].astype(np.float32)
  update = mtl_dist.aggregate(name, jacobian).numpy().astype(np.float64)
  assert np.all(np.isfinite(update))
  # Non-conflicting: g_i . d >= 0 for every task, up to the 1e-4
  # regularisation of the trace-normalised Gram matrix (a share of
  # 1e-4 / T of |g|max |d| at most) and float32 rounding of an update that
  # is 0 (opposite tasks: 1e-8 |g|max).
  products = jacobian.astype(np.float64) @ update
  largest = np.abs(jacobian).max()
  tolerance = 2e-4 * largest * np.linalg.norm(update) + 1e-6 * largest**2
  assert np.all(products >= -tolerance), products


@pytest.mark.parametrize("name", METHODS)
def test_task_order_does_not_matter_and_scale_is_linear(name):
  rng = np.random.default_rng(7)
  jacobian = rng.normal(size=(4, 10)).astype(np.float32)
  update = mtl_dist.aggregate(name, jacobian).numpy()
  for permutation in ([3, 1, 0, 2], [1, 2, 3, 0]):
    np.testing.assert_allclose(
        mtl_dist.aggregate(name, jacobian[permutation]).numpy(), update,
        rtol=1e-4, atol=1e-5)
  for factor in (1e-3, 7.0, 1e3):
    np.testing.assert_allclose(
        mtl_dist.aggregate(name, jacobian * factor).numpy(), update * factor,
        rtol=1e-4, atol=1e-5 * factor)


@pytest.mark.parametrize("name", METHODS)
def test_without_conflicts_the_update_is_the_mean(name):
  rng = np.random.default_rng(8)
  jacobian = np.abs(rng.normal(size=(3, 5))).astype(np.float32)  # g_i.g_j > 0
  np.testing.assert_allclose(mtl_dist.aggregate(name, jacobian).numpy(),
                             jacobian.mean(axis=0), rtol=2e-3)


def test_the_solver_is_exact_on_random_small_problems():
  rng = np.random.default_rng(11)
  for _ in range(20):
    num_tasks = int(rng.integers(2, 7))
    jacobian = rng.normal(size=(num_tasks, 5)) * np.exp(
        3 * rng.normal(size=(num_tasks, 1)))
    gram = jacobian @ jacobian.T
    lower = rng.uniform(-0.5, 1.0, size=(3, num_tasks))
    got = dual_cone.project_weights(lower, gram).numpy()
    prepared = dual_cone.prepared_gram(gram).numpy()
    for row, solution in zip(lower, got):
      want = _exact_projection(row, prepared)
      assert solution @ prepared @ solution == pytest.approx(
          want @ prepared @ want, rel=1e-9, abs=1e-15)
      np.testing.assert_allclose(solution, want, atol=1e-5)


def test_cli_trains_with_upgrad_on_a_representation_and_refuses_bad_options(
    tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  model_dir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--model_dir={model_dir}",
       "--architecture=mmoe", "--num_experts=2", "--aggregator=upgrad",
       "--rep_grad", "--upgrad_reg_eps=1e-3", "--tasks=shape,x,y",
       "--train_steps=20", "--steps_per_loop=10", "--log_every=10",
       "--eval_every=20", "--eval_examples=64", "--trunk_width=8",
       "--num_cpu_devices=2"],
      capture_output=True, text=True, timeout=time_limit(19), check=False,
      env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(model_dir / "metrics.jsonl") as f:
    train = [json.loads(line) for line in f if '"train"' in line]
  assert 0.0 <= train[-1]["metrics"]["conflict_share"] <= 1.0
  refused = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--model_dir={tmp_path / 'b'}",
       "--aggregator=dualproj", "--dualproj_reg_eps=0"],
      capture_output=True, text=True, timeout=time_limit(19), check=False,
      env=env)
  assert refused.returncode == 2
  assert "--dualproj_reg_eps=0" in refused.stderr.strip().splitlines()[-1]
