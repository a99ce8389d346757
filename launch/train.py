"""mtl-train: trains a shared-trunk multi-task model.

Examples:
  mtl-train --model_dir=/tmp/mtl --num_cpu_devices=2
  mtl-train --flagfile=launch/configs/alternate.flags --model_dir=/tmp/mtl_alt

Exit status: 0 on success, 2 for bad flags or configuration (nothing is
written to --model_dir), 1 for a failure while running (including another
worker of a multi-worker run failing: rerun the same command to resume),
143 when SIGTERM stopped the run after it saved a checkpoint (rerun to
resume).
"""

import os
import sys

# Keep TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) out of the
# log unless the user asked for it; errors and warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import tensorflow as tf

from launch import cli
import mtl_dist
from mtl_dist.loop import preemption
from mtl_dist.methods import registry
from mtl_dist.run import config as config_lib

_PROGRAM = "mtl-train"

_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "Directory for checkpoints, metrics and summaries; a "
    "run on a directory that holds a checkpoint resumes from it.")
_MODE = flags.DEFINE_enum("mode", "joint", config_lib.MODES,
                          "joint: every example labelled for every task, one "
                          "update on the weighted loss sum. alternate: one "
                          "dataset per task, one task per step.")
_DATASET = flags.DEFINE_string(
    "dataset", "shapes", "Dataset: `shapes` (generated, no download), "
    "`toy_regression` (the GradNorm paper's 10 synthetic regressions; joint "
    "mode) or `tfds:NAME` (a prepared TFDS dataset; joint mode, --tasks name "
    "its label features).")
_TASK_DATASETS = flags.DEFINE_string(
    "task_datasets", None, "Alternate mode: each task's own TFDS dataset and "
    "label feature, e.g. digits=tfds:mnist:label,fashion=tfds:fashion_mnist:"
    "label.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory (default: TFDS's own).")
_INPUT_KEY = flags.DEFINE_string(
    "input_key", None, "TFDS: the input feature (default image).")
_SPLIT = flags.DEFINE_string("split", None,
                             "TFDS: training split (default train).")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", None,
                                  "TFDS: eval split (default test).")
_DOWNLOAD = flags.DEFINE_bool(
    "download", False, "TFDS: download and prepare a dataset that is not "
    "prepared yet (never done otherwise).")
_IMAGE_SIZE = flags.DEFINE_list(
    "image_size", None, "TFDS: resize images to HEIGHT,WIDTH in the pipeline.")
_CHANNELS = flags.DEFINE_integer(
    "channels", None, "TFDS: convert images to 1 (grayscale) or 3 (RGB) "
    "channels in the pipeline.")
_TASKS = flags.DEFINE_list("tasks", None,
                           "Tasks to train (default: all of the dataset's).")
_TASK_WEIGHTS = flags.DEFINE_string(
    "task_weights", None, "Joint mode: loss weights; alternate mode with "
    "--schedule=weights: task shares. E.g. shape=1.0,x=0.5 (unlisted tasks "
    "weigh 1.0).")
_SCHEDULE = flags.DEFINE_enum(
    "schedule", None, config_lib.SCHEDULES,
    "Alternate mode: which task each step trains (default round_robin). "
    "proportional: P ~ dataset size; temperature: P ~ min(size, "
    "--mixing_cap)^(1/--temperature); annealed: P ~ size^alpha, alpha 1.0 "
    "to 0.2 over the epochs; weights: P ~ --task_weights.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", None, "--schedule=temperature: T (default 2.0).")
_MIXING_CAP = flags.DEFINE_integer(
    "mixing_cap", None, "--schedule=temperature: cap K on dataset sizes "
    "(default 0: no cap).")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
    "steps_per_epoch", None, "--schedule=annealed: steps per epoch (default: "
    "one pass over all task datasets, sum of sizes / global batch).")
_ANNEAL_EPOCHS = flags.DEFINE_integer(
    "anneal_epochs", None, "--schedule=annealed: epochs E over which alpha "
    "falls from 1.0 to 0.2 (default: the epochs in --train_steps of the "
    "first run; kept in the checkpoint, so a resume with more steps keeps "
    "the plan and alpha stays 0.2 after epoch E).")
_PER_TASK_OPTIMIZER = flags.DEFINE_bool(
    "per_task_optimizer", None, "Alternate mode: one optimizer per task "
    "(default) instead of one shared.")
_TASK_SIZES = flags.DEFINE_string(
    "task_sizes", None, "Alternate mode on shapes: examples per task "
    "dataset, e.g. shape=8000,x=500 (default: 8192 halving per task).")
_LABEL_FRACTION = flags.DEFINE_string(
    "label_fraction", None, "Joint mode on shapes: fraction of training "
    "examples that keep each listed task's label, e.g. scale=0.3,x=0.5; the "
    "others lack it (partial labels).")
_PARTIAL_LABELS = flags.DEFINE_bool(
    "partial_labels", False, "Joint mode: examples may lack some tasks' "
    "labels (class -1, NaN target, or a <task>_mask entry of 0); each task "
    "then averages over its labelled examples. On with --label_fraction.")
_BASELINES = flags.DEFINE_string(
    "baselines", None, "Single-task runs to compare with, task=MODEL_DIR,...: "
    "adds LibMTL's Delta_m (mean relative improvement, %) to summary.json.")
_AGGREGATOR = flags.DEFINE_enum(
    "aggregator", registry.AGGREGATORS.default, config_lib.AGGREGATORS,
    "Joint mode: how the tasks' gradients of the shared trunk combine: "
    f"{registry.AGGREGATORS.describe()}. Per-task gradients are summed over "
    "all replicas before aggregating.")
_REP_GRAD = flags.DEFINE_bool(
    "rep_grad", False, "--aggregator=mgda or cagrad: compute the task "
    "gradients at the shared representation (the trunk's output) instead of "
    "all trunk parameters, the cheaper MGDA-UB form.")
_WEIGHTING = flags.DEFINE_enum(
    "weighting", registry.WEIGHTINGS.default, config_lib.WEIGHTINGS,
    f"Joint mode: task loss weights: {registry.WEIGHTINGS.describe()}.")
# Each method's options, --<method>_<option>, defined where the method is.
_METHOD_OPTIONS = {
    flag: (flags.DEFINE_integer if isinstance(option.default, int)
           else flags.DEFINE_float)(
               flag, None, f"--{kind}={method}: {option.help} (default "
               f"{option.default}).")
    for flag, kind, method, option in config_lib.method_option_flags()}
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", None, "Joint mode on shapes or toy_regression: "
    "training examples (default 16384).")
_EVAL_EXAMPLES = flags.DEFINE_integer(
    "eval_examples", None, "shapes, toy_regression: held-out eval examples "
    "(default 2048).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 1000,
                                    "Total training steps.")
_GLOBAL_BATCH_SIZE = flags.DEFINE_integer(
    "global_batch_size", 64, "Examples per step over all replicas.")
_STEPS_PER_LOOP = flags.DEFINE_integer(
    "steps_per_loop", 50, "Steps run inside one tf.function call.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", config_lib.OPTIMIZERS,
                               "Optimizer.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
_TRUNK = flags.DEFINE_enum("trunk", "mlp", config_lib.TRUNKS,
                           "Shared trunk architecture.")
_TRUNK_WIDTH = flags.DEFINE_integer("trunk_width", 256,
                                    "Units (mlp) or filters (conv) per layer.")
_TRUNK_DEPTH = flags.DEFINE_integer("trunk_depth", 2, "Trunk layers.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "auto", config_lib.STRATEGIES,
    "auto: MultiWorkerMirroredStrategy when TF_CONFIG or the SLURM step "
    "names several workers (or --cluster is given); else MirroredStrategy "
    "over all GPUs, or over --num_cpu_devices CPU devices when there is no "
    "GPU; one device when there is only one. multi_worker: "
    "MultiWorkerMirroredStrategy over the cluster --cluster names.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 1, "Split the host CPU into this many logical devices "
    "(replicas when there is no GPU; one process only).")
_CLUSTER = flags.DEFINE_enum(
    "cluster", None, config_lib.CLUSTERS,
    "Multi-worker: where the cluster is described: tf_config (the TF_CONFIG "
    "variable, as set by TFJob or mtl-local-cluster) or slurm (SLURM_PROCID "
    "and SLURM_STEP_*, in tasks started by srun). Default: whichever is set.")
_COLLECTIVE = flags.DEFINE_enum(
    "collective", None, config_lib.COLLECTIVES,
    "Multi-worker: all-reduce implementation; auto (default) is NCCL on GPUs "
    "and RING on CPUs.")
_COLLECTIVE_TIMEOUT = flags.DEFINE_float(
    "collective_timeout", None, "Multi-worker: seconds a collective waits "
    "for all workers before the run fails, for workers that hang while "
    "alive (dead ones are found by heartbeats within seconds anyway). Off by "
    "default: TensorFlow 2.21 keeps one sleeping thread per collective for "
    "this long, so use it with slow steps only (see docs/cluster.md).")
_CLUSTER_START_TIMEOUT = flags.DEFINE_float(
    "cluster_start_timeout", None, "Multi-worker: seconds to wait at start "
    "for every worker to join before failing with exit status 1 (default "
    "900), e.g. when a pod stays pending or a task fails to launch.")
_PORT_BASE = flags.DEFINE_integer(
    "port_base", None, "Multi-worker on SLURM: port of each node's first "
    "task; the k-th task on a node uses port_base+k (default 8888).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 500,
                                         "Steps between checkpoints.")
_KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 3,
                                         "Checkpoints to keep.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500,
                                   "Steps between evaluations.")
_EVAL_STEPS = flags.DEFINE_integer(
    "eval_steps", 0, "Eval batches per task; 0 evaluates the whole split.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100,
                                  "Steps between progress lines and metrics.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for data, weights and order.")
_ON_NONFINITE = flags.DEFINE_enum(
    "on_nonfinite", "stop", config_lib.ON_NONFINITE,
    "A step whose loss or gradient is NaN or Inf on any replica: stop: end "
    "the run with exit status 1 naming the step and tasks, saving nothing "
    "after it; skip: leave everything unchanged in that step and go on, "
    "counting skipped steps in metrics (nonfinite_skipped).")
_DETERMINISTIC = flags.DEFINE_bool(
    "deterministic", False, "Enable TensorFlow's op determinism, and resume "
    "file-backed (TFDS) pipelines exactly, by re-reading the examples they "
    "had served (in-memory data always resumes exactly). A run killed and "
    "restarted then ends with the weights of an uninterrupted run.")
_JIT_COMPILE = flags.DEFINE_bool(
    "jit_compile", False, "XLA-compile each replica's forward and backward "
    "pass (losses and gradients); the all-reduce, the NaN/Inf check and the "
    "update run outside it. Not with --rep_grad.")
_MIXED_PRECISION = flags.DEFINE_enum(
    "mixed_precision", "none", config_lib.MIXED_PRECISION,
    "none: float32. bfloat16 / float16: the trunk computes in that dtype with "
    "float32 variables, the heads in float32. float16 adds dynamic loss "
    "scaling; a step whose gradients overflow is skipped by the optimizer "
    "(which lowers the scale) and not counted as non-finite.")
_PROFILE_STEPS = flags.DEFINE_list(
    "profile_steps", None, "A,B: write a TensorBoard profile of training "
    "steps A to B (1-based, inclusive) to <model_dir>/tensorboard/train/"
    "plugins/profile/ (the chief only in a multi-worker run).")

_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "At the end, write the trained model here as a "
    "SavedModel with a serving signature per task and serving_default "
    "(what mtl-export writes); an earlier export there is replaced.")

flags.mark_flag_as_required("model_dir")


def _given(flag_holder: flags.FlagHolder):
  """The flag's value if it was given on the command line or in a flagfile."""
  return flag_holder.value if flag_holder.present else None


def _config_from_flags() -> mtl_dist.TrainConfig:
  task_weights = task_sizes = label_fraction = task_datasets = None
  baselines = None
  if _BASELINES.value is not None:
    baselines = mtl_dist.parse_key_values(_BASELINES.value, "baselines", str)
  image_size = profile_steps = None
  if _PROFILE_STEPS.value is not None:
    try:
      profile_steps = [int(v) for v in _PROFILE_STEPS.value]
    except ValueError:
      raise mtl_dist.ConfigError(
          f"--profile_steps={','.join(_PROFILE_STEPS.value)}: must be A,B "
          "step numbers") from None
  if _TASK_DATASETS.value is not None:
    task_datasets = mtl_dist.parse_key_values(_TASK_DATASETS.value,
                                              "task_datasets", str)
  if _IMAGE_SIZE.value is not None:
    try:
      image_size = [int(v) for v in _IMAGE_SIZE.value]
    except ValueError:
      raise mtl_dist.ConfigError(
          f"--image_size={','.join(_IMAGE_SIZE.value)}: must be "
          "HEIGHT,WIDTH integers") from None
  if _TASK_WEIGHTS.value is not None:
    task_weights = mtl_dist.parse_key_values(_TASK_WEIGHTS.value,
                                             "task_weights", float)
  if _TASK_SIZES.value is not None:
    task_sizes = mtl_dist.parse_key_values(_TASK_SIZES.value, "task_sizes",
                                           int)
  if _LABEL_FRACTION.value is not None:
    label_fraction = mtl_dist.parse_key_values(_LABEL_FRACTION.value,
                                               "label_fraction", float)
  return mtl_dist.TrainConfig(
      model_dir=_MODEL_DIR.value, mode=_MODE.value, dataset=_DATASET.value,
      tasks=_TASKS.value, task_weights=task_weights,
      schedule=_given(_SCHEDULE),
      per_task_optimizer=_given(_PER_TASK_OPTIMIZER), task_sizes=task_sizes,
      temperature=_TEMPERATURE.value, mixing_cap=_MIXING_CAP.value,
      steps_per_epoch=_STEPS_PER_EPOCH.value,
      anneal_epochs=_ANNEAL_EPOCHS.value,
      label_fraction=label_fraction, partial_labels=_PARTIAL_LABELS.value,
      baselines=baselines, aggregator=_AGGREGATOR.value,
      rep_grad=_REP_GRAD.value, weighting=_WEIGHTING.value,
      train_examples=_TRAIN_EXAMPLES.value,
      task_datasets=task_datasets, data_dir=_DATA_DIR.value,
      input_key=_INPUT_KEY.value, split=_SPLIT.value,
      eval_split=_EVAL_SPLIT.value, download=_DOWNLOAD.value,
      image_size=image_size, channels=_CHANNELS.value,
      eval_examples=_EVAL_EXAMPLES.value, train_steps=_TRAIN_STEPS.value,
      global_batch_size=_GLOBAL_BATCH_SIZE.value,
      steps_per_loop=_STEPS_PER_LOOP.value, optimizer=_OPTIMIZER.value,
      learning_rate=_LEARNING_RATE.value, trunk=_TRUNK.value,
      trunk_width=_TRUNK_WIDTH.value, trunk_depth=_TRUNK_DEPTH.value,
      strategy=_STRATEGY.value, num_cpu_devices=_NUM_CPU_DEVICES.value,
      cluster=_CLUSTER.value, collective=_COLLECTIVE.value,
      collective_timeout=_COLLECTIVE_TIMEOUT.value,
      cluster_start_timeout=_CLUSTER_START_TIMEOUT.value,
      port_base=_PORT_BASE.value,
      checkpoint_every=_CHECKPOINT_EVERY.value,
      keep_checkpoints=_KEEP_CHECKPOINTS.value,
      eval_every=_EVAL_EVERY.value, eval_steps=_EVAL_STEPS.value,
      log_every=_LOG_EVERY.value, seed=_SEED.value,
      deterministic=_DETERMINISTIC.value, on_nonfinite=_ON_NONFINITE.value,
      jit_compile=_JIT_COMPILE.value,
      mixed_precision=_MIXED_PRECISION.value, profile_steps=profile_steps,
      export_dir=_EXPORT_DIR.value,
      **{flag: holder.value for flag, holder in _METHOD_OPTIONS.items()})


def main(argv: list[str]) -> None:
  cli.refuse_arguments(_PROGRAM, argv)
  if logging.get_verbosity() < logging.DEBUG:
    # TensorFlow's own INFO lines (one per collective set-up under
    # MultiWorkerMirroredStrategy) drown the progress lines; --v=1 shows them.
    tf.get_logger().setLevel("WARNING")
  try:
    summary = mtl_dist.train(_config_from_flags())
  except mtl_dist.ConfigError as e:
    cli.fail(_PROGRAM, str(e))
  except (mtl_dist.ClusterError, mtl_dist.DataError,
          mtl_dist.NonFiniteError) as e:
    cli.fail(_PROGRAM, str(e), status=1)
  except mtl_dist.Preempted as e:
    sys.stderr.write(f"{_PROGRAM}: {e}\n")
    sys.exit(preemption.PREEMPTED_EXIT_STATUS)
  print(mtl_dist.format_results(
      summary, title=f"{_PROGRAM}: {summary['mode']} mode, step "
      f"{summary['step']}, {summary['replicas']} replica(s), "
      f"{summary['examples_per_second']:.0f} examples/s; eval results:"))


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=cli.flags_parser(_PROGRAM))


if __name__ == "__main__":
  run()
