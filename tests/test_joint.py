"""Joint mode: the loss it optimises and distributed equivalence."""

import numpy as np
import pytest
import tensorflow as tf

from mtl_dist.data import shapes
from mtl_dist.steps import losses as steps
from mtl_dist.steps import plumbing


def test_total_loss_is_weighted_sum_of_task_losses(shapes_arrays):
  features, labels = shapes_arrays
  specs = {task.name: task for task in shapes.TASKS}
  tasks = [specs["shape"].with_weight(2.0), specs["x"].with_weight(0.5),
           specs["scale"].with_weight(0.0)]
  batch = 16
  outputs = {"shape": tf.random.stateless_normal([batch, 3], seed=(1, 2)),
             "x": tf.random.stateless_normal([batch, 1], seed=(3, 4)),
             "scale": tf.random.stateless_normal([batch, 1], seed=(5, 6))}
  batch_labels = {name: labels[name][:batch] for name in outputs}

  total, per_task = steps.task_losses(tasks, batch_labels, outputs,
                                      global_batch_size=batch)

  logits = outputs["shape"].numpy().astype(np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  cross_entropy = -log_probs[np.arange(batch), batch_labels["shape"]].mean()
  mse_x = ((outputs["x"].numpy() - batch_labels["x"])**2).mean()
  mse_scale = ((outputs["scale"].numpy() - batch_labels["scale"])**2).mean()
  np.testing.assert_allclose(per_task.numpy(),
                             [cross_entropy, mse_x, mse_scale], rtol=1e-5)
  np.testing.assert_allclose(total.numpy(),
                             2.0 * cross_entropy + 0.5 * mse_x, rtol=1e-5)


def test_losses_sum_over_replicas_to_global_mean(shapes_arrays):
  """Each replica's share, summed, is the loss of the whole global batch."""
  features, labels = shapes_arrays
  tasks = [shapes.TASKS[0], shapes.TASKS[3]]
  outputs = {"shape": tf.random.stateless_normal([32, 3], seed=(1, 2)),
             "x": tf.random.stateless_normal([32, 1], seed=(3, 4))}
  batch_labels = {name: labels[name][:32] for name in outputs}
  _, whole = steps.task_losses(tasks, batch_labels, outputs, 32)
  shares = [steps.task_losses(
      tasks, {k: v[i:i + 8] for k, v in batch_labels.items()},
      {k: v[i:i + 8] for k, v in outputs.items()}, 32)[1]
            for i in range(0, 32, 8)]
  np.testing.assert_allclose(np.sum(shares, axis=0), whole.numpy(), rtol=1e-6)
  del features


@pytest.mark.parametrize("replicas", [2, 4])
def test_replicas_match_one_device_with_same_global_batch(build_trainer,
                                                          replicas):
  weights = {"shape": 1.0, "x": 0.5}
  single, single_its, _, _ = build_trainer(1, "joint", weights=weights)
  initial = single.model.get_weights()
  multi, multi_its, _, _ = build_trainer(replicas, "joint", weights=weights,
                                         initial_weights=initial)

  for _ in range(2):
    single_losses = single.train(single_its, 3).loss_sums
    multi_losses = multi.train(multi_its, 3).loss_sums

  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  for got, want in zip(multi.model.get_weights(), single.model.get_weights()):
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert any(not np.allclose(w, i) for w, i in zip(
      single.model.get_weights(), initial)), "training changed nothing"
  assert int(multi.global_step.numpy()) == 6
  np.testing.assert_array_equal(multi.task_steps.numpy(), [6, 6])


def test_eval_is_the_same_on_any_replica_count(build_trainer, shapes_arrays):
  # 26 examples in global batches of 8: the 4 replica pipelines hold 7, 7, 6
  # and 6 examples, so in the last steps some replicas get partial batches
  # and others none at all.
  features, labels = shapes_arrays
  arrays = (features[:26], {k: v[:26] for k, v in labels.items()})
  single, _, single_eval, groups = build_trainer(
      1, "joint", arrays=arrays, global_batch_size=8)
  multi, _, multi_eval, _ = build_trainer(
      4, "joint", arrays=arrays, global_batch_size=8,
      initial_weights=single.model.get_weights())
  want = single.evaluate(single_eval, groups)
  got = multi.evaluate(multi_eval, groups)
  assert set(got) == {"shape/loss", "shape/accuracy", "x/loss", "x/mae"}
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
  # The means are over all 26 examples.
  outputs = single.model(features[:26])
  np.testing.assert_allclose(
      want["x/mae"], np.abs(outputs["x"].numpy() - labels["x"][:26]).mean(),
      rtol=1e-5)


def test_rank_one_regression_labels_match_column_labels():
  spec = shapes.TASKS[3]
  outputs = tf.constant([[0.1], [0.5], [0.9]])
  column = tf.constant([[0.1], [0.4], [0.2]])
  flat = tf.reshape(column, [-1])
  np.testing.assert_allclose(spec.per_example_loss(flat, outputs),
                             spec.per_example_loss(column, outputs))
  np.testing.assert_allclose(spec.per_example_loss(column, outputs),
                             [0.0, 0.01, 0.49], atol=1e-6)
  assert spec.label_mask({"x": flat}).shape == (3,)


def test_all_finite_sees_every_nan_and_inf_through_the_sums():
  all_finite = plumbing.all_finite
  finite = [tf.ones([3, 2]), tf.constant([1e30, -1e30]),
            tf.fill([70000], tf.constant(1.0, tf.float16))]  # f16 sum: 7e4.
  assert bool(all_finite(finite))
  for bad in ([np.inf, 1.0], [-np.inf, np.inf], [np.nan, 0.0]):
    assert not bool(all_finite(finite + [tf.constant(bad, tf.float32)]))
  split = [tf.constant([np.inf]), tf.constant([-np.inf])]  # Sum is NaN.
  assert not bool(all_finite(split))


@pytest.mark.parametrize("global_batch_size", [8, 24, 96])
def test_average_loss_equals_compute_average_loss(global_batch_size):
  """Bit for bit, eagerly and compiled (grappler must not rewrite it)."""
  per_example = tf.random.stateless_uniform([200, 8], seed=(7, 8))

  def both(losses):
    return (steps.average_loss(losses, global_batch_size),
            tf.nn.compute_average_loss(losses,
                                       global_batch_size=global_batch_size))

  compiled = tf.function(lambda: tf.map_fn(
      both, per_example, fn_output_signature=(tf.float32, tf.float32)))
  for ours, reference in (both(per_example[0]), compiled()):
    np.testing.assert_array_equal(ours, reference)


def test_average_loss_refuses_reduced_losses_and_empty_batches():
  with pytest.raises(ValueError, match=r"shape \[batch\], not \(4, 2\)"):
    steps.average_loss(tf.zeros([4, 2]), 8)
  with pytest.raises(ValueError, match="must be positive, not 0"):
    steps.average_loss(tf.zeros([4]), 0)


@pytest.mark.parametrize("bad_label", [-1, -2**31, 3, 2**31 - 1])
def test_the_in_graph_label_check_catches_both_bounds(bad_label):
  """One unsigned comparison covers negative and too-large class labels."""
  spec = shapes.TASKS[0]  # 3 classes.
  check = tf.function(spec.checked_labels)
  np.testing.assert_array_equal(check(tf.constant([0, 1, 2])), [0, 1, 2])
  # The graph error's text escapes the quotes around the task's name.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"task \W*shape\W*: class labels must be in "
                     r"\[0, 3\)"):
    check(tf.constant([0, bad_label, 2]))
