"""report.png: mtl_dist.write_report and mtl-report."""

import json
import os
import shutil
import subprocess
import sys

from conftest import time_limit
from matplotlib import colors
from matplotlib import image
from matplotlib import text
import pytest

import mtl_dist
from mtl_dist.loop import run_files
from mtl_dist.run import report
from mtl_dist.run import sidecar


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


# The four pictures of issue 21: a short and a long joint run, an alternate
# run, and runs evaluated by a sidecar or by a one-shot mtl-eval.


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
  """A 40-step joint run, evaluated at 20 and 40, checkpointed at both."""
  model_dir = str(tmp_path_factory.mktemp("report") / "joint")
  _train(model_dir, train_examples=512, checkpoint_every=20)
  return model_dir


def _copy(model_dir: str, tmp_path) -> str:
  copy = str(tmp_path / "run")
  shutil.copytree(model_dir, copy)
  return copy


def _panels(fig) -> dict:
  return {axes.get_title(): axes for axes in fig.axes}


def _series(model_dir: str, split: str, key: str) -> tuple[list, list]:
  """A key's (steps, values) in metrics.jsonl's records of `split`."""
  records = [r for r in run_files.read_records(
      os.path.join(model_dir, "metrics.jsonl"))
             if r["split"] == split and key in r["metrics"]]
  return [r["step"] for r in records], [r["metrics"][key] for r in records]


def _check_figure(fig, train_steps: int) -> None:
  """What every report must hold, whatever the run.

  One colour per source (a line's gid) in every panel, each source present
  named once in the figure's legend in its colour; step axes share the
  run's range; each curve's last value written beside its last point.
  """
  step_axes = [axes for axes in fig.axes if axes.get_xlabel() == "step"]
  lines = [line for axes in step_axes for line in axes.get_lines()]
  colours = {}
  for line in lines:
    colours.setdefault(line.get_gid(), set()).add(line.get_color())
  sources = {split: (label, colour)
             for split, label, colour in report.SOURCES}
  shown = [split for split in sources if split in colours]
  for split in shown:
    assert colours[split] == {sources[split][1]}, split
  (legend,) = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == [
      sources[split][0] for split in shown]
  assert [h.get_color() for h in legend.legend_handles] == [
      sources[split][1] for split in shown]
  assert len({sources[split][1] for split in sources}) == len(sources)
  limits = {axes.get_xlim() for axes in step_axes}
  assert len(limits) == 1, limits
  ((low, high),) = limits
  assert low <= 0 < train_steps <= high < 1.1 * train_steps
  for axes in step_axes:
    labels = [t for t in axes.texts if isinstance(t, text.Annotation)]
    for line in axes.get_lines():
      step, value = line.get_xdata()[-1], line.get_ydata()[-1]
      (label,) = [t for t in labels if t.xy == (step, value) and
                  t.get_color() == line.get_color()]
      assert float(label.get_text()) == pytest.approx(value, rel=5e-3)
      if len(line.get_xdata()) == 1:  # A lone point shows.
        assert line.get_marker() not in ("", "None", None)


def test_a_short_joint_run_lines_up_train_and_eval(joint_run):
  fig = report.report_figure(joint_run)
  _check_figure(fig, train_steps=40)
  panels = _panels(fig)
  assert set(panels) == {"shape: loss", "shape: eval accuracy", "x: loss",
                         "x: eval mae"}
  loss = panels["shape: loss"]
  assert [line.get_gid() for line in loss.get_lines()] == ["train", "eval"]
  for line, split in zip(loss.get_lines(), ("train", "eval")):
    steps, values = _series(joint_run, split, "shape/loss")
    assert list(line.get_xdata()) == steps and steps[-1] == 40
    assert list(line.get_ydata()) == values
  assert [line.get_gid() for line in panels["x: eval mae"].get_lines()] == [
      "eval"]
  assert not any(axes.get_legend() for axes in fig.axes)  # Said once.


def test_a_one_shot_evaluation_is_no_sidecar_and_spans_the_run(joint_run,
                                                               tmp_path):
  model_dir = _copy(joint_run, tmp_path)
  (one_shot,) = mtl_dist.evaluate(model_dir, checkpoint="20")
  (record,) = sidecar.read_evaluations(
      os.path.join(model_dir, "evaluations.jsonl"))
  assert record["watch"] is False and record["step"] == 20
  fig = report.report_figure(model_dir)
  _check_figure(fig, train_steps=40)
  texts = [t.get_text() for t in fig.legends[0].get_texts()] + [
      line.get_label() for axes in fig.axes for line in axes.get_lines()]
  assert "mtl-eval" in texts
  assert not any("sidecar" in t for t in texts), texts
  accuracy = _panels(fig)["shape: eval accuracy"]
  (lone,) = [line for line in accuracy.get_lines()
             if line.get_gid() == "mtl-eval"]
  assert list(lone.get_xdata()) == [20]  # One point, on the run's range.
  assert list(lone.get_ydata()) == [one_shot.metrics["shape/accuracy"]]
  low, high = accuracy.get_xlim()
  assert low <= 0 and high >= 40


def test_a_sidecars_evaluations_are_labelled_sidecar(joint_run, tmp_path):
  model_dir = _copy(joint_run, tmp_path)
  mtl_dist.evaluate(model_dir, checkpoint="20")
  mtl_dist.evaluate(model_dir, watch=True, poll_seconds=0)  # Evaluates 40.
  records = sidecar.read_evaluations(
      os.path.join(model_dir, "evaluations.jsonl"))
  assert [(r["step"], r["watch"]) for r in records] == [(20, False),
                                                        (40, True)]
  fig = report.report_figure(model_dir)
  _check_figure(fig, train_steps=40)
  assert [line.get_gid() for line in _panels(fig)["x: loss"].get_lines()] == [
      "train", "eval", "sidecar", "mtl-eval"]
  # Files written before the "watch" field: "mtl-eval", which is true of
  # both kinds.
  with open(os.path.join(model_dir, "evaluations.jsonl"), "w") as f:
    for record in records:
      f.write(json.dumps({k: v for k, v in record.items() if k != "watch"})
              + "\n")
  fig = report.report_figure(model_dir)
  assert [line.get_gid() for line in _panels(fig)["x: loss"].get_lines()] == [
      "train", "eval", "mtl-eval"]


def test_a_long_run_records_as_training_writes_them(joint_run, tmp_path):
  """3000 steps of records, written by the writer training uses."""
  model_dir = _copy(joint_run, tmp_path)
  config_path = os.path.join(model_dir, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  with open(config_path, "w") as f:
    json.dump(dict(config, train_steps=3000, log_every=100,
                   eval_every=1000), f)
  train_keys = run_files.read_records(
      os.path.join(model_dir, "metrics.jsonl"))[-2]["metrics"]
  os.remove(os.path.join(model_dir, "metrics.jsonl"))
  writer = run_files.MetricsWriter(model_dir, total_steps=3000, start_step=0)
  for step in range(100, 3001, 100):
    writer.write(step, "train", {key: 1.0 / step for key in train_keys})
    if step % 1000 == 0:
      writer.write(step, "eval", {"shape/loss": 2.0 / step,
                                  "shape/accuracy": step / 4000,
                                  "x/loss": 3.0 / step, "x/mae": 0.5})
  writer.close()
  fig = report.report_figure(model_dir)
  _check_figure(fig, train_steps=3000)
  panels = _panels(fig)
  train, evaluation = panels["shape: loss"].get_lines()
  assert list(train.get_xdata()) == list(range(100, 3001, 100))
  assert list(evaluation.get_xdata()) == [1000, 2000, 3000]
  assert panels["shape: loss"].get_yscale() == "log"
  (accuracy,) = panels["shape: eval accuracy"].get_lines()
  assert list(accuracy.get_ydata()) == [0.25, 0.5, 0.75]


def test_a_run_that_logged_once_shows_its_point_on_the_whole_range(
    joint_run, tmp_path):
  model_dir = _copy(joint_run, tmp_path)
  last = run_files.read_records(os.path.join(model_dir, "metrics.jsonl"))[-2]
  assert last["split"] == "train" and last["step"] == 40
  os.remove(os.path.join(model_dir, "metrics.jsonl"))
  writer = run_files.MetricsWriter(model_dir, total_steps=40, start_step=0)
  writer.write(40, "train", last["metrics"])
  writer.close()
  fig = report.report_figure(model_dir)
  _check_figure(fig, train_steps=40)
  loss = _panels(fig)["shape: loss"]
  (train,) = loss.get_lines()
  assert list(train.get_xdata()) == [40]
  assert train.get_marker() not in ("", "None", None)
  low, high = loss.get_xlim()
  assert low <= 0 and high >= 40
  metrics = _panels(fig)["shape: eval metrics"]
  assert not metrics.get_lines()
  assert [t.get_text() for t in metrics.texts] == ["no evaluation recorded"]


def test_an_alternate_run_shows_each_tasks_share_in_its_colour(tmp_path):
  model_dir = str(tmp_path / "alternate")
  _train(model_dir, mode="alternate", task_sizes={"shape": 256, "x": 128},
         schedule="proportional")
  fig = report.report_figure(model_dir)
  _check_figure(fig, train_steps=40)
  shares = _panels(fig)[
      "share of the steps of each logged interval (stacked)"]
  assert shares.get_xlabel() == "step"  # Shares the x axis too.
  legend = shares.get_legend()
  assert [t.get_text() for t in legend.get_texts()] == ["shape", "x"]
  bands = shares.collections
  assert [b.get_facecolor()[0][:3].tolist() for b in bands] == [
      list(colors.to_rgb(h.get_color())) for h in legend.legend_handles]
  # Each task's last share, written in its colour at its band's middle.
  labels = [t for t in shares.texts if isinstance(t, text.Annotation)]
  below = 0.0
  for task, handle in zip(("shape", "x"), legend.legend_handles):
    steps, values = _series(model_dir, "train", f"{task}/share")
    (label,) = [t for t in labels if t.get_color() == handle.get_color()]
    assert label.xy == pytest.approx((steps[-1], below + values[-1] / 2))
    assert float(label.get_text()) == pytest.approx(values[-1], rel=5e-3)
    below += values[-1]
  assert below == pytest.approx(1.0)

  # A run in progress whose only record so far is an evaluation: the shares
  # panel says so instead of failing.
  records = run_files.read_records(os.path.join(model_dir, "metrics.jsonl"))
  os.remove(os.path.join(model_dir, "metrics.jsonl"))
  writer = run_files.MetricsWriter(model_dir, total_steps=40, start_step=0)
  (evaluation,) = [r for r in records if r["split"] == "eval"][-1:]
  writer.write(evaluation["step"], "eval", evaluation["metrics"])
  writer.close()
  fig = report.report_figure(model_dir)
  shares = _panels(fig)["share of the steps of each logged interval"]
  assert [t.get_text() for t in shares.texts] == ["no train record yet"]
