"""`fairgrad`: FairGrad (Ban & Ji 2024, "Fair Resource Allocation in
Multi-Task Learning").

The update is d = sum_i w_i g_i with w > 0 solving

    (G w)_i = w_i^(-1/alpha)  for every task i,   G = J J^T,

the stationarity condition of alpha-fair utility maximisation over the
tasks' gains g_i . d = (G w)_i > 0 (every task gains). As in LibMTL's
`FairGrad.py`, G is the raw Gram matrix (no normalisation) and the update
is not clipped, so d scales with the gradients as c^((1-alpha)/(1+alpha))
(J -> cJ): scale-free for alpha = 1, where FairGrad solves Nash-MTL's
system without Nash-MTL's normalisation (d = Nash-MTL's unclipped update
divided by sqrt(|G|_F)). (The official repository OptMN-Lab/fairgrad
instead applies T d clipped to norm 1.)

Solved by `bargaining.solve` (p = 1 / alpha) exactly, where LibMTL runs
scipy's `least_squares` from w = 1/T. Where no solution exists (a positive
combination of the gradients vanishes, e.g. g and -g) a ridge `reg_eps` on
the cosine matrix makes one exist (see bargaining.py); a task with a
vanishing gradient gets w_i = 0. The weights come from the Gram matrix
alone, so FairGrad also runs with `--rep_grad` (LibMTL refuses it).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import bargaining
from mtl_dist.methods.aggregators import base


def fairgrad_weights(gram: tf.Tensor, alpha: float = 1.0,
                     reg_eps: float = bargaining.REG_EPS) -> tf.Tensor:
  """FairGrad's [T] weights w from the [T, T] Gram matrix (float32).

  Args:
    gram: G = J J^T.
    alpha: The fairness exponent, > 0.
    reg_eps: The ridge on the cosine matrix (bargaining.solve).

  Returns:
    w with (G w)_i = w_i^(-1/alpha) (0 for a vanishing gradient).
  """
  return tf.cast(bargaining.solve(gram, 1.0 / alpha, reg_eps), tf.float32)


@registry.AGGREGATORS.register
class FairGrad(base.GramAggregator):
  """FairGrad: alpha-fair allocation of the update among the tasks."""

  name = "fairgrad"

  def __init__(self, num_tasks: int, seed: int = 0, alpha: float = 1.0,
               reg_eps: float = bargaining.REG_EPS):
    super().__init__(num_tasks, seed)
    self.alpha = alpha
    self.reg_eps = reg_eps

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return fairgrad_weights(gram, self.alpha, self.reg_eps)
