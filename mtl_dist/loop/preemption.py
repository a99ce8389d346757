"""Saving a checkpoint when the job is told to stop (SIGTERM).

Cluster schedulers send SIGTERM before they preempt or evict a job (SLURM
before preemption or, with `--signal`, before the time limit; Kubernetes
before it kills a pod). A `Watcher` turns that signal into a checkpoint at a
step boundary and a clean stop.

- One process: SIGTERM sets a flag, and the host loop saves and stops after
  the loop call (at most --steps_per_loop steps) that is running.
- Several workers: TensorFlow's `PreemptionCheckpointHandler` agrees on the
  step through the coordination service, so every worker saves at the same
  step (the save runs collectives), whichever of them got the signal. The
  agreed step is the end of the loop call after the one running when the
  signal arrived (at most 2 x --steps_per_loop steps later).
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from typing import Callable, Optional

from absl import logging
import tensorflow as tf

# The exit status of a run stopped by SIGTERM after saving its checkpoint:
# 128 + SIGTERM, what a shell reports for a process SIGTERM ended. Kubernetes
# restart policies treat it as retryable; the SLURM template requeues anyway.
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM

SaveFn = Callable[[int], None]


class Watcher:
  """Watches for SIGTERM; see `create`."""

  def should_stop(self, step: int, save: SaveFn) -> bool:
    """Saves and returns True if the job was told to stop.

    Call it between loop calls, with the same cadence on every worker.

    Args:
      step: The global step the state is at.
      save: Saves a checkpoint at a step (on every worker).

    Returns:
      True when a checkpoint was saved and training must stop.
    """
    raise NotImplementedError

  def close(self) -> None:
    """Stops watching."""


class _ProcessWatcher(Watcher):
  """One process: SIGTERM sets a flag that the host loop checks."""

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None
    if threading.current_thread() is not threading.main_thread():
      logging.warning("train() runs outside the main thread, where signal "
                      "handlers cannot be set: SIGTERM will not save a "
                      "checkpoint.")
      return
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled.set()

  def signalled(self) -> bool:
    """Whether SIGTERM has arrived."""
    return self._signalled.is_set()

  def should_stop(self, step: int, save: SaveFn) -> bool:
    if not self._signalled.is_set():
      return False
    logging.warning("SIGTERM received: saving a checkpoint at step %d and "
                    "stopping.", step)
    save(step)
    return True

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class _Stop(Exception):
  """Raised by the handler's exit function to unwind to the host loop."""


class _ClusterWatcher(Watcher):
  """Several workers: TensorFlow's PreemptionCheckpointHandler.

  The handler is given a CheckpointManager of an empty checkpoint in a
  scratch directory, so that it neither restores nor adds variables to the
  run's checkpoint (mtl_dist restores and checks that itself); its save
  function saves the run's checkpoint at the agreed step instead, and its
  exit function returns control to the host loop. SIGTERM reaches it through
  our own handler and `termination_watcher_fn`, with no grace period: left
  to itself, the handler polls GCE's maintenance events instead of SIGTERM
  on Google Cloud GPU machines (so a Kubernetes eviction would save
  nothing) and keeps training for an hour after a save there.
  """

  def __init__(self, strategy: tf.distribute.Strategy):
    self._strategy = strategy
    self._step: Optional[int] = None
    self._save: Optional[SaveFn] = None
    self._signals = _ProcessWatcher()
    self._scratch = tempfile.mkdtemp(prefix="mtl_dist_preemption_")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(), self._scratch,
                                         max_to_keep=1)
    self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, manager,
        termination_config=tf.distribute.experimental.TerminationConfig(
            termination_watcher_fn=self._signals.signalled,
            exit_fn=self._exit, save_fn=self._save_at_agreed_step,
            grace_period=0))

  def _save_at_agreed_step(self) -> None:
    logging.warning("Preemption: saving a checkpoint at step %d, agreed by "
                    "all workers, and stopping.", self._step)
    self._save(self._step)
    # No worker leaves before all have saved: a non-chief finishing first
    # must not get the chief stopped (srun --kill-on-bad-exit) mid-write.
    self._strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        self._strategy.run(lambda: tf.constant(1.0)), axis=None)

  def _exit(self) -> None:
    raise _Stop()

  def should_stop(self, step: int, save: SaveFn) -> bool:
    self._step, self._save = step, save
    try:
      self._handler.save_checkpoint_if_preempted()
    except _Stop:
      return True
    return False

  def close(self) -> None:
    self._signals.close()
    shutil.rmtree(self._scratch, ignore_errors=True)


def create(strategy: tf.distribute.Strategy, multi_worker: bool) -> Watcher:
  """A watcher for this process's kind of run.

  Args:
    strategy: The run's strategy.
    multi_worker: Whether the strategy spans several workers.

  Returns:
    The watcher; it handles SIGTERM until `close()`.
  """
  if multi_worker:
    return _ClusterWatcher(strategy)
  return _ProcessWatcher()
