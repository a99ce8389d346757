"""Train and eval steps: what happens on one replica for one batch.

Joint and alternate mode share the model, the pipelines and the loop; they
differ only here. Every loss is a per-example loss summed and divided by the
global batch size (`average_loss`, what `tf.nn.compute_average_loss(...,
global_batch_size=...)` computes), so the gradients the optimizer
all-reduces (sums) over N replicas equal the gradient of one device with the
same global batch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import tensorflow as tf
import tf_keras

from mtl_dist import model as model_lib
from mtl_dist import precision
from mtl_dist import schedules
from mtl_dist import tasks as tasks_lib
from mtl_dist.methods.aggregators import base as aggregators
from mtl_dist.methods.weightings import base as weightings

Batch = tuple[tf.Tensor, dict[str, tf.Tensor]]


def task_losses(tasks: Sequence[tasks_lib.TaskSpec],
                labels: dict[str, tf.Tensor], outputs: dict[str, tf.Tensor],
                global_batch_size: int, partial_labels: bool = False,
                global_counts: Optional[tf.Tensor] = None,
                check_labels: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """This replica's share of each task's loss and of the weighted total.

  Args:
    tasks: The tasks, with their weights.
    labels: Task name to labels (and optionally `<task>_mask` entries).
    outputs: Task name to head outputs.
    global_batch_size: Examples per step over all replicas.
    partial_labels: Whether examples may lack labels (see
      `TaskSpec.label_mask`). Then each task's loss is the sum of its
      per-example losses over labelled examples divided by the number of
      labelled examples in the whole global batch, counted with one
      all-reduce over replicas; a task with no labelled example gets 0.
      Otherwise every example counts and the divisor is the global batch.
    global_counts: Partial labels: the [T] labelled examples of each task in
      the global batch (`global_label_counts`), for callers that cannot
      all-reduce here (compiled code); None counts them here.
    check_labels: Check class labels in-graph (see
      `TaskSpec.checked_labels`); False for labels checked already.

  Returns:
    (total, per_task): total = sum_i weight_i * per_task[i]; per_task is a
    [T] vector of unweighted losses. Summed over replicas they are the
    global-batch means.
  """
  if partial_labels:
    masks = [task.label_mask(labels) for task in tasks]
    if global_counts is None:
      global_counts = global_label_counts(tasks, labels)
    per_task = tf.stack([
        tf.reduce_sum(mask * task.per_example_loss(
            task.fill_missing(labels, mask), outputs[task.name],
            check=check_labels)) / tf.maximum(global_counts[i], 1.0)
        for i, (task, mask) in enumerate(zip(tasks, masks))
    ])
  else:
    per_task = tf.stack([
        average_loss(
            task.per_example_loss(labels[task.name], outputs[task.name],
                                  check=check_labels), global_batch_size)
        for task in tasks
    ])
  weights = tf.constant([task.weight for task in tasks], tf.float32)
  return tf.reduce_sum(weights * per_task), per_task


def average_loss(per_example_loss: tf.Tensor,
                 global_batch_size: int) -> tf.Tensor:
  """This replica's share of the global-batch mean: sum / global batch size.

  The value of `tf.nn.compute_average_loss(per_example_loss,
  global_batch_size=global_batch_size)` without its three in-graph checks of
  the (here constant) batch size, which cost about 15 ops per task and step.

  Args:
    per_example_loss: Losses, shape [batch].
    global_batch_size: Examples per step over all replicas (positive).

  Returns:
    The scalar share, in the losses' dtype.
  """
  if per_example_loss.shape.rank not in (None, 1):
    raise ValueError(f"per-example losses must have shape [batch], not "
                     f"{per_example_loss.shape}")
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, not "
                     f"{global_batch_size}")
  # div_no_nan, as compute_average_loss: grappler rewrites a division by a
  # constant into a multiplication by its reciprocal, one ulp off.
  return tf.math.divide_no_nan(
      tf.reduce_sum(per_example_loss),
      tf.constant(global_batch_size, per_example_loss.dtype))


def global_label_counts(tasks: Sequence[tasks_lib.TaskSpec],
                        labels: dict[str, tf.Tensor]) -> tf.Tensor:
  """[T] examples labelled for each task in the global batch (all-reduced)."""
  local_counts = tf.stack([tf.reduce_sum(task.label_mask(labels))
                           for task in tasks])
  return tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, local_counts)


def checked_labels(tasks: Sequence[tasks_lib.TaskSpec],
                   labels: dict[str, tf.Tensor],
                   partial_labels: bool) -> dict[str, tf.Tensor]:
  """`labels`, whose class labels are readable only after their range check.

  Train steps check here, before their backward pass, because XLA compiles
  the assertions inside `TaskSpec.per_example_loss` to nothing (see
  `TaskSpec.checked_labels`). With partial labels the check sees what the
  loss would: missing labels replaced by 0.
  """
  checked = dict(labels)
  for task in tasks:
    if task.kind != tasks_lib.CLASSIFICATION:
      continue
    seen = (task.fill_missing(labels, task.label_mask(labels))
            if partial_labels else labels[task.name])
    with tf.control_dependencies([task.checked_labels(seen)]):
      checked[task.name] = tf.identity(labels[task.name])
  return checked


def _regularization(layers: Sequence[tf_keras.layers.Layer]) -> tf.Tensor:
  losses = [loss for layer in layers for loss in layer.losses]
  if not losses:
    return tf.constant(0.0)
  return tf.nn.scale_regularization_loss(tf.add_n(losses))


def _all_finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  """Whether every value of every tensor is finite (a scalar bool).

  NaN and Inf propagate through sums, so this sums each tensor (in float32)
  and checks the total: one pass over the values and two ops per step for
  all of them, where `reduce_all(is_finite(t))` per tensor takes a pass, a
  bool buffer and two ops per tensor. The check also fails if finite values
  sum beyond float32's range (3.4e38), i.e. for gradients of ~1e30 and more,
  which no update survives either.
  """
  sums = [tf.reduce_sum(tf.cast(t.values if isinstance(t, tf.IndexedSlices)
                                else t, tf.float32)) for t in tensors]
  return tf.math.is_finite(tf.add_n(sums))


def _reduce_and_check(
    gradients: Sequence[tf.Tensor], losses: tf.Tensor,
    check_gradients: bool = True
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
  """Sums gradients and [T] loss shares over replicas in one all-reduce.

  Args:
    gradients: This replica's gradients.
    losses: This replica's loss shares.
    check_gradients: Whether `finite` covers the gradients too. With loss
      scaling it covers the losses only: overflowing gradients are normal
      there, and the LossScaleOptimizer skips their step itself.

  Returns:
    (gradients, losses, finite): the global sums, and whether all of them are
    finite. Computed from all-reduced values, `finite` is the same on every
    replica and worker, so all of them skip a step together.
  """
  gradients = list(gradients)
  reduced_gradients, reduced_losses = (
      tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM, [gradients, losses]))
  checked = [reduced_losses]
  if check_gradients:
    checked += list(reduced_gradients)
  return list(reduced_gradients), reduced_losses, _all_finite(checked)


def _apply_if(optimizer: tf_keras.optimizers.Optimizer,
              gradients: Sequence[tf.Tensor],
              variables: Sequence[tf.Variable],
              apply: Optional[tf.Tensor]) -> None:
  """Applies all-reduced `gradients` if `apply` (None: always), else nothing.

  A skipped step leaves the variables and the optimizer's slots and
  iteration count as they were. `apply` must be equal on every replica. A
  `tf.cond` in replica context cannot hold the optimizer's `merge_call`, so
  the condition is evaluated in cross-replica context, as tf_keras's
  LossScaleOptimizer does.
  """
  variables = list(variables)
  if apply is None:  # Unconditional: no cond, no extra merge_call.
    optimizer.apply_gradients(zip(gradients, variables),
                              skip_gradients_aggregation=True)
    return

  def apply_on_replica(replica_gradients):
    optimizer.apply_gradients(zip(replica_gradients, variables),
                              skip_gradients_aggregation=True)

  def cross_replica(strategy, replica_gradients, replica_apply):
    def update():
      strategy.extended.call_for_each_replica(apply_on_replica,
                                              args=(replica_gradients,))
      return tf.constant(True)

    return tf.cond(strategy.experimental_local_results(replica_apply)[0],
                   update, lambda: tf.constant(False))

  tf.distribute.get_replica_context().merge_call(
      cross_replica, args=(list(gradients), apply))


class _Terms(NamedTuple):
  """What a gradient-surgery step records on its tape.

  With loss scaling (float16) every term but `per_task` is multiplied by the
  optimizer's loss scale, so gradients of them must be unscaled.
  """

  representation: tf.Tensor  # The trunk's output z.
  per_task: tf.Tensor  # [T] unweighted loss shares (never scaled).
  weighted: list[tf.Tensor]  # Each task's weighted loss share.
  unweighted: list[tf.Tensor]  # Each task's unweighted loss share.
  regularization: tf.Tensor
  objective: tf.Tensor  # Weighted losses plus regularization.


class JointStep:
  """One update of the trunk and every head on the weighted task losses.

  The step computes what its aggregator declares it needs
  (`Aggregator.needs`). For `SUM` the optimizer all-reduces the gradient of
  the weighted sum as usual. For `JACOBIAN` each replica computes every
  task's gradient of the shared trunk, one fused all-reduce sums them (and
  the heads' gradients) over all replicas, every replica aggregates the same
  global [T, P] matrix, and the result is applied with
  `skip_gradients_aggregation=True`. With `rep_grad` an aggregator with a
  Gram-matrix form gets the Gram matrix of the tasks' gradients at the
  trunk's output instead.

  Each replica step first checks the labels and counts labelled examples
  (both must run outside compiled code), then runs its forward and backward
  pass (`_sum_backward` or `_task_backward`: this replica's data only, no
  collective; XLA-compiled with `jit_compile`), then all-reduces, checks
  and applies. `rep_grad`'s step all-reduces between two backward passes
  and cannot be compiled.

  With a LossScaleOptimizer (float16), each backward pass differentiates
  the scaled objective and returns unscaled gradients, and the step's
  finite verdict covers the all-reduced losses only (see
  `_reduce_and_check`).
  """

  def __init__(self, model: model_lib.SharedTrunkModel,
               tasks: Sequence[tasks_lib.TaskSpec],
               optimizer: tf_keras.optimizers.Optimizer,
               global_batch_size: int, partial_labels: bool,
               aggregator: aggregators.Aggregator,
               weighting: weightings.LossWeighting,
               rep_grad: bool = False, skip_nonfinite: bool = True,
               jit_compile: bool = False):
    """Initialises the step.

    Args:
      model: The shared-trunk model.
      tasks: The tasks, in order.
      optimizer: The optimizer of every variable.
      global_batch_size: Examples per step over all replicas.
      partial_labels: Whether examples may lack labels.
      aggregator: Combines the tasks' gradients of the trunk.
      weighting: Weighs the task losses.
      rep_grad: Aggregate from the Gram matrix of the gradients at the
        trunk's output (the aggregator needs a Gram-matrix form).
      skip_nonfinite: Leave everything unchanged in a step whose losses or
        gradients are not finite.
      jit_compile: XLA-compile each replica's forward and backward pass.
    """
    if rep_grad and not aggregator.has_gram_form:
      raise ValueError(f"rep_grad needs an aggregator with a Gram-matrix "
                       f"form, not {aggregator.name!r}")
    if rep_grad and jit_compile:
      raise ValueError("jit_compile cannot compile rep_grad's step: it "
                       "all-reduces the Gram matrix between its two backward "
                       "passes")
    self._rep_grad = rep_grad
    self._skip_nonfinite = skip_nonfinite
    self._model = model
    self._tasks = tuple(tasks)
    self._optimizer = optimizer
    self._global_batch_size = global_batch_size
    self._partial_labels = partial_labels
    self._aggregator = aggregator
    self._weighting = weighting
    self._scales_losses = precision.scales_losses(optimizer)
    self._sum_pass = _compiled(self._sum_backward, jit_compile)
    self._task_pass = _compiled(self._task_backward, jit_compile)

  @property
  def metric_names(self) -> tuple[str, ...]:
    """Names of the per-step metrics `__call__` returns besides losses."""
    names = tuple(f"{task.name}/weight" for task in self._tasks)
    return names if self._sums else names + ("conflict_share",)

  @property
  def _sums(self) -> bool:
    """Whether the aggregator is a plain sum (no task Jacobian)."""
    return self._aggregator.needs == aggregators.SUM

  def _labelled_counts(self, batch: Batch) -> tf.Tensor:
    """[T] this replica's examples that carry each task's label."""
    features, labels = batch
    if self._partial_labels:
      return tf.stack([tf.reduce_sum(task.label_mask(labels))
                       for task in self._tasks])
    count = tf.cast(tf.shape(features)[0], tf.float32)
    return tf.fill([len(self._tasks)], count)

  def _prepare(self, batch: Batch) -> tuple[Batch, Optional[tf.Tensor]]:
    """The batch with checked labels, and the global label counts.

    Returns:
      (batch, counts): counts are the [T] labelled examples of each task in
      the global batch with partial labels (one all-reduce), else None.
    """
    features, labels = batch
    labels = checked_labels(self._tasks, labels, self._partial_labels)
    counts = (global_label_counts(self._tasks, labels)
              if self._partial_labels else None)
    return (features, labels), counts

  def _losses(self, batch: Batch,
              global_counts: Optional[tf.Tensor]) -> tf.Tensor:
    """This replica's [T] loss shares (the forward pass of the sum path)."""
    features, labels = batch
    outputs = self._model(features, training=True)
    _, per_task = task_losses(self._tasks, labels, outputs,
                              self._global_batch_size, self._partial_labels,
                              global_counts, check_labels=False)
    return per_task

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
        tape, task_terms, _last_shared_kernel(self._model))])[0]

  def _update_weighting(self, weighting_gradients: Optional[tf.Tensor],
                        per_task: tf.Tensor, batch: Batch, finite: tf.Tensor,
                        gradients: Sequence[tf.Tensor]) -> None:
    """GradNorm's weight update, skipped whenever the model's update is.

    With loss scaling, `finite` covers the losses only, and the optimizer
    skips a step whose all-reduced `gradients` overflowed; the weights skip
    it too.
    """
    if self._scales_losses and self._weighting.needs_task_gradients:
      finite = tf.logical_and(finite, _all_finite(gradients))
    self._weighting.replica_update(weighting_gradients, per_task,
                                   self._labelled_counts(batch), finite)

  def _sum_backward(self, batch: Batch, global_counts: Optional[tf.Tensor],
                    step: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor,
                               Optional[tf.Tensor]]:
    """This replica's forward and backward pass for the `sum` aggregator.

    Returns:
      (gradients of the objective, [T] loss shares, GradNorm's task
      gradients or None).
    """
    variables = self._model.trainable_variables + self._weighting.trainable
    needs_terms = self._weighting.needs_task_gradients
    with tf.GradientTape(persistent=needs_terms) as tape:
      per_task = self._losses(batch, global_counts)
      terms = ([self._scaled(per_task[i]) for i in range(len(self._tasks))]
               if needs_terms else [])
      total = self._weighting.objective(per_task, step)
      total += _regularization([self._model])
      total = self._scaled(total)
    gradients = tape.gradient(
        total, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return (self._unscaled(gradients), per_task,
            self._weighting_gradients(tape, terms))

  def replica_step(self, batch: Batch,
                   step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Trains on one replica's batch.

    Returns:
      ([T] global-batch losses, whether the step was applied: all losses
      and gradients finite; with float16 loss scaling only the losses are
      checked, gradient overflow being the loss-scale optimizer's).
    """
    batch, counts = self._prepare(batch)
    gradients, per_task, weighting_gradients = self._sum_pass(batch, counts,
                                                              step)
    gradients, losses, finite = _reduce_and_check(
        gradients, per_task, check_gradients=not self._scales_losses)
    self._update_weighting(weighting_gradients, per_task, batch, finite,
                           gradients)
    _apply_if(self._optimizer, gradients,
              self._model.trainable_variables + self._weighting.trainable,
              finite if self._skip_nonfinite else None)
    return losses, finite

  def _unshared_variables(self) -> list[tf.Variable]:
    """Heads and learned loss weights: trained without gradient surgery."""
    heads = [v for task in self._tasks
             for v in self._model.heads[task.name].trainable_variables]
    return heads + self._weighting.trainable

  def _record_terms(self, batch: Batch, global_counts: Optional[tf.Tensor],
                    step: tf.Tensor) -> _Terms:
    """The forward pass and every term a surgery step differentiates.

    Call inside a persistent tape: a term formed after the tape (even a
    slice) would not be recorded and its gradient would be missing.
    """
    features, labels = batch
    representation = self._model.trunk(features, training=True)
    outputs = {task.name: self._model.heads[task.name](representation,
                                                       training=True)
               for task in self._tasks}
    _, per_task = task_losses(self._tasks, labels, outputs,
                              self._global_batch_size, self._partial_labels,
                              global_counts, check_labels=False)
    weighted = self._weighting.weights(step) * per_task
    regularization = _regularization([self._model])
    objective = self._weighting.objective(per_task, step) + regularization
    return _Terms(
        representation=representation, per_task=per_task,
        weighted=[self._scaled(weighted[i])
                  for i in range(len(self._tasks))],
        unweighted=[self._scaled(per_task[i])
                    for i in range(len(self._tasks))],
        regularization=self._scaled(regularization),
        objective=self._scaled(objective))

  def rep_grad_replica_step(self, batch: Batch,
                            step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """MGDA-UB style: coefficients from gradients at the representation.

    Each task's gradient with respect to the trunk's output z is taken on
    this replica's examples; the global Gram matrix of these gradients is the
    sum of the replicas' (one [T, T] all-reduce); every replica derives the
    same coefficients a and backpropagates sum_i a_i dL_i/dz through the
    trunk once. Heads get their own tasks' gradients.
    """
    batch, counts = self._prepare(batch)
    trunk = self._model.trunk.trainable_variables
    heads = self._unshared_variables()
    with tf.GradientTape(persistent=True) as tape:
      terms = self._record_terms(batch, counts, step)
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
    coefficients = self._aggregator.gram_coefficients(gram, step)
    combined = tf.add_n([coefficients[i] * g for i, g in enumerate(rep_grads)])
    trunk_grads = tape.gradient(
        terms.representation, trunk,
        output_gradients=tf.cast(self._scaled(combined),
                                 terms.representation.dtype),
        unconnected_gradients=zero)
    regularization_grads = tape.gradient(terms.regularization, trunk,
                                         unconnected_gradients=zero)
    trunk_grads = [g + r for g, r in zip(trunk_grads, regularization_grads)]
    head_grads = tape.gradient(terms.objective, heads,
                               unconnected_gradients=zero)
    weighting_gradients = self._weighting_gradients(tape, terms.unweighted)
    del tape
    gradients, losses, finite = _reduce_and_check(
        self._unscaled(trunk_grads + head_grads), terms.per_task,
        check_gradients=not self._scales_losses)
    self._update_weighting(weighting_gradients, terms.per_task, batch, finite,
                           gradients)
    _apply_if(self._optimizer, gradients, trunk + heads,
              finite if self._skip_nonfinite else None)
    return losses, aggregators.conflict_share_from_gram(gram), finite

  def _task_backward(self, batch: Batch, global_counts: Optional[tf.Tensor],
                     step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, Optional[tf.Tensor]]:
    """This replica's forward and backward pass for gradient aggregation.

    Returns:
      (local, per_task, weighting gradients): local concatenates each
      task's flattened trunk gradient, then the flattened gradient of
      everything else (heads, learned loss weights, the trunk's
      regularization); per_task holds the [T] loss shares; GradNorm's task
      gradients or None.
    """
    trunk = self._model.trunk.trainable_variables
    heads = self._unshared_variables()
    with tf.GradientTape(persistent=True) as tape:
      terms = self._record_terms(batch, global_counts, step)
    zero = tf.UnconnectedGradients.ZERO
    task_grads = [_flatten(tape.gradient(term, trunk,
                                         unconnected_gradients=zero))
                  for term in terms.weighted]
    rest = _flatten(tape.gradient(terms.objective, heads,
                                  unconnected_gradients=zero) +
                    tape.gradient(terms.regularization, trunk,
                                  unconnected_gradients=zero))
    local = self._unscaled([tf.concat(task_grads + [rest], axis=0)])[0]
    return (local, terms.per_task,
            self._weighting_gradients(tape, terms.unweighted))

  def aggregated_replica_step(self, batch: Batch,
                              step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Trains with gradient aggregation; returns ([T] losses, conflict share)."""
    batch, counts = self._prepare(batch)
    trunk = self._model.trunk.trainable_variables
    heads = self._unshared_variables()
    local, per_task, weighting_gradients = self._task_pass(batch, counts,
                                                           step)
    num_tasks = len(self._tasks)
    num_trunk = _size(trunk)
    # One all-reduce for the task gradients, the rest and the loss shares.
    fused = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.concat([local, per_task], axis=0))
    matrix = tf.reshape(fused[:num_trunk * num_tasks], [num_tasks, num_trunk])
    rest = fused[num_trunk * num_tasks:-num_tasks]
    losses = fused[-num_tasks:]
    direction = self._aggregator(matrix, step)
    # With loss scaling, overflowing gradients are the optimizer's to skip.
    finite = _all_finite([losses] if self._scales_losses
                         else [fused, direction])
    self._update_weighting(weighting_gradients, per_task, batch, finite,
                           [fused, direction])
    head_grads = _unflatten(rest[:_size(heads)], heads)
    trunk_grads = _unflatten(direction + rest[_size(heads):], trunk)
    _apply_if(self._optimizer, trunk_grads + head_grads, trunk + heads,
              finite if self._skip_nonfinite else None)
    return losses, aggregators.conflict_share(matrix), finite

  def __call__(self, strategy: tf.distribute.Strategy,
               iterators: Sequence[tf.distribute.DistributedIterator],
               step: tf.Variable):
    """Runs one step on every replica (cross-replica context).

    Returns:
      (losses, trained, metrics, applied): [T] global-batch losses, a [T]
      0/1 mask of the tasks this step trained (all of them), a
      [len(metric_names)] vector of step metrics, and whether the update was
      applied (False: a loss or gradient was not finite, nothing changed).
    """
    batch = next(iterators[0])
    step = step.read_value()
    weights = self._weighting.weights(step)  # The weights this step uses.
    if self._sums:
      losses, applied = strategy.run(self.replica_step, args=(batch, step))
      metrics = weights
    else:
      replica_fn = (self.rep_grad_replica_step if self._rep_grad
                    else self.aggregated_replica_step)
      losses, share, applied = strategy.run(replica_fn, args=(batch, step))
      metrics = tf.concat([weights, tf.reshape(
          _first_local(strategy, share), [1])], axis=0)
    # Every replica holds the same all-reduced values.
    losses = _first_local(strategy, losses)
    applied = _first_local(strategy, applied)
    self._weighting.update(losses, applied)
    return losses, tf.ones([len(self._tasks)]), metrics, applied


def _compiled(function: Callable, jit_compile: bool) -> Callable:
  """`function` XLA-compiled (traced once per replica device), or as is.

  Only a replica's collective-free forward and backward pass is compiled:
  a jit around `strategy.run` fails under MirroredStrategy, and the
  all-reduce, the finite check and `apply_gradients` stay outside.
  """
  return tf.function(function, jit_compile=True) if jit_compile else function


def _first_local(strategy: tf.distribute.Strategy, value) -> tf.Tensor:
  """This worker's first replica's copy of a value equal on all replicas."""
  return strategy.experimental_local_results(value)[0]


def _last_shared_kernel(model: model_lib.SharedTrunkModel) -> tf.Variable:
  """The weights W of the trunk's last layer (its last variable of rank >= 2)."""
  kernels = [v for v in model.trunk.trainable_variables if v.shape.rank >= 2]
  if not kernels:
    raise ValueError("the trunk has no weight matrix for GradNorm's W")
  return kernels[-1]


def _size(variables: Sequence[tf.Variable]) -> int:
  return sum(int(v.shape.num_elements()) for v in variables)


def _flatten(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
  if not tensors:
    return tf.zeros([0])
  return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def _unflatten(flat: tf.Tensor,
               variables: Sequence[tf.Variable]) -> list[tf.Tensor]:
  pieces, offset = [], 0
  for variable in variables:
    size = int(variable.shape.num_elements())
    pieces.append(tf.reshape(flat[offset:offset + size], variable.shape))
    offset += size
  return pieces


class AlternateStep:
  """One update of the trunk and one task's head, the task picked in-graph.

  Only the trunk and the chosen head are handed to the chosen task's
  optimizer: other heads and other optimizers' slots stay bit-for-bit
  unchanged (with Adam even a zero gradient would move a variable).
  Compilation and loss scaling work as in `JointStep`, with the chosen
  task's optimizer.
  """

  def __init__(self, model: model_lib.SharedTrunkModel,
               tasks: Sequence[tasks_lib.TaskSpec],
               optimizers: Sequence[tf_keras.optimizers.Optimizer],
               global_batch_size: int, schedule: schedules.Schedule,
               skip_nonfinite: bool = True, jit_compile: bool = False):
    """Initialises the step.

    Args:
      model: The shared-trunk model.
      tasks: The tasks, in the order of `optimizers` and of the iterators.
      optimizers: The optimizer of each task (the same object repeated when
        tasks share one).
      global_batch_size: Examples per step over all replicas.
      schedule: Maps the step counter to a task index.
      skip_nonfinite: Leave everything unchanged in a step whose loss or
        gradients are not finite (else apply it anyway).
      jit_compile: XLA-compile each task's forward and backward pass.
    """
    self._model = model
    self._tasks = tuple(tasks)
    self._optimizers = tuple(optimizers)
    self._global_batch_size = global_batch_size
    self._schedule = schedule
    self._skip_nonfinite = skip_nonfinite
    self._pass = _compiled(self._backward, jit_compile)

  metric_names = ()

  def _backward(self, task_index: int, features: tf.Tensor,
                labels: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
    """This replica's forward and backward pass for task `task_index`.

    Returns:
      (gradients of the trunk and the task's head, the loss share).
    """
    task = self._tasks[task_index]
    variables = self._model.trunk_and_head_variables(task.name)
    with tf.GradientTape() as tape:
      outputs = self._model.call_task(features, task.name, training=True)
      loss = average_loss(
          task.per_example_loss(labels, outputs, check=False),
          self._global_batch_size)
      total = loss + _regularization(
          [self._model.trunk, self._model.heads[task.name]])
      total = precision.scaled(self._optimizers[task_index], total)
    gradients = tape.gradient(
        total, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return precision.unscaled(self._optimizers[task_index], gradients), loss

  def replica_step(self, task_index: int,
                   batch: Batch) -> tuple[tf.Tensor, tf.Tensor]:
    """Trains task `task_index` on one replica's batch.

    Returns:
      (the global-batch loss, whether the step was applied).
    """
    task = self._tasks[task_index]
    features, labels = batch
    labels = checked_labels([task], labels, partial_labels=False)
    gradients, loss = self._pass(task_index, features, labels[task.name])
    optimizer = self._optimizers[task_index]
    gradients, loss, finite = _reduce_and_check(
        gradients, loss, check_gradients=not precision.scales_losses(optimizer))
    _apply_if(optimizer, gradients,
              self._model.trunk_and_head_variables(task.name),
              finite if self._skip_nonfinite else None)
    return loss, finite

  def __call__(self, strategy: tf.distribute.Strategy,
               iterators: Sequence[tf.distribute.DistributedIterator],
               step: tf.Variable) -> tuple[tf.Tensor, tf.Tensor]:
    """Runs one step of the scheduled task on every replica.

    Returns:
      (losses, trained, metrics, applied): [T] vectors, zero except at the
      trained task, an empty metrics vector, and whether the update was
      applied (False: the loss or a gradient was not finite).
    """
    task_index = self._schedule.task_index(step)

    def branch(index: int):
      def run_task() -> tuple[tf.Tensor, tf.Tensor]:
        loss, applied = strategy.run(self.replica_step,
                                     args=(index, next(iterators[index])))
        return _first_local(strategy, loss), _first_local(strategy, applied)
      return run_task

    loss, applied = tf.switch_case(
        task_index, [branch(i) for i in range(len(self._tasks))])
    trained = tf.one_hot(task_index, len(self._tasks))
    # 0 * NaN is NaN: keep a non-finite loss at its task only.
    losses = tf.where(trained > 0, loss, 0.0)
    return losses, trained, tf.zeros([0]), applied


def eval_sums(model: model_lib.SharedTrunkModel,
              tasks: Sequence[tasks_lib.TaskSpec],
              batch: Batch) -> dict[str, tf.Tensor]:
  """Sums of per-example loss and metrics over one replica's batch.

  Only examples that carry a task's label count for that task.

  Returns:
    `{"<task>/loss": sum, "<task>/<metric>": sum, "<task>/count": labelled
    examples}`; sums rather than means, so that uneven or empty final
    batches on some replicas add up to exact means after the cross-replica
    sum.
  """
  features, labels = batch
  outputs = model(features, training=False, tasks=[t.name for t in tasks])
  sums = {}
  for task in tasks:
    mask = task.label_mask(labels)
    label, output = task.fill_missing(labels, mask), outputs[task.name]
    sums[f"{task.name}/loss"] = tf.reduce_sum(
        mask * task.per_example_loss(label, output))
    for metric, values in task.per_example_metrics(label, output).items():
      sums[f"{task.name}/{metric}"] = tf.reduce_sum(mask * values)
    sums[f"{task.name}/count"] = tf.reduce_sum(mask)
  return sums
