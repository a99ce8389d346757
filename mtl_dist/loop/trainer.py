"""The trainer: a run's state (model, optimizers, counters) and its loops.

Following TF Model Garden's orbit, the host calls `train(iterators, n)` and
`n` steps run inside one tf.function call (alternate round robin: whole
rounds in a loop without the task switch, see `Trainer.train`), `n` passed
as a tensor so that no call after the first retraces. Joint and alternate
mode share this loop and differ only in the step object (see steps/).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist import typecheck
from mtl_dist.loop import evaluator
from mtl_dist.methods import aggregators
from mtl_dist.methods import optimizers as optimizers_lib
from mtl_dist.methods import registry
from mtl_dist.methods import schedules
from mtl_dist.methods import weightings
from mtl_dist.model import base as model_base
from mtl_dist.model import precision
from mtl_dist.steps import alternate
from mtl_dist.steps import joint

OptimizerFactory = optimizers_lib.OptimizerFactory


class SkippedSteps(NamedTuple):
  """Steps of one `Trainer.train` call skipped for non-finite values.

  Attributes:
    count: How many steps were skipped.
    first_step: The first skipped step's number (1-based, as logged), or -1.
    nonfinite_losses: The tasks whose loss was not finite at that step.
    trained: The tasks that step trained (all of them in joint mode).
  """

  count: int
  first_step: int
  nonfinite_losses: list[str]
  trained: list[str]


class LoopResult(NamedTuple):
  """What one `Trainer.train` call measured.

  Attributes:
    loss_sums: [T] each task's summed mean training loss over the applied
      steps that trained it; loss_sums[i] / counts[i] is its mean.
    counts: [T] the applied steps that trained each task.
    step_metrics: The step's own metrics (task weights, the aggregator's
      conflict share, the model's diagnostics), each averaged over the
      applied steps that measured it (an alternate step measures only its
      task's gates); metrics no step measured are left out.
    step_metric_counts: The applied steps each of `step_metrics` averages.
    skipped: The steps skipped for non-finite values.
    loss_scales: The loss scale(s) after the call (see
      `Trainer.loss_scales`), {} without loss scaling.
    learning_rates: The learning rate(s) after the call (see
      `Trainer.learning_rates`).
  """

  loss_sums: np.ndarray
  counts: np.ndarray
  step_metrics: dict[str, float]
  step_metric_counts: dict[str, int]
  skipped: SkippedSteps
  loss_scales: dict[str, float]
  learning_rates: dict[str, float]


class Trainer:
  """Owns the trained state and runs compiled train and eval loops.

  Attributes:
    model: The shared-trunk model.
    tasks: The trained tasks, in order.
    global_step: Steps run so far (int64 variable, checkpointed).
    task_steps: [T] update steps each task has received (checkpointed).
    optimizers: Task name to its optimizer; in joint mode and with a shared
      optimizer every task maps to the same object.
    loss_scaling: Whether the optimizers scale losses (LossScaleOptimizer):
      a model that computes in float16 gets them wrapped.
  """

  @typecheck.checked
  def __init__(self, strategy: tf.distribute.Strategy,
               model: model_base.MultiTaskModel,
               tasks: Sequence[tasks_lib.TaskSpec], *, mode: str,
               global_batch_size: int, optimizer_factory: OptimizerFactory,
               per_task_optimizer: bool = True,
               schedule: Optional[schedules.Schedule] = None,
               partial_labels: bool = False, aggregator: str = "sum",
               weighting: str = "static",
               method_options: Optional[Mapping[str, Any]] = None,
               seed: int = 0, rep_grad: bool = False,
               skip_nonfinite: bool = True, jit_compile: bool = False):
    """Creates the optimizers and counters inside the strategy's scope.

    Args:
      strategy: The strategy the model was built under.
      model: A built shared-trunk model with a head for every task.
      tasks: The trained tasks, in order.
      mode: "joint" or "alternate".
      global_batch_size: Examples per step over all replicas.
      optimizer_factory: Makes one optimizer. For a model that computes in
        float16 (`build_model(..., mixed_precision="float16")`) each one is
        wrapped in a dynamic `tf_keras.mixed_precision.LossScaleOptimizer`,
        unless the factory returns one already (e.g. with another initial
        scale). Then the finite check of `skip_nonfinite` and the result's
        `skipped` cover the losses only: a step with overflowing gradients
        is skipped by the optimizer, which lowers its scale.
      per_task_optimizer: Alternate mode: one optimizer per task (else one
        shared). Ignored in joint mode, which has one optimizer.
      schedule: Alternate mode: picks each step's task (default round
        robin).
      partial_labels: Joint mode: examples may lack some tasks' labels;
        each task's loss then averages over the examples that carry its
        label in the global batch (see `steps.losses.task_losses`).
      aggregator: Joint mode: how task gradients combine, a name in
        `registry.AGGREGATORS` (see `steps.JointStep`).
      weighting: Joint mode: how task losses are weighted, a name in
        `registry.WEIGHTINGS`.
      method_options: The chosen methods' options by flag name (e.g.
        `{"cagrad_c": 0.3, "dwa_window": 10}`); unset ones take the
        papers' defaults.
      seed: Seed of the methods' per-step draws (PCGrad's task orders,
        RLW's weights), made from `(seed, step)`.
      rep_grad: Aggregate from gradients at the shared representation
        (MGDA-UB form; aggregators with a Gram-matrix form only).
      skip_nonfinite: Leave everything unchanged in a step whose losses or
        gradients are not finite. False applies such a step anyway (it is
        still reported in the result's `skipped`), for callers that stop
        and discard the state then, and saves the conditional update's cost.
      jit_compile: XLA-compile each replica's forward and backward pass
        (losses and gradients); the all-reduce, the finite check and the
        update stay outside. Not with `rep_grad`.

    Raises:
      ValueError: For `jit_compile` with `rep_grad` or with an aggregator
        that needs sub-batches, an unknown method, or an option of a
        method that is not chosen.
      errors.ConfigError: For a `global_batch_size` not divisible by the
        aggregator's sub-batches times the replicas.
    """
    self._strategy = strategy
    self.model = model
    self.tasks = tuple(tasks)
    self.mode = mode
    self.global_batch_size = global_batch_size
    num_tasks = len(self.tasks)
    self._per_task_optimizer = mode == "alternate" and per_task_optimizer
    scale_losses = precision.computes_in_float16(model)

    def make_optimizer() -> tf_keras.optimizers.Optimizer:
      optimizer = optimizer_factory()
      return (precision.with_loss_scaling(optimizer) if scale_losses
              else optimizer)
    with strategy.scope():
      first_replica = tf.VariableAggregation.ONLY_FIRST_REPLICA
      self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                     name="global_step",
                                     aggregation=first_replica)
      self.task_steps = tf.Variable(tf.zeros([num_tasks], tf.int64),
                                    trainable=False, name="task_steps",
                                    aggregation=first_replica)
      # Steps skipped for a NaN or Inf loss or gradient, over the whole run.
      self.nonfinite_skipped = tf.Variable(
          0, dtype=tf.int64, trainable=False, name="nonfinite_skipped",
          aggregation=first_replica)
      if mode != "joint":
        weighting, aggregator = "static", "sum"
      self.weighting, self.aggregator = _create_methods(
          self.tasks, weighting, aggregator, method_options or {}, seed)
      # Optimizers are created and built (slots included) in the scope,
      # before the first trace.
      if self._per_task_optimizer:
        self.optimizers = {}
        for task in self.tasks:
          optimizer = make_optimizer()
          optimizer.build(model.trunk_and_head_variables(task.name))
          self.optimizers[task.name] = optimizer
      else:
        shared = make_optimizer()
        shared.build(model.trainable_variables + self.weighting.trainable)
        self.optimizers = {task.name: shared for task in self.tasks}
    self.loss_scaling = any(precision.scales_losses(optimizer)
                            for optimizer in self.optimizers.values())
    self.schedule = schedule
    if mode == "joint":
      _check_sub_batches(self.aggregator, global_batch_size,
                         strategy.num_replicas_in_sync)
      self._step = joint.JointStep(
          model, self.tasks, shared, global_batch_size, partial_labels,
          aggregator=self.aggregator, weighting=self.weighting,
          rep_grad=rep_grad, skip_nonfinite=skip_nonfinite,
          jit_compile=jit_compile)
    else:
      self._step = alternate.AlternateStep(
          model, self.tasks, [self.optimizers[t.name] for t in self.tasks],
          global_batch_size, schedule or schedules.RoundRobin(num_tasks),
          skip_nonfinite=skip_nonfinite, jit_compile=jit_compile)
    self._train_loop = tf.function(self._train_loop_fn)
    self._cycles_loop = tf.function(self._cycles_loop_fn)
    self._evaluator = evaluator.Evaluator(strategy, model, self.tasks)

  def checkpoint_items(self) -> dict[str, tf.Module]:
    """The objects a `tf.train.Checkpoint` of this run holds, by name."""
    items = {"model": self.model, "global_step": self.global_step,
             "task_steps": self.task_steps,
             "nonfinite_skipped": self.nonfinite_skipped}
    if self._per_task_optimizer:
      items["optimizers"] = dict(self.optimizers)
    else:
      items["optimizer"] = self.optimizers[self.tasks[0].name]
    if isinstance(self.schedule, tf.Module) and self.schedule.variables:
      items["schedule"] = self.schedule  # Its state resumes with the run.
    if self.weighting.variables:
      items["weighting"] = self.weighting
    if self.aggregator.variables:
      items["aggregator"] = self.aggregator
    return items

  def loss_scales(self) -> dict[str, float]:
    """The current loss scale(s) with loss scaling, else {}.

    Returns:
      `{"loss_scale": s}` for one optimizer, `{"<task>/loss_scale": s}` per
      task with per-task optimizers.
    """
    return {name: float(value)
            for name, value in self._read_loss_scales().items()}

  def _read_loss_scales(self) -> dict[str, tf.Tensor]:
    if not self.loss_scaling:
      return {}
    if not self._per_task_optimizer:
      return {"loss_scale": tf.identity(
          self.optimizers[self.tasks[0].name].loss_scale)}
    return {f"{name}/loss_scale": tf.identity(optimizer.loss_scale)
            for name, optimizer in self.optimizers.items()}

  def learning_rates(self) -> dict[str, float]:
    """The current learning rate(s).

    Returns:
      `{"learning_rate": lr}` for one optimizer, `{"<task>/learning_rate":
      lr}` per task with per-task optimizers.
    """
    return {name: float(value)
            for name, value in self._read_learning_rates().items()}

  def _read_learning_rates(self) -> dict[str, tf.Tensor]:
    def value(optimizer: tf_keras.optimizers.Optimizer) -> tf.Tensor:
      return tf.identity(tf.convert_to_tensor(optimizer.learning_rate))
    if not self._per_task_optimizer:
      return {"learning_rate": value(self.optimizers[self.tasks[0].name])}
    return {f"{name}/learning_rate": value(optimizer)
            for name, optimizer in self.optimizers.items()}

  @property
  def train_trace_count(self) -> int:
    """How many times the train loops have been traced: once each at most.

    Alternate mode with the round-robin schedule runs the whole rounds of
    a call (from a round's start) without an in-graph task switch: a loop
    of its own, traced on its first use.
    """
    return (self._train_loop.experimental_get_tracing_count() +
            self._cycles_loop.experimental_get_tracing_count())

  @property
  def eval_trace_count(self) -> int:
    """How many times the eval loop has been traced (0 before evaluating)."""
    return self._evaluator.trace_count

  def _train_loop_fn(self, iterators, num_steps):
    """`num_steps` steps, each task picked by the step (see steps/)."""
    return self._loop(num_steps, [
        lambda: self._step(self._strategy, iterators, self.global_step)])

  def _cycles_loop_fn(self, iterators, num_cycles):
    """Alternate round robin: `num_cycles` runs of one step per task in
    order, with no in-graph switch between the tasks' steps."""
    return self._loop(num_cycles, [
        functools.partial(self._step.task_step, self._strategy, iterators, i)
        for i in range(self._step.cycle)])

  def _loop(self, num_iterations, steps):
    """Runs `steps` in order, `num_iterations` times, and sums what they
    measured (see `LoopResult`)."""
    num_tasks = len(self.tasks)
    loss_sums = tf.zeros([num_tasks])
    trained_counts = tf.zeros([num_tasks])
    metric_sums = tf.zeros([len(self._step.metric_names)])
    metric_counts = tf.zeros([len(self._step.metric_names)])
    skipped = tf.constant(0, tf.int64)
    first_skipped = tf.constant(-1, tf.int64)
    first_skipped_losses = tf.zeros([num_tasks])
    first_skipped_trained = tf.zeros([num_tasks])
    for _ in tf.range(num_iterations):
      for run_step in steps:
        losses, trained, metrics, measured, applied = run_step()
        # Counters count steps run (batches read), applied or not.
        self.task_steps.assign_add(tf.cast(trained, tf.int64))
        self.global_step.assign_add(1)
        loss_sums += tf.where(applied, losses, 0.0)
        trained_counts += tf.where(applied, trained, 0.0)
        measured = tf.logical_and(applied, measured > 0)
        metric_sums += tf.where(measured, metrics, 0.0)
        metric_counts += tf.cast(measured, tf.float32)
        first = tf.logical_and(tf.logical_not(applied), first_skipped < 0)
        first_skipped = tf.where(first, self.global_step.read_value(),
                                 first_skipped)
        first_skipped_losses = tf.where(first, losses, first_skipped_losses)
        first_skipped_trained = tf.where(first, trained,
                                         first_skipped_trained)
        skipped += tf.cast(tf.logical_not(applied), tf.int64)
    self.nonfinite_skipped.assign_add(skipped)
    return (loss_sums, trained_counts, (metric_sums, metric_counts),
            (skipped, first_skipped, first_skipped_losses,
             first_skipped_trained),
            self._read_loss_scales(), self._read_learning_rates())

  def train(self, iterators: Sequence[tf.distribute.DistributedIterator],
            num_steps: int) -> LoopResult:
    """Runs `num_steps` steps in one tf.function call.

    (Alternate mode with the round-robin schedule: its whole rounds in one
    call of the round loop, and the steps before a round's start and after
    the last round in a call of the switched loop each.)

    A step whose loss or gradient is not finite (on any replica) changes
    nothing; such steps are reported in the result's `skipped`. With loss
    scaling only the losses count here: the LossScaleOptimizer skips a step
    whose gradients overflowed by itself, unreported.

    Args:
      iterators: Joint mode: one iterator over examples labelled for every
        task. Alternate mode: one iterator per task, in task order.
      num_steps: Steps to run.

    Returns:
      What the steps measured (see `LoopResult`), read back in one go.
    """
    iterators = tuple(iterators)
    parts = [tf.nest.map_structure(lambda t: t.numpy(), loop(
        iterators, tf.constant(iterations, tf.int64)))
             for loop, iterations in self._loop_calls(num_steps)]
    (loss_sums, counts, (metric_sums, metric_counts), skipped, loss_scales,
     learning_rates) = _merged(parts)
    count, first_step, losses, trained = skipped
    measured = [(name, float(total), int(steps)) for name, total, steps in
                zip(self._step.metric_names, metric_sums, metric_counts)
                if steps]
    return LoopResult(
        loss_sums=loss_sums, counts=counts,
        step_metrics={name: total / steps for name, total, steps in measured},
        step_metric_counts={name: steps for name, _, steps in measured},
        skipped=SkippedSteps(
            count=int(count), first_step=int(first_step),
            nonfinite_losses=[t.name for t, v in zip(self.tasks, losses)
                              if not np.isfinite(v)],
            trained=[t.name for t, v in zip(self.tasks, trained) if v]),
        loss_scales={k: float(v) for k, v in loss_scales.items()},
        learning_rates={k: float(v) for k, v in learning_rates.items()})

  def _loop_calls(self, num_steps: int) -> list[tuple[Any, int]]:
    """(loop, iterations) of each call that `num_steps` steps take.

    One call of the switched loop, except in alternate mode with the
    round-robin schedule: there the whole rounds run in the round loop,
    after the switched steps up to a round's start and before the ones
    left over.
    """
    cycle = getattr(self._step, "cycle", None)
    if not cycle:
      return [(self._train_loop, num_steps)]
    lead = min(-int(self.global_step.numpy()) % cycle, num_steps)
    rounds, tail = divmod(num_steps - lead, cycle)
    calls = [(self._train_loop, lead), (self._cycles_loop, rounds),
             (self._train_loop, tail)]
    return [call for call in calls if call[1]] or [(self._train_loop, 0)]

  def evaluate(self, datasets: Sequence[tf.distribute.DistributedDataset],
               task_groups: Sequence[Sequence[str]]) -> dict[str, float]:
    """Evaluates on finite distributed datasets; see `Evaluator.evaluate`."""
    return self._evaluator.evaluate(datasets, task_groups)


def _merged(parts: Sequence[tuple]) -> tuple:
  """One loop's outputs from those of consecutive loop calls (NumPy)."""
  merged = parts[0]
  for part in parts[1:]:
    sums, counts, (metric_sums, metric_counts), skipped = merged[:4]
    count, first_step, first_losses, first_trained = skipped
    more, more_first, more_losses, more_trained = part[3]
    if first_step < 0:  # The first skipped step is the earliest call's.
      first_step, first_losses, first_trained = (more_first, more_losses,
                                                 more_trained)
    merged = (sums + part[0], counts + part[1],
              (metric_sums + part[2][0], metric_counts + part[2][1]),
              (count + more, first_step, first_losses, first_trained),
              part[4], part[5])  # Loss scales and rates: the latest.
  return merged


def _check_sub_batches(aggregator: aggregators.base.Aggregator,
                       global_batch_size: int, replicas: int) -> None:
  """Refuses a global batch that K sub-batches x the replicas do not divide.

  Sub-batch k holds the examples at global index k mod K; each replica
  can assign its examples so only when K divides its batch.

  Raises:
    ConfigError: Naming --global_batch_size, --aggregator and the replicas.
  """
  sub_batches = aggregator.sub_batches
  if sub_batches > 1 and global_batch_size % (sub_batches * replicas):
    raise errors.ConfigError(
        f"--global_batch_size={global_batch_size}: --aggregator="
        f"{aggregator.name} splits the batch into {sub_batches} strided "
        f"sub-batches, so the global batch must be divisible by "
        f"{sub_batches} x the {replicas} replica(s) = {sub_batches * replicas}")


def _create_methods(tasks: Sequence[tasks_lib.TaskSpec], weighting: str,
                    aggregator: str, options: Mapping[str, Any], seed: int
                    ) -> tuple[weightings.base.LossWeighting,
                               aggregators.base.Aggregator]:
  """The joint step's loss weighting and aggregator, with their options.

  Raises:
    ValueError: For an unknown method, or an option of another method.
  """
  chosen = ((weighting, registry.WEIGHTINGS.get(weighting)),
            (aggregator, registry.AGGREGATORS.get(aggregator)))
  allowed = {f"{method}_{option.name}" for method, cls in chosen
             for option in cls.options}
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise ValueError(f"method option(s) {', '.join(unknown)}: not an option "
                     f"of weighting {weighting!r} or aggregator "
                     f"{aggregator!r}")
  weighting_options = registry.WEIGHTINGS.resolve_options(weighting,
                                                          options.get)
  aggregator_options = registry.AGGREGATORS.resolve_options(aggregator,
                                                            options.get)
  return (weightings.create(weighting, tasks, seed, **weighting_options),
          aggregators.create(aggregator, len(tasks), seed,
                             **aggregator_options))
