"""The gradient-aggregator contract, and what every aggregator shares.

An aggregator maps the global task Jacobian of the shared variables, [T, P]
(row i: task i's gradient, summed over all replicas), to one [P] update
direction. Because its input is the same on every replica and it computes
deterministically (randomness drawn from `(seed, step)`), every replica
applies the same update and N replicas equal one device.

An aggregator declares what the step must compute for it (`needs`):
- `SUM`: one backward pass of the weighted loss sum (the Jacobian is never
  formed);
- `JACOBIAN`: every task's gradient of the shared variables.
One that declares `needs_losses` also gets the step's [T] global-batch task
losses (MoCo, DB-MTL). One that also has a Gram-matrix form (`has_gram_form`: its update is
sum_i a_i g_i with coefficients a that depend only on G G^T) can run from
task gradients at the shared representation instead (`--rep_grad`, the
MGDA-UB form), through `gram_coefficients`.

An aggregator that needs independent stochastic gradients (MoDo, SDMGrad:
products of gradients from different samples are unbiased estimates of
products of expected gradients) declares `sub_batches` K > 1. The step then
splits the global batch into K sub-batches, the same on any replica count
(example n of a replica's batch belongs to sub-batch n mod K; each
replica's batch is a contiguous slice of the global batch whose size K
divides, so this is the global index mod K), and passes a [K*T, P] matrix:
row k*T + i is task i's gradient on sub-batch k, each an estimate of the
full-batch gradient (of the sub-batch's mean loss: its examples' losses
summed, divided by global batch / K), summed over replicas. The tasks' own
variables still get the full-batch gradient, and the conflict share is
taken from the mean of the K estimates. Such an aggregator has no Gram form
and cannot run with `--jit_compile`.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import tensorflow as tf

from mtl_dist.methods import catalog
from mtl_dist.methods import state

SUM = "sum"
JACOBIAN = "jacobian"

# What an aggregator may promise (`Aggregator.promises`), each checked for
# every aggregator that declares it by tests/test_aggregator_properties.py:
# the update does not depend on the order of the tasks (rows) ...
ORDER_INVARIANT = "order-invariant"
# ... its inner product with every task gradient is >= 0 ...
NON_CONFLICTING = "non-conflicting"
# ... and scaling every gradient by c > 0 scales the update by c.
HOMOGENEOUS = "homogeneous"

FLOAT32_EPSILON = 2.0**-23
# |v| / max_i |g_i| below which a combination v of task gradients counts as 0
# (the residue of a solver, far below any gradient that trains).
VANISHING = 1e-8


class Aggregator(tf.Module):
  """Combines the tasks' gradients of the shared variables into one update.

  Subclasses set `name` (an entry of `catalog.AGGREGATORS`, and register
  with `registry.AGGREGATORS`, which sets their `summary` and `options`
  from the entry), declare `needs` (and `has_gram_form`, `needs_losses`,
  `sub_batches` as their entry does), and implement `__call__` (and
  `gram_coefficients` with a Gram form). State, if any, is `tf.Variable`s
  created in `__init__` (inside the strategy's scope), checkpointed with
  the run.
  """

  name: ClassVar[str]
  # Set by `registry.AGGREGATORS.register` from the catalogue entry.
  summary: ClassVar[str]
  needs: ClassVar[str] = JACOBIAN
  has_gram_form: ClassVar[bool] = False
  # Whether `__call__` needs the step's [T] global-batch losses (the
  # unweighted task losses; a Gram form never gets them).
  needs_losses: ClassVar[bool] = False
  # The properties it guarantees on every input (ORDER_INVARIANT, ...), for
  # a fresh state and one step; docs/methods.md lists them.
  promises: ClassVar[frozenset[str]] = frozenset()
  # K: how many independent sub-batch gradients of each task `__call__`
  # gets (a [K*T, P] matrix, row k*T + i: task i on sub-batch k); 1: the
  # full-batch [T, P] Jacobian.
  sub_batches: ClassVar[int] = 1
  options: ClassVar[tuple[catalog.Option, ...]] = ()  # Set likewise.

  def __init__(self, num_tasks: int, seed: int = 0):
    """Creates the aggregator.

    Args:
      num_tasks: T, the rows of the Jacobians it will get.
      seed: Seed of its random draws, made per step from `(seed, step)`.
    """
    super().__init__(name=f"{self.name}_aggregator")
    self.num_tasks = num_tasks
    self.seed = seed

  def step_seed(self, step: tf.Tensor) -> tf.Tensor:
    """The int64 [2] stateless seed `(seed, step)` of a step's draws."""
    return tf.stack([tf.constant(self.seed, tf.int64),
                     tf.cast(step, tf.int64)])

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    """The [P] update direction from the [T, P] global task Jacobian.

    A method with state updates it here, and only where `inputs_finite` of
    its inputs holds (a step the trainer skips must not move it).

    Args:
      jacobian: [T, P] task gradients, summed over replicas; with
        `sub_batches` K > 1, [K*T, P]: row k*T + i is task i's gradient
        on sub-batch k (see the module docstring).
      step: The int64 global step (0-based) of this update.
      losses: With `needs_losses`, the step's [T] global-batch task losses;
        else None.
    """
    raise NotImplementedError(f"{type(self).__name__} defines no update")

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    """The [T] coefficients a of update = sum_i a_i g_i, from G G^T alone.

    Only for aggregators with `has_gram_form`.
    """
    raise NotImplementedError(f"{self.name} has no Gram-matrix form")


class GramAggregator(Aggregator):
  """An aggregator whose update is sum_i a_i g_i, a from the Gram matrix."""

  has_gram_form = True

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del losses
    gram = tf.linalg.matmul(jacobian, jacobian, transpose_b=True)
    return tf.linalg.matvec(jacobian, self.gram_coefficients(gram, step),
                            transpose_a=True)


def conflict_share(jacobian: tf.Tensor) -> tf.Tensor:
  """The share of task pairs whose gradients conflict (negative cosine)."""
  return conflict_share_from_gram(
      tf.linalg.matmul(jacobian, jacobian, transpose_b=True))


def conflict_share_from_gram(gram: tf.Tensor) -> tf.Tensor:
  """`conflict_share` from the [T, T] Gram matrix of the gradients."""
  num_tasks = gram.shape[0]
  if num_tasks < 2:
    return tf.constant(0.0)
  upper = tf.linalg.band_part(tf.ones_like(gram), 0, -1) - tf.eye(num_tasks)
  conflicts = tf.cast(gram < 0, tf.float32) * upper
  return tf.reduce_sum(conflicts) / (num_tasks * (num_tasks - 1) / 2)


def task_norms(gram: tf.Tensor) -> tf.Tensor:
  """[T] |g_i| from the Gram matrix (rounding negatives count as 0)."""
  return tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))


# A method's state variables, and keeping them through a skipped step.
state_variable = state.state_variable
inputs_finite = state.inputs_finite
assign_if = state.assign_if
