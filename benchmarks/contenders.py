"""The ways of training that the benchmarks compare.

Each contender builds its model and data in `start()` and trains `steps`
steady-state steps per `run()`. All of them use the same inputs, model sizes,
optimizer and global batch as their rivals: Adam at 1e-3, as
`mtl_dist.FusedAdam` (what `--optimizer=adam` makes) on every side, so that
ratios measure the training loops, not the optimizer's kernels; the options
comparison measures tf_keras's own Adam separately.

`ProcessContender` is the exception: it times whole processes of the
user-facing tools (`mtl-train`, `benchmarks.recipes`), each with the
optimizer and strategy that tool uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
import tf_keras

import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist import tasks as tasks_lib

_LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """An MLP trunk and the global batch it is trained with."""

  width: int
  depth: int
  global_batch_size: int

  def describe(self) -> str:
    return (f"MLP trunk {self.depth}x{self.width}, global batch "
            f"{self.global_batch_size}")


def adam() -> tf_keras.optimizers.Optimizer:
  """The optimizer of every contender: Adam as `--optimizer=adam` makes it."""
  return mtl_dist.make_optimizer_factory("adam", _LEARNING_RATE)()


def keras_adam() -> tf_keras.optimizers.Optimizer:
  """tf_keras's own Adam (five element-wise passes per update)."""
  return tf_keras.optimizers.Adam(_LEARNING_RATE)


class TrainerContender:
  """mtl_dist's Trainer: `steps_per_loop` steps per tf.function call."""

  def __init__(self, name: str, strategy: tf.distribute.Strategy,
               tasks: Sequence[tasks_lib.TaskSpec],
               sources: Sequence[data_lib.ExampleSource],
               input_shape: Sequence[int], size: ModelSize, *,
               mode: str = "joint", steps_per_loop: int = 50,
               trainer_kwargs: Optional[dict[str, Any]] = None,
               model_kwargs: Optional[dict[str, Any]] = None,
               optimizer: Callable[[], tf_keras.optimizers.Optimizer] = adam):
    self.name = name
    self._optimizer = optimizer
    self.work_per_step = size.global_batch_size
    self.steps_per_loop = steps_per_loop
    self._strategy = strategy
    self._tasks = tuple(tasks)
    self._sources = tuple(sources)
    self._input_shape = tuple(input_shape)
    self._size = size
    self._mode = mode
    self._trainer_kwargs = dict(trainer_kwargs or {})
    self._model_kwargs = dict(model_kwargs or {})
    self.trainer = None
    self._iterators = None

  def start(self) -> None:
    size = self._size
    with self._strategy.scope():
      model = mtl_dist.build_model(self._tasks, self._input_shape, "mlp",
                                   size.width, size.depth,
                                   **self._model_kwargs)
    # The launcher's default (--on_nonfinite=stop) applies unconditionally.
    kwargs = {"skip_nonfinite": False, **self._trainer_kwargs}
    self.trainer = mtl_dist.Trainer(
        self._strategy, model, self._tasks, mode=self._mode,
        global_batch_size=size.global_batch_size,
        optimizer_factory=self._optimizer, **kwargs)
    self._iterators = [
        iter(mtl_dist.distribute_train(self._strategy, source,
                                       size.global_batch_size, seed=i))
        for i, source in enumerate(self._sources)]
    self.trainer.train(self._iterators, self.steps_per_loop)  # Traces.

  def run(self, steps: int) -> float:
    calls = _whole_calls(steps, self.steps_per_loop)
    started = time.perf_counter()
    for _ in range(calls):
      self.trainer.train(self._iterators, self.steps_per_loop)
    return time.perf_counter() - started


def _whole_calls(steps: int, per_call: int) -> int:
  if steps % per_call:
    raise ValueError(f"{steps} steps are not a whole number of calls of "
                     f"{per_call}")
  return steps // per_call


def keras_model(tasks: Sequence[tasks_lib.TaskSpec], input_shape: Sequence[int],
                size: ModelSize) -> tf_keras.Model:
  """The functional multi-output equivalent of `mtl_dist.build_model`."""
  inputs = tf_keras.Input(tuple(input_shape))
  hidden = tf_keras.layers.Flatten()(inputs)
  for _ in range(size.depth):
    hidden = tf_keras.layers.Dense(size.width, activation="relu")(hidden)
  outputs = {task.name: tf_keras.layers.Dense(task.output_size,
                                              name=task.name)(hidden)
             for task in tasks}
  return tf_keras.Model(inputs, outputs)


def keras_loss(task: tasks_lib.TaskSpec) -> tf_keras.losses.Loss:
  if task.kind == tasks_lib.CLASSIFICATION:
    return tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  if task.loss_name == "mse":
    return tf_keras.losses.MeanSquaredError()
  return tf_keras.losses.MeanAbsoluteError()


class _EpochTimer(tf_keras.callbacks.Callback):
  """Seconds of each epoch, from its first to its last step."""

  def __init__(self):
    super().__init__()
    self.seconds: list[float] = []
    self._started = 0.0

  def on_epoch_begin(self, epoch, logs=None):
    self._started = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self._started)


class FitContender:
  """tf_keras `Model.fit` on the multi-output model with `loss_weights`.

  The input pipeline is the usual one for in-memory arrays
  (from_tensor_slices, shuffle, repeat, batch, prefetch). A segment is the
  second epoch of a `fit(epochs=2)` call: the first absorbs the call's
  start-up (iterator, shuffle buffer), so only steady-state steps are timed.
  """

  def __init__(self, name: str, strategy: tf.distribute.Strategy,
               tasks: Sequence[tasks_lib.TaskSpec],
               arrays: tuple[np.ndarray, dict[str, np.ndarray]],
               input_shape: Sequence[int], size: ModelSize, *,
               steps_per_execution: int = 1, seed: int = 0):
    self.name = name
    self.work_per_step = size.global_batch_size
    self._strategy = strategy
    self._tasks = tuple(tasks)
    self._arrays = arrays
    self._input_shape = tuple(input_shape)
    self._size = size
    self._steps_per_execution = steps_per_execution
    self._seed = seed
    self.model = None
    self._dataset = None

  def start(self) -> None:
    features, labels = self._arrays
    with self._strategy.scope():
      self.model = keras_model(self._tasks, self._input_shape, self._size)
      self.model.compile(
          optimizer=adam(),
          loss={task.name: keras_loss(task) for task in self._tasks},
          loss_weights={task.name: task.weight for task in self._tasks},
          steps_per_execution=self._steps_per_execution)
    targets = {task.name: labels[task.name].reshape(len(features), -1)
               if task.kind == tasks_lib.REGRESSION else labels[task.name]
               for task in self._tasks}
    self._dataset = (tf.data.Dataset.from_tensor_slices((features, targets))
                     .shuffle(len(features), seed=self._seed)
                     .repeat()
                     .batch(self._size.global_batch_size, drop_remainder=True)
                     .prefetch(tf.data.AUTOTUNE))
    self.model.fit(self._dataset, epochs=1,
                   steps_per_epoch=self._steps_per_execution, verbose=0)

  def run(self, steps: int) -> float:
    _whole_calls(steps, self._steps_per_execution)
    timer = _EpochTimer()
    self.model.fit(self._dataset, epochs=2, steps_per_epoch=steps, verbose=0,
                   callbacks=[timer])
    return timer.seconds[1]


class NaiveAlternateContender:
  """The classic recipe's alternate training: a tf.function per task.

  Each task has its own compiled step and optimizer; Python picks the task
  round-robin and calls one step at a time. It reads the same distributed
  pipelines as the Trainer, so only the loop differs.
  """

  def __init__(self, name: str, strategy: tf.distribute.Strategy,
               tasks: Sequence[tasks_lib.TaskSpec],
               sources: Sequence[data_lib.ExampleSource],
               input_shape: Sequence[int], size: ModelSize):
    self.name = name
    self.work_per_step = size.global_batch_size
    self._strategy = strategy
    self._tasks = tuple(tasks)
    self._sources = tuple(sources)
    self._input_shape = tuple(input_shape)
    self._size = size
    self._step = 0
    self._functions = []
    self._iterators = []
    self._model = None

  def start(self) -> None:
    strategy, size = self._strategy, self._size
    with strategy.scope():
      self._model = mtl_dist.build_model(self._tasks, self._input_shape, "mlp",
                                         size.width, size.depth)
      optimizers = []
      for task in self._tasks:
        optimizer = adam()
        optimizer.build(self._model.trunk_and_head_variables(task.name))
        optimizers.append(optimizer)
    self._functions = [tf.function(self._make_step(task, optimizer))
                       for task, optimizer in zip(self._tasks, optimizers)]
    self._iterators = [
        iter(mtl_dist.distribute_train(strategy, source,
                                       size.global_batch_size, seed=i))
        for i, source in enumerate(self._sources)]
    self.run(len(self._tasks))  # Traces every task's function.

  def _make_step(self, task, optimizer):
    model, strategy = self._model, self._strategy
    variables = model.trunk_and_head_variables(task.name)
    global_batch_size = self._size.global_batch_size

    def replica_step(batch):
      features, labels = batch
      with tf.GradientTape() as tape:
        outputs = model.call_task(features, task.name, training=True)
        loss = tf.nn.compute_average_loss(
            task.per_example_loss(labels[task.name], outputs),
            global_batch_size=global_batch_size)
      gradients = tape.gradient(loss, variables)
      optimizer.apply_gradients(zip(gradients, variables))
      return loss

    def step(iterator):
      return strategy.reduce(tf.distribute.ReduceOp.SUM,
                             strategy.run(replica_step,
                                          args=(next(iterator),)), axis=None)

    return step

  def run(self, steps: int) -> float:
    started = time.perf_counter()
    loss = None
    for _ in range(steps):
      index = self._step % len(self._tasks)
      loss = self._functions[index](self._iterators[index])
      self._step += 1
    float(loss)  # Waits for the last step.
    return time.perf_counter() - started


def dense_matmuls(input_size: int, tasks: Sequence[tasks_lib.TaskSpec],
                  size: ModelSize) -> list[tuple[int, int, int]]:
  """(m, k, n) of every matmul in one training step of the MLP model.

  Per dense layer with batch B, inputs k and units n: the forward product
  [B, k] x [k, n], the kernel's gradient [k, B] x [B, n] and, except for the
  first layer, the input's gradient [B, n] x [n, k].
  """
  batch = size.global_batch_size
  layers = [(input_size, size.width)]
  layers += [(size.width, size.width)] * (size.depth - 1)
  layers += [(size.width, task.output_size) for task in tasks]
  shapes = []
  for i, (k, n) in enumerate(layers):
    shapes += [(batch, k, n), (k, batch, n)]
    if i > 0:
      shapes.append((batch, n, k))
  return shapes


def matmul_flops(shapes: Sequence[tuple[int, int, int]]) -> int:
  return sum(2 * m * k * n for m, k, n in shapes)


class MatmulContender:
  """A bare loop of `tf.matmul`s of the given shapes: the machine's limit.

  Its work per step is the FLOPs of one pass over the shapes; a trainer
  contender of the same model with `work_per_step=matmul_flops(...)` gives
  the ratio of achieved FLOP/s.
  """

  def __init__(self, name: str, shapes: Sequence[tuple[int, int, int]]):
    self.name = name
    self._shapes = list(shapes)
    self.work_per_step = float(matmul_flops(self._shapes))
    self._loop = None

  def start(self) -> None:
    rng = np.random.default_rng(0)
    # Variables: reads inside the loop cannot be hoisted out of it.
    operands = [(tf.Variable(rng.standard_normal((m, k), np.float32)),
                 tf.Variable(rng.standard_normal((k, n), np.float32)))
                for m, k, n in self._shapes]

    @tf.function
    def loop(num_steps):
      total = tf.constant(0.0)
      for _ in tf.range(num_steps):
        for a, b in operands:
          total += tf.matmul(a, b)[0, 0]
      return total

    self._loop = loop
    self._loop(tf.constant(1))

  def run(self, steps: int) -> float:
    started = time.perf_counter()
    float(self._loop(tf.constant(steps)))
    return time.perf_counter() - started


_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_environment() -> dict[str, str]:
  """The environment of a benchmark's subprocess.

  Returns:
    This process's environment with TensorFlow's C++ logs quiet and this
    checkout's root first on PYTHONPATH, so that the subprocess imports
    this checkout's `mtl_dist`, `launch` and `benchmarks` whatever its
    working directory.
  """
  path = os.environ.get("PYTHONPATH")
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
              PYTHONPATH=os.pathsep.join([_REPOSITORY, path]) if path
              else _REPOSITORY)


def run_process(command: Sequence[str]) -> float:
  """Runs `command` to its end, its output captured.

  Args:
    command: The program and its arguments.

  Returns:
    Its wall time in seconds.

  Raises:
    RuntimeError: It exited with a non-zero status; the message gives the
      command and the end of its stderr.
  """
  started = time.perf_counter()
  result = subprocess.run(list(command), capture_output=True, text=True,
                          env=process_environment(), check=False)
  seconds = time.perf_counter() - started
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:"
                       f"\n{result.stderr[-2000:]}")
  return seconds


def launcher_command(flags: Sequence[str], num_workers: int = 1
                    ) -> Callable[[int, str], list[str]]:
  """The command of an `mtl-train` (or `mtl-local-cluster`) run.

  Args:
    flags: Its flags, besides --model_dir and --train_steps.
    num_workers: More than 1: `mtl-local-cluster` with that many workers.

  Returns:
    A function of the training steps and a fresh model directory that gives
    the command.
  """
  flags = list(flags)

  def command(steps: int, model_dir: str) -> list[str]:
    run_flags = [f"--model_dir={model_dir}", f"--train_steps={steps}",
                 *flags]
    if num_workers > 1:
      return [sys.executable, "-m", "launch.local_cluster",
              f"--num_workers={num_workers}", "--", *run_flags]
    return [sys.executable, "-m", "launch.train", *run_flags]

  return command


def recipe_command(recipe: str, flags: Sequence[str]) -> list[str]:
  """The command of `python -m benchmarks.recipes RECIPE`, without
  --train_steps (`ProcessContender` adds it)."""
  return [sys.executable, "-m", "benchmarks.recipes", recipe, *flags]


class LauncherContender:
  """`mtl-train` (or `mtl-local-cluster`) in a subprocess.

  A segment is one whole run; its time is the run's steady-state speed from
  summary.json (the first, tracing loop call excluded), so process start-up
  does not count.
  """

  warm_up = False  # Every run starts from scratch anyway.

  def __init__(self, name: str, flags: Sequence[str], global_batch_size: int,
               num_workers: int = 1):
    self.name = name
    self.work_per_step = global_batch_size
    self._command = launcher_command(flags, num_workers)

  def start(self) -> None:
    pass

  def run(self, steps: int) -> float:
    with tempfile.TemporaryDirectory() as model_dir:
      run_process(self._command(steps, model_dir))
      with open(os.path.join(model_dir, "summary.json")) as f:
        examples_per_second = json.load(f)["examples_per_second"]
    return steps * self.work_per_step / examples_per_second


class ProcessContender:
  """A whole training process, timed at two lengths.

  `run(steps)` runs the process for `base_steps` training steps and for
  `base_steps + steps`, and returns the difference of their wall times:
  what `steps` steady-state steps took. Everything a run does whatever its
  length cancels: interpreter and TensorFlow start-up, data generation,
  tracing, and the final evaluation and checkpoint. Which length runs first
  alternates from one call to the next, so that a drift of the machine
  does not favour one of them.
  """

  warm_up = False  # Every process starts from scratch anyway.

  def __init__(self, name: str,
               command: Union[Sequence[str], Callable[[int, str],
                                                      Sequence[str]]],
               global_batch_size: int, base_steps: int):
    """Describes the process.

    Args:
      name: The contender's name.
      command: The command without its length, to which
        `--train_steps=N` is appended; or a function of the training steps
        and a fresh empty directory (removed after the process, e.g. for
        --model_dir) that gives the whole command.
      global_batch_size: Examples per training step.
      base_steps: The short length, in training steps.
    """
    self.name = name
    self.work_per_step = global_batch_size
    self.base_steps = base_steps
    self._command = command if callable(command) else list(command)
    self._runs = 0

  def start(self) -> None:
    """Runs the short process once: the command works, and how long a
    whole short run takes is the contender's start-up."""
    self._wall(self.base_steps)

  def run(self, steps: int) -> float:
    """Runs the short and the long process; returns wall(long) - wall(short).

    Raises:
      RuntimeError: A process failed, or the long one took no longer than
        the short one: `steps` are too few to stand out of the start-up's
        noise.
    """
    short, long = self.base_steps, self.base_steps + steps
    order = (short, long) if self._runs % 2 == 0 else (long, short)
    self._runs += 1
    wall = {length: self._wall(length) for length in order}
    if wall[long] <= wall[short]:
      raise RuntimeError(
          f"{self.name}: {long} steps took {wall[long]:.2f} s, {short} steps "
          f"{wall[short]:.2f} s: the segment of {steps} steps is too short "
          "for the start-up noise; give it more steps")
    return wall[long] - wall[short]

  def _wall(self, steps: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
      if callable(self._command):
        command = self._command(steps, directory)
      else:
        command = [*self._command, f"--train_steps={steps}"]
      return run_process(command)
