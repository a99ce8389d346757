"""Every architecture in both modes on `shapes` and `toy_regression`.

Trains each `--architecture` (hps, mmoe, cgc, ple, cross_stitch, dselect_k,
mtan) in joint and alternate mode on `shapes` (5 tasks) and
`toy_regression` (10 tasks) over several seeds, together with one
single-task hps run per task, dataset and seed (the baselines of Δm). Then
writes a Markdown table per dataset of each task's eval metric (mean ± std
over seeds), Δm against the single-task baselines, the trainable parameter
count and the step time relative to hps, followed by sentences computed
from the numbers that say where an architecture is not better than hps.

  nice -n 5 python -m benchmarks.architectures \
      --output=docs/architecture_results.md

`--seeds`, `--architectures`, `--datasets`, `--modes`,
`--train_steps_shapes` and `--train_steps_toy` make a quick run, e.g.
`--seeds=0 --datasets=shapes --architectures=hps,mmoe
--train_steps_shapes=200`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging
import numpy as np  # pylint: disable=g-import-not-at-top

import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.data import toy_regression
from mtl_dist.model import architectures as architectures_lib
from mtl_dist.model import settings as model_settings

ARCHITECTURES = model_settings.ARCHITECTURES
REFERENCE = "hps"  # What every other architecture is compared with.
DATASETS = ("shapes", "toy_regression")
MODES = ("joint", "alternate")

# Settings of every run (multi-task and single-task) per dataset. Built-in
# data sizes (train_examples, eval_examples) are separate: runs that bring
# their own data (toy_regression in alternate mode) must leave them unset.
SETTINGS = {
    "shapes": {"trunk": "mlp", "trunk_width": 64, "trunk_depth": 2,
               "global_batch_size": 64, "learning_rate": 1e-3},
    "toy_regression": {"trunk": "mlp", "trunk_width": 100, "trunk_depth": 4,
                       "global_batch_size": 100, "learning_rate": 1e-3},
}
# shapes keeps its default 16384 training examples in joint mode; alternate
# mode gives its tasks the default sizes 8192, 4096, 2048, 1024, 512.
DATA_SIZES = {
    "shapes": {"eval_examples": 1024},
    "toy_regression": {"train_examples": 8192, "eval_examples": 2048},
}
TASKS = {"shapes": shapes.TASKS, "toy_regression": toy_regression.TASKS}
INPUT_SHAPES = {"shapes": (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 1),
                "toy_regression": (toy_regression.INPUT_SIZE,)}
STEPS_PER_LOOP = 100

_OUTPUT = flags.DEFINE_string("output", None,
                              "Markdown file to write (default: stdout).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"],
                           "Seeds: data and initialisation, one run each.")
_ARCHITECTURES = flags.DEFINE_list(
    "architectures", list(ARCHITECTURES),
    f"Architectures to train; {REFERENCE} always runs (the reference).")
_DATASETS = flags.DEFINE_list("datasets", list(DATASETS), "Datasets.")
_MODES = flags.DEFINE_list("modes", list(MODES), "Modes.")
_STEPS_SHAPES = flags.DEFINE_integer("train_steps_shapes", 1500,
                                     "Steps of every run on shapes.")
_STEPS_TOY = flags.DEFINE_integer("train_steps_toy", 1000,
                                  "Steps of every run on toy_regression.")


# ---------------------------------------------------------------------------
# The pure part: per-seed summaries to rows, the table and the sentences.
# No TensorFlow work below until the training part.


@dataclasses.dataclass(frozen=True)
class Stat:
  """A value over seeds.

  Attributes:
    mean: The mean over seeds.
    std: The sample standard deviation over seeds (ddof=1); 0 for one seed.
    count: The number of seeds.
  """

  mean: float
  std: float
  count: int


@dataclasses.dataclass(frozen=True)
class Row:
  """One architecture and mode on one dataset, aggregated over seeds.

  Attributes:
    metrics: Task to (its metric's name, the metric over seeds).
    delta_m: Δm in percent over seeds; None without baselines.
    examples_per_second: The median over seeds; None if not measured.
  """

  metrics: dict[str, tuple[str, Stat]]
  delta_m: Stat | None
  examples_per_second: float | None


def mean_std(values: Sequence[float]) -> Stat:
  """The mean and sample standard deviation (ddof=1) of `values`.

  Args:
    values: One value per seed, at least one.

  Returns:
    The Stat; its std is 0 for a single value.
  """
  values = [float(v) for v in values]
  if not values:
    raise ValueError("mean_std needs at least one value")
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return Stat(statistics.fmean(values), std, len(values))


def primary_metric(metrics: Mapping[str, float]) -> str:
  """The metric a task is judged by: accuracy, else mae, else mse, else loss.

  Args:
    metrics: One task's eval results, metric name to value.

  Returns:
    The name of the metric.
  """
  for name in ("accuracy", "mae", "mse", "loss"):
    if name in metrics:
      return name
  raise ValueError(f"no known metric among {sorted(metrics)}")


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> Row:
  """One row from the summaries of the same run over seeds.

  Args:
    summaries: What `mtl_dist.train` returned, one per seed: `eval` (task
      to metric to value), `examples_per_second` and, with baselines,
      `delta_m` (`{"delta_m": overall, ...}`).

  Returns:
    Each task's primary metric, Δm and the examples per second over seeds.
  """
  first = summaries[0]["eval"]
  metrics = {}
  for task, results in first.items():
    name = primary_metric(results)
    metrics[task] = (name, mean_std([s["eval"][task][name]
                                     for s in summaries]))
  delta_m = None
  if all("delta_m" in s for s in summaries):
    delta_m = mean_std([s["delta_m"]["delta_m"] for s in summaries])
  speeds = [s["examples_per_second"] for s in summaries
            if s.get("examples_per_second") is not None]
  return Row(metrics, delta_m,
             statistics.median(speeds) if speeds else None)


def baseline_row(per_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> Row:
  """The single-task baselines as one row.

  Args:
    per_seed: For each seed, task to the summary of its single-task run.

  Returns:
    Each task's metric over seeds; Δm and speed are not set (Δm is 0 by
    definition, and the runs train different models).
  """
  merged = [{"eval": {task: summary["eval"][task]
                      for task, summary in runs.items()}}
            for runs in per_seed]
  return dataclasses.replace(aggregate(merged), delta_m=None,
                             examples_per_second=None)


def decimals(value: float) -> int:
  """Decimals that show `value` to 3 significant digits (0 to 6)."""
  if value == 0 or not math.isfinite(value):
    return 3
  return min(6, max(0, 2 - math.floor(math.log10(abs(value)))))


def format_stat(stat: Stat, places: int | None = None,
                sign: bool = False) -> str:
  """`mean ± std`, both to the same number of decimals.

  Args:
    stat: The value over seeds.
    places: Decimals; default: the mean's 3 significant digits.
    sign: Whether the mean shows its sign (+ or -).

  Returns:
    The text; only the mean for a single seed (no spread).
  """
  places = decimals(stat.mean) if places is None else places
  mean = f"{stat.mean:+.{places}f}" if sign else f"{stat.mean:.{places}f}"
  if stat.count < 2:
    return mean
  return f"{mean} ± {stat.std:.{places}f}"


def format_delta_m(stat: Stat) -> str:
  """Δm in percent with a sign and 2 decimals."""
  return format_stat(stat, places=2, sign=True)


def relative_step_times(rows: Mapping[tuple[str, str], Row]
                        ) -> dict[tuple[str, str], float]:
  """Each row's step time over hps's in the same mode (same batch size).

  Args:
    rows: (mode, architecture) to its row.

  Returns:
    (mode, architecture) to hps's median examples per second divided by the
    row's; rows without a speed or without an hps row of their mode are
    left out.
  """
  times = {}
  for (mode, architecture), row in rows.items():
    reference = rows.get((mode, REFERENCE))
    if (reference is None or not reference.examples_per_second or
        not row.examples_per_second):
      continue
    times[(mode, architecture)] = (reference.examples_per_second /
                                   row.examples_per_second)
  return times


def results_table(tasks: Sequence[str],
                  rows: Mapping[tuple[str, str], Row],
                  parameters: Mapping[str, int],
                  baseline: Row | None = None,
                  baseline_parameters: int | None = None) -> list[str]:
  """The Markdown table of one dataset.

  Args:
    tasks: The dataset's tasks, in column order.
    rows: (mode, architecture) to its row, in row order.
    parameters: Architecture to its trainable parameter count.
    baseline: The single-task baselines' row, shown first.
    baseline_parameters: All the single-task models' parameters together.

  Returns:
    The table's lines.
  """
  reference = baseline or next(iter(rows.values()))
  columns = [f"{task} ({reference.metrics[task][0]})" for task in tasks]
  lines = ["| mode | architecture | parameters | step time vs hps | Δm (%) | "
           + " | ".join(columns) + " |",
           "|---|---|---:|---:|---:|" + "---:|" * len(tasks)]

  def cells(row: Row) -> str:
    return " | ".join(format_stat(row.metrics[task][1]) for task in tasks)

  if baseline is not None:
    count = "" if baseline_parameters is None else f"{baseline_parameters:,}"
    lines.append(f"| single-task | hps, one model per task | {count} | – | "
                 f"0 (reference) | {cells(baseline)} |")
  times = relative_step_times(rows)
  for (mode, architecture), row in rows.items():
    time_cell = (f"{times[(mode, architecture)]:.2f}×"
                 if (mode, architecture) in times else "–")
    delta = "–" if row.delta_m is None else format_delta_m(row.delta_m)
    count = (f"{parameters[architecture]:,}" if architecture in parameters
             else "")
    lines.append(f"| {mode} | {architecture} | {count} | {time_cell} | "
                 f"{delta} | {cells(row)} |")
  return lines


def verdict(candidate: Stat, reference: Stat) -> tuple[str, float]:
  """How a Δm compares with the reference's beyond the seeds' spread.

  Args:
    candidate: An architecture's Δm.
    reference: hps's Δm on the same dataset and mode.

  Returns:
    ("better" | "worse" | "within", spread), where the spread is the
    larger of the two standard deviations: better or worse means the means
    differ by more than it.
  """
  spread = max(candidate.std, reference.std)
  difference = candidate.mean - reference.mean
  if difference > spread:
    return "better", spread
  if -difference > spread:
    return "worse", spread
  return "within", spread


def comparison_sentences(dataset: str, mode: str,
                         rows: Mapping[str, Row]) -> list[str]:
  """Plain sentences on each architecture's Δm against hps's.

  Args:
    dataset: The dataset's name, for the sentences.
    mode: The mode, for the sentences.
    rows: Architecture to its row on this dataset and mode.

  Returns:
    First a summary sentence (which architectures are better than hps,
    within the seeds' spread of it, or worse), then hps's Δm against the
    single-task baselines, then one sentence per other architecture. Empty
    without hps's Δm. With one seed there is no spread: the sentences say
    so instead of "beyond the seeds' spread".
  """
  reference = rows.get(REFERENCE)
  if reference is None or reference.delta_m is None:
    return []
  where = f"On {dataset}, {mode} mode"
  hps_text = format_delta_m(reference.delta_m)
  one_seed = min([reference.delta_m.count] + [
      row.delta_m.count for row in rows.values()
      if row.delta_m is not None]) < 2
  beyond = "on one seed" if one_seed else "beyond the seeds' spread"
  groups: dict[str, list[str]] = {"better": [], "within": [], "worse": []}
  details = []
  for architecture, row in rows.items():
    if architecture == REFERENCE or row.delta_m is None:
      continue
    kind, spread = verdict(row.delta_m, reference.delta_m)
    groups[kind].append(architecture)
    own = f"{architecture}'s Δm ({format_delta_m(row.delta_m)} %)"
    margin = ("on one seed (no spread measured)" if one_seed else
              f"by more than the seeds' spread ({spread:.2f})")
    if kind == "within":
      details.append(f"{where}, {own} is within the seeds' spread "
                     f"({spread:.2f}) of hps's ({hps_text} %): not better "
                     "than hps.")
    else:
      details.append(f"{where}, {own} is {kind} than hps's ({hps_text} %) "
                     f"{margin}.")
  parts = []
  if groups["within"]:
    parts.append("within the seeds' spread of hps (not better): "
                 + ", ".join(groups["within"]))
  if groups["worse"]:
    parts.append(f"worse than hps {beyond}: " + ", ".join(groups["worse"]))
  if groups["better"]:
    parts.insert(0, f"better than hps {beyond}: "
                 + ", ".join(groups["better"]))
    summary = f"{where}, " + "; ".join(parts) + "."
  elif parts:
    summary = (f"{where}, no architecture is better than hps {beyond} ("
               + "; ".join(parts) + ").")
  else:
    summary = f"{where}, only hps ran."
  own_spread = reference.delta_m.std
  if one_seed:
    against = ("better than" if reference.delta_m.mean > 0 else
               "not better than") + " the single-task baselines on one seed"
  elif reference.delta_m.mean > own_spread:
    against = "better than the single-task baselines by more than its std"
  elif -reference.delta_m.mean > own_spread:
    against = "worse than the single-task baselines by more than its std"
  else:
    against = "within its std of the single-task baselines"
  hps_sentence = f"{where}, hps's Δm is {hps_text} %: {against}."
  return [summary, hps_sentence] + details


@dataclasses.dataclass(frozen=True)
class DatasetResults:
  """What the report shows of one dataset.

  Attributes:
    name: The dataset.
    tasks: Its tasks, in column order.
    description: Its settings, in words (one paragraph).
    rows: (mode, architecture) to its row, in row order.
    parameters: Architecture to its trainable parameter count.
    baseline: The single-task baselines' row.
    baseline_parameters: All the single-task models' parameters together.
  """

  name: str
  tasks: tuple[str, ...]
  description: str
  rows: dict[tuple[str, str], Row]
  parameters: dict[str, int]
  baseline: Row | None = None
  baseline_parameters: int | None = None


def report(results: Sequence[DatasetResults], header: Sequence[str],
           notes: Sequence[str]) -> str:
  """The Markdown report: header, each dataset's table, the verdicts, notes.

  Args:
    results: One entry per dataset.
    header: Lines before the tables (title, command, machine, settings).
    notes: Lines after the verdicts.

  Returns:
    The Markdown text.
  """
  lines = list(header)
  verdicts = []
  for dataset in results:
    lines += ["", f"## {dataset.name}", "", dataset.description, ""]
    lines += results_table(dataset.tasks, dataset.rows, dataset.parameters,
                           dataset.baseline, dataset.baseline_parameters)
    modes = list(dict.fromkeys(mode for mode, _ in dataset.rows))
    for mode in modes:
      verdicts.append(comparison_sentences(
          dataset.name, mode,
          {architecture: row for (m, architecture), row
           in dataset.rows.items() if m == mode}))
  lines += ["", "## Where an architecture does not help", "",
            ("Computed from the Δm columns above: an architecture is better "
             "or worse than hps when the means differ by more than the "
             "seeds' spread, the larger of the two standard deviations; "
             "otherwise it is within the spread, i.e. not better.")]
  for sentences in verdicts:
    if sentences:
      lines += [""] + [f"- {sentence}" for sentence in sentences]
  if notes:
    lines += [""] + list(notes)
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The training part.


def run_config(dataset: str, mode: str, architecture: str, seed: int,
               train_steps: int, model_dir: str, own_data: bool = False,
               tasks: Sequence[str] | None = None,
               baselines: Mapping[str, str] | None = None
               ) -> mtl_dist.TrainConfig:
  """One run's configuration.

  Args:
    dataset: "shapes" or "toy_regression".
    mode: "joint" or "alternate".
    architecture: One of `ARCHITECTURES`, with its default options.
    seed: Data and initialisation seed.
    train_steps: Steps; logs, evaluates and checkpoints once, at the end.
    model_dir: Where the run writes.
    own_data: Whether `train` gets the data (then the built-in dataset's
      settings stay unset).
    tasks: The tasks to train (None: all).
    baselines: Task to its single-task run's model_dir, for Δm.

  Returns:
    The configuration.
  """
  built_in = {} if own_data else dict(dataset=dataset, **DATA_SIZES[dataset])
  if mode == "alternate":
    built_in.pop("train_examples", None)  # Per-task sizes are the data's.
  return mtl_dist.TrainConfig(
      model_dir=model_dir, mode=mode, architecture=architecture, seed=seed,
      tasks=tasks, baselines=baselines, train_steps=train_steps,
      steps_per_loop=STEPS_PER_LOOP, log_every=train_steps,
      eval_every=train_steps, checkpoint_every=train_steps,
      **SETTINGS[dataset], **built_in)


def toy_alternate_data(seed: int) -> mtl_dist.MultiTaskData:
  """toy_regression laid out for alternate mode: one source per task.

  The eval examples are the joint runs' (and the baselines'): examples N to
  N + E of the generated stream (N = train_examples, E = eval_examples).
  Each task trains on N examples of its own, disjoint from the other tasks'
  and from the eval examples: task 0 on the joint runs' first N, the others
  on the blocks after the eval examples.

  Args:
    seed: The data seed (the task functions and the inputs).

  Returns:
    The data, for `mtl_dist.train(config, data=...)`.
  """
  size = DATA_SIZES["toy_regression"]["train_examples"]
  eval_size = DATA_SIZES["toy_regression"]["eval_examples"]
  names = toy_regression.TASK_NAMES
  features, labels = toy_regression.generate(
      len(names) * size + eval_size, seed)
  train_rows = np.r_[0:size, size + eval_size:len(features)]
  train = []
  for i, name in enumerate(names):
    rows = train_rows[i * size:(i + 1) * size]
    train.append(mtl_dist.source_from_arrays(
        features[rows], {name: labels[name][rows]}, [name]))
  # One eval source labelled for every task: one forward pass per batch.
  eval_part = slice(size, size + eval_size)
  evaluation = mtl_dist.source_from_arrays(
      features[eval_part].copy(),
      {name: labels[name][eval_part].copy() for name in names}, names)
  return mtl_dist.MultiTaskData(
      tasks=toy_regression.TASKS, input_shape=features.shape[1:],
      train=tuple(train), eval=(evaluation,))


def count_parameters(dataset: str, architecture: str,
                     tasks: Sequence[str] | None = None) -> int:
  """Trainable parameters of the model the runs train.

  Args:
    dataset: The dataset, for its tasks, input shape and trunk settings.
    architecture: The architecture, with its default options.
    tasks: The tasks (None: all the dataset's).

  Returns:
    The number of trainable weights.
  """
  config = run_config(dataset, "joint", architecture, 0, 1, "unused")
  specs = [task for task in TASKS[dataset]
           if tasks is None or task.name in tasks]
  model = architectures_lib.build(
      specs, INPUT_SHAPES[dataset], config.architecture_config(),
      trunk=config.trunk, trunk_width=config.trunk_width,
      trunk_depth=config.trunk_depth)
  return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else what platform knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _describe(dataset: str, train_steps: int) -> str:
  """The dataset's settings, in words."""
  settings = SETTINGS[dataset]
  common = (f"MLP trunk (and experts, columns) of depth "
            f"{settings['trunk_depth']} and width {settings['trunk_width']}, "
            f"linear heads, Adam {settings['learning_rate']:g}, global batch "
            f"{settings['global_batch_size']}, {train_steps} steps per run "
            "(single-task and multi-task alike), one replica.")
  if dataset == "shapes":
    return ("`--dataset=shapes`: 32x32 images, 5 tasks (shape: 3-class "
            "accuracy, higher is better; scale, orientation, x, y: MAE, "
            "lower is better). Joint mode trains on 16384 examples labelled "
            "for every task; alternate mode on the built-in per-task "
            "datasets of 8192, 4096, 2048, 1024 and 512 examples with the "
            "default round_robin schedule. 1024 eval examples. " + common)
  return ("`--dataset=toy_regression` (GradNorm's synthetic benchmark): 10 "
          "regression tasks with output scales sigma_i from 1 to 100, MAE "
          "per task (lower is better). Joint mode trains on 8192 examples "
          "labelled for every task (the built-in dataset). The built-in "
          "dataset is joint-only, so alternate mode gets its data through "
          "the Python API (`train(config, data=...)`, "
          "`source_from_arrays`): each task trains on 8192 examples of its "
          "own (task 0 on the joint runs' 8192, the others on further "
          "examples of the same generated stream, all disjoint), with the "
          "default round_robin schedule; every run, the baselines "
          "included, evaluates on the same 2048 held-out examples. "
          + common)


def _progress(text: str) -> None:
  """Prints a progress line to stderr."""
  print(text, file=sys.stderr, flush=True)


def run_dataset(dataset: str, architectures: Sequence[str],
                modes: Sequence[str], seeds: Sequence[int], train_steps: int,
                scratch: str, counter: list[int], total: int
                ) -> DatasetResults:
  """Trains the baselines and every architecture and mode on one dataset.

  Args:
    dataset: "shapes" or "toy_regression".
    architectures: Architectures to train, hps among them.
    modes: Modes to train.
    seeds: Seeds.
    train_steps: Steps per run.
    scratch: A directory for the runs.
    counter: [runs done so far], updated (for the progress lines).
    total: All runs of the script.

  Returns:
    The dataset's rows.
  """
  task_names = [task.name for task in TASKS[dataset]]
  summaries: dict[tuple[str, str], list[dict]] = {
      (mode, architecture): [] for mode in modes
      for architecture in architectures}
  baselines: list[dict[str, dict]] = []

  def train(what: str, config: mtl_dist.TrainConfig,
            data: mtl_dist.MultiTaskData | None = None) -> dict:
    counter[0] += 1
    _progress(f"run {counter[0]} of {total}: {what} ...")
    started = time.perf_counter()
    summary = mtl_dist.train(config, data)
    delta = summary.get("delta_m", {}).get("delta_m")
    _progress(f"run {counter[0]} of {total}: {what}: "
              f"{time.perf_counter() - started:.1f} s, "
              f"{summary['examples_per_second']:.0f} examples/s"
              + ("" if delta is None else f", Δm {delta:+.2f} %"))
    return summary

  for seed in seeds:
    singles, single_summaries = {}, {}
    for task in task_names:
      singles[task] = os.path.join(scratch, dataset, f"seed{seed}",
                                   "single", task)
      single_summaries[task] = train(
          f"{dataset} seed {seed} single-task {task}",
          run_config(dataset, "joint", REFERENCE, seed, train_steps,
                     singles[task], tasks=[task]))
    baselines.append(single_summaries)
    for mode in modes:
      own = dataset == "toy_regression" and mode == "alternate"
      data = toy_alternate_data(seed) if own else None
      for architecture in architectures:
        directory = os.path.join(scratch, dataset, f"seed{seed}", mode,
                                 architecture)
        summaries[(mode, architecture)].append(train(
            f"{dataset} seed {seed} {mode} {architecture}",
            run_config(dataset, mode, architecture, seed, train_steps,
                       directory, own_data=own, baselines=singles), data))
      del data
  parameters = {architecture: count_parameters(dataset, architecture)
                for architecture in architectures}
  baseline_parameters = sum(count_parameters(dataset, REFERENCE, [task])
                            for task in task_names)
  return DatasetResults(
      name=dataset, tasks=tuple(task_names),
      description=_describe(dataset, train_steps),
      rows={key: aggregate(runs) for key, runs in summaries.items()},
      parameters=parameters, baseline=baseline_row(baselines),
      baseline_parameters=baseline_parameters)


def _chosen(flag: flags.FlagHolder, known: Sequence[str]) -> list[str]:
  """The flag's values in `known`'s order; refuses unknown ones."""
  unknown = [value for value in flag.value if value not in known]
  if unknown or not flag.value:
    raise app.UsageError(f"--{flag.name}: unknown {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
  return [value for value in known if value in flag.value]


def main(argv: list[str]) -> None:
  """Trains every run the flags ask for, then writes the report."""
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # The progress lines stand out.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.get_logger().setLevel("ERROR")  # Each run traces its own functions.
  architectures = _chosen(_ARCHITECTURES, ARCHITECTURES)
  if REFERENCE not in architectures:
    architectures.insert(0, REFERENCE)
  datasets = _chosen(_DATASETS, DATASETS)
  modes = _chosen(_MODES, MODES)
  try:
    seeds = [int(seed) for seed in _SEEDS.value]
  except ValueError:
    raise app.UsageError(f"--seeds={','.join(_SEEDS.value)}: integers, "
                         "e.g. 0,1,2") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise app.UsageError("--seeds: give distinct seeds")
  steps = {"shapes": _STEPS_SHAPES.value,
           "toy_regression": _STEPS_TOY.value}
  total = sum(len(seeds) * (len(TASKS[d]) + len(modes) * len(architectures))
              for d in datasets)
  started = time.perf_counter()
  counter = [0]
  results = []
  with tempfile.TemporaryDirectory() as scratch:
    for dataset in datasets:
      results.append(run_dataset(dataset, architectures, modes, seeds,
                                 steps[dataset], scratch, counter, total))
  minutes = (time.perf_counter() - started) / 60
  _progress(f"all {total} runs: {minutes:.1f} minutes")
  given = {"seeds": seeds, "architectures": architectures,
           "datasets": datasets, "modes": modes,
           "train_steps_shapes": [_STEPS_SHAPES.value],
           "train_steps_toy": [_STEPS_TOY.value]}
  command = "python -m benchmarks.architectures " + " ".join(
      f"--{name}={','.join(map(str, values))}"
      for name, values in given.items())
  defaults = model_settings.ArchitectureConfig()
  header = [
      "# Architectures on `shapes` and `toy_regression`",
      "",
      (f"Made by `{command}` on {cpu_model()} ({platform.machine()}, "
       f"{os.cpu_count()} CPU cores), {time.strftime('%Y-%m-%d')}; "
       f"{total} runs in {minutes:.0f} minutes. Written by the script, not "
       "by hand."),
      "",
      (f"Each architecture (`--architecture`) in each mode, {len(seeds)} "
       f"seed(s) ({', '.join(map(str, seeds))}; each seed draws the data "
       "and the initial weights). A cell is the mean ± the sample standard "
       "deviation (ddof=1) over the seeds of the task's eval metric at the "
       "end of training. Δm is the mean relative improvement over "
       "single-task baselines in percent (`mtl_dist/run/delta_m.py`; higher "
       "is better, 0 = as good as training one model per task): per "
       "dataset and seed, one hps run per task (`tasks=[task]`, joint mode, "
       "same settings and steps); joint and alternate rows use the same "
       "baselines."),
      "",
      ("Architecture options are the defaults: "
       f"mmoe and dselect_k num_experts={defaults.num_experts}, dselect_k "
       f"num_selected_experts={defaults.num_selected_experts}, cgc and ple "
       f"num_shared_experts={defaults.num_shared_experts} and "
       f"num_task_experts={defaults.num_task_experts}, ple "
       f"num_levels={defaults.num_levels}; every expert, column and trunk "
       "is the same MLP. They keep each expert the size of hps's trunk, not "
       "the models' sizes equal: the parameters column gives each model's "
       "trainable parameters (from `mtl_dist.model.architectures.build`); "
       "models with per-task experts, columns or attention grow with the "
       "number of tasks."),
      "",
      ("Step time vs hps is hps's median (over seeds) examples per second "
       "divided by the architecture's, in the same dataset and mode (the "
       "batch is the same, so it is the ratio of step times; the first, "
       "tracing, loop is left out). The runs were not isolated timing "
       "runs: they ran one after another on a machine shared with other "
       "work, so these ratios are rough."),
  ]
  notes = [
      ("Alternate mode trains one task per step, so in a run of N steps "
       "each task gets about N / T updates (T tasks) against the N of its "
       "single-task baseline; its Δm includes that handicap."),
  ]
  text = report(results, header, notes)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text)
  else:
    print(text)


if __name__ == "__main__":
  app.run(main)
