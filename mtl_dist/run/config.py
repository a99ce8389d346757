"""Run configuration: one dataclass that mirrors the launcher's flags.

Every check that does not need TensorFlow's devices lives here, so the launcher
and the Python API refuse the same bad input with the same message. Messages
name the flag (`--name=value: what is wrong`), because the launcher is the
main way runs are configured.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Optional, Sequence, TypeVar

import tensorflow as tf

from mtl_dist import errors
from mtl_dist.cluster import resolver
from mtl_dist.cluster import settings as cluster_settings
from mtl_dist.data import settings as data_settings
from mtl_dist.methods import registry
from mtl_dist.methods import schedules
from mtl_dist.model import precision

MODES = ("joint", "alternate")
SCHEDULES = schedules.NAMES
OPTIMIZERS = ("adam", "sgd")
TRUNKS = ("mlp", "conv")
STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker")
CLUSTERS = resolver.CLUSTERS
COLLECTIVES = ("auto", "ring", "nccl")
ON_NONFINITE = ("stop", "skip")
# Flags that configure MultiWorkerMirroredStrategy and mean nothing without it.
MULTI_WORKER_FLAGS = ("cluster", "collective", "collective_timeout",
                      "cluster_start_timeout", "port_base")
AGGREGATORS = registry.AGGREGATORS.names()
WEIGHTINGS = registry.WEIGHTINGS.names()
MIXED_PRECISION = precision.MODES

_V = TypeVar("_V")


def parse_key_values(text: str, flag: str,
                     parse_value: Callable[[str], _V]) -> dict[str, _V]:
  """Parses `a=1.0,b=0.5` into `{"a": 1.0, "b": 0.5}`.

  Args:
    text: The flag's value.
    flag: The flag's name, for error messages.
    parse_value: Converts one value; raises ValueError on bad input.

  Returns:
    The mapping, in the order given.

  Raises:
    ConfigError: On a malformed item, an empty key or a repeated key.
  """
  result: dict[str, _V] = {}
  for item in text.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise errors.ConfigError(
          f"--{flag}={text}: expected name=value items separated "
          f"by commas, got {item!r}")
    if key in result:
      raise errors.ConfigError(f"--{flag}={text}: {key!r} is given twice")
    try:
      result[key] = parse_value(value.strip())
    except ValueError:
      raise errors.ConfigError(
          f"--{flag}={text}: bad value {value.strip()!r} for "
          f"{key!r}") from None
  return result


@dataclasses.dataclass
class TrainConfig:
  """Everything one training run needs; field names are the launcher's flags.

  Fields left at None are unset: they take the default of their layer's
  section (`data_config()`, `cluster_config()`, `schedule_config()`,
  method options in `methods.registry`), so that a flag given where it has
  no meaning can be refused instead of silently ignored. Every default
  lives once: here, or in the section.
  """

  model_dir: str
  mode: str = "joint"
  dataset: str = "shapes"
  tasks: Optional[Sequence[str]] = None  # None: every task of the dataset.
  # Joint mode: loss weights. Alternate mode with --schedule=weights: shares.
  task_weights: Optional[Mapping[str, float]] = None
  schedule: Optional[str] = None  # alternate mode only; default round_robin.
  per_task_optimizer: Optional[bool] = None  # alternate only; default True.
  task_sizes: Optional[Mapping[str, int]] = None  # shapes, alternate only.
  temperature: Optional[float] = None  # schedule=temperature; default 2.0.
  mixing_cap: Optional[int] = None  # schedule=temperature; default 0 (none).
  steps_per_epoch: Optional[int] = None  # schedule=annealed.
  anneal_epochs: Optional[int] = None  # schedule=annealed.
  # shapes, joint mode: the fraction of training examples that keep each
  # listed task's label (the others get -1 or NaN, i.e. partial labels).
  label_fraction: Optional[Mapping[str, float]] = None
  # Joint mode: examples may lack labels (on for --label_fraction).
  partial_labels: bool = False
  # Task -> model_dir of its single-task run, for Delta_m in summary.json.
  baselines: Optional[Mapping[str, str]] = None
  # Joint mode: how task gradients combine.
  aggregator: str = registry.AGGREGATORS.default
  cagrad_c: Optional[float] = None  # aggregator=cagrad; default 0.5.
  rep_grad: bool = False  # aggregator=mgda|cagrad: gradients at the trunk output.
  # Joint mode: how task losses are weighted.
  weighting: str = registry.WEIGHTINGS.default
  dwa_window: Optional[int] = None  # weighting=dwa; default 100 steps.
  gradnorm_alpha: Optional[float] = None  # weighting=gradnorm; default 1.5.
  gradnorm_lr: Optional[float] = None  # weighting=gradnorm; default 0.025.
  train_examples: Optional[int] = None  # shapes, joint mode; default 16384.
  # TFDS datasets (--dataset=tfds:NAME, or --task_datasets in alternate mode).
  task_datasets: Optional[Mapping[str, str]] = None  # task -> tfds:NAME:LABEL
  data_dir: Optional[str] = None
  input_key: Optional[str] = None  # default "image"
  split: Optional[str] = None  # default "train"
  eval_split: Optional[str] = None  # default "test"
  download: bool = False
  image_size: Optional[Sequence[int]] = None  # (height, width)
  channels: Optional[int] = None  # 1 or 3
  eval_examples: Optional[int] = None  # shapes; default 2048.
  train_steps: int = 1000
  global_batch_size: int = 64
  steps_per_loop: int = 50
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  trunk: str = "mlp"
  trunk_width: int = 256
  trunk_depth: int = 2
  strategy: str = "auto"
  num_cpu_devices: int = 1
  # Multi-worker: the cluster's source (default: whichever the environment
  # sets), collective implementation (default auto: NCCL on GPUs, RING on
  # CPUs), collective timeout in seconds (default none: dead workers are
  # found by heartbeats), SLURM port base (default 8888, in cluster.py).
  cluster: Optional[str] = None
  collective: Optional[str] = None
  collective_timeout: Optional[float] = None
  cluster_start_timeout: Optional[float] = None  # default 900 s
  port_base: Optional[int] = None
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  eval_every: int = 500
  eval_steps: int = 0  # 0: the whole eval split.
  log_every: int = 100
  seed: int = 0
  # Deterministic ops, and streamed pipelines that resume exactly (by
  # re-reading what they had served) instead of in a new order.
  deterministic: bool = False
  # A step with a NaN or Inf loss or gradient: "stop" the run (exit 1, no
  # checkpoint of it) or "skip" the update on all replicas and count it.
  on_nonfinite: str = "stop"
  # XLA-compile each replica's forward and backward pass (not --rep_grad).
  jit_compile: bool = False
  # The trunk computes in bfloat16 or float16 (float32 variables and heads).
  mixed_precision: str = "none"
  # (A, B): a TensorBoard profile of steps A..B (1-based, inclusive).
  profile_steps: Optional[Sequence[int]] = None
  # At the end, a SavedModel with serving signatures is written here.
  export_dir: Optional[str] = None

  @property
  def uses_tfds(self) -> bool:
    return self.data_config().uses_tfds

  # The sections, each read by its own layer; unset (None) fields take the
  # section's defaults.

  def data_config(self) -> data_settings.DataConfig:
    """The data section, for `data.load`."""
    return data_settings.DataConfig.from_settings(**{
        field.name: getattr(self, field.name)
        for field in dataclasses.fields(data_settings.DataConfig)})

  def cluster_config(self) -> cluster_settings.ClusterConfig:
    """The cluster section, for the strategy."""
    return cluster_settings.ClusterConfig.from_settings(**{
        field.name: getattr(self, field.name)
        for field in dataclasses.fields(cluster_settings.ClusterConfig)})

  def schedule_config(self) -> schedules.ScheduleConfig:
    """The schedule section, for the alternate-mode schedule."""
    return schedules.ScheduleConfig.from_settings(**{
        field.name: getattr(self, field.name)
        for field in dataclasses.fields(schedules.ScheduleConfig)})

  @property
  def per_task_optimizers(self) -> bool:
    """Whether each task has its own optimizer (alternate mode only)."""
    return self.mode == "alternate" and self.per_task_optimizer is not False

  def check_single_process(self) -> None:
    """Refuses multi-worker flags for a run that turned out single-process.

    Raises:
      ConfigError: Naming the first such flag.
    """
    for name in MULTI_WORKER_FLAGS:
      if getattr(self, name) is not None:
        raise errors.ConfigError(
            f"--{name} applies to multi-worker runs, but --strategy="
            f"{self.strategy} runs in one process (no cluster in TF_CONFIG "
            "or SLURM, or --strategy=mirrored/one_device)")

  def validate(self) -> None:
    """Checks what can be checked without data or devices.

    Raises:
      ConfigError: Naming the first bad flag and its value.
    """
    if not self.model_dir:
      raise errors.ConfigError("--model_dir is required")
    _check_choice("mode", self.mode, MODES)
    _check_choice("optimizer", self.optimizer, OPTIMIZERS)
    _check_choice("trunk", self.trunk, TRUNKS)
    _check_choice("strategy", self.strategy, STRATEGIES)
    _check_choice("aggregator", self.aggregator, AGGREGATORS)
    _check_choice("weighting", self.weighting, WEIGHTINGS)
    _check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
    _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
    if self.schedule is not None:
      _check_choice("schedule", self.schedule, SCHEDULES)
    for name in ("train_steps", "global_batch_size", "steps_per_loop",
                 "trunk_width", "trunk_depth", "num_cpu_devices",
                 "checkpoint_every", "keep_checkpoints", "eval_every",
                 "log_every", "train_examples", "eval_examples"):
      value = getattr(self, name)
      if value is None and name in ("train_examples", "eval_examples"):
        continue
      if not isinstance(value, int) or value <= 0:
        raise errors.ConfigError(
            f"--{name}={value}: must be a positive integer")
    if not isinstance(self.eval_steps, int) or self.eval_steps < 0:
      raise errors.ConfigError(f"--eval_steps={self.eval_steps}: must be >= 0 "
                               "(0 evaluates the whole eval split)")
    if not self.learning_rate > 0:
      raise errors.ConfigError(
          f"--learning_rate={self.learning_rate}: must be positive")
    if self.tasks is not None:
      if not self.tasks:
        raise errors.ConfigError("--tasks=: name at least one task")
      repeated = sorted({t for t in self.tasks if list(self.tasks).count(t) > 1})
      if repeated:
        raise errors.ConfigError(f"--tasks={','.join(self.tasks)}: "
                                 f"{', '.join(repeated)} given twice")
    self._validate_mode_flags()
    self._validate_dataset_flags()
    gram_forms = [name for name in AGGREGATORS
                  if registry.AGGREGATORS.get(name).has_gram_form]
    if self.rep_grad and self.aggregator not in gram_forms:
      raise errors.ConfigError(
          f"--rep_grad is valid for --aggregator={' or '.join(gram_forms)} "
          "(their update combines task gradients with coefficients that "
          f"need only the Gram matrix), not --aggregator={self.aggregator}")
    if self.profile_steps is not None:
      self._validate_profile_steps()
    if self.jit_compile and self.rep_grad:
      raise errors.ConfigError(
          "--jit_compile cannot be combined with --rep_grad: its step "
          "all-reduces the Gram matrix between two backward passes, which "
          "one compiled function cannot hold")
    self._validate_multi_worker_flags()
    if self.strategy == "one_device" and self.num_cpu_devices > 1:
      raise errors.ConfigError(
          f"--num_cpu_devices={self.num_cpu_devices} makes replicas for a "
          "mirrored strategy, but --strategy=one_device is set")
    if self.task_weights is not None:
      for name, weight in self.task_weights.items():
        if not weight >= 0:
          raise errors.ConfigError(
              f"--task_weights: weight {weight} for {name!r} "
              "must be >= 0")
    if self.export_dir is not None:
      self._validate_export_dir()
    if self.task_sizes is not None:
      for name, size in self.task_sizes.items():
        if size <= 0:
          raise errors.ConfigError(
              f"--task_sizes: size {size} for {name!r} must be "
              "positive")

  def _validate_profile_steps(self) -> None:
    """Checks that --profile_steps is A,B with 1 <= A <= B <= --train_steps."""
    steps = list(self.profile_steps)
    text = ",".join(str(step) for step in steps)
    if len(steps) != 2 or not all(
        isinstance(step, int) and not isinstance(step, bool)
        for step in steps):
      raise errors.ConfigError(
          f"--profile_steps={text}: expected two step numbers "
          "A,B")
    first, last = steps
    if not 1 <= first <= last <= self.train_steps:
      raise errors.ConfigError(f"--profile_steps={text}: need 1 <= A <= B <= "
                               f"--train_steps={self.train_steps}")

  def _validate_multi_worker_flags(self) -> None:
    """Checks the multi-worker flags' values and that they can apply."""
    if self.strategy in ("mirrored", "one_device"):
      self.check_single_process()
    if self.cluster is not None:
      _check_choice("cluster", self.cluster, CLUSTERS)
    if self.collective is not None:
      _check_choice("collective", self.collective, COLLECTIVES)
    for name in ("collective_timeout", "cluster_start_timeout"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise errors.ConfigError(
            f"--{name}={value}: must be positive (seconds)")
    if self.port_base is not None:
      if not 1 <= self.port_base <= 65535 - 64:
        raise errors.ConfigError(
            f"--port_base={self.port_base}: must be a port "
            "number (1 to 65471)")
      if self.cluster == "tf_config":
        raise errors.ConfigError(
            "--port_base applies to --cluster=slurm (TF_CONFIG "
            "lists each worker's port), but --cluster=tf_config "
            "is set")

  def _validate_mode_flags(self) -> None:
    """Refuses flags that mean nothing in the chosen mode and schedule."""
    if self.mode == "joint":
      for name, fraction in (self.label_fraction or {}).items():
        if not 0.0 < fraction <= 1.0:
          raise errors.ConfigError(
              f"--label_fraction: {fraction} for {name!r} must "
              "be in (0, 1]")
      if self.weighting != "static" and self.task_weights is not None:
        raise errors.ConfigError(f"--task_weights sets static weights, but "
                                 f"--weighting={self.weighting} learns them")
      for flag, kind, method, option in method_option_flags():
        value = getattr(self, flag)
        if value is None:
          continue
        chosen = getattr(self, kind)
        if chosen != method:
          raise errors.ConfigError(f"--{flag} applies to --{kind}={method} "
                                   f"only, but --{kind}={chosen} is set")
        option.check(flag, value)
      for name in ("schedule", "per_task_optimizer", "task_sizes",
                   "temperature", "mixing_cap", "steps_per_epoch",
                   "anneal_epochs"):
        if getattr(self, name) is not None:
          raise errors.ConfigError(
              f"--{name} applies to --mode=alternate only, "
              "but --mode=joint is set")
      return
    if self.partial_labels:
      raise errors.ConfigError(
          "--partial_labels applies to --mode=joint only (in "
          "alternate mode each dataset is labelled for its "
          "task), but --mode=alternate is set")
    if self.label_fraction is not None:
      raise errors.ConfigError(
          "--label_fraction applies to --mode=joint only (in "
          "alternate mode each dataset is labelled for its "
          "task), but --mode=alternate is set")
    if self.train_examples is not None:
      raise errors.ConfigError(
          "--train_examples applies to --mode=joint on shapes "
          "only (alternate mode sizes its task datasets with "
          "--task_sizes)")
    if self.weighting != "static":
      raise errors.ConfigError(f"--weighting={self.weighting} applies to "
                               "--mode=joint only (an alternate step trains "
                               "one task's loss)")
    for flag, kind, method, _ in method_option_flags():
      if getattr(self, flag) is not None:
        raise errors.ConfigError(f"--{flag} applies to --mode=joint with "
                                 f"--{kind}={method} only")
    if self.aggregator != "sum":
      raise errors.ConfigError(
          f"--aggregator={self.aggregator} applies to "
          "--mode=joint only (an alternate step has one task)")
    schedule = self.schedule_config().schedule
    if self.task_weights is not None and schedule != "weights":
      raise errors.ConfigError(
          "--task_weights applies to --mode=joint (loss weights) or "
          f"--schedule=weights (task shares), but --schedule={schedule} is "
          "set in alternate mode")
    for name, needs in (("temperature", "temperature"),
                        ("mixing_cap", "temperature"),
                        ("steps_per_epoch", "annealed"),
                        ("anneal_epochs", "annealed")):
      if getattr(self, name) is not None and schedule != needs:
        raise errors.ConfigError(
            f"--{name} applies to --schedule={needs} only, but "
            f"--schedule={schedule} is set")
    if self.temperature is not None and not self.temperature > 0:
      raise errors.ConfigError(
          f"--temperature={self.temperature}: must be positive")
    if self.mixing_cap is not None and self.mixing_cap < 0:
      raise errors.ConfigError(
          f"--mixing_cap={self.mixing_cap}: must be >= 0 (0 "
          "means no cap)")
    for name in ("steps_per_epoch", "anneal_epochs"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise errors.ConfigError(f"--{name}={value}: must be positive")

  def _validate_dataset_flags(self) -> None:
    """Refuses flags of one kind of dataset given with the other."""
    if (self.dataset not in ("shapes", "toy_regression") and
        not self.dataset.startswith("tfds:")):
      raise errors.ConfigError(
          f"--dataset={self.dataset}: unknown dataset (known: "
          "shapes, toy_regression, tfds:NAME)")
    if self.dataset == "toy_regression":
      if self.mode != "joint":
        raise errors.ConfigError(
            "--dataset=toy_regression has one input for all "
            "tasks: use --mode=joint")
      for name in ("task_sizes", "label_fraction"):
        if getattr(self, name) is not None:
          raise errors.ConfigError(f"--{name} applies to --dataset=shapes only")
    if self.task_datasets is not None:
      if self.mode != "alternate":
        raise errors.ConfigError(
            "--task_datasets applies to --mode=alternate only "
            "(joint mode reads one --dataset=tfds:NAME)")
      if self.dataset != "shapes":
        raise errors.ConfigError(
            f"--dataset={self.dataset} and --task_datasets "
            "both name data: give one of them")
    if self.uses_tfds:
      for name in ("task_sizes", "label_fraction", "train_examples",
                   "eval_examples"):
        if getattr(self, name) is not None:
          raise errors.ConfigError(f"--{name} applies to --dataset=shapes only")
      if self.dataset.startswith("tfds:") and self.mode == "alternate":
        raise errors.ConfigError(
            f"--dataset={self.dataset} in alternate mode: give each task its "
            "own dataset with --task_datasets=task=tfds:NAME:LABEL,...")
    else:
      for name in ("data_dir", "input_key", "split", "eval_split",
                   "image_size", "channels"):
        if getattr(self, name) is not None:
          raise errors.ConfigError(f"--{name} applies to TFDS datasets only "
                                   "(--dataset=tfds:NAME or --task_datasets)")
      if self.download:
        raise errors.ConfigError("--download applies to TFDS datasets only")
    if self.channels is not None and self.channels not in (1, 3):
      raise errors.ConfigError(f"--channels={self.channels}: must be 1 or 3")
    if self.image_size is not None and (
        len(self.image_size) != 2 or min(self.image_size) < 1):
      raise errors.ConfigError(
          f"--image_size={','.join(map(str, self.image_size))}: must be "
          "HEIGHT,WIDTH, both positive")

  def check_known(self, tasks: Sequence[str]) -> None:
    """Checks that per-task flags name only trained tasks.

    Raises:
      ConfigError: For a task in --task_weights, --task_sizes or
        --label_fraction that is not trained.
    """
    for flag in ("task_weights", "task_sizes", "label_fraction", "baselines"):
      mapping = getattr(self, flag)
      for task in mapping or {}:
        if task not in tasks:
          raise errors.ConfigError(f"--{flag}: {task!r} is not a trained task "
                                   f"(--tasks={','.join(tasks)})")

  def check_user_data(self, task_names: Sequence[str]) -> None:
    """Refuses built-in dataset settings for a run that brings its own data.

    Args:
      task_names: The tasks of the user's data, in order.

    Raises:
      ConfigError: Naming the first setting that does not apply.
    """
    defaults = TrainConfig(model_dir=self.model_dir)
    for name in ("dataset", "task_datasets", "task_sizes", "label_fraction",
                 "train_examples", "eval_examples", "data_dir", "input_key",
                 "split", "eval_split", "download", "image_size", "channels"):
      if getattr(self, name) != getattr(defaults, name):
        raise errors.ConfigError(
            f"--{name}={getattr(self, name)}: describes a "
            "built-in dataset, but the run was given its own "
            "data")
    if self.tasks is not None and list(self.tasks) != list(task_names):
      raise errors.ConfigError(
          f"--tasks={','.join(self.tasks)}: the given data "
          f"trains {','.join(task_names)} (leave tasks unset)")

  def _validate_export_dir(self) -> None:
    """Refuses an export directory whose replacement would hit the run."""
    export = os.path.abspath(self.export_dir)
    model = os.path.abspath(self.model_dir)
    inside = lambda path, parent: (path + os.sep).startswith(parent + os.sep)
    if inside(model, export) or inside(export, os.path.join(model,
                                                            "checkpoints")):
      raise errors.ConfigError(
          f"--export_dir={self.export_dir}: an export replaces "
          "its directory, which would delete the run's files "
          f"in --model_dir={self.model_dir}; give another one")
    check_export_dir(self.export_dir)

  def check_user_trunk(self) -> None:
    """Refuses built-in trunk settings for a run that brings its own trunk.

    Raises:
      ConfigError: Naming the first setting that does not apply.
    """
    defaults = TrainConfig(model_dir=self.model_dir)
    for name in ("trunk", "trunk_width", "trunk_depth", "mixed_precision"):
      if getattr(self, name) != getattr(defaults, name):
        raise errors.ConfigError(
            f"--{name}={getattr(self, name)}: describes the built-in trunk, "
            "but the run was given its own (trunk_fn)"
            + ("; give its layers a dtype policy instead"
               if name == "mixed_precision" else ""))

  def method_options(self) -> dict[str, float]:
    """The given options of the methods, by flag (unset ones omitted)."""
    return {flag: getattr(self, flag)
            for flag, _, _, _ in method_option_flags()
            if getattr(self, flag) is not None}

  def weight_of(self, task: str) -> float:
    """The loss weight of a task in joint mode (1.0 unless given)."""
    return self.data_config().weight_of(task)


def check_export_dir(export_dir: str) -> None:
  """Refuses an export directory that holds something else than an export.

  An existing SavedModel is replaced; any other non-empty directory is kept
  from being overwritten.

  Raises:
    ConfigError: For a file, or a non-empty directory without a SavedModel.
  """
  if not tf.io.gfile.exists(export_dir):
    return
  if not tf.io.gfile.isdir(export_dir):
    raise errors.ConfigError(f"--export_dir={export_dir}: is a file")
  contents = tf.io.gfile.listdir(export_dir)
  if contents and "saved_model.pb" not in contents:
    raise errors.ConfigError(
        f"--export_dir={export_dir}: a non-empty directory "
        "that holds no SavedModel; give a new or empty one")


def method_option_flags() -> list[tuple[str, str, str, registry.Option]]:
  """(flag, kind, method, option) of every registered method option."""
  return [(flag, methods.kind, method, option)
          for methods in (registry.WEIGHTINGS, registry.AGGREGATORS)
          for flag, method, option in methods.options()]


def _check_choice(flag: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise errors.ConfigError(
        f"--{flag}={value}: must be one of {', '.join(choices)}")
