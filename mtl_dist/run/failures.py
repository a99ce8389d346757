"""How a run's failures are told: one line naming what happened.

TensorFlow reports a dead worker, a timed-out collective or a failed
in-graph data check as an OpError with pages of context; `reason` finds the
line that says what happened, and `check_skipped` turns a non-finite step
into the run's verdict (stop or warn).
"""

from __future__ import annotations

from typing import Optional

from absl import logging
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.loop import trainer as trainer_lib

# What a collective raises when a peer dies (Unavailable), when it is not
# joined within --collective_timeout (DeadlineExceeded), or when the runtime
# aborts the collectives after either (Aborted, Cancelled).
CLUSTER_FAILURES = (tf.errors.UnavailableError,
                    tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                    tf.errors.CancelledError)


def reason(error: tf.errors.OpError) -> str:
  """The line of a collective's error that says what happened."""
  lines = [line.strip() for line in str(error.message).splitlines()]
  for line in lines:
    if tasks_lib.DATA_ERROR_MARK in line:  # "...[<mark> message] [data]..."
      message = line[line.index(tasks_lib.DATA_ERROR_MARK) +
                     len(tasks_lib.DATA_ERROR_MARK):].split("]")[0]
      return message.replace("\\'", "'").strip()[:300]
  for line in lines:
    if "aborted by" in line or "unhealthy" in line or "timed out" in line:
      return line[:300]
  useful = [line for line in lines
            if line and not line.startswith(("Graph execution error",
                                             "Detected at node", "File ",
                                             "[[", "<stack traces"))]
  return (useful[0] if useful else "no detail")[:300]


def check_skipped(skipped: trainer_lib.SkippedSteps, on_nonfinite: str,
                  latest_checkpoint: Optional[str]) -> None:
  """Stops on a skipped (non-finite) step, or warns about it.

  Raises:
    NonFiniteError: With --on_nonfinite=stop, naming the step and tasks.
  """
  if not skipped.count:
    return
  if skipped.nonfinite_losses:
    what = f"loss of task(s) {', '.join(skipped.nonfinite_losses)}"
  else:
    what = ("gradient (the losses were finite) while training task(s) "
            f"{', '.join(skipped.trained)}")
  if on_nonfinite == "stop":
    raise errors.NonFiniteError(
        f"NaN or Inf {what} at step {skipped.first_step}; stopped without "
        f"saving, the newest checkpoint ({latest_checkpoint or 'none'}) is "
        "from before it. Check the data and --learning_rate, or pass "
        "--on_nonfinite=skip to skip such steps.")
  logging.warning("Skipped %d step(s) with a NaN or Inf loss or gradient; "
                  "the first, step %d: %s.", skipped.count,
                  skipped.first_step, what)
