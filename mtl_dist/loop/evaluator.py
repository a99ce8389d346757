"""The evaluator: a model's losses and metrics over finite datasets.

One compiled call evaluates every dataset. Each replica sums per-example
losses and metrics over its batches (only examples labelled for a task
count for it); one all-reduce per dataset at the end gives exact means over
every example, whatever the replica count or the size of the last batches.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl_dist import tasks as tasks_lib
from mtl_dist.model import base as model_base
from mtl_dist.steps import losses


class Evaluator:
  """Evaluates a model on finite distributed datasets in one compiled call."""

  def __init__(self, strategy: tf.distribute.Strategy,
               model: model_base.MultiTaskModel,
               tasks: Sequence[tasks_lib.TaskSpec]):
    """Creates the evaluator.

    Args:
      strategy: The strategy the model was built under.
      model: The model.
      tasks: The model's tasks, with their losses and metrics.
    """
    self._strategy = strategy
    self.model = model
    self.tasks = tuple(tasks)
    self._eval_loop = None
    self._eval_groups = None

  @property
  def trace_count(self) -> int:
    """How many times the eval loop has been traced (0 before evaluating)."""
    if self._eval_loop is None:
      return 0
    return self._eval_loop.experimental_get_tracing_count()

  def evaluate(self, datasets: Sequence[tf.distribute.DistributedDataset],
               task_groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Evaluates on finite distributed datasets, all in one compiled call.

    Args:
      datasets: Evaluation datasets.
      task_groups: The tasks each dataset is labelled for. The same groups
        must be passed on every call.

    Returns:
      `{"<task>/loss": mean, "<task>/<metric>": mean}` over every example.

    Raises:
      ValueError: If an eval dataset is empty.
    """
    groups = tuple(tuple(t for t in self.tasks if t.name in names)
                   for names in task_groups)
    if self._eval_loop is None:
      self._eval_loop = tf.function(self._make_eval_loop(groups))
      self._eval_groups = groups
    elif groups != self._eval_groups:
      raise ValueError("evaluate() must be called with the same task groups")
    # Fresh iterators, so that each evaluation reads the whole split.
    group_sums = self._eval_loop(tuple(iter(d) for d in datasets))
    results = {}
    for group, sums in zip(groups, group_sums):
      sums = {k: float(v) for k, v in sums.items()}
      for task in group:
        count = sums.pop(f"{task.name}/count")
        if count == 0:
          raise ValueError(f"the eval data has no labelled example for task "
                           f"{task.name!r}")
        results.update({k: v / count for k, v in sums.items()
                        if k.startswith(task.name + "/")})
    return results

  def _make_eval_loop(self, groups):
    strategy, model = self._strategy, self.model

    def eval_group(iterator, tasks):
      keys = [f"{task.name}/{name}" for task in tasks
              for name in ("loss", "count") + task.metric_names]

      def add_batch(batch, totals):
        sums = losses.eval_sums(model, tasks, batch)
        return totals + tf.stack([sums[key] for key in keys])

      # Each replica keeps running totals; one all-reduce per group at the
      # end (a reduce of a nested structure in a loop fails under
      # MultiWorkerMirroredStrategy).
      totals = strategy.run(lambda: tf.zeros([len(keys)]))
      for batch in iterator:
        totals = strategy.run(add_batch, args=(batch, totals))
      totals = strategy.reduce(tf.distribute.ReduceOp.SUM, totals, axis=None)
      return {key: totals[i] for i, key in enumerate(keys)}

    def eval_loop(iterators):
      return [eval_group(iterator, tasks)
              for iterator, tasks in zip(iterators, groups)]

    return eval_loop
