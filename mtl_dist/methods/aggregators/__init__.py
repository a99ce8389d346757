"""Gradient aggregators, one module each, named by its catalogue entry.

Importing this package imports every module in it, whose class registers
itself under its entry in `catalog.AGGREGATORS`; so a new aggregator is one
entry there and one new module here (see docs/design.md). `aggregate` runs
any of them on a matrix, as the training step does.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional, Union

import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import typecheck
from mtl_dist.methods import registry

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")


def create(name: str, num_tasks: int, seed: int = 0, **options: Any):
  """A new aggregator `name` for `num_tasks` tasks (its state, if any, new).

  Args:
    name: A registered aggregator (`registry.AGGREGATORS.names()`).
    num_tasks: T.
    seed: Seed of its per-step draws.
    **options: Its options by their own names (`c` for CAGrad); the rest
      take the paper's defaults.

  Raises:
    ValueError: For an unknown name or option.
  """
  return registry.AGGREGATORS.create(name, num_tasks, seed, **options)


@typecheck.checked
def aggregate(name: str, matrix: Any, *, step: int = 0, seed: int = 0,
              state: Optional[dict[str, Any]] = None, losses: Any = None,
              **options: Any
              ) -> Union[tf.Tensor, tuple[tf.Tensor, dict[str, np.ndarray]]]:
  """The update direction of aggregator `name` for a [T, P] task Jacobian.

  The function the joint step calls, usable on its own as TorchJD's
  aggregators are. A method that draws (PCGrad) draws from `(seed, step)`.

  Args:
    name: A registered aggregator, e.g. "mgda", "cagrad", "imtl_g".
    matrix: [T, P] task gradients (row i: task i's gradient), float32; for
      a method with `sub_batches` K > 1 (MoDo, SDMGrad), [K*T, P]: row
      k*T + i is task i's gradient on sub-batch k.
    step: The step number of the draw.
    seed: The run's seed.
    state: A stateful method's state (its variables by name), as returned
      by an earlier call; None: a fresh one.
    losses: The [T] task losses, for a method that needs them (MoCo,
      DB-MTL: `needs_losses`).
    **options: The method's options by their own names, e.g. `c=0.4` for
      CAGrad.

  Returns:
    The [P] float32 update; for a method with state, (update, its state
    after this step).

  Raises:
    ValueError: For an unknown name or option, a matrix that is not
      [T, P] (or [K*T, P] with K sub-batches), or missing or misshapen
      losses.
  """
  matrix = tf.convert_to_tensor(matrix, tf.float32)
  if matrix.shape.rank != 2 or matrix.shape[0] is None:
    raise errors.ConfigError(
        f"aggregate() needs a [T, P] matrix of task gradients, "
        f"got shape {matrix.shape}")
  sub_batches = registry.AGGREGATORS.get(name).sub_batches
  if sub_batches > 1 and (matrix.shape[0] == 0 or
                          matrix.shape[0] % sub_batches):
    raise errors.ConfigError(
        f"aggregator {name!r} takes {sub_batches} sub-batch gradients per "
        f"task: a [{sub_batches}T, P] matrix whose row k*T + i is task i's "
        f"gradient on sub-batch k, got shape {matrix.shape}")
  num_tasks = int(matrix.shape[0]) // sub_batches
  aggregator = create(name, num_tasks, seed, **options)
  registry.assign_state(aggregator, state or {}, f"aggregator {name!r}")
  if aggregator.needs_losses:
    if losses is None:
      raise errors.ConfigError(
          f"aggregator {name!r} needs losses, the [T] task "
          "losses of the step")
    losses = tf.convert_to_tensor(losses, tf.float32)
    if losses.shape != [num_tasks]:
      raise errors.ConfigError(
          f"aggregate() needs [{num_tasks}] losses, one per "
          f"row of the matrix, got shape {losses.shape}")
  else:
    losses = None
  direction = aggregator(matrix, tf.constant(step, tf.int64), losses)
  if not aggregator.variables:
    return direction
  return direction, registry.state_of(aggregator)
