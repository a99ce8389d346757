"""Loss weightings, one module each, named by its catalogue entry.

Importing this package imports every module in it, whose class registers
itself under its entry in `catalog.WEIGHTINGS`; so a new weighting is one
entry there and one new module here (see docs/design.md). `loss_weights`
runs any of them on a vector of losses, as the joint step does.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import typecheck
from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")


def create(name: str, tasks: Sequence[base.Task], seed: int = 0,
           **options: Any) -> base.LossWeighting:
  """A new loss weighting `name` (its state, if any, new).

  Create it inside `strategy.scope()` when it trains under a strategy.

  Args:
    name: A registered weighting (`registry.WEIGHTINGS.names()`).
    tasks: The tasks, in order (their static weights and kinds).
    seed: Seed of its per-step draws.
    **options: Its options by their own names (`window` for DWA); the rest
      take the paper's defaults.

  Raises:
    ValueError: For an unknown name or option.
  """
  return registry.WEIGHTINGS.create(name, tasks, seed, **options)


class _Task(NamedTuple):
  weight: float
  kind: str


@typecheck.checked
def loss_weights(
    name: str, losses: Any, *, step: int = 0, seed: int = 0,
    task_weights: Optional[Sequence[float]] = None,
    task_kinds: Optional[Sequence[str]] = None,
    state: Optional[dict[str, Any]] = None,
    task_gradients: Any = None, updated_losses: Any = None, **options: Any
) -> Union[tf.Tensor, tuple[tf.Tensor, dict[str, np.ndarray]]]:
  """The [T] weights weighting `name` gives the task losses at `step`.

  The hooks the joint step calls, usable on their own. A stateful method
  (DWA's loss history, GradNorm's weights, uncertainty's log-variances)
  takes its state (None: a fresh one) and returns the state after this
  step's losses, as the step would leave it.

  Args:
    name: A registered weighting, e.g. "static", "dwa", "rlw".
    losses: The [T] global-batch task losses of this step.
    step: The step number (0-based), for methods that draw (RLW).
    seed: The run's seed.
    task_weights: static: the [T] weights (default 1 each).
    task_kinds: uncertainty: each task's "classification" or "regression".
    state: A stateful method's state, as returned by an earlier call.
    task_gradients: gradnorm: the [T, |W|] task gradients at the last
      shared layer W.
    updated_losses: famo: the [T] losses of the same batch after the
      step's update.
    **options: The method's options by their own names, e.g. `window=2`
      for DWA.

  Returns:
    The [T] float32 weights this step uses; with state, (weights, state).

  Raises:
    ValueError: For an unknown name or option, or a missing input.
  """
  losses = tf.convert_to_tensor(losses, tf.float32)
  if losses.shape.rank != 1 or losses.shape[0] is None:
    raise errors.ConfigError(
        f"loss_weights() needs a [T] vector of task losses, got "
        f"shape {losses.shape}")
  num_tasks = int(losses.shape[0])
  weights_given = (task_weights if task_weights is not None
                   else [1.0] * num_tasks)
  kinds = task_kinds if task_kinds is not None else [
      base.CLASSIFICATION] * num_tasks
  if len(weights_given) != num_tasks or len(kinds) != num_tasks:
    raise errors.ConfigError(
        f"task_weights and task_kinds need {num_tasks} entries, "
        "one per loss")
  tasks = [_Task(float(w), k) for w, k in zip(weights_given, kinds)]
  weighting = create(name, tasks, seed, **options)
  registry.assign_state(weighting, state or {}, f"weighting {name!r}")
  step_tensor = tf.constant(step, tf.int64)
  weights = tf.identity(weighting.weights(
      step_tensor, losses if weighting.needs_losses else None))
  if weighting.needs_task_gradients:
    if task_gradients is None:
      raise errors.ConfigError(
          f"weighting {name!r} needs task_gradients, the [T, |W|] "
          "task gradients at the last shared layer")
    weighting.replica_update(
        tf.convert_to_tensor(task_gradients, tf.float32), losses,
        tf.ones([num_tasks]))
  if weighting.needs_updated_losses:
    if updated_losses is None:
      raise errors.ConfigError(
          f"weighting {name!r} needs updated_losses, the [T] "
          "losses of the same batch after the step's update")
    updated_losses = tf.convert_to_tensor(updated_losses, tf.float32)
    if updated_losses.shape != [num_tasks]:
      raise errors.ConfigError(
          f"loss_weights() needs [{num_tasks}] updated_losses, "
          f"got shape {updated_losses.shape}")
  weighting.update(losses, True, updated_losses
                   if weighting.needs_updated_losses else None)
  if not weighting.variables:
    return weights
  return weights, registry.state_of(weighting)
