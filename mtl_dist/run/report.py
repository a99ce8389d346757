"""report.png: a run's curves, from its metrics.jsonl and evaluations.jsonl.

One row per task: its losses (left) and its eval metrics (right). Below
them, in alternate mode, each task's share of the steps of every logged
interval; when they change, the task weights; and for gated architectures
(mmoe, cgc, ple, dselect_k) each task's mean gate weight per expert over the
last logged interval (are the experts used at all?).

Each source of values has one colour in every panel, named once in the
legend at the top: training's own train and eval records, a sidecar's
evaluations (`mtl-eval --watch`) and one-shot `mtl-eval` evaluations. Every
step axis spans the run, from 0 to its `train_steps` (or its last recorded
step, if later), so a lone evaluation sits where it was made; each curve's
last value is written beside it. Needs matplotlib
(`pip install "mtl_dist[report]"`); training does not.
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

# Where values come from: (split, legend label, colour). The splits of
# evaluations.jsonl's records are named here, by their "watch" field;
# records written before it existed are "mtl-eval" (they may be either).
SOURCES = (("train", "train", "tab:blue"),
           ("eval", "eval (training's)", "tab:orange"),
           ("sidecar", "sidecar (mtl-eval --watch)", "tab:green"),
           ("mtl-eval", "mtl-eval", "tab:red"))
# Evaluations are dots; evaluations.jsonl's are rings, so that they show
# around training's own evaluation of the same step.
_MARKERS = {"train": "", "eval": "o", "sidecar": "o", "mtl-eval": "o"}
_FILLS = {"train": "full", "eval": "full", "sidecar": "none",
          "mtl-eval": "none"}
# Several metrics of one task share a panel: a line style and marker each.
_METRIC_STYLES = (("-", "o"), ("--", "^"), (":", "s"), ("-.", "D"))
# The tasks' colours (shares, weights): none of the sources'.
_TASK_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive",
                 "tab:cyan", "tab:gray")
# Minimum distance between two final-value labels, in axes heights.
_LABEL_GAP = 0.11


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


def _read_records(model_dir: str) -> list[dict[str, Any]]:
  """metrics.jsonl's records, then evaluations.jsonl's, split by source."""
  path = os.path.join(model_dir, run_files.METRICS_FILE)
  if not tf.io.gfile.exists(path):
    raise errors.ConfigError(f"--model_dir={model_dir}: has no "
                             "metrics.jsonl; is it an mtl-train run?")
  records = run_files.read_records(path)
  for record in sidecar.read_evaluations(
      os.path.join(model_dir, sidecar.EVALUATIONS_FILE)):
    split = "sidecar" if record.get("watch") is True else "mtl-eval"
    records.append(dict(record, split=split))
  return records


def _matplotlib() -> Any:
  """matplotlib's `figure` module.

  Raises:
    ConfigError: If matplotlib is missing.
  """
  try:
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.ConfigError("the report needs matplotlib: pip install "
                             "\"mtl_dist[report]\"") from None
  return figure


@typecheck.checked
def write_report(model_dir: str, output: Optional[str] = None) -> str:
  """Draws the run's curves into a PNG (see `report_figure`).

  Args:
    model_dir: The run's `--model_dir` (it may still be training).
    output: The PNG's path; default `model_dir/report.png`.

  Returns:
    The PNG's path.

  Raises:
    ConfigError: If matplotlib is missing, or `model_dir` has no metrics.
  """
  _matplotlib()
  if output is not None and not output.endswith(".png"):
    raise errors.ConfigError(f"--output={output}: must name a .png file (the "
                             "report is a PNG)")
  fig = report_figure(model_dir)
  output = output or os.path.join(model_dir, REPORT_FILE)
  with tf.io.gfile.GFile(output, "wb") as f:
    fig.savefig(f, format="png", dpi=90)
  return output


@typecheck.checked
def report_figure(model_dir: str) -> Any:
  """The report's figure, which `write_report` saves as report.png.

  Args:
    model_dir: The run's `--model_dir` (it may still be training).

  Returns:
    A `matplotlib.figure.Figure`. Its step-axis panels share their x axis;
    each curve's gid is its source's split (see `SOURCES`) or, in the
    shares and weights panels, its task.

  Raises:
    ConfigError: If matplotlib is missing, or `model_dir` has no metrics.
  """
  figure = _matplotlib()
  records = _read_records(model_dir)
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
  step_axes = []

  def add_step_axes(cell: Any) -> Any:
    axes = fig.add_subplot(cell, sharex=step_axes[0] if step_axes else None)
    step_axes.append(axes)
    return axes

  for row, task in enumerate(tasks):
    _draw_losses(add_step_axes(grid[row, 0]), records, task)
    _draw_metrics(add_step_axes(grid[row, 1]), records, task,
                  eval_metrics[task])
  colours = {task: _TASK_COLOURS[i % len(_TASK_COLOURS)]
             for i, task in enumerate(tasks)}
  for offset, name in enumerate(extra):
    cell = grid[len(tasks) + offset, :]
    if name == "experts":
      _draw_utilisation(fig, fig.add_subplot(cell), experts, utilisation,
                        tasks)
    else:  # The tasks' colours are named once, beside the first panel.
      _draw_task_series(add_step_axes(cell), records, tasks, name, colours,
                        legend=offset == 0)
  # Every step axis spans the run, however few its points.
  last_step = max([config.train_steps] + [r["step"] for r in records])
  margin = 0.02 * max(last_step, 1)
  step_axes[0].set_xlim(-margin, last_step + margin)
  for axes in step_axes:
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    _label_final_values(axes)
  shown = {line.get_gid() for axes in step_axes for line in axes.get_lines()}
  # Named once, above the panels (with the run, as a suptitle would overlap).
  fig.legend(handles=[_legend_line(colour, label, marker=_MARKERS[split],
                                   fill=_FILLS[split])
                      for split, label, colour in SOURCES if split in shown],
             loc="outside upper center", ncols=len(SOURCES),
             title=f"{model_dir}: {config.mode} mode",
             title_fontproperties={"size": "large"})
  return fig


def _plot(axes: Any, steps: list[int], values: list[float], gid: str,
          colour: str, label: str, style: str = "-", marker: str = "",
          fill: str = "full") -> None:
  """One curve; a lone point gets a marker, so that it shows."""
  if len(steps) == 1:
    marker = marker or "o"
  size = (4 if fill == "full" else 7) + 2 * (len(steps) == 1)
  (line,) = axes.plot(steps, values, linestyle=style, marker=marker,
                      fillstyle=fill, color=colour, label=label,
                      markersize=size)
  line.set_gid(gid)


def _draw_losses(axes: Any, records: list[dict[str, Any]], task: str) -> None:
  """A task's loss from every source, on a log scale if all are positive."""
  for split, label, colour in SOURCES:
    steps, values = _series(records, split, f"{task}/loss")
    if steps:
      _plot(axes, steps, values, split, colour, label,
            marker=_MARKERS[split], fill=_FILLS[split])
  axes.set_title(f"{task}: loss")
  values = [v for line in axes.get_lines() for v in line.get_ydata()]
  if values and all(v > 0 for v in values):
    axes.set_yscale("log")
    _plain_log_labels(axes)


def _draw_metrics(axes: Any, records: list[dict[str, Any]], task: str,
                  metrics: list[str]) -> None:
  """A task's eval metrics from every evaluating source."""
  styles = [_METRIC_STYLES[i % len(_METRIC_STYLES)]
            for i in range(len(metrics))]
  for split, _, colour in SOURCES[1:]:
    for metric, (style, marker) in zip(metrics, styles):
      steps, values = _series(records, split, f"{task}/{metric}")
      if steps:
        _plot(axes, steps, values, split, colour, metric, style, marker,
              _FILLS[split])
  axes.set_title(f"{task}: eval {', '.join(metrics) or 'metrics'}")
  if not axes.get_lines():
    axes.text(0.5, 0.5, "no evaluation recorded", transform=axes.transAxes,
              ha="center", va="center", color="grey")
  elif len(metrics) > 1:  # Which line style is which metric.
    axes.legend(handles=[_legend_line("grey", metric, style, marker)
                         for metric, (style, marker) in zip(metrics, styles)],
                fontsize="small")


def _draw_task_series(axes: Any, records: list[dict[str, Any]],
                      tasks: list[str], name: str, colours: dict[str, str],
                      legend: bool) -> None:
  """The tasks' shares of the logged intervals (stacked) or loss weights."""
  if name == "shares":
    steps = _series(records, "train", f"{tasks[0]}/share")[0]
    shares = [_series(records, "train", f"{task}/share")[1]
              for task in tasks]
    if not steps or any(len(values) != len(steps) for values in shares):
      axes.set_title("share of the steps of each logged interval")
      axes.text(0.5, 0.5, "no train record yet", transform=axes.transAxes,
                ha="center", va="center", color="grey")
      return
    # Each share is of the steps since the previous log (from step 0).
    axes.stackplot([0] + steps, *[[values[0]] + values for values in shares],
                   colors=[colours[task] for task in tasks], step="pre",
                   alpha=0.8)
    axes.set_ylim(0, 1)
    axes.set_title("share of the steps of each logged interval (stacked)")
    below = 0.0
    for task, values in zip(tasks, shares):
      _annotate(axes, steps[-1], below + values[-1] / 2, values[-1],
                colours[task])
      below += values[-1]
  else:
    for task in tasks:
      steps, values = _series(records, "train", f"{task}/weight")
      _plot(axes, steps, values, task, colours[task], task)
    axes.set_title("task loss weights")
  if legend:  # Beside the panel: stacked shares fill it.
    axes.legend(handles=[_legend_line(colours[task], task, linewidth=6)
                         for task in tasks], fontsize="small",
                loc="center left", bbox_to_anchor=(1.05, 0.5))


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


def _legend_line(colour: str, label: str, style: str = "-", marker: str = "",
                 linewidth: float = 1.5, fill: str = "full") -> Any:
  """A legend entry: a line of `colour` that is drawn nowhere."""
  from matplotlib import lines  # pylint: disable=g-import-not-at-top
  return lines.Line2D([], [], color=colour, linestyle=style, marker=marker,
                      fillstyle=fill, linewidth=linewidth, label=label)


def _plain_log_labels(axes: Any) -> None:
  """Log-scale y tick labels as plain numbers (0.02, not 2 x 10^-2)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  class PlainLogFormatter(ticker.LogFormatterSciNotation):
    """Labels the ticks matplotlib would label, without the exponent."""

    def __call__(self, x: float, pos: Optional[int] = None) -> str:
      return f"{x:.4g}" if super().__call__(x, pos) else ""

  axes.yaxis.set_major_formatter(PlainLogFormatter())
  axes.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False,
                                                   minor_thresholds=(2, 0.5)))


def _label_final_values(axes: Any) -> None:
  """Writes each curve's last value beside its last point."""
  for line in axes.get_lines():
    steps, values = line.get_xdata(), line.get_ydata()
    if len(steps):
      _annotate(axes, steps[-1], values[-1], values[-1], line.get_color())
  _spread_labels(axes)


def _annotate(axes: Any, step: float, y: float, value: float,
              colour: str) -> None:
  axes.annotate(f"{value:#.3g}", xy=(step, y), ha="left", va="center",
                color=colour, fontsize="small", annotation_clip=False)


def _spread_labels(axes: Any) -> None:
  """Moves an axes' final-value labels apart vertically so none overlap."""
  from matplotlib import text  # pylint: disable=g-import-not-at-top
  labels = [a for a in axes.texts if isinstance(a, text.Annotation)]
  axes.get_ylim()  # Autoscales: the data-to-axes transform is final.
  to_axes = axes.transScale + axes.transLimits
  placed = sorted((to_axes.transform(label.xy)[1], i)
                  for i, label in enumerate(labels))
  heights = []
  for height, _ in placed:
    heights.append(max([height] + [h + _LABEL_GAP for h in heights[-1:]]))
  shift = max([0.0] + [h - 1.0 for h in heights[-1:]])
  for height, (_, i) in zip(heights, placed):
    across = to_axes.transform(labels[i].xy)[0]
    # 5 points right of the point, past its marker, at its spread height.
    labels[i].set_anncoords(text.OffsetFrom(axes, (across, height - shift)))
    labels[i].set_position((5, 0))
