"""The joint step: every task on one batch, weighted and aggregated."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import tensorflow as tf
import tf_keras

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base as aggregators
from mtl_dist.methods.weightings import base as weightings
from mtl_dist.model import base as model_base
from mtl_dist.model import precision
from mtl_dist.steps import losses as losses_lib
from mtl_dist.steps import plumbing

Batch = losses_lib.Batch


class _Terms(NamedTuple):
  """What a replica's forward pass records on its tape.

  With loss scaling (float16) every term but `per_task` is multiplied by the
  optimizer's loss scale, so gradients of them must be unscaled.
  """

  representation: Optional[tf.Tensor]  # The shared representation z.
  per_task: tf.Tensor  # [T] unweighted loss shares (never scaled).
  weights: tf.Tensor  # [T] the loss weights this step used.
  weighted: list[tf.Tensor]  # Each task's weighted loss share.
  unweighted: list[tf.Tensor]  # Each task's unweighted loss share.
  regularization: tf.Tensor
  objective: tf.Tensor  # Weighted losses plus regularization.
  diagnostics: tf.Tensor  # The model's diagnostics on this replica's batch.
  # With K > 1 sub-batches: task i's weighted loss share on sub-batch k at
  # k*T + i (scaled), else empty.
  sub_batch_weighted: list[tf.Tensor]


class JointStep:
  """One update of the shared variables and every task's own on all losses.

  The step computes what its aggregator declares it needs
  (`Aggregator.needs`). For `SUM` the optimizer all-reduces the gradient of
  the weighted sum as usual (`replica_step`). For `JACOBIAN` each replica
  computes every task's gradient of the shared variables, one fused
  all-reduce sums them (and the task variables' gradients) over all
  replicas, every replica aggregates the same global [T, P] matrix, and the
  result is applied with `skip_gradients_aggregation=True`
  (`aggregated_replica_step`). An aggregator with `sub_batches` K > 1
  gets each task's gradient on each of K strided sub-batches of the global
  batch instead, [K*T, P] (K*T backward passes of the shared variables,
  still one all-reduce). With `rep_grad` an aggregator with a
  Gram-matrix form gets the Gram matrix of the tasks' gradients at the
  shared representation instead (`rep_grad_replica_step`).

  Each replica step first checks the labels and counts labelled examples
  (both must run outside compiled code), then runs its forward and backward
  pass (this replica's data only, no collective; XLA-compiled with
  `jit_compile`), then all-reduces, checks and applies. `rep_grad`'s step
  all-reduces between two backward passes and cannot be compiled.

  With a LossScaleOptimizer (float16), each backward pass differentiates
  the scaled objective and returns unscaled gradients, and the step's
  finite verdict covers the all-reduced losses only (see
  `plumbing.reduce_and_check`).
  """

  def __init__(self, model: model_base.MultiTaskModel,
               tasks: Sequence[tasks_lib.TaskSpec],
               optimizer: tf_keras.optimizers.Optimizer,
               global_batch_size: int, partial_labels: bool,
               aggregator: aggregators.Aggregator,
               weighting: weightings.LossWeighting,
               rep_grad: bool = False, skip_nonfinite: bool = True,
               jit_compile: bool = False):
    """Initialises the step.

    Args:
      model: The model (shared and per-task variables).
      tasks: The tasks, in order.
      optimizer: The optimizer of every variable.
      global_batch_size: Examples per step over all replicas.
      partial_labels: Whether examples may lack labels.
      aggregator: Combines the tasks' gradients of the shared variables.
      weighting: Weighs the task losses.
      rep_grad: Aggregate from the Gram matrix of the gradients at the
        shared representation (the aggregator needs a Gram-matrix form).
      skip_nonfinite: Leave everything unchanged in a step whose losses or
        gradients are not finite.
      jit_compile: XLA-compile each replica's forward and backward pass.

    Raises:
      ValueError: For `rep_grad` with an aggregator without a Gram form,
        or with `jit_compile`; `jit_compile` with an aggregator that needs
        sub-batches.
      errors.ConfigError: For a `global_batch_size` that the aggregator's
        sub-batches do not divide.
    """
    if rep_grad and not aggregator.has_gram_form:
      raise ValueError(f"rep_grad needs an aggregator with a Gram-matrix form "
                       f"({', '.join(registry.gram_forms())}), not "
                       f"{aggregator.name!r}")
    if rep_grad and jit_compile:
      raise ValueError("jit_compile cannot compile rep_grad's step: it "
                       "all-reduces the Gram matrix between its two backward "
                       "passes")
    sub_batches = aggregator.sub_batches
    if sub_batches > 1 and jit_compile:
      raise ValueError(f"jit_compile cannot compile the step of aggregator "
                       f"{aggregator.name!r}: its {sub_batches} sub-batch "
                       "gradients per task are not supported compiled")
    if global_batch_size % sub_batches:
      raise errors.ConfigError(
          f"--global_batch_size={global_batch_size}: not divisible by the "
          f"{sub_batches} sub-batches of --aggregator={aggregator.name}")
    if weighting.needs_losses and jit_compile:
      raise ValueError(f"jit_compile cannot compile the step of weighting "
                       f"{weighting.name!r}: its weights need the step's "
                       "global losses, all-reduced inside the forward pass")
    self._rep_grad = rep_grad
    self._skip_nonfinite = skip_nonfinite
    self._model = model
    self._tasks = tuple(tasks)
    self._optimizer = optimizer
    self._global_batch_size = global_batch_size
    self._partial_labels = partial_labels
    self._aggregator = aggregator
    self._sub_batches = sub_batches
    self._weighting = weighting
    self._scales_losses = precision.scales_losses(optimizer)
    self._sums = aggregator.needs == aggregators.SUM
    self._sum_pass = plumbing.compiled(self._sum_backward, jit_compile)
    self._task_pass = plumbing.compiled(self._task_backward, jit_compile)

  @property
  def metric_names(self) -> tuple[str, ...]:
    """Names of the per-step metrics `__call__` returns besides losses."""
    names = tuple(f"{task.name}/weight" for task in self._tasks)
    if not self._sums:
      names += ("conflict_share",)
    return names + self._model.diagnostic_names()

  def __call__(self, strategy: tf.distribute.Strategy,
               iterators: Sequence[tf.distribute.DistributedIterator],
               step: tf.Variable):
    """Runs one step on every replica (cross-replica context).

    Returns:
      (losses, trained, metrics, measured, applied): [T] global-batch
      losses, a [T] 0/1 mask of the tasks this step trained (all of them),
      a [len(metric_names)] vector of step metrics and which of them it
      measured (all), and whether the update was applied (False: a loss or
      gradient was not finite, nothing changed).
    """
    batch = next(iterators[0])
    step = step.read_value()
    if self._sums:
      losses, weights, diagnostics, applied, kept, updated = strategy.run(
          self.replica_step, args=(batch, step))
      metrics = [plumbing.first_local(strategy, weights)]
    else:
      replica_fn = (self.rep_grad_replica_step if self._rep_grad
                    else self.aggregated_replica_step)
      (losses, weights, share, diagnostics, applied, kept,
       updated) = strategy.run(replica_fn, args=(batch, step))
      metrics = [plumbing.first_local(strategy, weights),
                 tf.reshape(plumbing.first_local(strategy, share), [1])]
    metrics = tf.concat(
        metrics + [plumbing.first_local(strategy, diagnostics)], axis=0)
    # Every replica holds the same all-reduced values.
    losses = plumbing.first_local(strategy, losses)
    applied = plumbing.first_local(strategy, applied)
    self._weighting.update(
        losses, plumbing.first_local(strategy, kept),
        plumbing.first_local(strategy, updated)
        if self._weighting.needs_updated_losses else None)
    return (losses, tf.ones([len(self._tasks)]), metrics,
            tf.ones([len(self.metric_names)]), applied)

  # The three replica steps.

  def replica_step(self, batch: Batch, step: tf.Tensor
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Trains on one replica's batch with the gradient of the weighted sum.

    Returns:
      ([T] global-batch losses, the [T] loss weights used, the model's
      diagnostics averaged over replicas, whether the step was applied: all
      losses and gradients finite; with float16 loss scaling only the
      losses are checked, gradient overflow being the loss-scale
      optimizer's; whether the methods' state took the step
      (`_state_moves`); the batch's [T] global losses after the update, for
      a weighting that `needs_updated_losses`, else zeros).
    """
    batch, counts = losses_lib.prepared(self._tasks, batch,
                                        self._partial_labels)
    gradients, per_task, weights, weighting_gradients, diagnostics = (
        self._sum_pass(batch, counts, step))
    gradients, losses, finite = plumbing.reduce_and_check(
        gradients, per_task, check_gradients=not self._scales_losses)
    kept = self._state_moves(finite, gradients)
    self._update_weighting(weighting_gradients, per_task, batch, kept)
    plumbing.apply_if(self._optimizer, gradients, self._all_variables(),
                      finite if self._skip_nonfinite else None)
    return (losses, weights, plumbing.replica_mean(diagnostics), finite,
            kept, self._updated_losses(batch, counts))

  def aggregated_replica_step(
      self, batch: Batch, step: tf.Tensor
  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Trains with gradient aggregation.

    Returns:
      ([T] losses, the [T] loss weights used, the conflict share, the
      model's diagnostics averaged over replicas, whether the step was
      applied, whether the state took it and the losses after the update,
      as for `replica_step`).
    """
    sub_batches = self._sub_batches
    batch, counts = losses_lib.prepared(self._tasks, batch,
                                        self._partial_labels, sub_batches)
    shared = self._model.shared_variables
    own = self._own_variables()
    local, per_task, weights, weighting_gradients, diagnostics = (
        self._task_pass(batch, counts, step))
    num_tasks = len(self._tasks)
    num_shared = plumbing.size(shared)
    rows = sub_batches * num_tasks
    # One all-reduce for the task gradients, the rest and the loss shares.
    fused = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.concat([local, per_task], axis=0))
    matrix = tf.reshape(fused[:num_shared * rows], [rows, num_shared])
    rest = fused[num_shared * rows:-num_tasks]
    losses = fused[-num_tasks:]
    saved = self._aggregator_state()
    direction = self._aggregator(
        matrix, step, losses if self._aggregator.needs_losses else None)
    # With loss scaling, overflowing gradients are the optimizer's to skip.
    finite = plumbing.all_finite([losses] if self._scales_losses
                                 else [fused, direction])
    kept = self._state_moves(finite, [fused, direction])
    self._restore_aggregator_state(kept, saved)
    self._update_weighting(weighting_gradients, per_task, batch, kept)
    own_grads = plumbing.unflatten(rest[:plumbing.size(own)], own)
    shared_grads = plumbing.unflatten(direction + rest[plumbing.size(own):],
                                      shared)
    plumbing.apply_if(self._optimizer, shared_grads + own_grads, shared + own,
                      finite if self._skip_nonfinite else None)
    if sub_batches > 1:  # ~The full batch's (exact without partial labels).
      matrix = tf.reduce_mean(
          tf.reshape(matrix, [sub_batches, num_tasks, num_shared]), axis=0)
      counts = None if counts is None else tf.reduce_sum(counts, axis=0)
    return (losses, weights, aggregators.conflict_share(matrix),
            plumbing.replica_mean(diagnostics), finite, kept,
            self._updated_losses(batch, counts))

  def rep_grad_replica_step(
      self, batch: Batch, step: tf.Tensor
  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """MGDA-UB style: coefficients from gradients at the representation.

    Each task's gradient with respect to the shared representation z is
    taken on this replica's examples; the global Gram matrix of these
    gradients is the sum of the replicas' (one [T, T] all-reduce); every
    replica derives the same coefficients a and backpropagates
    sum_i a_i dL_i/dz through the shared variables once. Each task's own
    variables get their own task's gradient.

    Returns:
      ([T] losses, the [T] loss weights used, the conflict share, the
      model's diagnostics averaged over replicas, whether the step was
      applied, whether the state took it and the losses after the update,
      as for `replica_step`).
    """
    batch, counts = losses_lib.prepared(self._tasks, batch,
                                        self._partial_labels)
    shared = self._model.shared_variables
    own = self._own_variables()
    with tf.GradientTape(persistent=True) as tape:
      terms = self._forward(batch, counts, step, surgery=True)
    zero = tf.UnconnectedGradients.ZERO
    # In float32 and unscaled: the representation may be bfloat16 or float16.
    rep_grads = self._unscaled([
        tf.cast(tape.gradient(term, terms.representation,
                              unconnected_gradients=zero), tf.float32)
        for term in terms.weighted])
    flat = tf.stack([tf.reshape(g, [-1]) for g in rep_grads])
    gram = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.linalg.matmul(flat, flat, transpose_b=True))
    saved = self._aggregator_state()
    coefficients = self._aggregator.gram_coefficients(gram, step)
    combined = tf.add_n([coefficients[i] * g for i, g in enumerate(rep_grads)])
    shared_grads = tape.gradient(
        terms.representation, shared,
        output_gradients=tf.cast(self._scaled(combined),
                                 terms.representation.dtype),
        unconnected_gradients=zero)
    regularization_grads = tape.gradient(terms.regularization, shared,
                                         unconnected_gradients=zero)
    shared_grads = [g + r for g, r in zip(shared_grads, regularization_grads)]
    own_grads = tape.gradient(terms.objective, own,
                              unconnected_gradients=zero)
    weighting_gradients = self._weighting_gradients(tape, terms.unweighted)
    del tape
    gradients, losses, finite = plumbing.reduce_and_check(
        self._unscaled(shared_grads + own_grads), terms.per_task,
        check_gradients=not self._scales_losses)
    kept = self._state_moves(finite, gradients)
    self._restore_aggregator_state(kept, saved)
    self._update_weighting(weighting_gradients, terms.per_task, batch, kept)
    plumbing.apply_if(self._optimizer, gradients, shared + own,
                      finite if self._skip_nonfinite else None)
    return (losses, terms.weights, aggregators.conflict_share_from_gram(gram),
            plumbing.replica_mean(terms.diagnostics), finite, kept,
            self._updated_losses(batch, counts))

  # Forward and backward passes: this replica's data, no collective.

  def _forward(self, batch: Batch, global_counts: Optional[tf.Tensor],
               step: tf.Tensor, surgery: bool,
               sub_batch_counts: Optional[tf.Tensor] = None) -> _Terms:
    """The forward pass and every term the backward pass differentiates.

    Call inside the tape (persistent when more than the objective is
    differentiated): a term formed after the tape (even a slice) would not
    be recorded and its gradient would be missing.

    Args:
      batch: This replica's checked batch.
      global_counts: Partial labels: [T] labelled examples per task in the
        global batch, else None.
      step: The step, for the weighting.
      surgery: Record the representation and each task's weighted loss
        (for aggregation), on each sub-batch too if the aggregator has
        K > 1; otherwise only the objective, and each task's unweighted
        loss when the weighting needs task gradients.
      sub_batch_counts: Partial labels with K > 1 sub-batches: [K, T]
        labelled examples of each task in each global sub-batch.
    """
    features, labels = batch
    forward = self._model.forward(features, training=True)
    outputs = forward.outputs
    _, per_task = losses_lib.task_losses(
        self._tasks, labels, outputs, self._global_batch_size,
        self._partial_labels, global_counts, check_labels=False)
    regularization = losses_lib.regularization(
        self._model.regularization_losses())
    global_losses = None
    if self._weighting.needs_losses:  # Constants of the backward pass.
      global_losses = tf.stop_gradient(
          tf.distribute.get_replica_context().all_reduce(
              tf.distribute.ReduceOp.SUM, per_task))
    weights = self._weighting.weights(step, global_losses)
    objective = (self._weighting.objective(per_task, step, global_losses) +
                 regularization)
    num_tasks = len(self._tasks)
    weighted = unweighted = sub_batch_weighted = []
    if surgery:
      weighted_losses = weights * per_task
      weighted = [self._scaled(weighted_losses[i]) for i in range(num_tasks)]
    if surgery and self._sub_batches > 1:  # [K, T], flattened k*T + i.
      sub_batch_losses = tf.reshape(weights * losses_lib.sub_batch_losses(
          self._tasks, labels, outputs, self._global_batch_size,
          self._sub_batches, self._partial_labels, sub_batch_counts,
          check_labels=False), [-1])
      sub_batch_weighted = [self._scaled(sub_batch_losses[j])
                            for j in range(self._sub_batches * num_tasks)]
    if surgery or self._weighting.needs_task_gradients:
      unweighted = [self._scaled(per_task[i]) for i in range(num_tasks)]
    return _Terms(representation=forward.representation, per_task=per_task,
                  weights=weights, weighted=weighted, unweighted=unweighted,
                  regularization=self._scaled(regularization),
                  objective=self._scaled(objective),
                  diagnostics=plumbing.stacked(forward.diagnostics),
                  sub_batch_weighted=sub_batch_weighted)

  def _sum_backward(self, batch: Batch, global_counts: Optional[tf.Tensor],
                    step: tf.Tensor
                    ) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor,
                               Optional[tf.Tensor], tf.Tensor]:
    """This replica's forward and backward pass for a `SUM` aggregator.

    Returns:
      (gradients of the objective, [T] loss shares, [T] loss weights,
      GradNorm's task gradients or None, the model's diagnostics).
    """
    with tf.GradientTape(
        persistent=self._weighting.needs_task_gradients) as tape:
      terms = self._forward(batch, global_counts, step, surgery=False)
    gradients = tape.gradient(
        terms.objective, self._all_variables(),
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return (self._unscaled(gradients), terms.per_task, terms.weights,
            self._weighting_gradients(tape, terms.unweighted),
            terms.diagnostics)

  def _task_backward(self, batch: Batch, global_counts: Optional[tf.Tensor],
                     step: tf.Tensor
                     ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor,
                                Optional[tf.Tensor], tf.Tensor]:
    """This replica's forward and backward pass for gradient aggregation.

    With K > 1 sub-batches, `global_counts` are the [K, T] counts of each
    sub-batch (partial labels), and local has each task's gradient on each
    sub-batch instead (at k*T + i) of its full-batch one.

    Returns:
      (local, per_task, weights, weighting gradients): local concatenates each
      task's flattened gradient of the shared variables, then the flattened
      gradient of everything else (the tasks' own variables, learned loss
      weights, the shared variables' regularization); per_task holds the
      [T] loss shares; weights the [T] loss weights; GradNorm's task
      gradients or None; the model's diagnostics.
    """
    shared = self._model.shared_variables
    own = self._own_variables()
    if self._sub_batches > 1:
      sub_batch_counts = global_counts
      if global_counts is not None:
        global_counts = tf.reduce_sum(global_counts, axis=0)
      with tf.GradientTape(persistent=True) as tape:
        terms = self._forward(batch, global_counts, step, surgery=True,
                              sub_batch_counts=sub_batch_counts)
      jacobian_terms = terms.sub_batch_weighted
    else:
      with tf.GradientTape(persistent=True) as tape:
        terms = self._forward(batch, global_counts, step, surgery=True)
      jacobian_terms = terms.weighted
    zero = tf.UnconnectedGradients.ZERO
    task_grads = [plumbing.flatten(tape.gradient(term, shared,
                                                 unconnected_gradients=zero))
                  for term in jacobian_terms]
    rest = plumbing.flatten(
        tape.gradient(terms.objective, own, unconnected_gradients=zero) +
        tape.gradient(terms.regularization, shared,
                      unconnected_gradients=zero))
    local = self._unscaled([tf.concat(task_grads + [rest], axis=0)])[0]
    return (local, terms.per_task, terms.weights,
            self._weighting_gradients(tape, terms.unweighted),
            terms.diagnostics)

  # Helpers.

  def _updated_losses(self, batch: Batch,
                      global_counts: Optional[tf.Tensor]) -> tf.Tensor:
    """The batch's [T] global losses after the update (FAMO), else zeros.

    One more forward pass on this replica's batch with the updated
    variables, in inference mode (batch-norm statistics and dropout are
    left alone), and one [T] all-reduce.
    """
    if not self._weighting.needs_updated_losses:
      return tf.zeros([len(self._tasks)])
    features, labels = batch
    outputs = self._model.forward(features, training=False).outputs
    _, per_task = losses_lib.task_losses(
        self._tasks, labels, outputs, self._global_batch_size,
        self._partial_labels, global_counts, check_labels=False)
    return tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(per_task, tf.float32))

  def _all_variables(self) -> list[tf.Variable]:
    """Everything the step trains: the model's and learned loss weights."""
    return self._model.trainable_variables + self._weighting.trainable

  def _own_variables(self) -> list[tf.Variable]:
    """Each task's own variables and learned loss weights: trained without
    gradient aggregation."""
    own = [v for task in self._tasks
           for v in self._model.task_variables(task.name)]
    return own + self._weighting.trainable

  def _scaled(self, loss: tf.Tensor) -> tf.Tensor:
    return precision.scaled(self._optimizer, loss)

  def _unscaled(self, gradients: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    return precision.unscaled(self._optimizer, gradients)

  def _weighting_gradients(self, tape: tf.GradientTape,
                           task_terms: Sequence[tf.Tensor]
                           ) -> Optional[tf.Tensor]:
    """GradNorm's [T, |W|] local task gradients at W (unscaled), else None.

    Args:
      tape: The persistent tape that recorded `task_terms`.
      task_terms: Each task's unweighted loss share, scaled like the
        objective.
    """
    if not self._weighting.needs_task_gradients:
      return None
    return self._unscaled([self._weighting.task_gradients(
        tape, task_terms, self._model.last_shared_kernel())])[0]

  def _update_weighting(self, weighting_gradients: Optional[tf.Tensor],
                        per_task: tf.Tensor, batch: Batch,
                        kept: tf.Tensor) -> None:
    """GradNorm's (ExcessMTL's) state update, where `kept` (see
    `_state_moves`)."""
    self._weighting.replica_update(
        weighting_gradients, per_task,
        losses_lib.labelled_counts(self._tasks, batch, self._partial_labels),
        kept)

  def _state_moves(self, finite: tf.Tensor,
                   gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """Whether the methods' state may take this step: its update is applied.

    With loss scaling, `finite` covers the losses only, and the optimizer
    skips a step whose all-reduced `gradients` overflowed; the methods'
    state skips it too.
    """
    if self._scales_losses:
      return tf.logical_and(finite, plumbing.all_finite(gradients))
    return finite

  def _aggregator_state(self) -> list[tf.Tensor]:
    """The aggregator's state before its call (see
    `_restore_aggregator_state`)."""
    return [tf.identity(v.value()) for v in self._aggregator.variables]

  def _restore_aggregator_state(self, kept: tf.Tensor,
                                saved: Sequence[tf.Tensor]) -> None:
    """Puts back the aggregator's `saved` state unless `kept`.

    An aggregator keeps its state where its own inputs are not finite; the
    step also skips where the rest is not (a head's gradient, the update
    itself, an overflow the loss-scale optimizer skips). The value is
    picked by `tf.cond` and assigned outside it (a replica step cannot
    assign inside control flow), and may change shape ([T, None] state).
    """
    for variable, old in zip(self._aggregator.variables, saved):
      variable.assign(tf.cond(kept, variable.value, lambda old=old: old))
