"""Task schedules for alternate mode: which task a step trains.

A schedule maps the global step counter to a task index inside the graph, so
the choice is the same on every replica and worker, needs no host round trip,
and continues correctly after a checkpoint restore. Sampled schedules draw
`u = stateless_uniform(seed=(seed, step))` and pick the task whose interval of
the cumulative distribution holds `u`: a pure function of (seed, step).

Schedules (n_i: task i's dataset size):
  round_robin   task step mod T.
  proportional  P(i) = n_i / sum_j n_j.
  temperature   P(i) proportional to min(n_i, K)^(1/T) (T5/seqio mixing rate;
                K = mixing_cap, 0 for no cap).
  annealed      P(i) proportional to n_i^alpha, alpha = 1 - 0.8 (e - 1)/(E - 1)
                in epoch e = 1..E (Stickland & Murray 2019, epochs counted
                from 1, so alpha runs from exactly 1.0 down to 0.2).
  weights       P(i) proportional to the task's weight.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence

import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist.methods import settings

# The schedule section of the configuration lives where TensorFlow does not.
NAMES = settings.NAMES
ScheduleConfig = settings.ScheduleConfig
validate_flags = settings.validate_flags


class Schedule(Protocol):
  num_tasks: int

  def task_index(self, step: tf.Tensor) -> tf.Tensor:
    """The task trained at `step` (an int64 scalar), as an int32 scalar."""


class RoundRobin:
  """Task `step mod T`: every run of T consecutive steps trains each task once."""

  def __init__(self, num_tasks: int):
    if num_tasks < 1:
      raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    self.num_tasks = num_tasks

  def task_index(self, step: tf.Tensor) -> tf.Tensor:
    return tf.cast(step % self.num_tasks, tf.int32)


class Sampled:
  """Draws each step's task from fixed probabilities."""

  def __init__(self, probabilities: Sequence[float], seed: int):
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.ndim != 1 or not probabilities.size:
      raise ValueError("probabilities must be a non-empty vector")
    if (probabilities < 0).any() or not probabilities.sum() > 0:
      raise ValueError(f"probabilities must be >= 0 with a positive sum, got "
                       f"{probabilities.tolist()}")
    self.num_tasks = len(probabilities)
    self.base_probabilities = probabilities / probabilities.sum()
    self._seed = seed

  def probabilities(self, step: tf.Tensor) -> tf.Tensor:
    """The [T] task distribution at `step`."""
    del step
    return tf.constant(self.base_probabilities, tf.float32)

  def task_index(self, step: tf.Tensor) -> tf.Tensor:
    step = tf.cast(step, tf.int64)
    draw = tf.random.stateless_uniform(
        [1], seed=tf.stack([tf.constant(self._seed, tf.int64), step]))
    cumulative = tf.math.cumsum(self.probabilities(step))
    index = tf.searchsorted(cumulative, draw, side="right")[0]
    # Rounding can leave the last bound a hair below 1.
    return tf.minimum(tf.cast(index, tf.int32), self.num_tasks - 1)


class Annealed(Sampled, tf.Module):
  """P(i) proportional to n_i^alpha(epoch), alpha falling from 1.0 to 0.2.

  The annealing length (steps per epoch, epochs E) lives in variables that
  the trainer checkpoints: a run resumed with a larger --train_steps keeps
  the original annealing, so it makes the same choices as an uninterrupted
  run, and alpha stays at 0.2 past epoch E. Create it inside the strategy's
  scope.
  """

  def __init__(self, sizes: Sequence[int], seed: int, steps_per_epoch: int,
               num_epochs: int):
    tf.Module.__init__(self, name="annealed_schedule")
    Sampled.__init__(self, sizes, seed)
    if steps_per_epoch < 1 or num_epochs < 1:
      raise ValueError("steps_per_epoch and num_epochs must be positive")
    self._log_sizes = np.log(np.asarray(sizes, np.float64))
    self.steps_per_epoch = tf.Variable(steps_per_epoch, dtype=tf.int64,
                                       trainable=False, name="steps_per_epoch")
    self.num_epochs = tf.Variable(num_epochs, dtype=tf.int64, trainable=False,
                                  name="num_epochs")

  def alpha(self, step: tf.Tensor) -> tf.Tensor:
    """alpha = 1 - 0.8 (e - 1) / (E - 1) in epoch e = 1..E (1.0 if E = 1)."""
    epochs = self.num_epochs.read_value()
    epoch = tf.minimum(
        tf.cast(step, tf.int64) // self.steps_per_epoch.read_value() + 1,
        epochs)
    falling = 1.0 - 0.8 * tf.cast(epoch - 1, tf.float32) / tf.cast(
        tf.maximum(epochs - 1, 1), tf.float32)
    return tf.where(epochs > 1, falling, 1.0)

  def probabilities(self, step: tf.Tensor) -> tf.Tensor:
    return tf.nn.softmax(self.alpha(step) *
                         tf.constant(self._log_sizes, tf.float32))


def create(name: str, *, sizes: Sequence[int], seed: int = 0,
           temperature: float = 2.0, mixing_cap: int = 0,
           weights: Optional[Sequence[float]] = None,
           steps_per_epoch: int = 1, num_epochs: int = 1) -> Schedule:
  """The schedule called `name`.

  Args:
    name: One of `NAMES`.
    sizes: Each task's dataset size, in task order.
    seed: Seed of the sampled schedules' draws.
    temperature: T of the temperature schedule.
    mixing_cap: K of the temperature schedule; 0 for no cap.
    weights: Each task's share for the weights schedule.
    steps_per_epoch: Annealed schedule: steps in one epoch.
    num_epochs: Annealed schedule: epochs E over which alpha anneals.

  Returns:
    The schedule.
  """
  sizes = [int(n) for n in sizes]
  if name == "round_robin":
    return RoundRobin(len(sizes))
  if name == "proportional":
    return Sampled(sizes, seed)
  if name == "temperature":
    capped = [min(n, mixing_cap) if mixing_cap else n for n in sizes]
    return Sampled([n**(1.0 / temperature) for n in capped], seed)
  if name == "annealed":
    return Annealed(sizes, seed, steps_per_epoch, num_epochs)
  if name == "weights":
    return Sampled(weights if weights is not None else [1.0] * len(sizes),
                   seed)
  raise ValueError(f"unknown schedule {name!r} (known: {', '.join(NAMES)})")


def default_epochs(sizes: Sequence[int], global_batch_size: int,
                   train_steps: int) -> tuple[int, int]:
  """(steps_per_epoch, epochs): one epoch is one pass over every task's data."""
  steps_per_epoch = max(1, math.ceil(sum(sizes) / global_batch_size))
  return steps_per_epoch, max(1, math.ceil(train_steps / steps_per_epoch))


def for_task_datasets(config: ScheduleConfig, *, sizes: Sequence[int],
                      weights: Sequence[float], seed: int,
                      global_batch_size: int, train_steps: int) -> Schedule:
  """The alternate-mode schedule `config` names, for datasets of `sizes`.

  Args:
    config: The schedule section.
    sizes: Each task's dataset size, in task order.
    weights: Each task's share (--task_weights) for the weights schedule.
    seed: Seed of the sampled schedules' draws.
    global_batch_size: Examples per step, for the default epoch length.
    train_steps: The run's steps, for the default number of epochs.

  Raises:
    ConfigError: For the weights schedule with shares that are all zero.
  """
  if config.schedule == "weights" and not sum(weights) > 0:
    raise errors.ConfigError("--task_weights: with --schedule=weights "
                             "the shares must not all be zero")
  epoch_steps, num_epochs = default_epochs(sizes, global_batch_size,
                                           train_steps)
  if config.steps_per_epoch is not None:
    epoch_steps = config.steps_per_epoch
    num_epochs = max(1, -(-train_steps // epoch_steps))
  if config.anneal_epochs is not None:
    num_epochs = config.anneal_epochs
  return create(config.schedule, sizes=sizes, seed=seed,
                temperature=config.temperature, mixing_cap=config.mixing_cap,
                weights=weights, steps_per_epoch=epoch_steps,
                num_epochs=num_epochs)
