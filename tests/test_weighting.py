"""Loss weighting: formulas against NumPy, replica equality, state."""

import numpy as np
import tensorflow as tf

from mtl_dist.data import shapes
from mtl_dist.methods import weightings
from mtl_dist.methods.weightings import gradnorm as gradnorm_lib

TASKS = [shapes.TASKS[0], shapes.TASKS[3], shapes.TASKS[4]]  # shape, x, y


def test_static_weights_come_from_the_tasks():
  tasks = [TASKS[0].with_weight(2.0), TASKS[1].with_weight(0.5)]
  weighting = weightings.create("static", tasks)
  np.testing.assert_allclose(weighting.weights(0), [2.0, 0.5])
  assert float(weighting.objective(tf.constant([1.0, 4.0]), 0)) == 4.0
  assert not weighting.trainable and not weighting.variables


def test_uncertainty_objective_matches_formula():
  weighting = weightings.create("uncertainty", TASKS)
  log_variances = np.array([0.3, -0.2, 1.0], np.float32)
  weighting.log_variances.assign(log_variances)
  losses = np.array([1.2, 0.05, 0.4], np.float32)
  # Classification drops the 1/2 on the exp term; regression keeps it.
  halves = np.array([1.0, 0.5, 0.5])
  expected = np.sum(halves * np.exp(-log_variances) * losses +
                    0.5 * log_variances)
  np.testing.assert_allclose(weighting.objective(tf.constant(losses), 0),
                             expected, rtol=1e-6)
  np.testing.assert_allclose(weighting.weights(0),
                             halves * np.exp(-log_variances), rtol=1e-6)
  assert weighting.trainable == [weighting.log_variances]


def test_dwa_weights_follow_window_loss_ratios():
  weighting = weightings.create("dwa", TASKS, window=2)
  window_losses = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0],  # window 1: mean 2,2,2
                   [1.0, 1.0, 4.0], [1.0, 3.0, 0.0]]  # window 2: 1,2,2
  for step, losses in enumerate(window_losses):
    np.testing.assert_allclose(weighting.weights(0), [1.0, 1.0, 1.0],
                               err_msg=f"before two windows (step {step})")
    weighting.update(tf.constant(losses))
  ratios = np.array([1.0, 2.0, 2.0]) / np.array([2.0, 2.0, 2.0])
  expected = 3 * np.exp(ratios / 2) / np.exp(ratios / 2).sum()
  np.testing.assert_allclose(weighting.weights(0), expected, rtol=1e-6)
  # A partial third window does not change the weights yet.
  weighting.update(tf.constant([10.0, 10.0, 10.0]))
  np.testing.assert_allclose(weighting.weights(0), expected, rtol=1e-6)


def test_weighting_state_is_checkpointed(build_trainer, tmp_path):
  trainer, iterators, _, _ = build_trainer(2, "joint", ("shape", "x"),
                                           weighting="dwa", dwa_window=3)
  trainer.train(iterators, 7)
  checkpoint = tf.train.Checkpoint(**trainer.checkpoint_items())
  path = checkpoint.save(str(tmp_path / "ckpt"))
  names = [name for name, _ in tf.train.list_variables(path)]
  assert any(name.startswith("weighting/last_means") for name in names)
  restored, _, _, _ = build_trainer(2, "joint", ("shape", "x"),
                                    weighting="dwa", dwa_window=3)
  tf.train.Checkpoint(**restored.checkpoint_items()).restore(
      path).assert_consumed()
  for got, want in zip(restored.weighting.variables,
                       trainer.weighting.variables):
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def _numpy_gradnorm_gradient(weights, norms, losses, initial, alpha):
  big_g = weights * norms
  ratios = losses / initial
  relative = ratios / ratios.mean()
  target = big_g.mean() * relative**alpha
  return np.sign(big_g - target) * norms


def test_gradnorm_gradient_and_update_match_formula():
  weights = np.array([1.0, 1.5, 0.5], np.float32)
  norms = np.array([2.0, 0.5, 1.0], np.float32)
  losses = np.array([0.5, 0.9, 0.2], np.float32)
  initial = np.array([1.0, 1.0, 0.4], np.float32)
  gradient = gradnorm_lib.gradnorm_gradient(*(tf.constant(v) for v in (
      weights, norms, losses, initial)), alpha=1.5)
  want = _numpy_gradnorm_gradient(weights, norms, losses, initial, 1.5)
  np.testing.assert_allclose(gradient.numpy(), want, rtol=1e-6)
  # G = (2, 0.75, 0.5) against targets (0.76, 1.84, 0.76): task 0's weight
  # must fall, the others rise.
  np.testing.assert_array_equal(np.sign(want), [1.0, -1.0, -1.0])

  # First Adam step: the bias-corrected step is lr * sign(gradient).
  new, first, second = gradnorm_lib.adam_step(
      tf.constant(weights), gradient, tf.zeros(3), tf.zeros(3),
      tf.constant(1, tf.int64), learning_rate=0.1)
  moved = np.maximum(weights - 0.1 * np.sign(want), 1e-3)
  np.testing.assert_allclose(new.numpy(), moved * 3 / moved.sum(), rtol=1e-5)
  np.testing.assert_allclose(first.numpy(), 0.1 * want, rtol=1e-6)
  np.testing.assert_allclose(second.numpy(), 0.001 * want**2, rtol=1e-5)
  assert abs(float(tf.reduce_sum(new)) - 3.0) < 1e-5


def test_gradnorm_first_step_records_initial_losses(build_trainer):
  trainer, iterators, _, _ = build_trainer(2, "joint", ("shape", "x", "y"),
                                           weighting="gradnorm")
  loss_sums = trainer.train(iterators, 1).loss_sums
  np.testing.assert_allclose(trainer.weighting.initial_losses.numpy(),
                             loss_sums, rtol=1e-5)
  weights = trainer.weighting.task_weights.numpy()
  assert abs(weights.sum() - 3.0) < 1e-5 and (weights > 0).all()
  assert not np.allclose(weights, 1.0)  # One update happened.


def test_gradnorm_ignores_tasks_without_labels_in_the_batch():
  weighting = weightings.create("gradnorm", TASKS)
  kernel = tf.Variable([[1.0, 2.0], [3.0, 4.0]])

  def update(labelled):
    with tf.GradientTape(persistent=True) as tape:
      per_task = tf.stack([tf.reduce_sum(kernel), 0.0 * tf.reduce_sum(kernel),
                           tf.reduce_sum(kernel * kernel) / 10])
      terms = [per_task[i] for i in range(3)]
    weighting.replica_update(weighting.task_gradients(tape, terms, kernel),
                             per_task, tf.constant(labelled, tf.float32))
    return per_task.numpy()

  update([4, 0, 4])  # Task 1 has no labelled example in this batch.
  np.testing.assert_array_equal(weighting.has_initial_losses.numpy(),
                                [True, False, True])
  assert weighting.initial_losses.numpy()[1] == 0.0
  np.testing.assert_array_equal(weighting.adam_moments.numpy()[:, 1], 0.0)
  weights = weighting.task_weights.numpy()
  assert abs(weights.sum() - 3) < 1e-5 and weights[0] != weights[2]
  losses = update([4, 2, 4])  # Now it has: its first loss becomes L_1(0).
  assert weighting.has_initial_losses.numpy().all()
  assert weighting.initial_losses.numpy()[1] == losses[1]
