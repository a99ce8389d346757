"""`famo`: FAMO, fast adaptive multitask optimization (Liu et al. 2023).

Task logits xi (state, zero at the start), z = softmax(xi),
D_i = max(L_i - m_i, 0) + eps with m_i = 0 and eps = 1e-8. The step
minimises sum_i z_i log(D_i) / c with c = sum_j z_j / D_j a constant of the
backward pass, i.e. the task losses take the weights

  w_i = (z_i / D_i) / sum_j (z_j / D_j)

(they sum to 1, not to T; 0 for a zero loss, see (3) below), computed
from the step's global losses
(`needs_losses`). After the step's update the same batch's global losses
L' are measured (`needs_updated_losses`: one more forward pass, inference
mode) and the logits take one Adam step on

  d = J_softmax(xi)^T delta = z * (delta - z . delta),
  delta_i = log D_i(L) - log D_i(L'),

with PyTorch's Adam semantics (L2 weight decay added to the gradient:
g = d + gamma xi; beta = (0.9, 0.999), eps = 1e-8, bias-corrected moments),
step size `--famo_lr` and decay `--famo_gamma`. A step whose update was
skipped, or whose losses are not finite, changes nothing (no Adam step).

References: LibMTL `LibMTL/weighting/FAMO.py` (commit 4336804,
`backward` and `update_w`; `FAMO_w_lr` 0.025 and `FAMO_w_gamma` 1e-3 in
`LibMTL/config.py`), and the official code, github.com/Cranial-XIX/FAMO
(commit 0a6ad06), `famo.py` `FAMO.get_weighted_loss` / `FAMO.update`, which
uses the same objective and update (its default gamma varies by file:
0.01 in `famo.py`, 1e-5 in `methods/weight_methods.py`; we follow LibMTL).

Differences: (1) D_i clamps L_i - m_i at 0 before adding eps, so a
negative loss cannot make log(D_i) NaN (the package's losses are not
negative, where this changes nothing). (2) The losses after the update come
from an inference-mode forward pass (the references rerun the model in
training mode); the package's models have no batch norm or dropout, so
only their training-only regularizers (not part of the task losses)
differ. (3) A task whose loss is zero (or negative) gets weight 0, the
others' weights renormalised, unless every loss is: with eps alone in D_i
it would take almost all the weight (w_i ~ 1) while its gradient is zero (a
task with no labelled example in the global batch under partial labels has
loss 0; a loss at its minimum 0 has a zero gradient), so the step would
train next to nothing. (4) The official code also clips the model's
gradient norm to 1 (`max_norm`); LibMTL does not, nor do we: that belongs to
the optimizer, not to the weighting.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods import state as state_lib
from mtl_dist.methods.weightings import base

EPSILON = 1e-8  # Added to L_i - m_i (LibMTL's and the official 1e-8).
_BETA_1 = 0.9  # torch.optim.Adam's defaults.
_BETA_2 = 0.999
_ADAM_EPSILON = 1e-8


def _shifted(losses: tf.Tensor) -> tf.Tensor:
  """D_i = max(L_i - m_i, 0) + eps, with m_i = 0 (as LibMTL)."""
  return tf.maximum(tf.cast(losses, tf.float32), 0.0) + EPSILON


def famo_weights(logits: tf.Tensor, losses: tf.Tensor) -> tf.Tensor:
  """The [T] weights w_i = (z_i / D_i) / sum_j (z_j / D_j), z = softmax(xi).

  They are the gradient of the FAMO objective
  sum_i z_i log(D_i) / c (c = sum_j z_j / D_j held constant) with respect
  to the losses.

  Args:
    logits: [T] task logits xi.
    losses: [T] the step's task losses.

  A task whose loss is zero (or below) gets weight 0 while another's is
  positive (see the module doc).

  Returns:
    [T] non-negative weights summing to 1.
  """
  ratios = tf.nn.softmax(logits) / _shifted(losses)
  # A zero loss (no labelled example in the batch, or a task at its
  # minimum) has a zero gradient; it would take nearly all the weight.
  nonzero = tf.cast(losses, tf.float32) > 0.0
  ratios = tf.where(tf.logical_and(tf.reduce_any(nonzero),
                                   tf.logical_not(nonzero)), 0.0, ratios)
  return ratios / tf.reduce_sum(ratios)


def famo_logit_gradient(logits: tf.Tensor, losses: tf.Tensor,
                        updated_losses: tf.Tensor) -> tf.Tensor:
  """d = J_softmax(xi)^T delta, delta_i = log D_i(L) - log D_i(L').

  Args:
    logits: [T] task logits xi.
    losses: [T] the step's losses L, before its update.
    updated_losses: [T] the same batch's losses L' after the update.

  Returns:
    [T] the logits' gradient (before weight decay).
  """
  delta = tf.math.log(_shifted(losses)) - tf.math.log(_shifted(updated_losses))
  z = tf.nn.softmax(logits)
  return z * (delta - tf.reduce_sum(z * delta))


def adam_update(parameters: tf.Tensor, gradient: tf.Tensor, first: tf.Tensor,
                second: tf.Tensor, count: tf.Tensor, learning_rate: float,
                weight_decay: float
                ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """One step of torch.optim.Adam (L2 weight decay, not AdamW).

  Args:
    parameters: The parameters before the step.
    gradient: Their gradient (before weight decay).
    first: Adam's first moment before the step.
    second: Adam's second moment before the step.
    count: The step's number, 1 for the first step (bias correction).
    learning_rate: The step size.
    weight_decay: gamma; the gradient becomes gradient + gamma parameters.

  Returns:
    (parameters, first moment, second moment) after the step.
  """
  gradient = gradient + weight_decay * parameters
  first = _BETA_1 * first + (1.0 - _BETA_1) * gradient
  second = _BETA_2 * second + (1.0 - _BETA_2) * tf.square(gradient)
  t = tf.cast(count, tf.float32)
  corrected_first = first / (1.0 - _BETA_1**t)
  corrected_second = second / (1.0 - _BETA_2**t)
  parameters = parameters - learning_rate * corrected_first / (
      tf.sqrt(corrected_second) + _ADAM_EPSILON)
  return parameters, first, second


@registry.WEIGHTINGS.register
class FAMO(base.LossWeighting):
  """FAMO's weights from task logits that learn which loss falls fastest."""

  name = "famo"
  needs_losses = True
  needs_updated_losses = True

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0,
               lr: float = 0.025, gamma: float = 1e-3):
    super().__init__(tasks, seed)
    self._learning_rate = lr
    self._gamma = gamma
    state = base.state_variable
    self.logits = state("logits", [self.num_tasks])
    self.adam_moments = state("adam_moments", [2, self.num_tasks])
    self.updates = state("updates", [], tf.int64)

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step
    if losses is None:
      raise ValueError("famo's weights need the step's losses")
    return famo_weights(self.logits.read_value(), losses)

  def update(self, losses: tf.Tensor, applied: tf.Tensor = True,
             updated_losses: Optional[tf.Tensor] = None) -> None:
    """One Adam step of the logits on the losses' fall over the update."""
    if updated_losses is None:
      raise ValueError("famo's update needs the losses after the update")
    logits = self.logits.read_value()
    gradient = famo_logit_gradient(logits, losses, updated_losses)
    updated, first, second = adam_update(
        logits, gradient, self.adam_moments[0], self.adam_moments[1],
        self.updates + 1, self._learning_rate, self._gamma)
    ok = tf.logical_and(tf.convert_to_tensor(applied),
                        state_lib.inputs_finite(losses, updated_losses))
    # A non-finite result (it cannot be, from finite losses) is not kept.
    ok = tf.logical_and(ok, state_lib.inputs_finite(updated, first, second))
    state_lib.assign_if(ok, self.logits, updated)
    state_lib.assign_if(ok, self.adam_moments, tf.stack([first, second]))
    state_lib.assign_if(ok, self.updates, self.updates + 1)
