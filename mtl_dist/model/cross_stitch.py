"""Cross-stitch networks (Misra et al. 2016): one column per task, mixed.

Each task has its own column of blocks; after every block a cross-stitch
unit replaces each task's activation by a learned linear combination of all
tasks' activations, x'_t = sum_j alpha[t, j] x_j. The units are initialised
near the identity as in the paper: alpha[t, t] = 0.9 and the rest 0.1 shared
evenly among the other tasks (the paper's (0.9, 0.1) for two tasks).

Ownership: the units are shared; a task's column and head are its own.
Through the units every task's loss reaches every column, so the joint step
gives the columns the objective's gradient (end-to-end training, as in the
paper); an alternate step for task t leaves the other columns unchanged.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from mtl_dist.model import base
from mtl_dist.model import hps

# The paper's initial weight of a task's own activation.
SELF_WEIGHT = 0.9


def initial_alpha(num_tasks: int) -> np.ndarray:
  """[T, T]: SELF_WEIGHT on the diagonal, the rest spread evenly (1 for T=1)."""
  if num_tasks == 1:
    return np.ones((1, 1), np.float32)
  alpha = np.full((num_tasks, num_tasks),
                  (1.0 - SELF_WEIGHT) / (num_tasks - 1), np.float32)
  np.fill_diagonal(alpha, SELF_WEIGHT)
  return alpha


class CrossStitchUnit(tf_keras.layers.Layer):
  """Mixes T activations of equal shape with a learned [T, T] matrix."""

  def __init__(self, num_tasks: int, **kwargs):
    super().__init__(dtype="float32", **kwargs)
    self.alpha = self.add_weight(
        name="alpha", shape=(num_tasks, num_tasks),
        initializer=tf_keras.initializers.Constant(initial_alpha(num_tasks)),
        trainable=True)

  def call(self, inputs: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    stacked = tf.stack([tf.cast(x, tf.float32) for x in inputs], axis=0)
    mixed = tf.tensordot(self.alpha, stacked, axes=[[1], [0]])
    return tf.unstack(mixed, num=len(inputs), axis=0)


class CrossStitchModel(base.MultiTaskModel):
  """Task columns of equal depth with a cross-stitch unit after each block."""

  def __init__(self, columns: Mapping[str, Sequence[tf_keras.layers.Layer]],
               heads: Mapping[str, tf_keras.layers.Layer], **kwargs):
    """Initialises the model.

    Args:
      columns: Task name to its column's blocks (the same number for every
        task; a block's outputs must have the same shape in every column).
      heads: Task name to its head.
      **kwargs: Passed to `tf_keras.Model`.

    Raises:
      ValueError: If the columns differ in depth or are empty.
    """
    super().__init__(**kwargs)
    depths = {len(blocks) for blocks in columns.values()}
    if len(depths) != 1 or 0 in depths:
      raise ValueError(f"cross-stitch columns need the same number of blocks "
                       f"(at least 1), got {sorted(depths)}")
    self.columns = {task: list(blocks) for task, blocks in columns.items()}
    self.units = [CrossStitchUnit(len(columns), name=f"cross_stitch_{i}")
                  for i in range(depths.pop())]
    self.heads = dict(heads)

  def diagnostic_names(self, tasks: Optional[Sequence[str]] = None
                       ) -> tuple[str, ...]:
    """`cross_stitch/unit<i>/<task>/<from>`: every unit's coefficients."""
    del tasks  # Every step uses every unit.
    return tuple(f"cross_stitch/unit{i}/{to}/{source}"
                 for i in range(len(self.units))
                 for to in self.task_names for source in self.task_names)

  def forward(self, inputs: tf.Tensor, training: Optional[bool] = None,
              tasks: Optional[Sequence[str]] = None) -> base.Forward:
    names = self.task_names
    activations = [inputs] * len(names)
    for i, unit in enumerate(self.units):
      activations = unit([self.columns[task][i](x, training=training)
                          for task, x in zip(names, activations)])
    wanted = names if tasks is None else list(tasks)
    outputs = {task: self.heads[task](activations[names.index(task)],
                                      training=training) for task in wanted}
    diagnostics = {}
    for i, unit in enumerate(self.units):
      for t, to in enumerate(names):
        for s, source in enumerate(names):
          diagnostics[f"cross_stitch/unit{i}/{to}/{source}"] = (
              tf.identity(unit.alpha[t, s]))
    return base.Forward(outputs, None, diagnostics)

  def shared_layers(self) -> list[tf.Module]:
    return list(self.units)

  def task_layers(self, task: str) -> list[tf.Module]:
    return list(self.columns[task]) + [self.heads[task]]


def column_blocks(kind: str, width: int, depth: int,
                  dtype: Optional[tf_keras.mixed_precision.Policy] = None
                  ) -> list[tf_keras.layers.Layer]:
  """A built-in trunk (`hps.trunk_layers`) as `depth` blocks, each ending
  where a unit goes: a new block starts at each layer with weights after the
  first, so weightless layers (flattening, pooling) stay with the layer
  before them (mlp: one dense layer per block, the first flattening; conv:
  a convolution and its pooling, the last also global average pooling).
  """
  blocks, last_has_weights = [], False
  for layer in hps.trunk_layers(kind, width, depth, dtype):
    weighted = isinstance(layer, (tf_keras.layers.Dense,
                                  tf_keras.layers.Conv2D))
    if not blocks or (weighted and last_has_weights):
      blocks.append([])
      last_has_weights = False
    blocks[-1].append(layer)
    last_has_weights = last_has_weights or weighted
  return [tf_keras.Sequential(layers, name=f"block_{i}")
          for i, layers in enumerate(blocks)]
