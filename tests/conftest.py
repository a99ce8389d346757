"""Test set-up: four logical CPU devices, so tests run 1, 2 and 4 replicas.

The split has to happen before TensorFlow initialises its runtime, hence at
import time of this module, which pytest loads before any test module.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest
import tensorflow as tf

NUM_LOGICAL_CPUS = 4
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)

import mtl_dist  # pylint: disable=g-import-not-at-top
from mtl_dist import data as data_lib
from mtl_dist.data import shapes
from mtl_dist.model import architectures
from mtl_dist.model import settings as model_settings


def make_strategy(replicas: int) -> tf.distribute.Strategy:
  """One device for 1 replica, else MirroredStrategy over logical CPUs."""
  if replicas == 1:
    return mtl_dist.create_strategy("one_device", 1)
  return mtl_dist.create_strategy("mirrored", replicas)


@pytest.fixture(scope="session")
def shapes_arrays():
  """512 generated shapes examples with all five labels."""
  return shapes.generate(512, seed=123)


@pytest.fixture
def build_trainer(shapes_arrays):
  """Builds (trainer, train_iterators, eval_datasets, eval_groups)."""

  def build(replicas: int, mode: str, task_names=("shape", "x"), *,
            optimizer: str = "sgd", learning_rate: float = 0.1,
            global_batch_size: int = 32, per_task_optimizer: bool = True,
            weights=None, initial_weights=None, schedule=None,
            arrays=None, partial_labels: bool = False,
            aggregator: str = "sum", weighting: str = "static",
            dwa_window: int = 100, method_options=None,
            rep_grad: bool = False,
            jit_compile: bool = False, mixed_precision: str = "none",
            optimizer_factory=None, skip_nonfinite: bool = True,
            architecture: str = "hps", architecture_options=None,
            trunk_width: int = 16, trunk_depth: int = 2):
    strategy = make_strategy(replicas)
    specs = {task.name: task for task in shapes.TASKS}
    tasks = [specs[name].with_weight((weights or {}).get(name, 1.0))
             for name in task_names]
    features, labels = arrays if arrays is not None else shapes_arrays
    with strategy.scope():
      if architecture == "hps":
        model = mtl_dist.build_model(tasks, features.shape[1:], "mlp",
                                     trunk_width, trunk_depth,
                                     mixed_precision=mixed_precision)
      else:
        model = architectures.build(
            tasks, features.shape[1:], model_settings.ArchitectureConfig(
                architecture=architecture, **(architecture_options or {})),
            trunk="mlp", trunk_width=trunk_width, trunk_depth=trunk_depth,
            mixed_precision=mixed_precision)
    if initial_weights is not None:
      model.set_weights(initial_weights)
    trainer = mtl_dist.Trainer(
        strategy, model, tasks, mode=mode,
        global_batch_size=global_batch_size,
        optimizer_factory=optimizer_factory or mtl_dist.make_optimizer_factory(
            optimizer, learning_rate),
        per_task_optimizer=per_task_optimizer, schedule=schedule,
        partial_labels=partial_labels, aggregator=aggregator,
        weighting=weighting, rep_grad=rep_grad,
        method_options=dict(method_options or {}, **(
            {"dwa_window": dwa_window} if weighting == "dwa" else {})),
        jit_compile=jit_compile, skip_nonfinite=skip_nonfinite)
    if mode == "joint":
      sources = [data_lib.source_from_arrays(features, labels, task_names)]
    else:  # Disjoint slices, one per task.
      size = len(features) // len(task_names)
      sources = [data_lib.source_from_arrays(
          features[i * size:(i + 1) * size],
          {k: v[i * size:(i + 1) * size] for k, v in labels.items()},
          [name]) for i, name in enumerate(task_names)]
    iterators = [iter(data_lib.distribute_train(strategy, source,
                                                global_batch_size, seed=7 + i))
                 for i, source in enumerate(sources)]
    eval_datasets = [data_lib.distribute_eval(strategy, source,
                                              global_batch_size, 0)
                     for source in sources]
    groups = [source.task_names for source in sources]
    return trainer, iterators, eval_datasets, groups

  return build


def event_tags(directory: str) -> set[str]:
  """The summary tags of every TensorBoard event file in `directory`."""
  tags = set()
  for name in os.listdir(directory):
    for event in tf.compat.v1.train.summary_iterator(
        os.path.join(directory, name)):
      tags.update(value.tag for value in event.summary.value)
  return tags


def snapshot(variables) -> list[np.ndarray]:
  """Copies of the variables' current values."""
  return [np.array(v.numpy(), copy=True) for v in variables]


def whole_batch_task_gradients(trainer, features, labels, variables):
  """Each task's mean loss on the whole batch and its gradient of
  `variables`, computed on one device without the step's code: the
  reference the methods' training tests compare an update with.

  Returns:
    ([T] float64 losses, per task the list of gradients, as NumPy arrays).
  """
  losses, gradients = [], []
  for task in trainer.tasks:
    with tf.GradientTape() as tape:
      outputs = trainer.model(features, training=True)
      loss = tf.reduce_mean(task.per_example_loss(labels[task.name],
                                                  outputs[task.name]))
    losses.append(float(loss))
    gradients.append([g.numpy() for g in tape.gradient(
        loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)])
  return np.array(losses, np.float64), gradients


def train_launcher_failing_with(monkeypatch, capsys, error: BaseException
                                ) -> tuple[int, str]:
  """(exit status, stderr) of mtl-train's main when `mtl_dist.train` raises."""
  from launch import train as launcher  # pylint: disable=g-import-not-at-top

  def fail(config):
    del config
    raise error

  monkeypatch.setattr(mtl_dist, "train", fail)
  monkeypatch.setattr(launcher, "_config_from_flags", lambda: None)
  with pytest.raises(SystemExit) as exit_info:
    launcher.main(["mtl-train"])
  return exit_info.value.code, capsys.readouterr().err
