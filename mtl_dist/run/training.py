"""The training run: the host loop, checkpoints, eval and outputs.

`train(config)` is what the `mtl-train` launcher runs. It sets the run up
(`setup.Run`: checks, strategy, data, model, trainer, restore) before it
writes anything, then alternates compiled train loops of up to
`steps_per_loop` steps with logging, evaluation and checkpointing at their
intervals.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from mtl_dist import data as data_lib
from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist import typecheck
from mtl_dist.cluster import strategy as strategy_lib
from mtl_dist.loop import preemption
from mtl_dist.loop import profiling
from mtl_dist.loop import run_files
from mtl_dist.loop import trainer as trainer_lib
from mtl_dist.model import architectures
from mtl_dist.model import hps as model_lib
from mtl_dist.run import config as config_lib
from mtl_dist.run import console
from mtl_dist.run import delta_m as delta_m_lib
from mtl_dist.run import export as export_lib
from mtl_dist.run import failures
from mtl_dist.run import saved_run
from mtl_dist.run import setup


@typecheck.checked
def train(config: config_lib.TrainConfig,
          data: Optional[data_lib.MultiTaskData] = None,
          trunk_fn: Optional[model_lib.TrunkFn] = None,
          head_fn: Optional[model_lib.HeadFn] = None, *,
          expert_fn: Optional[architectures.ExpertFn] = None,
          gate_fn: Optional[architectures.GateFn] = None,
          column_fn: Optional[architectures.ColumnFn] = None,
          verbose: bool = True) -> dict[str, Any]:
  """Trains, evaluates and checkpoints a multi-task model.

  Args:
    config: The run's configuration.
    data: The run's own data instead of the built-in dataset that
      `config.dataset` names: in joint mode one training source labelled
      for every task, in alternate mode one per task in task order (see
      `source_from_dataset`, `source_from_arrays`). The tasks come from
      `data.tasks`; `config.task_weights` replaces their weights when set.
    trunk_fn: Makes the shared trunk, called inside the strategy's scope:
      a Keras 3 (`keras`, `tf.keras`) or tf_keras layer or model, or a
      callable tf.Module (docs/api.md, "Which Keras"); default: the built-in
      trunk that `config.trunk` names.
    head_fn: Makes each task's head (tower) from its `TaskSpec`, also
      inside the scope, a piece like the trunk; default: a linear layer of
      `task.output_size` units.
    expert_fn: mmoe, cgc, ple, dselect_k: makes one expert (called once per
      expert); default: the built-in trunk.
    gate_fn: mmoe, cgc, ple: makes one gate's logits for n experts (a layer
      mapping the gate's input to [batch, n]); default: a linear layer of
      the flattened input. A softmax follows it.
    column_fn: cross_stitch: makes one task's column, a Sequential (either
      Keras) or a list of layers, with a cross-stitch unit after each
      layer; default: the built-in trunk's blocks.
    verbose: Show the run's progress as absl INFO lines: a line per
      `log_every` steps (losses, examples/s, ETA), a line per evaluation,
      and where the run resumed or ended, also in a program that did not
      parse absl's flags (docs/api.md, "Progress lines"). False: none;
      warnings and errors still show.

  Returns:
    The run summary, also written to `model_dir/summary.json`: `step`,
    `steps_this_run` (0 for a run that had finished already, whose
    summary.json is then kept as it was), `mode`, `replicas`, `task_steps`,
    `eval` (task to metric to value), `examples_per_second` and `chief`
    (whether this process wrote the run's files).

  Raises:
    ConfigError: For bad configuration or data, before anything is written.
    ClusterError: When another worker of a multi-worker run fails or a
      collective times out.
    NonFiniteError: On a NaN or Inf loss or gradient (--on_nonfinite=stop).
    DataError: When an in-graph data check fails while training.
    Preempted: When SIGTERM stopped the run after it saved a checkpoint.
  """
  functions = architectures.ModelFunctions(
      trunk_fn=trunk_fn, head_fn=head_fn, expert_fn=expert_fn,
      gate_fn=gate_fn, column_fn=column_fn)
  with console.progress_lines(verbose):
    return _set_up_and_train(config, data, functions)


def _set_up_and_train(config: config_lib.TrainConfig,
                      data: Optional[data_lib.MultiTaskData],
                      functions: architectures.ModelFunctions
                      ) -> dict[str, Any]:
  """Sets the run up and trains it; errors on a cluster as ClusterErrors."""
  if strategy_lib.uses_multi_worker(config.strategy, config.cluster):
    try:
      run = setup.Run(config, data, functions)
    except failures.CLUSTER_FAILURES as e:
      raise errors.ClusterError(
          f"the cluster failed while starting ({type(e).__name__}: "
          f"{failures.reason(e)}); run the same command on all workers "
          "again.") from e
  else:
    run = setup.Run(config, data, functions)
  try:
    return _train_on_cluster(run)
  finally:
    run.close()


def _train_on_cluster(run: setup.Run) -> dict[str, Any]:
  """`_train`, with a cluster's failures as ClusterErrors."""
  if not strategy_lib.is_multi_worker(run.strategy):
    return _train(run)
  try:
    return _train(run)
  except failures.CLUSTER_FAILURES as e:
    latest = run.checkpointer.last_path
    raise errors.ClusterError(
        f"worker {strategy_lib.worker_index(run.strategy)}: the cluster "
        f"failed near step {int(run.trainer.global_step.numpy())} "
        f"({type(e).__name__}: {failures.reason(e)}). Newest checkpoint: "
        f"{latest or 'none'}; run the same command on all workers to resume "
        "from it.") from e


def _train(run: setup.Run) -> dict[str, Any]:
  """Trains, evaluates and writes the outputs of a set-up run."""
  config = run.config
  trainer, strategy = run.trainer, run.strategy
  start_step = int(trainer.global_step.numpy())
  finished = start_step >= config.train_steps
  # Other workers of a cluster write no files of the run; a finished run
  # run again keeps the settings it was trained with.
  if run.chief and not finished:
    tf.io.gfile.makedirs(config.model_dir)
    run_files.write_json_atomic(
        os.path.join(config.model_dir, saved_run.CONFIG_FILE),
        dataclasses.asdict(config))
    saved_run.write_model_spec(config.model_dir, run.model_spec)
  if run.restored_from:
    logging.info("Resuming from %s at step %d.", run.restored_from, start_step)
  checkpointer = run.checkpointer
  writer = run_files.MetricsWriter(config.model_dir, config.train_steps,
                                   start_step, active=run.chief)
  task_names = [task.name for task in trainer.tasks]
  # Each pipeline starts where the restored run left it: a joint pipeline
  # has served one batch per step, a task's pipeline one per step of its task.
  consumed = ([start_step] if config.mode == "joint" else
              trainer.task_steps.numpy().tolist())
  train_iterators = [
      iter(data_lib.distribute_train(strategy, source,
                                     config.global_batch_size,
                                     config.seed + i, consumed[i],
                                     exact_resume=config.deterministic))
      for i, source in enumerate(run.data.train)]
  eval_datasets, eval_groups = setup.eval_inputs(
      strategy, run.data, config.global_batch_size, config.eval_steps)
  logging.info("Training %s mode on %d replica(s)%s: tasks %s, global batch "
               "%d.", config.mode, strategy.num_replicas_in_sync,
               _workers_text(strategy), ", ".join(task_names),
               config.global_batch_size)

  def save(at: int) -> None:
    if interval.steps:  # Record the steps a restart would not train again.
      _log_interval(interval, at, writer, trainer, run.data, config)
    if not checkpointer.saved(at):
      checkpointer.save(at)

  interval = _Interval(task_names)
  speed = _Speed()
  last_eval: dict[str, float] = {}
  step = start_step

  multi_worker = strategy_lib.is_multi_worker(strategy)

  def evaluate(at: int) -> dict[str, float]:
    """Evaluates at `at` and records it, unless an interrupted run did.

    In a multi-worker run every worker evaluates anyway (it runs
    collectives, and only the chief knows the records); only the record
    is left out.
    """
    recorded = writer.recorded(at, "eval")
    if recorded is not None and not multi_worker:
      metrics = recorded
    else:
      metrics = trainer.evaluate(eval_datasets, eval_groups)
      if recorded is None:
        writer.write(at, "eval", metrics)
    writer.evaluated(at, metrics)
    return metrics

  watcher = preemption.create(strategy, multi_worker)
  profiler = profiling.StepProfiler(
      run_files.tensorboard_dir(config.model_dir, "train"),
      config.profile_steps, active=run.chief)
  if finished:
    logging.info("The run in %s finished at step %d already; nothing to "
                 "train (raise --train_steps to train it further).",
                 config.model_dir, step)
  try:
    if 0 < step < config.train_steps and step % config.eval_every == 0:
      # The run that saved this checkpoint may have stopped before its
      # evaluation.
      last_eval = evaluate(step)
    while step < config.train_steps:
      num_steps = _steps_until_next_event(step, config)
      profiler.before_loop(step)
      started = time.perf_counter()
      result = trainer.train(train_iterators, num_steps)
      seconds = time.perf_counter() - started
      profiler.after_loop(step + num_steps)
      failures.check_skipped(result.skipped, config.on_nonfinite,
                             checkpointer.last_path)
      step += num_steps
      speed.add(seconds, num_steps)
      writer.warmed_up(step)
      interval.add(result, seconds, num_steps)
      if step % config.log_every == 0 or step == config.train_steps:
        _log_interval(interval, step, writer, trainer, run.data, config)
      if step % config.checkpoint_every == 0 and step < config.train_steps:
        save(step)
      # Before a (possibly long) eval: the grace period is running.
      if step < config.train_steps and watcher.should_stop(step, save):
        raise errors.Preempted(step, checkpointer.last_path)
      if step % config.eval_every == 0 and step < config.train_steps:
        last_eval = evaluate(step)
    save(step)
    last_eval = evaluate(step)
  except tf.errors.InvalidArgumentError as e:
    message = str(e.message)
    if tasks_lib.DATA_ERROR_MARK in message:
      what = "bad data"
    elif "IteratorGetNext" in message:  # The input pipeline itself failed.
      what = "the input pipeline failed"
    else:
      raise
    raise errors.DataError(
        f"{what} near step {int(trainer.global_step.numpy())}: "
        f"{failures.reason(e)}. Nothing was saved after "
        f"{checkpointer.last_path or 'the start'}.") from e
  finally:
    profiler.close()
    watcher.close()
    writer.close()
  summary = {
      "step": step,
      "steps_this_run": step - start_step,
      "mode": config.mode,
      "replicas": strategy.num_replicas_in_sync,
      "global_batch_size": config.global_batch_size,
      "task_steps": dict(zip(task_names,
                             trainer.task_steps.numpy().tolist())),
      "eval": {name: {key.split("/", 1)[1]: value
                      for key, value in last_eval.items()
                      if key.startswith(name + "/")}
               for name in task_names},
      "examples_per_second": (speed.steps_per_second() *
                              config.global_batch_size),
      "chief": run.chief,
      "nonfinite_skipped": int(trainer.nonfinite_skipped.numpy()),
  }
  if run.baselines:
    summary["delta_m"] = delta_m_lib.delta_m(summary["eval"], run.baselines)
    logging.info("Delta_m against the single-task baselines: %+.2f%%",
                 summary["delta_m"]["delta_m"])
  if run.chief:
    path = os.path.join(config.model_dir, "summary.json")
    stored = saved_run.read_json_or_none(path) if finished else None
    # A finished run run again keeps its summary, unless that is of an
    # earlier step (a run killed after its last checkpoint).
    if isinstance(stored, dict) and stored.get("step") == step:
      summary["examples_per_second"] = stored.get("examples_per_second", 0.0)
    else:
      run_files.write_json_atomic(path, summary)
      logging.info("Wrote %s", path)
    if config.export_dir:
      export_lib.export_run(config.model_dir, config.export_dir,
                            **run.functions.as_kwargs())
  return summary


class _Interval:
  """What the steps since the last train record add up to."""

  def __init__(self, task_names: list[str]):
    self.task_names = task_names
    self.reset()

  def reset(self) -> None:
    self.loss_sums = np.zeros(len(self.task_names))
    self.counts = np.zeros(len(self.task_names))
    self.seconds, self.steps, self.skipped = 0.0, 0, 0
    self.step_metric_sums: dict[str, float] = {}
    self.step_metric_counts: dict[str, int] = {}
    self.loss_scales: dict[str, float] = {}
    self.learning_rates: dict[str, float] = {}

  def add(self, result: trainer_lib.LoopResult, seconds: float,
          num_steps: int) -> None:
    """Adds a loop call's result; its loss scales and rates are the latest."""
    self.loss_sums += result.loss_sums
    self.counts += result.counts
    self.seconds += seconds
    self.steps += num_steps
    self.skipped += result.skipped.count
    for name, mean in result.step_metrics.items():
      steps = result.step_metric_counts[name]
      self.step_metric_sums[name] = (self.step_metric_sums.get(name, 0.0) +
                                     mean * steps)
      self.step_metric_counts[name] = (
          self.step_metric_counts.get(name, 0) + steps)
    self.loss_scales = result.loss_scales
    self.learning_rates = result.learning_rates

  def losses(self) -> dict[str, float]:
    """Each trained task's mean loss over its labelled examples."""
    return {name: self.loss_sums[i] / self.counts[i]
            for i, name in enumerate(self.task_names) if self.counts[i]}


class _Speed:
  """Steps per second, excluding the first (tracing) loop call if possible."""

  def __init__(self):
    self._calls = 0
    self._first = (0.0, 0)
    self._steady = (0.0, 0)

  def add(self, seconds: float, num_steps: int) -> None:
    self._calls += 1
    if self._calls == 1:
      self._first = (seconds, num_steps)
    else:
      self._steady = (self._steady[0] + seconds, self._steady[1] + num_steps)

  def steps_per_second(self) -> float:
    seconds, steps = self._steady if self._steady[1] else self._first
    return steps / seconds if steps else 0.0


def _log_interval(interval: _Interval, step: int,
                  writer: run_files.MetricsWriter, trainer: trainer_lib.Trainer,
                  data: data_lib.MultiTaskData,
                  config: config_lib.TrainConfig) -> None:
  """Writes and prints the interval's train record at `step`, then resets it."""
  losses = interval.losses()
  speed = interval.steps * config.global_batch_size / max(interval.seconds,
                                                          1e-9)
  metrics = {f"{name}/loss": value for name, value in losses.items()}
  metrics.update(_task_step_metrics(trainer, data, config.global_batch_size))
  metrics.update({f"{name}/share": interval.counts[i] / interval.steps
                  for i, name in enumerate(interval.task_names)})
  metrics.update({name: total / interval.step_metric_counts[name]
                  for name, total in interval.step_metric_sums.items()})
  metrics["nonfinite_skipped"] = interval.skipped
  metrics.update(interval.loss_scales)
  metrics.update(interval.learning_rates)
  metrics["examples_per_second"] = speed
  writer.write(step, "train", metrics)
  writer.progress(step, losses, speed)
  interval.reset()


def _workers_text(strategy: tf.distribute.Strategy) -> str:
  """' over N workers (this is worker I)' for multi-worker runs, else ''."""
  if not strategy_lib.is_multi_worker(strategy):
    return ""
  workers = (strategy.num_replicas_in_sync //
             len(strategy.extended.worker_devices))
  return (f" over {workers} workers (this is worker "
          f"{strategy_lib.worker_index(strategy)})")


def _steps_until_next_event(step: int, config: config_lib.TrainConfig) -> int:
  """Steps to the next log, checkpoint, eval, profile boundary or the end.

  At most a loop's (--steps_per_loop). A profile of steps A..B starts after
  step A-1 and stops after step B, so loop calls end there.
  """
  candidates = [config.steps_per_loop, config.train_steps - step]
  for every in (config.log_every, config.checkpoint_every, config.eval_every):
    candidates.append(every - step % every)
  candidates += [boundary - step
                 for boundary in profiling.boundaries(config.profile_steps)
                 if boundary > step]
  return min(candidates)


def _task_step_metrics(trainer: trainer_lib.Trainer,
                       data: data_lib.MultiTaskData,
                       global_batch_size: int) -> dict[str, float]:
  """Each task's update steps so far and the passes over its data they made."""
  counts = trainer.task_steps.numpy()
  metrics = {}
  for i, task in enumerate(trainer.tasks):
    source = data.train[i if len(data.train) > 1 else 0]
    metrics[f"{task.name}/steps"] = float(counts[i])
    metrics[f"{task.name}/epochs"] = (
        float(counts[i]) * global_batch_size / source.num_examples)
  return metrics
