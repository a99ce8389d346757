"""Run configuration: one dataclass that mirrors the launcher's flags.

Every check that does not need TensorFlow's devices lives here, so the launcher
and the Python API refuse the same bad input with the same message. Messages
name the flag (`--name=value: what is wrong`), because the launcher is the
main way runs are configured.

Neither this module nor anything it imports imports TensorFlow (the
methods come from their catalogue, each section from its layer's
`settings`), so a launcher checks its flags before TensorFlow starts
(tests/test_console.py holds it to that).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, TypeVar

from mtl_dist import errors
from mtl_dist import typecheck
from mtl_dist.cluster import settings as cluster_settings
from mtl_dist.data import settings as data_settings
from mtl_dist.methods import catalog
from mtl_dist.methods import settings as method_settings
from mtl_dist.model import settings as model_settings
from mtl_dist.run import export_dir

MODES = ("joint", "alternate")
SCHEDULES = method_settings.NAMES
OPTIMIZERS = ("adam", "sgd")
TRUNKS = ("mlp", "conv")
STRATEGIES = cluster_settings.STRATEGIES
CLUSTERS = cluster_settings.CLUSTERS
COLLECTIVES = cluster_settings.COLLECTIVES
ON_NONFINITE = ("stop", "skip")
MULTI_WORKER_FLAGS = cluster_settings.MULTI_WORKER_FLAGS
AGGREGATORS = catalog.AGGREGATORS.names()
WEIGHTINGS = catalog.WEIGHTINGS.names()
MIXED_PRECISION = model_settings.MIXED_PRECISION
ARCHITECTURES = model_settings.ARCHITECTURES

_Section = TypeVar("_Section")

# Counts and seeds are int32 in the graph.
MAX_INT = 2**31 - 1
# No float setting means anything beyond this magnitude (a weight, a rate, a
# coefficient, seconds: 11 days); 1e300 would only turn into NaN or an
# overflow later, blamed on something else. Method options share it.
MAX_FLOAT = catalog.MAX_OPTION
# Each logical CPU device runs a replica.
MAX_CPU_DEVICES = 256
# What each size may be at most, and why (the flags' docs list them).
_LIMITS = {
    "global_batch_size": 2**20,
    "train_examples": 2**22,
    "eval_examples": 2**22,
    "task_sizes": 2**22,
    "trunk_width": 2**16,
    "trunk_depth": model_settings.MAX_UNITS,
    "num_cpu_devices": MAX_CPU_DEVICES,
}
_GENERATED = "a generated dataset is held in memory, 4 KiB a shapes example"
_LIMIT_REASONS = {
    "global_batch_size": "a batch is held in memory whole",
    "train_examples": _GENERATED,
    "eval_examples": _GENERATED,
    "task_sizes": _GENERATED,
    "trunk_width": "a layer of width w holds w*w weights",
    "trunk_depth": "layers are built one at a time",
    "num_cpu_devices": "each logical device runs a replica",
}


def flag_text(value: Any) -> str:
  """A flag's value as it is typed: k=v,... for mappings."""
  if isinstance(value, Mapping):
    return ",".join(f"{k}={v}" for k, v in value.items())
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def method_option_flags() -> list[tuple[str, str, str, catalog.Option]]:
  """(flag, kind, method, option) of every catalogued method option."""
  return catalog.option_flags()


# One keyword-only field per method option, `<method>_<option>`, None when
# unset: a method's options come from its catalogue entry, not this file.
_MethodOptions = dataclasses.make_dataclass(
    "_MethodOptions",
    [(flag, Optional[type(option.default)], dataclasses.field(default=None))
     for flag, _, _, option in method_option_flags()],
    kw_only=True)


@dataclasses.dataclass
class TrainConfig(_MethodOptions):
  """Everything one training run needs; field names are the launcher's flags.

  Fields left at None are unset: they take the default of their layer's
  section (`data_config()`, `cluster_config()`, `schedule_config()`), so
  that a flag given where it has no meaning can be refused instead of
  silently ignored. Every default lives once: here, or in the section.
  Each catalogued method option is a keyword-only field too
  (`cagrad_c`, `dwa_window`, ...; None: the method's default).
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
  aggregator: str = catalog.AGGREGATORS.default
  # Gram-form aggregators: task gradients at the trunk output.
  rep_grad: bool = False
  # Joint mode: how task losses are weighted.
  weighting: str = catalog.WEIGHTINGS.default
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
  # The model: hps (one shared trunk), mmoe, cgc, ple, cross_stitch,
  # dselect_k or mtan; its options default in model/settings.py.
  architecture: str = "hps"
  num_experts: Optional[int] = None  # mmoe, dselect_k
  num_shared_experts: Optional[int] = None  # cgc, ple
  num_task_experts: Optional[int] = None  # cgc, ple
  num_levels: Optional[int] = None  # ple
  num_selected_experts: Optional[int] = None  # dselect_k
  dselect_k_gamma: Optional[float] = None
  dselect_k_entropy_reg: Optional[float] = None
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

  def _section(self, section: type[_Section]) -> _Section:
    """`section` from the fields of the same names; unset ones default."""
    return section(**{field.name: getattr(self, field.name)
                      for field in dataclasses.fields(section)
                      if getattr(self, field.name) is not None})

  def data_config(self) -> data_settings.DataConfig:
    """The data section, for `data.load`."""
    return self._section(data_settings.DataConfig)

  def cluster_config(self) -> cluster_settings.ClusterConfig:
    """The cluster section, for the strategy."""
    return self._section(cluster_settings.ClusterConfig)

  def architecture_config(self) -> model_settings.ArchitectureConfig:
    """The architecture section, for the model."""
    return self._section(model_settings.ArchitectureConfig)

  def schedule_config(self) -> method_settings.ScheduleConfig:
    """The schedule section, for the alternate-mode schedule."""
    return self._section(method_settings.ScheduleConfig)

  @property
  def per_task_optimizers(self) -> bool:
    """Whether each task has its own optimizer (alternate mode only)."""
    return self.mode == "alternate" and (self.per_task_optimizer is None or
                                         bool(self.per_task_optimizer))

  def check_single_process(self) -> None:
    """Refuses multi-worker flags for a run that turned out single-process.

    Raises:
      ConfigError: Naming the first such flag.
    """
    cluster_settings.refuse_multi_worker_flags(dataclasses.asdict(self))

  def validate(self) -> None:
    """Checks what can be checked without data or devices.

    `check_values`, then that --export_dir can be written.

    Raises:
      ConfigError: Naming the first bad flag and its value.
    """
    self.check_values()
    if self.export_dir is not None:
      export_dir.validate(self.export_dir, self.model_dir)

  def check_values(self) -> None:
    """Checks the fields' types, values and combinations; touches no file.

    Raises:
      ConfigError: Naming the first bad flag and its value.
    """
    typecheck.check_fields(self, "--{field}")
    self._check_magnitudes()
    if not self.model_dir:
      raise errors.ConfigError("--model_dir is required")
    errors.check_choice("mode", self.mode, MODES)
    errors.check_choice("optimizer", self.optimizer, OPTIMIZERS)
    errors.check_choice("trunk", self.trunk, TRUNKS)
    errors.check_choice("strategy", self.strategy, STRATEGIES)
    errors.check_choice("aggregator", self.aggregator, AGGREGATORS)
    errors.check_choice("weighting", self.weighting, WEIGHTINGS)
    errors.check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
    errors.check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
    if self.schedule is not None:
      errors.check_choice("schedule", self.schedule, SCHEDULES)
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
    given = dataclasses.asdict(self)
    self._validate_mode_flags(given)
    data_settings.validate_flags(given)
    model_settings.validate_flags(given)
    gram_forms = catalog.gram_forms()
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
    sub_batches = catalog.AGGREGATORS.get(self.aggregator).sub_batches
    if self.mode == "joint" and sub_batches > 1:
      if self.jit_compile:
        raise errors.ConfigError(
            f"--jit_compile cannot be combined with --aggregator="
            f"{self.aggregator}: its step's {sub_batches} sub-batch "
            "gradients per task are not supported compiled")
      if self.global_batch_size % sub_batches:
        raise errors.ConfigError(
            f"--global_batch_size={self.global_batch_size}: --aggregator="
            f"{self.aggregator} splits the batch into {sub_batches} "
            f"sub-batches, so it must be divisible by {sub_batches} (and by "
            f"{sub_batches} x the replicas)")
    if (self.jit_compile and self.mode == "joint" and
        catalog.WEIGHTINGS.get(self.weighting).needs_losses):
      raise errors.ConfigError(
          f"--jit_compile cannot be combined with --weighting="
          f"{self.weighting}: its weights need the step's global losses, "
          "all-reduced inside the forward pass, which one compiled function "
          "cannot hold")
    cluster_settings.validate_flags(given)
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
    if self.task_sizes is not None:
      for name, size in self.task_sizes.items():
        if size <= 0:
          raise errors.ConfigError(
              f"--task_sizes: size {size} for {name!r} must be "
              "positive")

  def _check_magnitudes(self) -> None:
    """Refuses non-finite floats, and numbers past what a run can hold.

    Past these limits a run would not stop with a message but overflow an
    int32, exhaust memory, or build a model forever (see docs/flags.md).
    """
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      items = (list(value.values()) if isinstance(value, Mapping) else
               list(value) if isinstance(value, (list, tuple)) else [value])
      for item in items:
        shown = f"--{field.name}={flag_text(value)}"
        if isinstance(item, float) and not abs(item) <= MAX_FLOAT:
          raise errors.ConfigError(f"{shown}: must be a finite number of "
                                   f"magnitude at most {MAX_FLOAT:g}")
        if (isinstance(item, int) and not isinstance(item, bool) and
            abs(item) > MAX_INT):
          raise errors.ConfigError(
              f"{shown}: must be at most {MAX_INT} in magnitude")
    for name in ("task_weights", "task_sizes", "label_fraction", "baselines",
                 "task_datasets"):
      if getattr(self, name) is not None and not getattr(self, name):
        raise errors.ConfigError(f"--{name}=: give at least one task=value")
    for name, limit in _LIMITS.items():
      value = getattr(self, name)
      values = (value.values() if isinstance(value, Mapping) else
                [] if value is None else [value])
      if any(isinstance(v, (int, float)) and v > limit for v in values):
        raise errors.ConfigError(f"--{name}={flag_text(value)}: at most "
                                 f"{flag_text(limit)} "
                                 f"({_LIMIT_REASONS[name]})")
    if not 0 <= self.seed <= MAX_INT:
      raise errors.ConfigError(f"--seed={self.seed}: must be from 0 to "
                               f"{MAX_INT}")

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

  def _validate_mode_flags(self, given: dict[str, Any]) -> None:
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
    method_settings.validate_flags(given)

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

  def method_options(self) -> dict[str, float]:
    """The given options of the methods, by flag (unset ones omitted)."""
    return {flag: getattr(self, flag)
            for flag, _, _, _ in method_option_flags()
            if getattr(self, flag) is not None}

  def weight_of(self, task: str) -> float:
    """The loss weight of a task in joint mode (1.0 unless given)."""
    return self.data_config().weight_of(task)
