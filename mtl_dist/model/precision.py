"""Mixed precision: the model's dtype policies and float16 loss scaling.

`mixed_precision="bfloat16"` or `"float16"` builds the trunk with tf_keras's
`mixed_bfloat16` / `mixed_float16` policy (it computes in the low dtype and
keeps float32 variables) and the heads in float32, so outputs and losses are
float32 (Keras's advice: the last layer in float32). The policies are given
to each layer; the global Keras policy is never changed, so models built
later in the same process are unaffected.

float16's narrow range needs loss scaling. A model that computes in float16
trains with `tf_keras.mixed_precision.LossScaleOptimizer` (dynamic scale,
starting at 2**15): each replica multiplies its objective by the scale
before the backward pass and divides the gradients by it after; the
optimizer skips a step whose all-reduced gradients overflowed (its
iteration count still advances) and halves the scale, and doubles it after
2000 steps without overflow. Its state is part of the optimizer's
checkpoint.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
import tf_keras

from mtl_dist.model import settings

MODES = settings.MIXED_PRECISION
_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def layer_policy(mode: str) -> Optional[tf_keras.mixed_precision.Policy]:
  """The dtype policy of the trunk's layers; None (the global one) for none.

  Raises:
    ValueError: For a mode not in `MODES`.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mixed precision {mode!r} (known: "
                     f"{', '.join(MODES)})")
  if mode == "none":
    return None
  return tf_keras.mixed_precision.Policy(_POLICIES[mode])


def computes_in_float16(model: tf_keras.layers.Layer) -> bool:
  """Whether any layer of `model` computes in float16 (needs loss scaling)."""
  layers = [model] + [module for module in model.submodules
                      if isinstance(module, tf_keras.layers.Layer)]
  return any(layer.compute_dtype == "float16" for layer in layers)


def scales_losses(optimizer: tf_keras.optimizers.Optimizer) -> bool:
  """Whether `optimizer` expects scaled losses (a LossScaleOptimizer)."""
  return isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)


def with_loss_scaling(
    optimizer: tf_keras.optimizers.Optimizer) -> tf_keras.optimizers.Optimizer:
  """`optimizer` wrapped in a dynamic LossScaleOptimizer (once)."""
  if scales_losses(optimizer):
    return optimizer
  return tf_keras.mixed_precision.LossScaleOptimizer(optimizer)


def scaled(optimizer: tf_keras.optimizers.Optimizer,
           loss: tf.Tensor) -> tf.Tensor:
  """`loss` times the optimizer's loss scale, or `loss` without scaling."""
  return optimizer.get_scaled_loss(loss) if scales_losses(optimizer) else loss


def unscaled(optimizer: tf_keras.optimizers.Optimizer,
             gradients: Sequence[tf.Tensor]) -> list[tf.Tensor]:
  """Gradients of a `scaled` loss divided by the scale again."""
  if not scales_losses(optimizer):
    return list(gradients)
  return optimizer.get_unscaled_gradients(list(gradients))


def loss_scale(optimizer: tf_keras.optimizers.Optimizer) -> Optional[float]:
  """The optimizer's current loss scale, or None without loss scaling."""
  if not scales_losses(optimizer):
    return None
  return float(optimizer.loss_scale.numpy())
