"""mtl-export: writes a trained run as a SavedModel with serving signatures.

Examples:
  mtl-export --model_dir=/tmp/mtl --export_dir=/tmp/mtl_export
  mtl-export --model_dir=/tmp/mtl --checkpoint=500 --export_dir=/tmp/e500

The SavedModel has a signature per task plus serving_default (every task);
loading it needs TensorFlow only: tf.saved_model.load(EXPORT_DIR).

Exit status: 0 on success, 2 for bad flags, a model_dir without a readable
checkpoint, or an export_dir that holds something else; 1 when reading or
writing fails (a file system or TensorFlow error), with one line.
"""

from absl import flags

from launch import cli
from launch import startup
import mtl_dist  # Its names import TensorFlow when main first uses them.

_PROGRAM = "mtl-export"

_MODEL_DIR = flags.DEFINE_string("model_dir", None,
                                 "The --model_dir of an mtl-train run.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Where the SavedModel goes; an earlier export there "
    "is replaced, any other non-empty directory is refused.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A step number or checkpoint prefix (default: the "
    "newest readable checkpoint).")
flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv: list[str]) -> None:
  cli.refuse_arguments(_PROGRAM, argv)
  startup.import_tensorflow_quietly()
  with cli.library_errors(_PROGRAM):
    path = mtl_dist.export_run(_MODEL_DIR.value, _EXPORT_DIR.value,
                               checkpoint=_CHECKPOINT.value)
  print(f"{_PROGRAM}: exported {path} to {_EXPORT_DIR.value}")


def run() -> None:
  """Console-script entry point."""
  startup.run(main, cli.flags_parser(_PROGRAM), __doc__)


if __name__ == "__main__":
  run()
