"""The GradNorm paper's synthetic benchmark, one row per method, over seeds.

Trains joint mode on `toy_regression` (10 tasks, sigma_i from 1 to 100) with
every registered loss weighting (with `sum`) and every registered gradient
aggregator (with static weights), each over several seeds, then writes a
Markdown table of each task's test loss divided by sigma_i^2 (so tasks of
every scale count alike) as mean ± std over the seeds, and says whether
GradNorm beats static weights beyond the seeds' spread, as the paper
reports.

  python -m benchmarks.toy_regression --output=docs/toy_regression.md
  python -m benchmarks.toy_regression --seeds=2 --methods=static,gradnorm
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

import mtl_dist
from mtl_dist.data import toy_regression
from mtl_dist.methods import registry

GLOBAL_BATCH_SIZE = 100
# The settings a method runs with here besides its defaults, by row name.
OVERRIDES: dict[str, dict[str, Any]] = {
    "dwa": {"dwa_window": 100},  # Its default window of 1 step is noise.
}

_OUTPUT = flags.DEFINE_string("output", None,
                              "Markdown file to write (default: stdout).")
_STEPS = flags.DEFINE_integer("train_steps", 3000, "Steps per run.",
                              lower_bound=1)
_SEEDS = flags.DEFINE_integer(
    "seeds", 5, "Runs per method, with seeds 0 to N-1 (data and "
    "initialisation).", lower_bound=1)
_METHODS = flags.DEFINE_list(
    "methods", None, "Methods to run, by row name (default: every "
    "registered weighting and aggregator; `static` is static weights with "
    "`sum`).")
_RESULTS = flags.DEFINE_string(
    "results", None, "Also write the runs' raw results to this JSON file, "
    "for --merge (to split the methods over several processes).")
_MERGE = flags.DEFINE_list(
    "merge", None, "Run nothing: write the report of these --results "
    "files together, in the registries' order.")


def methods() -> dict[str, dict[str, Any]]:
  """Every registered method: row name to TrainConfig changes.

  `static` (static weights, summed gradients) first, then every other
  weighting with `sum`, then every other aggregator with static weights,
  in the registries' order; each with its `OVERRIDES`. Names starting with
  "test_" (methods the tests register) are left out.
  """
  weightings, aggregators = registry.WEIGHTINGS, registry.AGGREGATORS
  rows = {weightings.default: {}}
  rows.update((name, {"weighting": name}) for name in weightings.names()
              if name != weightings.default)
  for name in aggregators.names():
    if name != aggregators.default:
      if name in rows:
        raise ValueError(f"a weighting and an aggregator share the name "
                         f"{name!r}")
      rows[name] = {"aggregator": name}
  return {name: {**changes, **OVERRIDES.get(name, {})}
          for name, changes in rows.items() if not name.startswith("test_")}


def global_batch_size(changes: Mapping[str, Any]) -> int:
  """GLOBAL_BATCH_SIZE, rounded down to a multiple of the aggregator's
  sub-batches (which must divide it)."""
  aggregator = registry.AGGREGATORS.get(
      changes.get("aggregator", registry.AGGREGATORS.default))
  sub_batches = getattr(aggregator, "sub_batches", 1)
  return GLOBAL_BATCH_SIZE // sub_batches * sub_batches


def run_method(changes: Mapping[str, Any], model_dir: str, train_steps: int,
               seed: int) -> dict:
  """Trains one method with one seed; returns its summary."""
  config = mtl_dist.TrainConfig(
      model_dir=model_dir, dataset="toy_regression", trunk="mlp",
      trunk_depth=4, trunk_width=100, train_examples=8192, eval_examples=2048,
      global_batch_size=global_batch_size(changes), learning_rate=1e-3,
      train_steps=train_steps, steps_per_loop=100, log_every=train_steps,
      eval_every=train_steps, checkpoint_every=train_steps, seed=seed,
      **changes)
  return mtl_dist.train(config)


def normalised_losses(summary: dict) -> np.ndarray:
  """Each task's eval loss divided by its sigma_i^2."""
  return np.array([summary["eval"][task]["loss"] / sigma**2
                   for task, sigma in zip(toy_regression.TASK_NAMES,
                                          toy_regression.SIGMAS)])


@dataclasses.dataclass
class Result:
  """One method over seeds.

  Attributes:
    losses: [seeds, tasks] normalised test losses.
    seconds: Each run's wall time (building, training, evaluating).
  """

  losses: np.ndarray
  seconds: list[float]

  @property
  def means(self) -> np.ndarray:
    """[seeds] the mean over tasks of each seed's run."""
    return self.losses.mean(axis=1)


def _std(values: Sequence[float]) -> float:
  """The sample standard deviation (ddof=1); 0 for a single value."""
  return statistics.stdev(values) if len(values) > 1 else 0.0


def _stat(values: Sequence[float], bold: bool = False) -> str:
  """`mean ± std` to 3 decimals (the mean alone for one seed)."""
  values = [float(v) for v in values]
  text = f"{statistics.fmean(values):.3f}"
  if len(values) > 1:
    text += f" ± {_std(values):.3f}"
  return f"**{text}**" if bold else text


def gradnorm_sentence(static: Result, gradnorm: Result) -> str:
  """Whether GradNorm beats static weighting, against the seeds' spread.

  The difference of the mean normalised losses counts when it exceeds the
  spread, the larger of the two standard deviations over seeds; the
  sentence also says on how many seeds GradNorm's run was lower (the runs
  of one seed share data and initialisation).
  """
  seeds = len(static.means)
  mean_static = float(np.mean(static.means))
  mean_gradnorm = float(np.mean(gradnorm.means))
  difference = mean_static - mean_gradnorm
  verdict = "beats" if difference > 0 else "does not beat"
  text = (f"GradNorm {verdict} static weighting here: mean normalised loss "
          f"{_stat(gradnorm.means)} against {_stat(static.means)}")
  if seeds < 2 or len(gradnorm.means) != seeds:
    return text + (" on one seed, so without a spread to compare the "
                   "difference with (the paper reports that it beats it).")
  spread = max(_std(static.means), _std(gradnorm.means))
  lower = int(np.sum(gradnorm.means < static.means))
  within = abs(difference) <= spread
  return text + (
      f" over {seeds} seeds. The difference, {abs(difference):.3f}, "
      f"{'is within' if within else 'exceeds'} the seeds' spread "
      f"({spread:.3f}, the larger standard deviation)"
      f"{', so it is not a ranking' if within else ''}; GradNorm's run "
      f"was lower on {lower} of {seeds} seeds. The paper reports that it "
      "beats static weighting.")


def table(results: Mapping[str, Result], changes: Mapping[str, Mapping],
          command: str, train_steps: int) -> str:
  """The Markdown report."""
  tasks = toy_regression.TASK_NAMES
  seeds = len(next(iter(results.values())).seconds)
  lines = [
      "# GradNorm's synthetic benchmark (`--dataset=toy_regression`)",
      "",
      "Made by `" + command + "` on " +
      f"{platform.machine()} with {os.cpu_count()} CPU cores, "
      f"{time.strftime('%Y-%m-%d')}. Written by the script, not by hand.",
      "",
      "Ten regression tasks f_i(x) = sigma_i tanh((B + eps_i) x), sigma_i "
      "log-spaced from 1 to 100 (see `mtl_dist/data/toy_regression.py`); a "
      "shared 4-layer MLP trunk of width 100, linear heads, Adam 1e-3, "
      f"global batch {GLOBAL_BATCH_SIZE}, {train_steps} steps, one replica. "
      "Every registered weighting runs with `sum`, every registered "
      "aggregator with static weights (`static` is both defaults), each "
      f"with seeds 0 to {seeds - 1} (the seed draws the data and the "
      "initialisation). Each cell is the task's test MSE divided by "
      "sigma_i^2, so every task counts alike (lower is better; predicting 0 "
      "scores about 0.40), as mean ± sample standard deviation over the "
      "seeds; *mean* is the mean over tasks, taken per seed, then over "
      "seeds; *seconds* is the mean wall time of one run, which shows the "
      "methods' relative cost only roughly (runs share the machine with "
      "whatever else runs; docs/benchmarks.md measures the methods' cost).",
      "",
      "| method | " + " | ".join(tasks) + " | mean | seconds |",
      "|---|" + "---|" * (len(tasks) + 2),
  ]
  for method, result in results.items():
    cells = [_stat(result.losses[:, i]) for i in range(len(tasks))]
    lines.append(f"| {method} | " + " | ".join(cells) +
                 f" | {_stat(result.means, bold=True)} | "
                 f"{statistics.fmean(result.seconds):.0f} |")
  notes = []
  for method in results:
    settings = dict(changes[method])
    settings.pop("weighting", None)
    settings.pop("aggregator", None)
    batch = global_batch_size(changes[method])
    if batch != GLOBAL_BATCH_SIZE:
      settings["global_batch_size"] = f"{batch} (its sub-batches divide it)"
    if settings:
      notes.append(f"{method}: " + ", ".join(
          f"--{key}={value}" for key, value in settings.items()))
  if notes:
    lines += ["", "Settings besides the defaults: " + "; ".join(notes) + "."]
  if "static" in results and "gradnorm" in results:
    lines += ["", gradnorm_sentence(results["static"], results["gradnorm"])]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  known = methods()
  chosen = _METHODS.value or list(known)
  unknown = [m for m in chosen if m not in known]
  if unknown:
    raise app.UsageError(f"--methods: unknown {', '.join(unknown)} (known: "
                         f"{', '.join(known)})")
  if _MERGE.value:
    _write(*_merged(_MERGE.value, known), known)
    return
  seeds = range(_SEEDS.value)
  results = {}
  with tempfile.TemporaryDirectory() as scratch:
    for method in chosen:
      losses, seconds = [], []
      for seed in seeds:
        started = time.perf_counter()
        summary = run_method(known[method],
                             os.path.join(scratch, f"{method}_{seed}"),
                             _STEPS.value, seed)
        seconds.append(time.perf_counter() - started)
        losses.append(normalised_losses(summary))
        print(f"{method}, seed {seed}: mean normalised loss "
              f"{losses[-1].mean():.4f} in {seconds[-1]:.0f} s",
              file=sys.stderr, flush=True)
      results[method] = Result(np.array(losses), seconds)
  command = "python -m benchmarks.toy_regression " + " ".join(
      f"--{name}={flags.FLAGS[name].value}"
      for name in ("train_steps", "seeds"))
  if _METHODS.value:
    command += f" --methods={','.join(chosen)}"
  if _RESULTS.value:
    with open(_RESULTS.value, "w") as f:
      json.dump({"command": command, "train_steps": _STEPS.value,
                 "results": {method: {"losses": result.losses.tolist(),
                                      "seconds": result.seconds}
                             for method, result in results.items()}}, f)
  _write(results, command, _STEPS.value, known)


def _merged(paths: Sequence[str], known: Mapping[str, Any]
            ) -> tuple[dict[str, Result], str, int]:
  """The results of several --results files, in `known`'s order."""
  results, commands, steps = {}, [], set()
  for path in paths:
    with open(path) as f:
      part = json.load(f)
    commands.append(part["command"])
    steps.add(part["train_steps"])
    for method, result in part["results"].items():
      results[method] = Result(np.array(result["losses"]), result["seconds"])
  if len(steps) != 1:
    raise app.UsageError(f"--merge: the files ran different --train_steps "
                         f"({sorted(steps)})")
  ordered = {method: results[method] for method in known if method in results}
  command = ("`, `".join(commands) + "` side by side with `--results`, "
             "then `python -m benchmarks.toy_regression --merge=...")
  return ordered, command, steps.pop()


def _write(results: Mapping[str, Result], command: str, train_steps: int,
           known: Mapping[str, Any]) -> None:
  """Writes the report to --output (default: stdout)."""
  report = table(results, known, command, train_steps)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(report)
  else:
    print(report)


if __name__ == "__main__":
  app.run(main)
