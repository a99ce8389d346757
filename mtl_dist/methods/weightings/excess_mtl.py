"""`excess_mtl`: ExcessMTL (He et al. 2024), weights from excess-risk estimates.

With g_i the global gradient of task i's unweighted loss at W, the model's
last shared layer (as GradNorm's; `needs_task_gradients`), each step
accumulates AdaGrad's squared gradients and scores each task's excess risk:

  S_i += g_i * g_i,  e_i = g_i . (g_i / sqrt(S_i + 1e-7)).

Task i's first positive e_i is recorded as e_i(0); afterwards the weights
take an exponentiated-gradient step on the normalised excess risks and are
renormalised to sum to T:

  lambda_i <- T lambda_i exp(eta e_i / e_i(0)) / sum_j lambda_j exp(...),

eta = `--excess_mtl_robust_step_size`. Weights start at 1; a step whose
update was skipped (or whose gradients are not finite) changes nothing.

Reference: LibMTL `LibMTL/weighting/ExcessMTL.py` (commit 4336804), the
same as the official github.com/yifei-he/ExcessMTL (commit b179956)
`LibMTL/LibMTL/weighting/ExcessMTL.py`; `robust_step_size` defaults to 1e-2
in both repositories' `LibMTL/config.py` (the official README's Office-Home
example passes 1).

Differences from the reference, and why:
- W is the last shared layer's kernel, as for GradNorm. LibMTL takes the
  gradient of all shared parameters, or with `rep_grad` of the shared
  representation summed over the batch; the step here computes per-task
  gradients for a weighting only at W.
- The weights lag one step: the step's loss weights are known before its
  backward pass (the task gradients come from that same pass), so step k
  uses the weights after the gradients of steps 0..k-1. LibMTL updates the
  weights with step k's gradients before step k's backward pass.
- e_i(0) is per task: a task's first step with e_i > 0 records it, and
  until then (e.g. all-zero gradients, or no labelled example with partial
  labels) its score counts as 0 (exp(0) = 1 before renormalisation).
  LibMTL records every task's e_i on the very first step and divides by it,
  which gives inf/NaN for a zero score. On the first step this is the same
  as LibMTL's (no weight moves).
- The multiplicative update and renormalisation are computed as
  T softmax(log lambda + eta e / e(0)) (the same value; it cannot
  overflow), with the exponent clipped at 1e30 (a tiny e_i(0)).
- S's shape [T, |W|] is not known when the weighting is created (it has no
  model), so S is a variable of shape [T, None], empty until the first step
  gives it the gradients' shape (checkpointed and restored as any other;
  a flag says when it has it). A step skipped before the first applied one
  leaves S zero-filled.
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods import state as state_lib
from mtl_dist.methods.weightings import base

ADAGRAD_EPSILON = 1e-7  # Inside the square root, as LibMTL.
_MAX_EXPONENT = 1e30


def excess_risk_scores(gradient_sums: tf.Tensor,
                       gradients: tf.Tensor) -> tf.Tensor:
  """e_i = g_i . (g_i / sqrt(S_i + 1e-7)), S_i including this step's g_i^2.

  Args:
    gradient_sums: [T, n] the accumulated squared gradients S (this step's
      included).
    gradients: [T, n] this step's task gradients g.

  Returns:
    [T] non-negative excess-risk scores.
  """
  return tf.reduce_sum(
      tf.square(gradients) / tf.sqrt(gradient_sums + ADAGRAD_EPSILON), axis=1)


def excess_mtl_step(loss_weights: tf.Tensor, scores: tf.Tensor,
                    initial_scores: tf.Tensor, has_initial: tf.Tensor,
                    step_size: float
                    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """One weight update from the step's scores.

  Args:
    loss_weights: [T] current weights lambda (summing to T).
    scores: [T] this step's excess-risk scores e.
    initial_scores: [T] each task's recorded e_i(0) (where `has_initial`).
    has_initial: [T] bool, whether e_i(0) was recorded before this step.
    step_size: eta, `robust_step_size`.

  Returns:
    (new weights summing to T, new e(0), new has_initial).
  """
  num_tasks = tf.cast(tf.size(loss_weights), tf.float32)
  safe_initial = tf.where(has_initial, initial_scores, 1.0)
  ratios = tf.where(has_initial, scores / safe_initial, 0.0)
  ratios = tf.minimum(ratios, _MAX_EXPONENT)
  exponent = tf.minimum(step_size * ratios, _MAX_EXPONENT)
  weights = num_tasks * tf.nn.softmax(tf.math.log(loss_weights) + exponent)
  record = tf.logical_and(tf.logical_not(has_initial), scores > 0)
  initial_scores = tf.where(record, scores, initial_scores)
  return weights, initial_scores, tf.logical_or(has_initial, record)


@registry.WEIGHTINGS.register
class ExcessMTL(base.LossWeighting):
  """Weights that grow with each task's normalised excess-risk estimate."""

  name = "excess_mtl"
  needs_task_gradients = True

  def __init__(self, tasks: Sequence[base.Task], seed: int = 0,
               robust_step_size: float = 1e-2):
    super().__init__(tasks, seed)
    self._step_size = robust_step_size
    state = base.state_variable
    self.loss_weight = state("loss_weight", [self.num_tasks], initial=1)
    self.initial_scores = state("initial_scores", [self.num_tasks])
    self.has_initial = state("has_initial", [self.num_tasks], tf.bool)
    # S: its second dimension, |W|, is the gradients' (see module doc).
    self.gradient_sums = tf.Variable(
        tf.zeros([self.num_tasks, 0]),
        shape=tf.TensorShape([self.num_tasks, None]), trainable=False,
        name="gradient_sums",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    # Whether S has its shape. Not tf.size(S): a variable's shape is read
    # without ordering after an earlier assignment in the same graph.
    self.has_gradient_sums = state("has_gradient_sums", [], tf.bool)

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step, losses
    return self.loss_weight.read_value()

  def replica_update(self, task_gradients: Optional[tf.Tensor],
                     per_task: tf.Tensor, labelled: tf.Tensor,
                     applied: tf.Tensor = True) -> None:
    """Accumulates the global task gradients and updates the weights."""
    del per_task, labelled
    gradients = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(task_gradients, tf.float32))
    previous = tf.cond(self.has_gradient_sums.read_value(),
                       self.gradient_sums.value,
                       lambda: tf.zeros_like(gradients))
    previous = tf.ensure_shape(previous, gradients.shape)
    gradient_sums = previous + tf.square(gradients)
    scores = excess_risk_scores(gradient_sums, gradients)
    weights, initial, has_initial = excess_mtl_step(
        self.loss_weight.read_value(), scores,
        self.initial_scores.read_value(), self.has_initial.read_value(),
        self._step_size)
    ok = tf.logical_and(
        tf.convert_to_tensor(applied),
        state_lib.inputs_finite(gradients, gradient_sums, weights))
    self.gradient_sums.assign(tf.where(ok, gradient_sums, previous))
    self.has_gradient_sums.assign(True)
    state_lib.assign_if(ok, self.loss_weight, weights)
    state_lib.assign_if(ok, self.initial_scores, initial)
    state_lib.assign_if(ok, self.has_initial, has_initial)
