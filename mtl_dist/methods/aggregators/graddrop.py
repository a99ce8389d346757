"""`graddrop`: GradDrop (Chen et al. 2020, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout").

Per coordinate k of the shared variables, the positive sign purity

    P_k = 0.5 (1 + sum_i g_ik / sum_i |g_ik|)

and one draw U_k ~ uniform[0, 1) pick a sign: where U_k < P_k every task
keeps only its positive components, elsewhere only its negative ones
(Algorithm 1, lines 10-15). With the leak l (`--graddrop_leak`), a task's
dropped components are still passed at the rate l:

    update = sum_i (l + (1 - l) M_i) * g_i,
    M_ik = [U_k < P_k] [g_ik > 0] + [U_k >= P_k] [g_ik < 0].

As TorchJD's `GradDrop` (src/torchjd/aggregation/_graddrop.py in torchjd
0.8.1, with its default f = identity) and LibMTL's `GradDrop.py` (leak
0.0), on the rows of the Jacobian of the shared variables, as TorchJD does.
U is drawn per step from `(seed, step)` (stateless), so every replica and
worker, and a resumed run, draws the same.

Differences from the references:
- The paper (and LibMTL, which therefore requires `rep_grad`) applies it
  at an activation layer, to the batch-summed gradients times the sign of
  the activations; here (as in TorchJD) it is applied to the task
  gradients of the shared variables. It is not a combination with
  coefficients from the Gram matrix, so it has no `--rep_grad` form.
- One leak for every task (LibMTL's float; TorchJD takes one per task).
- A coordinate where U_k = P_k exactly keeps the negative components
  (TorchJD and the paper keep neither there). So a coordinate where all
  tasks agree in sign is always kept whole: P = 0 keeps the negative ones
  even if U = 0 is drawn.
- Where every g_ik is 0, P_k = 1/2 (0/0 in TorchJD; the update there is 0
  either way).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist import errors
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base


def graddrop(grads: tf.Tensor, seed: tf.Tensor, leak: float = 0.0
             ) -> tf.Tensor:
  """GradDrop's update: per coordinate one sign kept, drawn by its purity.

  Args:
    grads: [T, P] per-task gradients.
    seed: int64 [2] seed of the draws U (e.g. (seed, step)), so that every
      replica and worker draws the same.
    leak: The rate, in [0, 1], at which a dropped component still passes.

  Returns:
    The [P] update.
  """
  purity = 0.5 * (1.0 + tf.math.divide_no_nan(
      tf.reduce_sum(grads, axis=0), tf.reduce_sum(tf.abs(grads), axis=0)))
  draws = tf.random.stateless_uniform(tf.shape(purity), seed=seed,
                                      dtype=grads.dtype)
  positive = (draws < purity)[None, :]
  kept = tf.logical_or(tf.logical_and(positive, grads > 0),
                       tf.logical_and(tf.logical_not(positive), grads < 0))
  mask = leak + (1.0 - leak) * tf.cast(kept, grads.dtype)
  return tf.reduce_sum(mask * grads, axis=0)


@registry.AGGREGATORS.register
class GradDrop(base.Aggregator):
  """GradDrop, with its leak (`--graddrop_leak`)."""

  name = "graddrop"
  promises = frozenset({base.ORDER_INVARIANT, base.HOMOGENEOUS})

  def __init__(self, num_tasks: int, seed: int = 0, leak: float = 0.0):
    """Creates the aggregator.

    Args:
      num_tasks: T.
      seed: Seed of its per-step draws.
      leak: The rate at which dropped components pass, in [0, 1].

    Raises:
      ConfigError: For a leak above 1 (a ValueError).
    """
    super().__init__(num_tasks, seed)
    if not 0.0 <= leak <= 1.0:
      raise errors.ConfigError(f"--graddrop_leak={leak}: must be in [0, 1]")
    self.leak = float(leak)

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    return graddrop(jacobian, self.step_seed(step), self.leak)
