"""The Python API with the user's own data, trunk, heads and losses."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import mtl_dist
from mtl_dist.data import shapes

_TASKS = {task.name: task for task in shapes.TASKS}


def _data(task_names, mode="joint", examples=256, as_dataset=False,
          tasks=None):
  """shapes examples as the user's own data, in memory or as tf.data."""
  features, labels = shapes.generate(examples * len(task_names), seed=4)
  tasks = tasks or tuple(_TASKS[name] for name in task_names)

  def source(part, names):
    if not as_dataset:
      return mtl_dist.source_from_arrays(
          features[part], {k: v[part] for k, v in labels.items()}, names)
    dataset = tf.data.Dataset.from_tensor_slices(
        (features[part], {name: labels[name][part] for name in names}))
    return mtl_dist.source_from_dataset(dataset, names)

  if mode == "joint":
    train = (source(slice(0, examples), list(task_names)),)
  else:
    train = tuple(source(slice(i * examples, (i + 1) * examples), [name])
                  for i, name in enumerate(task_names))
  return mtl_dist.MultiTaskData(tasks=tasks, input_shape=features.shape[1:],
                                train=train, eval=train)


def _config(tmp_path, name, **settings):
  settings = dict(dict(train_steps=20, steps_per_loop=10,
                       strategy="one_device"), **settings)
  return mtl_dist.TrainConfig(model_dir=str(tmp_path / name), **settings)


def test_a_loss_function_trains_like_the_same_built_in_loss(tmp_path):
  def mse(labels, outputs):
    labels = tf.reshape(tf.cast(labels, tf.float32), tf.shape(outputs))
    return tf.reduce_mean(tf.square(outputs - labels), axis=-1)

  def xent(labels, logits):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)

  custom = (dataclasses.replace(_TASKS["shape"], loss=xent),
            dataclasses.replace(_TASKS["x"], loss=mse))
  builtin = _data(["shape", "x"])
  summaries = [
      mtl_dist.train(_config(tmp_path, "builtin", seed=3), data=builtin),
      mtl_dist.train(_config(tmp_path, "custom", seed=3),
                     data=dataclasses.replace(builtin, tasks=custom))]
  for task in ("shape", "x"):
    for metric, value in summaries[0]["eval"][task].items():
      np.testing.assert_allclose(summaries[1]["eval"][task][metric], value,
                                 rtol=1e-5)
  spec = json.load(open(tmp_path / "custom" / "model.json"))
  assert spec["custom_losses"] == ["shape", "x"] and spec["custom_data"]


def test_user_datasets_trunk_and_heads_in_alternate_mode_on_two_replicas(
    tmp_path):
  def trunk_fn():
    return tf_keras.Sequential([tf_keras.layers.Conv2D(4, 3, strides=2),
                                tf_keras.layers.Flatten(),
                                tf_keras.layers.Dense(16, activation="relu")])

  def head_fn(task):
    return tf_keras.layers.Dense(task.output_size, name=f"mine_{task.name}")

  data = _data(["shape", "y"], mode="alternate", as_dataset=True)
  config = _config(tmp_path, "run", mode="alternate", num_cpu_devices=2,
                   strategy="mirrored", task_weights={"shape": 3, "y": 1},
                   schedule="weights", train_steps=40)
  summary = mtl_dist.train(config, data=data, trunk_fn=trunk_fn,
                           head_fn=head_fn)
  assert summary["replicas"] == 2 and sum(summary["task_steps"].values()) == 40
  assert summary["task_steps"]["shape"] > summary["task_steps"]["y"]
  names = [n for n, _ in tf.train.list_variables(
      os.path.join(config.model_dir, "checkpoints"))]
  assert any("heads/y/" in n for n in names)
  spec = json.load(open(os.path.join(config.model_dir, "model.json")))
  assert spec["trunk"] == "custom" and spec["custom_heads"]
  # A resume rebuilds the same pieces and continues.
  longer = dataclasses.replace(config, train_steps=60)
  resumed = mtl_dist.train(longer, data=data, trunk_fn=trunk_fn,
                           head_fn=head_fn)
  assert sum(resumed["task_steps"].values()) == 60


def test_source_from_dataset():
  features = np.zeros((10, 4), np.float32)
  labels = np.arange(10, dtype=np.int32) % 3
  plain = tf.data.Dataset.from_tensor_slices((features, labels))
  source = mtl_dist.source_from_dataset(plain, ["a"])
  assert source.num_examples == 10 and source.task_names == ("a",)
  element = next(iter(source.make_dataset()))
  assert set(element[1]) == {"a"}
  # Unknown cardinality is counted; a function is called per pipeline.
  filtered = lambda: plain.filter(lambda x, y: y < 2)  # noqa: E731
  assert mtl_dist.source_from_dataset(filtered, ["a"]).num_examples == 7
  with pytest.raises(ValueError, match="infinite"):
    mtl_dist.source_from_dataset(plain.repeat(), ["a"])
  with pytest.raises(ValueError, match="exactly one task"):
    mtl_dist.source_from_dataset(plain, ["a", "b"])
  labelled = tf.data.Dataset.from_tensor_slices((features, {"a": labels}))
  with pytest.raises(ValueError, match=r"lack task\(s\) \['b'\]"):
    mtl_dist.source_from_dataset(labelled, ["a", "b"])
  with pytest.raises(ValueError, match="pairs"):
    mtl_dist.source_from_dataset(tf.data.Dataset.range(3), ["a"])


def test_what_does_not_fit_is_refused_before_anything_is_written(tmp_path):
  joint = _data(["shape", "x"])
  alternate = _data(["shape", "x"], mode="alternate")
  cases = [
      (_config(tmp_path, "a", mode="alternate"), joint, {},
       "alternate mode trains from one source per task"),
      (_config(tmp_path, "b"), alternate, {},
       "joint mode trains from one source labelled for every task"),
      (_config(tmp_path, "c", dataset="toy_regression"), joint, {},
       "--dataset=toy_regression: describes a built-in dataset"),
      (_config(tmp_path, "d", tasks=["x"]), joint, {},
       "--tasks=x: the given data trains shape,x"),
      (_config(tmp_path, "e", trunk="conv"), joint,
       {"trunk_fn": tf_keras.layers.Flatten},
       "--trunk=conv: describes the built-in trunk"),
      (_config(tmp_path, "f"), joint,
       {"head_fn": lambda task: tf_keras.layers.Dense(2)},
       "task 'shape': its head outputs 2 units, the task needs 3"),
      (_config(tmp_path, "g"),
       dataclasses.replace(joint, eval=joint.eval[:0]), {},
       r"no eval data for \['shape', 'x'\]"),
      (_config(tmp_path, "h", task_weights={"shpae": 2.0}), joint, {},
       "--task_weights: 'shpae' is not a trained task"),
      (_config(tmp_path, "i"), dataclasses.replace(joint, tasks=(
          _TASKS["shape"], dataclasses.replace(
              _TASKS["x"], loss=lambda y, o: tf.reduce_mean((y - o) ** 2))))
       , {}, r"task 'x': its loss function returned shape \(\); it must "
       r"return one loss per example"),
  ]
  for config, data, functions, message in cases:
    with pytest.raises(mtl_dist.ConfigError, match=message):
      mtl_dist.train(config, data=data, **functions)
    assert not os.path.exists(config.model_dir)


def test_source_from_arrays_takes_one_tasks_label_array_or_says_why_not():
  features, labels = shapes.generate(64, seed=2)
  source = mtl_dist.source_from_arrays(features, labels["shape"], ["shape"])
  _, kept = source.arrays
  assert list(kept) == ["shape"]
  np.testing.assert_array_equal(kept["shape"], labels["shape"])
  with pytest.raises(mtl_dist.ConfigError, match="must be a dict of task "
                     "name to label array for the 2 tasks"):
    mtl_dist.source_from_arrays(features, labels["shape"], ["shape", "x"])
  with pytest.raises(mtl_dist.ConfigError, match=r"must be a list of task "
                     r"names, e.g. \['shape'\]"):
    mtl_dist.source_from_arrays(features, labels, "shape")


def test_joint_mode_takes_one_source_as_the_docs_say():
  source = _data(["shape", "x"]).train[0]
  data = mtl_dist.MultiTaskData(tasks=[_TASKS["shape"], _TASKS["x"]],
                                input_shape=[28, 28, 1], train=source,
                                eval=source)
  assert data.train == data.eval == (source,)
  assert data.tasks == (_TASKS["shape"], _TASKS["x"])
  assert data.input_shape == (28, 28, 1)


def _wrong_arguments():
  """(call, what its one-line ConfigError says) for wrong arguments."""
  features, labels = shapes.generate(8, seed=1)
  source = mtl_dist.source_from_arrays(features, labels, ["shape"])
  data = mtl_dist.MultiTaskData(tasks=[_TASKS["shape"]],
                                input_shape=features.shape[1:], train=source,
                                eval=source)
  config = mtl_dist.TrainConfig(model_dir="unused", strategy="one_device")
  replace = dataclasses.replace
  return [
      (lambda: mtl_dist.train({"model_dir": "r"}),
       "train: config={'model_dir': 'r'}: must be a TrainConfig, got a dict"),
      (lambda: mtl_dist.train(config, data=[source]),
       "train: data=[ExampleSource("),
      (lambda: mtl_dist.train(replace(config, train_steps="10")),
       "--train_steps='10': must be an integer, got a str"),
      (lambda: mtl_dist.train(replace(config, learning_rate="0.1")),
       "--learning_rate='0.1': must be a number, got a str"),
      (lambda: mtl_dist.train(replace(config, tasks="shape")),
       "--tasks='shape': must be a list of strings or None, got a str"),
      (lambda: mtl_dist.train(replace(config, task_weights=[1, 2])),
       "--task_weights=[1, 2]: must be a dict of strings to numbers or None"),
      (lambda: mtl_dist.train(replace(config, task_weights={"shape": "2"})),
       "got a dict whose 'shape' is a str"),
      (lambda: mtl_dist.train(config, data=data,
                              trunk_fn=tf_keras.layers.Dense(4)),
       "trunk_fn: expects a function that makes a new piece on each call, "
       "got a Dense"),
      (lambda: mtl_dist.TaskSpec(3, "regression", size=1),
       "TaskSpec.name=3: must be a string, got an int"),
      (lambda: mtl_dist.TaskSpec("a", "regression", size=1, weight="1"),
       "TaskSpec.weight='1': must be a number"),
      (lambda: mtl_dist.MultiTaskData(tasks=["shape"], input_shape=(4,),
                                      train=source, eval=source),
       "MultiTaskData.tasks: expects a mtl_dist.TaskSpec or a list of them, "
       "got a str"),
      (lambda: replace(data, input_shape=64),
       "MultiTaskData.input_shape=64: expects one example's shape"),
      (lambda: replace(data, train=features),
       "MultiTaskData.train: expects a source"),
      (lambda: mtl_dist.source_from_arrays(features, labels["shape"][:3],
                                           ["shape"]),
       "labels of 'shape' have shape (3,), not 8 rows like the features"),
      (lambda: mtl_dist.source_from_dataset(features, ["shape"]),
       "must be a tf.data.Dataset or a function, got a NumPy array"),
      (lambda: mtl_dist.build_model(["shape"], (4,)),
       "build_model: tasks=['shape']: must be a list of TaskSpec objects, "
       "got a list holding a str"),
      (lambda: mtl_dist.build_model([_TASKS["shape"]], 4),
       "build_model: input_shape=4: must be a list of integers, got an int"),
      (lambda: mtl_dist.evaluate(None),
       "evaluate: model_dir=None: must be a string, got a NoneType"),
      (lambda: mtl_dist.export_run("run", 7),
       "export_run: export_dir=7: must be a string, got an int"),
      (lambda: mtl_dist.predict(3, features),
       "predict: export_dir=3: must be a string"),
      (lambda: mtl_dist.make_optimizer_factory("adamw", 0.1),
       "--optimizer=adamw: must be one of adam, sgd"),
      (lambda: mtl_dist.make_optimizer_factory("adam", 0),
       "--learning_rate=0: must be positive"),
      (lambda: mtl_dist.create_strategy("mirror"),
       "--strategy=mirror: must be one of"),
      (lambda: mtl_dist.configure_cpu_devices(0),
       "--num_cpu_devices=0: must be a positive integer"),
      (lambda: mtl_dist.distribute_train(
          mtl_dist.create_strategy("one_device"), features, 8, seed=0),
       "distribute_train: source=array("),
      (lambda: mtl_dist.format_results("x"),
       "format_results: summary='x': must be a dict"),
      (lambda: mtl_dist.aggregate("upgradd", np.ones((2, 3), np.float32)),
       "unknown aggregator 'upgradd'"),
      (lambda: mtl_dist.aggregate("upgrad", np.ones(3, np.float32)),
       "aggregate() needs a [T, P] matrix of task gradients, got shape (3,)"),
      (lambda: mtl_dist.loss_weights("dwa", [[1.0]]),
       "loss_weights() needs a [T] vector of task losses"),
      (lambda: mtl_dist.Trainer(
          mtl_dist.create_strategy("one_device"), "model", [_TASKS["shape"]],
          mode="joint", global_batch_size=8,
          optimizer_factory=mtl_dist.make_optimizer_factory("sgd", 0.1)),
       "Trainer: model='model': must be a MultiTaskModel, got a str"),
      (lambda: mtl_dist.build_architecture(
          [_TASKS["shape"]], (4,), mtl_dist.ArchitectureConfig(
              architecture="moe")),
       "--architecture=moe: must be one of"),
  ]


def test_wrong_arguments_are_named_in_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for call, message in _wrong_arguments():
    with pytest.raises(mtl_dist.ConfigError) as error:
      call()
    assert message in str(error.value), (message, str(error.value))
    assert "\n" not in str(error.value)
  assert not os.listdir(tmp_path)  # Nothing was written.


def test_numpy_scalars_paths_and_shapes_are_taken_as_python_values(tmp_path):
  task = mtl_dist.TaskSpec("digit", "classification",
                           num_classes=np.int64(10), weight=np.float32(2))
  assert type(task.num_classes) is int and type(task.weight) is float
  config = mtl_dist.TrainConfig(model_dir=tmp_path / "run",
                                seed=np.int64(3), strategy="one_device")
  config.validate()
  assert config.model_dir == str(tmp_path / "run")
  assert json.dumps(dataclasses.asdict(config))  # What config.json holds.
  with mtl_dist.create_strategy("one_device").scope():
    model = mtl_dist.build_model([task], tf.TensorShape([4]), "mlp", 4, 1)
  assert model.heads["digit"].units == 10
  with pytest.raises(mtl_dist.ConfigError, match="has no config.json"):
    mtl_dist.evaluate(tmp_path / "missing")
  with pytest.raises(mtl_dist.ConfigError, match="trunk_fn: expects a "
                     "function that makes a new piece on each call"):
    mtl_dist.build_model([task], (4,), tf_keras.layers.Dense(4))


def _messages(caplog) -> list[str]:
  return [record.getMessage() for record in caplog.records]


def test_train_shows_its_progress_unless_verbose_is_false(tmp_path, caplog):
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  verbosity = absl_logging.get_verbosity()
  logger_level = absl_logging.get_absl_logger().level
  config = _config(tmp_path, "talks", train_steps=20, log_every=10,
                   eval_every=10, checkpoint_every=10, trunk_width=16,
                   train_examples=256, eval_examples=128)
  with caplog.at_level("INFO"):
    mtl_dist.train(config)
  messages = _messages(caplog)
  assert any(m.startswith("step 10/20 | loss shape=") and "ETA" in m
             for m in messages), messages
  evals = [m for m in messages if " eval | " in m]
  assert [m.split(" eval")[0] for m in evals] == ["step 10", "step 20"]
  assert "shape: loss=" in evals[0] and "x: loss=" in evals[0]
  # TensorFlow's INFO lines through absl (one per checkpoint save) are not
  # the run's progress.
  assert not any("Sharding callback" in m for m in messages), messages
  assert absl_logging.get_verbosity() == verbosity

  caplog.clear()
  with caplog.at_level("INFO"):
    summary = mtl_dist.train(dataclasses.replace(
        config, model_dir=str(tmp_path / "quiet")), verbose=False)
  assert summary["step"] == 20 and summary["steps_this_run"] == 20
  assert not [m for m in _messages(caplog) if "step" in m], _messages(caplog)
  assert absl_logging.get_verbosity() == verbosity
  assert absl_logging.get_absl_logger().level == logger_level


def test_a_finished_run_run_again_trains_nothing_and_keeps_its_record(
    tmp_path, caplog):
  config = _config(tmp_path, "done", train_steps=20, trunk_width=16,
                   train_examples=256, eval_examples=128)
  first = mtl_dist.train(config, verbose=False)
  files = {name: (tmp_path / "done" / name).read_bytes()
           for name in ("summary.json", "metrics.jsonl", "config.json")}
  with caplog.at_level("INFO"):
    again = mtl_dist.train(config)
  assert again["steps_this_run"] == 0 and again["step"] == 20
  assert again["eval"] == first["eval"]
  assert again["examples_per_second"] == first["examples_per_second"] > 0
  assert any("finished at step 20 already" in m for m in _messages(caplog))
  assert {name: (tmp_path / "done" / name).read_bytes()
          for name in files} == files
  # A summary of an earlier step (a run killed after its last checkpoint,
  # before its summary) is replaced.
  stale = dict(json.loads(files["summary.json"]), step=10)
  (tmp_path / "done" / "summary.json").write_text(json.dumps(stale))
  assert mtl_dist.train(config, verbose=False)["steps_this_run"] == 0
  assert json.loads((tmp_path / "done" / "summary.json").read_text())[
      "step"] == 20


@pytest.mark.parametrize("changed, named", [
    (dict(trunk_width=32), "--trunk_width=32 (the run's: --trunk_width=16)"),
    (dict(tasks=("shape", "x")),
     "--tasks=shape,x (the run's: --tasks=shape,scale,orientation,x,y)"),
    (dict(mode="alternate"), "--mode=alternate (the run's: --mode=joint)"),
])
def test_a_run_dir_of_other_settings_is_refused_before_any_restore(
    tmp_path, changed, named):
  config = _config(tmp_path, "run", train_steps=10, trunk_width=16,
                   eval_examples=128)
  mtl_dist.train(config, verbose=False)
  files = sorted(os.listdir(tmp_path / "run"))
  with pytest.raises(mtl_dist.ConfigError) as raised:
    mtl_dist.train(dataclasses.replace(config, train_steps=20, **changed),
                   verbose=False)
  assert named in str(raised.value) and "config.json" in str(raised.value)
  assert "\n" not in str(raised.value)
  assert str(raised.value).count("(the run's:") == 1  # Only what was given.
  assert sorted(os.listdir(tmp_path / "run")) == files
  # What a checkpoint does not depend on may change on resume.
  resumed = mtl_dist.train(dataclasses.replace(
      config, train_steps=20, learning_rate=0.01, eval_every=5,
      mixed_precision="bfloat16",  # Adds no state, unlike float16.
      tasks=("shape", "scale", "orientation", "x", "y")), verbose=False)
  assert resumed["steps_this_run"] == 10


def test_a_run_on_its_own_data_resumes_with_its_tasks_named(tmp_path):
  data = _data(["shape", "x"])
  config = _config(tmp_path, "own", train_steps=10)
  mtl_dist.train(config, data=data, verbose=False)
  resumed = mtl_dist.train(dataclasses.replace(
      config, train_steps=20, tasks=("shape", "x")), data=data,
                           verbose=False)
  assert resumed["steps_this_run"] == 10
