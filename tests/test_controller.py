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
                     match=r"--tasks=x,shape \(the run's: --tasks=shape,x\)"):
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


def test_the_eta_leaves_out_the_first_loop_calls_tracing(tmp_path,
                                                         monkeypatch, caplog):
  from mtl_dist.loop import run_files  # pylint: disable=g-import-not-at-top
  from mtl_dist.run import console  # pylint: disable=g-import-not-at-top
  clock = [100.0]
  monkeypatch.setattr(run_files.time, "perf_counter", lambda: clock[0])
  writer = run_files.MetricsWriter(str(tmp_path), total_steps=100,
                                   start_step=0)
  with console.progress_lines(True), caplog.at_level("INFO"):
    clock[0] += 30.0  # The first loop call: 10 steps, mostly tracing.
    writer.warmed_up(10)
    writer.progress(10, {"a": 1.0}, 21.0)
    clock[0] += 2.0  # 10 more steps in 2 s: 0.2 s per step.
    writer.warmed_up(20)  # Only the first call counts.
    writer.progress(20, {"a": 0.5}, 320.0)
    writer.evaluated(20, {"a/loss": 0.25, "a/accuracy": 0.875, "b/mae": 2.0})
  writer.close()
  messages = [record.getMessage() for record in caplog.records]
  assert messages == [
      "step 10/100 | loss a=1 | 21 examples/s | ETA ?",
      "step 20/100 | loss a=0.5 | 320 examples/s | ETA 0:00:16",
      "step 20 eval | a: loss=0.25 accuracy=0.875 | b: mae=2"]
