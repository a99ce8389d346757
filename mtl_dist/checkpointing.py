"""Saving and restoring a run's checkpoints, on one worker or many.

Under MultiWorkerMirroredStrategy every worker must take part in a save (it
may run collectives), but only the chief's files are the run's: the other
workers save into a temporary directory of their own and delete it at once.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Optional

from absl import logging
import tensorflow as tf


class Checkpointer:
  """Saves `checkpoint` as `directory/ckpt-<step>`, keeping the newest few.

  Attributes:
    directory: Where the run's checkpoints live (written by the chief only).
  """

  def __init__(self, checkpoint: tf.train.Checkpoint, directory: str,
               max_to_keep: int, step_counter: tf.Variable, chief: bool):
    """Creates the checkpointer.

    Args:
      checkpoint: What to save and restore.
      directory: The run's checkpoint directory.
      max_to_keep: How many of the newest checkpoints the chief keeps.
      step_counter: The global step variable, recorded with each save.
      chief: Whether this process writes the run's files. Other workers
        write to a private temporary directory, deleted after each save.
    """
    self.directory = directory
    self._checkpoint = checkpoint
    self._scratch = None if chief else tempfile.mkdtemp(prefix="mtl_dist_")
    self._manager = tf.train.CheckpointManager(
        checkpoint, self._scratch or directory,
        max_to_keep=max_to_keep if chief else 1, step_counter=step_counter)
    self._last_saved_step: Optional[int] = None

  def latest(self) -> Optional[str]:
    """The newest checkpoint of the run, or None."""
    return tf.train.latest_checkpoint(self.directory)

  def restore(self, path: str) -> None:
    """Restores `path`; every saved object must match one of this run's.

    Args:
      path: A checkpoint prefix.

    Raises:
      AssertionError, ValueError: If the checkpoint does not match.
    """
    self._checkpoint.restore(path).assert_consumed()
    self._last_saved_step = _step_of(path)

  def save(self, step: int) -> None:
    """Saves the state at `step` (on every worker, together)."""
    path = self._manager.save(checkpoint_number=step)
    self._last_saved_step = step
    if self._scratch is not None:
      shutil.rmtree(self._scratch, ignore_errors=True)
    else:
      logging.info("Saved checkpoint %s.", path)

  def saved(self, step: int) -> bool:
    """Whether the newest save or restore was at `step`."""
    return self._last_saved_step == step

  def close(self) -> None:
    """Deletes a non-chief worker's temporary directory."""
    if self._scratch is not None:
      shutil.rmtree(self._scratch, ignore_errors=True)


def _step_of(path: str) -> Optional[int]:
  suffix = path.rsplit("-", 1)[-1]
  return int(suffix) if suffix.isdigit() else None
