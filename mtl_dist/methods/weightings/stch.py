"""`stch`: smooth Tchebycheff scalarisation (Lin et al. 2024, "Smooth
Tchebycheff Scalarization for Multi-Objective Optimization").

Warm-up, the first `--stch_warmup_steps` applied steps: the objective is
sum_i log L_i, whose gradient is sum_i (1/L_i) grad L_i, so the weights are
w_i = 1/L_i; the mean of the warm-up's global losses is accumulated.
After it the nadir vector z is that mean and the objective is

  STCH(L) = T mu log sum_i exp(log(L_i / z_i) / mu),

whose gradient is sum_i w_i grad L_i with

  w_i = T softmax_i(log(L_i / z_i) / mu) / L_i.

Both weightings take the step's global-batch losses (`needs_losses`:
all-reduced in the forward pass, constants of the backward pass), so each
replica's share sum_i w_i per_task_i sums over replicas to an objective with
the paper's gradient exactly. The value of sum_i w_i L_i is T after the
warm-up (and T during it), not STCH(L): only its gradient is the paper's.
The `<task>/weight` metric is w_i.

Where it differs from LibMTL's `STCH` (modified from the official code):
- LibMTL counts epochs (`STCH_warmup_epoch` = 4) and takes the nadir vector
  from the last warm-up epoch's batches only; runs here count steps, and
  the nadir vector is the mean over the whole warm-up (default 100 steps).
- The warm-up is the first `warmup_steps` *applied* steps: a skipped step
  (a non-finite loss or gradient) is not recorded and does not count, so a
  resumed run and a run with skipped steps see the same warm-up length.
- LibMTL adds 1e-20 inside each log; here L_i and z_i are floored at 1e-8,
  so a zero (or negative) loss gives large but finite weights (float32).
State (checkpointed): the warm-up's loss sum and count, and z.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods import state
from mtl_dist.methods.weightings import base

LOSS_FLOOR = 1e-8


def stch_weights(losses: tf.Tensor, nadir: tf.Tensor, mu: float
                 ) -> tf.Tensor:
  """w_i = T softmax_i(log(L_i / z_i) / mu) / L_i, STCH's gradient in L_i.

  Args:
    losses: [T] task losses L_i (floored at `LOSS_FLOOR`).
    nadir: [T] nadir vector z (floored at `LOSS_FLOOR`).
    mu: The smoothing parameter, > 0.

  Returns:
    [T] float32 weights: sum_i w_i L_i has the gradient of
    T mu log sum_i exp(log(L_i / z_i) / mu).
  """
  losses = tf.maximum(tf.cast(losses, tf.float32), LOSS_FLOOR)
  nadir = tf.maximum(tf.cast(nadir, tf.float32), LOSS_FLOOR)
  num_tasks = tf.cast(tf.size(losses), tf.float32)
  logits = (tf.math.log(losses) - tf.math.log(nadir)) / mu
  return num_tasks * tf.nn.softmax(logits) / losses


def warmup_weights(losses: tf.Tensor) -> tf.Tensor:
  """w_i = 1 / L_i, the gradient of sum_i log L_i (floored at `LOSS_FLOOR`)."""
  return 1.0 / tf.maximum(tf.cast(losses, tf.float32), LOSS_FLOOR)


@registry.WEIGHTINGS.register
class STCH(base.LossWeighting):
  """Smooth Tchebycheff weights after a warm-up of sum_i log L_i."""

  name = "stch"
  needs_losses = True

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0,
               mu: float = 1.0, warmup_steps: int = 100):
    super().__init__(tasks, seed)
    if not mu > 0:
      raise ValueError(f"stch_mu must be positive, got {mu}")
    if warmup_steps < 1:
      raise ValueError(f"stch_warmup_steps must be positive, got "
                       f"{warmup_steps}")
    self._mu = float(mu)
    self._warmup_steps = int(warmup_steps)
    self.warmup_sum = base.state_variable("warmup_sum", [self.num_tasks])
    self.warmup_count = base.state_variable("warmup_count", [], tf.int64)
    self.nadir = base.state_variable("nadir", [self.num_tasks])

  def _warming_up(self) -> tf.Tensor:
    return self.warmup_count < self._warmup_steps

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step
    return tf.where(self._warming_up(), warmup_weights(losses),
                    stch_weights(losses, self.nadir, self._mu))

  def update(self, losses: tf.Tensor, applied: tf.Tensor = True,
             updated_losses: Optional[tf.Tensor] = None) -> None:
    del updated_losses
    losses = tf.cast(losses, tf.float32)
    record = tf.logical_and(
        tf.logical_and(tf.convert_to_tensor(applied), self._warming_up()),
        state.inputs_finite(losses))
    total = self.warmup_sum + losses
    count = self.warmup_count + 1
    done = count >= self._warmup_steps
    # The nadir is set once, by the warm-up's last recorded step.
    state.assign_if(tf.logical_and(record, done), self.nadir,
                    total / tf.cast(count, tf.float32))
    state.assign_if(record, self.warmup_sum, total)
    state.assign_if(record, self.warmup_count, count)
