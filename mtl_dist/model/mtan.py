"""MTAN (Liu et al. 2019): a shared trunk and per-task attention at each layer.

Each task has an attention module at every layer of the shared trunk that
has weights. At the trunk's i-th such layer, with shared output s_i, the
module of task t computes a mask a = sigmoid(h(relu(g([s_i, f_{i-1}])))) and
the task's feature f_i = a * s_i; g and h are 1x1 convolutions (dense layers
for vectors) of s_i's width, and the first module reads s_1 alone. The
trunk's weightless layers (flattening, pooling) are applied to the task
features too, so that f_{i-1} has s_i's spatial size. The task's head reads
its last feature. Unlike the paper, the modules have no batch
normalization (its statistics would differ between replicas) and no extra
3x3 block, since the built-in trunks keep their width from layer to layer.

Ownership: the trunk is shared; a task's attention modules and head are its
own. Every shared layer reaches the outputs through its own mask, so there
is no single representation for `--rep_grad`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras

from mtl_dist.model import base


class AttentionModule(tf_keras.layers.Layer):
  """One task's attention at one trunk layer: [s] or [s, f_prev] -> a * s."""

  def build(self, input_shape):
    shared_shape = tf.TensorShape(input_shape[0])
    width = shared_shape[-1]
    if shared_shape.rank == 4:
      make = lambda activation: tf_keras.layers.Conv2D(  # noqa: E731
          width, 1, activation=activation, dtype=self.dtype_policy)
    elif shared_shape.rank == 2:
      make = lambda activation: tf_keras.layers.Dense(  # noqa: E731
          width, activation=activation, dtype=self.dtype_policy)
    else:
      raise ValueError(f"MTAN attends to [batch, width] or [batch, height, "
                       f"width, channels] features, not {shared_shape}")
    self.g = make("relu")
    self.h = make("sigmoid")
    super().build(input_shape)

  def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
    shared = inputs[0]
    features = shared if len(inputs) == 1 else tf.concat(list(inputs), -1)
    return self.h(self.g(features)) * shared


def _has_weights(layer: tf_keras.layers.Layer) -> bool:
  return bool(layer.trainable_weights)


class MTANModel(base.MultiTaskModel):
  """A shared trunk (a list of layers) with task attention (see module doc)."""

  def __init__(self, trunk: Sequence[tf_keras.layers.Layer],
               attention: Mapping[str, Sequence[AttentionModule]],
               heads: Mapping[str, tf_keras.layers.Layer], **kwargs):
    """Initialises the model.

    Args:
      trunk: The shared layers, in order, already built; each one with
        trainable weights gets an attention module per task. Layers with
        weights after the first must keep the spatial size of their input
        (the task's previous feature is concatenated with their output).
      attention: Task name to one module per trunk layer that has weights.
      heads: Task name to its head.
      **kwargs: Passed to `tf_keras.Model`.
    """
    super().__init__(**kwargs)
    self.trunk = list(trunk)
    # Fixed when built: freezing a layer later must not move the modules.
    self._attended = [_has_weights(layer) for layer in self.trunk]
    self.attention = {task: list(modules)
                      for task, modules in attention.items()}
    self.heads = dict(heads)

  def forward(self, inputs: tf.Tensor, training: Optional[bool] = None,
              tasks: Optional[Sequence[str]] = None) -> base.Forward:
    wanted = self.task_names if tasks is None else list(tasks)
    shared = inputs
    features = {task: None for task in wanted}
    index = 0
    for layer, attended in zip(self.trunk, self._attended):
      shared = layer(shared, training=training)
      if attended:
        for task in wanted:
          previous = features[task]
          features[task] = self.attention[task][index](
              [shared] if previous is None else [shared, previous])
        index += 1
      else:
        for task in wanted:
          if features[task] is not None:
            features[task] = layer(features[task], training=training)
    outputs = {task: self.heads[task](features[task], training=training)
               for task in wanted}
    return base.Forward(outputs, None, {})

  def shared_layers(self) -> list[tf.Module]:
    return list(self.trunk)

  def task_layers(self, task: str) -> list[tf.Module]:
    return list(self.attention[task]) + [self.heads[task]]


def build(task_names: Sequence[str],
          trunk: Sequence[tf_keras.layers.Layer],
          input_shape: Sequence[int], input_dtype: tf.DType,
          heads: Mapping[str, tf_keras.layers.Layer]) -> MTANModel:
  """An MTAN model around a trunk's layers (built here to count weights).

  Raises:
    ValueError: If no layer of the trunk has weights.
  """
  layers = list(trunk)
  outputs = tf.zeros((1, *input_shape), input_dtype)
  for layer in layers:
    outputs = layer(outputs)
  weighted = sum(_has_weights(layer) for layer in layers)
  if not weighted:
    raise ValueError("--architecture=mtan: the trunk has no layer with "
                     "weights to attend to")
  policy = next(layer.dtype_policy for layer in layers if _has_weights(layer))
  attention = {task: [AttentionModule(dtype=policy,
                                      name=f"attention_{task}_{i}")
                      for i in range(weighted)] for task in task_names}
  return MTANModel(layers, attention, heads, name="mtan_model")
