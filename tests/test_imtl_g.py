"""IMTL-G (`--aggregator=imtl_g`): against the paper's formula, TorchJD's
published value, its defining property, degenerate inputs, and training on
1, 2 and 4 replicas against a NumPy reference of the whole update."""

import os
import subprocess
import sys

from conftest import time_limit
from conftest import whole_batch_task_gradients
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import aggregators
from mtl_dist.methods.aggregators import imtl_g


def paper_weights(grads: np.ndarray) -> np.ndarray:
  """IMTL-G's closed form (Liu et al. 2021, Eq. 10 and Alg. 1), in float64.

  With task 1 as reference, D = [g_1 - g_i]_{i>=2}, U = [u_1 - u_i]_{i>=2}
  (u the unit gradients): a_{2:T} = g_1 U^T (D U^T)^-1, a_1 = 1 - sum a_{2:T}.
  (LibMTL's `IMTL.backward` computes the same, LibMTL/weighting/IMTL.py.)
  """
  grads = grads.astype(np.float64)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  d = grads[0:1] - grads[1:]
  u = units[0:1] - units[1:]
  rest = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
  return np.concatenate([[1.0 - rest.sum()], rest])


def _weights(grads: np.ndarray) -> np.ndarray:
  grads = grads.astype(np.float32)
  return imtl_g.imtl_g_weights(tf.constant(grads @ grads.T)).numpy()


def _projections(grads: np.ndarray, weights: np.ndarray) -> np.ndarray:
  grads = grads.astype(np.float64)
  update = weights.astype(np.float64) @ grads
  return grads @ update / np.linalg.norm(grads, axis=1)


def test_torchjd_example():
  # TorchJD's docstring example, src/torchjd/aggregation/_imtl_g.py at
  # commit 014e47aeb02c5ae71c167c1da3141f951df196df: tensor([0.0767, 1.0000,
  # 1.0000]).
  jacobian = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)
  got = mtl_dist.aggregate("imtl_g", jacobian).numpy()
  np.testing.assert_allclose(got, [0.0767, 1.0, 1.0], atol=1e-4)


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 10])
def test_weights_match_the_papers_formula_over_wide_scales(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(5):
    scales = 10.0**rng.uniform(-3, 3, size=(num_tasks, 1))
    grads = (rng.normal(size=(num_tasks, 64)) * scales).astype(np.float32)
    want = paper_weights(grads)
    got = _weights(grads)
    np.testing.assert_allclose(got, want, rtol=2e-4,
                               atol=2e-5 * np.abs(want).max())
    assert abs(got.sum() - 1.0) < 1e-5
    # The defining property: equal projections on every task's direction.
    projections = _projections(grads, got)
    np.testing.assert_allclose(projections, projections.mean(),
                               rtol=1e-3, atol=1e-6 * np.abs(grads).max())


def test_full_update_equals_the_gram_form():
  rng = np.random.default_rng(5)
  grads = rng.normal(size=(4, 30)).astype(np.float32)
  full = mtl_dist.aggregate("imtl_g", grads).numpy()
  np.testing.assert_allclose(full, paper_weights(grads) @ grads, rtol=1e-4,
                             atol=1e-5)
  assert aggregators.create("imtl_g", 4).has_gram_form


def test_duplicated_tasks_share_their_weight():
  rng = np.random.default_rng(6)
  g1, g2 = rng.normal(size=(2, 8))
  grads = np.stack([g1, g1, g2])
  got = _weights(grads)
  assert got[0] == pytest.approx(got[1], rel=1e-5)
  # Dropping the duplicate gives the same update (its weight merged).
  want = paper_weights(np.stack([g1, g2]))
  np.testing.assert_allclose([got[0] + got[1], got[2]], want, rtol=1e-4)
  projections = _projections(grads, got)
  np.testing.assert_allclose(projections, projections[0], rtol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 3.0, 1e-3, 1e3])
def test_opposite_tasks_cancel_exactly(scale):
  g = np.array([1.0, 2.0, -0.5])
  grads = np.stack([g, -scale * g])
  got = _weights(grads)
  # d . u_1 = d . u_2 with u_2 = -u_1 forces d = 0: a_1 |g_1| = a_2 |g_2|.
  np.testing.assert_allclose(got, paper_weights(grads), rtol=1e-5)
  np.testing.assert_allclose(got, [scale / (1 + scale), 1 / (1 + scale)],
                             rtol=1e-5)
  update = got @ grads
  assert np.abs(update).max() < 1e-6 * np.abs(grads).max()


def test_a_vanishing_task_takes_no_part():
  rng = np.random.default_rng(7)
  others = rng.normal(size=(2, 6))
  grads = np.stack([others[0], np.zeros(6), others[1]])
  got = _weights(grads)
  assert got[1] == 0.0
  np.testing.assert_allclose(got[[0, 2]], paper_weights(others), rtol=1e-4)


def test_all_zero_and_single_task():
  np.testing.assert_array_equal(_weights(np.zeros((3, 4))), np.zeros(3))
  assert not np.abs(mtl_dist.aggregate("imtl_g", np.zeros((3, 4)))).any()
  g = np.array([[0.5, -2.0, 1.0]], np.float32)
  np.testing.assert_allclose(mtl_dist.aggregate("imtl_g", g), g[0],
                             rtol=1e-6)


@pytest.mark.parametrize("replicas", [1, 2, 4])
@pytest.mark.parametrize("rep_grad", [False, True])
def test_training_step_is_the_papers_update_on_every_replica_count(
    build_trainer, shapes_arrays, replicas, rep_grad):
  features, labels = shapes_arrays
  # One global batch of the whole 64-example set: the step sees exactly it.
  features = features[:64]
  labels = {k: v[:64] for k, v in labels.items()}
  trainer, iterators, _, _ = build_trainer(
      replicas, "joint", ("shape", "x", "y"), aggregator="imtl_g",
      optimizer="sgd", learning_rate=0.1, global_batch_size=64,
      arrays=(features, labels), rep_grad=rep_grad)
  trunk = trainer.model.trunk.trainable_variables
  before = np.concatenate([v.numpy().ravel() for v in trunk])
  if rep_grad:  # Coefficients from gradients at the trunk's output.
    representation = trainer.model.trunk(features, training=True)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(representation)
      losses = [tf.reduce_mean(task.per_example_loss(
          labels[task.name], trainer.model.heads[task.name](representation)))
                for task in trainer.tasks]
    at_z = np.stack([tape.gradient(loss, representation).numpy().ravel()
                     for loss in losses])
    weights = paper_weights(at_z)
  _, gradients = whole_batch_task_gradients(trainer, features, labels, trunk)
  jacobian = np.stack([np.concatenate([g.ravel() for g in task_gradients])
                       for task_gradients in gradients])
  if not rep_grad:
    weights = paper_weights(jacobian)
  want = before - 0.1 * (weights @ jacobian)
  trainer.train(iterators, 1)
  got = np.concatenate([v.numpy().ravel() for v in trunk])
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-5 * np.abs(before).max())
  assert not np.allclose(got, before)


def test_cli_trains_with_imtl_g_and_rlw(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--model_dir={tmp_path}",
       "--aggregator=imtl_g", "--weighting=rlw", "--num_cpu_devices=2",
       "--train_steps=20", "--train_examples=512", "--eval_examples=256",
       "--trunk_width=32", "--steps_per_loop=10", "--log_every=10",
       "--eval_every=20", "--checkpoint_every=20"],
      capture_output=True, text=True, timeout=time_limit(19), env=env,
      check=False,
      cwd=os.path.join(os.path.dirname(__file__), ".."))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval results" in result.stdout
