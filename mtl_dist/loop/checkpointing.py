"""Saving and restoring a run's checkpoints, on one worker or many.

Under MultiWorkerMirroredStrategy every worker must take part in a save (it
may run collectives), but only the chief's files are the run's: the other
workers save into a temporary directory of their own and delete it at once.

Checkpoints are found from their `ckpt-<step>.index` files rather than the
`checkpoint` state file, so a damaged state file hides none of them, and a
damaged newest checkpoint (a full disk, a partial copy) is skipped for the
one before it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Optional

from absl import logging
import tensorflow as tf


class Checkpointer:
  """Saves `checkpoint` as `directory/ckpt-<step>`, keeping the newest few.

  A non-chief worker saves into a fresh temporary directory that is deleted
  right after.

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
      chief: Whether this process writes the run's files.
    """
    self.directory = directory
    self._checkpoint = checkpoint
    self._step_counter = step_counter
    self._chief = chief
    self._max_to_keep = max_to_keep
    self._manager = None
    self.last_path: Optional[str] = None  # Restored or saved last.

  def checkpoints(self) -> list[str]:
    """The run's checkpoint prefixes, newest (highest step) first."""
    return list_checkpoints(self.directory)

  def newest_readable(self) -> tuple[Optional[str], list[tuple[str, str]]]:
    """The newest checkpoint whose every tensor reads back.

    Returns:
      (its prefix or None, [(newer unreadable prefix, what is wrong)]).
    """
    return newest_readable(self.directory)

  def _repair_state(self) -> None:
    """Rewrites a `checkpoint` state file that lost track of checkpoints.

    CheckpointManager deletes old checkpoints (--keep_checkpoints) by the
    list in that file; a damaged one would leave old checkpoints forever.
    """
    found = self.checkpoints()
    if not found:
      return
    try:
      state = tf.train.get_checkpoint_state(self.directory)
    except ValueError:  # Not UTF-8 (UnicodeDecodeError), or no newest path.
      state = None
    listed = list(state.all_model_checkpoint_paths) if state else []
    if {os.path.basename(p) for p in listed} >= {os.path.basename(p)
                                                 for p in found}:
      return
    logging.warning("Rewriting the checkpoint list in %s from its files.",
                    self.directory)
    # CheckpointManager only deletes checkpoints newer than the preserved
    # timestamp, so each one gets its file's time.
    times = [tf.io.gfile.stat(path + ".index").mtime_nsec / 1e9
             for path in found[::-1]]
    tf.compat.v1.train.update_checkpoint_state(
        self.directory, found[0], all_model_checkpoint_paths=found[::-1],
        all_model_checkpoint_timestamps=times,
        last_preserved_timestamp=min(times) - 1)

  def restore(self, path: str) -> None:
    """Restores `path`; every saved object must match one of this run's.

    Args:
      path: A checkpoint prefix.

    Raises:
      AssertionError, ValueError: If the checkpoint does not match.
    """
    self._checkpoint.restore(path).assert_consumed()
    self.last_path = path

  def save(self, step: int) -> None:
    """Saves the state at `step` (on every worker, together)."""
    if self._chief:
      if self._manager is None:  # Only now: a refused run changes nothing.
        self._repair_state()
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self.directory, max_to_keep=self._max_to_keep,
            step_counter=self._step_counter)
      path = self._manager.save(checkpoint_number=step)
      logging.info("Saved checkpoint %s.", path)
    else:  # A fresh scratch directory, gone whatever happens.
      scratch = tempfile.mkdtemp(prefix="mtl_dist_")
      try:
        tf.train.CheckpointManager(
            self._checkpoint, scratch, max_to_keep=1,
            step_counter=self._step_counter).save(checkpoint_number=step)
      finally:
        shutil.rmtree(scratch, ignore_errors=True)
      path = os.path.join(self.directory, f"ckpt-{step}")  # The chief's.
    self.last_path = path

  def saved(self, step: int) -> bool:
    """Whether the newest save or restore was at `step`."""
    return self.last_path is not None and step_of(self.last_path) == step


def list_checkpoints(directory: str) -> list[str]:
  """The checkpoint prefixes in `directory`, newest (highest step) first."""
  return [os.path.join(directory, f"ckpt-{step}")
          for step in sorted(_steps(directory, r"\.index"), reverse=True)]


def _steps(directory: str, suffix: str) -> set[int]:
  """The steps of the files `ckpt-<step><suffix>` (a regex) in `directory`."""
  steps = set()
  for path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*")):
    match = re.fullmatch(r"ckpt-(\d+)" + suffix, os.path.basename(path))
    if match:
      steps.add(int(match.group(1)))
  return steps


def newest_readable(directory: str
                   ) -> tuple[Optional[str], list[tuple[str, str]]]:
  """The newest checkpoint in `directory` whose every tensor reads back.

  Returns:
    (its prefix or None, [(newer unreadable prefix, what is wrong)]).
  """
  # Data files without their index, of a checkpoint the list names: its
  # .index was lost. (Unlisted ones are a save killed before it wrote the
  # index; that checkpoint never existed.)
  indexed = _steps(directory, r"\.index")
  listed = {step_of(name) for name in listed_in_state(directory)}
  steps = indexed | (_steps(directory, r"\.data-\d+-of-\d+") & listed)
  skipped = []
  for step in sorted(steps, reverse=True):
    path = os.path.join(directory, f"ckpt-{step}")
    problem = (unreadable(path) if step in indexed else
               "its .index file is missing")
    if problem is None:
      return path, skipped
    skipped.append((path, problem))
  return None, skipped


def listed_in_state(directory: str) -> list[str]:
  """The checkpoint names the `checkpoint` state file lists, oldest first.

  Read as bytes, so a file damaged past parsing (not UTF-8, cut short)
  still gives the names it holds.
  """
  path = os.path.join(directory, "checkpoint")
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path, "rb") as f:
    listed = re.findall(rb'all_model_checkpoint_paths: "([^"]*)"', f.read())
  return [os.path.basename(name.decode("utf-8", "replace"))
          for name in listed]


def step_of(path: str) -> Optional[int]:
  """The step of checkpoint prefix `.../ckpt-<step>`, or None."""
  suffix = path.rsplit("-", 1)[-1]
  return int(suffix) if suffix.isdigit() else None


def unreadable(path: str) -> Optional[str]:
  """What is wrong with checkpoint `path`, or None if all its tensors read."""
  try:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except (tf.errors.OpError, IndexError, ValueError, OSError) as e:
    message = str(getattr(e, "message", e)).strip().splitlines()
    return f"{type(e).__name__}: {message[0][:200] if message else ''}"
  return None

