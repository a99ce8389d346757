"""mtl-predict: per-task predictions of an exported model for a .npy file.

Examples:
  mtl-predict --export_dir=/tmp/mtl_export --input=images.npy \
      --output=predictions.npz
  mtl-predict --export_dir=/tmp/mtl_export --input=images.npy \
      --output=predictions.jsonl --signature=shape

The input holds a batch of examples, [N, ...] as the model takes them. The
output holds each output of the signature (serving_default: every task's,
named <task>_<output>): arrays in .npz, or one JSON object per example in
.jsonl.

Exit status: 0 on success, 2 for bad flags, a missing export or signature,
or inputs of the wrong shape or dtype; 1 when reading or writing fails.
"""

from absl import flags

from launch import cli
from launch import startup
import mtl_dist  # Its names import TensorFlow when main first uses them.

_PROGRAM = "mtl-predict"

_EXPORT_DIR = flags.DEFINE_string("export_dir", None,
                                  "A SavedModel written by mtl-export.")
_INPUT = flags.DEFINE_string("input", None, "A .npy file of [N, ...] inputs.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Where predictions go: .npz (arrays) or .jsonl (one "
    "JSON object per example).")
_SIGNATURE = flags.DEFINE_string(
    "signature", "serving_default", "serving_default (every task) or a "
    "task's name (that task only).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per call.")
flags.mark_flags_as_required(["export_dir", "input", "output"])


def main(argv: list[str]) -> None:
  cli.refuse_arguments(_PROGRAM, argv)
  startup.import_tensorflow_quietly()
  # pylint: disable-next=g-import-not-at-top
  from mtl_dist.run import export as export_lib
  with cli.library_errors(_PROGRAM):
    inputs = export_lib.load_inputs(_INPUT.value)
    predictions = mtl_dist.predict(_EXPORT_DIR.value, inputs,
                                   signature=_SIGNATURE.value,
                                   batch_size=_BATCH_SIZE.value)
    mtl_dist.write_predictions(_OUTPUT.value, predictions)
  print(f"{_PROGRAM}: wrote {len(inputs)} prediction(s) of "
        f"{', '.join(sorted(predictions))} to {_OUTPUT.value}")


def run() -> None:
  """Console-script entry point."""
  startup.run(main, cli.flags_parser(_PROGRAM), __doc__)


if __name__ == "__main__":
  run()
