"""A finished or running model_dir, read back: its model and checkpoints.

Training writes `model.json` next to `config.json`: the `ModelSpec` (the
tasks, the input shape and dtype, and how the trunk and heads were made).
Export and evaluation rebuild the model from it and restore a checkpoint's
weights into it, without the training set-up (optimizers, schedules,
strategy).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from absl import logging
import tensorflow as tf

from mtl_dist import errors
from mtl_dist.data import shapes
from mtl_dist.data import toy_regression
from mtl_dist.loop import checkpointing
from mtl_dist.loop import run_files
from mtl_dist.model import base as model_base
from mtl_dist.model import spec as model_spec
from mtl_dist.run import config as config_lib

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
CHECKPOINT_SUBDIR = "checkpoints"


def write_model_spec(model_dir: str, spec: model_spec.ModelSpec) -> None:
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


def read_model_spec(model_dir: str) -> model_spec.ModelSpec:
  """The model spec a run wrote.

  Raises:
    ConfigError: If `model.json` is missing or not a model spec.
  """
  value = _read_json(model_dir, MODEL_FILE)
  try:
    return model_spec.ModelSpec.from_json(value)
  except (KeyError, TypeError, ValueError) as e:
    raise errors.ConfigError(
        f"{os.path.join(model_dir, MODEL_FILE)}: not a model spec "
        f"({type(e).__name__}: {e})") from None


def read_config(model_dir: str) -> config_lib.TrainConfig:
  """The configuration a run wrote (re-read: a resumed run may change it).

  Raises:
    ConfigError: If `config.json` is missing, not a configuration, or
      holds a value that flags could not set.
  """
  value = _read_json(model_dir, CONFIG_FILE)
  path = os.path.join(model_dir, CONFIG_FILE)
  try:
    config = config_lib.TrainConfig(**value)
  except TypeError as e:
    raise errors.ConfigError(
        f"{path}: not a training configuration ({e})") from None
  try:  # What is read back from disk is checked like flags are.
    config.check_values()
  except errors.ConfigError as e:
    raise errors.ConfigError(f"{path}: {e}") from None
  return config


# The settings a checkpoint's variables depend on (the model's, the
# optimizers'): resumed with others, a run would fail to restore, or restore
# into another model. Method and schedule choices are not among them: a
# stateless one can change on resume, and a stateful one's state fails to
# restore (setup names them in that error).
_STATE_SETTINGS = (
    "mode", "dataset", "tasks", "task_datasets", "input_key", "image_size",
    "channels", "trunk", "trunk_width", "trunk_depth", "architecture",
    "num_experts", "num_shared_experts", "num_task_experts", "num_levels",
    "num_selected_experts", "mixed_precision", "optimizer",
    "per_task_optimizer")
# The settings of the built-in data: with the caller's own data they are
# unset or refused, and the restore checks the tasks' order itself.
_DATA_SETTINGS = ("dataset", "tasks", "task_datasets", "input_key",
                  "image_size", "channels")


def check_resumable(model_dir: str, config: config_lib.TrainConfig,
                    custom_data: bool = False) -> None:
  """Refuses to resume a run whose config.json differs in a state setting.

  Called before anything is restored, when `model_dir` holds a checkpoint.
  A config.json that cannot be read as a configuration (damaged, or written
  by a version with other fields) is left to the restore's own checks,
  with a warning; a field it lacks is compared as its default.

  Args:
    model_dir: The run's directory.
    config: This run's configuration.
    custom_data: Whether the run trains on the caller's own data, whose
      tasks and input the data settings do not describe.

  Raises:
    ConfigError: Naming each setting that differs, this run's value and
      the saved run's.
  """
  saved = _saved_config(model_dir)
  if saved is None:
    return
  differences = []
  for name in _STATE_SETTINGS:
    if custom_data and name in _DATA_SETTINGS:
      continue
    if name == "per_task_optimizer" and "joint" in (config.mode, saved.mode):
      continue  # Joint mode has one optimizer; --mode names the change.
    ours, theirs = _effective(config, name), _effective(saved, name)
    if name == "mixed_precision" and "float16" not in (ours, theirs):
      continue  # Only float16 adds state (the loss scale).
    if ours is not None and theirs is not None and ours != theirs:
      differences.append(f"{_flag(name, ours)} (the run's: "
                         f"{_flag(name, theirs)})")
  if differences:
    raise errors.ConfigError(
        f"--model_dir={model_dir}: holds a run with other settings than "
        f"these flags: {'; '.join(differences)}. Resume it with its "
        "settings (its config.json), or give a new --model_dir")


def _saved_config(model_dir: str) -> Optional[config_lib.TrainConfig]:
  """The configuration in config.json as far as this version knows it.

  Returns:
    None (after a warning, unless there is no config.json) when it is not
    a configuration this version can read.
  """
  path = os.path.join(model_dir, CONFIG_FILE)
  value = read_json_or_none(path)
  if value is None:
    return None
  known = {field.name for field in dataclasses.fields(config_lib.TrainConfig)}
  try:
    if not isinstance(value, dict) or "model_dir" not in value:
      raise TypeError("unreadable, or not a configuration object")
    return config_lib.TrainConfig(**{key: item for key, item in value.items()
                                     if key in known})
  except (TypeError, ValueError) as e:  # ConfigError is a ValueError.
    logging.warning("%s cannot be read as a configuration (%s); the "
                    "checkpoint's restore checks the settings instead.", path,
                    str(e).splitlines()[0][:200] if str(e) else
                    type(e).__name__)
    return None


def _effective(config: config_lib.TrainConfig, name: str) -> Any:
  """A setting's value in effect, its section's default if unset.

  None for a value that cannot be known before the data is read (the tasks
  of a TFDS dataset when none are named).
  """
  if name == "per_task_optimizer":
    return config.per_task_optimizers
  if name == "tasks" and config.tasks is None:
    if config.task_datasets:
      return tuple(config.task_datasets)
    known = {"shapes": shapes.TASK_NAMES,
             "toy_regression": toy_regression.TASK_NAMES}
    return known.get(config.dataset)
  try:
    sections = (config.data_config(), config.architecture_config())
  except (TypeError, ValueError):  # A saved value of the wrong kind.
    return None
  for section in sections:
    if hasattr(section, name):
      value = getattr(section, name)
      break
  else:
    value = getattr(config, name)
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return dict(value) if isinstance(value, dict) else value


def _flag(name: str, value: Any) -> str:
  """A setting as its flag would spell it: `--name=value`, `--[no]name`."""
  if isinstance(value, bool):
    return f"--{'' if value else 'no'}{name}"
  return f"--{name}={config_lib.flag_text(value)}"


def signs_of_training(model_dir: str) -> list[str]:
  """What in `model_dir` shows that a run trained there and saved.

  A run killed before its first checkpoint leaves metrics of the steps
  before it, which a restart trains again; those are no sign. Past the
  first save step (--checkpoint_every, or --train_steps if fewer) of the
  configuration in config.json, a record is one.

  Returns:
    One phrase per sign (summary.json, the checkpoint list, metrics); []
    when the directory shows no saved training.
  """
  signs = []
  summary = read_json_or_none(os.path.join(model_dir, "summary.json"))
  if summary is not None:
    signs.append(f"summary.json (step {summary.get('step', '?')})"
                 if isinstance(summary, dict) else "summary.json")
  if tf.io.gfile.exists(os.path.join(checkpoint_dir(model_dir),
                                     "checkpoint")):
    names = checkpointing.listed_in_state(checkpoint_dir(model_dir))
    signs.append(f"checkpoints/checkpoint listing {', '.join(names)}" if names
                 else "a checkpoints/checkpoint file")
  config = read_json_or_none(os.path.join(model_dir, CONFIG_FILE))
  if isinstance(config, dict):
    first_save = [config.get(name) for name in ("checkpoint_every",
                                                "train_steps")]
    if all(isinstance(n, int) and n > 0 for n in first_save):
      # An eval record at a save step comes after that save; a train
      # record there comes before it.
      saved = [record["step"] for record in run_files.read_records(
          os.path.join(model_dir, run_files.METRICS_FILE))
               if record["step"] > min(first_save) or
               (record["split"] == "eval" and
                record["step"] >= min(first_save))]
      if saved:
        signs.append(f"metrics.jsonl records up to step {max(saved)}")
  return signs


def read_json_or_none(path: str) -> Any:
  """The JSON value in `path`: None if there is none, {} if unreadable."""
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return json.loads(f.read())
  except (ValueError, tf.errors.OpError, OSError):
    return {}


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
    for bad, problem in skipped:
      logging.warning("Checkpoint %s cannot be read (%s); using the newest "
                      "readable one, %s.", bad, problem, path)
    return path
  path = (os.path.join(directory, f"ckpt-{checkpoint}")
          if checkpoint.isdigit() else checkpoint)
  problem = checkpointing.unreadable(path)
  if problem is not None:
    raise errors.ConfigError(f"--checkpoint={checkpoint}: {path} cannot "
                             f"be read ({problem})")
  return path


def restore_model(model: model_base.MultiTaskModel, path: str) -> None:
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
