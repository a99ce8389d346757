"""The loss-weighting contract, and what every loss weighting shares.

A loss weighting turns the [T] task losses of a joint step into the [T]
weights the step multiplies them by. Its state (learned log-variances, loss
histories, GradNorm's weights) is made of variables, created in the
strategy's scope and checkpointed with the run, so a resumed run continues
exactly. Everything it sees is global (all-reduced), so every replica
computes the same weights.

Hooks, each a no-op unless a method needs it:
- `weights(step, losses)`: the step's weights; `losses` are this step's
  global-batch task losses for a method that declares `needs_losses` (the
  step all-reduces them inside its forward pass, as constants of the
  backward pass), else None and the weights are known beforehand;
- `objective(per_task, step, losses)`: this replica's share of the
  weighted objective (weights times losses, plus any term of its own);
- `trainable`: variables the model's optimizer trains with the model;
- `needs_task_gradients` / `task_gradients` / `replica_update`: methods
  that look at each task's gradient at the last shared layer (GradNorm);
- `update(losses, applied, updated_losses)`: after a step, with its global
  losses (and, for `needs_updated_losses`, the same batch's losses after
  the update: one more forward pass).
"""

from __future__ import annotations

from typing import ClassVar, Optional, Protocol, Sequence, Union

import tensorflow as tf

from mtl_dist.methods import catalog
from mtl_dist.methods import state

CLASSIFICATION = "classification"
REGRESSION = "regression"


class Task(Protocol):
  """What a weighting knows of a task (a `TaskSpec` is one)."""

  weight: float  # Its static loss weight.
  kind: str  # CLASSIFICATION or REGRESSION.


class LossWeighting(tf.Module):
  """Task weights of the joint-mode objective, and their state.

  Subclasses set `name` (an entry of `catalog.WEIGHTINGS`, and register
  with `registry.WEIGHTINGS`, which sets their `summary` and `options` from
  the entry), declare `needs_losses` as their entry does, and override the
  hooks they need. Create inside `strategy.scope()`.
  """

  name: ClassVar[str]
  # Set by `registry.WEIGHTINGS.register` from the catalogue entry.
  summary: ClassVar[str]
  options: ClassVar[tuple[catalog.Option, ...]] = ()
  needs_task_gradients: ClassVar[bool] = False
  # Whether `weights` needs the step's global-batch losses (then the step
  # all-reduces them between forward and backward pass: not compilable
  # with --jit_compile).
  needs_losses: ClassVar[bool] = False
  # Whether `update` needs the losses of the step's batch after its update
  # (FAMO): the step then runs one more forward pass (training=False).
  needs_updated_losses: ClassVar[bool] = False

  def __init__(self, tasks: Sequence[Task], seed: int = 0):
    """Creates the weighting (subclasses create their state here).

    Args:
      tasks: The tasks, in order.
      seed: Seed of its per-step draws, made from `(seed, step)`.
    """
    super().__init__(name=f"{self.name}_weighting")
    self.num_tasks = len(tasks)
    self.seed = seed

  @property
  def method(self) -> str:
    """The registered name."""
    return self.name

  @property
  def trainable(self) -> list[tf.Variable]:
    """Variables the model's optimizer trains with the model."""
    return []

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    """The [T] multipliers of the task losses at `step` (int64, 0-based).

    Args:
      step: The step.
      losses: With `needs_losses`, the step's [T] global-batch losses (no
        gradient flows through them); else None.
    """
    raise NotImplementedError(f"{type(self).__name__} defines no weights")

  def objective(self, per_task: tf.Tensor, step: tf.Tensor,
                losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    """This replica's share of the weighted objective.

    Args:
      per_task: [T] this replica's shares of the task losses (they sum over
        replicas to the global-batch losses).
      step: The step.
      losses: As for `weights`.

    Returns:
      A scalar whose sum over replicas is the objective.
    """
    return tf.reduce_sum(self.weights(step, losses) * per_task)

  def task_gradients(self, tape: tf.GradientTape,
                     task_terms: Sequence[tf.Tensor],
                     shared_kernel: Union[tf.Variable, Sequence[tf.Variable]]
                     ) -> tf.Tensor:
    """This replica's gradient of each task's loss at W, the last shared layer.

    It needs nothing from other replicas, so it can be taken with the rest
    of a replica's backward pass (compiled with it, too).

    Args:
      tape: A persistent tape that recorded `task_terms`.
      task_terms: Each task's unweighted loss share, formed inside the tape
        (a slice taken after the tape would not be recorded).
      shared_kernel: The last shared layer's weights W: a variable, or a
        list of them (one per shared expert), taken together.

    Returns:
      [T, size of W] local gradients.
    """
    kernels = tf.nest.flatten(shared_kernel)
    return tf.stack([tf.concat([tf.reshape(gradient, [-1]) for gradient in
                                tape.gradient(
                                    term, kernels,
                                    unconnected_gradients=(
                                        tf.UnconnectedGradients.ZERO))],
                               axis=0)
                     for term in task_terms])

  def replica_update(self, task_gradients: Optional[tf.Tensor],
                     per_task: tf.Tensor, labelled: tf.Tensor,
                     applied: tf.Tensor = True) -> None:
    """Updates the state inside a replica step (for `needs_task_gradients`).

    Args:
      task_gradients: [T, size of W] this replica's `task_gradients` (None
        unless `needs_task_gradients`).
      per_task: [T] this replica's shares of the task losses.
      labelled: [T] this replica's count of examples labelled for each task.
      applied: Whether the model update of this step is applied; a skipped
        step (a non-finite loss or gradient) changes no state.
    """
    del task_gradients, per_task, labelled, applied

  def update(self, losses: tf.Tensor, applied: tf.Tensor = True,
             updated_losses: Optional[tf.Tensor] = None) -> None:
    """Records a step's global [T] losses (cross-replica context).

    Args:
      losses: The step's global-batch task losses.
      applied: Whether the step's update was applied; the losses of a
        skipped step (not finite) are not recorded.
      updated_losses: With `needs_updated_losses`, the same batch's global
        losses after the step's update; else None.
    """
    del losses, applied, updated_losses


# A method's state variables (see `methods/state.py`).
state_variable = state.state_variable
