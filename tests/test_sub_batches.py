"""The sub-batch contract of the joint step (`Aggregator.sub_batches` K > 1,
MoDo and SDMGrad): the aggregator gets each task's gradient on each of K
strided sub-batches of the global batch, the same on 1, 2 and 4 replicas;
the heads still get the full-batch gradient; bad settings are refused."""

from conftest import make_strategy
from conftest import whole_batch_task_gradients
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist.data import shapes
from mtl_dist.methods import catalog
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base

TASKS = ("shape", "x", "y")
BATCH = 48
LEARNING_RATE = 0.1


class _Capture(base.Aggregator):
  """Keeps the [K*T, P] matrix it gets; the update is the mean of its rows'
  per-task sums (the full-batch sum of the task gradients)."""

  name = "test_capture_sub_batches"
  sub_batches = 3
  size = 0  # P, set by the test before the trainer is built.

  def __init__(self, num_tasks: int, seed: int = 0):
    super().__init__(num_tasks, seed)
    self.seen = base.state_variable(
        "seen", [self.sub_batches * num_tasks, self.size])

  def __call__(self, jacobian, step, losses=None):
    del step, losses
    if self.seen.shape == jacobian.shape:  # Not when other tests train it.
      self.seen.assign(jacobian)
    return tf.reduce_sum(jacobian, axis=0) / self.sub_batches


if _Capture.name not in registry.AGGREGATORS.names():
  registry.AGGREGATORS.register(_Capture, catalog.Method(
      _Capture.name, "a test aggregator", sub_batches=3))


def _flat(arrays) -> np.ndarray:
  return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _first_global_batch(features, labels, task_names):
  """The first global batch build_trainer's pipeline serves, in order (read
  on one device, where the replica's batch is the global batch)."""
  source = data_lib.source_from_arrays(features, labels, task_names)
  batch_features, batch_labels = next(iter(data_lib.distribute_train(
      make_strategy(1), source, BATCH, seed=7)))
  return batch_features, batch_labels


@pytest.mark.parametrize("replicas, partial", [(4, False), (2, True)])
def test_the_aggregator_gets_the_strided_sub_batch_gradients(
    build_trainer, shapes_arrays, replicas, partial):
  features, labels = shapes_arrays
  labels = dict(labels)
  if partial:  # Some examples lack the shape or the x label.
    rng = np.random.default_rng(0)
    labels["shape"] = np.where(rng.random(len(features)) < 0.4, -1,
                               labels["shape"]).astype(labels["shape"].dtype)
    x = labels["x"].astype(np.float32).copy()
    x[rng.random(len(features)) < 0.3] = np.nan
    labels["x"] = x
  model = mtl_dist.build_model(
      [t for t in shapes.TASKS if t.name in TASKS],
      features.shape[1:], "mlp", 16, 2)
  _Capture.size = sum(int(np.prod(v.shape)) for v in model.shared_variables)
  trainer, iterators, _, _ = build_trainer(
      replicas, "joint", TASKS, aggregator=_Capture.name,
      global_batch_size=BATCH, learning_rate=LEARNING_RATE,
      arrays=(features, labels), partial_labels=partial)
  batch_features, batch_labels = _first_global_batch(features, labels, TASKS)
  shared = trainer.model.shared_variables
  heads = [v for t in TASKS for v in trainer.model.task_variables(t)]
  want_rows, head_grads = [], []
  for k in range(3):  # Sub-batch k: examples k, k + 3, k + 6, ...
    sub_features = batch_features[k::3]
    for task in trainer.tasks:
      mask = task.label_mask(batch_labels)[k::3]
      label = task.fill_missing(batch_labels, task.label_mask(
          batch_labels))[k::3]
      with tf.GradientTape() as tape:
        outputs = trainer.model(sub_features, training=True)
        per_example = task.per_example_loss(label, outputs[task.name])
        loss = (tf.reduce_sum(mask * per_example) /
                tf.maximum(tf.reduce_sum(mask), 1.0))
      want_rows.append(_flat(tape.gradient(
          loss, shared, unconnected_gradients=tf.UnconnectedGradients.ZERO)))
  for task in trainer.tasks:  # The heads: the full batch's gradient.
    mask = task.label_mask(batch_labels)
    label = task.fill_missing(batch_labels, mask)
    with tf.GradientTape() as tape:
      outputs = trainer.model(batch_features, training=True)
      loss = (tf.reduce_sum(mask * task.per_example_loss(
          label, outputs[task.name])) / tf.maximum(tf.reduce_sum(mask), 1.0))
    head_grads += [g.numpy() for g in tape.gradient(
        loss, trainer.model.task_variables(task.name))]
  if not partial:  # The sub-batch means' mean is the batch mean.
    _, full = whole_batch_task_gradients(trainer, batch_features,
                                         batch_labels, shared)
    np.testing.assert_allclose(
        np.mean(np.reshape(want_rows, (3, 3, -1)), axis=0),
        np.stack([_flat(g) for g in full]), atol=1e-6)
  heads_before = [v.numpy() for v in heads]
  trainer.train(iterators, 1)
  got = trainer.aggregator.seen.numpy()
  want = np.stack(want_rows)
  assert got.shape == want.shape
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
  # Contiguous sub-batches (or none) would differ by far more.
  assert np.abs(want[:3] - want[3:6]).max() > 1e-2 * scale
  for variable, before, gradient in zip(heads, heads_before, head_grads):
    np.testing.assert_allclose(variable.numpy(),
                               before - LEARNING_RATE * gradient,
                               rtol=1e-4, atol=1e-6)


def test_a_batch_the_sub_batches_and_replicas_do_not_divide_is_refused(
    build_trainer):
  # 6 examples: 2 per replica on 3 replicas, 2 per sub-batch, but not a
  # multiple of 3 sub-batches x 3 replicas.
  with pytest.raises(mtl_dist.ConfigError,
                     match=r"--global_batch_size=6: --aggregator=modo .*3 "
                     r"x the 3 replica\(s\)"):
    build_trainer(3, "joint", ("shape", "x"), aggregator="modo",
                  global_batch_size=6)
  with pytest.raises(ValueError, match="jit_compile"):
    build_trainer(1, "joint", ("shape", "x"), aggregator="sdmgrad",
                  global_batch_size=BATCH, jit_compile=True)


@pytest.mark.parametrize("flags, message", [
    ({"global_batch_size": 64}, r"--global_batch_size=64: --aggregator="),
    ({"jit_compile": True}, r"--jit_compile cannot be combined with "
                            r"--aggregator="),
    ({"rep_grad": True}, r"--rep_grad is valid for"),
])
@pytest.mark.parametrize("aggregator", ["modo", "sdmgrad"])
def test_config_refuses_what_sub_batches_cannot_do(tmp_path, aggregator,
                                                   flags, message):
  config = mtl_dist.TrainConfig(model_dir=str(tmp_path),
                                aggregator=aggregator,
                                **dict({"global_batch_size": 48}, **flags))
  with pytest.raises(mtl_dist.ConfigError, match=message):
    config.validate()


def test_aggregate_checks_the_sub_batch_shape():
  for rows in (0, 2, 4, 7):
    with pytest.raises(ValueError, match=r"\[3T, P\] matrix"):
      mtl_dist.aggregate("modo", np.ones((rows, 5), np.float32))
  _, state = mtl_dist.aggregate("sdmgrad", np.ones((6, 5), np.float32))
  assert state["weights"].shape == (2,)
