"""mtl-eval: evaluates a run's checkpoints, once or as a sidecar.

Examples:
  mtl-eval --model_dir=/tmp/mtl                    # the newest checkpoint
  mtl-eval --model_dir=/tmp/mtl --checkpoint=500   # step 500's
  mtl-eval --model_dir=/tmp/mtl --watch            # beside a training job

--watch evaluates each new checkpoint while training runs, on this job's own
devices (never the training cluster's), and stops once the checkpoint of the
run's last step is evaluated. Results are appended to
<model_dir>/evaluations.jsonl and the TensorBoard run
<model_dir>/tensorboard/sidecar, and printed as a table.

Exit status: 0 on success, 2 for bad flags or a model_dir that cannot be
evaluated, 1 when --watch saw no new checkpoint for --timeout seconds or
reading fails (a file system or TensorFlow error, bad eval data).
"""

from __future__ import annotations

from absl import flags
from absl import logging

from launch import cli
from launch import startup
import mtl_dist  # Its names import TensorFlow when main first uses them.

_PROGRAM = "mtl-eval"

_MODEL_DIR = flags.DEFINE_string("model_dir", None,
                                 "The --model_dir of an mtl-train run.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A step number or checkpoint prefix (default: the "
    "newest readable checkpoint); not with --watch.")
_WATCH = flags.DEFINE_bool(
    "watch", False, "Evaluate each new checkpoint while training runs, until "
    "the one of the run's last step (its --train_steps) is evaluated.")
_EVAL_STEPS = flags.DEFINE_integer(
    "eval_steps", None, "Eval batches per task (default: the run's "
    "--eval_steps; 0 evaluates the whole split).", lower_bound=0)
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", 1, "Logical CPU devices to evaluate on when there is "
    "no GPU.", lower_bound=1)
_POLL_SECONDS = flags.DEFINE_float(
    "poll_seconds", 10.0, "--watch: seconds between looks for a new "
    "checkpoint.", lower_bound=0.0)
_TIMEOUT = flags.DEFINE_float(
    "timeout", 3600.0, "--watch: seconds without a new checkpoint before "
    "exiting 1 (0: wait forever).", lower_bound=0.0)
flags.mark_flag_as_required("model_dir")


def _print(result: mtl_dist.Evaluation) -> None:
  print(mtl_dist.format_results(
      {"eval": result.by_task()},
      title=f"{_PROGRAM}: {result.checkpoint} (step {result.step}):"),
        flush=True)


def main(argv: list[str]) -> None:
  cli.refuse_arguments(_PROGRAM, argv)
  startup.import_tensorflow_quietly()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if logging.get_verbosity() < logging.DEBUG:
    tf.get_logger().setLevel("WARNING")
  try:
    with cli.library_errors(_PROGRAM):
      mtl_dist.evaluate(
          _MODEL_DIR.value, checkpoint=_CHECKPOINT.value, watch=_WATCH.value,
          eval_steps=_EVAL_STEPS.value, num_cpu_devices=_NUM_CPU_DEVICES.value,
          poll_seconds=_POLL_SECONDS.value, timeout=_TIMEOUT.value or None,
          on_result=_print)
  except mtl_dist.EvalTimeout as e:
    cli.fail(_PROGRAM, str(e), status=1)


def run() -> None:
  """Console-script entry point."""
  startup.run(main, cli.flags_parser(_PROGRAM), __doc__)


if __name__ == "__main__":
  run()
