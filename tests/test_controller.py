"""The training driver: summaries, resume checks, streamed resume seeds."""

import dataclasses

from conftest import make_strategy
import numpy as np
import pytest
import tensorflow_datasets as tfds

import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist.data import tfds_features


def _config(model_dir, **changes):
  values = dict(model_dir=str(model_dir), tasks=["shape", "x"],
                train_examples=512, eval_examples=128, train_steps=20,
                steps_per_loop=20, log_every=20, eval_every=20,
                checkpoint_every=20, trunk_width=16, num_cpu_devices=2)
  values.update(changes)
  return mtl_dist.TrainConfig(**values)


def test_single_loop_call_still_reports_examples_per_second(tmp_path):
  summary = mtl_dist.train(_config(tmp_path / "one_call"))
  assert summary["examples_per_second"] > 0


def test_resume_with_reordered_tasks_is_refused(tmp_path):
  model_dir = tmp_path / "order"
  mtl_dist.train(_config(model_dir))
  with pytest.raises(mtl_dist.ConfigError,
                     match="trained the tasks shape,x, in that order"):
    mtl_dist.train(_config(model_dir, tasks=["x", "shape"], train_steps=40))


def test_streamed_pipeline_resumes_with_a_new_order(shapes_arrays):
  features, labels = shapes_arrays
  source = dataclasses.replace(
      data_lib.source_from_arrays(features, labels, ["x"]), arrays=None)
  strategy = make_strategy(1)

  def first_batch(start_step):
    dataset = data_lib.distribute_train(strategy, source, 32, seed=3,
                                        start_step=start_step)
    return next(iter(dataset))[1]["x"].numpy()

  np.testing.assert_array_equal(first_batch(0), first_batch(0))
  assert not np.array_equal(first_batch(0), first_batch(500))


def test_scalar_features_are_tasks():
  feature = tfds.features.Scalar(dtype=np.float32)
  task = tfds_features.task_from_feature("v", feature)
  assert task.kind == "regression" and task.output_size == 1
