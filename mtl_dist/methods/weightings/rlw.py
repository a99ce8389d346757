"""`rlw`: random loss weighting (Lin et al. 2022, "Reasonable Effectiveness of
Random Weighting").

Each step draws fresh weights lambda = softmax(z), z ~ N(0, I_T) (the
paper's Eq. 4 with its normal distribution; LibMTL's `RLW`), so they are
positive and sum to 1. The draw is a pure function of `(--seed, step)`:
every replica and worker, and a resumed run, uses the same weights.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base


def rlw_weights(num_tasks: int, seed: tf.Tensor) -> tf.Tensor:
  """softmax of T standard normal draws from the int64 [2] `seed`."""
  return tf.nn.softmax(tf.random.stateless_normal([num_tasks], seed=seed))


@registry.WEIGHTINGS.register
class RLW(base.LossWeighting):
  """Weights softmax(z), z ~ N(0, I), drawn each step from (seed, step)."""

  name = "rlw"

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    return rlw_weights(self.num_tasks, tf.stack(
        [tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)]))
