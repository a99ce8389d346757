"""report.png: a run's curves, from its metrics.jsonl and evaluations.jsonl.

One row per task: its training and eval loss (left) and its eval metrics
(right). Below them, in alternate mode, each task's share of the steps of
every logged interval; when they change, the task weights; and for gated
architectures (mmoe, cgc, ple, dselect_k) each task's mean gate weight per
expert over the last logged interval (are the experts used at all?). Needs
matplotlib (`pip install "mtl_dist[report]"`); training does not.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import tensorflow as tf

from mtl_dist import errors
from mtl_dist import typecheck
from mtl_dist.loop import run_files
from mtl_dist.run import saved_run
from mtl_dist.run import sidecar

REPORT_FILE = "report.png"


def _series(records: list[dict[str, Any]], split: str,
            key: str) -> tuple[list[int], list[float]]:
  points = sorted({r["step"]: r["metrics"][key] for r in records
                   if r.get("split") == split and key in r["metrics"]}.items())
  return [p[0] for p in points], [p[1] for p in points]


def expert_utilisation(records: list[dict[str, Any]], tasks: list[str]
                       ) -> tuple[list[str], list[list[float]]]:
  """Each task's mean gate weight per expert in its latest train record.

  In alternate mode a task's gates are measured only in intervals that
  trained it, so each task's row comes from the latest record that has it.

  Args:
    records: metrics.jsonl's records.
    tasks: The tasks, in order.

  Returns:
    (the experts, in order of first appearance; per task, its weight of each
    expert, NaN for an expert its gates do not mix or a task never
    measured). Empty without gates.
  """
  train = sorted((r for r in records if r.get("split") == "train"),
                 key=lambda r: r["step"])
  latest = {}
  experts = []
  for record in train:
    for key in record["metrics"]:
      task, _, expert = key.partition("/gate/")
      if expert and task in tasks:
        latest[task] = record["metrics"]
        if expert not in experts:
          experts.append(expert)
  if not experts:
    return [], []
  return experts, [[latest.get(task, {}).get(f"{task}/gate/{expert}",
                                             float("nan"))
                    for expert in experts] for task in tasks]


def _read_metrics(model_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(model_dir, run_files.METRICS_FILE)
  if not tf.io.gfile.exists(path):
    raise errors.ConfigError(f"--model_dir={model_dir}: has no "
                             "metrics.jsonl; is it an mtl-train run?")
  return run_files.read_records(path)


@typecheck.checked
def write_report(model_dir: str, output: Optional[str] = None) -> str:
  """Draws the run's curves into a PNG.

  Args:
    model_dir: The run's `--model_dir` (it may still be training).
    output: The PNG's path; default `model_dir/report.png`.

  Returns:
    The PNG's path.

  Raises:
    ConfigError: If matplotlib is missing, or `model_dir` has no metrics.
  """
  try:
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.ConfigError("the report needs matplotlib: pip install "
                             "\"mtl_dist[report]\"") from None
  if output is not None and not output.endswith(".png"):
    raise errors.ConfigError(f"--output={output}: must name a .png file (the "
                             "report is a PNG)")
  records = _read_metrics(model_dir)
  # The sidecar's evaluations count as eval records too.
  records += [dict(r, split="sidecar") for r in sidecar.read_evaluations(
      os.path.join(model_dir, sidecar.EVALUATIONS_FILE))]
  config = saved_run.read_config(model_dir)
  tasks = [task.name for task in saved_run.read_model_spec(model_dir).tasks]
  eval_keys = {key for r in records if r["split"] != "train"
               for key in r["metrics"]}
  eval_metrics = {task: sorted(k.split("/", 1)[1] for k in eval_keys
                               if k.startswith(task + "/") and
                               not k.endswith("/loss"))
                  for task in tasks}
  weights_change = any(
      len(set(_series(records, "train", f"{task}/weight")[1])) > 1
      for task in tasks)
  experts, utilisation = expert_utilisation(
      [r for r in records if r["split"] == "train"], tasks)
  extra = [name for name, shown in (("shares", config.mode == "alternate"),
                                    ("weights", weights_change),
                                    ("experts", bool(experts))) if shown]
  rows = len(tasks) + len(extra)
  fig = figure.Figure(figsize=(11, 2.6 * rows), layout="constrained")
  grid = fig.add_gridspec(rows, 2)
  fig.suptitle(f"{model_dir}: {config.mode} mode")
  for row, task in enumerate(tasks):
    loss_axes = fig.add_subplot(grid[row, 0])
    for split, label, style in (("train", "train", "-"), ("eval", "eval", "o-"),
                                ("sidecar", "eval (sidecar)", "s--")):
      steps, values = _series(records, split, f"{task}/loss")
      if steps:
        loss_axes.plot(steps, values, style, label=label, markersize=3)
    loss_axes.set_title(f"{task}: loss")
    if all(v > 0 for line in loss_axes.get_lines() for v in line.get_ydata()):
      loss_axes.set_yscale("log")
    loss_axes.legend(fontsize="small")
    metric_axes = fig.add_subplot(grid[row, 1])
    for metric in eval_metrics[task]:
      for split, suffix, style in (("eval", "", "o-"),
                                   ("sidecar", " (sidecar)", "s--")):
        steps, values = _series(records, split, f"{task}/{metric}")
        if steps:
          metric_axes.plot(steps, values, style, label=metric + suffix,
                           markersize=3)
    metric_axes.set_title(f"{task}: eval metrics")
    if metric_axes.get_lines():
      metric_axes.legend(fontsize="small")
  for offset, name in enumerate(extra):
    axes = fig.add_subplot(grid[len(tasks) + offset, :])
    if name == "experts":
      _draw_utilisation(fig, axes, experts, utilisation, tasks)
      continue
    key = "share" if name == "shares" else "weight"
    series = [_series(records, "train", f"{task}/{key}") for task in tasks]
    if key == "share":  # Shares add up to 1: stacked, every task shows.
      axes.stackplot(series[0][0], *[values for _, values in series],
                     labels=tasks, alpha=0.8)
      axes.set_ylim(0, 1)
      axes.set_title("share of the steps of each logged interval (stacked)")
    else:
      for task, (steps, values) in zip(tasks, series):
        axes.plot(steps, values, label=task)
      axes.set_title("task loss weights")
    # Beside the panel: stacked shares fill it.
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
  for axes in fig.axes:
    if axes.get_label() not in ("experts", "<colorbar>"):
      axes.set_xlabel("step")
      axes.grid(alpha=0.3)
  output = output or os.path.join(model_dir, REPORT_FILE)
  with tf.io.gfile.GFile(output, "wb") as f:
    fig.savefig(f, format="png", dpi=90)
  return output


def _draw_utilisation(fig, axes, experts: list[str],
                      utilisation: list[list[float]], tasks: list[str]
                      ) -> None:
  """A tasks x experts heat map of mean gate weights, values written in."""
  axes.set_label("experts")
  image = axes.imshow(utilisation, vmin=0.0, vmax=1.0, cmap="viridis",
                      aspect="auto")
  axes.set_xticks(range(len(experts)), experts, fontsize="small",
                  rotation=30 if len(experts) > 6 else 0)
  axes.set_yticks(range(len(tasks)), tasks)
  for row, weights in enumerate(utilisation):
    for column, weight in enumerate(weights):
      if weight == weight:  # Not NaN.
        axes.text(column, row, f"{weight:.2f}", ha="center", va="center",
                  fontsize="small", color="white" if weight < 0.5 else "black")
  axes.set_title("mean gate weight per expert, last logged interval "
                 "(expert utilisation)")
  fig.colorbar(image, ax=axes)
