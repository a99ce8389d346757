"""The user's pieces as layers of the model: Keras 3, tf_keras or tf.Module.

The package's models, steps and optimizers are tf_keras (docs/design.md says
why). A user's trunk, head, expert, gate or column may be any of:

- a tf_keras layer or model: used as it is;
- a Keras 3 layer or model (`keras.*`, and `tf.keras.*` on TensorFlow 2.16
  and later) on the TensorFlow backend: wrapped in `Keras3Piece`, a tf_keras
  layer whose variables are the `tf.Variable`s Keras 3 keeps inside its own,
  so tf_keras's optimizers, the strategy, checkpoints and SavedModels see
  plain TensorFlow variables;
- a callable `tf.Module`: wrapped in `ModulePiece`.

Anything else is refused with a `ConfigError` naming the function that made
it, before training. `replica_local_state` makes the non-trainable float
variables that Keras 3 layers update while training (batch-norm statistics)
per-replica and averaged when read, as tf_keras's batch norm declares its
own; without it each replica would keep a different value in one mirrored
variable and a checkpoint would save replica 0's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Any, Callable, Iterator, Optional

import tensorflow as tf
import tf_keras

from mtl_dist import errors
from mtl_dist import typecheck


def _keras3_layer_class() -> Optional[type]:
  """Keras 3's Layer class if Keras 3 is imported (else no piece is one)."""
  keras = sys.modules.get("keras")
  layer = getattr(keras, "Layer", None) if keras is not None else None
  return layer if isinstance(layer, type) else None


def is_keras3(piece: Any) -> bool:
  """Whether `piece` is a Keras 3 layer or model."""
  layer = _keras3_layer_class()
  return layer is not None and isinstance(piece, layer)


def _describe(piece: Any) -> str:
  if piece is None:
    return "None"
  kind = type(piece)
  return f"{kind.__module__}.{kind.__qualname__}"


def _other_backend(what: str, subject: str) -> errors.ConfigError:
  """The error for Keras 3 `subject` kept on a backend other than TF's."""
  backend = sys.modules["keras"].backend.backend()
  return errors.ConfigError(
      f"{what}: {subject} of the {backend!r} backend, whose variables "
      "TensorFlow cannot train or checkpoint: set KERAS_BACKEND=tensorflow "
      "before importing keras")


def _tf_variable(variable: Any, what: str) -> tf.Variable:
  """The `tf.Variable` inside a Keras 3 variable.

  Raises:
    ConfigError: If Keras 3 keeps it on another backend.
  """
  value = variable.value
  if not isinstance(value, tf.Variable):
    raise _other_backend(what, f"the Keras 3 variable {variable.path} is a "
                         f"{_describe(value)}")
  return value


def _policy_of(piece: Any) -> Optional[str]:
  """The tf_keras policy name for what a Keras 3 piece computes in.

  "mixed_float16" if any of its layers computes in float16, else
  "mixed_bfloat16" if any computes in bfloat16, else the piece's own policy
  if tf_keras knows it, else None (the global policy).
  """
  layers = piece._flatten_layers()  # pylint: disable=protected-access
  computes = {str(layer.compute_dtype) for layer in layers}
  for dtype in ("float16", "bfloat16"):
    if dtype in computes:
      return f"mixed_{dtype}"
  name = getattr(getattr(piece, "dtype_policy", None), "name", None)
  try:
    return tf_keras.mixed_precision.Policy(name).name
  except (TypeError, ValueError):
    return None


class Keras3Piece(tf_keras.layers.Layer):
  """A Keras 3 layer or model as a tf_keras layer (see the module doc).

  Its weights are the Keras 3 variables' `tf.Variable`s; calling it calls the
  Keras 3 object, and the Keras 3 losses of that call (activity and weight
  regularization) become this layer's losses.
  """

  def __init__(self, piece: Any, what: str, **kwargs):
    """Initialises the wrapper.

    Args:
      piece: The Keras 3 layer or model.
      what: The user function that made it, for error messages.
      **kwargs: Passed to `tf_keras.layers.Layer`.
    """
    # The Keras 3 object casts by its own policies; this layer's policy only
    # tells the package what it computes in (float16 needs loss scaling).
    super().__init__(name=kwargs.pop("name", piece.name),
                     dtype=_policy_of(piece), autocast=False, **kwargs)
    self.piece = piece
    self._what = what

  def call(self, inputs: tf.Tensor, training: Optional[bool] = None
           ) -> tf.Tensor:
    # A piece built on its first call (not by a model builder) makes its
    # variables here.
    with replica_local_state():
      outputs = self.piece(inputs, training=training)
    for loss in self.piece.losses:
      self.add_loss(loss)
    return outputs

  @property
  def trainable_weights(self) -> list[tf.Variable]:
    if not self.trainable:
      return []
    return [_tf_variable(v, self._what) for v in self.piece.trainable_weights]

  @property
  def non_trainable_weights(self) -> list[tf.Variable]:
    weights = (self.piece.non_trainable_weights if self.trainable
               else self.piece.weights)
    return [_tf_variable(v, self._what) for v in weights]

  def compute_output_shape(self, input_shape):
    return tf.TensorShape(self.piece.compute_output_shape(
        tuple(tf.TensorShape(input_shape).as_list())))


class ModulePiece(tf_keras.layers.Layer):
  """A callable `tf.Module` as a tf_keras layer.

  tf_keras collects the module's variables; calling the layer calls the
  module, with `training=` if its `__call__` takes that argument.
  """

  def __init__(self, module: tf.Module, **kwargs):
    """Initialises the wrapper.

    Args:
      module: The module; `module(inputs)` maps a batch to its output.
      **kwargs: Passed to `tf_keras.layers.Layer`.
    """
    super().__init__(name=kwargs.pop("name", module.name), autocast=False,
                     **kwargs)
    self.module = module
    try:
      parameters = inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
      parameters = {}
    self._takes_training = "training" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

  def call(self, inputs: tf.Tensor, training: Optional[bool] = None
           ) -> tf.Tensor:
    if self._takes_training:
      return self.module(inputs, training=training)
    return self.module(inputs)


def _holds_keras3(container: tf.Module) -> Optional[str]:
  """The path of a Keras 3 layer inside a tf_keras layer or tf.Module."""
  layer = _keras3_layer_class()
  if layer is None:
    return None
  found = container._flatten(  # pylint: disable=protected-access
      predicate=lambda value: isinstance(value, layer), with_path=True)
  for path, _ in found:
    return ".".join(str(part) for part in path)
  return None


def adapt(piece: Any, what: str) -> tf_keras.layers.Layer:
  """`piece` as a tf_keras layer the model can hold.

  Args:
    piece: What a user function returned.
    what: Where it came from, as users know it (e.g. "trunk_fn", "head_fn
      for task 'digit'"), for error messages.

  Returns:
    `piece` itself if it is a tf_keras layer, else its wrapper.

  Raises:
    ConfigError: If `piece` is none of the kinds the module doc lists, or a
      tf_keras layer or tf.Module that holds Keras 3 layers (tf_keras would
      not see their variables).
  """
  if isinstance(piece, (Keras3Piece, ModulePiece)):
    return piece  # Adapted already.
  if is_keras3(piece):
    if sys.modules["keras"].backend.backend() != "tensorflow":
      raise _other_backend(what, "got a Keras 3 layer")
    return Keras3Piece(piece, what)
  if isinstance(piece, (tf_keras.layers.Layer, tf.Module)):
    inner = _holds_keras3(piece)
    if inner is not None:
      raise errors.ConfigError(
          f"{what}: got a {_describe(piece)} holding the Keras 3 layer "
          f"at .{inner}, whose variables it cannot see: return Keras 3 "
          "pieces on their own (e.g. a keras.Sequential) or write the whole "
          "piece in one Keras")
    if isinstance(piece, tf_keras.layers.Layer):
      return piece
    if not callable(piece):
      raise errors.ConfigError(
          f"{what}: got a {_describe(piece)}, a tf.Module without "
          "__call__: the model calls each piece on a batch")
    return ModulePiece(piece)
  raise errors.ConfigError(
      f"{what}: got {_describe(piece)}; a piece must be a Keras layer "
      "or model (keras / tf.keras, or tf_keras) or a callable tf.Module on "
      "TensorFlow variables")


def check_function(name: str, function: Any) -> None:
  """Refuses a piece given where a function that makes one is expected.

  Raises:
    ConfigError: Naming `name`, if `function` is not callable or is itself
      a layer or module (callable, but it would be called on no input).
  """
  if function is not None and (not callable(function) or isinstance(
      function, (tf.Module, tf_keras.layers.Layer)) or is_keras3(function)):
    raise errors.ConfigError(
        f"{name}: expects a function that makes a new piece on each call, "
        f"got {typecheck.kind_of(function)} (pass a function returning it)")


def adapt_sequence(pieces: Any, what: str) -> list[tf_keras.layers.Layer]:
  """The layers of a Sequential (either Keras) or a list, each adapted.

  Raises:
    ConfigError: For anything else, or an empty sequence.
  """
  keras = sys.modules.get("keras")
  if isinstance(pieces, tf_keras.Sequential) or (
      is_keras3(pieces) and isinstance(pieces, keras.Sequential)):
    layers = list(pieces.layers)
  elif isinstance(pieces, (list, tuple)):
    layers = list(pieces)
  else:
    raise errors.ConfigError(
        f"{what} must return a Sequential (keras, tf.keras or tf_keras) or a "
        f"list of layers, got {_describe(pieces)}")
  if not layers:
    raise errors.ConfigError(f"{what} returned no layers")
  return [adapt(layer, f"{what} (layer {i})")
          for i, layer in enumerate(layers)]


def _replica_local(next_creator: Callable[..., tf.Variable],
                   **kwargs) -> tf.Variable:
  """Creates a non-trainable float variable as tf_keras's batch norm does."""
  aggregation = kwargs.get("aggregation")
  synchronization = kwargs.get("synchronization")
  dtype = kwargs.get("dtype")
  floating = dtype is not None and tf.as_dtype(dtype).is_floating
  if (kwargs.get("trainable") is False and floating
      and aggregation in (None, tf.VariableAggregation.NONE)
      and synchronization in (None, tf.VariableSynchronization.AUTO)):
    kwargs["synchronization"] = tf.VariableSynchronization.ON_READ
    kwargs["aggregation"] = tf.VariableAggregation.MEAN
  return next_creator(**kwargs)


@contextlib.contextmanager
def replica_local_state() -> Iterator[None]:
  """Within it, non-trainable float variables are replica-local.

  Each replica updates its own copy (batch statistics of its examples); a
  read outside replicas, a checkpoint among them, gets their mean. These are
  tf_keras batch norm's settings, which it passes explicitly; Keras 3's
  batch norm needs them given here, and any other non-trainable float
  variable made within the scope (tf_keras ones too) gets them as well.
  """
  with tf.variable_creator_scope(_replica_local):
    yield


def with_replica_local_state(build: Callable) -> Callable:
  """Decorates a model builder to run within `replica_local_state`."""

  @functools.wraps(build)
  def wrapped(*args, **kwargs):
    with replica_local_state():
      return build(*args, **kwargs)

  return wrapped

