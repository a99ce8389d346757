"""`cagrad`: CAGrad (Liu et al. 2021), the conflict-averse update.

g0 = mean_i g_i; w* = argmin over the simplex of g_w . g0 + c |g0| |g_w| with
g_w = sum_i w_i g_i; the update is (g0 + c |g0| / |g_w*| g_w*) / (1 + c^2).
The dual is solved exactly by `simplex.simplex_barrier`. The update is a
combination of the task gradients whose coefficients depend only on the
Gram matrix, so CAGrad also runs from gradients at the shared representation
(`--rep_grad`).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base
from mtl_dist.methods.aggregators import simplex


def cagrad_weights(gram: tf.Tensor, c: float) -> tf.Tensor:
  """CAGrad's dual: argmin over the simplex of w.b + c|g0| |g_w|.

  b = M 1 / T (so w.b = g_w . g0) and |g0| = sqrt(1^T M 1) / T, M the Gram
  matrix. Solved by `simplex.simplex_barrier`; its duality gap is checked in the
  tests for 3 to 10 tasks whose norms span 1e-3 to 1e3.

  Args:
    gram: [T, T] Gram matrix of the task gradients.
    c: CAGrad's c.

  Returns:
    The [T] float32 weights.
  """
  num_tasks = gram.shape[0]
  gram = tf.cast(gram, tf.float32)
  g0_norm = tf.sqrt(tf.maximum(tf.reduce_sum(gram), 0.0)) / num_tasks
  weights, _ = simplex.simplex_barrier(
      gram, tf.reduce_sum(gram, axis=1) / num_tasks, c * g0_norm, False)
  return tf.cast(weights, tf.float32)


def _cagrad_scale(g0_norm: tf.Tensor, g_w_norm: tf.Tensor, weights: tf.Tensor,
                  gram: tf.Tensor, c: float, relative: float) -> tf.Tensor:
  """c|g0| / |g_w|, or 0 where |g_w| is noise.

  Noise is the rounding of g_w, `relative` x sum_i w_i |g_i|, or the
  solver's residue: at an optimum with g_w = 0 the barrier leaves weights
  ~1/t on the other tasks and smooths |g_w| below ~1e-10 |g|max, so
  |g_w| < 1e-8 |g|max counts as 0.
  """
  norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
  vanishes = g_w_norm <= (relative * tf.reduce_sum(weights * norms) +
                          base.VANISHING * tf.reduce_max(norms))
  return tf.where(vanishes, 0.0,
                  c * g0_norm / tf.where(vanishes, 1.0, g_w_norm))


def cagrad(grads: tf.Tensor, c: float = 0.5) -> tf.Tensor:
  """CAGrad's update (g0 + c|g0| g_w/|g_w|) / (1 + c^2) at the dual optimum.

  |g0| and |g_w| are the norms of the vectors themselves, so the update is
  inside the ball |d - g0 / (1 + c^2)| <= c|g0| / (1 + c^2) for every
  input. Where the optimum has g_w = 0 (0 in the tasks' hull and no
  direction that helps: exactly cancelling or mirrored tasks), g_w / |g_w|
  has no limit; the update is then g0 / (1 + c^2), the formula without its
  undefined term (TorchJD returns 0 there, the official code a direction of
  rounding noise). |g_w| counts as 0 below T x float32's epsilon x
  sum_i w_i |g_i|, the rounding of the sum that forms g_w.
  """
  num_tasks = grads.shape[0]
  gram = tf.linalg.matmul(grads, grads, transpose_b=True)
  weights = cagrad_weights(gram, c)
  g0 = tf.reduce_mean(grads, axis=0)
  g_w = tf.linalg.matvec(grads, weights, transpose_a=True)
  scale = _cagrad_scale(tf.norm(g0), tf.norm(g_w), weights, gram, c,
                        num_tasks * base.FLOAT32_EPSILON)
  return (g0 + scale * g_w) / (1.0 + c * c)


def gram_coefficients(gram: tf.Tensor, c: float) -> tf.Tensor:
  """CAGrad's [T] coefficients a, update = sum_i a_i g_i, from G G^T alone.

  From the Gram matrix alone |g_w|^2 has the float32 rounding of its
  entries: |g_w| below sqrt(epsilon) x sum_i w_i |g_i| counts as 0.
  """
  num_tasks = gram.shape[0]
  weights = cagrad_weights(gram, c)
  g0_norm = tf.sqrt(tf.maximum(tf.reduce_sum(gram), 0.0)) / num_tasks
  g_w_norm = tf.sqrt(tf.maximum(
      tf.reduce_sum(weights * tf.linalg.matvec(gram, weights)), 0.0))
  scale = _cagrad_scale(g0_norm, g_w_norm, weights, gram, c,
                        base.FLOAT32_EPSILON**0.5)
  return (1.0 / num_tasks + scale * weights) / (1.0 + c * c)


@registry.AGGREGATORS.register
class CAGrad(base.GramAggregator):
  """CAGrad, with its c (`--cagrad_c`)."""

  name = "cagrad"
  promises = frozenset({base.ORDER_INVARIANT, base.HOMOGENEOUS})

  def __init__(self, num_tasks: int, seed: int = 0, c: float = 0.5):
    super().__init__(num_tasks, seed)
    self.c = c

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    del step
    return cagrad(jacobian, self.c)

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return gram_coefficients(gram, self.c)
