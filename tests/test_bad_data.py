"""Bad data: refused before training (exit 2) or caught while training (1)."""

import dataclasses
import os

from conftest import train_launcher_failing_with
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist.data import shapes

_SPECS = {task.name: task for task in shapes.TASKS}


def _data(features, labels, task_names=("shape", "x"), streamed=False,
          eval_size=64):
  """Joint-mode data: training on all examples, eval on the first few."""
  train = data_lib.source_from_arrays(features, labels, task_names)
  evaluation = data_lib.source_from_arrays(
      features[:eval_size], {k: v[:eval_size] for k, v in labels.items()},
      task_names)
  if streamed:  # No arrays: read as a stream, like TFDS data.
    train = dataclasses.replace(train, arrays=None)
  return mtl_dist.MultiTaskData(
      tasks=tuple(_SPECS[name] for name in task_names),
      input_shape=features.shape[1:], train=(train,), eval=(evaluation,))


@pytest.fixture
def arrays(shapes_arrays):
  features, labels = shapes_arrays
  return features.copy(), {k: v.copy() for k, v in labels.items()}


@pytest.mark.parametrize("damage, message", [
    (lambda f, l: l["shape"].__setitem__(7, 5),
     "task 'shape' has class label 5 in 1 example.*head has 3 classes"),
    (lambda f, l: l["shape"].__setitem__(7, -1),
     "task 'shape' has negative or NaN class labels in 1 example.*"
     "--partial_labels"),
    (lambda f, l: l["x"].__setitem__(3, np.nan),
     "task 'x' has NaN or Inf targets in 1 example"),
    (lambda f, l: f.__setitem__(9, np.inf), "1 example\\(s\\) have NaN or Inf "
     "inputs"),
])
def test_bad_in_memory_data_is_refused_before_training(arrays, damage,
                                                       message):
  features, labels = arrays
  damage(features, labels)
  with pytest.raises(mtl_dist.ConfigError,
                     match="training data of task\\(s\\) shape, x: " +
                     message):
    data_lib.check(_data(features, labels), partial_labels=False)


def test_partial_labels_allow_missing_ones_but_not_none_at_all(arrays):
  features, labels = arrays
  labels["x"][100:200] = np.nan
  data_lib.check(_data(features, labels), partial_labels=True)
  labels["x"][:] = np.nan
  with pytest.raises(mtl_dist.ConfigError,
                     match="no example carries a label of task 'x'"):
    data_lib.check(_data(features, labels), partial_labels=True)


def test_masked_labels_are_not_checked_and_absent_labels_are_named(arrays):
  features, labels = arrays
  labels["shape_mask"] = np.ones(len(features), np.float32)
  labels["shape"][5], labels["shape_mask"][5] = 99, 0  # Never read.
  data_lib.check(_data(features, labels), partial_labels=True)
  del labels["x"]
  with pytest.raises(mtl_dist.ConfigError,
                     match="the examples carry no labels of task 'x'"):
    data_lib.check(_data(features, labels), partial_labels=True)


def test_empty_data_and_other_input_shapes_are_refused(arrays):
  features, labels = arrays
  empty = _data(features[:0], {k: v[:0] for k, v in labels.items()},
                eval_size=0)
  with pytest.raises(mtl_dist.ConfigError, match="no examples"):
    data_lib.check(empty, partial_labels=False)
  other = dataclasses.replace(_data(features, labels), input_shape=(16, 16, 1))
  with pytest.raises(mtl_dist.ConfigError,
                     match=r"inputs have shape \(32, 32, 1\), the model's "
                     r"input is \(16, 16, 1\)"):
    data_lib.check(other, partial_labels=False)


def test_inputs_of_another_dtype_are_refused(arrays):
  features, labels = arrays
  data = _data(features, labels)
  other = data_lib.source_from_arrays(
      features[:64].astype(np.float64),
      {k: v[:64] for k, v in labels.items()}, ["shape", "x"])
  with pytest.raises(mtl_dist.ConfigError,
                     match="eval data of task\\(s\\) shape, x: inputs are "
                     "float64, those of the training data .* are float32"):
    data_lib.check(dataclasses.replace(data, eval=(other,)),
                   partial_labels=False)


def test_streamed_data_is_checked_on_its_first_batch(arrays):
  features, labels = arrays
  labels["shape"][3] = 9
  with pytest.raises(mtl_dist.ConfigError, match="class label 9"):
    data_lib.check(_data(features, labels, streamed=True),
                   partial_labels=False)


def _config(model_dir):
  return mtl_dist.TrainConfig(
      model_dir=str(model_dir), tasks=["shape", "x"], train_steps=40,
      steps_per_loop=10, log_every=10, eval_every=40, checkpoint_every=10,
      trunk_width=16, global_batch_size=32)


def test_train_refuses_bad_data_before_writing_anything(tmp_path, arrays,
                                                        monkeypatch):
  features, labels = arrays
  labels["shape"][0] = 3
  monkeypatch.setattr(data_lib, "load",
                      lambda config: _data(features, labels))
  with pytest.raises(mtl_dist.ConfigError, match="class label 3"):
    mtl_dist.train(_config(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_a_bad_label_past_the_first_batch_stops_training(tmp_path, arrays,
                                                         monkeypatch):
  features, labels = arrays
  labels["shape"][400] = 7  # Past the first batch the up-front check reads.
  monkeypatch.setattr(data_lib, "load",
                      lambda config: _data(features, labels, streamed=True))
  with pytest.raises(mtl_dist.DataError,
                     match=r"bad data near step \d+: task 'shape': class "
                     r"labels must be in \[0, 3\)"):
    mtl_dist.train(_config(tmp_path / "run"))


def test_the_launcher_exits_1_on_bad_data(monkeypatch, capsys):
  assert train_launcher_failing_with(
      monkeypatch, capsys,
      mtl_dist.DataError("bad data near step 12: task 'shape': ...")) == (
          1, "mtl-train: error: bad data near step 12: task 'shape': ...\n")


def test_class_labels_that_are_not_whole_numbers_are_refused(arrays):
  features, labels = arrays
  labels["shape"] = labels["shape"].astype(np.float32)
  labels["shape"][5] = 0.5
  labels["shape"][6] = 1.5
  with pytest.raises(mtl_dist.ConfigError,
                     match="task 'shape' has class label 0.5 in 2 example\\(s\\)"
                     "; class labels are whole numbers"):
    data_lib.check(_data(features, labels), partial_labels=False)
  labels["shape"][5:7] = 1.0  # Whole numbers stored as floats are classes.
  data_lib.check(_data(features, labels), partial_labels=False)


def test_targets_wider_than_the_head_are_refused(arrays):
  features, labels = arrays
  labels["x"] = np.repeat(labels["x"].reshape(-1, 1), 3, axis=1)  # [N, 3].
  with pytest.raises(mtl_dist.ConfigError,
                     match="task 'x' has targets of shape \\(\\d+, 3\\), 3 "
                     "number\\(s\\) per example; its head predicts 1"):
    data_lib.check(_data(features, labels), partial_labels=False)


def test_class_labels_of_several_numbers_per_example_are_refused(arrays):
  features, labels = arrays
  labels["shape"] = np.stack([labels["shape"]] * 2, axis=1)
  with pytest.raises(mtl_dist.ConfigError,
                     match="class labels of shape \\(\\d+, 2\\): one class "
                     "number per example"):
    data_lib.check(_data(features, labels), partial_labels=False)


def test_a_pipeline_that_fails_mid_stream_is_a_data_error(tmp_path, arrays,
                                                          monkeypatch):
  features, labels = arrays
  data = _data(features, labels, streamed=True)
  source = data.train[0]

  def fail_at_300(i, example):  # Past the checked first batch.
    features, example_labels = example
    check = tf.debugging.assert_less(i, tf.constant(300, tf.int64),
                                     message="decoding failed")
    with tf.control_dependencies([check]):
      return tf.identity(features), example_labels

  failing = lambda: source.make_dataset().enumerate().map(fail_at_300)

  data = dataclasses.replace(
      data, train=(dataclasses.replace(source, make_dataset=failing),))
  monkeypatch.setattr(data_lib, "load", lambda config: data)
  with pytest.raises(mtl_dist.DataError,
                     match="the input pipeline failed near step \\d+: .*"
                     "decoding failed"):
    mtl_dist.train(_config(tmp_path / "run"))


def test_a_dataset_of_unknown_size_that_never_ends_is_refused(monkeypatch):
  from mtl_dist.data import sources  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sources, "MAX_COUNTED", 100_000)
  endless = tf.data.Dataset.range(1).repeat().map(
      lambda i: (tf.zeros([2]), {"t": tf.zeros([])})).filter(
          lambda x, y: True)  # filter(): tf.data no longer knows the size.
  assert int(endless.cardinality()) == tf.data.UNKNOWN_CARDINALITY
  with pytest.raises(mtl_dist.ConfigError,
                     match="did not end within 100000 examples"):
    mtl_dist.source_from_dataset(endless, ["t"])
  finite = tf.data.Dataset.range(1000).map(
      lambda i: (tf.zeros([2]), {"t": tf.zeros([])})).filter(lambda x, y: True)
  assert mtl_dist.source_from_dataset(finite, ["t"]).num_examples == 1000
