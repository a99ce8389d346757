"""Data: the shapes generator, dataset splits and the input pipelines."""

from conftest import make_strategy
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist.data import shapes


def test_shapes_is_deterministic_and_prefix_stable():
  images, labels = shapes.generate(300, seed=5)
  again, again_labels = shapes.generate(300, seed=5)
  longer, longer_labels = shapes.generate(500, seed=5)
  other, _ = shapes.generate(300, seed=6)
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(images, longer[:300])
  for name in shapes.TASK_NAMES:
    np.testing.assert_array_equal(labels[name], again_labels[name])
    np.testing.assert_array_equal(labels[name], longer_labels[name][:300])
  assert not np.array_equal(images, other)


def test_shapes_values_and_label_layout():
  images, labels = shapes.generate(600, seed=0)
  assert images.shape == (600, 32, 32, 1) and images.dtype == np.float32
  assert images.min() >= 0.0 and images.max() <= 1.0
  assert (images.reshape(600, -1).max(axis=1) == 1.0).all(), "empty image"
  assert labels["shape"].dtype == np.int32
  assert set(np.unique(labels["shape"])) == {0, 1, 2}
  for name in ("scale", "orientation", "x", "y"):
    assert labels[name].shape == (600, 1)
    assert labels[name].min() >= 0.0 and labels[name].max() <= 1.0
  # Larger scale draws more ink: the label is visible in the picture.
  ink = images.reshape(600, -1).sum(axis=1)
  assert np.corrcoef(ink, labels["scale"][:, 0])[0, 1] > 0.8


def _rows(source):
  return {row.tobytes() for row in source.arrays[0].reshape(
      source.num_examples, -1)}


def test_joint_load_has_disjoint_train_and_eval():
  config = mtl_dist.TrainConfig(model_dir="unused", train_examples=1000,
                                eval_examples=300, tasks=["shape", "x"])
  data = data_lib.load(config.data_config())
  (train,), (evaluation,) = data.train, data.eval
  assert train.num_examples == 1000 and evaluation.num_examples == 300
  assert train.task_names == ("shape", "x")
  assert set(train.arrays[1]) == {"shape", "x"}
  assert not _rows(train) & _rows(evaluation)


def test_alternate_load_gives_each_task_its_own_disjoint_dataset():
  config = mtl_dist.TrainConfig(model_dir="unused", mode="alternate",
                                tasks=["shape", "scale", "x"],
                                eval_examples=200)
  data = data_lib.load(config.data_config())
  sizes = [source.num_examples for source in data.train]
  assert sizes == [8192, 4096, 2048]  # Several-fold apart by default.
  for source, name in zip(data.train, ["shape", "scale", "x"]):
    assert source.task_names == (name,)
    assert set(source.arrays[1]) == {name}
  pieces = [_rows(source) for source in data.train] + [_rows(data.eval[0])]
  for i, first in enumerate(pieces):
    for second in pieces[i + 1:]:
      assert not first & second

  config.task_sizes = {"shape": 300, "x": 50}
  sizes = [source.num_examples for source in data_lib.load(config.data_config()).train]
  assert sizes == [300, 4096, 50]


def _global_batches(strategy, source, global_batch_size, steps, start_step=0):
  """The labels of each step's global batch, replicas concatenated in order."""
  iterator = iter(data_lib.distribute_train(strategy, source,
                                            global_batch_size, seed=3,
                                            start_step=start_step))
  batches = []
  for _ in range(steps):
    _, labels = next(iterator)
    parts = strategy.experimental_local_results(labels["x"])
    batches.append(np.concatenate([p.numpy() for p in parts])[:, 0])
  return batches


def test_replicas_consume_the_same_global_batches_as_one_device():
  x = np.arange(100, dtype=np.float32)[:, None]
  source = data_lib.source_from_arrays(np.zeros((100, 2), np.float32),
                                       {"x": x}, ["x"])
  single = _global_batches(make_strategy(1), source, 24, 9)
  for replicas in (2, 4):
    multi = _global_batches(make_strategy(replicas), source, 24, 9)
    for got, want in zip(multi, single):
      np.testing.assert_array_equal(got, want)
  # Each epoch is a permutation: the first 96 examples are all different.
  seen = np.concatenate(single)[:96]
  assert len(set(seen.tolist())) == 96
  # A pipeline started at step 5 continues the same sequence.
  resumed = _global_batches(make_strategy(2), source, 24, 4, start_step=5)
  for got, want in zip(resumed, single[5:]):
    np.testing.assert_array_equal(got, want)


def _reference_global_batches(num_examples, global_batch_size, steps,
                              start_step=0, seed=3):
  """The documented order: step k's global batch is the k-th run of
  `global_batch_size` indices of the per-epoch permutations, seeded by
  (seed, epoch), laid end to end."""
  needed = (start_step + steps) * global_batch_size
  epochs = -(-needed // num_examples)
  stream = np.concatenate([
      tf.random.experimental.stateless_shuffle(
          tf.range(num_examples, dtype=tf.int64),
          seed=tf.constant([seed, epoch], tf.int64)).numpy()
      for epoch in range(epochs)])
  start = start_step * global_batch_size
  return [stream[start + k * global_batch_size:
                 start + (k + 1) * global_batch_size]
          for k in range(steps)]


@pytest.mark.parametrize("gather_bytes", [1, 24 * 8 * 3, 1 << 30])
def test_index_pipeline_follows_the_permutation_stream(monkeypatch,
                                                       gather_bytes):
  # One step per gather, three (chunks end mid-epoch: 100 examples), and
  # at most an epoch's worth (4 steps of 24).
  from mtl_dist.data import pipelines  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(pipelines, "_GATHER_BYTES", gather_bytes)
  x = np.arange(100, dtype=np.float32)[:, None]  # 4 + 4 bytes per example.
  source = data_lib.source_from_arrays(np.zeros((100, 1), np.float32),
                                       {"x": x}, ["x"])
  want = _reference_global_batches(100, 24, 13)
  for replicas in (1, 2, 4):
    got = _global_batches(make_strategy(replicas), source, 24, 13)
    for step, (got_batch, want_batch) in enumerate(zip(got, want)):
      np.testing.assert_array_equal(got_batch, want_batch,
                                    err_msg=f"{replicas} replicas, step {step}")
  resumed = _global_batches(make_strategy(2), source, 24, 6, start_step=7)
  for got_batch, want_batch in zip(
      resumed, _reference_global_batches(100, 24, 6, start_step=7)):
    np.testing.assert_array_equal(got_batch, want_batch)


def test_one_host_device_reads_the_dataset_without_a_distributed_wrapper():
  source = data_lib.source_from_arrays(np.zeros((10, 1), np.float32),
                                       {"x": np.zeros((10, 1), np.float32)},
                                       ["x"])
  one_device = data_lib.distribute_train(make_strategy(1), source, 4, seed=0)
  assert isinstance(one_device, tf.data.Dataset)
  features, labels = next(iter(one_device))
  assert features.shape == (4, 1) and labels["x"].shape == (4, 1)
  mirrored = data_lib.distribute_train(make_strategy(2), source, 4, seed=0)
  assert not isinstance(mirrored, tf.data.Dataset)


def test_source_from_arrays_rejects_mismatched_lengths():
  with pytest.raises(mtl_dist.ConfigError,
                     match=r"labels of 'x' have shape \(3, 1\), not 4 rows"):
    data_lib.source_from_arrays(np.zeros((4, 2)), {"x": np.zeros((3, 1))},
                                ["x"])


def test_task_spec_validates_its_fields():
  with pytest.raises(ValueError, match="num_classes"):
    mtl_dist.TaskSpec("a", "classification", num_classes=1)
  with pytest.raises(ValueError, match="kind"):
    mtl_dist.TaskSpec("a", "ranking", size=1)
  with pytest.raises(ValueError, match="loss"):
    mtl_dist.TaskSpec("a", "regression", size=2, loss="crossentropy")
  spec = mtl_dist.TaskSpec("a", "regression", size=2, loss="mae")
  assert spec.output_size == 2 and spec.metric_names == ("mae",)
  loss = spec.per_example_loss(tf.constant([[1.0, 2.0]]),
                               tf.constant([[0.0, 4.0]]))
  np.testing.assert_allclose(loss.numpy(), [1.5])


def test_toy_regression_follows_its_formula():
  from mtl_dist.data import toy_regression  # pylint: disable=g-import-not-at-top
  inputs, labels = toy_regression.generate(300, seed=4)
  again, _ = toy_regression.generate(500, seed=4)
  np.testing.assert_array_equal(inputs, again[:300])
  assert inputs.shape == (300, 250) and set(labels) == set(
      toy_regression.TASK_NAMES)
  for name, sigma in zip(toy_regression.TASK_NAMES, toy_regression.SIGMAS):
    assert labels[name].shape == (300, 100)
    assert np.abs(labels[name]).max() <= sigma * (1 + 1e-6)
  scales = [np.abs(labels[n]).mean() for n in toy_regression.TASK_NAMES]
  np.testing.assert_allclose(np.array(scales) / scales[0],
                             np.array(toy_regression.SIGMAS), rtol=0.1)
  assert toy_regression.SIGMAS[-1] / toy_regression.SIGMAS[0] == 100.0


def test_load_takes_the_data_section_only():
  config = mtl_dist.TrainConfig(model_dir="unused")
  with pytest.raises(TypeError, match="DataConfig"):
    data_lib.load(config)
