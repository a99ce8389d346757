"""`db_mtl`: DB-MTL (Lin et al. 2023, "Dual-Balancing for Multi-Task
Learning").

Loss-scale balancing: each task's gradient is taken of log L_i instead of
L_i. Gradient-magnitude balancing: the (averaged) log-loss gradients are
rescaled to the largest one's norm and summed. At the k-th applied step
(k = 1, 2, ...):

    h_i   = g_i / (max(L_i, 0) + 1e-8)        (the gradient of log L_i)
    b_i   <- h_i + (beta / k^beta_sigma) (b_i - h_i)   (b starting at 0)
    a_i   = max_j |b_j| / (|b_i| + 1e-8)
    update = sum_i a_i b_i

As in LibMTL's `DB_MTL.py`, which differentiates log(L_i + 1e-8) in a second
backward pass. No extra backward pass is needed here: by the chain rule
d log(L_i + eps) = dL_i / (L_i + eps), so row i of the Jacobian divided by
the step's global loss L_i (`needs_losses`) is that gradient. The loss is
floored at 0 (log L is undefined below it), so the division stays finite for
any finite loss; near L_i = 0 the log gradient is large by nature, as in
LibMTL.

Row i is the gradient of task i's weighted loss w_i L_i, so h_i is w_i times
the log gradient; the magnitude balancing (a_i) removes any constant w_i
again. k counts the applied steps only: a step whose gradients or losses are
not finite moves no state (b, k). No Gram form: b is per parameter. State:
`buffer` [T, P] (P taken at the first applied step, see `parameter_state`)
and `steps` (k - 1).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base
from mtl_dist.methods.aggregators import parameter_state

_EPSILON = 1e-8  # LibMTL's, in log(L + 1e-8) and |b_i| + 1e-8.


def db_mtl_step(grads: tf.Tensor, losses: tf.Tensor, buffer: tf.Tensor,
                count: tf.Tensor, beta: float = 0.9, beta_sigma: float = 0.0
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """One DB-MTL step.

  Args:
    grads: [T, P] task gradients g (of the losses, not their logs).
    losses: [T] task losses L.
    buffer: [T, P] b before the step (zeros at first).
    count: k, the 1-based number of this step among the applied ones.
    beta: Weight of the old buffer.
    beta_sigma: Decay exponent: the weight is beta / k^beta_sigma.

  Returns:
    (the [P] update sum_i a_i b_i, the new [T, P] buffer b).
  """
  log_grads = grads / (tf.maximum(losses, 0.0) + _EPSILON)[:, None]
  beta_k = tf.cast(beta / tf.cast(count, tf.float64)**beta_sigma, tf.float32)
  buffer = log_grads + beta_k * (buffer - log_grads)
  norms = tf.norm(buffer, axis=1)
  scales = tf.reduce_max(norms) / (norms + _EPSILON)
  return tf.linalg.matvec(buffer, scales, transpose_a=True), buffer


@registry.AGGREGATORS.register
class DBMTL(base.Aggregator):
  """DB-MTL: log-loss gradients, averaged, rescaled to the largest norm."""

  name = "db_mtl"
  promises = frozenset({base.ORDER_INVARIANT})
  needs_losses = True

  def __init__(self, num_tasks: int, seed: int = 0, beta: float = 0.9,
               beta_sigma: float = 0.0):
    super().__init__(num_tasks, seed)
    self._beta = beta
    self._beta_sigma = beta_sigma
    self.buffer = parameter_state.parameter_state_variable("buffer",
                                                           num_tasks)
    self.steps = base.state_variable("steps", [], tf.int64)

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step
    if losses is None:
      raise ValueError("db_mtl needs the step's [T] task losses")
    steps = self.steps.value()
    update, buffer = db_mtl_step(
        jacobian, losses,
        parameter_state.previous(self.buffer, steps > 0, jacobian),
        steps + 1, self._beta, self._beta_sigma)
    finite = base.inputs_finite(jacobian, losses)
    parameter_state.assign_if(finite, self.buffer, buffer)
    base.assign_if(finite, self.steps, steps + 1)
    return update
