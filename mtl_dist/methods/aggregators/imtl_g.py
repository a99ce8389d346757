"""`imtl_g`: IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning").

The update d = sum_i a_i g_i with sum_i a_i = 1 whose projections on every
unit task gradient u_i = g_i / |g_i| are equal: d . u_i = d . u_j for all
tasks i, j. The paper solves it in closed form against a reference task,
a_{2:T} = g_1 U^T (D U^T)^-1 with D = [g_1 - g_i]_i, U = [u_1 - u_i]_i.

Here the same conditions are solved as one symmetric linear system in
b_j = a_j |g_j| and the common projection p:

    sum_j cos(g_i, g_j) b_j = p  for every task i,  sum_j b_j / |g_j| = 1,

in float64 from the Gram matrix alone (so IMTL-G also runs with
`--rep_grad`), through the pseudo-inverse. It equals the paper's formula
wherever that exists, and extends it to the inputs it cannot take:
- duplicated gradients share their weight (the least-norm solution);
- exactly opposite gradients get the unique solution d = 0 (the paper's
  formula agrees; TorchJD's pseudo-inverse variant does not);
- a task whose gradient vanishes (|g_j| <= 1e-8 max_i |g_i|) has no
  direction and takes no part: a_j = 0, and the others are balanced among
  themselves; if every gradient vanishes, the update is 0.
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base


def imtl_g_weights(gram: tf.Tensor) -> tf.Tensor:
  """IMTL-G's [T] coefficients a (sum 1) from the [T, T] Gram matrix.

  Args:
    gram: G G^T of the task gradients G, [T, T].

  Returns:
    The float32 coefficients; zeros if every gradient vanishes.
  """
  gram = tf.cast(gram, tf.float64)
  num_tasks = gram.shape[0]
  norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
  active = norms > base.VANISHING * tf.reduce_max(norms)
  active_f = tf.cast(active, tf.float64)
  safe_norms = tf.where(active, norms, tf.ones_like(norms))
  cosine = gram / (safe_norms[:, None] * safe_norms[None, :])
  # A vanishing task's row says b_j = 0, and its column is removed.
  cosine = (active_f[:, None] * active_f[None, :] * cosine +
            tf.linalg.diag(1.0 - active_f))
  # sum_j b_j / |g_j| = 1, times the least active norm m: entries <= 1.
  least = tf.reduce_min(tf.where(active, norms, tf.reduce_max(norms)))
  last_row = tf.concat([active_f * least / safe_norms,
                        tf.zeros([1], tf.float64)], axis=0)
  system = tf.concat(
      [tf.concat([cosine, -active_f[:, None]], axis=1), last_row[None, :]],
      axis=0)
  right = tf.concat([tf.zeros([num_tasks], tf.float64), least[None]], axis=0)
  # Singular values at float32's rounding of the Gram matrix are noise.
  solution = tf.linalg.matvec(
      tf.linalg.pinv(system, rcond=base.FLOAT32_EPSILON), right)
  return tf.cast(active_f * solution[:num_tasks] / safe_norms, tf.float32)


@registry.AGGREGATORS.register
class IMTLG(base.GramAggregator):
  """IMTL-G: the update with equal projections on every task's direction."""

  name = "imtl_g"
  promises = frozenset({base.ORDER_INVARIANT, base.HOMOGENEOUS})

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return imtl_g_weights(gram)
