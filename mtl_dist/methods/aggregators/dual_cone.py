"""Projections onto the dual cone of the task gradients (UPGrad, DualProj).

The projection of J^T u onto the dual cone {x : J x >= 0} of the rows of J
(the directions that conflict with no task) is J^T v, where v solves

    minimise v^T G v  subject to  v >= u,   G = J J^T

(Quinton & Rey 2024, Proposition 1). `project_weights` solves a batch of
these quadratic programs from the Gram matrix alone with a log-barrier
interior-point method in float64, XLA-compiled like the simplex solver of
MGDA and CAGrad. As TorchJD does, G is first divided by its trace (so the
problem does not depend on the gradients' scale) and `reg_eps` is added to
its diagonal (so it is positive definite); unlike TorchJD, only a zero
trace makes G zero (see NORM_EPS).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import tensorflow as tf

from mtl_dist.methods import catalog
from mtl_dist.methods.aggregators import base

# TorchJD adds 1e-4 to the diagonal (REG_EPS, its default, the default of
# --upgrad_reg_eps and --dualproj_reg_eps in the catalogue). It also treats
# a trace below norm_eps = 1e-4 as 0, which turns UPGrad and DualProj into
# the mean whenever sum_i |g_i|^2 < 1e-4, as late in training it often is;
# here only a zero trace does (NORM_EPS = 0), so they scale linearly.
NORM_EPS = 0.0
REG_EPS = catalog.DUAL_CONE_REG_EPS

_GROWTH = 10.0  # The barrier's t grows by this factor after each centring.
_NEWTON_LIMIT = 400  # At most this many Newton steps.
_CENTRED = 1e-12  # Newton decrement^2 / 2 below which a point is centred.
# Stop when the duality-gap bound T / t is below this times v^T G v (at
# least reg_eps |u|^2 when u >= 0, as for UPGrad and DualProj) ...
_GAP = 1e-12
_GAP_FLOOR = 1e-24  # ... plus this (for a u <= 0, where v = 0 is optimal).


def prepared_gram(gram: tf.Tensor, norm_eps: float = NORM_EPS,
                  reg_eps: float = REG_EPS) -> tf.Tensor:
  """G / trace(G) + reg_eps I in float64 (reg_eps I when the trace is at
  most `norm_eps`)."""
  gram = tf.cast(gram, tf.float64)
  trace = tf.linalg.trace(gram)
  normalized = tf.where(trace <= norm_eps, tf.zeros_like(gram),
                        gram / tf.where(trace > 0.0, trace,
                                        tf.ones_like(trace)))
  return normalized + reg_eps * tf.eye(gram.shape[0], dtype=tf.float64)


@tf.function(jit_compile=True)
def _barrier(gram: tf.Tensor, lower: tf.Tensor) -> tf.Tensor:
  """min v^T G v s.t. v >= lower, for each row of `lower` ([B, T]).

  The barrier t v^T G v - sum_i log(v_i - lower_i) is self-concordant, so
  damped Newton steps (length 1 / (1 + lambda), lambda the Newton
  decrement) stay feasible and converge without comparing barrier values,
  whose rounding at large t would stop a line search early.
  """
  batch, num_tasks = lower.shape

  def body(count, t, x, done):
    del done
    v = lower + x
    gradient = 2.0 * t[:, None] * tf.linalg.matvec(gram, v) - 1.0 / x
    hessian = (2.0 * t[:, None, None] * gram[None] +
               tf.linalg.diag(1.0 / (x * x)))
    step = -tf.linalg.solve(hessian, gradient[..., None])[..., 0]
    decrement = tf.maximum(-tf.reduce_sum(gradient * step, axis=-1), 0.0)
    size = tf.sqrt(decrement)
    rate = tf.where(size < 0.25, tf.ones_like(size), 1.0 / (1.0 + size))
    # In exact arithmetic these steps stay inside; in float64 a coordinate
    # may round onto its bound, so no step goes more than 99% of the way.
    shrinking = step < 0.0
    to_bound = tf.reduce_min(
        tf.where(shrinking, -x / tf.where(shrinking, step, -1.0), 2.0),
        axis=-1)
    rate = tf.minimum(rate, 0.99 * to_bound)
    x = x + rate[:, None] * step
    centred = 0.5 * decrement <= _CENTRED
    t = tf.where(centred, t * _GROWTH, t)
    objective = tf.reduce_sum(v * tf.linalg.matvec(gram, v), axis=-1)
    finished = tf.reduce_all(num_tasks / t <= _GAP * objective + _GAP_FLOOR)
    return count + 1, t, x, finished

  _, _, x, _ = tf.while_loop(
      lambda count, t, x, done: tf.logical_and(tf.logical_not(done),
                                               count < _NEWTON_LIMIT),
      body, (tf.constant(0), tf.ones([batch], tf.float64),
             tf.ones([batch, num_tasks], tf.float64),
             # A non-finite matrix (an overflow the step skips): no solve.
             tf.logical_not(tf.reduce_all(tf.math.is_finite(gram)))))
  return lower + x


def project_weights(lower: tf.Tensor, gram: tf.Tensor,
                    norm_eps: float = NORM_EPS,
                    reg_eps: float = REG_EPS) -> tf.Tensor:
  """Weights v of the projections of J^T u onto the dual cone, per row u.

  Args:
    lower: [B, T] rows u.
    gram: [T, T] Gram matrix J J^T of the task gradients.
    norm_eps: Traces below this make G zero (see the module docstring).
    reg_eps: Added to the diagonal of the normalised G.

  Returns:
    [B, T] float64 v, each the solution of min v^T G v s.t. v >= u.
  """
  return _barrier(prepared_gram(gram, norm_eps, reg_eps),
                  tf.cast(lower, tf.float64))


class DualConeAggregator(base.GramAggregator):
  """An aggregator whose coefficients are dual-cone projections.

  Subclasses set `name` and `weights`, a function of the Gram
  matrix and `reg_eps` (their `--<name>_reg_eps`) giving the [T] float32
  coefficients.
  """

  promises = frozenset({
      base.ORDER_INVARIANT, base.NON_CONFLICTING, base.HOMOGENEOUS})
  weights: ClassVar[Callable[[tf.Tensor, float], tf.Tensor]]

  def __init__(self, num_tasks: int, seed: int = 0, reg_eps: float = REG_EPS):
    super().__init__(num_tasks, seed)
    self.reg_eps = reg_eps

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return self.weights(gram, self.reg_eps)
