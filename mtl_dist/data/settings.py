"""The data section of a run's configuration: what `registry.load` reads.

Its defaults are the run's: a `TrainConfig` field left unset (None) takes
the value here. Messages name the launcher's flags, `--<field>`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

from mtl_dist import errors

TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data a run reads and how much of it.

  Attributes:
    dataset: `shapes`, `toy_regression` or `tfds:NAME`.
    mode: "joint" (one source for every task) or "alternate" (one per task).
    seed: Seed of generated data and of the label subsets.
    tasks: The tasks to train (None: every task of the dataset).
    task_weights: Task to loss weight (joint) or share (alternate); 1 if
      unlisted.
    task_sizes: shapes, alternate mode: examples per task dataset.
    label_fraction: shapes, joint mode: the fraction of training examples
      that keep each listed task's label.
    train_examples: shapes and toy_regression, joint mode: training
      examples.
    eval_examples: shapes and toy_regression: held-out eval examples.
    task_datasets: Alternate mode: task to `tfds:NAME:LABEL`.
    data_dir: TFDS data directory (None: TFDS's own).
    input_key: TFDS: the input feature.
    split: TFDS: the training split.
    eval_split: TFDS: the eval split.
    download: TFDS: download and prepare a dataset that is not prepared.
    image_size: TFDS: resize images to (height, width).
    channels: TFDS: convert images to 1 or 3 channels.
    baselines: Task to the model_dir of its single-task run (Δm). Not
      data, but a per-task setting: checked against the trained tasks with
      the others, before any data is read.
  """

  dataset: str = "shapes"
  mode: str = "joint"
  seed: int = 0
  tasks: Optional[Sequence[str]] = None
  task_weights: Optional[Mapping[str, float]] = None
  task_sizes: Optional[Mapping[str, int]] = None
  label_fraction: Optional[Mapping[str, float]] = None
  train_examples: int = 16384
  eval_examples: int = 2048
  task_datasets: Optional[Mapping[str, str]] = None
  data_dir: Optional[str] = None
  input_key: str = "image"
  split: str = "train"
  eval_split: str = "test"
  download: bool = False
  image_size: Optional[Sequence[int]] = None
  channels: Optional[int] = None
  baselines: Optional[Mapping[str, str]] = None


  @property
  def uses_tfds(self) -> bool:
    return (self.dataset.startswith(TFDS_PREFIX) or
            self.task_datasets is not None)

  def weight_of(self, task: str) -> float:
    """A task's loss weight (joint) or share (alternate), 1.0 unless given."""
    return float((self.task_weights or {}).get(task, 1.0))

  def check_known(self, tasks: Sequence[str]) -> None:
    """Checks that the per-task settings name only trained tasks.

    Raises:
      ConfigError: For a task in --task_weights, --task_sizes,
        --label_fraction or --baselines that is not trained.
    """
    for flag in ("task_weights", "task_sizes", "label_fraction", "baselines"):
      for task in getattr(self, flag) or {}:
        if task not in tasks:
          raise errors.ConfigError(f"--{flag}: {task!r} is not a trained "
                                   f"task (--tasks={','.join(tasks)})")

  def validate_tasks(self, known_tasks: Sequence[str]) -> list[str]:
    """The tasks to train, in order, checked against a dataset's tasks.

    Raises:
      ConfigError: For an unknown task in --tasks, --task_weights,
        --task_sizes, --label_fraction or --baselines.
    """
    tasks = list(self.tasks) if self.tasks is not None else list(known_tasks)
    for task in tasks:
      if task not in known_tasks:
        raise errors.ConfigError(
            f"--tasks={','.join(tasks)}: unknown task {task!r} for "
            f"--dataset={self.dataset} (known: {', '.join(known_tasks)})")
    self.check_known(tasks)
    return tasks


def validate_flags(given: Mapping[str, Any]) -> None:
  """Refuses data flags of one kind of dataset given with the other.

  Args:
    given: TrainConfig's fields by name, None where unset.

  Raises:
    ConfigError: Naming the first flag that does not apply or fit.
  """
  uses_tfds = (given["dataset"].startswith(TFDS_PREFIX) or
               given["task_datasets"] is not None)
  if (given["dataset"] not in ("shapes", "toy_regression") and
      not given["dataset"].startswith("tfds:")):
    raise errors.ConfigError(
        f"--dataset={given['dataset']}: unknown dataset (known: "
        "shapes, toy_regression, tfds:NAME)")
  if given["dataset"] == TFDS_PREFIX:
    raise errors.ConfigError(f"--dataset={TFDS_PREFIX}: name the TFDS dataset"
                             f" after {TFDS_PREFIX}, e.g. tfds:mnist")
  if given["dataset"] == "toy_regression":
    if given["mode"] != "joint":
      raise errors.ConfigError(
          "--dataset=toy_regression has one input for all "
          "tasks: use --mode=joint")
    for name in ("task_sizes", "label_fraction"):
      if given[name] is not None:
        raise errors.ConfigError(f"--{name} applies to --dataset=shapes only")
  if given["task_datasets"] is not None:
    if given["mode"] != "alternate":
      raise errors.ConfigError(
          "--task_datasets applies to --mode=alternate only "
          "(joint mode reads one --dataset=tfds:NAME)")
    if given["dataset"] != "shapes":
      raise errors.ConfigError(
          f"--dataset={given['dataset']} and --task_datasets "
          "both name data: give one of them")
  if uses_tfds:
    for name in ("task_sizes", "label_fraction", "train_examples",
                 "eval_examples"):
      if given[name] is not None:
        raise errors.ConfigError(f"--{name} applies to --dataset=shapes only")
    if given["dataset"].startswith("tfds:") and given["mode"] == "alternate":
      raise errors.ConfigError(
          f"--dataset={given['dataset']} in alternate mode: give each task its "
          "own dataset with --task_datasets=task=tfds:NAME:LABEL,...")
  else:
    for name in ("data_dir", "input_key", "split", "eval_split",
                 "image_size", "channels"):
      if given[name] is not None:
        raise errors.ConfigError(f"--{name} applies to TFDS datasets only "
                                 "(--dataset=tfds:NAME or --task_datasets)")
    if given["download"]:
      raise errors.ConfigError("--download applies to TFDS datasets only")
  if given["channels"] is not None and given["channels"] not in (1, 3):
    raise errors.ConfigError(f"--channels={given['channels']}: must be 1 or 3")
  if given["image_size"] is not None and (
      len(given["image_size"]) != 2 or min(given["image_size"]) < 1):
    raise errors.ConfigError(
        f"--image_size={','.join(map(str, given['image_size']))}: must be "
        "HEIGHT,WIDTH, both positive")
