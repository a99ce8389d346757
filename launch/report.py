"""mtl-report: draws a run's training and eval curves into report.png.

Example:
  mtl-report --model_dir=/tmp/mtl          # writes /tmp/mtl/report.png

Needs matplotlib: pip install "mtl_dist[report]". Exit status: 0 on
success, 2 for bad flags, a model_dir without metrics, or no matplotlib;
1 when writing the PNG fails.
"""

from absl import flags

from launch import cli
from launch import startup
import mtl_dist  # Its names import TensorFlow when main first uses them.

_PROGRAM = "mtl-report"

_MODEL_DIR = flags.DEFINE_string("model_dir", None,
                                 "The --model_dir of an mtl-train run.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "The PNG to write (default: "
                              "<model_dir>/report.png).")
flags.mark_flag_as_required("model_dir")


def main(argv: list[str]) -> None:
  cli.refuse_arguments(_PROGRAM, argv)
  startup.import_tensorflow_quietly()
  with cli.library_errors(_PROGRAM):
    path = mtl_dist.write_report(_MODEL_DIR.value, _OUTPUT.value)
  print(f"{_PROGRAM}: wrote {path}")


def run() -> None:
  """Console-script entry point."""
  startup.run(main, cli.flags_parser(_PROGRAM), __doc__)


if __name__ == "__main__":
  run()
