"""What users would run instead of `mtl-train`, each as a whole process.

  python -m benchmarks.recipes naive_alternate --train_steps=2000
  python -m benchmarks.recipes model_garden --train_steps=2000
  python -m benchmarks.recipes fit --mode=joint --train_steps=200

Each trains the shapes data as `mtl-train --dataset=shapes` generates it
(same seed, same per-task sizes in alternate mode, the same 16384 examples in
joint mode) with the same model: a Flatten and `trunk_depth` ReLU Dense
layers of `trunk_width` units shared by all tasks, and one Dense head per
task. Each is written the way its own documentation writes it:
`from_tensor_slices`/shuffle/repeat/batch/prefetch pipelines and tf_keras's
Adam at 1e-3, no distribution strategy.

- `naive_alternate`: the classic TF2 recipe of alternate training: one
  `tf.function` and one Adam per task; Python picks the task round-robin and
  calls one step at a time on the next batch of that task's pipeline.
- `model_garden`: TF Model Garden's `MultiTaskInterleavingTrainer` driven by
  an `orbit.Controller` (`--steps_per_loop` steps per compiled call, one Adam
  for all tasks, tasks sampled uniformly at each step, as its
  `UniformTaskSampler` does). Needs `tf-models-official` (see
  docs/benchmarks.md).
- `fit`: tf_keras `Model.fit` on the functional multi-output model with
  `loss_weights` (joint mode), `--steps_per_loop` as `steps_per_execution`.

The launcher-path comparison of `benchmarks.run` times these and `mtl-train`
at two lengths; the difference is the steady state.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RECIPES = ("naive_alternate", "model_garden", "fit")
LEARNING_RATE = 1e-3
MODEL_GARDEN_INSTALL = (
    "pip install --no-deps tf-models-official && pip install gin-config "
    "pyyaml immutabledict psutil py-cpuinfo tf-slim tensorflow-hub")


def parse(argv: Sequence[str]) -> argparse.Namespace:
  """The recipe and its settings, named as `mtl-train` names them.

  Args:
    argv: The command-line arguments after the program.

  Returns:
    The parsed arguments; `tasks` is a list of shapes task names.

  Bad arguments (an unknown task, a count below 1, model_garden without
  TF Model Garden) exit 2 with the usage and one line
  `python -m benchmarks.recipes: error: ...`, as argparse does.
  """
  parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("recipe", choices=RECIPES)
  parser.add_argument("--train_steps", type=_positive, required=True)
  parser.add_argument("--tasks", default="shape,scale",
                      help="Comma-separated shapes tasks.")
  parser.add_argument("--trunk_width", type=_positive, default=64)
  parser.add_argument("--trunk_depth", type=_positive, default=2)
  parser.add_argument("--global_batch_size", type=_positive, default=32)
  parser.add_argument("--steps_per_loop", type=_positive, default=1,
                      help="model_garden: steps per compiled call; fit: "
                      "steps_per_execution.")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  args.tasks = args.tasks.split(",")
  from mtl_dist.data import shapes  # pylint: disable=g-import-not-at-top
  unknown = [name for name in args.tasks if name not in shapes.TASK_NAMES]
  if unknown:
    parser.error(f"--tasks: unknown {', '.join(unknown)} (known: "
                 f"{', '.join(shapes.TASK_NAMES)})")
  if (args.recipe == "model_garden" and
      importlib.util.find_spec("official") is None):
    parser.error(f"model_garden needs TF Model Garden: {MODEL_GARDEN_INSTALL}")
  return args


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
  return value


def main(argv: Sequence[str]) -> int:
  """Trains the recipe `argv` names; returns the exit status (0)."""
  args = parse(argv)
  from mtl_dist.data import shapes  # pylint: disable=g-import-not-at-top
  known = {task.name: task for task in shapes.TASKS}
  tasks = [known[name] for name in args.tasks]
  if args.recipe == "fit":
    _fit(args, tasks)
  else:
    datasets = _task_datasets(args, tasks)
    if args.recipe == "naive_alternate":
      _naive_alternate(args, tasks, datasets)
    else:
      _model_garden(args, tasks, datasets)
  return 0


def _targets(task, labels):
  """A task's labels as tf_keras's losses want them."""
  from mtl_dist import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  if task.kind == tasks_lib.REGRESSION:
    return labels.reshape(len(labels), -1)
  return labels


def _pipeline(args, features, labels):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return (tf.data.Dataset.from_tensor_slices((features, labels))
          .shuffle(len(features), seed=args.seed)
          .repeat()
          .batch(args.global_batch_size, drop_remainder=True)
          .prefetch(tf.data.AUTOTUNE))


def _task_datasets(args, tasks):
  """One pipeline per task, cut from the pool as `mtl-train` cuts it."""
  from mtl_dist.data import settings  # pylint: disable=g-import-not-at-top
  from mtl_dist.data import shapes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sizes = shapes.default_task_sizes([task.name for task in tasks])
  features, labels = shapes.generate(
      sum(sizes.values()) + settings.DataConfig().eval_examples, args.seed)
  bounds = np.cumsum([0] + list(sizes.values()))
  return {task.name: _pipeline(
      args, features[bounds[i]:bounds[i + 1]],
      _targets(task, labels[task.name][bounds[i]:bounds[i + 1]]))
          for i, task in enumerate(tasks)}


def _loss(task):
  """The task's tf_keras loss (mean over the batch)."""
  from benchmarks import contenders  # pylint: disable=g-import-not-at-top
  return contenders.keras_loss(task)


def _models(args, tasks):
  """The multi-output model (`contenders.keras_model`, the one `fit` trains
  in comparison 1) and, per task, a model of its trunk and that task's head.

  Returns:
    (multi-output model, {task name: trunk-and-head model}).
  """
  import tf_keras  # pylint: disable=g-import-not-at-top
  from benchmarks import contenders  # pylint: disable=g-import-not-at-top
  from mtl_dist.data import shapes  # pylint: disable=g-import-not-at-top
  model = contenders.keras_model(
      tasks, (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 1),
      contenders.ModelSize(args.trunk_width, args.trunk_depth,
                           args.global_batch_size))
  return model, {task.name: tf_keras.Model(
      model.input, model.get_layer(task.name).output) for task in tasks}


def _naive_alternate(args, tasks, datasets) -> None:
  """One tf.function and one Adam per task, called round-robin from Python."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  _, task_models = _models(args, tasks)

  def make_step(task):
    model = task_models[task.name]
    optimizer = tf_keras.optimizers.Adam(LEARNING_RATE)
    loss_fn = _loss(task)

    @tf.function
    def step(features, labels):
      with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(features, training=True))
      gradients = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(gradients, model.trainable_variables))
      return loss

    return step

  steps = [make_step(task) for task in tasks]
  iterators = [iter(datasets[task.name]) for task in tasks]
  loss = None
  for step in range(args.train_steps):
    index = step % len(tasks)
    features, labels = next(iterators[index])
    loss = steps[index](features, labels)
  print(f"last loss {float(loss):.4f}")


def _model_garden(args, tasks, datasets) -> None:
  """TF Model Garden's interleaving trainer under an orbit Controller."""
  # pylint: disable=g-import-not-at-top
  from official.core import base_task
  from official.modeling.multitask import base_model
  from official.modeling.multitask import interleaving_trainer
  from official.modeling.multitask import multitask
  from official.modeling.multitask import task_sampler
  import orbit
  import tf_keras
  # pylint: enable=g-import-not-at-top
  _, task_models = _models(args, tasks)

  class Task(base_task.Task):
    """A shapes task: its pipeline and its loss."""

    def __init__(self, task):
      # The trainer reads `params.train_data` and hands it to build_inputs.
      super().__init__(params=types.SimpleNamespace(train_data=None),
                       name=task.name)
      self._loss_fn = _loss(task)

    def build_inputs(self, params, input_context=None):
      return datasets[self.name]

    def build_losses(self, labels, model_outputs, aux_losses=None):
      return self._loss_fn(labels, model_outputs)

    def build_metrics(self, training=True):
      return []

  class Model(base_model.MultiTaskBaseModel):
    """The shared trunk with each task's head."""

    def _instantiate_sub_tasks(self):
      return task_models

  multi_task = multitask.MultiTask(tasks=[Task(task) for task in tasks])
  trainer = interleaving_trainer.MultiTaskInterleavingTrainer(
      multi_task=multi_task, multi_task_model=Model(),
      optimizer=tf_keras.optimizers.Adam(LEARNING_RATE),
      task_sampler=task_sampler.UniformTaskSampler(
          {task.name: 1.0 for task in tasks}))
  controller = orbit.Controller(trainer=trainer,
                                global_step=trainer.global_step,
                                steps_per_loop=args.steps_per_loop)
  controller.train(steps=args.train_steps)
  print(f"global step {int(trainer.global_step.numpy())}")


def _fit(args, tasks) -> None:
  """tf_keras Model.fit on the multi-output model with loss_weights."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  from mtl_dist.data import settings  # pylint: disable=g-import-not-at-top
  from mtl_dist.data import shapes  # pylint: disable=g-import-not-at-top
  examples = settings.DataConfig().train_examples
  features, labels = shapes.generate(
      examples + settings.DataConfig().eval_examples, args.seed)
  targets = {task.name: _targets(task, labels[task.name][:examples])
             for task in tasks}
  model, _ = _models(args, tasks)
  model.compile(optimizer=tf_keras.optimizers.Adam(LEARNING_RATE),
                loss={task.name: _loss(task) for task in tasks},
                loss_weights={task.name: task.weight for task in tasks},
                steps_per_execution=args.steps_per_loop)
  history = model.fit(_pipeline(args, features[:examples], targets),
                      epochs=1, steps_per_epoch=args.train_steps, verbose=0)
  print(f"last loss {history.history['loss'][-1]:.4f}")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
