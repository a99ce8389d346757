"""The GradNorm paper's synthetic benchmark, one row per method.

Trains joint mode on `toy_regression` (10 tasks, sigma_i from 1 to 100) with
every loss weighting and gradient aggregator, then writes a Markdown table of
each task's test loss divided by sigma_i^2 (so tasks of every scale count
alike) and says whether GradNorm beats static weights, as in the paper.

  python -m benchmarks.toy_regression --output=docs/toy_regression.md
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

import mtl_dist
from mtl_dist.data import toy_regression

METHODS = (
    ("static", {}),
    ("uncertainty", {"weighting": "uncertainty"}),
    ("dwa", {"weighting": "dwa", "dwa_window": 100}),
    ("gradnorm", {"weighting": "gradnorm"}),
    ("pcgrad", {"aggregator": "pcgrad"}),
    ("cagrad", {"aggregator": "cagrad"}),
    ("mgda", {"aggregator": "mgda"}),
)

_OUTPUT = flags.DEFINE_string("output", None,
                              "Markdown file to write (default: stdout).")
_STEPS = flags.DEFINE_integer("train_steps", 3000, "Steps per method.")
_SEED = flags.DEFINE_integer("seed", 0, "Data and initialisation seed.")
_METHODS = flags.DEFINE_list("methods", [name for name, _ in METHODS],
                             "Methods to run.")


def run_method(name: str, changes: dict, model_dir: str, train_steps: int,
               seed: int) -> dict:
  """Trains one method; returns its summary."""
  config = mtl_dist.TrainConfig(
      model_dir=model_dir, dataset="toy_regression", trunk="mlp",
      trunk_depth=4, trunk_width=100, train_examples=8192, eval_examples=2048,
      global_batch_size=100, learning_rate=1e-3, train_steps=train_steps,
      steps_per_loop=100, log_every=train_steps, eval_every=train_steps,
      checkpoint_every=train_steps, seed=seed, **changes)
  del name
  return mtl_dist.train(config)


def normalised_losses(summary: dict) -> np.ndarray:
  """Each task's eval loss divided by its sigma_i^2."""
  return np.array([summary["eval"][task]["loss"] / sigma**2
                   for task, sigma in zip(toy_regression.TASK_NAMES,
                                          toy_regression.SIGMAS)])


def table(rows: dict[str, np.ndarray], seconds: dict[str, float],
          command: str, train_steps: int) -> str:
  """The Markdown report."""
  tasks = toy_regression.TASK_NAMES
  lines = [
      "# GradNorm's synthetic benchmark (`--dataset=toy_regression`)",
      "",
      "Made by `" + command + "` on " +
      f"{platform.machine()} with {os.cpu_count()} CPU cores, "
      f"{time.strftime('%Y-%m-%d')}.",
      "",
      "Ten regression tasks f_i(x) = sigma_i tanh((B + eps_i) x), sigma_i "
      "log-spaced from 1 to 100 (see `mtl_dist/data/toy_regression.py`); a shared "
      "4-layer MLP trunk of width 100, linear heads, Adam 1e-3, global batch "
      f"100, {train_steps} steps, one replica. Each cell is the task's test "
      "MSE divided by sigma_i^2, so every task counts alike (lower is "
      "better; predicting 0 scores about 0.40).",
      "",
      "| method | " + " | ".join(tasks) + " | mean | seconds |",
      "|---|" + "---|" * (len(tasks) + 2),
  ]
  for method, values in rows.items():
    lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in values) +
                 f" | **{values.mean():.3f}** | {seconds[method]:.0f} |")
  if "static" in rows and "gradnorm" in rows:
    static, gradnorm = rows["static"].mean(), rows["gradnorm"].mean()
    verdict = "beats" if gradnorm < static else "does not beat"
    lines += ["", f"GradNorm {verdict} static weighting here: mean "
              f"normalised loss {gradnorm:.3f} against {static:.3f} (the "
              "paper reports that it does)."]
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
  del argv
  chosen = dict(METHODS)
  unknown = [m for m in _METHODS.value if m not in chosen]
  if unknown:
    raise app.UsageError(f"--methods: unknown {', '.join(unknown)}")
  rows, seconds = {}, {}
  with tempfile.TemporaryDirectory() as scratch:
    for method in _METHODS.value:
      started = time.perf_counter()
      summary = run_method(method, chosen[method],
                           os.path.join(scratch, method), _STEPS.value,
                           _SEED.value)
      seconds[method] = time.perf_counter() - started
      rows[method] = normalised_losses(summary)
      print(f"{method}: mean normalised loss {rows[method].mean():.4f}",
            file=sys.stderr)
  command = "python -m benchmarks.toy_regression " + " ".join(
      f"--{name}={flags.FLAGS[name].value}" for name in ("train_steps", "seed"))
  report = table(rows, seconds, command, _STEPS.value)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(report)
  else:
    print(report)


if __name__ == "__main__":
  app.run(main)
