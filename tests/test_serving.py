"""Export, serving signatures and predictions: mtl_dist.serving, mtl-export,
mtl-predict and mtl-train --export_dir."""

import json
import os
import subprocess
import sys

from conftest import time_limit
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.run import export as export_lib
from mtl_dist.run import saved_run

_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _launch(module: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *flags],
                        capture_output=True, text=True, timeout=time_limit(10),
                        env=_ENV, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A short joint run on shapes (2 replicas) exported at the end."""
  root = tmp_path_factory.mktemp("serving")
  config = mtl_dist.TrainConfig(
      model_dir=str(root / "run"), export_dir=str(root / "export"),
      train_steps=60, steps_per_loop=30, trunk_width=32,
      train_examples=1024, eval_examples=256, num_cpu_devices=2,
      strategy="mirrored")
  summary = mtl_dist.train(config)
  return root, summary


def _in_memory_outputs(model_dir: str, inputs: np.ndarray,
                       trunk_fn=None) -> dict:
  """The trained model's head outputs, computed in this process."""
  spec = saved_run.read_model_spec(model_dir)
  model = spec.build(mtl_dist.ModelFunctions(trunk_fn=trunk_fn))
  saved_run.restore_model(model, saved_run.find_checkpoint(model_dir))
  return {name: value.numpy() for name, value in model(inputs).items()}


_FRESH_PROCESS = """
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
inputs = tf.constant(np.load(sys.argv[2]))
results = {}
for name, signature in loaded.signatures.items():
  for key, value in signature(inputs=inputs).items():
    results[f"{name}:{key}"] = value.numpy()
assert "mtl_dist" not in sys.modules and "tf_keras" not in sys.modules
np.savez(sys.argv[3], **results)
"""


def test_export_reloads_without_the_package_and_predicts_like_the_model(
    trained, tmp_path):
  root, _ = trained
  inputs, _ = shapes.generate(16, seed=5)
  np.save(tmp_path / "inputs.npy", inputs)
  done = subprocess.run(
      [sys.executable, "-c", _FRESH_PROCESS, str(root / "export"),
       str(tmp_path / "inputs.npy"), str(tmp_path / "served.npz")],
      capture_output=True, text=True, timeout=time_limit(10), env=_ENV,
      check=False,
      cwd=str(tmp_path))  # Not the checkout: mtl_dist is not importable.
  assert done.returncode == 0, done.stderr[-2000:]
  served = dict(np.load(tmp_path / "served.npz"))
  expected = _in_memory_outputs(str(root / "run"), inputs)
  tasks = ["shape", "scale", "orientation", "x", "y"]
  assert {key.split(":")[0] for key in served} == {"serving_default", *tasks}
  logits = expected["shape"]
  for prefix in ("serving_default:shape_", "shape:"):
    np.testing.assert_allclose(served[prefix + "logits"], logits, atol=1e-5)
    np.testing.assert_allclose(served[prefix + "probabilities"],
                               tf.nn.softmax(logits).numpy(), atol=1e-5)
    np.testing.assert_array_equal(served[prefix + "class"],
                                  logits.argmax(axis=1))
  for task in tasks[1:]:
    np.testing.assert_allclose(served[f"{task}:prediction"], expected[task],
                               atol=1e-5)
    np.testing.assert_allclose(
        served[f"serving_default:{task}_prediction"], expected[task],
        atol=1e-5)
  # A task's signature holds its own outputs only.
  assert sorted(k for k in served if k.startswith("x:")) == ["x:prediction"]


def test_mtl_export_and_mtl_predict(trained, tmp_path):
  root, _ = trained
  export_dir = tmp_path / "again"
  exported = _launch("launch.export", f"--model_dir={root / 'run'}",
                     f"--export_dir={export_dir}", "--checkpoint=60")
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert "ckpt-60" in exported.stdout
  assert tf.saved_model.contains_saved_model(str(export_dir))
  assert not os.path.exists(f"{export_dir}.partial")

  inputs, _ = shapes.generate(10, seed=9)
  np.save(tmp_path / "x.npy", inputs.astype(np.float64))  # Cast to float32.
  expected = mtl_dist.predict(str(root / "export"), inputs, batch_size=4)
  for output in ("p.npz", "p.jsonl"):
    done = _launch("launch.predict", f"--export_dir={export_dir}",
                   f"--input={tmp_path / 'x.npy'}",
                   f"--output={tmp_path / output}", "--batch_size=3")
    assert done.returncode == 0, done.stderr[-2000:]
  arrays = dict(np.load(tmp_path / "p.npz"))
  assert sorted(arrays) == sorted(expected)
  for name, values in expected.items():
    np.testing.assert_allclose(arrays[name], values, atol=1e-5)
  lines = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
  assert len(lines) == 10
  np.testing.assert_allclose([line["x_prediction"] for line in lines],
                             expected["x_prediction"], atol=1e-5)
  assert [line["shape_class"] for line in lines] == list(
      expected["shape_class"])

  one_task = mtl_dist.predict(str(export_dir), inputs, signature="shape")
  assert sorted(one_task) == ["class", "logits", "probabilities"]


def test_bad_exports_and_inputs_are_refused_naming_the_problem(trained,
                                                              tmp_path):
  root, _ = trained
  run, export = str(root / "run"), str(root / "export")
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "keep.txt").write_text("not an export")
  refused = [
      (lambda: mtl_dist.export_run(run, str(tmp_path / "data")),
       "holds no SavedModel"),
      (lambda: mtl_dist.export_run(str(tmp_path), str(tmp_path / "e")),
       "has no model.json"),
      (lambda: mtl_dist.export_run(run, str(tmp_path / "e"), checkpoint="7"),
       "--checkpoint=7"),
      (lambda: mtl_dist.predict(export, np.zeros((2, 16, 16, 1), np.float32)),
       r"the model takes \[N, 32, 32, 1\]"),
      (lambda: mtl_dist.predict(export, np.zeros((2, 32, 32, 1), np.int32)),
       "the inputs are int32"),
      (lambda: mtl_dist.predict(export, np.zeros((2, 32, 32, 1)),
                                signature="nope"), "--signature=nope"),
      (lambda: mtl_dist.predict(str(tmp_path), np.zeros((2, 32, 32, 1))),
       "holds no SavedModel"),
      (lambda: export_lib.load_inputs(str(tmp_path / "none.npy")),
       "cannot be read as .npy"),
      (lambda: mtl_dist.write_predictions(str(tmp_path / "p.csv"), {}),
       "must end in .npz or .jsonl"),
  ]
  refused.append((lambda: mtl_dist.TrainConfig(
      model_dir=run, export_dir=str(root)).validate(),
                  "would delete the run's files"))
  for call, message in refused:
    with pytest.raises(mtl_dist.ConfigError, match=message):
      call()
  assert (tmp_path / "data" / "keep.txt").read_text() == "not an export"

  # The launchers print such errors as one line and exit 2.
  np.save(tmp_path / "wrong.npy", np.zeros((2, 16, 16, 1), np.float32))
  for module, flags, message in [
      ("launch.export", [f"--model_dir={run}",
                         f"--export_dir={tmp_path / 'data'}"],
       "holds no SavedModel"),
      ("launch.predict", [f"--export_dir={export}",
                          f"--input={tmp_path / 'wrong.npy'}",
                          f"--output={tmp_path / 'p.npz'}"],
       "the model takes [N, 32, 32, 1]")]:
    done = _launch(module, *flags)
    assert done.returncode == 2, (module, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert message in last and "error:" in last, (message, last)
  assert not (tmp_path / "p.npz").exists()
  # A failure while running (here: writing the output) is one line, exit 1.
  np.save(tmp_path / "right.npy", np.zeros((2, 32, 32, 1), np.float32))
  done = _launch("launch.predict", f"--export_dir={export}",
                 f"--input={tmp_path / 'right.npy'}",
                 f"--output={tmp_path / 'missing' / 'p.npz'}")
  assert done.returncode == 1, done.stderr[-2000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("mtl-predict: error: NotFoundError:"), last


def test_a_float16_run_exports_float32_outputs(tmp_path):
  model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
  mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=model_dir, export_dir=export_dir, tasks=["shape", "x"],
      mixed_precision="float16", train_steps=4, steps_per_loop=2,
      trunk_width=16, train_examples=256, eval_examples=64,
      strategy="one_device"))
  inputs, _ = shapes.generate(3, seed=2)
  outputs = mtl_dist.predict(export_dir, inputs)
  assert outputs["shape_probabilities"].dtype == np.float32
  np.testing.assert_allclose(outputs["x_prediction"],
                             _in_memory_outputs(model_dir, inputs)["x"],
                             atol=1e-3)


def test_a_custom_trunk_run_is_exported_from_python_only(tmp_path):
  def trunk_fn():
    return tf_keras.Sequential([tf_keras.layers.Flatten(),
                                tf_keras.layers.Dense(8, activation="tanh")])

  features, labels = shapes.generate(256, seed=1)
  tasks = tuple(t for t in shapes.TASKS if t.name in ("shape", "x"))
  source = mtl_dist.source_from_arrays(features, labels, ["shape", "x"])
  data = mtl_dist.MultiTaskData(tasks=tasks, input_shape=features.shape[1:],
                                train=(source,), eval=(source,))
  model_dir = str(tmp_path / "run")
  mtl_dist.train(mtl_dist.TrainConfig(model_dir=model_dir, train_steps=10,
                                      steps_per_loop=5, strategy="one_device"),
                 data=data, trunk_fn=trunk_fn)
  with pytest.raises(mtl_dist.ConfigError, match="trunk made in Python"):
    mtl_dist.export_run(model_dir, str(tmp_path / "e"))
  mtl_dist.export_run(model_dir, str(tmp_path / "e"), trunk_fn=trunk_fn)
  outputs = mtl_dist.predict(str(tmp_path / "e"), features[:4])
  expected = _in_memory_outputs(model_dir, features[:4], trunk_fn)
  np.testing.assert_allclose(outputs["x_prediction"], expected["x"],
                             atol=1e-6)
