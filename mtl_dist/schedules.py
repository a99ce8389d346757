"""Task schedules for alternate mode: which task a step trains.

A schedule maps the global step counter to a task index inside the graph, so
the choice is the same on every replica, needs no host round trip, and
continues correctly after a checkpoint restore.
"""

from __future__ import annotations

import tensorflow as tf


class RoundRobin:
  """Task `step mod T`: every run of T consecutive steps trains each task once."""

  def __init__(self, num_tasks: int):
    if num_tasks < 1:
      raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    self.num_tasks = num_tasks

  def task_index(self, step: tf.Tensor) -> tf.Tensor:
    """The task trained at `step` (an int64 scalar), as an int32 scalar."""
    return tf.cast(step % self.num_tasks, tf.int32)


def create(name: str, num_tasks: int) -> RoundRobin:
  """The schedule called `name` over `num_tasks` tasks."""
  if name == "round_robin":
    return RoundRobin(num_tasks)
  raise ValueError(f"unknown schedule {name!r} (known: round_robin)")
