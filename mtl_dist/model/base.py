"""The architecture contract: what the steps, exporter and evaluator rely on.

A multi-task model says which of its layers every task trains (`shared_layers`)
and which belong to one task (`task_layers`), and runs a forward pass for any
subset of its tasks (`forward`). Everything else the steps need follows:

- `shared_variables`, `task_variables(task)`: the variables of those layers;
  they partition the model's trainable variables. An alternate step for task
  t trains `shared_variables + task_variables(t)` and no other variable; the
  joint step's aggregator combines the tasks' gradients of
  `shared_variables`, and every other variable gets the objective's gradient.
- `regularization_losses(task)`: the shared layers' and the task's own.
- `last_shared_kernel()`: GradNorm's W.
- `forward(...).representation`: the one tensor through which every shared
  variable reaches every output (`--rep_grad`), when the architecture has
  one (`has_representation`).
- `forward(...).diagnostics`: scalars the step averages over replicas and
  steps and logs (gate weights per expert, cross-stitch coefficients).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import tensorflow as tf
import tf_keras


class Forward(NamedTuple):
  """What one forward pass returns.

  Attributes:
    outputs: Task name to its output (logits for classification), for the
      tasks asked for.
    representation: The shared representation z (see `has_representation`),
      else None.
    diagnostics: Name to a scalar over this replica's batch, for the names
      `diagnostic_names(tasks)` lists, in that order.
  """

  outputs: dict[str, tf.Tensor]
  representation: Optional[tf.Tensor]
  diagnostics: dict[str, tf.Tensor]


def unique_variables(layers: Sequence[tf.Module]) -> list[tf.Variable]:
  """The trainable variables of `layers`, each once, in order."""
  seen, variables = set(), []
  for layer in layers:
    for variable in layer.trainable_variables:
      if id(variable) not in seen:
        seen.add(id(variable))
        variables.append(variable)
  return variables


class MultiTaskModel(tf_keras.Model):
  """Base class of every architecture (see the module docstring).

  Subclasses set `self.heads` (task name to head layer, in task order) and
  implement `forward`, `shared_layers` and `task_layers`.
  """

  # Whether `forward` returns a representation every task reads.
  has_representation = False

  @property
  def task_names(self) -> list[str]:
    return list(self.heads)

  def forward(self, inputs: tf.Tensor, training: Optional[bool] = None,
              tasks: Optional[Sequence[str]] = None) -> Forward:
    """Runs the model for `tasks` (default: every task)."""
    raise NotImplementedError

  def shared_layers(self) -> list[tf.Module]:
    """The layers every task trains."""
    raise NotImplementedError

  def task_layers(self, task: str) -> list[tf.Module]:
    """The layers only `task` trains (its head among them)."""
    raise NotImplementedError

  def diagnostic_names(self, tasks: Optional[Sequence[str]] = None
                       ) -> tuple[str, ...]:
    """The names of `forward`'s diagnostics for `tasks` (default: all)."""
    del tasks
    return ()

  def call(self, inputs: tf.Tensor, training: Optional[bool] = None,
           tasks: Optional[Sequence[str]] = None) -> dict[str, tf.Tensor]:
    """Returns `{task: output}` for `tasks` (default: every task)."""
    return self.forward(inputs, training=training, tasks=tasks).outputs

  def call_task(self, inputs: tf.Tensor, task: str,
                training: Optional[bool] = None) -> tf.Tensor:
    """The output of one task; what only other tasks need is not run."""
    return self.forward(inputs, training=training, tasks=[task]).outputs[task]

  def call_with_representation(
      self, inputs: tf.Tensor, training: Optional[bool] = None
  ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """(the shared representation z, `{task: output}` computed from z).

    Raises:
      ValueError: If the architecture has no such representation.
    """
    if not self.has_representation:
      raise ValueError(f"{type(self).__name__} has no representation that "
                       "every task reads (--rep_grad)")
    result = self.forward(inputs, training=training)
    return result.representation, result.outputs

  @property
  def shared_variables(self) -> list[tf.Variable]:
    """The trainable variables every task trains."""
    return unique_variables(self.shared_layers())

  def task_variables(self, task: str) -> list[tf.Variable]:
    """The trainable variables only `task` trains."""
    return unique_variables(self.task_layers(task))

  def trunk_and_head_variables(self, task: str) -> list[tf.Variable]:
    """The trainable variables one task's update may change."""
    return self.shared_variables + self.task_variables(task)

  def regularization_losses(self, task: Optional[str] = None
                            ) -> list[tf.Tensor]:
    """The shared layers' regularization losses and `task`'s (None: all).

    Call after the forward pass that produced them, in the same trace.
    """
    if task is None:
      return list(self.losses)
    return [loss for layer in self.shared_layers() + self.task_layers(task)
            for loss in layer.losses]

  def last_shared_kernel(self) -> Union[tf.Variable, list[tf.Variable]]:
    """The weights W of the last shared layer, where GradNorm looks.

    Raises:
      ValueError: If the shared layers have no variable of rank >= 2.
    """
    kernels = [v for v in self.shared_variables if v.shape.rank >= 2]
    if not kernels:
      raise ValueError("the shared layers have no weight matrix for "
                       "GradNorm's W")
    return kernels[-1]
