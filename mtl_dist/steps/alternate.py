"""The alternate step: one task per step, picked by the schedule in-graph."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import tensorflow as tf
import tf_keras

from mtl_dist import tasks as tasks_lib
from mtl_dist.methods import schedules
from mtl_dist.model import base as model_base
from mtl_dist.model import precision
from mtl_dist.steps import losses
from mtl_dist.steps import plumbing

Batch = losses.Batch


class AlternateStep:
  """One update of the shared variables and one task's, picked in-graph.

  Only the shared variables and the chosen task's own are handed to the
  chosen task's optimizer: other tasks' variables and other optimizers'
  slots stay bit-for-bit unchanged (with Adam even a zero gradient would
  move a variable).
  Compilation and loss scaling work as in `JointStep`, with the chosen
  task's optimizer.
  """

  def __init__(self, model: model_base.MultiTaskModel,
               tasks: Sequence[tasks_lib.TaskSpec],
               optimizers: Sequence[tf_keras.optimizers.Optimizer],
               global_batch_size: int, schedule: schedules.Schedule,
               skip_nonfinite: bool = True, jit_compile: bool = False):
    """Initialises the step.

    Args:
      model: The shared-trunk model.
      tasks: The tasks, in the order of `optimizers` and of the iterators.
      optimizers: The optimizer of each task (the same object repeated when
        tasks share one).
      global_batch_size: Examples per step over all replicas.
      schedule: Maps the step counter to a task index.
      skip_nonfinite: Leave everything unchanged in a step whose loss or
        gradients are not finite (else apply it anyway).
      jit_compile: XLA-compile each task's forward and backward pass.
    """
    self._model = model
    self._tasks = tuple(tasks)
    self._optimizers = tuple(optimizers)
    self._global_batch_size = global_batch_size
    self._schedule = schedule
    self._skip_nonfinite = skip_nonfinite
    self._pass = plumbing.compiled(self._backward, jit_compile)
    # The model's diagnostics: each task's are measured in its own steps.
    self.metric_names = model.diagnostic_names()
    self._task_diagnostics = [
        [self.metric_names.index(name)
         for name in model.diagnostic_names([task.name])]
        for task in self._tasks]

  def _backward(self, task_index: int, features: tf.Tensor,
                labels: tf.Tensor
                ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """This replica's forward and backward pass for task `task_index`.

    Returns:
      (gradients of the shared and the task's own variables, the loss
      share, the model's diagnostics for the task).
    """
    task = self._tasks[task_index]
    variables = self._model.trunk_and_head_variables(task.name)
    with tf.GradientTape() as tape:
      forward = self._model.forward(features, training=True,
                                    tasks=[task.name])
      loss = losses.average_loss(
          task.per_example_loss(labels, forward.outputs[task.name],
                                check=False),
          self._global_batch_size)
      total = loss + losses.regularization(
          self._model.regularization_losses(task.name))
      total = precision.scaled(self._optimizers[task_index], total)
    gradients = tape.gradient(
        total, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return (precision.unscaled(self._optimizers[task_index], gradients), loss,
            plumbing.stacked(forward.diagnostics))

  def replica_step(self, task_index: int,
                   batch: Batch) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Trains task `task_index` on one replica's batch.

    Returns:
      (the global-batch loss, the metrics vector: the task's diagnostics
      averaged over replicas, zero for the other tasks', whether the step
      was applied).
    """
    task = self._tasks[task_index]
    features, labels = batch
    labels = losses.checked_labels([task], labels, partial_labels=False)
    gradients, loss, diagnostics = self._pass(task_index, features,
                                              labels[task.name])
    optimizer = self._optimizers[task_index]
    gradients, loss, finite = plumbing.reduce_and_check(
        gradients, loss, check_gradients=not precision.scales_losses(optimizer))
    plumbing.apply_if(optimizer, gradients,
              self._model.trunk_and_head_variables(task.name),
              finite if self._skip_nonfinite else None)
    return loss, self._metrics(task_index, diagnostics), finite

  def _metrics(self, task_index: int, diagnostics: tf.Tensor) -> tf.Tensor:
    """All of `metric_names`: the task's diagnostics, zero for the rest."""
    positions = self._task_diagnostics[task_index]
    metrics = tf.zeros([len(self.metric_names)])
    if not positions:
      return metrics
    return tf.tensor_scatter_nd_update(
        metrics, [[i] for i in positions], plumbing.replica_mean(diagnostics))

  def _measured(self, task_index: int) -> tf.Tensor:
    """1 for the metrics a step for task `task_index` measures, else 0."""
    positions = set(self._task_diagnostics[task_index])
    return tf.constant([float(i in positions)
                        for i in range(len(self.metric_names))], tf.float32,
                       shape=[len(self.metric_names)])

  @property
  def cycle(self) -> Optional[int]:
    """T when the schedule trains tasks 0..T-1 in turn (round robin), from
    any step that is a multiple of T; else None."""
    # Exactly RoundRobin over these tasks: a subclass may reorder them.
    if (type(self._schedule) is schedules.RoundRobin and  # pylint: disable=unidiomatic-typecheck
        self._schedule.num_tasks == len(self._tasks)):
      return len(self._tasks)
    return None

  def _run_task(self, strategy: tf.distribute.Strategy,
                iterators: Sequence[tf.distribute.DistributedIterator],
                index: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor,
                                     tf.Tensor]:
    """Task `index`'s step on every replica: (loss, metrics, measured,
    applied), as this worker's first replica has them."""
    loss, metrics, applied = strategy.run(
        self.replica_step, args=(index, next(iterators[index])))
    return (plumbing.first_local(strategy, loss),
            plumbing.first_local(strategy, metrics),
            self._measured(index),
            plumbing.first_local(strategy, applied))

  def _outputs(self, task_index, loss, metrics, measured, applied):
    trained = tf.one_hot(task_index, len(self._tasks))
    # 0 * NaN is NaN: keep a non-finite loss at its task only.
    losses = tf.where(trained > 0, loss, 0.0)
    return losses, trained, metrics, measured, applied

  def __call__(self, strategy: tf.distribute.Strategy,
               iterators: Sequence[tf.distribute.DistributedIterator],
               step: tf.Variable) -> tuple[tf.Tensor, ...]:
    """Runs one step of the scheduled task on every replica.

    Returns:
      (losses, trained, metrics, measured, applied): [T] vectors, zero
      except at the trained task; the metrics vector and which of its
      entries this step measured (the trained task's diagnostics); whether
      the update was applied (False: the loss or a gradient was not finite).
    """
    task_index = self._schedule.task_index(step)
    outputs = tf.switch_case(
        task_index,
        [functools.partial(self._run_task, strategy, iterators, i)
         for i in range(len(self._tasks))])
    return self._outputs(task_index, *outputs)

  def task_step(self, strategy: tf.distribute.Strategy,
                iterators: Sequence[tf.distribute.DistributedIterator],
                task_index: int) -> tuple[tf.Tensor, ...]:
    """One step of task `task_index`, known when tracing: no switch.

    Returns:
      What `__call__` returns for a step that schedules `task_index`.
    """
    return self._outputs(task_index,
                         *self._run_task(strategy, iterators, task_index))
