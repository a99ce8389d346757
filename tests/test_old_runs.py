"""Run directories written by older code restore and continue unchanged.

tests/fixtures/v0_1_runs holds two small runs (joint mode with DWA and
CAGrad on 2 replicas; alternate mode with the annealed schedule and one
optimizer per task) written by the code before the package was split into
layers (see the README there). Each resumes from its step-6 checkpoint under
the current code with its own config.json, keeps every checkpoint variable,
and is read by the sidecar and the exporter.
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_runs")


def _copy(name: str, tmp_path) -> str:
  model_dir = str(tmp_path / name)
  shutil.copytree(os.path.join(FIXTURES, name), model_dir)
  return model_dir


def _saved_config(model_dir: str, **changes) -> mtl_dist.TrainConfig:
  with open(os.path.join(model_dir, "config.json")) as f:
    fields = json.load(f)
  fields.update(model_dir=model_dir, **changes)
  return mtl_dist.TrainConfig(**fields)


def _checkpoint_values(path: str) -> dict[str, np.ndarray]:
  reader = tf.train.load_checkpoint(path)
  return {name: np.asarray(reader.get_tensor(name))
          for name, _ in tf.train.list_variables(path)
          if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


@pytest.mark.parametrize("name", ["joint", "alternate"])
def test_old_run_resumes_and_keeps_its_checkpoint_layout(tmp_path, name):
  model_dir = _copy(name, tmp_path)
  checkpoints = os.path.join(model_dir, "checkpoints")
  old = _checkpoint_values(os.path.join(checkpoints, "ckpt-6"))
  summary = mtl_dist.train(_saved_config(model_dir, train_steps=9))
  assert summary["step"] == 9
  assert sum(summary["task_steps"].values()) == (18 if name == "joint" else 9)
  new = _checkpoint_values(os.path.join(checkpoints, "ckpt-9"))
  assert sorted(new) == sorted(old)  # Same variables under the same names.
  for key, value in old.items():
    assert new[key].shape == value.shape and new[key].dtype == value.dtype
  # It continued from step 6: the counters and the state carried on.
  assert new["global_step/.ATTRIBUTES/VARIABLE_VALUE"] == 9
  if name == "joint":  # DWA's windows of 2 steps: 3 complete, then 4.
    assert old["weighting/complete_windows/.ATTRIBUTES/VARIABLE_VALUE"] == 3
    assert new["weighting/complete_windows/.ATTRIBUTES/VARIABLE_VALUE"] == 4
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    steps = [(r["step"], r["split"]) for r in map(json.loads, f)]
  assert steps == [(3, "train"), (6, "train"), (6, "eval"), (9, "train"),
                   (9, "eval")]


def test_old_run_is_evaluated_and_exported(tmp_path):
  model_dir = _copy("joint", tmp_path)
  [evaluation] = mtl_dist.evaluate(model_dir)
  assert evaluation.step == 6
  with open(os.path.join(model_dir, "summary.json")) as f:
    written = json.load(f)["eval"]
  for task, metrics in written.items():
    for metric, value in metrics.items():
      assert evaluation.metrics[f"{task}/{metric}"] == pytest.approx(
          value, rel=1e-5)
  export_dir = str(tmp_path / "export")
  mtl_dist.export_run(model_dir, export_dir)
  outputs = mtl_dist.predict(export_dir, np.zeros((2, 32, 32, 1), np.float32))
  assert set(outputs) == {"shape_logits", "shape_probabilities",
                          "shape_class", "x_prediction"}
  assert outputs["shape_probabilities"].shape == (2, 3)
