"""Builds any architecture from its settings and the user's functions.

`--architecture` names the model (see `settings.ARCHITECTURES`); its
pieces are the built-in trunk of `--trunk`, `--trunk_width` and
`--trunk_depth` (the experts, the columns or the shared trunk) unless the
user's functions make them (`ModelFunctions`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import tensorflow as tf
import tf_keras

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist import typecheck
from mtl_dist.model import base
from mtl_dist.model import cross_stitch
from mtl_dist.model import experts
from mtl_dist.model import hps
from mtl_dist.model import mtan
from mtl_dist.model import pieces
from mtl_dist.model import precision
from mtl_dist.model import settings as settings_lib

# Every piece may be a Keras 3 or tf_keras layer or model, or a callable
# tf.Module (see pieces.py).
# Makes an expert; called once per expert and level.
ExpertFn = Callable[[], Any]
# Makes a gate's logits for n experts: a layer mapping the gate's input
# (the examples, or a PLE level's mixture) to [batch, n].
GateFn = Callable[[int], Any]
# Makes a task's cross-stitch column: a Sequential (either Keras) or a list
# of layers; a unit follows each of its layers.
ColumnFn = Callable[[], Union[Any, Sequence[Any]]]

_MIXTURES = ("mmoe", "cgc", "ple", "dselect_k")


@dataclasses.dataclass(frozen=True)
class ModelFunctions:
  """The user's functions that make a model's pieces (None: built in).

  Attributes:
    trunk_fn: hps and mtan: the shared trunk (mtan: a Sequential).
    head_fn: Every architecture: each task's head (tower) from its TaskSpec.
    expert_fn: mmoe, cgc, ple, dselect_k: one expert.
    gate_fn: mmoe, cgc, ple: one gate's logits for n experts.
    column_fn: cross_stitch: one task's column.
  """

  trunk_fn: Optional[hps.TrunkFn] = None
  head_fn: Optional[hps.HeadFn] = None
  expert_fn: Optional[ExpertFn] = None
  gate_fn: Optional[GateFn] = None
  column_fn: Optional[ColumnFn] = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      pieces.check_function(field.name, getattr(self, field.name))

  def as_kwargs(self) -> dict[str, Optional[Callable]]:
    """The functions by argument name (for `train`, `evaluate`, ...)."""
    return {field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)}

  def given(self) -> tuple[str, ...]:
    """The names of the functions given."""
    return tuple(field.name for field in dataclasses.fields(self)
                 if getattr(self, field.name) is not None)


# Function -> the architectures that use it.
USED_BY = {
    "trunk_fn": ("hps", "mtan"),
    "head_fn": settings_lib.ARCHITECTURES,
    "expert_fn": _MIXTURES,
    "gate_fn": ("mmoe", "cgc", "ple"),
    "column_fn": ("cross_stitch",),
}


def check_functions(architecture: str, functions: ModelFunctions,
                    mixed_precision: str = "none") -> None:
  """Refuses a function the architecture does not use.

  Raises:
    ValueError: Naming the function and the architectures that use it, or
      mixed precision with functions that make the computing layers.
  """
  for name in functions.given():
    if architecture not in USED_BY[name]:
      raise ValueError(
          f"{name} makes a piece of --architecture="
          f"{' or '.join(USED_BY[name])}, not of --architecture="
          f"{architecture}")
  own = [name for name in ("trunk_fn", "expert_fn", "column_fn")
         if name in functions.given()]
  if own and mixed_precision != "none":
    raise ValueError(
        f"mixed_precision={mixed_precision!r} applies to the built-in "
        f"layers; give the layers {own[0]} makes a dtype policy instead "
        "(dtype=\"mixed_bfloat16\" in Keras 3 and tf_keras alike)")


@typecheck.checked
@pieces.with_replica_local_state
def build(tasks: Sequence[tasks_lib.TaskSpec], input_shape: Sequence[int],
          settings: settings_lib.ArchitectureConfig,
          functions: ModelFunctions = ModelFunctions(),
          trunk: str = "mlp", trunk_width: int = 256, trunk_depth: int = 2,
          mixed_precision: str = "none",
          input_dtype: tf.DType = tf.float32) -> base.MultiTaskModel:
  """A built model of any architecture.

  Call inside `strategy.scope()` so that the variables are distributed.

  Args:
    tasks: One head per task, sized by `TaskSpec.output_size`.
    input_shape: Shape of one example, without the batch dimension.
    settings: The architecture and its options.
    functions: The user's functions for some pieces.
    trunk: The built-in trunk's kind: the trunk, each expert (PLE's inner
      levels mix vectors, so their built-in experts are MLPs of the same
      width and depth) or each column.
    trunk_width: Units or filters per built-in layer.
    trunk_depth: Built-in layers or blocks.
    mixed_precision: "none", "bfloat16" or "float16": the built-in
      computing layers use that dtype; gates, cross-stitch units and heads
      stay float32.
    input_dtype: The inputs' dtype.

  Returns:
    The model, with all variables created.

  Raises:
    ValueError: For a function the architecture does not use, mixed
      precision with user layers, or pieces that do not fit together.
    ConfigError: For a piece that is not a layer (see `pieces.adapt`).
  """
  name = settings.architecture
  check_functions(name, functions, mixed_precision)
  task_names = [task.name for task in tasks]
  if name == "hps":
    model = hps.build_model(
        tasks, input_shape,
        trunk=functions.trunk_fn or trunk, trunk_width=trunk_width,
        trunk_depth=trunk_depth, mixed_precision=mixed_precision,
        head_fn=functions.head_fn, input_dtype=input_dtype)
    _check_ownership(model, task_names, functions)
    return model
  policy = precision.layer_policy(mixed_precision)
  heads = hps.default_heads(tasks, functions.head_fn,
                            None if policy is None else "float32")
  try:
    if name in _MIXTURES:
      model = _mixture(name, task_names, settings, functions, heads, trunk,
                       trunk_width, trunk_depth, policy)
    elif name == "cross_stitch":
      model = cross_stitch.CrossStitchModel(
          {task: (_column(functions.column_fn) if functions.column_fn else
                  cross_stitch.column_blocks(trunk, trunk_width, trunk_depth,
                                             policy))
           for task in task_names}, heads, name="cross_stitch_model")
    elif name == "mtan":
      shared = (pieces.adapt_sequence(functions.trunk_fn(), "trunk_fn")
                if functions.trunk_fn else
                hps.build_trunk(trunk, trunk_width, trunk_depth, policy).layers)
      model = mtan.build(task_names, shared, input_shape, input_dtype, heads)
    else:
      raise ValueError(f"unknown architecture {name!r} (known: "
                       f"{', '.join(settings_lib.ARCHITECTURES)})")
    hps.build_and_check(model, tasks, input_shape, input_dtype)
  except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
    if isinstance(e, errors.ConfigError) or "head outputs" in str(e) or str(
        e).startswith(
        ("unknown architecture", "--architecture=")):
      raise
    raise ValueError(f"--architecture={name}: its pieces do not fit together "
                     f"({_cause(e)})") from None
  _check_ownership(model, task_names, functions)
  return model


def _cause(error: Exception) -> str:
  """The innermost line of a (Keras-wrapped) error that says what failed."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  useful = [line for line in lines
            if not line.startswith(("Exception encountered when calling",
                                    "Call arguments received", "•"))]
  return (useful or lines or [type(error).__name__])[0][:300]


def _check_ownership(model: base.MultiTaskModel, task_names: Sequence[str],
                     functions: ModelFunctions) -> None:
  """Checks that shared and per-task variables split the model's variables.

  Raises:
    ValueError: If a variable is both shared and a task's, or two tasks',
      e.g. when a user function returns the same layer on every call.
  """
  groups = [("shared", model.shared_variables)] + [
      (task, model.task_variables(task)) for task in task_names]
  owner = {}
  for group, variables in groups:
    for variable in variables:
      if id(variable) in owner:
        raise ValueError(
            f"variable {variable.name} belongs to both {owner[id(variable)]}"
            f" and {group}: each call of "
            f"{' / '.join(functions.given()) or 'the piece functions'} must "
            "return new layers")
      owner[id(variable)] = group
  missing = [v.name for v in model.trainable_variables if id(v) not in owner]
  if missing:
    raise ValueError(f"variables {missing[:3]} are neither shared nor a "
                     "task's")


def _column(column_fn: ColumnFn) -> list[tf_keras.layers.Layer]:
  return pieces.adapt_sequence(column_fn(), "column_fn")


def _mixture(name: str, task_names: Sequence[str],
             settings: settings_lib.ArchitectureConfig,
             functions: ModelFunctions, heads, trunk: str, trunk_width: int,
             trunk_depth: int, policy) -> experts.MixtureOfExpertsModel:
  """An MMoE, CGC, PLE or DSelect-k model, unbuilt."""

  def make_expert(level: int) -> tf_keras.layers.Layer:
    if functions.expert_fn is not None:
      return pieces.adapt(functions.expert_fn(), "expert_fn")
    return hps.build_trunk(trunk if level == 0 else "mlp", trunk_width,
                           trunk_depth, policy, name=None)

  if name == "dselect_k":
    def make_gate(num: int) -> tf_keras.layers.Layer:
      return experts.DSelectKGate(num, settings.num_selected_experts,
                                  settings.dselect_k_gamma,
                                  settings.dselect_k_entropy_reg)
  else:
    def make_gate(num: int) -> tf_keras.layers.Layer:
      logits = (pieces.adapt(functions.gate_fn(num), "gate_fn")
                if functions.gate_fn else experts.default_gate(num))
      return experts.SoftmaxGate(logits)

  if name in ("mmoe", "dselect_k"):
    levels, shared, private = 1, settings.num_experts, 0
  else:
    levels = settings.num_levels if name == "ple" else 1
    shared, private = settings.num_shared_experts, settings.num_task_experts
  return experts.build(task_names, levels, shared, private, name == "ple",
                       make_expert, make_gate, heads, name=f"{name}_model")
