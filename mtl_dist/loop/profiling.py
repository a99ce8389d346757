"""A TensorBoard profile of chosen training steps (--profile_steps=A,B).

The profiler starts before the loop call that runs step A and stops after
the one that ends with step B; the host loop ends its calls at steps A-1 and
B (see `boundaries`), so the profile holds exactly steps A..B (1-based,
inclusive). It is written where TensorBoard's Profile tab finds it, next to
the train scalars: `<model_dir>/tensorboard/train/plugins/profile/<time>/
<host>.xplane.pb`. In a multi-worker run only the chief profiles; the other
workers end their loop calls at the same steps.
"""

from __future__ import annotations

from typing import Optional, Sequence

from absl import logging
import tensorflow as tf


def boundaries(profile_steps: Optional[Sequence[int]]) -> tuple[int, ...]:
  """The steps after which a loop call must end: A-1 and B (none if None)."""
  if profile_steps is None:
    return ()
  first, last = profile_steps
  return (first - 1, last)


class StepProfiler:
  """Starts and stops `tf.profiler` around steps A..B of the host loop."""

  def __init__(self, logdir: str, profile_steps: Optional[Sequence[int]],
               active: bool = True):
    """Initialises the profiler (it does not start yet).

    Args:
      logdir: TensorBoard run directory the profile is written under.
      profile_steps: (A, B), 1-based and inclusive, or None for no profile.
      active: Whether this process profiles (False on non-chief workers).
    """
    self._logdir = logdir
    self._steps = tuple(profile_steps) if profile_steps else None
    self._active = active and self._steps is not None
    self._running = False

  def before_loop(self, step: int) -> None:
    """Starts profiling if the loop call after `step` steps runs step A.

    A run resumed between A and B profiles its steps up to B only.
    """
    if not self._active or self._running:
      return
    first, last = self._steps
    if not first - 1 <= step < last:
      return
    if step > first - 1:
      logging.warning("--profile_steps=%d,%d: resumed at step %d, so the "
                      "profile covers steps %d to %d only.", first, last,
                      step, step + 1, last)
    tf.profiler.experimental.start(self._logdir)
    self._running = True

  def after_loop(self, step: int) -> None:
    """Stops profiling and writes the profile once `step` steps reach B."""
    if self._running and step >= self._steps[1]:
      self.close()
      logging.info("Wrote the profile of steps %d to %d under %s.",
                   *self._steps, self._logdir)

  def close(self) -> None:
    """Stops a running profile (after an error, too) and writes it."""
    if self._running:
      self._running = False
      self._active = False
      tf.profiler.experimental.stop()
