"""Task loss weighting for joint mode: static, uncertainty, DWA, GradNorm.

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
  gradnorm     Chen et al. 2018: G_i = |grad_W w_i L_i| at the last shared
               layer W, G = mean_i G_i, r_i = (L_i(t)/L_i(0)) / mean_j
               (L_j(t)/L_j(0)); L_grad = sum_i |G_i - sg(G r_i^alpha)|. The
               weights take an Adam step on L_grad (d L_grad / d w_i =
               sign(G_i - target_i) |grad_W L_i|) and are renormalised to sum
               to T. Gradients and losses are global (all-reduced).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from mtl_dist import tasks as tasks_lib

METHODS = ("static", "uncertainty", "dwa", "gradnorm")
_MIN_WEIGHT = 1e-3


def gradnorm_gradient(weights: tf.Tensor, gradient_norms: tf.Tensor,
                      losses: tf.Tensor, initial_losses: tf.Tensor,
                      alpha: float,
                      active: tf.Tensor | None = None) -> tf.Tensor:
  """d L_grad / d w_i = sign(G_i - target_i) |grad_W L_i|.

  Args:
    weights: [T] current weights w_i.
    gradient_norms: [T] |grad_W L_i| of the unweighted losses at the last
      shared layer.
    losses: [T] current losses L_i(t).
    initial_losses: [T] each task's first loss, L_i(0).
    alpha: GradNorm's alpha.
    active: [T] bool, the tasks that take part this step (labelled in this
      global batch, with a recorded L_i(0)); the means run over them and
      the others get a zero gradient. Default: all.

  Returns:
    The [T] gradient of L_grad = sum_i |G_i - sg(mean(G) r_i^alpha)|.
  """
  if active is None:
    active = tf.ones_like(weights, tf.bool)
  share = tf.cast(active, tf.float32)
  count = tf.maximum(tf.reduce_sum(share), 1.0)
  norms = weights * gradient_norms  # G_i
  ratios = share * losses / tf.maximum(initial_losses, 1e-12)
  relative = ratios / tf.maximum(tf.reduce_sum(ratios) / count, 1e-12)
  mean_norm = tf.reduce_sum(share * norms) / count
  target = tf.stop_gradient(mean_norm * relative**alpha)
  return share * tf.sign(norms - target) * gradient_norms


def adam_step(weights: tf.Tensor, gradient: tf.Tensor, first: tf.Tensor,
              second: tf.Tensor, step: tf.Tensor, learning_rate: float,
              beta_1: float = 0.9, beta_2: float = 0.999,
              epsilon: float = 1e-7, active: tf.Tensor | None = None):
  """One Adam update of the weights, then clipped > 0 and renormalised to T.

  The gradient's scale follows each task's loss scale (orders of magnitude
  apart); Adam's per-weight normalisation lets every weight move, as in the
  paper, where the weights train with the network's optimizer.

  Returns:
    (new weights, new first moment, new second moment).
  """
  previous_first, previous_second = first, second
  first = beta_1 * first + (1.0 - beta_1) * gradient
  second = beta_2 * second + (1.0 - beta_2) * gradient * gradient
  t = tf.cast(step, tf.float32)
  corrected_first = first / (1.0 - beta_1**t)
  corrected_second = second / (1.0 - beta_2**t)
  updated = weights - learning_rate * corrected_first / (
      tf.sqrt(corrected_second) + epsilon)
  if active is not None:  # Tasks not taking part keep weight and moments.
    updated = tf.where(active, updated, weights)
    first = tf.where(active, first, previous_first)
    second = tf.where(active, second, previous_second)
  updated = tf.maximum(updated, _MIN_WEIGHT)
  num_tasks = tf.cast(tf.size(weights), tf.float32)
  return updated * num_tasks / tf.reduce_sum(updated), first, second


class Weighting(tf.Module):
  """Task weights of the joint-mode objective, and their state."""

  def __init__(self, tasks: Sequence[tasks_lib.TaskSpec],
               method: str = "static", dwa_window: int = 100,
               dwa_temperature: float = 2.0, gradnorm_alpha: float = 1.5,
               gradnorm_lr: float = 0.025):
    """Creates the state; call inside `strategy.scope()`.

    Args:
      tasks: The tasks, in order (static weights from `TaskSpec.weight`).
      method: One of `METHODS`.
      dwa_window: DWA: steps per loss-averaging window.
      dwa_temperature: DWA: the temperature tau.
      gradnorm_alpha: GradNorm's alpha.
      gradnorm_lr: GradNorm: step size of the weight update.
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

    def state(name, shape, dtype=tf.float32, initial=0):
      """A zero-filled (or `initial`) state variable. Every replica assigns
      the same global values to it, so the first replica's is kept."""
      return tf.Variable(tf.fill(shape, tf.cast(initial, dtype)),
                         trainable=False, name=name,
                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    if method == "uncertainty":
      self.log_variances = tf.Variable(tf.zeros([self.num_tasks]),
                                       name="log_variances")
    elif method == "dwa":
      self._window = dwa_window
      self._temperature = dwa_temperature
      self.window_sum = state("window_sum", [self.num_tasks])
      self.window_steps = state("window_steps", [], tf.int64)
      self.last_means = state("last_means", [2, self.num_tasks])  # t-1, t-2
      self.complete_windows = state("complete_windows", [], tf.int64)
    elif method == "gradnorm":
      self._alpha = gradnorm_alpha
      self._learning_rate = gradnorm_lr
      self.task_weights = state("task_weights", [self.num_tasks], initial=1)
      self.initial_losses = state("initial_losses", [self.num_tasks])
      self.has_initial_losses = state("has_initial_losses", [self.num_tasks],
                                      tf.bool)
      self.adam_moments = state("adam_moments", [2, self.num_tasks])
      self.updates = state("updates", [], tf.int64)

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
    if self.method == "gradnorm":
      return self.task_weights.read_value()
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

  @property
  def needs_task_gradients(self) -> bool:
    """Whether `replica_update` needs `task_gradients` (else it is a no-op)."""
    return self.method == "gradnorm"

  def task_gradients(self, tape: tf.GradientTape,
                     task_terms: Sequence[tf.Tensor],
                     shared_kernel: tf.Variable) -> tf.Tensor:
    """This replica's gradient of each task's loss at W, for GradNorm.

    It needs nothing from other replicas, so it can be taken with the rest
    of a replica's backward pass (compiled with it, too).

    Args:
      tape: A persistent tape that recorded `task_terms`.
      task_terms: Each task's unweighted loss share, formed inside the tape
        (a slice taken after the tape would not be recorded).
      shared_kernel: The last shared layer's weights W.

    Returns:
      [T, size of W] local gradients.
    """
    return tf.stack([tf.reshape(tape.gradient(
        term, shared_kernel,
        unconnected_gradients=tf.UnconnectedGradients.ZERO), [-1])
                     for term in task_terms])

  def replica_update(self, task_gradients: tf.Tensor | None,
                     per_task: tf.Tensor, labelled: tf.Tensor,
                     applied: tf.Tensor = True) -> None:
    """GradNorm's weight update, inside a replica step (no-op otherwise).

    Args:
      task_gradients: [T, size of W] this replica's `task_gradients` (None
        unless `needs_task_gradients`).
      per_task: [T] this replica's shares of the task losses.
      labelled: [T] this replica's count of examples labelled for each task
        (partial labels); a task with none in the global batch takes no
        part in this step's update, and its L_i(0) is its first labelled
        loss.
      applied: Whether the model update of this step is applied; a skipped
        step (a non-finite loss or gradient) changes no weighting state.
    """
    if self.method != "gradnorm":
      return
    num_tasks = self.num_tasks
    fused = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.concat([tf.reshape(task_gradients, [-1]), per_task,
                   tf.cast(labelled, tf.float32)], axis=0))
    size = int(task_gradients.shape[1])
    gradients = tf.reshape(fused[:num_tasks * size], [num_tasks, size])
    losses = fused[num_tasks * size:num_tasks * (size + 1)]
    present = fused[num_tasks * (size + 1):] > 0
    applied = tf.logical_and(applied, tf.reduce_all(tf.math.is_finite(fused)))
    present = tf.logical_and(present, applied)  # Skipped: nothing changes.
    had_initial = self.has_initial_losses.read_value()
    initial = tf.where(had_initial, self.initial_losses,
                       tf.where(present, losses, 0.0))
    self.initial_losses.assign(initial)
    self.has_initial_losses.assign(tf.logical_or(had_initial, present))
    active = present  # A first labelled step records L_i(0): ratio 1.
    gradient = gradnorm_gradient(self.task_weights, tf.norm(gradients, axis=1),
                                 losses, initial, self._alpha, active)
    weights, first, second = adam_step(
        self.task_weights, gradient, self.adam_moments[0],
        self.adam_moments[1], self.updates + 1, self._learning_rate,
        active=active)
    self.task_weights.assign(tf.where(applied, weights, self.task_weights))
    self.adam_moments.assign(tf.where(applied, tf.stack([first, second]),
                                      self.adam_moments))
    self.updates.assign_add(tf.cast(applied, self.updates.dtype))

  def update(self, losses: tf.Tensor, applied: tf.Tensor = True) -> None:
    """Records a step's global [T] losses (call in cross-replica context).

    Args:
      losses: The step's global-batch task losses.
      applied: Whether the step's update was applied; the losses of a
        skipped step (not finite) are not recorded.
    """
    if self.method != "dwa":
      return
    applied = tf.convert_to_tensor(applied)
    window_sum = self.window_sum + tf.where(applied, losses, 0.0)
    steps = self.window_steps + tf.cast(applied, self.window_steps.dtype)
    complete = steps >= self._window
    mean = window_sum / tf.cast(steps, tf.float32)
    self.last_means.assign(tf.where(
        complete, tf.stack([mean, self.last_means[0]]), self.last_means))
    self.complete_windows.assign_add(tf.cast(complete, tf.int64))
    self.window_sum.assign(tf.where(complete, tf.zeros_like(window_sum),
                                    window_sum))
    self.window_steps.assign(tf.where(complete, tf.constant(0, tf.int64),
                                      steps))
