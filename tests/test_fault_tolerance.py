"""Damaged checkpoints, kept checkpoints and metrics.jsonl across restarts."""

import dataclasses
import glob
import json
import os

from conftest import make_strategy
from conftest import snapshot
import numpy as np
import pytest

import mtl_dist
from mtl_dist import data as data_lib


def _config(model_dir, **changes):
  values = dict(model_dir=str(model_dir), tasks=["shape", "x"],
                train_examples=512, eval_examples=128, train_steps=60,
                steps_per_loop=10, log_every=10, eval_every=60,
                checkpoint_every=20, keep_checkpoints=2, trunk_width=16,
                num_cpu_devices=2)
  values.update(changes)
  return mtl_dist.TrainConfig(**values)


def _checkpoint_steps(model_dir) -> list[int]:
  return sorted(int(p.rsplit("-", 1)[1].split(".")[0]) for p in
                glob.glob(os.path.join(model_dir, "checkpoints", "*.index")))


def _records(model_dir) -> list[tuple[int, str]]:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [(r["step"], r["split"]) for r in map(json.loads, f)]


def test_keep_checkpoints_is_honoured(tmp_path):
  mtl_dist.train(_config(tmp_path))
  assert _checkpoint_steps(tmp_path) == [40, 60]


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_index",
                                    "delete_data"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path, damage, caplog):
  mtl_dist.train(_config(tmp_path, train_steps=40))
  newest = os.path.join(tmp_path, "checkpoints", "ckpt-40")
  (data,) = glob.glob(newest + ".data-*")
  if damage == "truncate_data":
    os.truncate(data, os.path.getsize(data) // 2)
  elif damage == "truncate_index":
    os.truncate(newest + ".index", 10)
  else:
    os.remove(data)
  summary = mtl_dist.train(_config(tmp_path, train_steps=60))
  assert summary["step"] == 60
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "cannot be read" in
              r.getMessage()]
  assert len(warnings) == 1
  assert newest in warnings[0] and "ckpt-20" in warnings[0]
  # Resumed at 20, so steps 30 and 40 were trained and logged again, once.
  steps = [step for step, split in _records(tmp_path) if split == "train"]
  assert steps == [10, 20, 30, 40, 50, 60]
  assert _checkpoint_steps(tmp_path) == [40, 60]


def test_damaged_checkpoint_list_hides_no_checkpoint(tmp_path):
  mtl_dist.train(_config(tmp_path, train_steps=40))
  with open(os.path.join(tmp_path, "checkpoints", "checkpoint"), "w") as f:
    f.write("garbage {")
  summary = mtl_dist.train(_config(tmp_path, train_steps=60))
  assert summary["step"] == 60
  assert _checkpoint_steps(tmp_path) == [40, 60]  # Old ones still deleted.


def test_no_readable_checkpoint_is_refused_not_restarted(tmp_path):
  mtl_dist.train(_config(tmp_path, train_steps=20, keep_checkpoints=1))
  (index,) = glob.glob(os.path.join(tmp_path, "checkpoints", "*.index"))
  os.truncate(index, 10)
  with pytest.raises(mtl_dist.ConfigError, match="no checkpoint can be read"):
    mtl_dist.train(_config(tmp_path, train_steps=40))


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
  model_dir = tmp_path / "run"
  mtl_dist.train(_config(model_dir, train_steps=40))
  # As if the run had been killed after logging step 50 but before its next
  # checkpoint, mid-way through writing a line.
  with open(model_dir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 50, "split": "train", "metrics": {}}) + "\n")
    f.write('{"step": 60, "spl')
  mtl_dist.train(_config(model_dir, train_steps=60))
  assert _records(model_dir) == [
      (10, "train"), (20, "train"), (30, "train"), (40, "train"),
      (40, "eval"), (50, "train"), (60, "train"), (60, "eval")]


@pytest.mark.parametrize("replicas", [1, 2])
def test_streamed_pipeline_resumes_exactly_when_asked(shapes_arrays,
                                                      replicas):
  features, labels = shapes_arrays
  source = dataclasses.replace(  # Streamed: no arrays for the index pipeline.
      data_lib.source_from_arrays(features, labels, ["x"]), arrays=None)
  strategy = make_strategy(replicas)

  def batches(start_step, count):
    iterator = iter(data_lib.distribute_train(
        strategy, source, 32, seed=3, start_step=start_step,
        exact_resume=True))
    return [np.concatenate([v.numpy() for v in
                            strategy.experimental_local_results(
                                next(iterator)[1]["x"])])
            for _ in range(count)]

  uninterrupted = batches(0, 23)  # 512 examples: past one epoch at step 16.
  resumed = batches(20, 3)
  for step, batch in enumerate(resumed, start=20):
    np.testing.assert_array_equal(batch, uninterrupted[step])


def _with_nan_label(shapes_arrays, index: int):
  features, labels = shapes_arrays
  labels = {name: values.copy() for name, values in labels.items()}
  labels["x"][index] = np.nan
  return features, labels


@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_a_nan_on_one_replica_skips_the_step_on_every_replica(
    build_trainer, shapes_arrays, mode):
  # Example 300's x label is NaN (in alternate mode, x's dataset is examples
  # 256-511); with 2 replicas it lands on one of them.
  arrays = _with_nan_label(shapes_arrays, 300)
  results, initial = {}, None
  for replicas in (1, 2):
    trainer, iterators, _, _ = build_trainer(
        replicas=replicas, mode=mode, task_names=("shape", "x"),
        optimizer="adam", learning_rate=0.01, arrays=arrays,
        initial_weights=initial)
    initial = trainer.model.get_weights()
    variables = trainer.model.variables + [
        v for o in {id(o): o for o in trainer.optimizers.values()}.values()
        for v in o.variables]
    skipped_at = []
    for step in range(1, 41):
      before = snapshot(variables)
      skipped = trainer.train(iterators, 1).skipped
      if skipped.count:
        skipped_at.append(step)
        assert skipped.first_step == step
        assert skipped.nonfinite_losses == ["x"]
        for old, new in zip(before, snapshot(variables)):
          np.testing.assert_array_equal(old, new)  # Nothing moved.
    results[replicas] = skipped_at, snapshot(trainer.model.variables)
  skipped_at, weights = results[1]
  assert skipped_at, "the NaN example was never drawn"
  assert results[2][0] == skipped_at
  for one, two in zip(weights, results[2][1]):
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_each_checkpoint_save_records_the_steps_before_it(tmp_path):
  # Checkpoints at 30 and 60, logs every 20: a restart from step 30 must
  # find steps 21-30 recorded.
  mtl_dist.train(_config(tmp_path, log_every=20, checkpoint_every=30,
                         train_steps=60))
  assert _records(tmp_path) == [(20, "train"), (30, "train"), (40, "train"),
                                (60, "train"), (60, "eval")]
