"""benchmarks/toy_2d.py: the CAGrad/Nash-MTL/FAMO 2-D toy.

The losses and gradients against NumPy transcriptions of the reference
code and their closed forms, the Pareto-stationarity measure against brute
force, the computed Pareto set against dominance on a grid, short runs of
two aggregators, the aggregator contract (losses, sub-batches), and the
script end to end.
"""

import os
import subprocess
import sys

from conftest import time_limit
import numpy as np
import pytest
import tensorflow as tf

from benchmarks import toy_2d
from mtl_dist.methods import aggregators
from mtl_dist.methods import catalog
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base

_ROOT = os.path.join(os.path.dirname(__file__), "..")


def _reference_losses(x1: np.ndarray, x2: np.ndarray,
                      scale: float) -> np.ndarray:
  """`Toy.batch_forward` of Nash-MTL's experiments/toy/problem.py, NumPy."""
  f1 = np.log(np.maximum(np.abs(0.5 * (-x1 - 7) - np.tanh(-x2)),
                         0.000005)) + 6
  f2 = np.log(np.maximum(np.abs(0.5 * (-x1 + 3) + np.tanh(-x2) + 2),
                         0.000005)) + 6
  c1 = np.maximum(np.tanh(x2 * 0.5), 0)
  f1_sq = ((-x1 + 7)**2 + 0.1 * (-x2 - 8)**2) / 10 - 20
  f2_sq = ((-x1 - 7)**2 + 0.1 * (-x2 - 8)**2) / 10 - 20
  c2 = np.maximum(np.tanh(-x2 * 0.5), 0)
  return np.stack([scale * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2])


def _closed_form_jacobian(x1: float, x2: float, scale: float) -> np.ndarray:
  """[2, 2] gradients by hand, off the kinks (x2 != 0, no clamping)."""
  if x2 < 0:
    down = np.tanh(-x2 / 2)
    d_down = -0.5 * (1 - down**2)
    rows = []
    for centre in (7.0, -7.0):
      square = ((x1 - centre)**2 + 0.1 * (x2 + 8)**2) / 10 - 20
      rows.append([down * (x1 - centre) / 5,
                   d_down * square + down * 0.02 * (x2 + 8)])
  else:
    up = np.tanh(x2 / 2)
    d_up = 0.5 * (1 - up**2)
    d_tanh = 1 - np.tanh(x2)**2
    rows = []
    # a1 = -x1/2 - 7/2 + tanh(x2), a2 = 7/2 - x1/2 - tanh(x2).
    for inner, d_inner in ((-x1 / 2 - 3.5 + np.tanh(x2), d_tanh),
                           (3.5 - x1 / 2 - np.tanh(x2), -d_tanh)):
      log_term = np.log(abs(inner)) + 6
      rows.append([up * -0.5 / inner,
                   d_up * log_term + up * d_inner / inner])
  jacobian = np.array(rows)
  jacobian[0] *= scale
  return jacobian


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_losses_match_the_reference_code(scale):
  rng = np.random.default_rng(0)
  points = rng.uniform(-10, 10, size=(200, 2))
  points = np.concatenate([points, np.array(toy_2d.STARTS)])
  got = toy_2d.losses(tf.constant(points.T, tf.float64), scale).numpy()
  np.testing.assert_allclose(
      got, _reference_losses(points[:, 0], points[:, 1], scale), rtol=1e-12,
      atol=1e-12)
  single = toy_2d.losses(tf.constant(points[0], tf.float32), scale).numpy()
  assert single.dtype == np.float32
  np.testing.assert_allclose(single, _reference_losses(*points[0], scale),
                             rtol=1e-5)


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_gradients_match_the_closed_form(scale):
  rng = np.random.default_rng(1)
  checked = 0
  for x1, x2 in rng.uniform(-10, 10, size=(60, 2)):
    if abs(x2) < 0.05 or (x2 > 0 and min(
        abs(-x1 / 2 - 3.5 + np.tanh(x2)), abs(3.5 - x1 / 2 - np.tanh(x2)))
                          < 1e-3):
      continue
    values, jacobian = toy_2d.losses_and_jacobian(
        tf.constant([x1, x2], tf.float64), scale)
    np.testing.assert_allclose(values.numpy(),
                               _reference_losses(x1, x2, scale), rtol=1e-12)
    np.testing.assert_allclose(jacobian.numpy(),
                               _closed_form_jacobian(x1, x2, scale),
                               rtol=1e-9, atol=1e-12)
    checked += 1
  assert checked > 40


def test_stationarity_is_the_min_norm_of_the_segment():
  rng = np.random.default_rng(2)
  weights = np.linspace(0.0, 1.0, 100001)
  cases = [rng.normal(size=(2, 2)) * rng.uniform(0.01, 10, size=(2, 1))
           for _ in range(50)]
  cases += [np.array([[1.0, 2.0], [-2.0, -4.0]]),  # Antiparallel: 0.
            np.array([[1.0, 0.0], [3.0, 0.1]]),  # Min at g1.
            np.array([[2.0, 2.0], [2.0, 2.0]]),  # Equal.
            np.array([[0.0, 0.0], [1.0, 5.0]])]  # One gradient 0.
  for jacobian in cases:
    mixes = weights[:, None] * jacobian[0] + (1 - weights[:, None]) * (
        jacobian[1])
    brute = np.min(np.linalg.norm(mixes, axis=1))
    exact = toy_2d.stationarity(jacobian)
    # The grid's minimum is above the exact one by at most its spacing.
    assert exact <= brute + 1e-12
    assert brute - exact <= 1e-5 * np.linalg.norm(jacobian[0] - jacobian[1])
  assert toy_2d.stationarity(cases[-4]) == pytest.approx(0.0, abs=1e-12)


def test_the_pareto_set_is_stationary_and_undominated():
  front = toy_2d.pareto_set(201)
  assert front[0, 0] == -7 and front[-1, 0] == 7
  np.testing.assert_allclose(front[:, 1], front[::-1, 1], atol=1e-9)
  assert front[100, 1] == pytest.approx(-8.3551, abs=1e-4)  # x1 = 0.
  assert front[0, 1] == pytest.approx(-8.4345, abs=1e-4)
  for point in front[::20]:
    _, jacobian = toy_2d.losses_and_jacobian(tf.constant(point, tf.float64))
    assert toy_2d.stationarity(jacobian.numpy()) < 1e-9
    # Off the set (0.1 up or down) it is not stationary.
    for shift in (-0.1, 0.1):
      _, off = toy_2d.losses_and_jacobian(
          tf.constant(point + [0.0, shift], tf.float64))
      assert toy_2d.stationarity(off.numpy()) > 1e-4
  # No point of a fine grid is better in both losses than a point of the
  # set by more than the grid's resolution can make up.
  grid = np.linspace(-10, 10, 801)
  xs, ys = np.meshgrid(grid, grid)
  values = _reference_losses(xs.ravel(), ys.ravel(), toy_2d.SCALE)
  for point in front[::10]:
    own = _reference_losses(*point, toy_2d.SCALE)
    dominated = np.all(values < own[:, None] - 1e-3, axis=0)
    assert not dominated.any(), point


def test_distance_to_front():
  front = toy_2d.pareto_set()
  assert toy_2d.distance_to_front(front[500], front) == 0.0
  assert toy_2d.distance_to_front([0.0, 0.0], front) == pytest.approx(
      8.3551, abs=1e-4)
  assert toy_2d.distance_to_front([9.0, -8.4345], front) == pytest.approx(
      2.0, abs=1e-3)


def _short_run(name, start, steps):
  run = toy_2d.make_run(aggregators.create(name, 2, 0), steps, 100)
  return run(tf.constant(start, tf.float32)).numpy()


def _stationarity_at(point):
  _, jacobian = toy_2d.losses_and_jacobian(tf.constant(point, tf.float64))
  return toy_2d.stationarity(jacobian.numpy())


def test_mgda_moves_towards_pareto_stationarity():
  front = toy_2d.pareto_set()
  start = (1.0, -7.6)  # 0.76 above the set.
  trajectory = _short_run("mgda", start, 1000)
  assert trajectory.shape == (11, 2)
  np.testing.assert_allclose(trajectory[0], start, rtol=1e-7)
  assert _stationarity_at(trajectory[-1]) < 0.2 * _stationarity_at(start)
  distances = [toy_2d.distance_to_front(p, front) for p in trajectory]
  assert distances[-1] < 0.25 < distances[0]
  assert np.all(np.diff(distances) < 0)


def test_the_sum_is_trapped_at_the_gate_x2_0():
  """FAMO's "Adam fails ... due to CG": at x2 = 0 both losses' gates shut;
  just below, l1 pulls x2 down and l2, with a 3x larger gradient (l1 is
  scaled by 0.1), pushes it up, and just above both push it down. The sum
  stays there, far from the front, nearly Pareto-stationary, which is why
  reaching the front is judged by the distance to the set."""
  trajectory = _short_run("sum", (9.0, -0.3), 800)
  last = trajectory[-1]
  assert abs(last[1]) < 0.01 and last[0] > 8.5
  assert toy_2d.distance_to_front(last, toy_2d.pareto_set()) > 8
  assert _stationarity_at(last) < 1e-2


class _Checker(base.Aggregator):
  """Checks what the toy passes: the losses and K stacked Jacobians."""

  name = "test_toy_checker"
  needs_losses = True
  sub_batches = 3
  seen = []

  def __call__(self, jacobian, step, losses=None):
    self.seen.append((jacobian.shape.as_list(), losses.shape.as_list(),
                      step.dtype))
    tf.debugging.assert_equal(jacobian[:2], jacobian[2:4])
    tf.debugging.assert_equal(jacobian[:2], jacobian[4:])
    return tf.reduce_sum(jacobian[:2], axis=0) + 0.0 * tf.reduce_sum(losses)


if _Checker.name not in registry.AGGREGATORS.names():
  registry.AGGREGATORS.register(_Checker, catalog.Method(
      _Checker.name, "a test aggregator", needs_losses=True, sub_batches=3))


def test_losses_and_stacked_jacobians_reach_the_aggregator():
  checker = aggregators.create(_Checker.name, 2, 0)
  assert toy_2d.sub_batches(checker) == 3
  got = toy_2d.make_run(checker, 30, 10)(tf.constant([1.0, -7.0])).numpy()
  plain = toy_2d.make_run(aggregators.create("sum", 2, 0), 30, 10)(
      tf.constant([1.0, -7.0])).numpy()
  np.testing.assert_allclose(got, plain, rtol=1e-6)
  assert ([6, 2], [2], tf.int64) in _Checker.seen
  assert _Checker.name not in toy_2d.method_names()
  assert "sum" in toy_2d.method_names()


def test_the_script_writes_the_page_and_the_figure(tmp_path):
  output, figure = tmp_path / "toy.md", tmp_path / "toy.png"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.toy_2d", "--steps=40",
       "--record_every=15", "--methods=sum,mgda", f"--output={output}",
       f"--figure={figure}"],
      capture_output=True, text=True, timeout=time_limit(10), env=env,
      check=False,
      cwd=_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  text = output.read_text()
  assert "| `sum` |" in text and "| `mgda` |" in text
  assert "| `pcgrad` |" not in text
  assert "--steps=40" in text and "--methods=sum,mgda" in text
  assert text.count("| no (") == 10  # 40 steps reach nothing.
  assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
