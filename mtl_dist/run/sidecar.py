"""Evaluating a run's checkpoints, once or as a sidecar while it trains.

The sidecar is the evaluation pattern tf.distribute recommends for clusters:
a separate job polls `model_dir/checkpoints`, evaluates each new checkpoint
on every task's eval split and records the results, while training runs on
undisturbed. Results go to `model_dir/evaluations.jsonl` (one
`{"step", "checkpoint", "watch", "metrics"}` object per evaluation; `watch`
is true for a sidecar's, false for a one-shot evaluation's, and missing from
files written before it was added) and to the TensorBoard run
`model_dir/tensorboard/sidecar`; training's own files are never written, so
the two jobs cannot collide.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import tensorflow as tf

from mtl_dist import data as data_lib
from mtl_dist import errors
from mtl_dist import typecheck
from mtl_dist.cluster import strategy as strategy_lib
from mtl_dist.loop import checkpointing
from mtl_dist.loop import evaluator as evaluator_lib
from mtl_dist.loop import run_files
from mtl_dist.model import architectures
from mtl_dist.model import hps as model_lib
from mtl_dist.run import config as config_lib
from mtl_dist.run import saved_run
from mtl_dist.run import setup

EVALUATIONS_FILE = "evaluations.jsonl"
SIDECAR_RUN = "sidecar"


class EvalTimeout(RuntimeError):
  """No new checkpoint appeared within the sidecar's timeout (exit 1)."""


class CheckpointGone(Exception):
  """A checkpoint disappeared (--keep_checkpoints) while it was read."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One checkpoint's evaluation.

  Attributes:
    step: The checkpoint's training step.
    checkpoint: The checkpoint's prefix.
    metrics: `{"<task>/<metric>": value}`, losses included.
  """

  step: int
  checkpoint: str
  metrics: dict[str, float]

  def by_task(self) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}`, as in a run summary's `eval`."""
    result: dict[str, dict[str, float]] = {}
    for key, value in self.metrics.items():
      task, metric = key.split("/", 1)
      result.setdefault(task, {})[metric] = value
    return result


class _Sidecar:
  """The model, eval pipelines and compiled eval loop of one model_dir."""

  def __init__(self, model_dir: str, data: Optional[data_lib.MultiTaskData],
               functions: architectures.ModelFunctions,
               eval_steps: Optional[int], num_cpu_devices: int):
    config = saved_run.read_config(model_dir)
    spec = saved_run.read_model_spec(model_dir)
    if data is None:
      if spec.custom_data:
        raise errors.ConfigError(
            f"--model_dir={model_dir}: was trained on data given from "
            "Python; evaluate it from Python with the same data "
            "(mtl_dist.evaluate(..., data=...))")
      if spec.custom_losses:
        raise errors.ConfigError(
            f"--model_dir={model_dir}: task(s) {', '.join(spec.custom_losses)}"
            " were trained with a loss function; evaluate from Python with "
            "the same tasks (mtl_dist.evaluate(..., data=...))")
      # The eval split of the built-in dataset, as training loaded it.
      data = data_lib.load(config.data_config())
    data_lib.check_layout(data, config.mode)
    trained = [(t.name, t.output_size) for t in spec.tasks]
    if [(t.name, t.output_size) for t in data.tasks] != trained:
      raise errors.ConfigError(
          f"--model_dir={model_dir}: the data's tasks "
          f"{[(t.name, t.output_size) for t in data.tasks]} are not the "
          f"trained ones {trained} (name, output size)")
    # Its own devices: never the training cluster's (TF_CONFIG may be set).
    self.strategy = strategy_lib.create_strategy("mirrored", num_cpu_devices)
    if config.global_batch_size % self.strategy.num_replicas_in_sync:
      raise errors.ConfigError(
          f"--num_cpu_devices={num_cpu_devices}: the run's global batch "
          f"{config.global_batch_size} does not divide among "
          f"{self.strategy.num_replicas_in_sync} replicas")
    self.model = setup.build_model(self.strategy, spec, functions)
    self._evaluator = evaluator_lib.Evaluator(self.strategy, self.model,
                                              data.tasks)
    self._datasets, self._groups = setup.eval_inputs(
        self.strategy, data, config.global_batch_size,
        config.eval_steps if eval_steps is None else eval_steps)

  def evaluate(self, path: str) -> Evaluation:
    """Restores checkpoint `path` and evaluates it.

    Raises:
      CheckpointGone: If the checkpoint was deleted or cut short meanwhile.
    """
    try:
      saved_run.restore_model(self.model, path)
    except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:
      raise CheckpointGone(str(e.message).splitlines()[0][:200]) from None
    metrics = self._evaluator.evaluate(self._datasets, self._groups)
    return Evaluation(step=checkpointing.step_of(path) or 0, checkpoint=path,
                      metrics=metrics)


@typecheck.checked
def evaluate(model_dir: str, *, checkpoint: Optional[str] = None,
             watch: bool = False,
             data: Optional[data_lib.MultiTaskData] = None,
             trunk_fn: Optional[model_lib.TrunkFn] = None,
             head_fn: Optional[model_lib.HeadFn] = None,
             expert_fn: Optional[architectures.ExpertFn] = None,
             gate_fn: Optional[architectures.GateFn] = None,
             column_fn: Optional[architectures.ColumnFn] = None,
             eval_steps: Optional[int] = None, num_cpu_devices: int = 1,
             poll_seconds: float = 10.0, timeout: Optional[float] = 3600.0,
             on_result: Optional[Callable[[Evaluation], None]] = None
             ) -> list[Evaluation]:
  """Evaluates a run's checkpoint, or each new one while it trains.

  Args:
    model_dir: The run's `--model_dir`.
    checkpoint: Without `watch`: None for the newest readable checkpoint, a
      step, or a checkpoint prefix.
    watch: Wait for the run to start, then evaluate each checkpoint newer
      than the newest one evaluated (also by an earlier sidecar: see
      evaluations.jsonl) as training writes it, the newest one when several
      are new, until the one at the run's `train_steps` (read
      again from config.json each time, so a resumed run with more steps
      is followed) has been evaluated.
    data: The data of a run trained on data given from Python; default:
      the built-in dataset its config.json names.
    trunk_fn, head_fn, expert_fn, gate_fn, column_fn: The functions of a
      run whose pieces were made by them.
    eval_steps: Eval batches per task; default the run's `--eval_steps`
      (0: the whole split).
    num_cpu_devices: Logical CPU devices to evaluate on when there is no
      GPU.
    poll_seconds: With `watch`, seconds between looks for a checkpoint.
    timeout: With `watch`, seconds without a new checkpoint before giving
      up; None waits forever.
    on_result: Called with each evaluation as soon as it is recorded.

  Returns:
    The evaluations made, in order.

  Raises:
    ConfigError: For a model_dir, checkpoint or data that cannot be
      evaluated.
    EvalTimeout: When `watch` saw no new checkpoint for `timeout` seconds.
  """
  if watch and checkpoint is not None:
    raise errors.ConfigError(f"--checkpoint={checkpoint}: cannot be "
                             "combined with --watch")
  _check_numbers(eval_steps, num_cpu_devices, poll_seconds, timeout)
  if watch:  # A sidecar may start before the training job has begun.
    _wait_for(os.path.join(model_dir, saved_run.MODEL_FILE), poll_seconds,
              timeout)
  evaluator = _Sidecar(model_dir, data, architectures.ModelFunctions(
      trunk_fn=trunk_fn, head_fn=head_fn, expert_fn=expert_fn,
      gate_fn=gate_fn, column_fn=column_fn), eval_steps, num_cpu_devices)
  recorder = _Recorder(model_dir, watch)
  results = []

  def record(path: str) -> Evaluation:
    result = evaluator.evaluate(path)
    recorder.write(result)
    results.append(result)
    if on_result is not None:
      on_result(result)
    return result

  try:
    if not watch:
      path = saved_run.find_checkpoint(model_dir, checkpoint)
      try:
        record(path)
      except CheckpointGone as e:
        raise errors.ConfigError(f"checkpoint {path}: {e}") from None
      return results
    _watch(model_dir, record, recorder.recorded_steps(), poll_seconds,
           timeout)
    return results
  finally:
    recorder.close()


def _check_numbers(eval_steps: Optional[int], num_cpu_devices: int,
                   poll_seconds: float, timeout: Optional[float]) -> None:
  """Refuses counts and durations no evaluation can use.

  Raises:
    ConfigError: Naming the first bad one.
  """
  if eval_steps is not None and not 0 <= eval_steps <= config_lib.MAX_INT:
    raise errors.ConfigError(f"--eval_steps={eval_steps}: must be from 0 to "
                             f"{config_lib.MAX_INT}")
  limit = config_lib.MAX_CPU_DEVICES
  if not 1 <= num_cpu_devices <= limit:
    raise errors.ConfigError(f"--num_cpu_devices={num_cpu_devices}: must be "
                             f"from 1 to {limit}")
  for name, seconds in (("poll_seconds", poll_seconds),
                        ("timeout", timeout)):
    if seconds is not None and not 0 <= seconds <= config_lib.MAX_FLOAT:
      raise errors.ConfigError(f"--{name}={seconds}: must be from 0 to "
                               f"{config_lib.MAX_FLOAT:g} seconds")


def _wait_for(path: str, poll_seconds: float,
              timeout: Optional[float]) -> None:
  """Waits until `path` exists (training writes it when it starts)."""
  started = time.monotonic()
  while not tf.io.gfile.exists(path):
    if timeout is not None and time.monotonic() - started > timeout:
      raise EvalTimeout(f"{path} did not appear within {timeout:.0f} s: has "
                        "the training job started?")
    time.sleep(poll_seconds)


def _watch(model_dir: str, record: Callable[[str], Evaluation],
           done: set[int], poll_seconds: float,
           timeout: Optional[float]) -> None:
  """Evaluates new checkpoints until the final one is done."""
  directory = saved_run.checkpoint_dir(model_dir)
  last_new = time.monotonic()
  warned: set[str] = set()
  while True:
    train_steps = saved_run.read_config(model_dir).train_steps
    if any(step >= train_steps for step in done):
      logging.info("Step %d, the run's last, is evaluated; stopping.",
                   train_steps)
      return
    newest_done = max(done, default=-1)
    new = [path for path in checkpointing.list_checkpoints(directory)
           if checkpointing.step_of(path) > newest_done]
    for path in new:  # Newest first: a sidecar that fell behind catches up.
      try:
        result = record(path)
      except CheckpointGone as e:  # Deleted (--keep_checkpoints) or damaged.
        if path not in warned:
          logging.warning("Skipping checkpoint %s: %s", path, e)
          warned.add(path)
        continue
      done.add(result.step)
      logging.info("Evaluated step %d.", result.step)
      last_new = time.monotonic()
      break
    else:
      if timeout is not None and time.monotonic() - last_new > timeout:
        raise EvalTimeout(
            f"no new checkpoint in {directory} for {timeout:.0f} s (the run "
            f"has not reached step {train_steps}); evaluated steps: "
            f"{sorted(done) or 'none'}")
      time.sleep(poll_seconds)


class _Recorder:
  """Appends evaluations to evaluations.jsonl and the sidecar's TensorBoard."""

  def __init__(self, model_dir: str, watch: bool):
    self._path = os.path.join(model_dir, EVALUATIONS_FILE)
    self._watch = watch
    self._writer = tf.summary.create_file_writer(
        run_files.tensorboard_dir(model_dir, SIDECAR_RUN))

  def recorded_steps(self) -> set[int]:
    """The steps evaluations.jsonl already holds."""
    return {record["step"] for record in read_evaluations(self._path)}

  def write(self, result: Evaluation) -> None:
    run_files.append_json_line(self._path, {
        "step": result.step, "checkpoint": result.checkpoint,
        "watch": self._watch, "metrics": result.metrics})
    run_files.write_scalars(self._writer, result.step, result.metrics)

  def close(self) -> None:
    self._writer.close()


def read_evaluations(path: str) -> list[dict[str, Any]]:
  """The records of an evaluations.jsonl (none if it does not exist)."""
  return run_files.read_json_lines(path)
