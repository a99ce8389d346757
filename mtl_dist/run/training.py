"""The training driver: set-up, the host loop, checkpoints, eval and outputs.

`train(config)` is what the `mtl-train` launcher runs. It validates the
configuration before it writes anything, resumes from the newest checkpoint in
`model_dir/checkpoints`, then alternates compiled train loops of up to
`steps_per_loop` steps with logging, evaluation and checkpointing at their
intervals.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import time
from typing import Any, Optional

from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

from mtl_dist import data as data_lib
from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.cluster import strategy as strategy_lib
from mtl_dist.loop import checkpointing
from mtl_dist.loop import preemption
from mtl_dist.loop import profiling
from mtl_dist.loop import run_files
from mtl_dist.loop import trainer as trainer_lib
from mtl_dist.methods import optimizers as optimizers_lib
from mtl_dist.methods import schedules
from mtl_dist.model import hps as model_lib
from mtl_dist.run import config as config_lib
from mtl_dist.run import delta_m as delta_m_lib
from mtl_dist.run import export as export_lib
from mtl_dist.run import saved_run

CHECKPOINT_SUBDIR = saved_run.CHECKPOINT_SUBDIR


# What a collective raises when a peer dies (Unavailable), when it is not
# joined within --collective_timeout (DeadlineExceeded), or when the runtime
# aborts the collectives after either (Aborted, Cancelled).
_CLUSTER_FAILURES = (tf.errors.UnavailableError,
                     tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                     tf.errors.CancelledError)


class _Run:
  """One run's objects, built and checked before anything is written."""

  def __init__(self, config: config_lib.TrainConfig,
               data: Optional[data_lib.MultiTaskData] = None,
               trunk_fn: Optional[model_lib.TrunkFn] = None,
               head_fn: Optional[model_lib.HeadFn] = None):
    config.validate()
    self.config = config
    if trunk_fn is not None:
      config.check_user_trunk()
    if strategy_lib.uses_multi_worker(config.strategy, config.cluster):
      # Creating the strategy waits for every worker to join; one that never
      # starts would hang the others. TensorFlow waits holding the GIL, so
      # no Python thread or signal handler could end the wait:
      # faulthandler's C thread does (it prints the stacks, then exits 1).
      timeout = config.resolved_cluster_start_timeout
      logging.info("Waiting up to %.0f s for every worker to join "
                   "(--cluster_start_timeout).", timeout)
      faulthandler.dump_traceback_later(timeout, exit=True)
    try:
      self.strategy = strategy_lib.create_strategy(
          config.strategy, config.num_cpu_devices, cluster=config.cluster,
          collective=config.resolved_collective,
          collective_timeout=config.collective_timeout,
          port_base=config.port_base)
    finally:
      faulthandler.cancel_dump_traceback_later()
    self.chief = strategy_lib.is_chief(self.strategy)
    if not strategy_lib.is_multi_worker(self.strategy):
      config.check_single_process()
    replicas = self.strategy.num_replicas_in_sync
    if config.global_batch_size % replicas:
      raise errors.ConfigError(
          f"--global_batch_size={config.global_batch_size}: not divisible by "
          f"the {replicas} replicas")
    if data is None:
      self.data = data_lib.load(config)
    else:
      self.data = _user_data(data, config)
    data_lib.check_layout(self.data, config.mode)
    data_lib.check(self.data, self.data.partial_labels or config.partial_labels)
    self.model_spec = saved_run.ModelSpec(
        tasks=self.data.tasks, input_shape=tuple(self.data.input_shape),
        input_dtype=data_lib.input_dtype(self.data).name,
        trunk=saved_run.CUSTOM if trunk_fn else config.trunk,
        trunk_width=config.trunk_width, trunk_depth=config.trunk_depth,
        mixed_precision=config.mixed_precision,
        custom_heads=head_fn is not None, custom_data=data is not None,
        custom_losses=tuple(task.name for task in self.data.tasks
                            if task.loss_name == tasks_lib.CUSTOM_LOSS))
    self.trunk_fn, self.head_fn = trunk_fn, head_fn
    self.baselines = (delta_m_lib.read_baselines(config.baselines)
                      if config.baselines else None)
    tf_keras.utils.set_random_seed(config.seed)
    if config.deterministic:
      tf.config.experimental.enable_op_determinism()
    with self.strategy.scope():  # The model and schedules hold variables.
      try:
        self.model = self.model_spec.build(trunk_fn, head_fn)
      except ValueError as e:  # A user trunk or head that does not fit.
        raise errors.ConfigError(str(e)) from None
      schedule = (_make_schedule(config, self.data)
                  if config.mode == "alternate" else None)
    self.trainer = trainer_lib.Trainer(
        self.strategy, self.model, self.data.tasks, mode=config.mode,
        global_batch_size=config.global_batch_size,
        optimizer_factory=optimizers_lib.make_optimizer_factory(
            config.optimizer, config.learning_rate),
        per_task_optimizer=config.resolved_per_task_optimizer,
        schedule=schedule,
        partial_labels=self.data.partial_labels or config.partial_labels,
        aggregator=config.aggregator, rep_grad=config.rep_grad,
        weighting=config.weighting, method_options=config.method_options(),
        seed=config.seed,
        # --on_nonfinite=stop discards the state after a bad step anyway.
        skip_nonfinite=config.on_nonfinite == "skip",
        jit_compile=config.jit_compile)
    # The task order, saved with the run: counters, pipelines and seeds are
    # indexed by position, so a resume must train the same tasks in order.
    self.task_names = ",".join(task.name for task in self.data.tasks)
    with tf.device("/cpu:0"):
      self.task_order = tf.Variable(self.task_names, trainable=False,
                                    name="task_order")
    checkpoint = tf.train.Checkpoint(task_order=self.task_order,
                                     **self.trainer.checkpoint_items())
    self.checkpointer = checkpointing.Checkpointer(
        checkpoint, os.path.join(config.model_dir, CHECKPOINT_SUBDIR),
        max_to_keep=config.keep_checkpoints,
        step_counter=self.trainer.global_step, chief=self.chief)
    self.restored_from = self._restore()
    if self.restored_from:
      self._apply_learning_rate()
    if strategy_lib.is_multi_worker(self.strategy):
      self._check_workers_agree()

  def _check_workers_agree(self) -> None:
    """Fails unless every worker restored the same step.

    Each worker picks the newest readable checkpoint itself; storage that
    shows workers different files (a client cache, a copy per host) would
    otherwise start them from different states.
    """
    step = self.trainer.global_step
    steps = self.strategy.gather(self.strategy.run(
        lambda: tf.reshape(step.read_value(), [1])), axis=0).numpy()
    if len(set(steps.tolist())) > 1:
      raise errors.ClusterError(
          f"the workers restored different steps {sorted(set(steps))} from "
          f"{self.checkpointer.directory}: --model_dir must show every "
          "worker the same files")

  def _apply_learning_rate(self) -> None:
    """Makes --learning_rate win over the one restored with the optimizers."""
    for optimizer in {id(o): o for o in self.trainer.optimizers.values()
                      }.values():
      restored = float(optimizer.learning_rate.numpy())
      if not np.isclose(restored, self.config.learning_rate, rtol=1e-6):
        logging.info("--learning_rate=%g replaces the checkpoint's %g.",
                     self.config.learning_rate, restored)
        optimizer.learning_rate.assign(self.config.learning_rate)

  def _restore(self) -> Optional[str]:
    """Restores the newest readable checkpoint, if any.

    Raises:
      ConfigError: If the checkpoints belong to another model or task
        order, or none of them can be read.
    """
    path, skipped = self.checkpointer.newest_readable()
    where = f"--model_dir={self.config.model_dir}"
    if path is None:
      if skipped:
        raise errors.ConfigError(
            f"{where}: no checkpoint can be read (newest: {skipped[0][0]}: "
            f"{skipped[0][1]}); move them away to start from scratch")
      return None
    for bad, problem in skipped:
      logging.warning("Checkpoint %s cannot be read (%s); resuming from the "
                      "previous one, %s.", bad, problem, path)
    try:
      self.checkpointer.restore(path)
    except (AssertionError, ValueError) as e:
      first_line = str(e).strip().splitlines()[0][:300]
      raise errors.ConfigError(
          f"{where}: checkpoint {path} was "
          "written by a different model or optimizer set-up (check --mode, "
          "--tasks, --trunk*, --optimizer, --per_task_optimizer, "
          f"--mixed_precision): "
          f"{first_line}") from None
    saved = self.task_order.numpy().decode()
    if saved != self.task_names:
      raise errors.ConfigError(
          f"--tasks={self.task_names}: checkpoint {path} in {where} trained "
          f"the tasks {saved}, in that order")
    return path


def train(config: config_lib.TrainConfig,
          data: Optional[data_lib.MultiTaskData] = None,
          trunk_fn: Optional[model_lib.TrunkFn] = None,
          head_fn: Optional[model_lib.HeadFn] = None) -> dict[str, Any]:
  """Trains, evaluates and checkpoints a multi-task model.

  Args:
    config: The run's configuration.
    data: The run's own data instead of the built-in dataset that
      `config.dataset` names: in joint mode one training source labelled
      for every task, in alternate mode one per task in task order (see
      `source_from_dataset`, `source_from_arrays`). The tasks come from
      `data.tasks`; `config.task_weights` replaces their weights when set.
    trunk_fn: Makes the shared trunk (any tf_keras layer or model), called
      inside the strategy's scope; default: the built-in trunk that
      `config.trunk` names.
    head_fn: Makes each task's head from its `TaskSpec`, also inside the
      scope; default: a linear layer of `task.output_size` units.

  Returns:
    The run summary, also written to `model_dir/summary.json`: `step`,
    `mode`, `replicas`, `task_steps`, `eval` (task to metric to value) and
    `examples_per_second`.

  Raises:
    ConfigError: For bad configuration or data, before anything is written.
    ClusterError: When another worker of a multi-worker run fails or a
      collective times out.
    NonFiniteError: On a NaN or Inf loss or gradient (--on_nonfinite=stop).
    DataError: When an in-graph data check fails while training.
    Preempted: When SIGTERM stopped the run after it saved a checkpoint.
  """
  if strategy_lib.uses_multi_worker(config.strategy, config.cluster):
    try:
      run = _Run(config, data, trunk_fn, head_fn)
    except _CLUSTER_FAILURES as e:
      raise errors.ClusterError(f"the cluster failed while starting "
                         f"({type(e).__name__}: {_reason(e)}); run the same "
                         "command on all workers again.") from e
  else:
    run = _Run(config, data, trunk_fn, head_fn)
  if not strategy_lib.is_multi_worker(run.strategy):
    return _train(run)
  try:
    return _train(run)
  except _CLUSTER_FAILURES as e:
    latest = run.checkpointer.last_path
    raise errors.ClusterError(
        f"worker {strategy_lib.worker_index(run.strategy)}: the cluster "
        f"failed near step {int(run.trainer.global_step.numpy())} "
        f"({type(e).__name__}: {_reason(e)}). Newest checkpoint: "
        f"{latest or 'none'}; run the same command on all workers to resume "
        "from it.") from e


def _reason(error: tf.errors.OpError) -> str:
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
                                             "[["))]
  return (useful[0] if useful else "no detail")[:300]


def _train(run: _Run) -> dict[str, Any]:
  """Trains, evaluates and writes the outputs of a set-up run."""
  config = run.config
  trainer, strategy = run.trainer, run.strategy
  if run.chief:  # Other workers of a cluster write no files of the run.
    tf.io.gfile.makedirs(config.model_dir)
    run_files.write_json_atomic(
        os.path.join(config.model_dir, saved_run.CONFIG_FILE),
        dataclasses.asdict(config))
    saved_run.write_model_spec(config.model_dir, run.model_spec)
  start_step = int(trainer.global_step.numpy())
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
  eval_datasets = [
      data_lib.distribute_eval(strategy, source, config.global_batch_size,
                               config.eval_steps)
      for source in run.data.eval]
  eval_groups = [source.task_names for source in run.data.eval]
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
  watcher = preemption.create(strategy, strategy_lib.is_multi_worker(strategy))
  profiler = profiling.StepProfiler(
      run_files.tensorboard_dir(config.model_dir, "train"),
      config.profile_steps, active=run.chief)
  try:
    while step < config.train_steps:
      num_steps = _steps_until_next_event(step, config)
      profiler.before_loop(step)
      started = time.perf_counter()
      result = trainer.train(train_iterators, num_steps)
      seconds = time.perf_counter() - started
      profiler.after_loop(step + num_steps)
      _check_skipped(result.skipped, config, checkpointer.last_path)
      step += num_steps
      speed.add(seconds, num_steps)
      interval.add(result, seconds, num_steps)
      if step % config.log_every == 0 or step == config.train_steps:
        _log_interval(interval, step, writer, trainer, run.data, config)
      if step % config.checkpoint_every == 0 and step < config.train_steps:
        save(step)
      # Before a (possibly long) eval: the grace period is running.
      if step < config.train_steps and watcher.should_stop(step, save):
        raise errors.Preempted(step, checkpointer.last_path)
      if step % config.eval_every == 0 and step < config.train_steps:
        last_eval = trainer.evaluate(eval_datasets, eval_groups)
        writer.write(step, "eval", last_eval)
    save(step)
    last_eval = trainer.evaluate(eval_datasets, eval_groups)
    writer.write(step, "eval", last_eval)
  except tf.errors.InvalidArgumentError as e:
    if tasks_lib.DATA_ERROR_MARK not in str(e.message):
      raise
    raise errors.DataError(
        f"bad data near step {int(trainer.global_step.numpy())}: "
        f"{_reason(e)}. Nothing was saved after "
        f"{checkpointer.last_path or 'the start'}.") from e
  finally:
    profiler.close()
    watcher.close()
    writer.close()
  summary = {
      "step": step,
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
      "nonfinite_skipped": int(trainer.nonfinite_skipped.numpy()),
  }
  if run.baselines:
    summary["delta_m"] = delta_m_lib.delta_m(summary["eval"], run.baselines)
    logging.info("Delta_m against the single-task baselines: %+.2f%%",
                 summary["delta_m"]["delta_m"])
  if run.chief:
    path = os.path.join(config.model_dir, "summary.json")
    run_files.write_json_atomic(path, summary)
    logging.info("Wrote %s", path)
    if config.export_dir:
      export_lib.export_run(config.model_dir, config.export_dir,
                         trunk_fn=run.trunk_fn, head_fn=run.head_fn)
  return summary


def _user_data(data: data_lib.MultiTaskData,
               config: config_lib.TrainConfig) -> data_lib.MultiTaskData:
  """A run's own data, checked, with the configuration's task weights.

  Raises:
    ConfigError: For settings that do not fit the data, or a loss function
      that does not return one loss per example.
  """
  names = [task.name for task in data.tasks]
  config.check_user_data(names)
  config.check_known(names)
  for task in data.tasks:
    try:
      task.check_loss()
    except Exception as e:  # pylint: disable=broad-except
      raise errors.ConfigError(
          f"task {task.name!r}: its loss function fails on a batch of 2 "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if config.task_weights is None:
    return data
  return dataclasses.replace(data, tasks=tuple(
      task.with_weight(config.task_weights.get(task.name, task.weight))
      for task in data.tasks))


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
    applied = num_steps - result.skipped.count
    for name, mean in result.step_metrics.items():  # Means over applied steps.
      self.step_metric_sums[name] = (self.step_metric_sums.get(name, 0.0) +
                                     mean * applied)
    self.loss_scales = result.loss_scales
    self.learning_rates = result.learning_rates

  def losses(self) -> dict[str, float]:
    """Each trained task's mean loss over its labelled examples."""
    return {name: self.loss_sums[i] / self.counts[i]
            for i, name in enumerate(self.task_names) if self.counts[i]}


def _check_skipped(skipped: trainer_lib.SkippedSteps,
                   config: config_lib.TrainConfig,
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
  if config.on_nonfinite == "stop":
    raise errors.NonFiniteError(
        f"NaN or Inf {what} at step {skipped.first_step}; stopped without "
        f"saving, the newest checkpoint ({latest_checkpoint or 'none'}) is "
        "from before it. Check the data and --learning_rate, or pass "
        "--on_nonfinite=skip to skip such steps.")
  logging.warning("Skipped %d step(s) with a NaN or Inf loss or gradient; "
                  "the first, step %d: %s.", skipped.count,
                  skipped.first_step, what)


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
  applied = max(interval.steps - interval.skipped, 1)
  metrics.update({name: total / applied
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


def _make_schedule(config: config_lib.TrainConfig,
                   data: data_lib.MultiTaskData) -> schedules.Schedule:
  """The alternate-mode schedule, from the task datasets' sizes."""
  sizes = [source.num_examples for source in data.train]
  weights = [config.weight_of(task.name) for task in data.tasks]
  if config.resolved_schedule == "weights" and not sum(weights) > 0:
    raise errors.ConfigError("--task_weights: with --schedule=weights "
                                 "the shares must not all be zero")
  steps_per_epoch, num_epochs = schedules.default_epochs(
      sizes, config.global_batch_size, config.train_steps)
  if config.steps_per_epoch is not None:
    steps_per_epoch = config.steps_per_epoch
    num_epochs = max(1, -(-config.train_steps // steps_per_epoch))
  if config.anneal_epochs is not None:
    num_epochs = config.anneal_epochs
  return schedules.create(
      config.resolved_schedule, sizes=sizes, seed=config.seed,
      temperature=config.resolved_temperature,
      mixing_cap=config.resolved_mixing_cap, weights=weights,
      steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)


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
