"""The shared-trunk model: one trunk, one head per task.

In a checkpoint the trunk's variables sit under `model/trunk/...` and each
head's under `model/heads/<task>/...`, so `tf.train.list_variables` tells which
task a variable belongs to.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import tensorflow as tf
import tf_keras

from mtl_dist import tasks as tasks_lib
from mtl_dist import typecheck
from mtl_dist.model import base
from mtl_dist.model import pieces
from mtl_dist.model import precision


class SharedTrunkModel(base.MultiTaskModel):
  """A trunk shared by all tasks and a dict of task-specific heads.

  Hard parameter sharing: the trunk's variables are shared by every task,
  each head's belong to its task. The trunk's output is the representation
  every task reads (`--rep_grad`).
  """

  has_representation = True

  def __init__(self, trunk: tf_keras.layers.Layer,
               heads: Mapping[str, tf_keras.layers.Layer], **kwargs):
    """Initialises the model.

    Args:
      trunk: A tf_keras layer or model (a user's Keras 3 or tf.Module piece
        adapted by `pieces.adapt`) mapping inputs to a representation.
      heads: Task name to a layer mapping the representation to the task's
        output (logits for classification).
      **kwargs: Passed to `tf_keras.Model`.
    """
    super().__init__(**kwargs)
    self.trunk = pieces.adapt(trunk, "SharedTrunkModel: trunk")
    self.heads = {task: pieces.adapt(head, f"SharedTrunkModel: heads[{task!r}]")
                  for task, head in heads.items()}

  def forward(self, inputs: tf.Tensor, training: Optional[bool] = None,
              tasks: Optional[Sequence[str]] = None) -> base.Forward:
    representation = self.trunk(inputs, training=training)
    outputs = {name: self.heads[name](representation, training=training)
               for name in (tasks if tasks is not None else self.heads)}
    return base.Forward(outputs, representation, {})

  def shared_layers(self) -> list[tf.Module]:
    return [self.trunk]

  def task_layers(self, task: str) -> list[tf.Module]:
    return [self.heads[task]]


def trunk_layers(kind: str, width: int, depth: int,
                 dtype: Optional[tf_keras.mixed_precision.Policy] = None
                 ) -> list[tf_keras.layers.Layer]:
  """The layers of a built-in trunk, in order (see `build_trunk`).

  Raises:
    ValueError: For an unknown kind.
  """
  if kind == "mlp":
    layers = [tf_keras.layers.Flatten(dtype=dtype)]
    layers += [tf_keras.layers.Dense(width, activation="relu", dtype=dtype)
               for _ in range(depth)]
  elif kind == "conv":
    layers = []
    for _ in range(depth):
      layers += [tf_keras.layers.Conv2D(width, 3, padding="same",
                                        activation="relu", dtype=dtype),
                 tf_keras.layers.MaxPooling2D(2, padding="same", dtype=dtype)]
    layers.append(tf_keras.layers.GlobalAveragePooling2D(dtype=dtype))
  else:
    raise ValueError(f"unknown trunk {kind!r} (known: mlp, conv)")
  return layers


def build_trunk(kind: str, width: int, depth: int,
                dtype: Optional[tf_keras.mixed_precision.Policy] = None,
                name: str = "trunk") -> tf_keras.layers.Layer:
  """A built-in trunk.

  Args:
    kind: "mlp" (flatten, then `depth` ReLU dense layers of `width` units) or
      "conv" (`depth` blocks of 3x3 ReLU convolution with `width` filters and
      2x2 max pooling, then global average pooling).
    width: Units or filters per layer.
    depth: Number of layers or blocks.
    dtype: Every layer's dtype policy (None: the global policy).
    name: The layer's name.

  Returns:
    The (unbuilt) trunk.
  """
  return tf_keras.Sequential(trunk_layers(kind, width, depth, dtype),
                             name=name)


def default_heads(tasks: Sequence[tasks_lib.TaskSpec],
                  head_fn: Optional["HeadFn"], dtype: Optional[str]
                  ) -> dict[str, tf_keras.layers.Layer]:
  """Each task's head: `head_fn(task)`, or a linear layer of its size.

  Raises:
    ConfigError: If `head_fn` returns something that is not a layer (see
      `pieces.adapt`).
  """
  if head_fn is not None:
    return {task.name: pieces.adapt(head_fn(task),
                                    f"head_fn for task {task.name!r}")
            for task in tasks}
  return {task.name: tf_keras.layers.Dense(task.output_size,
                                           name=f"head_{task.name}",
                                           dtype=dtype)
          for task in tasks}


def build_and_check(model: base.MultiTaskModel,
                    tasks: Sequence[tasks_lib.TaskSpec],
                    input_shape: Sequence[int],
                    input_dtype: tf.DType) -> base.MultiTaskModel:
  """Creates every variable of `model` and checks its output sizes.

  Raises:
    ValueError: For a head whose output does not have `task.output_size`
      units.
  """
  outputs = model(tf.zeros((1, *input_shape), input_dtype))
  for task in tasks:
    if outputs[task.name].shape[-1] != task.output_size:
      raise ValueError(
          f"task {task.name!r}: its head outputs {outputs[task.name].shape[-1]}"
          f" units, the task needs {task.output_size}")
  return model


# Makes a user's trunk: a Keras 3 or tf_keras layer or model, or a callable
# tf.Module (see pieces.py).
TrunkFn = Callable[[], Any]
# Makes a user's head for a task: a piece like the trunk's, mapping the
# trunk's output to `task.output_size` units (logits for classification).
HeadFn = Callable[[tasks_lib.TaskSpec], Any]


@typecheck.checked
@pieces.with_replica_local_state
def build_model(tasks: Sequence[tasks_lib.TaskSpec], input_shape: Sequence[int],
                trunk: Union[str, TrunkFn] = "mlp", trunk_width: int = 256,
                trunk_depth: int = 2,
                mixed_precision: str = "none",
                head_fn: Optional[HeadFn] = None,
                input_dtype: tf.DType = tf.float32) -> SharedTrunkModel:
  """A built shared-trunk model with a head per task.

  Call inside `strategy.scope()` so that the variables are distributed.

  Args:
    tasks: One head per task, sized by `TaskSpec.output_size`.
    input_shape: Shape of one example, without the batch dimension.
    trunk: The built-in trunk's kind (see `build_trunk`), or a function
      returning the user's trunk: a Keras 3 or tf_keras layer or model, or
      a callable tf.Module.
    trunk_width: Units or filters per built-in trunk layer.
    trunk_depth: Number of built-in trunk layers.
    mixed_precision: "none", or "bfloat16" / "float16": the built-in trunk
      computes in that dtype with float32 variables, the heads in float32
      (so outputs and losses are float32). The global Keras policy is left
      alone. A `Trainer` of a float16 model scales its losses (see
      precision.py). Only "none" with a user trunk, whose layers carry
      their own dtype policies.
    head_fn: Makes each task's head, a piece like the trunk (default: a
      linear `Dense` layer of `task.output_size` units).
    input_dtype: The dtype of the inputs.

  Returns:
    The model, with all variables created.

  Raises:
    ValueError: For mixed precision with a user trunk, or a head whose
      output does not have `task.output_size` units.
    ConfigError: For a piece that is not a layer (see `pieces.adapt`).
  """
  if not isinstance(trunk, str):
    pieces.check_function("trunk_fn", trunk)
  pieces.check_function("head_fn", head_fn)
  policy = precision.layer_policy(mixed_precision)
  head_dtype = None if policy is None else "float32"
  if callable(trunk):
    if policy is not None:
      raise ValueError(
          f"mixed_precision={mixed_precision!r} applies to the built-in "
          "trunks; give the layers of your own trunk a dtype policy instead "
          "(dtype=\"mixed_bfloat16\" in Keras 3 and tf_keras alike)")
    trunk_layer = pieces.adapt(trunk(), "trunk_fn")
  else:
    trunk_layer = build_trunk(trunk, trunk_width, trunk_depth, dtype=policy)
  heads = default_heads(tasks, head_fn, head_dtype)
  model = SharedTrunkModel(trunk_layer, heads, name="shared_trunk_model")
  return build_and_check(model, tasks, input_shape, input_dtype)
