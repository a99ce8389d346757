"""How a run's model is built, as data: what model.json holds.

Training builds its model from a `ModelSpec`, writes it as `model.json`,
and the sidecar and the exporter rebuild the same model from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist.model import architectures
from mtl_dist.model import base
from mtl_dist.model import settings as settings_lib

CUSTOM = "custom"  # A trunk or heads made by user code, not by flags.
# What each user function makes, for messages.
_PIECES = {"trunk_fn": "a trunk", "head_fn": "heads", "expert_fn": "experts",
           "gate_fn": "gates", "column_fn": "columns"}


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
    architecture: The architecture and its options (older runs: hps).
    custom_pieces: The other pieces made by user functions ("expert_fn",
      "gate_fn", "column_fn").
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
  architecture: settings_lib.ArchitectureConfig = (
      settings_lib.ArchitectureConfig())
  custom_pieces: tuple[str, ...] = ()

  def to_json(self) -> dict[str, Any]:
    """The spec as JSON values (a loss function becomes "custom")."""
    value = dataclasses.asdict(self)
    value["tasks"] = [dict(dataclasses.asdict(task), loss=task.loss_name)
                      for task in self.tasks]
    value["architecture"] = self.architecture.to_json()
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
                 custom_losses=tuple(value.get("custom_losses", ())),
                 architecture=settings_lib.ArchitectureConfig.from_json(
                     value.get("architecture", {})),
                 custom_pieces=tuple(value.get("custom_pieces", ())))
    return cls(**value)

  def build(self, functions: architectures.ModelFunctions = (
      architectures.ModelFunctions())) -> base.MultiTaskModel:
    """Builds the model (call inside a strategy's scope to distribute it).

    Args:
      functions: The functions that made the run's custom pieces.

    Raises:
      ConfigError: If the run used a piece made in Python and its function
        is not given.
    """
    needed = list(self.custom_pieces)
    if self.trunk == CUSTOM:
      needed.insert(0, "trunk_fn")
    if self.custom_heads:
      needed.append("head_fn")
    for name in needed:
      if getattr(functions, name) is None:
        raise errors.ConfigError(
            f"the run was trained with {_PIECES[name]} made in Python "
            f"({name}); "
            f"rebuild it from Python with the same {name} (see docs/api.md)")
    return architectures.build(
        self.tasks, self.input_shape, self.architecture,
        functions=architectures.ModelFunctions(
            **{name: getattr(functions, name) for name in needed}),
        trunk=self.trunk, trunk_width=self.trunk_width,
        trunk_depth=self.trunk_depth, mixed_precision=self.mixed_precision,
        input_dtype=tf.as_dtype(self.input_dtype))
