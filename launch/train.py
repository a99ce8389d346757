"""mtl-train: trains a multi-task model (shared trunk, experts or columns).

Examples:
  mtl-train --model_dir=/tmp/mtl --num_cpu_devices=2
  mtl-train --flagfile=launch/configs/alternate.flags --model_dir=/tmp/mtl_alt

Exit status: 0 on success, 2 for bad flags or configuration (nothing is
written to --model_dir), 1 for a failure while running (including another
worker of a multi-worker run failing: rerun the same command to resume),
143 when SIGTERM stopped the run after it saved a checkpoint (rerun to
resume).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable

from absl import flags
from absl import logging

from launch import cli
from launch import startup
# Only what needs no TensorFlow: the flags are defined and checked (and the
# TrainConfig they make) before main imports TensorFlow and trains.
import mtl_dist
from mtl_dist.cluster import settings as cluster_settings
from mtl_dist.data import settings as data_settings
from mtl_dist.methods import catalog
from mtl_dist.methods import settings as method_settings
from mtl_dist.model import settings as model_settings
from mtl_dist.run import config as config_lib

_PROGRAM = "mtl-train"
# Each flag's default is its TrainConfig field's: None for a setting whose
# default is its section's (shown in the help from the section itself).
_DEFAULT = {field.name: field.default
            for field in dataclasses.fields(config_lib.TrainConfig)}
_DATA = data_settings.DataConfig()
_SCHEDULES = method_settings.ScheduleConfig()
_CLUSTER = cluster_settings.ClusterConfig()
_ARCH = model_settings.ArchitectureConfig()

flags.DEFINE_string(
    "model_dir", None, "Directory for checkpoints, metrics and summaries; a "
    "run on a directory that holds a checkpoint resumes from it.")
flags.DEFINE_enum(
    "mode", _DEFAULT["mode"], config_lib.MODES,
    "joint: every example labelled for every task, one update on the weighted "
    "loss sum. alternate: one dataset per task, one task per step.")
flags.DEFINE_string(
    "dataset", _DEFAULT["dataset"],
    "Dataset: `shapes` (generated, no download), `toy_regression` (the "
    "GradNorm paper's 10 synthetic regressions; joint mode) or `tfds:NAME` (a "
    "prepared TFDS dataset; joint mode, --tasks name its label features).")
flags.DEFINE_string(
    "task_datasets", _DEFAULT["task_datasets"],
    "Alternate mode: each task's own TFDS dataset and label feature, e.g. "
    "digits=tfds:mnist:label,fashion=tfds:fashion_mnist:label.")
flags.DEFINE_string(
    "data_dir", _DEFAULT["data_dir"],
    "TFDS data directory (default: TFDS's own).")
flags.DEFINE_string(
    "input_key", _DEFAULT["input_key"],
    f"TFDS: the input feature (default {_DATA.input_key}).")
flags.DEFINE_string(
    "split", _DEFAULT["split"],
    f"TFDS: training split (default {_DATA.split}).")
flags.DEFINE_string(
    "eval_split", _DEFAULT["eval_split"],
    f"TFDS: eval split (default {_DATA.eval_split}).")
flags.DEFINE_bool(
    "download", _DEFAULT["download"],
    "TFDS: download and prepare a dataset that is not prepared yet (never done"
    " otherwise).")
flags.DEFINE_list(
    "image_size", _DEFAULT["image_size"],
    "TFDS: resize images to HEIGHT,WIDTH in the pipeline.")
flags.DEFINE_integer(
    "channels", _DEFAULT["channels"],
    "TFDS: convert images to 1 (grayscale) or 3 (RGB) channels in the "
    "pipeline.")
flags.DEFINE_list(
    "tasks", _DEFAULT["tasks"],
    "Tasks to train (default: all of the dataset's).")
flags.DEFINE_string(
    "task_weights", _DEFAULT["task_weights"],
    "Joint mode: loss weights; alternate mode with --schedule=weights: task "
    "shares. E.g. shape=1.0,x=0.5 (unlisted tasks weigh 1.0).")
flags.DEFINE_enum(
    "schedule", _DEFAULT["schedule"], config_lib.SCHEDULES,
    "Alternate mode: which task each step trains (default "
    f"{_SCHEDULES.schedule}). "
    "proportional: P ~ dataset size; temperature: P ~ min(size, "
    "--mixing_cap)^(1/--temperature); annealed: P ~ size^alpha, alpha 1.0 to "
    "0.2 over the epochs; weights: P ~ --task_weights.")
flags.DEFINE_float(
    "temperature", _DEFAULT["temperature"],
    f"--schedule=temperature: T (default {_SCHEDULES.temperature}).")
flags.DEFINE_integer(
    "mixing_cap", _DEFAULT["mixing_cap"],
    "--schedule=temperature: cap K on dataset sizes (default "
    f"{_SCHEDULES.mixing_cap}: no cap).")
flags.DEFINE_integer(
    "steps_per_epoch", _DEFAULT["steps_per_epoch"],
    "--schedule=annealed: steps per epoch (default: one pass over all task "
    "datasets, sum of sizes / global batch).")
flags.DEFINE_integer(
    "anneal_epochs", _DEFAULT["anneal_epochs"],
    "--schedule=annealed: epochs E over which alpha falls from 1.0 to 0.2 "
    "(default: the epochs in --train_steps of the first run; kept in the "
    "checkpoint, so a resume with more steps keeps the plan and alpha stays "
    "0.2 after epoch E).")
flags.DEFINE_bool(
    "per_task_optimizer", _DEFAULT["per_task_optimizer"],
    "Alternate mode: one optimizer per task (default) instead of one shared.")
flags.DEFINE_string(
    "task_sizes", _DEFAULT["task_sizes"],
    "Alternate mode on shapes: examples per task dataset, e.g. "
    "shape=8000,x=500 (default: 8192 halving per task).")
flags.DEFINE_string(
    "label_fraction", _DEFAULT["label_fraction"],
    "Joint mode on shapes: fraction of training examples that keep each listed"
    " task's label, e.g. scale=0.3,x=0.5; the others lack it (partial labels).")
flags.DEFINE_bool(
    "partial_labels", _DEFAULT["partial_labels"],
    "Joint mode: examples may lack some tasks' labels (class -1, NaN target, "
    "or a <task>_mask entry of 0); each task then averages over its labelled "
    "examples. On with --label_fraction.")
flags.DEFINE_string(
    "baselines", _DEFAULT["baselines"],
    "Single-task runs to compare with, task=MODEL_DIR,...: adds LibMTL's "
    "Delta_m (mean relative improvement, %) to summary.json.")
flags.DEFINE_enum(
    "aggregator", _DEFAULT["aggregator"], config_lib.AGGREGATORS,
    "Joint mode: how the tasks' gradients of the shared trunk combine: "
    f"{catalog.AGGREGATORS.describe()}. Per-task gradients are summed over "
    "all replicas before aggregating.")
flags.DEFINE_bool(
    "rep_grad", _DEFAULT["rep_grad"],
    "--aggregator=mgda or cagrad: compute the task gradients at the shared "
    "representation (the trunk's output) instead of all trunk parameters, the "
    "cheaper MGDA-UB form.")
flags.DEFINE_enum(
    "weighting", _DEFAULT["weighting"], config_lib.WEIGHTINGS,
    f"Joint mode: task loss weights: {catalog.WEIGHTINGS.describe()}.")
flags.DEFINE_integer(
    "train_examples", _DEFAULT["train_examples"],
    "Joint mode on shapes or toy_regression: training examples (default "
    f"{_DATA.train_examples}).")
flags.DEFINE_integer(
    "eval_examples", _DEFAULT["eval_examples"],
    "shapes, toy_regression: held-out eval examples (default "
    f"{_DATA.eval_examples}).")
flags.DEFINE_integer(
    "train_steps", _DEFAULT["train_steps"],
    "Total training steps.")
flags.DEFINE_integer(
    "global_batch_size", _DEFAULT["global_batch_size"],
    "Examples per step over all replicas.")
flags.DEFINE_integer(
    "steps_per_loop", _DEFAULT["steps_per_loop"],
    "Steps run inside one tf.function call.")
flags.DEFINE_enum(
    "optimizer", _DEFAULT["optimizer"], config_lib.OPTIMIZERS,
    "Optimizer.")
flags.DEFINE_float(
    "learning_rate", _DEFAULT["learning_rate"],
    "Learning rate.")
flags.DEFINE_enum(
    "trunk", _DEFAULT["trunk"], config_lib.TRUNKS,
    "Shared trunk architecture.")
flags.DEFINE_integer(
    "trunk_width", _DEFAULT["trunk_width"],
    "Units (mlp) or filters (conv) per layer.")
flags.DEFINE_integer(
    "trunk_depth", _DEFAULT["trunk_depth"],
    "Trunk layers.")
flags.DEFINE_enum(
    "architecture", _DEFAULT["architecture"], config_lib.ARCHITECTURES,
    "hps: one shared trunk, a head per task. mmoe: --num_experts trunks as "
    "experts, a softmax gate per task. cgc: --num_shared_experts plus "
    "--num_task_experts private experts per task. ple: CGC stacked "
    "--num_levels times with shared gates. dselect_k: MMoE with DSelect-k "
    "gates. cross_stitch: a trunk column per task, cross-stitch units after "
    "each block. mtan: a shared trunk with per-task attention at each layer.")
flags.DEFINE_integer(
    "num_experts", _DEFAULT["num_experts"],
    f"mmoe, dselect_k: shared experts (default {_ARCH.num_experts}).")
flags.DEFINE_integer(
    "num_shared_experts", _DEFAULT["num_shared_experts"],
    f"cgc, ple: shared experts per level (default "
    f"{_ARCH.num_shared_experts}).")
flags.DEFINE_integer(
    "num_task_experts", _DEFAULT["num_task_experts"],
    f"cgc, ple: private experts per task and level (default "
    f"{_ARCH.num_task_experts}).")
flags.DEFINE_integer(
    "num_levels", _DEFAULT["num_levels"],
    f"ple: extraction levels (default {_ARCH.num_levels}).")
flags.DEFINE_integer(
    "num_selected_experts", _DEFAULT["num_selected_experts"],
    f"dselect_k: experts each gate selects, k (default "
    f"{_ARCH.num_selected_experts}).")
flags.DEFINE_float(
    "dselect_k_gamma", _DEFAULT["dselect_k_gamma"],
    f"dselect_k: width of the smooth step (default {_ARCH.dselect_k_gamma}).")
flags.DEFINE_float(
    "dselect_k_entropy_reg", _DEFAULT["dselect_k_entropy_reg"],
    "dselect_k: coefficient of the selectors' entropy, per example (default "
    f"{_ARCH.dselect_k_entropy_reg}).")
flags.DEFINE_enum(
    "strategy", _DEFAULT["strategy"], config_lib.STRATEGIES,
    "auto: MultiWorkerMirroredStrategy when TF_CONFIG or the SLURM step names "
    "several workers (or --cluster is given); else MirroredStrategy over all "
    "GPUs, or over --num_cpu_devices CPU devices when there is no GPU; one "
    "device when there is only one. multi_worker: MultiWorkerMirroredStrategy "
    "over the cluster --cluster names.")
flags.DEFINE_integer(
    "num_cpu_devices", _DEFAULT["num_cpu_devices"],
    "Split the host CPU into this many logical devices (replicas when there is"
    " no GPU; one process only).")
flags.DEFINE_enum(
    "cluster", _DEFAULT["cluster"], config_lib.CLUSTERS,
    "Multi-worker: where the cluster is described: tf_config (the TF_CONFIG "
    "variable, as set by TFJob or mtl-local-cluster) or slurm (SLURM_PROCID "
    "and SLURM_STEP_*, in tasks started by srun). Default: whichever is set.")
flags.DEFINE_enum(
    "collective", _DEFAULT["collective"], config_lib.COLLECTIVES,
    f"Multi-worker: all-reduce implementation; {_CLUSTER.collective} "
    "(default) is NCCL on GPUs and RING on CPUs.")
flags.DEFINE_float(
    "collective_timeout", _DEFAULT["collective_timeout"],
    "Multi-worker: seconds a collective waits for all workers before the run "
    "fails, for workers that hang while alive (dead ones are found by "
    "heartbeats within seconds anyway). Off by default: TensorFlow 2.21 keeps "
    "one sleeping thread per collective for this long, so use it with slow "
    "steps only (see docs/cluster.md).")
flags.DEFINE_float(
    "cluster_start_timeout", _DEFAULT["cluster_start_timeout"],
    "Multi-worker: seconds to wait at start for every worker to join before "
    f"failing with exit status 1 (default {_CLUSTER.cluster_start_timeout:g}), "
    "e.g. when a pod stays pending "
    "or a task fails to launch.")
flags.DEFINE_integer(
    "port_base", _DEFAULT["port_base"],
    "Multi-worker on SLURM: port of each node's first task; the k-th task on a"
    " node uses port_base+k (default 8888).")
flags.DEFINE_integer(
    "checkpoint_every", _DEFAULT["checkpoint_every"],
    "Steps between checkpoints.")
flags.DEFINE_integer(
    "keep_checkpoints", _DEFAULT["keep_checkpoints"],
    "Checkpoints to keep.")
flags.DEFINE_integer(
    "eval_every", _DEFAULT["eval_every"],
    "Steps between evaluations.")
flags.DEFINE_integer(
    "eval_steps", _DEFAULT["eval_steps"],
    "Eval batches per task; 0 evaluates the whole split.")
flags.DEFINE_integer(
    "log_every", _DEFAULT["log_every"],
    "Steps between progress lines and metrics.")
flags.DEFINE_integer(
    "seed", _DEFAULT["seed"],
    "Seed for data, weights and order.")
flags.DEFINE_enum(
    "on_nonfinite", _DEFAULT["on_nonfinite"], config_lib.ON_NONFINITE,
    "A step whose loss or gradient is NaN or Inf on any replica: stop: end the"
    " run with exit status 1 naming the step and tasks, saving nothing after "
    "it; skip: leave everything unchanged in that step and go on, counting "
    "skipped steps in metrics (nonfinite_skipped).")
flags.DEFINE_bool(
    "deterministic", _DEFAULT["deterministic"],
    "Enable TensorFlow's op determinism, and resume file-backed (TFDS) "
    "pipelines exactly, by re-reading the examples they had served (in-memory "
    "data always resumes exactly). A run killed and restarted then ends with "
    "the weights of an uninterrupted run.")
flags.DEFINE_bool(
    "jit_compile", _DEFAULT["jit_compile"],
    "XLA-compile each replica's forward and backward pass (losses and "
    "gradients); the all-reduce, the NaN/Inf check and the update run outside "
    "it. Not with --rep_grad.")
flags.DEFINE_enum(
    "mixed_precision", _DEFAULT["mixed_precision"], config_lib.MIXED_PRECISION,
    "none: float32. bfloat16 / float16: the trunk computes in that dtype with "
    "float32 variables, the heads in float32. float16 adds dynamic loss "
    "scaling; a step whose gradients overflow is skipped by the optimizer "
    "(which lowers the scale) and not counted as non-finite.")
flags.DEFINE_list(
    "profile_steps", _DEFAULT["profile_steps"],
    "A,B: write a TensorBoard profile of training steps A to B (1-based, "
    "inclusive) to <model_dir>/tensorboard/train/plugins/profile/ (the chief "
    "only in a multi-worker run).")
flags.DEFINE_string(
    "export_dir", _DEFAULT["export_dir"],
    "At the end, write the trained model here as a SavedModel with a serving "
    "signature per task and serving_default (what mtl-export writes); an "
    "earlier export there is replaced.")

# Each method's options, --<method>_<option>, from the method catalogue.
for _flag, _kind, _method, _option in config_lib.method_option_flags():
  (flags.DEFINE_integer if isinstance(_option.default, int)
   else flags.DEFINE_float)(
       _flag, None, f"--{_kind}={_method}: {_option.help} (default "
       f"{_option.default}).")

flags.mark_flag_as_required("model_dir")


def _integers(flag: str, shape: str) -> Callable[[list[str]], list[int]]:
  """Parses a list flag's items as integers, or names the flag and `shape`."""
  def parse(items: list[str]) -> list[int]:
    try:
      return [int(item) for item in items]
    except ValueError:
      raise mtl_dist.ConfigError(
          f"--{flag}={','.join(items)}: must be {shape}") from None
  return parse


def _key_values(flag: str, parse_value: Callable[[str], Any]):
  return lambda text: mtl_dist.parse_key_values(text, flag, parse_value)


# Flags whose text is not the TrainConfig field's value as it stands, in the
# order they are parsed (the first malformed one is reported).
_PARSED = {
    "baselines": _key_values("baselines", str),
    "profile_steps": _integers("profile_steps", "A,B step numbers"),
    "task_datasets": _key_values("task_datasets", str),
    "image_size": _integers("image_size", "HEIGHT,WIDTH integers"),
    "task_weights": _key_values("task_weights", float),
    "task_sizes": _key_values("task_sizes", int),
    "label_fraction": _key_values("label_fraction", float),
}


def _config_from_flags() -> mtl_dist.TrainConfig:
  """The TrainConfig the flags describe: one flag per field, same name."""
  parsed = {name: parse(flags.FLAGS[name].value)
            for name, parse in _PARSED.items()
            if flags.FLAGS[name].value is not None}
  return mtl_dist.TrainConfig(**{
      field.name: parsed.get(field.name, flags.FLAGS[field.name].value)
      for field in dataclasses.fields(config_lib.TrainConfig)})


def main(argv: list[str]) -> None:
  cli.refuse_arguments(_PROGRAM, argv)
  try:  # Every check that needs neither TensorFlow nor a file.
    config = _config_from_flags()
    config.check_values()
  except mtl_dist.ConfigError as e:
    cli.fail(_PROGRAM, str(e))
  startup.import_tensorflow_quietly()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtl_dist.loop import preemption  # pylint: disable=g-import-not-at-top
  if logging.get_verbosity() < logging.DEBUG:
    # TensorFlow's own INFO lines (one per collective set-up under
    # MultiWorkerMirroredStrategy) drown the progress lines; --v=1 shows them.
    tf.get_logger().setLevel("WARNING")
  try:
    # --verbosity=-1 (or lower) hides the progress lines too.
    summary = mtl_dist.train(
        config, verbose=logging.get_verbosity() >= logging.INFO)
  except mtl_dist.ConfigError as e:
    cli.fail(_PROGRAM, str(e))
  except (mtl_dist.ClusterError, mtl_dist.DataError,
          mtl_dist.NonFiniteError) as e:
    cli.fail(_PROGRAM, str(e), status=1)
  except (tf.errors.OpError, OSError) as e:  # A full disk, a lost file system.
    cli.fail(_PROGRAM, cli.runtime_failure(e), status=1)
  except mtl_dist.Preempted as e:
    sys.stderr.write(f"{_PROGRAM}: {e}\n")
    sys.exit(preemption.PREEMPTED_EXIT_STATUS)
  print(_results(summary, flags.FLAGS.model_dir))


def _results(summary: dict[str, Any], model_dir: str) -> str:
  """The run's results table (the chief's); one line on other workers."""
  if not summary["chief"]:
    return (f"{_PROGRAM}: this worker finished at step {summary['step']}; "
            "the chief prints the results.")
  if summary["steps_this_run"]:
    title = (f"{_PROGRAM}: {summary['mode']} mode, step {summary['step']}, "
             f"{summary['replicas']} replica(s), "
             f"{summary['examples_per_second']:.0f} examples/s; eval results:")
  else:
    title = (f"{_PROGRAM}: the run in {model_dir} had finished at step "
             f"{summary['step']} already; nothing was trained (raise "
             "--train_steps to train further). Its eval results:")
  return mtl_dist.format_results(summary, title=title)


def run() -> None:
  """Console-script entry point."""
  startup.run(main, cli.flags_parser(_PROGRAM), __doc__)


if __name__ == "__main__":
  run()
