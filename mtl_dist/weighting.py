"""Task loss weighting for joint mode: static, uncertainty, DWA.

A `Weighting` turns the [T] per-task losses of a step into the weighted
objective. Its state (learned log-variances, loss histories) is made of
variables, created in the strategy's scope and checkpointed with the run, so
a resumed run continues exactly.

Formulas:
  static       sum_i w_i L_i with the fixed --task_weights.
  uncertainty  Kendall et al. 2018, s_i = log sigma_i^2 learned with the
               model: sum_i c_i exp(-s_i) L_i + s_i / 2, c_i = 1/2 for
               regression and 1 for classification. The total can go
               negative; that is expected.
  dwa          Liu et al. 2019: w_k = T exp(r_k / tau) / sum_i exp(r_i / tau),
               r_k = L_k(t-1) / L_k(t-2), tau = 2, where L(t-1) and L(t-2) are
               the mean losses of the last two complete windows of
               --dwa_window steps (the paper's epochs). Weights are 1 until
               two windows are complete.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl_dist import tasks as tasks_lib

METHODS = ("static", "uncertainty", "dwa")


class Weighting(tf.Module):
  """Task weights of the joint-mode objective, and their state."""

  def __init__(self, tasks: Sequence[tasks_lib.TaskSpec],
               method: str = "static", dwa_window: int = 100,
               dwa_temperature: float = 2.0):
    """Creates the state; call inside `strategy.scope()`.

    Args:
      tasks: The tasks, in order (static weights from `TaskSpec.weight`).
      method: One of `METHODS`.
      dwa_window: DWA: steps per loss-averaging window.
      dwa_temperature: DWA: the temperature tau.
    """
    super().__init__(name=f"{method}_weighting")
    if method not in METHODS:
      raise ValueError(f"unknown weighting {method!r} (known: "
                       f"{', '.join(METHODS)})")
    if dwa_window < 1:
      raise ValueError(f"dwa_window must be positive, got {dwa_window}")
    self.method = method
    self.num_tasks = len(tasks)
    self._static = tf.constant([task.weight for task in tasks], tf.float32)
    self._regression_half = tf.constant(
        [0.5 if task.kind == tasks_lib.REGRESSION else 1.0 for task in tasks],
        tf.float32)
    first_replica = tf.VariableAggregation.ONLY_FIRST_REPLICA
    if method == "uncertainty":
      self.log_variances = tf.Variable(tf.zeros([self.num_tasks]),
                                       name="log_variances")
    elif method == "dwa":
      self._window = dwa_window
      self._temperature = dwa_temperature

      def state(name, shape, dtype=tf.float32):
        return tf.Variable(tf.zeros(shape, dtype), trainable=False, name=name,
                           aggregation=first_replica)

      self.window_sum = state("window_sum", [self.num_tasks])
      self.window_steps = state("window_steps", [], tf.int64)
      self.last_means = state("last_means", [2, self.num_tasks])  # t-1, t-2
      self.complete_windows = state("complete_windows", [], tf.int64)

  @property
  def trainable(self) -> list[tf.Variable]:
    """Variables the model's optimizer trains with the model."""
    return [self.log_variances] if self.method == "uncertainty" else []

  def weights(self) -> tf.Tensor:
    """The [T] multipliers of the task losses at this step."""
    if self.method == "uncertainty":
      return self._regression_half * tf.exp(-self.log_variances)
    if self.method == "dwa":
      ratios = self.last_means[0] / tf.maximum(self.last_means[1], 1e-12)
      dynamic = self.num_tasks * tf.nn.softmax(ratios / self._temperature)
      return tf.where(self.complete_windows >= 2, dynamic,
                      tf.ones([self.num_tasks]))
    return self._static

  def objective(self, per_task: tf.Tensor) -> tf.Tensor:
    """This replica's share of the weighted objective.

    Args:
      per_task: [T] this replica's shares of the task losses (they sum over
        replicas to the global-batch losses).

    Returns:
      A scalar whose sum over replicas is the objective.
    """
    total = tf.reduce_sum(self.weights() * per_task)
    if self.method == "uncertainty":
      replicas = tf.distribute.get_replica_context().num_replicas_in_sync
      total += 0.5 * tf.reduce_sum(self.log_variances) / replicas
    return total

  def update(self, losses: tf.Tensor) -> None:
    """Records a step's global [T] losses (call in cross-replica context)."""
    if self.method != "dwa":
      return
    window_sum = self.window_sum + losses
    steps = self.window_steps + 1
    complete = steps >= self._window
    mean = window_sum / tf.cast(steps, tf.float32)
    self.last_means.assign(tf.where(
        complete, tf.stack([mean, self.last_means[0]]), self.last_means))
    self.complete_windows.assign_add(tf.cast(complete, tf.int64))
    self.window_sum.assign(tf.where(complete, tf.zeros_like(window_sum),
                                    window_sum))
    self.window_steps.assign(tf.where(complete, tf.constant(0, tf.int64),
                                      steps))
