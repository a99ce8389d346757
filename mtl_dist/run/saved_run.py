"""A finished or running model_dir, read back: its model and checkpoints.

Training writes `model.json` next to `config.json`: the tasks, the input
shape and dtype, and how the trunk and heads were made. Export and evaluation
rebuild the model from it and restore a checkpoint's weights into it, without
the training set-up (optimizers, schedules, strategy).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.loop import checkpointing
from mtl_dist.loop import run_files
from mtl_dist.model import hps as model_lib
from mtl_dist.run import config as config_lib

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
CHECKPOINT_SUBDIR = "checkpoints"
CUSTOM = "custom"  # A trunk or heads made by user code, not by flags.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How a run's model was built.

  Attributes:
    tasks: The tasks, in order. A task trained with a loss function has
      `loss=None` here and is listed in `custom_losses`.
    input_shape: Shape of one example.
    input_dtype: The inputs' dtype name.
    trunk: "mlp", "conv", or "custom" (a user's `trunk_fn`).
    trunk_width: Units or filters per built-in trunk layer.
    trunk_depth: Built-in trunk layers.
    mixed_precision: The built-in trunk's compute dtype ("none" for float32).
    custom_heads: Whether the heads came from a user's `head_fn`.
    custom_data: Whether the run was given its data from Python (so the
      launchers cannot load it again).
    custom_losses: Tasks trained with a loss function.
  """

  tasks: tuple[tasks_lib.TaskSpec, ...]
  input_shape: tuple[int, ...]
  input_dtype: str = "float32"
  trunk: str = "mlp"
  trunk_width: int = 256
  trunk_depth: int = 2
  mixed_precision: str = "none"
  custom_heads: bool = False
  custom_data: bool = False
  custom_losses: tuple[str, ...] = ()

  def to_json(self) -> dict[str, Any]:
    """The spec as JSON values (a loss function becomes "custom")."""
    value = dataclasses.asdict(self)
    value["tasks"] = [dict(dataclasses.asdict(task), loss=task.loss_name)
                      for task in self.tasks]
    return value

  @classmethod
  def from_json(cls, value: dict[str, Any]) -> "ModelSpec":
    """The spec `to_json` wrote.

    Raises:
      KeyError, TypeError, ValueError: If `value` is not such a spec.
    """
    tasks = []
    for task in value["tasks"]:
      task = dict(task)
      if task.get("loss") == tasks_lib.CUSTOM_LOSS:
        task["loss"] = None
      if task.get("metrics") is not None:
        task["metrics"] = tuple(task["metrics"])
      tasks.append(tasks_lib.TaskSpec(**task))
    value = dict(value, tasks=tuple(tasks),
                 input_shape=tuple(value["input_shape"]),
                 custom_losses=tuple(value.get("custom_losses", ())))
    return cls(**value)

  def build(self, trunk_fn: Optional[model_lib.TrunkFn] = None,
            head_fn: Optional[model_lib.HeadFn] = None
            ) -> model_lib.SharedTrunkModel:
    """Builds the model (call inside a strategy's scope to distribute it).

    Args:
      trunk_fn: Makes the trunk of a run trained with a user trunk.
      head_fn: Makes the heads of a run trained with user heads.

    Raises:
      ConfigError: If the run used a user trunk or heads and the matching
        function is not given.
    """
    if self.trunk == CUSTOM and trunk_fn is None:
      raise errors.ConfigError(
          "the run was trained with a trunk made in Python (trunk_fn); "
          "rebuild it from Python with the same trunk_fn (see docs/api.md)")
    if self.custom_heads and head_fn is None:
      raise errors.ConfigError(
          "the run was trained with heads made in Python (head_fn); rebuild "
          "it from Python with the same head_fn (see docs/api.md)")
    return model_lib.build_model(
        self.tasks, self.input_shape,
        trunk=trunk_fn if self.trunk == CUSTOM else self.trunk,
        trunk_width=self.trunk_width, trunk_depth=self.trunk_depth,
        mixed_precision=self.mixed_precision, head_fn=head_fn,
        input_dtype=tf.as_dtype(self.input_dtype))


def write_model_spec(model_dir: str, spec: ModelSpec) -> None:
  """Writes `model_dir/model.json` (atomically)."""
  run_files.write_json_atomic(os.path.join(model_dir, MODEL_FILE),
                            spec.to_json())


def _read_json(model_dir: str, name: str) -> dict[str, Any]:
  path = os.path.join(model_dir, name)
  if not tf.io.gfile.exists(path):
    raise errors.ConfigError(
        f"--model_dir={model_dir}: has no {name}; is it the --model_dir of "
        "an mtl-train run?")
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except ValueError as e:
    raise errors.ConfigError(f"{path}: not valid JSON ({e})") from None


def read_model_spec(model_dir: str) -> ModelSpec:
  """The model spec a run wrote.

  Raises:
    ConfigError: If `model.json` is missing or not a model spec.
  """
  value = _read_json(model_dir, MODEL_FILE)
  try:
    return ModelSpec.from_json(value)
  except (KeyError, TypeError, ValueError) as e:
    raise errors.ConfigError(
        f"{os.path.join(model_dir, MODEL_FILE)}: not a model spec "
        f"({type(e).__name__}: {e})") from None


def read_config(model_dir: str) -> config_lib.TrainConfig:
  """The configuration a run wrote (re-read: a resumed run may change it).

  Raises:
    ConfigError: If `config.json` is missing or not a configuration.
  """
  value = _read_json(model_dir, CONFIG_FILE)
  try:
    return config_lib.TrainConfig(**value)
  except TypeError as e:
    raise errors.ConfigError(
        f"{os.path.join(model_dir, CONFIG_FILE)}: not a training "
        f"configuration ({e})") from None


def checkpoint_dir(model_dir: str) -> str:
  """Where a run keeps its checkpoints."""
  return os.path.join(model_dir, CHECKPOINT_SUBDIR)


def find_checkpoint(model_dir: str, checkpoint: Optional[str] = None) -> str:
  """The checkpoint prefix to read.

  Args:
    model_dir: The run's directory.
    checkpoint: None for the newest readable checkpoint, a step number, or
      a checkpoint prefix (`.../ckpt-500`).

  Returns:
    The checkpoint prefix.

  Raises:
    ConfigError: If there is no such (readable) checkpoint.
  """
  directory = checkpoint_dir(model_dir)
  if checkpoint is None:
    path, skipped = checkpointing.newest_readable(directory)
    if path is None:
      problem = (f" (newest: {skipped[0][0]}: {skipped[0][1]})" if skipped
                 else "")
      raise errors.ConfigError(
          f"--model_dir={model_dir}: no readable checkpoint in "
          f"{directory}{problem}")
    return path
  path = (os.path.join(directory, f"ckpt-{checkpoint}")
          if checkpoint.isdigit() else checkpoint)
  problem = checkpointing.unreadable(path)
  if problem is not None:
    raise errors.ConfigError(f"--checkpoint={checkpoint}: {path} cannot "
                                 f"be read ({problem})")
  return path


def restore_model(model: model_lib.SharedTrunkModel, path: str) -> None:
  """Restores a training checkpoint's model weights into `model`.

  The optimizers, counters and schedules in the checkpoint are left out.

  Raises:
    ConfigError: If the checkpoint's model does not match `model`.
  """
  try:
    status = tf.train.Checkpoint(model=model).restore(path)
    status.expect_partial().assert_existing_objects_matched()
  except (AssertionError, ValueError) as e:
    first_line = str(e).strip().splitlines()[0][:300]
    raise errors.ConfigError(
        f"checkpoint {path} holds a different model: {first_line}") from None
