"""A run's set-up: checks, strategy, data, model, trainer and restore.

`Run` builds and checks everything before a file is written; training uses
it whole, and the pieces the sidecar shares with it (`build_model`,
`eval_inputs`) are functions here.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
from typing import Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tf_keras

from mtl_dist import data as data_lib
from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.cluster import strategy as strategy_lib
from mtl_dist.loop import checkpointing
from mtl_dist.loop import run_lock
from mtl_dist.loop import trainer as trainer_lib
from mtl_dist.methods import optimizers as optimizers_lib
from mtl_dist.methods import schedules
from mtl_dist.model import architectures
from mtl_dist.model import base as model_base
from mtl_dist.model import spec as model_spec
from mtl_dist.run import config as config_lib
from mtl_dist.run import delta_m as delta_m_lib
from mtl_dist.run import saved_run

CHECKPOINT_SUBDIR = saved_run.CHECKPOINT_SUBDIR


def build_model(strategy: tf.distribute.Strategy, spec: model_spec.ModelSpec,
                functions: architectures.ModelFunctions
                ) -> model_base.MultiTaskModel:
  """The model `spec` describes, its variables made in the strategy's scope.

  Raises:
    ConfigError: For user pieces that do not fit the tasks or each other.
  """
  with strategy.scope():
    try:
      return spec.build(functions)
    except (ValueError, TypeError) as e:  # User pieces that do not fit.
      raise errors.ConfigError(str(e).splitlines()[0]) from None


def eval_inputs(strategy: tf.distribute.Strategy,
                data: data_lib.MultiTaskData, global_batch_size: int,
                eval_steps: int
                ) -> tuple[list[tf.distribute.DistributedDataset],
                           list[Sequence[str]]]:
  """(one distributed eval dataset per eval source, the tasks of each)."""
  datasets = [data_lib.distribute_eval(strategy, source, global_batch_size,
                                       eval_steps)
              for source in data.eval]
  return datasets, [source.task_names for source in data.eval]


class Run:
  """One run's objects, built and checked before anything is written."""

  def __init__(self, config: config_lib.TrainConfig,
               data: Optional[data_lib.MultiTaskData] = None,
               functions: architectures.ModelFunctions = (
                   architectures.ModelFunctions())):
    config.validate()
    self.config = config
    _check_user_functions(config, functions)
    cluster = config.cluster_config()
    if strategy_lib.uses_multi_worker(cluster.strategy, cluster.cluster):
      # Creating the strategy waits for every worker to join; one that never
      # starts would hang the others. TensorFlow waits holding the GIL, so
      # no Python thread or signal handler could end the wait:
      # faulthandler's C thread does (it prints the stacks, then exits 1).
      timeout = cluster.cluster_start_timeout
      logging.info("Waiting up to %.0f s for every worker to join "
                   "(--cluster_start_timeout).", timeout)
      faulthandler.dump_traceback_later(timeout, exit=True)
    try:
      self.strategy = strategy_lib.create_strategy(
          cluster.strategy, cluster.num_cpu_devices, cluster=cluster.cluster,
          collective=cluster.collective,
          collective_timeout=cluster.collective_timeout,
          port_base=cluster.port_base)
    finally:
      faulthandler.cancel_dump_traceback_later()
    self.chief = strategy_lib.is_chief(self.strategy)
    if not strategy_lib.is_multi_worker(self.strategy):
      config.check_single_process()
    # Before a checkpoint is read: another run may be writing them.
    self.lock, refusal = None, None
    if self.chief:
      try:
        self.lock = run_lock.acquire(config.model_dir)
        if checkpointing.list_checkpoints(
            saved_run.checkpoint_dir(config.model_dir)):
          saved_run.check_resumable(config.model_dir, config,
                                    custom_data=data is not None)
      except errors.ConfigError as e:
        refusal = e
        self.close()
      except BaseException:
        self.close()
        raise
    if strategy_lib.is_multi_worker(self.strategy):
      self._agree_on_refusal(refused=refusal is not None)
    if refusal is not None:
      raise refusal
    try:
      self._set_up(config, data, functions)
    except BaseException:
      self.close()
      raise

  def _agree_on_refusal(self, refused: bool) -> None:
    """Makes every worker stop (exit 2) when the chief refused the run.

    The chief refuses when it cannot take the model_dir's lock, or when the
    run there has other settings (`saved_run.check_resumable`).

    Otherwise the others would go on into the next collective and fail
    with a misleading cluster error once the chief is gone.
    """
    flag = tf.constant(1 if refused else 0, tf.int32)
    total = self.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                 self.strategy.run(lambda: flag), axis=None)
    if int(total.numpy()) and not refused:
      self.close()
      raise errors.ConfigError(
          f"--model_dir={self.config.model_dir}: the chief (worker 0) "
          "refused the run (its lock or its settings); its error line says "
          "why")

  def close(self) -> None:
    """Releases the model_dir (the chief's lock); a second call does nothing."""
    if self.lock is not None:
      self.lock.release()

  def _set_up(self, config: config_lib.TrainConfig,
              data: Optional[data_lib.MultiTaskData],
              functions: architectures.ModelFunctions) -> None:
    """Loads the data, builds the model and trainer, and restores."""
    replicas = self.strategy.num_replicas_in_sync
    if config.global_batch_size % replicas:
      raise errors.ConfigError(
          f"--global_batch_size={config.global_batch_size}: not divisible by "
          f"the {replicas} replicas")
    if data is None:
      self.data = data_lib.load(config.data_config())
    else:
      self.data = _user_data(data, config)
    if config.task_weights is not None and not any(
        task.weight > 0 for task in self.data.tasks):
      given = ",".join(f"{task}={weight:g}"
                       for task, weight in config.task_weights.items())
      raise errors.ConfigError(
          f"--task_weights={given}: every trained task weighs 0, so no step "
          "would train anything")
    data_lib.check_layout(self.data, config.mode)
    data_lib.check(self.data, self.data.partial_labels or config.partial_labels)
    self.model_spec = model_spec.ModelSpec(
        tasks=self.data.tasks, input_shape=tuple(self.data.input_shape),
        input_dtype=data_lib.input_dtype(self.data).name,
        trunk=model_spec.CUSTOM if functions.trunk_fn else config.trunk,
        trunk_width=config.trunk_width, trunk_depth=config.trunk_depth,
        mixed_precision=config.mixed_precision,
        custom_heads=functions.head_fn is not None,
        custom_data=data is not None,
        custom_losses=tuple(task.name for task in self.data.tasks
                            if task.loss_name == tasks_lib.CUSTOM_LOSS),
        architecture=config.architecture_config(),
        custom_pieces=tuple(name for name in functions.given()
                            if name not in ("trunk_fn", "head_fn")))
    self.functions = functions
    self.baselines = (delta_m_lib.read_baselines(config.baselines)
                      if config.baselines else None)
    if (config.mixed_precision == "float16" and self.chief and
        not tf.config.list_logical_devices("GPU")):
      logging.warning(
          "--mixed_precision=float16 on a CPU: CPUs compute float16 through "
          "slow fallbacks (measured: 0.68x float32 on an AMD EPYC; about "
          "100 examples/s against 8,200 with bfloat16 on an Intel Xeon with "
          "AVX512-FP16, docs/benchmarks.md). Use --mixed_precision=bfloat16 "
          "on a CPU.")
    tf_keras.utils.set_random_seed(config.seed)
    if config.deterministic:
      tf.config.experimental.enable_op_determinism()
    self.model = build_model(self.strategy, self.model_spec, functions)
    with self.strategy.scope():  # Schedules hold variables.
      schedule = (_make_schedule(config, self.data)
                  if config.mode == "alternate" else None)
    self.trainer = trainer_lib.Trainer(
        self.strategy, self.model, self.data.tasks, mode=config.mode,
        global_batch_size=config.global_batch_size,
        optimizer_factory=optimizers_lib.make_optimizer_factory(
            config.optimizer, config.learning_rate),
        per_task_optimizer=config.per_task_optimizers,
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
      signs = saved_run.signs_of_training(self.config.model_dir)
      if signs:  # Starting over would silently drop the run's work.
        raise errors.ConfigError(
            f"{where}: holds a run that saved checkpoints ({'; '.join(signs)})"
            f" but {self.checkpointer.directory} has none (no ckpt-*.index):"
            " restore them to resume, or give a new --model_dir to start "
            "from scratch")
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
          "written by a different model, optimizer or method set-up (check "
          "--weighting, --aggregator, --schedule and, for a run without a "
          "config.json or with your own data and pieces, the model): "
          f"{first_line}") from None
    saved = self.task_order.numpy().decode()
    if saved != self.task_names:
      raise errors.ConfigError(
          f"--tasks={self.task_names}: checkpoint {path} in {where} trained "
          f"the tasks {saved}, in that order")
    return path


def _user_data(data: data_lib.MultiTaskData,
               config: config_lib.TrainConfig) -> data_lib.MultiTaskData:
  """A run's own data, checked, with the configuration's task weights.

  Raises:
    ConfigError: For settings that do not fit the data, or a loss function
      that does not return one loss per example.
  """
  names = [task.name for task in data.tasks]
  _check_user_data(config, names)
  config.check_known(names)
  for task in data.tasks:
    try:
      task.check_loss()
    except errors.ConfigError:  # It says what the loss returned.
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise errors.ConfigError(
          f"task {task.name!r}: its loss function fails on a batch of 2 "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if config.task_weights is None:
    return data
  return dataclasses.replace(data, tasks=tuple(
      task.with_weight(config.task_weights.get(task.name, task.weight))
      for task in data.tasks))


def _make_schedule(config: config_lib.TrainConfig,
                   data: data_lib.MultiTaskData) -> schedules.Schedule:
  """The alternate-mode schedule, from the task datasets' sizes."""
  return schedules.for_task_datasets(
      config.schedule_config(),
      sizes=[source.num_examples for source in data.train],
      weights=[config.weight_of(task.name) for task in data.tasks],
      seed=config.seed, global_batch_size=config.global_batch_size,
      train_steps=config.train_steps)


def _check_user_data(config: config_lib.TrainConfig,
                   task_names: Sequence[str]) -> None:
  """Refuses built-in dataset settings for a run that brings its own data.

  Args:
    task_names: The tasks of the user's data, in order.

  Raises:
    ConfigError: Naming the first setting that does not apply.
  """
  defaults = config_lib.TrainConfig(model_dir=config.model_dir)
  for name in ("dataset", "task_datasets", "task_sizes", "label_fraction",
               "train_examples", "eval_examples", "data_dir", "input_key",
               "split", "eval_split", "download", "image_size", "channels"):
    if getattr(config, name) != getattr(defaults, name):
      raise errors.ConfigError(
          f"--{name}={getattr(config, name)}: describes a "
          "built-in dataset, but the run was given its own "
          "data")
  if config.tasks is not None and list(config.tasks) != list(task_names):
    raise errors.ConfigError(
        f"--tasks={','.join(config.tasks)}: the given data "
        f"trains {','.join(task_names)} (leave tasks unset)")

def _check_user_functions(config: config_lib.TrainConfig,
                          functions: architectures.ModelFunctions) -> None:
  """Refuses user functions the architecture does not use, and built-in
  trunk settings for a run whose trunk is the user's.

  Raises:
    ConfigError: Naming the first function or setting that does not apply.
  """
  try:
    architectures.check_functions(config.architecture_config().architecture,
                                  functions)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  made = [name for name in ("trunk_fn", "expert_fn", "column_fn")
          if name in functions.given()]
  if not made:
    return
  defaults = config_lib.TrainConfig(model_dir=config.model_dir)
  for name in ("trunk", "trunk_width", "trunk_depth", "mixed_precision"):
    if getattr(config, name) != getattr(defaults, name):
      raise errors.ConfigError(
          f"--{name}={getattr(config, name)}: describes the built-in trunk, "
          f"but the run was given its own ({made[0]})"
          + ("; give its layers a dtype policy instead"
             if name == "mixed_precision" else ""))
