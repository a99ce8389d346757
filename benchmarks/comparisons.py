"""The comparisons of `python -m benchmarks.run`, one function each.

Each takes the run's settings and a function making a strategy over N
replicas, measures its contenders in rotation and returns a report section.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import tempfile
from typing import Callable

import numpy as np
import tensorflow as tf

from benchmarks import contenders as contenders_lib
from benchmarks import harness
from benchmarks import recipes
import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist import tasks as tasks_lib
from mtl_dist.data import shapes
from mtl_dist.data import tfds
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base as aggregators_base
from mtl_dist.run import config as config_lib
from mtl_dist.steps import plumbing

ModelSize = contenders_lib.ModelSize
Claim = harness.Claim
StrategyFactory = Callable[[int], tf.distribute.Strategy]

COMPUTE_BOUND = ModelSize(width=1024, depth=3, global_batch_size=256)
OVERHEAD_BOUND = ModelSize(width=64, depth=2, global_batch_size=32)
DEFAULT = ModelSize(width=256, depth=2, global_batch_size=64)  # mtl-train's.
STEPS_PER_LOOP = 50  # mtl-train's default --steps_per_loop.

_TASKS = {task.name: task for task in shapes.TASKS}


def _log(message: str) -> None:
  print(message, flush=True)


@functools.lru_cache(maxsize=None)
def _shapes(num_examples: int, seed: int = 0):
  return shapes.generate(num_examples, seed)


def _joint_source(num_examples: int, task_names):
  features, labels = _shapes(num_examples)
  return mtl_dist.source_from_arrays(features, labels, task_names)


def _task_sources(num_examples: int, task_names):
  """One in-memory source per task, cut from disjoint parts of a pool."""
  features, labels = _shapes(num_examples * len(task_names))
  return [mtl_dist.source_from_arrays(
      features[i * num_examples:(i + 1) * num_examples],
      {k: v[i * num_examples:(i + 1) * num_examples]
       for k, v in labels.items()}, [name])
          for i, name in enumerate(task_names)]


def _measures_float16(settings: harness.Settings) -> bool:
  """Whether comparison 7 measures float16: always, but not in --quick mode
  on a host without a GPU. A CPU computes float16 through slow fallbacks
  (0.68x float32 on an AMD EPYC, ~80x slower than bfloat16 on an Intel
  Xeon with AVX512-FP16), which would make --quick take hours there."""
  return not settings.quick or bool(tf.config.list_physical_devices("GPU"))


def _examples(settings: harness.Settings) -> int:
  return 2048 if settings.quick else 16384


def joint_fit(settings: harness.Settings,
              make_strategy: StrategyFactory) -> harness.Section:
  """1: joint mode against tf_keras Model.fit with loss_weights."""
  tasks = list(shapes.TASKS)
  strategy = make_strategy(1)
  features, labels = _shapes(_examples(settings))
  source = mtl_dist.source_from_arrays(features, labels, shapes.TASK_NAMES)
  shape = features.shape[1:]
  tables, verdicts = [], []
  for size, steps, claims in settings.sizes((
      (COMPUTE_BOUND, settings.steps(200, 50), [
          Claim("mtl_dist joint / fit (steps_per_execution=1)", "mtl_dist",
                "fit spe=1", 1.0),
          Claim(f"mtl_dist joint / fit (steps_per_execution="
                f"{STEPS_PER_LOOP})", "mtl_dist", f"fit spe={STEPS_PER_LOOP}")
      ]),
      (OVERHEAD_BOUND, settings.steps(2000, 250), [
          Claim("mtl_dist joint / fit (steps_per_execution=1)", "mtl_dist",
                "fit spe=1", 1.5),
          Claim(f"mtl_dist joint / fit (steps_per_execution="
                f"{STEPS_PER_LOOP})", "mtl_dist", f"fit spe={STEPS_PER_LOOP}",
                1.0)
      ])), quick=1):
    _log(f"{size.describe()}, {steps} steps per segment")
    rivals = [
        contenders_lib.TrainerContender("mtl_dist", strategy, tasks, [source],
                                        shape, size,
                                        steps_per_loop=STEPS_PER_LOOP),
        contenders_lib.FitContender("fit spe=1", strategy, tasks,
                                    (features, labels), shape, size),
        contenders_lib.FitContender(f"fit spe={STEPS_PER_LOOP}", strategy,
                                    tasks, (features, labels), shape, size,
                                    steps_per_execution=STEPS_PER_LOOP),
    ]
    results = harness.measure(rivals, steps, settings.repeats, log=_log,
                              warm_up=settings.warm_up)
    tables.append((f"**{size.describe()}**", results, "examples/s"))
    verdicts += [harness.judge(results, dataclasses.replace(
        claim, label=f"{size.describe()}: {claim.label}")) for claim in claims]
  return harness.Section(
      "joint_fit", "1. Joint mode against Model.fit",
      "Five shapes tasks (one classification, four regressions), 32x32x1 "
      "inputs, the same Adam (FusedAdam) and one device (OneDeviceStrategy) "
      "on both sides. mtl_dist "
      f"runs {STEPS_PER_LOOP} steps per tf.function call (--steps_per_loop); "
      "fit trains the equivalent functional multi-output model with "
      "`loss_weights` on a from_tensor_slices/shuffle/batch/prefetch "
      "pipeline, timed over whole steady-state epochs.",
      tables, verdicts)


def alternate(settings: harness.Settings,
              make_strategy: StrategyFactory) -> harness.Section:
  """2: alternate mode against one task, and against the naive recipe."""
  strategy = make_strategy(1)
  examples = _examples(settings) // 4
  task_lists = (["shape", "x"], ["shape", "scale", "x", "y"])
  tables, verdicts = [], []
  for size, steps in settings.sizes(
      ((OVERHEAD_BOUND, settings.steps(2000, 200)),
       (DEFAULT, settings.steps(1000, 100))), quick=0):
    rivals = [
        contenders_lib.TrainerContender(
            "single task", strategy, [_TASKS["shape"]],
            _task_sources(examples, ["shape"]), (32, 32, 1), size,
            steps_per_loop=STEPS_PER_LOOP)
    ]
    for names in task_lists:
      sources = _task_sources(examples, names)
      tasks = [_TASKS[name] for name in names]
      rivals += [
          contenders_lib.TrainerContender(
              f"alternate {len(names)} tasks", strategy, tasks, sources,
              (32, 32, 1), size, mode="alternate",
              steps_per_loop=STEPS_PER_LOOP),
          contenders_lib.NaiveAlternateContender(
              f"naive {len(names)} tasks", strategy, tasks, sources,
              (32, 32, 1), size),
      ]
    _log(f"{size.describe()}, {steps} steps per segment")
    results = harness.measure(rivals, steps, settings.repeats, log=_log,
                              warm_up=settings.warm_up)
    tables.append((f"**{size.describe()}**", results, "examples/s"))
    for names in task_lists:
      count = len(names)
      verdicts += [
          harness.judge(results, Claim(
              f"{size.describe()}: alternate round-robin {count} tasks / "
              "single task", f"alternate {count} tasks", "single task", 0.9)),
          harness.judge(results, Claim(
              f"{size.describe()}: alternate round-robin {count} tasks / "
              "naive recipe", f"alternate {count} tasks",
              f"naive {count} tasks", 1.5)),
      ]
  return harness.Section(
      "alternate", "2. Alternate mode: the in-graph task switch",
      "Adam, one device, the overhead-bound and the default model. The "
      "single-task run trains the shape task alone (joint mode, one task). "
      "Alternate mode switches task every step round-robin inside the "
      f"compiled loop ({STEPS_PER_LOOP} steps per call, one optimizer per "
      "task). The naive recipe has one tf.function and optimizer per task "
      "and calls them alternately from Python, one step per call; it reads "
      "the same input pipelines.",
      tables, verdicts)


def _store_tfds(data_dir: str, num_examples: int) -> None:
  """The shapes data as a prepared TFDS dataset (TFRecord files, PNG images)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features, labels = _shapes(num_examples)
  images = np.round(features * 255).astype(np.uint8)

  def split(count: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices({
        "image": images[:count],
        **{name: labels[name][:count].reshape(count)
           for name in ("shape", "x")}})

  spec = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(32, 32, 1)),
      "shape": tfds.features.ClassLabel(num_classes=3),
      "x": tf.float32})
  tfds.dataset_builders.store_as_tfds_dataset(
      name="mtl_bench_shapes", version="1.0.0", features=spec,
      data_dir=data_dir,
      split_datasets={"train": split(num_examples), "test": split(64)})


def input_pipeline(settings: harness.Settings,
                   make_strategy: StrategyFactory) -> harness.Section:
  """3: per-task pipelines reading TFRecord files against in-memory tensors."""
  strategy = make_strategy(1)
  examples = _examples(settings)
  tables, verdicts = [], []
  with tempfile.TemporaryDirectory() as data_dir:
    _log(f"writing {examples} examples as a TFDS dataset")
    _store_tfds(data_dir, examples)
    config = config_lib.TrainConfig(
        model_dir=os.path.join(data_dir, "unused"), mode="alternate",
        task_datasets={"shape": "tfds:mtl_bench_shapes:shape",
                       "x": "tfds:mtl_bench_shapes:x"},
        data_dir=data_dir, input_key="image")
    config.validate()
    files = data_lib.load(config.data_config())
    # TFDS's own per-example parsing and decoding (what the batched path
    # replaced), for the record.
    per_example = tfds.load_alternate(config.data_config(),
                                      batched_parsing=False)
    # The same decoded images, held in memory.
    images, labels = _shapes(examples)
    images = np.round(images * 255).astype(np.float32) / 255
    memory = [mtl_dist.source_from_arrays(images, labels, [name])
              for name in ("shape", "x")]
    for size, steps in settings.sizes(
        ((DEFAULT, settings.steps(1000, 100)),
         (COMPUTE_BOUND, settings.steps(200, 50))), quick=0):
      rivals = [
          contenders_lib.TrainerContender(
              "TFRecord files (TFDS)", strategy, files.tasks, files.train,
              files.input_shape, size, mode="alternate",
              steps_per_loop=STEPS_PER_LOOP),
          contenders_lib.TrainerContender(
              "in-memory tensors", strategy, files.tasks, memory,
              files.input_shape, size, mode="alternate",
              steps_per_loop=STEPS_PER_LOOP),
          contenders_lib.TrainerContender(
              "TFRecord files, per-example decoding", strategy,
              per_example.tasks, per_example.train, per_example.input_shape,
              size, mode="alternate", steps_per_loop=STEPS_PER_LOOP),
      ]
      _log(f"{size.describe()}, {steps} steps per segment")
      results = harness.measure(rivals, steps, settings.repeats, log=_log,
                                warm_up=settings.warm_up)
      tables.append((f"**{size.describe()}**", results, "examples/s"))
      verdicts += [
          harness.judge(results, Claim(
              f"{size.describe()}: TFRecord files / in-memory tensors",
              "TFRecord files (TFDS)", "in-memory tensors", 0.95)),
          harness.judge(results, Claim(
              f"{size.describe()}: batched / per-example decoding",
              "TFRecord files (TFDS)",
              "TFRecord files, per-example decoding")),
      ]
  return harness.Section(
      "input_pipeline", "3. Input pipeline: TFRecord files against memory",
      "Alternate mode over two tasks (shape, x), each its own pipeline, one "
      f"device. Files: a prepared TFDS dataset of {examples} PNG-encoded "
      "32x32 images (what `--task_datasets=...` reads: interleaved files, "
      "shuffled serialized records, parsed and decoded per batch). Memory: "
      "the same images as float32 arrays, batches gathered by index. "
      "Per-example decoding: the same files through TFDS's own "
      "parse-then-batch path, which the batched path replaced.",
      tables, verdicts)


def flops(settings: harness.Settings,
          make_strategy: StrategyFactory) -> harness.Section:
  """4: achieved training FLOP/s against a bare matmul loop."""
  tasks = list(shapes.TASKS)
  strategy = make_strategy(1)
  size = COMPUTE_BOUND
  steps = settings.steps(200, 50)
  source = _joint_source(_examples(settings), shapes.TASK_NAMES)
  shapes_of_step = contenders_lib.dense_matmuls(32 * 32, tasks, size)
  flops_per_step = contenders_lib.matmul_flops(shapes_of_step)
  trainer = contenders_lib.TrainerContender(
      "mtl_dist joint", strategy, tasks, [source], (32, 32, 1), size,
      steps_per_loop=STEPS_PER_LOOP)
  trainer.work_per_step = float(flops_per_step)
  rivals = [trainer,
            contenders_lib.MatmulContender("bare tf.matmul loop",
                                           shapes_of_step)]
  _log(f"{size.describe()}: {flops_per_step / 1e9:.2f} GFLOP of matmuls per "
       f"step, {steps} steps per segment")
  results = harness.measure(rivals, steps, settings.repeats, log=_log,
                            warm_up=settings.warm_up)
  return harness.Section(
      "flops", "4. Hardware efficiency: FLOP/s against bare matmuls",
      f"Joint mode, {size.describe()}, five heads, one device. A training "
      f"step's matmuls (forward, kernel gradients, input gradients below the "
      f"first layer) are {flops_per_step / 1e9:.2f} GFLOP; the bare loop "
      "runs exactly those matmuls, back to back, in one tf.function. "
      "Elementwise work (ReLU, bias, losses, Adam) is not counted as FLOPs, "
      "so it shows as the gap.",
      [("", results, "FLOP/s")],
      [harness.judge(results, Claim("mtl_dist training / bare matmul loop",
                                    "mtl_dist joint", "bare tf.matmul loop",
                                    0.8))])


def scaling(settings: harness.Settings,
            make_strategy: StrategyFactory) -> harness.Section:
  """5: MirroredStrategy at 1, 2 and 4 replicas; 2 workers on localhost."""
  tasks = list(shapes.TASKS)
  size = ModelSize(width=256, depth=2, global_batch_size=256)
  steps = settings.steps(500, 50)
  source = _joint_source(_examples(settings), shapes.TASK_NAMES)
  rivals = [contenders_lib.TrainerContender(
      f"{replicas} replica{'s' if replicas > 1 else ''}",
      make_strategy(replicas), tasks, [source], (32, 32, 1), size,
      steps_per_loop=STEPS_PER_LOOP) for replicas in (1, 2, 4)]
  _log(f"{size.describe()}, {steps} steps per segment")
  in_process = harness.measure(rivals, steps, settings.repeats, log=_log,
                               warm_up=settings.warm_up)
  launcher_flags = [
      "--mode=joint", f"--trunk_width={size.width}",
      f"--trunk_depth={size.depth}",
      f"--global_batch_size={size.global_batch_size}",
      f"--steps_per_loop={STEPS_PER_LOOP}", f"--log_every={steps}",
      f"--checkpoint_every={steps}", f"--eval_every={steps}",
      "--eval_steps=1", f"--train_examples={_examples(settings)}"]
  launched = settings.sizes([
      contenders_lib.LauncherContender(
          "mtl-train, 1 process", ["--strategy=one_device", *launcher_flags],
          size.global_batch_size),
      contenders_lib.LauncherContender(
          "mtl-local-cluster, 2 workers", launcher_flags,
          size.global_batch_size, num_workers=2),
  ], quick=0)  # --quick: the launcher path once, without the 2 workers.
  _log("launcher runs, one whole run per segment")
  cluster = harness.measure(launched, steps, settings.repeats, log=_log,
                            warm_up=settings.warm_up)
  claims = [Claim(f"{r.name} / 1 replica", r.name, "1 replica")
            for r in in_process[1:]]
  cluster_claim = Claim("2 workers / 1 process", "mtl-local-cluster, 2 workers",
                        "mtl-train, 1 process")
  return harness.Section(
      "scaling", "5. Scaling: replicas and workers",
      f"Joint mode, five tasks, {size.describe()} (the same global batch at "
      "every scale, so the per-replica batch shrinks). Replicas are logical "
      "CPU devices of one 2-core CPU and the workers share it, so this "
      "measures the cost of the distribution machinery, not a speed-up. "
      "Worker runs go through the launchers in subprocesses; their speed is "
      "summary.json's steady-state examples/s.",
      [("**MirroredStrategy, one process**", in_process, "examples/s"),
       ("**MultiWorkerMirroredStrategy on localhost**", cluster,
        "examples/s")],
      [harness.judge(in_process, claim) for claim in claims] +
      ([harness.judge(cluster, cluster_claim)] if len(cluster) > 1 else []),
      notes=_communication_table(tasks))


def _parameters(variables) -> int:
  return int(sum(np.prod(v.shape) for v in variables))


# Bus bandwidths of a ring all-reduce, in bytes per second: NVLink 3 (A100,
# NCCL all-reduce bus bandwidth as NVIDIA reports it for 8 GPUs) and a 100 Gb/s
# Ethernet link at line rate.
_LINKS = (("NVLink (A100, ~230 GB/s)", 230e9),
          ("100 Gb/s Ethernet (12.5 GB/s)", 12.5e9))


def _communication_table(tasks) -> str:
  """All-reduce bytes per step and when communication would dominate."""
  models = []
  for size in (OVERHEAD_BOUND, DEFAULT, COMPUTE_BOUND):
    with tf.device("/cpu:0"):
      model = mtl_dist.build_model(tasks, (32, 32, 1), "mlp", size.width,
                                   size.depth)
    models.append((f"MLP {size.depth}x{size.width} (this benchmark)",
                   _parameters(model.trainable_variables)))
  models += [("ResNet-50-sized trunk", 25_600_000),
             ("BERT-base-sized trunk", 110_000_000)]
  lines = [
      "All-reduce per step on GPUs, on paper. Every step all-reduces the "
      "float32 gradients of every trained variable once (4 bytes per "
      "parameter; alternate mode: the trunk and one head); a ring all-reduce "
      "over N workers moves 2(N-1)/N times that through each link. The step "
      "does not overlap this all-reduce with the backward pass, so below the "
      "time shown (8 workers), communication takes longer than the compute "
      "it follows and dominates the step.",
      "",
      "| model | parameters | all-reduce MB/step | " +
      " | ".join(f"{name}: comm. ms/step" for name, _ in _LINKS) + " |",
      "|---|---:|---:|" + "---:|" * len(_LINKS)]
  for name, parameters in models:
    megabytes = 4 * parameters / 1e6
    moved = 2 * 7 / 8 * 4 * parameters  # bytes per link, 8 workers.
    times = " | ".join(f"{1e3 * moved / bandwidth:.3g}"
                       for _, bandwidth in _LINKS)
    lines.append(f"| {name} | {parameters:,} | {megabytes:,.1f} | {times} |")
  return "\n".join(lines)


# Comparison 6 measures every registered method at these task counts (T);
# --quick at the first two only. Methods with a Gram-matrix form also run
# with --rep_grad at _REP_GRAD_TASKS, where the others' per-task gradients
# of the whole trunk would take T backward passes each step.
_METHOD_TASKS = (2, 5, 10)
_QUICK_METHOD_TASKS = (2, 5)
_REP_GRAD_TASKS = (40,)
_REP_GRAD = " --rep_grad"
# Steps per segment: at _METHOD_TASKS; at _REP_GRAD_TASKS, where a --rep_grad
# step took 15 (MGDA) to ~600 (UPGrad: 3.2 s on 2 cores) times `sum`'s; in
# --quick mode, where start-up (tracing a step per method) is most of the
# time. Fewer steps than STEPS_PER_LOOP make a segment one loop call of
# that many steps.
_METHOD_STEPS = 200
_REP_GRAD_STEPS = 10
_QUICK_METHOD_STEPS = 10


def _method_rows() -> list[tuple[str, dict]]:
  """(row name, Trainer keyword arguments) of every registered method.

  From the registries: `sum` (static weights, summed gradients), each other
  weighting with `sum`, each other aggregator with static weights, then
  each aggregator with a Gram-matrix form with --rep_grad. Names starting
  with "test_" (methods the tests register) are left out.
  """
  weightings, aggregators = registry.WEIGHTINGS, registry.AGGREGATORS

  def listed(names):
    return [name for name in names if not name.startswith("test_")]

  rows = [(aggregators.default, {})]
  rows += [(name, {"weighting": name})
           for name in listed(weightings.names())
           if name != weightings.default]
  rows += [(name, {"aggregator": name})
           for name in listed(aggregators.names())
           if name != aggregators.default]
  rows += [(name + _REP_GRAD, {"aggregator": name, "rep_grad": True})
           for name in listed(registry.gram_forms())]
  names = [name for name, _ in rows]
  duplicated = sorted({name for name in names if names.count(name) > 1})
  if duplicated:
    raise ValueError(f"a weighting and an aggregator share the name(s) "
                     f"{', '.join(duplicated)}")
  return rows


def _sub_batches(kwargs: dict) -> int:
  """K: the sub-batches the row's aggregator splits each batch into."""
  if "aggregator" not in kwargs:
    return 1
  return getattr(registry.AGGREGATORS.get(kwargs["aggregator"]),
                 "sub_batches", 1)


def _methods_size(rows) -> ModelSize:
  """DEFAULT, its global batch rounded up to a multiple of every row's
  sub-batches (one replica), so that all rows train the same batch."""
  multiple = math.lcm(*(_sub_batches(kwargs) for _, kwargs in rows))
  batch = -(-DEFAULT.global_batch_size // multiple) * multiple
  return dataclasses.replace(DEFAULT, global_batch_size=batch)


@functools.lru_cache(maxsize=None)
def _linear_tasks(num_examples: int, num_tasks: int, seed: int = 0):
  """T one-output regression tasks on 32x32x1 inputs, as arrays.

  Inputs are standard normal; task t's label is a fixed random linear map
  of them (column t of a [1024, T] matrix of N(0, 1/1024) draws), so every
  label has unit variance.
  """
  rng = np.random.default_rng([seed, num_tasks])
  features = rng.standard_normal((num_examples, 32, 32, 1), np.float32)
  mapping = rng.standard_normal((32 * 32, num_tasks)) / 32.0
  targets = (features.reshape(num_examples, -1) @ mapping).astype(np.float32)
  tasks = [tasks_lib.TaskSpec(f"t{i}", tasks_lib.REGRESSION, size=1)
           for i in range(num_tasks)]
  labels = {task.name: targets[:, i:i + 1] for i, task in enumerate(tasks)}
  return tasks, features, labels


def _method_data(settings: harness.Settings, num_tasks: int):
  """The tasks and joint source at T tasks: the shapes dataset at its five,
  else `_linear_tasks`."""
  if num_tasks == len(shapes.TASKS):
    return (list(shapes.TASKS),
            _joint_source(_examples(settings), shapes.TASK_NAMES))
  tasks, features, labels = _linear_tasks(_examples(settings), num_tasks)
  return tasks, mtl_dist.source_from_arrays(
      features, labels, [task.name for task in tasks])


def methods(settings: harness.Settings,
            make_strategy: StrategyFactory) -> harness.Section:
  """6: the cost of each weighting and aggregator relative to `sum`."""
  strategy = make_strategy(1)
  rows = _method_rows()
  size = _methods_size(rows)
  task_counts = _QUICK_METHOD_TASKS if settings.quick else (
      _METHOD_TASKS + _REP_GRAD_TASKS)
  baseline = rows[0][0]
  tables, verdicts, cells = [], [], {}
  model = None
  for num_tasks in task_counts:
    tasks, source = _method_data(settings, num_tasks)
    every_method = num_tasks in _METHOD_TASKS
    steps = settings.steps(
        _METHOD_STEPS if every_method else _REP_GRAD_STEPS,
        _QUICK_METHOD_STEPS)
    steps_per_loop = min(steps, STEPS_PER_LOOP)
    chosen = [(name, kwargs) for name, kwargs in rows
              if name == baseline or kwargs.get("rep_grad") or every_method]
    rivals = [contenders_lib.TrainerContender(
        name, strategy, tasks, [source], (32, 32, 1), size,
        steps_per_loop=steps_per_loop, trainer_kwargs=kwargs)
              for name, kwargs in chosen]
    _log(f"T = {num_tasks} tasks, {len(rivals)} methods, {size.describe()}, "
         f"{steps} steps per segment")
    results = harness.measure(rivals, steps, settings.repeats, log=_log,
                              warm_up=settings.warm_up)
    column = f"T = {num_tasks}"
    tables.append((f"**{column} tasks**", results, "examples/s"))
    for name, _ in chosen[1:]:
      verdict = harness.judge(results, Claim(
          f"{column}: step time of {name} / {baseline}", name, baseline,
          invert=True))
      verdicts.append(verdict)
      cells[name, column] = verdict
    model = rivals[0].trainer.model
    del rivals  # Frees the models and traced steps before the next T.
  columns = [f"T = {n}" for n in task_counts]
  summary = harness.ratio_matrix("method", [name for name, _ in rows[1:]],
                                 columns, cells)
  if settings.quick:
    measured = (f"T = {', '.join(str(n) for n in task_counts)} tasks "
                f"(--quick: these T only, segments of one loop call of "
                f"{_QUICK_METHOD_STEPS} steps; the full run adds T = "
                f"{', '.join(str(n) for n in _METHOD_TASKS[2:])}, and "
                f"T = {', '.join(str(n) for n in _REP_GRAD_TASKS)} for the "
                "--rep_grad rows)")
  else:
    measured = (f"T = {', '.join(str(n) for n in _METHOD_TASKS)} tasks, "
                f"{_METHOD_STEPS} steps per segment, and the --rep_grad "
                f"rows also at T = "
                f"{', '.join(str(n) for n in _REP_GRAD_TASKS)}, "
                f"{_REP_GRAD_STEPS} steps per segment ({STEPS_PER_LOOP} "
                "steps per loop call, or fewer in one call)")
  return harness.Section(
      "methods", "6. Cost of the weighting and aggregation methods",
      f"Joint mode, one device, {size.describe()}, every registered method "
      f"at {measured}. At T = 5 the tasks are the shapes dataset's; at "
      "other T, one-output regressions of 32x32x1 normal inputs (labels: a "
      "fixed random linear map), the same trunk. Each cell is a method's "
      f"step time relative to `{baseline}` (static weights, summed "
      "gradients) at the same T: the median over repetitions of paired "
      "ratios and their range (higher is slower; not targets). A weighting "
      "runs with `sum`, an aggregator with static weights; \"X --rep_grad\" "
      "takes the tasks' gradients at the trunk's output instead "
      "(aggregators with a Gram-matrix form); \"-\": not measured.",
      tables, verdicts, summary=summary,
      notes=_memory_table(model, rows, size))


def _memory_table(model, rows, size: ModelSize) -> str:
  """The extra memory per-task gradients take, by kind of method, per T."""
  shared = plumbing.size(model.shared_variables)
  kernel = plumbing.size(tf.nest.flatten(model.last_shared_kernel()))
  per_replica = size.global_batch_size  # One replica here.
  task_counts = _METHOD_TASKS + _REP_GRAD_TASKS
  kinds = {}  # (what is held, floats per task) -> method names.
  for name, kwargs in rows:
    weighting = registry.WEIGHTINGS.get(
        kwargs.get("weighting", registry.WEIGHTINGS.default))
    aggregator = registry.AGGREGATORS.get(
        kwargs.get("aggregator", registry.AGGREGATORS.default))
    sub_batches = _sub_batches(kwargs)
    if kwargs.get("rep_grad"):
      kind = (f"T gradients at the trunk's output, [T, batch per replica, "
              f"{size.width}]", per_replica * size.width)
    elif aggregator.needs != aggregators_base.SUM and sub_batches > 1:
      kind = (f"a [{sub_batches}T, P] matrix of task gradients on "
              f"{sub_batches} sub-batches, plus its all-reduced copy",
              2 * sub_batches * shared)
    elif aggregator.needs != aggregators_base.SUM:
      kind = ("a [T, P] matrix of task gradients, plus its all-reduced copy",
              2 * shared)
    elif weighting.needs_task_gradients:
      kind = (f"T gradients of the last shared kernel ({kernel:,} floats)",
              kernel)
    else:
      kind = ("none: one gradient of the weighted sum", 0)
    kinds.setdefault(kind, []).append(name)
  lines = [
      "Extra memory of per-task gradients, on paper (float32; P = "
      f"{shared:,} shared parameters, batch per replica {per_replica}). It "
      "grows with T times the trunk for the aggregators, which is what "
      "--rep_grad avoids: its T gradients are the size of the trunk's "
      "output.",
      "",
      "| methods | what is held | " +
      " | ".join(f"MB at T = {n}" for n in task_counts) + " |",
      "|---|---|" + "---:|" * len(task_counts)]
  for (what, floats), names in sorted(kinds.items(), key=lambda k: k[0][1]):
    lines.append(f"| {', '.join(names)} | {what} | " + " | ".join(
        f"{4 * n * floats / 1e6:,.2f}" for n in task_counts) + " |")
  return "\n".join(lines)


def options(settings: harness.Settings,
            make_strategy: StrategyFactory) -> harness.Section:
  """--steps_per_loop, --jit_compile and --mixed_precision, each measured."""
  tasks = list(shapes.TASKS)
  strategy = make_strategy(1)
  source = _joint_source(_examples(settings), shapes.TASK_NAMES)
  tables, verdicts = [], []

  def contender(name, size, steps_per_loop=STEPS_PER_LOOP, jit=False,
                precision="none", optimizer=contenders_lib.adam):
    return contenders_lib.TrainerContender(
        name, strategy, tasks, [source], (32, 32, 1), size,
        steps_per_loop=steps_per_loop, trainer_kwargs={"jit_compile": jit},
        model_kwargs={"mixed_precision": precision}, optimizer=optimizer)

  default = f"defaults (--steps_per_loop={STEPS_PER_LOOP})"
  groups = (
      (OVERHEAD_BOUND, settings.steps(2000, 200), [
          contender(default, OVERHEAD_BOUND),
          *[contender(f"--steps_per_loop={n}", OVERHEAD_BOUND, n)
            for n in (1, 10, 200)],
          contender("--jit_compile", OVERHEAD_BOUND, jit=True),
          contender("tf_keras Adam (not fused)", OVERHEAD_BOUND,
                    optimizer=contenders_lib.keras_adam),
      ]),
      (COMPUTE_BOUND, settings.steps(200, 50), [
          contender(default, COMPUTE_BOUND),
          contender("--jit_compile", COMPUTE_BOUND, jit=True),
          contender("--mixed_precision=bfloat16", COMPUTE_BOUND,
                    precision="bfloat16"),
          *([contender("--mixed_precision=float16", COMPUTE_BOUND,
                       precision="float16")]
            if _measures_float16(settings) else []),
          contender("tf_keras Adam (not fused)", COMPUTE_BOUND,
                    optimizer=contenders_lib.keras_adam),
      ]))
  for size, steps, rivals in settings.sizes(groups, quick=1):
    _log(f"{size.describe()}, {steps} steps per segment")
    results = harness.measure(rivals, steps, settings.repeats, log=_log,
                              warm_up=settings.warm_up)
    tables.append((f"**{size.describe()}**", results, "examples/s"))
    verdicts += [harness.judge(results, Claim(
        f"{size.describe()}: {r.name} / defaults", r.name, default))
                 for r in results[1:]]
  return harness.Section(
      "options", "7. Speed options",
      "Joint mode, five tasks, one device; each option alone against the "
      "defaults (float32, no XLA, FusedAdam). Ratios above 1 are faster. "
      "The last row trains with tf_keras's own Adam instead of the fused "
      "update `--optimizer=adam` makes.",
      tables, verdicts)


# Comparison 8 times whole processes at two lengths: the short one, and
# the short one plus a segment that adds ~15-20 s on a machine training the
# overhead-bound model at ~40k examples/s (the compute-bound one at ~5k).
# --quick's segments still stand well out of the start-up's noise, which
# is seconds (an mtl-train run of 100 steps took 10.4 to 13.4 s on 2 cores).
_LAUNCHER_BASE_STEPS = 200
_QUICK_LAUNCHER_BASE_STEPS = 100
_LAUNCHER_OVERHEAD_BOUND_STEPS = 20000
_QUICK_LAUNCHER_OVERHEAD_BOUND_STEPS = 4000
_LAUNCHER_COMPUTE_BOUND_STEPS = 400
_LAUNCHER_STEPS_PER_LOOP = 100  # Alternate mode and Model Garden.
# No progress line, evaluation or checkpoint before the last step; the final
# ones are in both lengths and cancel.
_NO_EVENTS = ("--log_every=1000000", "--eval_every=1000000",
              "--checkpoint_every=1000000")


@dataclasses.dataclass
class _ProcessGroup:
  """Contenders of comparison 8 measured together, and their claims."""

  caption: str
  steps: int
  rivals: list[contenders_lib.ProcessContender]
  claims: list[Claim]


def _model_flags(size: ModelSize) -> list[str]:
  return [f"--trunk_width={size.width}", f"--trunk_depth={size.depth}",
          f"--global_batch_size={size.global_batch_size}"]


def launcher(settings: harness.Settings,
             make_strategy: StrategyFactory) -> harness.Section:
  """8: mtl-train against the recipes, whole processes at two lengths."""
  del make_strategy  # Every contender is a process of its own.
  base = settings.steps(_LAUNCHER_BASE_STEPS, _QUICK_LAUNCHER_BASE_STEPS)
  overhead_steps = settings.steps(_LAUNCHER_OVERHEAD_BOUND_STEPS,
                                  _QUICK_LAUNCHER_OVERHEAD_BOUND_STEPS)
  model_garden = importlib.util.find_spec("official") is not None

  def mtl_train(name, size, flags):
    return contenders_lib.ProcessContender(
        name, contenders_lib.launcher_command([
            "--strategy=one_device", "--trunk=mlp", *_model_flags(size),
            "--optimizer=adam", *flags, *_NO_EVENTS]),
        size.global_batch_size, base)

  def recipe(name, recipe_name, tasks, size, flags=()):
    return contenders_lib.ProcessContender(
        name, contenders_lib.recipe_command(recipe_name, [
            f"--tasks={','.join(tasks)}", *_model_flags(size), *flags]),
        size.global_batch_size, base)

  alternate_tasks = ("shape", "scale")
  loop = f"--steps_per_loop={_LAUNCHER_STEPS_PER_LOOP}"
  alternate_group = _ProcessGroup(
      f"**Alternate mode, tasks {', '.join(alternate_tasks)}: "
      f"{OVERHEAD_BOUND.describe()}; N = {overhead_steps}**",
      overhead_steps, [
          mtl_train("mtl-train alternate", OVERHEAD_BOUND, [
              "--mode=alternate", f"--tasks={','.join(alternate_tasks)}",
              loop]),
          mtl_train("mtl-train single task", OVERHEAD_BOUND, [
              "--mode=joint", f"--tasks={alternate_tasks[0]}", loop]),
          recipe("naive recipe", "naive_alternate", alternate_tasks,
                 OVERHEAD_BOUND),
          *([recipe("Model Garden interleaving", "model_garden",
                    alternate_tasks, OVERHEAD_BOUND, [loop])]
            if model_garden else []),
      ], [
          Claim("alternate / naive recipe", "mtl-train alternate",
                "naive recipe", 1.5),
          *([Claim("alternate / Model Garden interleaving",
                   "mtl-train alternate", "Model Garden interleaving", 1.0)]
            if model_garden else []),
          Claim("alternate / single task", "mtl-train alternate",
                "mtl-train single task", 0.9),
      ])

  def joint_group(size, steps, target):
    return _ProcessGroup(
        f"**Joint mode, five tasks: {size.describe()}; N = {steps}**",
        steps, [
            mtl_train("mtl-train joint", size, [
                "--mode=joint", f"--tasks={','.join(shapes.TASK_NAMES)}",
                f"--steps_per_loop={STEPS_PER_LOOP}"]),
            recipe("fit", "fit", shapes.TASK_NAMES, size,
                   ["--steps_per_loop=1"]),
        ], [Claim(f"{size.describe()}: mtl-train joint / fit "
                  "(steps_per_execution=1)", "mtl-train joint", "fit",
                  target)])

  if settings.quick:  # Not the compute-bound model: ~20 s a process.
    groups = [alternate_group,
              joint_group(OVERHEAD_BOUND, overhead_steps, 1.5)]
  else:
    groups = [alternate_group,
              joint_group(COMPUTE_BOUND, _LAUNCHER_COMPUTE_BOUND_STEPS, 1.0),
              joint_group(OVERHEAD_BOUND, overhead_steps, 1.5)]
  tables, verdicts = [], []
  for group in groups:
    _log(f"{group.caption.strip('*')}: {base} and {base + group.steps} "
         "steps per process")
    results = harness.measure(group.rivals, group.steps, settings.repeats,
                              log=_log, warm_up=settings.warm_up)
    tables.append((group.caption, results, "examples/s"))
    verdicts += [harness.judge(results, claim) for claim in group.claims]
  notes = "" if model_garden else (
      "Model Garden's interleaving trainer was not measured: TF Model "
      f"Garden is not installed here (`{recipes.MODEL_GARDEN_INSTALL}`; see "
      "Running it).")
  return harness.Section(
      "launcher", "8. The launcher path: whole processes",
      "What users run, each a whole process started from the command line: "
      "`mtl-train` (`python -m launch.train --strategy=one_device "
      f"--trunk=mlp --optimizer=adam {' '.join(_NO_EVENTS)}`, a fresh "
      "`--model_dir` each run) against `python -m benchmarks.recipes` (the "
      "naive alternate recipe, TF Model Garden's "
      "MultiTaskInterleavingTrainer under an orbit Controller, tf_keras "
      "Model.fit). Each side trains as its tool does: mtl-train with "
      "FusedAdam (what `--optimizer=adam` makes) under OneDeviceStrategy, "
      "the recipes with tf_keras's Adam and no strategy; the shapes data "
      "(as mtl-train generates it), model and global batch are the same. "
      "Alternate mode: `mtl-train --mode=alternate --tasks=shape,scale "
      f"--steps_per_loop={_LAUNCHER_STEPS_PER_LOOP}`; the single task is "
      "`mtl-train --mode=joint --tasks=shape`; the naive recipe calls one "
      "tf.function step per task from Python; Model Garden runs "
      f"{_LAUNCHER_STEPS_PER_LOOP} steps per compiled call, tasks sampled "
      "uniformly. Joint mode: `mtl-train --mode=joint` on the five tasks "
      f"(`--steps_per_loop={STEPS_PER_LOOP}`) against Model.fit with "
      "`loss_weights`, steps_per_execution=1. Every process runs at two "
      f"lengths, {base} steps and {base} + N steps (N: in each group's "
      "heading), "
      "alternating which runs first; N steps take the difference of the "
      "two wall times, so what a run does whatever its length (Python and "
      "TensorFlow start-up, data generation, tracing, the final evaluation "
      "and checkpoint) cancels. Start-up is the wall time of one whole "
      f"{base}-step run.",
      tables, verdicts, notes=notes)


ALL = {
    "joint_fit": joint_fit,
    "alternate": alternate,
    "input_pipeline": input_pipeline,
    "flops": flops,
    "scaling": scaling,
    "methods": methods,
    "options": options,
    "launcher": launcher,
}
