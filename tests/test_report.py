"""report.png: mtl_dist.write_report and mtl-report."""

import json
import os
import subprocess
import sys

from conftest import time_limit
from matplotlib import image
import pytest

import mtl_dist
from mtl_dist.run import report


def _train(model_dir: str, **settings) -> None:
  mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=model_dir, tasks=["shape", "x"], train_steps=40,
      steps_per_loop=10, log_every=10, eval_every=20, trunk_width=16,
      eval_examples=128, strategy="one_device", **settings))


def _rows(path: str) -> float:
  """The report's panel rows, from its height (2.6 inches at 90 dpi each)."""
  return image.imread(path).shape[0] / (2.6 * 90)


def test_report_draws_a_row_per_task_plus_shares_and_changing_weights(
    tmp_path):
  alternate = str(tmp_path / "alternate")
  _train(alternate, mode="alternate", task_sizes={"shape": 256, "x": 128},
         schedule="proportional")
  path = mtl_dist.write_report(alternate)
  assert path == os.path.join(alternate, "report.png")
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert _rows(path) == pytest.approx(3)  # shape, x, the step shares.

  joint = str(tmp_path / "joint")
  _train(joint, train_examples=512)  # Static weights: no weights panel.
  assert _rows(mtl_dist.write_report(joint, str(tmp_path / "j.png"))) == (
      pytest.approx(2))
  dwa = str(tmp_path / "dwa")
  _train(dwa, train_examples=512, weighting="dwa", dwa_window=5)
  assert _rows(mtl_dist.write_report(dwa)) == pytest.approx(3)


def test_without_matplotlib_or_metrics_the_report_is_refused(tmp_path,
                                                             monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails.
  with pytest.raises(mtl_dist.ConfigError, match=r"mtl_dist\[report\]"):
    mtl_dist.write_report(str(tmp_path))
  monkeypatch.undo()
  done = subprocess.run(
      [sys.executable, "-m", "launch.report", f"--model_dir={tmp_path}"],
      capture_output=True, text=True, timeout=time_limit(4), check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
      f"mtl-report: error: --model_dir={tmp_path}: has no metrics.jsonl; is "
      "it an mtl-train run?")


def test_gated_runs_get_an_expert_utilisation_row(tmp_path):
  model_dir = str(tmp_path / "cgc")
  _train(model_dir, mode="alternate", architecture="cgc",
         num_shared_experts=2, num_task_experts=1)
  records = [json.loads(line)
             for line in open(os.path.join(model_dir, "metrics.jsonl"))]
  experts, utilisation = report.expert_utilisation(records, ["shape", "x"])
  assert experts == ["shared0", "shared1", "own0"]
  last = [r for r in records if r["split"] == "train"][-1]["metrics"]
  assert utilisation == [[last[f"{task}/gate/{expert}"] for expert in experts]
                         for task in ("shape", "x")]
  for weights in utilisation:  # Each task's gate mixes its experts.
    assert sum(weights) == pytest.approx(1.0, rel=1e-5)
  # shape, x, the step shares, the experts.
  assert _rows(mtl_dist.write_report(model_dir)) == pytest.approx(4)


def test_each_tasks_utilisation_comes_from_its_latest_measurement():
  records = [
      {"step": 10, "split": "train", "metrics": {
          "a/gate/expert0": 0.25, "a/gate/expert1": 0.75,
          "b/gate/expert0": 0.5, "b/gate/expert1": 0.5}},
      {"step": 20, "split": "train", "metrics": {  # b not trained here.
          "a/gate/expert0": 0.125, "a/gate/expert1": 0.875}},
      {"step": 20, "split": "eval", "metrics": {"a/loss": 1.0}},
  ]
  assert report.expert_utilisation(records, ["a", "b", "c"]) == (
      ["expert0", "expert1"],
      [[0.125, 0.875], [0.5, 0.5], [pytest.approx(float("nan"), nan_ok=True)] * 2])
  assert report.expert_utilisation(records[2:], ["a"]) == ([], [])
