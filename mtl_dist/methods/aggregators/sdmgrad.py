"""`sdmgrad`: SDMGrad (Xiao et al. 2023, "Direction-oriented Multi-objective
Learning: Simple and Provable Stochastic Algorithms").

Stochastic direction-oriented MGDA: the update is the combination of task
gradients closest to the mean gradient g0's direction,
min_w (1/2) |G^T w + lamda g0|^2 over the simplex, with w kept across steps
(starting at 1/T) and moved by `niter` projected SGD steps on an unbiased
estimate of the objective's gradient from two independent sub-batches xi1,
xi2; a third, zeta, gives the update. As LibMTL's `SDMGrad.py`:

    GG = J_xi1 J_xi2^T / (s^2 + 1e-8),  s = mean_i sqrt(max(GG_ii, 0)),
    repeat niter times:  b <- 0.5 b + (GG w + lamda mean_j GG_:j),
                         w <- proj_simplex(w - 5 b),
    update = (J_zeta^T w + lamda mean_i J_zeta,i) / (1 + lamda),

with b (SGD's momentum buffer, momentum 0.5, learning rate 5) starting at 0
in every step: LibMTL and the official code (OptMN-Lab/sdmgrad,
methods/weight_methods.py) create a new `torch.optim.SGD` in each step, so
momentum restarts and only w carries over. The sub-batches are LibMTL's
order: zeta the first of the `sub_batches` = 3 strided sub-batches the step
splits the global batch into (LibMTL draws 3 batches), xi1 the second, xi2
the third. The tasks' own variables get the full-batch gradient. lamda 0.3
and niter 20 are LibMTL's defaults (the official NYUv2 code uses learning
rate 10, sqrt(GG_ii + 1e-4) in the scale, and scales the update by T).

In float64 for the [T, T] iteration, the projection computed exactly by
sorting. Departure: a w that is not finite although the gradients are
(float32 overflow of GG) keeps the previous w. No Gram form (GG is not
symmetric), so no `--rep_grad`. The scale's 1e-8 makes the update linear in
the gradients' scale only where their norms are well above 1e-4.

At LibMTL's learning rate 5 (the official code's 10) the 20 steps do not
converge: GG's eigenvalues are ~1 to T after the scaling, so each step
multiplies a deviation by up to |1 - 5 T|, and the projection folds it back
onto the simplex. w then depends on the float32 rounding of the gradients
(a 1e-7 relative change of J_xi1 moved w by up to 8e-4 at T = 5), so 1, 2
and 4 replicas, whose all-reduces round differently, agree only to ~1e-3.
`--sdmgrad_lr` below ~1/T makes the steps converge and the result exact
across replicas (tests/test_method_distribution.py uses 0.2).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import catalog
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base
from mtl_dist.methods.aggregators import modo

LEARNING_RATE = catalog.SDMGRAD_LEARNING_RATE  # LibMTL's SGD rate of w.
MOMENTUM = 0.5  # LibMTL's SGD momentum of w.
SCALE_EPSILON = 1e-8  # Added to s^2 (LibMTL).


def sdmgrad_weights(first: tf.Tensor, second: tf.Tensor, weights: tf.Tensor,
                    lamda: float, niter: int,
                    lr: float = LEARNING_RATE) -> tf.Tensor:
  """SDMGrad's new [T] weights w after `niter` projected momentum steps.

  Args:
    first: J_xi1, [T, P] task gradients on one sub-batch.
    second: J_xi2, [T, P] on another.
    weights: The current w, [T] on the simplex.
    lamda: Weight of the mean gradient's direction.
    niter: Projected SGD steps.
    lr: Their learning rate.

  Returns:
    The float32 [T] weights.
  """
  product = tf.cast(tf.linalg.matmul(first, second, transpose_b=True),
                    tf.float64)
  scale = tf.reduce_mean(tf.sqrt(tf.maximum(tf.linalg.diag_part(product),
                                            0.0)))
  product = product / (scale * scale + SCALE_EPSILON)
  toward_mean = lamda * tf.reduce_mean(product, axis=1)

  def body(i, w, buffer):
    gradient = tf.linalg.matvec(product, w) + toward_mean
    buffer = MOMENTUM * buffer + gradient
    return i + 1, modo.project_to_simplex(w - lr * buffer), buffer

  w = tf.cast(weights, tf.float64)
  _, w, _ = tf.while_loop(lambda i, w, buffer: i < niter, body,
                          (tf.constant(0), w, tf.zeros_like(w)))
  return tf.cast(w, tf.float32)


def sdmgrad_update(zeta: tf.Tensor, weights: tf.Tensor,
                   lamda: float) -> tf.Tensor:
  """(J_zeta^T w + lamda mean_i J_zeta,i) / (1 + lamda), [P]."""
  return (tf.linalg.matvec(zeta, weights, transpose_a=True) +
          lamda * tf.reduce_mean(zeta, axis=0)) / (1.0 + lamda)


@registry.AGGREGATORS.register
class SDMGrad(base.Aggregator):
  """SDMGrad: simplex weights from two sub-batches, applied to a third's."""

  name = "sdmgrad"
  promises = frozenset({base.ORDER_INVARIANT})
  sub_batches = 3

  def __init__(self, num_tasks: int, seed: int = 0, lamda: float = 0.3,
               niter: int = 20, lr: float = LEARNING_RATE):
    """Creates the aggregator; w starts at 1/T.

    Args:
      num_tasks: T.
      seed: Unused (SDMGrad draws nothing).
      lamda: Weight of the mean gradient's direction.
      niter: Projected SGD steps of w per step.
      lr: Their learning rate.
    """
    super().__init__(num_tasks, seed)
    self.lamda = lamda
    self.niter = niter
    self.lr = lr
    self.weights = base.state_variable("weights", [num_tasks],
                                       initial=1.0 / num_tasks)

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses=None) -> tf.Tensor:
    del step, losses
    zeta, first, second = modo.split_sub_batches(jacobian, 3, self.num_tasks)
    previous = self.weights.value()
    new = sdmgrad_weights(first, second, previous, self.lamda, self.niter,
                          self.lr)
    new = tf.where(base.inputs_finite(new), new, previous)
    base.assign_if(base.inputs_finite(jacobian), self.weights, new)
    return sdmgrad_update(zeta, new, self.lamda)
