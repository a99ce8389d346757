"""`moco`: MoCo (Fernando et al. 2023, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach").

A tracking variable y [T, P] follows the tasks' gradients, and simplex
weights lambda [T] are updated on the tracked Gram matrix. At the k-th
applied step (k = 1, 2, ...), with task losses L_i:

    h_i    = g_i / (|g_i| + 1e-8) * L_i
    y      <- y - (beta / k^beta_sigma) (y - h)
    lambda <- softmax(lambda - (gamma / k^gamma_sigma) (y y^T + rho I) lambda)
    update = y^T lambda

with y starting at 0 and lambda at 1/T. This is LibMTL's `MoCo.py` (after
the authors' code), which differs from the paper's Algorithm 1 in two ways
kept here: the gradients are normalised and scaled by their task's loss
(h_i), and lambda is mapped to the simplex by a softmax instead of a
Euclidean projection.

Here g_i is row i of the Jacobian (the gradient of the task's weighted
loss, which with unit task weights is the task loss's gradient) and L_i the
step's unweighted global-batch loss (`needs_losses`). The [T, T] part runs
in float64. k counts the applied steps only: a step whose gradients or
losses are not finite moves no state (y, lambda, k). No Gram form: y is
per parameter.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base
from mtl_dist.methods.aggregators import parameter_state

_EPSILON = 1e-8  # LibMTL's, in |g_i| + 1e-8.


def moco_step(grads: tf.Tensor, losses: tf.Tensor, tracked: tf.Tensor,
              weights: tf.Tensor, count: tf.Tensor, beta: float = 0.5,
              beta_sigma: float = 0.5, gamma: float = 0.1,
              gamma_sigma: float = 0.5, rho: float = 0.0
              ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """One MoCo step.

  Args:
    grads: [T, P] task gradients g.
    losses: [T] task losses L.
    tracked: [T, P] y before the step (zeros at first).
    weights: [T] lambda before the step (1/T at first).
    count: k, the 1-based number of this step among the applied ones.
    beta: Step size of y.
    beta_sigma: Decay exponent of beta.
    gamma: Step size of lambda.
    gamma_sigma: Decay exponent of gamma.
    rho: L2 regularisation of lambda's step.

  Returns:
    (the [P] update y^T lambda, the new [T, P] y, the new [T] lambda).
  """
  num_tasks = grads.shape[0]
  norms = tf.norm(grads, axis=1, keepdims=True)
  targets = grads / (norms + _EPSILON) * losses[:, None]
  k = tf.cast(count, tf.float64)
  beta_k = tf.cast(beta / k**beta_sigma, tf.float32)
  tracked = tracked - beta_k * (tracked - targets)
  gram = tf.cast(tf.linalg.matmul(tracked, tracked, transpose_b=True),
                 tf.float64) + rho * tf.eye(num_tasks, dtype=tf.float64)
  weights = tf.cast(weights, tf.float64)
  weights = tf.nn.softmax(
      weights - gamma / k**gamma_sigma * tf.linalg.matvec(gram, weights))
  weights = tf.cast(weights, tf.float32)
  return (tf.linalg.matvec(tracked, weights, transpose_a=True), tracked,
          weights)


@registry.AGGREGATORS.register
class MoCo(base.Aggregator):
  """MoCo with LibMTL's loss-scaled gradients and softmax weights."""

  name = "moco"
  promises = frozenset({base.ORDER_INVARIANT})
  needs_losses = True

  def __init__(self, num_tasks: int, seed: int = 0, beta: float = 0.5,
               beta_sigma: float = 0.5, gamma: float = 0.1,
               gamma_sigma: float = 0.5, rho: float = 0.0):
    super().__init__(num_tasks, seed)
    self._hyper = dict(beta=beta, beta_sigma=beta_sigma, gamma=gamma,
                       gamma_sigma=gamma_sigma, rho=rho)
    self.y = parameter_state.parameter_state_variable("y", num_tasks)
    self.lambd = base.state_variable("lambd", [num_tasks],
                                       initial=1.0 / num_tasks)
    self.steps = base.state_variable("steps", [], tf.int64)

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step
    if losses is None:
      raise ValueError("moco needs the step's [T] task losses")
    steps = self.steps.value()
    update, tracked, weights = moco_step(
        jacobian, losses,
        parameter_state.previous(self.y, steps > 0, jacobian),
        self.lambd.value(), steps + 1, **self._hyper)
    finite = base.inputs_finite(jacobian, losses)
    parameter_state.assign_if(finite, self.y, tracked)
    base.assign_if(finite, self.lambd, weights)
    base.assign_if(finite, self.steps, steps + 1)
    return update
