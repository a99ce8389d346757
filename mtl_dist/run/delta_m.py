"""Delta_m: mean relative improvement over single-task baselines (LibMTL).

  Delta_m = 100% * (1/T) sum_t (1/M_t) sum_m (-1)^{h_m} (B_tm - M_tm) / B_tm

over each task t's M_t metrics m (accuracy, MAE, ...; not the loss), B the
single-task baseline's value, M the multi-task model's, h_m = 1 when higher
is better. Averaged within a task first, so tasks with more metrics do not
count more. Higher is better; 0 means no change.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from mtl_dist import errors

HIGHER_IS_BETTER = {"accuracy": True, "mae": False, "mse": False}


def read_baselines(directories: Mapping[str, str]) -> dict[str, dict[str, float]]:
  """Each task's eval metrics from its single-task run's summary.json.

  Args:
    directories: Task name to the model_dir of its single-task run.

  Returns:
    Task name to metric name to value.

  Raises:
    ConfigError: For a missing or unreadable summary.json, or one without
      the task's eval results.
  """
  baselines = {}
  for task, directory in directories.items():
    path = os.path.join(directory, "summary.json")
    try:
      with open(path) as f:
        summary = json.load(f)
    except (OSError, ValueError) as e:
      raise errors.ConfigError(
          f"--baselines: {task}={directory}: cannot read {path} ({e})"
      ) from None
    metrics = summary.get("eval", {}).get(task)
    if not metrics:
      raise errors.ConfigError(
          f"--baselines: {task}={directory}: {path} has no eval results for "
          f"task {task!r} (it has: {', '.join(summary.get('eval', {}))})")
    baselines[task] = {name: float(value) for name, value in metrics.items()
                       if name in HIGHER_IS_BETTER}
    for name, value in baselines[task].items():
      if value == 0:
        raise errors.ConfigError(
            f"--baselines: {task}={directory}: its {name} is 0, so a "
            "relative improvement over it is undefined")
  return baselines


def delta_m(results: Mapping[str, Mapping[str, float]],
            baselines: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """Delta_m in percent, overall and per task.

  Args:
    results: Task name to metric name to the multi-task model's value.
    baselines: Task name to metric name to the single-task value.

  Returns:
    `{"delta_m": overall, "<task>": that task's mean relative improvement}`,
    in percent.
  """
  per_task = {}
  for task, base in baselines.items():
    terms = []
    for metric, base_value in base.items():
      sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
      terms.append(sign * (base_value - results[task][metric]) / base_value)
    if terms:
      per_task[task] = 100.0 * sum(terms) / len(terms)
  overall = sum(per_task.values()) / len(per_task) if per_task else 0.0
  return {"delta_m": overall, **per_task}
