"""Evaluating checkpoints: mtl_dist.evaluate and the mtl-eval sidecar."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

from conftest import event_tags
from conftest import time_limit
import numpy as np
import pytest

import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.run import sidecar

_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _records(model_dir: str) -> list[dict]:
  return sidecar.read_evaluations(
      os.path.join(model_dir, sidecar.EVALUATIONS_FILE))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished alternate-mode run with checkpoints at steps 20 and 40."""
  model_dir = str(tmp_path_factory.mktemp("evaluation") / "run")
  summary = mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=model_dir, mode="alternate", tasks=["shape", "x"],
      task_sizes={"shape": 512, "x": 512}, eval_examples=256,
      train_steps=40, steps_per_loop=20, checkpoint_every=20,
      trunk_width=32, strategy="one_device"))
  return model_dir, summary


def test_evaluate_reproduces_the_runs_final_eval(finished_run, tmp_path):
  source, summary = finished_run
  model_dir = str(tmp_path / "run")
  shutil.copytree(source, model_dir)
  (last,) = mtl_dist.evaluate(model_dir, num_cpu_devices=2)
  assert last.step == 40 and last.checkpoint.endswith("ckpt-40")
  for task, metrics in summary["eval"].items():
    for name, value in metrics.items():
      np.testing.assert_allclose(last.by_task()[task][name], value,
                                 rtol=1e-5)
  table = mtl_dist.format_results({"eval": last.by_task()}).splitlines()
  assert table[0].split() == ["task", "accuracy", "loss", "mae"]  # No steps.
  (earlier,) = mtl_dist.evaluate(model_dir, checkpoint="20")
  assert earlier.step == 20
  assert earlier.metrics["shape/loss"] != last.metrics["shape/loss"]
  assert [(r["step"], r["metrics"]) for r in _records(model_dir)] == [
      (40, last.metrics), (20, earlier.metrics)]
  assert {"shape/loss", "shape/accuracy", "x/mae"} <= event_tags(
      os.path.join(model_dir, "tensorboard", "sidecar"))


def test_watch_times_out_and_never_evaluates_a_step_twice(finished_run,
                                                          tmp_path):
  source, _ = finished_run
  model_dir = str(tmp_path / "run")
  shutil.copytree(source, model_dir)
  # As if the run had been resumed with more steps and had not saved yet.
  config_path = os.path.join(model_dir, "config.json")
  config = json.load(open(config_path))
  config["train_steps"] = 100
  json.dump(config, open(config_path, "w"))
  seen = []
  with pytest.raises(mtl_dist.EvalTimeout, match="has not reached step 100"):
    mtl_dist.evaluate(model_dir, watch=True, poll_seconds=0.05, timeout=0.5,
                      on_result=seen.append)
  assert [r.step for r in seen] == [40]  # The newest; 20 is skipped.
  with pytest.raises(mtl_dist.EvalTimeout):  # A restarted sidecar.
    mtl_dist.evaluate(model_dir, watch=True, poll_seconds=0.05, timeout=0.5)
  assert [r["step"] for r in _records(model_dir)] == [40]


def test_bad_requests_are_refused(finished_run, tmp_path):
  model_dir, _ = finished_run
  with pytest.raises(mtl_dist.ConfigError, match="cannot be combined"):
    mtl_dist.evaluate(model_dir, watch=True, checkpoint="20")
  with pytest.raises(mtl_dist.ConfigError, match="--checkpoint=30"):
    mtl_dist.evaluate(model_dir, checkpoint="30")
  with pytest.raises(mtl_dist.ConfigError, match="has no config.json"):
    mtl_dist.evaluate(str(tmp_path))
  with pytest.raises(mtl_dist.EvalTimeout, match="did not appear"):
    mtl_dist.evaluate(str(tmp_path), watch=True, poll_seconds=0.05,
                      timeout=0.2)
  # A run trained on data given from Python needs that data again.
  features, labels = shapes.generate(128, seed=3)
  source = mtl_dist.source_from_arrays(features, labels, ["x"])
  tasks = tuple(t for t in shapes.TASKS if t.name == "x")
  data = mtl_dist.MultiTaskData(tasks=tasks, input_shape=features.shape[1:],
                                train=(source,), eval=(source,))
  own = str(tmp_path / "own")
  summary = mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=own, train_steps=4, steps_per_loop=2,
      strategy="one_device"), data=data)
  with pytest.raises(mtl_dist.ConfigError, match="data given from Python"):
    mtl_dist.evaluate(own)
  other = dataclasses.replace(data, tasks=tuple(
      t for t in shapes.TASKS if t.name == "y"))
  with pytest.raises(mtl_dist.ConfigError, match="not the trained ones"):
    mtl_dist.evaluate(own, data=dataclasses.replace(
        other, train=(mtl_dist.source_from_arrays(features, labels, ["y"]),),
        eval=(mtl_dist.source_from_arrays(features, labels, ["y"]),)))
  (result,) = mtl_dist.evaluate(own, data=data)
  np.testing.assert_allclose(result.metrics["x/mae"],
                             summary["eval"]["x"]["mae"], rtol=1e-5)


def test_mtl_eval_refuses_bad_flags_in_one_line(finished_run):
  # The sidecar itself runs beside mtl-train in docs/running.md's shell block,
  # which tests/test_docs.py runs and checks.
  model_dir, _ = finished_run
  refused = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--model_dir={model_dir}",
       "--watch", "--checkpoint=20"],
      capture_output=True, text=True, timeout=time_limit(4), env=_ENV,
      check=False)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1] == (
      "mtl-eval: error: --checkpoint=20: cannot be combined with --watch")
