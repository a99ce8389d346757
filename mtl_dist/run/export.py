"""Serving: a SavedModel with a signature per task, and predictions from it.

The SavedModel holds the trained variables and traced functions only, so
`tf.saved_model.load` needs TensorFlow and nothing from this package. Its
signatures take one input, `inputs` (a batch of examples as the training
pipeline fed them to the model), and return named outputs:

- `serving_default`: every task's outputs, keys prefixed by the task name;
- one signature per task, named after the task, with that task's outputs
  only (its head alone runs after the trunk).

A classification task outputs `logits`, `probabilities` (softmax) and `class`
(argmax, int64); a regression task outputs `prediction`.
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import tasks as tasks_lib
from mtl_dist import typecheck
from mtl_dist.model import architectures
from mtl_dist.model import base as model_base
from mtl_dist.model import hps as model_lib
from mtl_dist.run import export_dir as export_dir_lib
from mtl_dist.run import saved_run

DEFAULT_SIGNATURE = "serving_default"
INPUT_NAME = "inputs"


def _task_outputs(task: tasks_lib.TaskSpec,
                  output: tf.Tensor) -> dict[str, tf.Tensor]:
  output = tf.cast(output, tf.float32)
  if task.kind == tasks_lib.CLASSIFICATION:
    return {"logits": output, "probabilities": tf.nn.softmax(output),
            "class": tf.argmax(output, axis=-1)}
  return {"prediction": output}


def _task_function(model: model_base.MultiTaskModel, task: tasks_lib.TaskSpec
                   ) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """One task's serving function: the trunk, then that task's head."""
  def serve_task(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
    return _task_outputs(task, model.call_task(inputs, task.name,
                                               training=False))
  return serve_task


class _ServingModule(tf.Module):
  """Tracks the model's variables (not the Keras model) for saving."""

  def __init__(self, model: model_base.MultiTaskModel):
    super().__init__(name="mtl_dist_serving")
    # A plain list: saving then does not serialise the Keras model itself.
    self.model_variables = list(model.variables)


def export_saved_model(model: model_base.MultiTaskModel,
                       tasks: Sequence[tasks_lib.TaskSpec],
                       input_shape: Sequence[int], input_dtype: tf.DType,
                       export_dir: str) -> None:
  """Writes `model` as a SavedModel with serving signatures.

  The SavedModel is written beside `export_dir` and then renamed to it, so
  `export_dir` never holds a partial export; an export there before is
  replaced.

  Args:
    model: A built, non-distributed model.
    tasks: Its tasks.
    input_shape: Shape of one example.
    input_dtype: The inputs' dtype.
    export_dir: Where the SavedModel goes.
  """
  export_dir_lib.check_export_dir(export_dir)
  module = _ServingModule(model)
  spec = tf.TensorSpec([None, *input_shape], input_dtype, name=INPUT_NAME)

  @tf.function(input_signature=[spec])
  def serve_all(inputs):
    outputs = model(inputs, training=False)
    return {f"{task.name}_{key}": value for task in tasks
            for key, value in _task_outputs(task, outputs[task.name]).items()}

  signatures = {DEFAULT_SIGNATURE: serve_all}
  for task in tasks:
    signatures[task.name] = tf.function(_task_function(model, task),
                                        input_signature=[spec])
  partial = export_dir.rstrip("/") + ".partial"
  if tf.io.gfile.exists(partial):
    tf.io.gfile.rmtree(partial)
  tf.saved_model.save(module, partial, signatures=signatures)
  if tf.io.gfile.exists(export_dir):
    tf.io.gfile.rmtree(export_dir)
  tf.io.gfile.rename(partial, export_dir)
  logging.info("Exported a SavedModel with signatures %s to %s.",
               ", ".join(signatures), export_dir)


@typecheck.checked
def export_run(model_dir: str, export_dir: str,
               checkpoint: Optional[str] = None,
               trunk_fn: Optional[model_lib.TrunkFn] = None,
               head_fn: Optional[model_lib.HeadFn] = None, *,
               expert_fn: Optional[architectures.ExpertFn] = None,
               gate_fn: Optional[architectures.GateFn] = None,
               column_fn: Optional[architectures.ColumnFn] = None) -> str:
  """Exports a run's checkpoint as a SavedModel with serving signatures.

  Args:
    model_dir: The run's `--model_dir`.
    export_dir: Where the SavedModel goes (replacing an export there).
    checkpoint: None for the newest readable checkpoint, a step, or a
      checkpoint prefix.
    trunk_fn: The trunk function of a run trained with one.
    head_fn: The head function of a run trained with one.
    expert_fn: The expert function of a run trained with one.
    gate_fn: The gate function of a run trained with one.
    column_fn: The column function of a run trained with one.

  Returns:
    The exported checkpoint's prefix.

  Raises:
    ConfigError: If the run, its checkpoint or `export_dir` cannot serve.
  """
  export_dir_lib.check_export_dir(export_dir)
  spec = saved_run.read_model_spec(model_dir)
  path = saved_run.find_checkpoint(model_dir, checkpoint)
  model = spec.build(architectures.ModelFunctions(
      trunk_fn=trunk_fn, head_fn=head_fn, expert_fn=expert_fn,
      gate_fn=gate_fn, column_fn=column_fn))
  saved_run.restore_model(model, path)
  export_saved_model(model, spec.tasks, spec.input_shape,
                     tf.as_dtype(spec.input_dtype), export_dir)
  return path


@typecheck.checked
def predict(export_dir: str, inputs: Any,
            signature: str = DEFAULT_SIGNATURE,
            batch_size: int = 256) -> dict[str, np.ndarray]:
  """Runs an exported model's signature over `inputs`, batch by batch.

  Args:
    export_dir: A SavedModel written by `export_saved_model`.
    inputs: [N, ...] examples (an array, or what np.asarray takes).
      Floating-point inputs are cast to a
      floating-point input dtype; other mismatches are refused.
    signature: `serving_default` or a task's name.
    batch_size: Examples per call.

  Returns:
    Output name to an [N, ...] array.

  Raises:
    ConfigError: For a missing export or signature, or inputs of the wrong
      shape or dtype.
  """
  if not tf.saved_model.contains_saved_model(export_dir):
    raise errors.ConfigError(f"--export_dir={export_dir}: holds no "
                             "SavedModel")
  loaded = tf.saved_model.load(export_dir)
  if signature not in loaded.signatures:
    raise errors.ConfigError(
        f"--signature={signature}: not in the export (it has "
        f"{', '.join(sorted(loaded.signatures))})")
  function = loaded.signatures[signature]
  spec = function.structured_input_signature[1][INPUT_NAME]
  expected = tuple(spec.shape[1:])
  try:
    inputs = np.asarray(inputs)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"predict: inputs: not an array ({e})") from None
  if tuple(inputs.shape[1:]) != expected:
    raise errors.ConfigError(
        f"the inputs have shape {tuple(inputs.shape)}: the model takes "
        f"[N, {', '.join(str(d) for d in expected)}] examples")
  wanted = spec.dtype.as_numpy_dtype
  same_kind = (np.issubdtype(inputs.dtype, np.floating) and
               np.issubdtype(wanted, np.floating)) or inputs.dtype == wanted
  if not same_kind:
    raise errors.ConfigError(
        f"the inputs are {inputs.dtype}: the model takes {spec.dtype.name}")
  if batch_size <= 0:
    raise errors.ConfigError(f"--batch_size={batch_size}: must be "
                             "positive")
  parts: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(inputs), batch_size):
    batch = tf.constant(inputs[start:start + batch_size].astype(wanted))
    for name, value in function(**{INPUT_NAME: batch}).items():
      parts.setdefault(name, []).append(value.numpy())
  if not parts:  # No examples: empty arrays of the right shapes.
    outputs = function(**{INPUT_NAME: tf.zeros((0, *expected), spec.dtype)})
    return {name: value.numpy() for name, value in outputs.items()}
  return {name: np.concatenate(values) for name, values in parts.items()}


def load_inputs(path: str) -> np.ndarray:
  """The examples of a `.npy` file.

  Raises:
    ConfigError: If the file cannot be read as a NumPy array.
  """
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      return np.load(io.BytesIO(f.read()), allow_pickle=False)
  except (OSError, ValueError, tf.errors.OpError) as e:
    reason = getattr(e, "message", None) or str(e)
    raise errors.ConfigError(f"--input={path}: cannot be read as .npy "
                             f"({reason})") from None


@typecheck.checked
def write_predictions(path: str, predictions: dict[str, np.ndarray]) -> None:
  """Writes predictions to `.npz` (arrays) or `.jsonl` (one line an example).

  Raises:
    ConfigError: For another file extension.
  """
  if path.endswith(".npz"):
    buffer = io.BytesIO()  # zipfile needs a seekable file; GFile is not.
    np.savez(buffer, **predictions)
    content, mode = buffer.getvalue(), "wb"
  elif path.endswith(".jsonl"):
    names = sorted(predictions)
    count = len(predictions[names[0]]) if names else 0
    content, mode = "".join(
        json.dumps({name: predictions[name][i].tolist() for name in names})
        + "\n" for i in range(count)), "w"
  else:
    raise errors.ConfigError(f"--output={path}: must end in .npz or "
                             ".jsonl")
  partial = path + ".partial"  # A reader never sees half a file.
  with tf.io.gfile.GFile(partial, mode) as f:
    f.write(content)
  tf.io.gfile.rename(partial, path, overwrite=True)
