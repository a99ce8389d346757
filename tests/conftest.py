"""Test set-up: four logical CPU devices, so tests run 1, 2 and 4 replicas.

The split has to happen before TensorFlow initialises its runtime, hence at
import time of this module, which pytest loads before any test module.

Also the time limits of tests that wait for processes: time_limit and the
helpers that wait with it.
"""

import os
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

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


# Time limits. "A loaded machine must slow the suite, not fail it": no test
# waits a fixed number of seconds. Each limit is a count of start-ups of a
# TensorFlow process, measured on this machine as it is loaded now, times
# _GENEROSITY; a hang still fails, saying what was awaited and for how long.

# How many times the expected time a test waits before it fails.
_GENEROSITY = 10
# A start-up measured longer ago than this is measured again, so that limits
# follow load that comes and goes during the session.
_STARTUP_MAX_AGE = 120.0
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_startup = {"seconds": 0.0, "measured_at": -float("inf")}
_startup_lock = threading.Lock()


_STARTUP_CODE = "import mtl_dist.run.training"


def startup_seconds() -> float:
  """Wall time, now, of a fresh Python process that imports mtl_dist's
  training run (TensorFlow, tf_keras and the package).

  The fixed part of every process the tests start and wait for, and the
  unit of their time limits: it grows with the load (on 2 idle Xeon cores
  about 3 s; with both cores also running another test session, about 9 s).
  Measured at most every _STARTUP_MAX_AGE seconds.
  """
  with _startup_lock:
    if time.monotonic() - _startup["measured_at"] > _STARTUP_MAX_AGE:
      started = time.monotonic()
      # mtl_dist's names import lazily: import what a training run imports.
      subprocess.run([sys.executable, "-c", _STARTUP_CODE], cwd=_REPO,
                     env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                     capture_output=True, check=True)
      _startup["seconds"] = time.monotonic() - started
      _startup["measured_at"] = time.monotonic()
    return _startup["seconds"]


def time_limit(startups: float, *, fixed_seconds: float = 0.0) -> float:
  """Seconds to wait for something that takes about `startups` start-ups.

  Args:
    startups: How long the awaited thing takes, in start-ups of a TensorFlow
      process (startup_seconds) on the machine as it is now: a process that
      starts and trains a little is 2-3. Counted from its duration in the
      suite on 2 idle cores.
    fixed_seconds: Time the awaited thing spends waiting on a clock rather
      than computing (a protocol timeout), which load does not stretch.

  Returns:
    _GENEROSITY times the expected time, plus `fixed_seconds`.
  """
  return _GENEROSITY * startups * startup_seconds() + fixed_seconds


def _limit_text(limit: float, startups: float, fixed_seconds: float) -> str:
  fixed = f" + {fixed_seconds:g} s" if fixed_seconds else ""
  return (f"{limit:.0f} s ({_GENEROSITY} x {startups:g} start-ups of "
          f"{_startup['seconds']:.1f} s{fixed})")


def wait_until(condition: Callable[[], bool], what: str, startups: float, *,
               process: Optional[subprocess.Popen] = None,
               fixed_seconds: float = 0.0) -> float:
  """Polls `condition` until it holds; returns the seconds that took.

  Fails the test if it does not hold within time_limit(startups) (and
  kills `process`), or if `process` (the one that should make it hold) ends
  first.
  """
  limit = time_limit(startups, fixed_seconds=fixed_seconds)
  started = time.monotonic()
  while not condition():
    if process is not None and process.poll() is not None:
      output = process.communicate()
      pytest.fail(f"{what}: the process ended with status "
                  f"{process.returncode} first; its output ends:\n"
                  f"{''.join(o for o in output if o)[-3000:]}")
    if time.monotonic() - started > limit:
      if process is not None:
        process.kill()
        process.communicate()
      pytest.fail(f"{what}: not after "
                  f"{_limit_text(limit, startups, fixed_seconds)}")
    time.sleep(0.05)
  return time.monotonic() - started


def communicate(process: subprocess.Popen, what: str, startups: float, *,
                fixed_seconds: float = 0.0) -> tuple[str, str]:
  """process.communicate(), failing the test if the process does not end
  within time_limit(startups); `what` says what the test waited for."""
  limit = time_limit(startups, fixed_seconds=fixed_seconds)
  try:
    return process.communicate(timeout=limit)
  except subprocess.TimeoutExpired:
    process.kill()
    output = process.communicate()
    pytest.fail(f"{what}: the process did not end within "
                f"{_limit_text(limit, startups, fixed_seconds)}; its output "
                f"ends:\n{''.join(o for o in output if o)[-3000:]}")


def read_lines_until(process: subprocess.Popen, pattern: str, what: str,
                     startups: float) -> list[str]:
  """The lines of process.stdout up to the first that matches `pattern`.

  Fails the test if none does within time_limit(startups) or before the
  process ends. The rest of the output stays for process.communicate().
  """
  lines, done = [], threading.Event()

  def read():
    while line := process.stdout.readline():
      lines.append(line)
      if re.search(pattern, line):
        break
    done.set()

  threading.Thread(target=read, daemon=True).start()
  limit = time_limit(startups)
  if not done.wait(limit):
    process.kill()
    pytest.fail(f"{what}: no line matching {pattern!r} within "
                f"{_limit_text(limit, startups, 0)}; output so far:\n"
                f"{''.join(lines)[-3000:]}")
  if not (lines and re.search(pattern, lines[-1])):
    process.kill()
    pytest.fail(f"{what}: the process ended without a line matching "
                f"{pattern!r}; its output:\n{''.join(lines)[-3000:]}")
  return lines


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

  def fail(config, **options):
    del config, options
    raise error

  monkeypatch.setattr(mtl_dist, "train", fail)
  monkeypatch.setattr(launcher, "_config_from_flags",
                      lambda: mtl_dist.TrainConfig(model_dir="unused"))
  with pytest.raises(SystemExit) as exit_info:
    launcher.main(["mtl-train"])
  return exit_info.value.code, capsys.readouterr().err
