"""`modo`: MoDo (Chen et al. 2023, "Three-Way Trade-Off in Multi-Objective
Learning: Optimization, Generalization and Conflict-Avoidance").

Multi-objective gradient with double sampling: task weights lambda on the
simplex, kept across steps (starting at 1/T), move by one projected
stochastic gradient step on (1/2) |J^T lambda|^2 + (rho/2) |lambda|^2 whose
gradient J J^T lambda is estimated without bias from two independent
sub-batches; a third gives the update:

    lambda <- proj_simplex(lambda - gamma (J1 (J2^T lambda) + rho lambda)),
    update  = J3^T lambda,

J_k the [T, P] task Jacobian on sub-batch k (`sub_batches` = 3: the step
splits the global batch into 3 strided sub-batches; LibMTL draws 3
batches). As LibMTL's `MoDo.py` (the first, second and third sampled
gradients in this order; gamma 1e-3, rho 0.1), with the projection onto the
simplex computed exactly by sorting, in float64. The tasks' own variables
get the full-batch gradient (LibMTL: the mean of its 3 batches' gradients).

Departures: a lambda step that is not finite although the gradients are
(float32 overflow of J1 J2^T lambda) keeps the previous lambda. No Gram
form (three different matrices), so no `--rep_grad`.
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base


def project_to_simplex(values: tf.Tensor) -> tf.Tensor:
  """The Euclidean projection of a [T] vector onto {w >= 0, sum w = 1}.

  The sort-based algorithm (Held et al. 1974; Duchi et al. 2008): with u
  the values sorted in decreasing order, r the largest j with
  u_j > (sum_{l<=j} u_l - 1) / j, the projection is max(v - theta, 0) for
  theta = (sum_{l<=r} u_l - 1) / r. Computed in float64, after shifting
  the largest value to 0.

  Args:
    values: [T] finite values.

  Returns:
    The [T] float64 projection.
  """
  values = tf.cast(values, tf.float64)
  # The projection ignores shifts along (1, ..., 1). Shifted to a largest
  # entry of 0, the sums below stay exact however large the values are
  # (otherwise u_1 - 1 rounds to u_1 above 2^53 and everything to 0).
  values = values - tf.reduce_max(values)
  ordered = tf.sort(values, direction="DESCENDING")
  partial_sums = tf.cumsum(ordered)
  ranks = tf.range(1, tf.shape(values)[0] + 1, dtype=tf.float64)
  # True on a prefix; always for j = 1.
  support = ordered * ranks > partial_sums - 1.0
  last = tf.reduce_max(tf.where(support, ranks, tf.ones_like(ranks)))
  theta = (tf.gather(partial_sums, tf.cast(last, tf.int32) - 1) -
           1.0) / last
  return tf.maximum(values - theta, 0.0)


def split_sub_batches(jacobian: tf.Tensor, sub_batches: int,
                      num_tasks: int) -> list[tf.Tensor]:
  """The [K*T, P] matrix's K [T, P] sub-batch Jacobians, in order."""
  return [jacobian[k * num_tasks:(k + 1) * num_tasks]
          for k in range(sub_batches)]


def modo_step(first: tf.Tensor, second: tf.Tensor, weights: tf.Tensor,
              gamma: float, rho: float) -> tf.Tensor:
  """MoDo's new [T] weights: proj(lambda - gamma (J1 J2^T lambda + rho lambda)).

  Args:
    first: J1, [T, P] task gradients on the first sub-batch.
    second: J2, [T, P] on the second.
    weights: lambda, [T] on the simplex.
    gamma: The step size.
    rho: The weight of the l2 regulariser of lambda.

  Returns:
    The float32 [T] weights (on the simplex when the inputs are finite).
  """
  weights = tf.cast(weights, tf.float32)
  combined = tf.linalg.matvec(second, weights, transpose_a=True)  # J2^T l.
  gradient = (tf.cast(tf.linalg.matvec(first, combined), tf.float64) +
              rho * tf.cast(weights, tf.float64))
  return tf.cast(project_to_simplex(
      tf.cast(weights, tf.float64) - gamma * gradient), tf.float32)


@registry.AGGREGATORS.register
class MoDo(base.Aggregator):
  """MoDo: simplex weights from two sub-batches, applied to a third's."""

  name = "modo"
  promises = frozenset({base.ORDER_INVARIANT})
  sub_batches = 3

  def __init__(self, num_tasks: int, seed: int = 0, gamma: float = 1e-3,
               rho: float = 0.1):
    """Creates the aggregator; lambda starts at 1/T.

    Args:
      num_tasks: T.
      seed: Unused (MoDo draws nothing).
      gamma: Step size of lambda.
      rho: l2 regularisation of lambda.
    """
    super().__init__(num_tasks, seed)
    self.gamma = gamma
    self.rho = rho
    self.weights = base.state_variable("weights", [num_tasks],
                                       initial=1.0 / num_tasks)

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses=None) -> tf.Tensor:
    del step, losses
    first, second, third = split_sub_batches(jacobian, 3, self.num_tasks)
    previous = self.weights.value()
    new = modo_step(first, second, previous, self.gamma, self.rho)
    new = tf.where(base.inputs_finite(new), new, previous)
    base.assign_if(base.inputs_finite(jacobian), self.weights, new)
    return tf.linalg.matvec(third, new, transpose_a=True)
