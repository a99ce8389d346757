"""`gradvac`: Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine:
Investigating and Improving Multi-task Optimization in Massively
Multilingual Models").

Each ordered task pair (i, j) has a target cosine rho_ij, an exponential
moving average of the cosines seen (state [T, T], starting at 0). For each
task i, over the other tasks j in a random order, with g'_i the current
(modified) gradient of task i:

    c = cos(g'_i, g_j)
    if c < rho_ij:
      g'_i += w g_j,  w = |g'_i| (rho_ij sqrt(1 - c^2) - c sqrt(1 - rho_ij^2))
                          / (|g_j| sqrt(1 - rho_ij^2))
    rho_ij <- (1 - beta) rho_ij + beta c      (for every pair, every step)

which raises cos(g'_i, g_j) to rho_ij. The update is sum_i g'_i. This is
LibMTL's `GradVac.py` for the whole model (its `group_type` 0; the per-layer
and per-matrix groups are not offered). Within a step every rho_ij is read
before it is updated, so the order of the updates does not matter. The
orders are drawn as PCGrad's (`pcgrad.py`) from `(seed, step)`, the same on
every replica, worker and resumed run (LibMTL uses Python's `random`).

Differences from LibMTL, for finite results on degenerate inputs:
- the cosine is g'_i . g_j / (|g'_i| |g_j|), 0 where a norm is 0, clipped to
  [-1, 1], instead of adding 1e-8 to the denominator (which makes the
  cosine of gradients of norm 1e-4 about 0 whatever their angle): the
  update is then linear in the scale of the gradients;
- the target used in the test and in w is rho_ij clipped to
  [-1, 1 - 1e-6]: a target
  of exactly 1 is reached only by w -> infinity (and rounding can put c
  just below it for duplicated gradients); with the cap w <= ~700
  |g'_i| / |g_j|; w = 0 when g_j = 0 (instead of LibMTL's + 1e-8);
- the scalar arithmetic (cosines, w, targets) is in float64.

beta defaults to the paper's 0.01 (its experiments); LibMTL's default is
0.5. A step whose gradients are not finite moves no target. No Gram form
(`--rep_grad`) is offered, as in LibMTL. State: `rho` [T, T].
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from mtl_dist import errors
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base

# The largest target cosine: sqrt(1 - rho^2) >= 1.4e-3 in w's denominator.
MAX_TARGET = 1.0 - 1e-6


def task_orders(num_tasks: int, seed: tf.Tensor) -> list[tf.Tensor]:
  """The order of the other tasks for each task i, drawn as PCGrad's.

  Args:
    num_tasks: T.
    seed: int64 [2] seed (seed, step).

  Returns:
    T int32 [T - 1] tensors: task i's order of the tasks j != i.
  """
  orders = []
  for i in range(num_tasks):
    others = tf.constant([j for j in range(num_tasks) if j != i], tf.int32)
    orders.append(tf.random.experimental.stateless_shuffle(
        others, seed=tf.stack([seed[0], seed[1] * num_tasks + i])))
  return orders


def gradvac(grads: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor,
            beta: float = 0.01) -> tuple[tf.Tensor, tf.Tensor]:
  """Gradient Vaccine's update and new target cosines.

  Args:
    grads: [T, P] per-task gradients.
    targets: [T, T] float32 target cosines rho before the step.
    seed: int64 [2] seed of the random task orders, e.g. (seed, step).
    beta: Weight of the new cosine in the targets' moving average.

  Returns:
    (the [P] update, the [T, T] targets after the step).
  """
  num_tasks = grads.shape[0]
  norms = tf.cast(tf.norm(grads, axis=1), tf.float64)
  targets64 = tf.cast(targets, tf.float64)
  pairs, cosines, modified = [], [], []
  for i, order in enumerate(task_orders(num_tasks, seed)):
    g_i = grads[i]
    for k in range(num_tasks - 1):
      j = order[k]
      g_j = tf.gather(grads, j)
      norm_j = tf.gather(norms, j)
      norm_i = tf.cast(tf.norm(g_i), tf.float64)
      dot = tf.cast(tf.reduce_sum(g_i * g_j), tf.float64)
      cosine = tf.clip_by_value(tf.math.divide_no_nan(dot, norm_i * norm_j),
                                -1.0, 1.0)
      target = tf.clip_by_value(
          tf.gather_nd(targets64, tf.stack([i, j])), -1.0, MAX_TARGET)
      weight = tf.math.divide_no_nan(
          norm_i * (target * tf.sqrt(1.0 - cosine**2) -
                    cosine * tf.sqrt(1.0 - target**2)),
          norm_j * tf.sqrt(1.0 - target**2))
      weight = tf.where(cosine < target, weight, 0.0)
      g_i = g_i + tf.cast(weight, tf.float32) * g_j
      pairs.append(tf.stack([i, j]))
      cosines.append(cosine)
    modified.append(g_i)
  new_targets = targets
  if pairs:
    pairs = tf.stack(pairs)
    averaged = ((1.0 - beta) * tf.gather_nd(targets64, pairs) +
                beta * tf.stack(cosines))
    new_targets = tf.tensor_scatter_nd_update(
        targets, pairs, tf.cast(averaged, tf.float32))
  return tf.add_n(modified), new_targets


@registry.AGGREGATORS.register
class GradVac(base.Aggregator):
  """Gradient Vaccine over the whole model, per-pair target cosines."""

  name = "gradvac"
  promises = frozenset({base.HOMOGENEOUS})

  def __init__(self, num_tasks: int, seed: int = 0, beta: float = 0.01):
    super().__init__(num_tasks, seed)
    if beta > 1.0:  # For the API; the flag check refuses it first.
      raise errors.ConfigError(f"--gradvac_beta={beta}: must be <= 1")
    self._beta = beta
    self.rho = base.state_variable("rho", [num_tasks, num_tasks])

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    update, targets = gradvac(jacobian, self.rho.value(),
                              self.step_seed(step), self._beta)
    base.assign_if(base.inputs_finite(jacobian), self.rho, targets)
    return update
