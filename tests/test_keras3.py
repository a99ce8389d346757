"""Keras 3 pieces train, resume, evaluate, export and serve like tf_keras ones.

Each test writes one trunk and heads twice, in Keras 3 (`keras.*`, which is
also `tf.keras.*` on TensorFlow 2.16 and later) and in tf_keras, with the
same initial weights, and checks the package treats both alike to 1e-6:
batch normalization (its statistics replica-local, as tf_keras declares
them), weight regularization, Adam's slots in the checkpoint, the sidecar's
evaluation and the exported SavedModel. Every architecture with Keras 3
pieces is in test_architectures.py and every method in
test_method_distribution.py.
"""

import dataclasses
import os
import subprocess
import sys
import zlib

from conftest import make_strategy
from conftest import time_limit
import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.model import pieces
from mtl_dist.run import saved_run

_TASKS = {task.name: task for task in shapes.TASKS}
_FEATURES, _LABELS = shapes.generate(384, seed=4)
_INPUT_SHAPE = _FEATURES.shape[1:]
_WIDTH = 8  # The trunk's output.


def _initialise(layer, name: str) -> None:
  """Gives `layer`'s trainable weights values that depend only on `name`."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  for variable in layer.trainable_weights:
    variable.assign(rng.normal(0.0, 0.3, tuple(variable.shape)).astype(
        np.float32))


def _pieces(framework, dtype=None, batch_norm=True) -> dict:
  """trunk_fn and head_fn in `framework` (the keras or tf_keras module)."""
  layers = framework.layers

  def trunk_fn():
    trunk = framework.Sequential(
        [layers.Flatten(dtype=dtype),
         layers.Dense(16, activation="relu", dtype=dtype,
                      kernel_regularizer=framework.regularizers.L2(1e-3))]
        + ([layers.BatchNormalization()] if batch_norm else [])
        + [layers.Dense(_WIDTH, activation="tanh", dtype=dtype)])
    trunk.build((None, *_INPUT_SHAPE))
    _initialise(trunk, "trunk")
    return trunk

  def head_fn(task):
    head = layers.Dense(task.output_size,
                        bias_regularizer=framework.regularizers.L2(1e-2))
    head.build((None, _WIDTH))
    _initialise(head, task.name)
    return head

  return {"trunk_fn": trunk_fn, "head_fn": head_fn}


def _data(mode: str) -> mtl_dist.MultiTaskData:
  names = ["shape", "x"]

  def source(part, task_names):
    return mtl_dist.source_from_arrays(
        _FEATURES[part], {k: v[part] for k, v in _LABELS.items()}, task_names)

  if mode == "joint":
    train = source(slice(0, 256), names)
  else:
    train = (source(slice(0, 128), ["shape"]),
             source(slice(128, 256), ["x"]))
  return mtl_dist.MultiTaskData(
      tasks=tuple(_TASKS[name] for name in names), input_shape=_INPUT_SHAPE,
      train=train, eval=source(slice(256, 384), names))


def _weights(model_dir: str, functions: dict) -> list[np.ndarray]:
  """Every variable of the run's newest checkpoint, trainable or not."""
  spec = saved_run.read_model_spec(model_dir)
  model = spec.build(mtl_dist.ModelFunctions(**functions))
  saved_run.restore_model(model, saved_run.find_checkpoint(model_dir))
  return [w.numpy() for w in model.trainable_weights + model.
          non_trainable_weights]


_SERVE = """
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
inputs = tf.constant(np.load(sys.argv[2]))
outputs = {f"{name}:{key}": value.numpy()
           for name, signature in loaded.signatures.items()
           for key, value in signature(inputs=inputs).items()}
assert "mtl_dist" not in sys.modules, "the export needs the package"
np.savez(sys.argv[3], **outputs)
"""


def _serve(export_dir: str, inputs: np.ndarray, scratch) -> dict:
  """The export's outputs, from a process without this package."""
  np.save(scratch / "inputs.npy", inputs)
  done = subprocess.run(
      [sys.executable, "-c", _SERVE, export_dir, str(scratch / "inputs.npy"),
       str(scratch / "served.npz")], capture_output=True, text=True,
      timeout=time_limit(19), check=False, cwd=str(scratch),
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 0, done.stderr[-2000:]
  return dict(np.load(scratch / "served.npz"))


@pytest.mark.parametrize("mode, replicas", [
    ("joint", 1), ("joint", 2), ("alternate", 1), ("alternate", 2)])
def test_a_keras3_model_trains_resumes_evaluates_and_serves_like_tf_keras(
    tmp_path, mode, replicas):
  data = _data(mode)
  config = mtl_dist.TrainConfig(
      model_dir=str(tmp_path / "tf_keras"), mode=mode, train_steps=12,
      steps_per_loop=3, checkpoint_every=6, global_batch_size=16,
      num_cpu_devices=replicas, eval_steps=4, seed=5,
      strategy="one_device" if replicas == 1 else "mirrored")
  # Half the steps, then a resume to the end (and, in Keras 3, an export).
  # Both resume: a checkpoint holds the replicas' mean batch-norm statistics,
  # so on 2 replicas a resumed run differs from one without a break.
  half = dataclasses.replace(config, train_steps=6)
  mtl_dist.train(half, data=data, **_pieces(tf_keras))
  expected = mtl_dist.train(config, data=data, **_pieces(tf_keras))

  keras3 = _pieces(keras)
  model_dir = str(tmp_path / "keras3")
  half = dataclasses.replace(half, model_dir=model_dir)
  assert mtl_dist.train(half, data=data, **keras3)["step"] == 6
  export_dir = str(tmp_path / "export")
  summary = mtl_dist.train(
      dataclasses.replace(half, train_steps=12, export_dir=export_dir),
      data=data, **keras3)
  assert summary["step"] == 12
  for task, metrics in expected["eval"].items():
    for name, value in metrics.items():
      np.testing.assert_allclose(summary["eval"][task][name], value,
                                 rtol=1e-6, atol=1e-6, err_msg=name)
  got = _weights(model_dir, keras3)
  want = _weights(config.model_dir, _pieces(tf_keras))
  assert len(got) == len(want) == 12  # BN: 2 trainable, 2 statistics.
  for got_weight, want_weight in zip(got, want):
    np.testing.assert_allclose(got_weight, want_weight, atol=1e-6)
  assert np.abs(got[-2]).max() > 0  # The BN statistics moved.

  # The sidecar restores the Keras 3 model and evaluates it as the tf_keras
  # one. (On 2 replicas not as the run's last evaluation did: there each
  # replica normalised with its own batch-norm statistics.)
  (evaluation,) = mtl_dist.evaluate(model_dir, data=data,
                                    num_cpu_devices=replicas, **keras3)
  (reference,) = mtl_dist.evaluate(config.model_dir, data=data,
                                   num_cpu_devices=replicas,
                                   **_pieces(tf_keras))
  assert evaluation.step == reference.step == 12
  assert sorted(evaluation.metrics) == sorted(reference.metrics)
  for name, value in reference.metrics.items():
    np.testing.assert_allclose(evaluation.metrics[name], value, rtol=1e-6,
                               atol=1e-6, err_msg=name)

  # TensorFlow alone serves the export, as the tf_keras model computes.
  inputs = _FEATURES[256:264]
  served = _serve(export_dir, inputs, tmp_path)
  spec = saved_run.read_model_spec(config.model_dir)
  model = spec.build(mtl_dist.ModelFunctions(**_pieces(tf_keras)))
  saved_run.restore_model(model, saved_run.find_checkpoint(config.model_dir))
  outputs = model(inputs, training=False)
  # One signature for all tasks and one per task.
  for key, want in (("serving_default:shape_logits", outputs["shape"]),
                    ("shape:logits", outputs["shape"]),
                    ("serving_default:x_prediction", outputs["x"]),
                    ("x:prediction", outputs["x"])):
    np.testing.assert_allclose(served[key], want, atol=1e-5, err_msg=key)


def _trainer(framework, strategy, dtype=None, jit_compile=False):
  """A joint trainer of `_pieces(framework)` and its data iterator."""
  functions = _pieces(framework, dtype=dtype, batch_norm=False)
  tasks = [_TASKS["shape"], _TASKS["x"]]
  with strategy.scope():
    model = mtl_dist.build_model(tasks, _INPUT_SHAPE, functions["trunk_fn"],
                                 head_fn=functions["head_fn"])
  trainer = mtl_dist.Trainer(
      strategy, model, tasks, mode="joint", global_batch_size=16,
      optimizer_factory=mtl_dist.make_optimizer_factory("adam", 0.01),
      jit_compile=jit_compile, seed=1)
  source = mtl_dist.source_from_arrays(_FEATURES, _LABELS, ["shape", "x"])
  iterator = iter(mtl_dist.distribute_train(strategy, source, 16, seed=2))
  return trainer, model, iterator


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "mixed_float16"])
def test_keras3_mixed_precision_under_xla_on_two_replicas(dtype):
  results = {}
  for framework in (tf_keras, keras):
    trainer, model, iterator = _trainer(framework, make_strategy(2), dtype,
                                        jit_compile=True)
    result = trainer.train([iterator], 4)
    results[framework.__name__] = (model, result)
  (want, want_result), (got, got_result) = results.values()
  # float16 needs loss scaling, also when only Keras 3 layers say so.
  scaled = dtype == "mixed_float16"
  assert bool(got_result.loss_scales) == bool(want_result.loss_scales) == (
      scaled)
  for got_weight, want_weight in zip(got.trainable_weights,
                                     want.trainable_weights):
    assert got_weight.dtype == tf.float32
    np.testing.assert_allclose(got_weight.numpy(), want_weight.numpy(),
                               atol=1e-6)


def _train_two_steps(strategy, model, tasks) -> None:
  """Two joint SGD steps of `model` on shapes."""
  trainer = mtl_dist.Trainer(
      strategy, model, tasks, mode="joint", global_batch_size=16,
      optimizer_factory=mtl_dist.make_optimizer_factory("sgd", 0.1))
  source = mtl_dist.source_from_arrays(_FEATURES, _LABELS, ["shape", "x"])
  trainer.train([iter(mtl_dist.distribute_train(strategy, source, 16,
                                                seed=0))], 2)


class _Scale(keras.layers.Layer):
  """A Keras 3 layer subclass with a weight of its own."""

  def build(self, input_shape):
    self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

  def call(self, inputs):
    return inputs * self.scale


def test_a_functional_keras3_model_with_a_custom_layer_trains():
  def trunk_fn():
    inputs = keras.Input(_INPUT_SHAPE)
    hidden = keras.layers.Dense(_WIDTH, activation="tanh")(
        keras.layers.Flatten()(inputs))
    return keras.Model(inputs, _Scale()(hidden))

  strategy = make_strategy(2)
  tasks = [_TASKS["shape"], _TASKS["x"]]
  with strategy.scope():
    model = mtl_dist.build_model(tasks, _INPUT_SHAPE, trunk_fn)
  assert [v.shape.as_list() for v in model.shared_variables] == [
      [int(np.prod(_INPUT_SHAPE)), _WIDTH], [_WIDTH], [_WIDTH]]
  before = [v.numpy() for v in model.shared_variables]
  _train_two_steps(strategy, model, tasks)
  for variable, old in zip(model.shared_variables, before):
    assert np.abs(variable.numpy() - old).max() > 0, variable.name


class _LinearModule(tf.Module):
  """A trunk written as a plain tf.Module."""

  def __init__(self):
    super().__init__()
    rng = np.random.default_rng(3)
    self.kernel = tf.Variable(rng.normal(0.0, 0.1, (int(np.prod(
        _INPUT_SHAPE)), _WIDTH)).astype(np.float32))

  def __call__(self, inputs):
    return tf.tanh(tf.reshape(inputs, [tf.shape(inputs)[0], -1])
                   @ self.kernel)


def test_shared_trunk_model_takes_keras3_layers_directly():
  with make_strategy(2).scope():
    model = mtl_dist.SharedTrunkModel(keras.layers.Dense(4),
                                      {"shape": keras.layers.Dense(3)})
    outputs = model(_FEATURES[:2].reshape(2, -1))
  assert outputs["shape"].shape == (2, 3)
  assert all(isinstance(v, tf.Variable) for v in model.trainable_variables)
  assert len(model.trainable_variables) == 4


def test_a_tf_module_trunk_trains_on_two_replicas():
  strategy = make_strategy(2)
  tasks = [_TASKS["shape"], _TASKS["x"]]
  with strategy.scope():
    model = mtl_dist.build_model(tasks, _INPUT_SHAPE, _LinearModule)
  kernel = model.trunk.module.kernel
  assert model.shared_variables == [kernel]
  before = kernel.numpy()
  _train_two_steps(strategy, model, tasks)
  assert np.abs(kernel.numpy() - before).max() > 0


def test_keras3_losses_reach_the_model_and_its_variables_are_tensorflow():
  strategy = make_strategy(2)
  head = keras.layers.Dense(3, activity_regularizer=keras.regularizers.L2(
      0.5), kernel_regularizer=keras.regularizers.L1(0.25))
  with strategy.scope():
    model = mtl_dist.build_model(
        [_TASKS["shape"]], _INPUT_SHAPE, trunk="mlp", trunk_width=4,
        trunk_depth=1, head_fn=lambda task: head)
  assert isinstance(model.heads["shape"], pieces.Keras3Piece)
  variables = model.task_variables("shape")
  assert [v.shape.as_list() for v in variables] == [[4, 3], [3]]
  assert all(isinstance(v, tf.distribute.DistributedValues)
             for v in variables)
  inputs = _FEATURES[:5]
  outputs = model(inputs)["shape"]
  losses = model.regularization_losses("shape")
  # Keras 3 divides an activity regularizer by the batch size, as tf_keras.
  expected = [0.5 * np.sum(np.square(outputs.numpy())) / len(inputs),
              0.25 * np.abs(head.kernel.numpy()).sum()]
  np.testing.assert_allclose(sorted(float(v) for v in losses),
                             sorted(expected), rtol=1e-5)


class _Torchish:
  """Stands for a module of another framework."""

  def __call__(self, inputs):
    return inputs


class _HoldsKeras3(tf.Module):

  def __init__(self):
    super().__init__()
    self.dense = keras.layers.Dense(4)

  def __call__(self, inputs):
    return self.dense(inputs)


@pytest.mark.parametrize("make, message", [
    (_Torchish, "trunk_fn: got test_keras3._Torchish; a piece must be"),
    (_HoldsKeras3, "holding the Keras 3 layer at .dense, whose variables it "
     "cannot see"),
    (lambda: tf.Module(), "a tf.Module without __call__"),
])
def test_a_piece_that_cannot_be_trained_is_refused_before_training(
    tmp_path, make, message):
  model_dir = tmp_path / "run"
  with pytest.raises(mtl_dist.ConfigError) as error:
    mtl_dist.train(mtl_dist.TrainConfig(model_dir=str(model_dir),
                                        strategy="one_device"),
                   data=_data("joint"), trunk_fn=make)
  assert message in str(error.value) and "\n" not in str(error.value)
  assert not model_dir.exists()


def test_a_keras3_layer_of_another_backend_is_refused_naming_the_fix(
    monkeypatch):
  # The backend is fixed when keras is imported (KERAS_BACKEND); the others
  # need packages this project does not install, so the check is shown on
  # what it reads.
  monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
  with pytest.raises(mtl_dist.ConfigError) as error:
    mtl_dist.build_model([_TASKS["shape"]], _INPUT_SHAPE,
                         lambda: keras.layers.Dense(4))
  assert str(error.value) == (
      "trunk_fn: got a Keras 3 layer of the 'jax' backend, whose "
      "variables TensorFlow cannot train or checkpoint: set "
      "KERAS_BACKEND=tensorflow before importing keras")
