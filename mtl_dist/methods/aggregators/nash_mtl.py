"""`nash_mtl`: Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a
Bargaining Game").

The update is d = sum_i alpha_i g_i with alpha > 0 the Nash bargaining
solution alpha_i (G_n alpha)_i = 1 for every task i, where, as in the
official code (and TorchJD 0.8.1 `_nash_mtl.py`, LibMTL `Nash_MTL.py`),
G_n = G / |G|_F is the Gram matrix divided by its Frobenius norm. That
alpha is sqrt(|G|_F) times the solution for G itself, so d scales
linearly with the gradients; its norm is then clipped to `max_norm`
(default 1, 0: no clipping). Every task gains:
g_i . d = |G|_F / alpha_i > 0 (before clipping).

Solved by `bargaining.solve` (p = 1), the exact solution of the system,
rather than the references' sequential convex approximation (20 rounds of
ECOS, stopping once |G_n alpha - 1/alpha| < 1e-3): the weights agree with
TorchJD's published value to its 1e-4. Where no solution exists (a
positive combination of the gradients vanishes, e.g. g and -g), the
references keep their last iterate when ECOS fails; here a ridge
`reg_eps` on the cosine matrix makes one exist (see bargaining.py), so the
update stays finite and bounded. A task with a vanishing gradient gets
alpha_i = 0 (its equation has no solution; the others do not involve it).
TorchJD's `optim_niter` (the approximation's rounds) has no counterpart.

The weights are recomputed at steps that are multiples of `update_every`
(TorchJD's `update_weights_every`, counting steps from 0), and reused,
unclipped, in between (then clipped as this step's update), kept in
the checkpointed state `alpha`; a state never computed (all 0) is
computed whatever the step. The coefficients come from the Gram matrix
alone, so Nash-MTL also runs with `--rep_grad` (LibMTL refuses it); there
`max_norm` bounds the combination of the representation gradients,
sqrt(alpha^T G alpha), which float32 rounding of G makes unreliable where
the gradients nearly cancel (the full-Jacobian form clips |d| itself).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import bargaining
from mtl_dist.methods.aggregators import base


def nash_mtl_weights(gram: tf.Tensor, reg_eps: float = bargaining.REG_EPS
                     ) -> tf.Tensor:
  """Nash-MTL's [T] alpha, before clipping, from the [T, T] Gram matrix.

  Args:
    gram: G = J J^T.
    reg_eps: The ridge on the cosine matrix (bargaining.solve).

  Returns:
    float64 alpha with alpha_i ((G / |G|_F) alpha)_i = 1 (0 for a vanishing
    gradient; all 0 for a zero matrix).
  """
  gram = tf.cast(gram, tf.float64)
  scale = tf.sqrt(tf.norm(tf.where(tf.math.is_finite(gram), gram,
                                   tf.zeros_like(gram))))
  return scale * bargaining.solve(gram, 1.0, reg_eps)


@registry.AGGREGATORS.register
class NashMTL(base.GramAggregator):
  """Nash-MTL: the Nash bargaining solution among the tasks' gradients."""

  name = "nash_mtl"

  def __init__(self, num_tasks: int, seed: int = 0, update_every: int = 1,
               max_norm: float = 1.0, reg_eps: float = bargaining.REG_EPS):
    super().__init__(num_tasks, seed)
    self.update_every = update_every
    self.max_norm = max_norm
    self.reg_eps = reg_eps
    # The last computed alpha, unclipped; all 0 until the first.
    self.alpha = base.state_variable("alpha", [num_tasks])

  def _alpha(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """This step's unclipped alpha (float32), kept in the state."""
    previous = self.alpha.value()
    fresh = tf.logical_or(
        tf.equal(tf.cast(step, tf.int64) % self.update_every, 0),
        tf.reduce_all(tf.equal(previous, 0.0)))
    alpha = tf.cond(
        fresh,
        lambda: tf.cast(nash_mtl_weights(gram, self.reg_eps), tf.float32),
        lambda: previous)
    base.assign_if(base.inputs_finite(gram), self.alpha, alpha)
    return alpha

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    gram = tf.linalg.matmul(jacobian, jacobian, transpose_b=True)
    update = tf.linalg.matvec(jacobian, self._alpha(gram, step),
                              transpose_a=True)
    if self.max_norm <= 0:
      return update
    # Clipped by its own norm, as TorchJD does: alpha^T G alpha from the
    # float32 Gram matrix loses it where the gradients nearly cancel.
    norm = tf.norm(update)
    return update * tf.where(norm > self.max_norm,
                             self.max_norm / tf.where(norm > 0.0, norm, 1.0),
                             1.0)

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    return bargaining.clip_to_norm(self._alpha(gram, step), gram,
                                   self.max_norm)
