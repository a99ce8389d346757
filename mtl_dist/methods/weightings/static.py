"""`static`: sum_i w_i L_i with fixed weights (`--task_weights`, default 1)."""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base


@registry.WEIGHTINGS.register
class Static(base.LossWeighting):
  """Each task's fixed weight (`TaskSpec.weight`)."""

  name = "static"

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0):
    super().__init__(tasks, seed)
    self._static = tf.constant([task.weight for task in tasks], tf.float32)

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step, losses
    return self._static
