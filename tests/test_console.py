"""What a user of the launchers sees: help, errors alone, no C++ chatter."""

import os
import subprocess
import sys

from conftest import time_limit
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BIN = os.path.dirname(sys.executable)
# TensorFlow's C++ start-up lines on a host without a GPU.
_CHATTER = ("oneDNN custom operations", "cuda drivers", "cuInit",
            "absl::InitializeLog")


def _launcher(name: str, *flags: str, startups: float = 3
              ) -> subprocess.CompletedProcess:
  """Runs an installed console script as a user would, from the checkout."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run([os.path.join(_BIN, name), *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True,
                        timeout=time_limit(startups),
                        check=False)


def test_help_lists_the_launchers_own_flags():
  result = _launcher("mtl-train", "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("mtl-train: trains a multi-task model")
  for flag in ("--model_dir", "--mode", "--trunk_width", "--aggregator",
               "--upgrad_", "--global_batch_size"):
    assert flag in result.stdout, flag
  # absl's and TensorFlow's own flags stay in --helpfull.
  assert "absl.logging" not in result.stdout and "--logtostderr" not in (
      result.stdout)
  eval_help = _launcher("mtl-eval", "--help")
  assert eval_help.returncode == 0 and "--watch" in eval_help.stdout


@pytest.mark.parametrize("flags, line", [
    (["--model_dir=/tmp/unused", "--trunk_width=-1"],
     "mtl-train: error: --trunk_width=-1: must be a positive integer"),
    (["--model_dir=/tmp/unused", "--train_step=5"],
     "mtl-train: error: Unknown command line flag 'train_step'. Did you mean:"
     " train_steps ?"),
])
def test_a_bad_flag_is_the_only_line_on_stderr(flags, line):
  result = _launcher("mtl-train", *flags, startups=1)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [line], result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("flagfile", ["joint", "alternate"])
def test_the_shipped_flagfiles_take_other_tasks_and_weights(tmp_path,
                                                            flagfile):
  model_dir = tmp_path / flagfile
  result = _launcher(
      "mtl-train", f"--flagfile=launch/configs/{flagfile}.flags",
      f"--model_dir={model_dir}", "--tasks=shape,x",
      "--task_weights=shape=2,x=1", "--train_steps=4", "--steps_per_loop=2",
      "--log_every=2", "--eval_every=4", "--checkpoint_every=4",
      "--trunk_width=8", "--trunk_depth=1", "--global_batch_size=16",
      "--eval_examples=64", "--num_cpu_devices=1",
      *(["--task_sizes=shape=256,x=256", "--schedule=weights"]
        if flagfile == "alternate" else
        ["--train_examples=256"]))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{flagfile} mode, step 4" in result.stdout
  table = result.stdout.splitlines()[2:]
  assert [row.split()[0] for row in table] == ["shape", "x"]
  assert not [line for line in result.stderr.splitlines()
              if any(text in line for text in _CHATTER)], result.stderr


# Runs a launcher's `run()` as its console script does, and prints at exit
# whether TensorFlow was ever imported.
_WITHOUT_TENSORFLOW = """
import atexit, sys
atexit.register(lambda: print("tensorflow imported:",
                              "tensorflow" in sys.modules, flush=True))
sys.argv = sys.argv[1:]
from launch import {module}
{module}.run()
"""


@pytest.mark.parametrize("module, program, flags, error", [
    ("train", "mtl-train", ["--model_dir=/tmp/unused", "--train_step=5"],
     "Unknown command line flag 'train_step'"),
    ("train", "mtl-train", ["--model_dir=/tmp/unused", "--trunk_width=-1"],
     "--trunk_width=-1: must be a positive integer"),
    ("train", "mtl-train", ["--model_dir=/tmp/unused", "--cagrad_c=nan"],
     "--cagrad_c=nan: must be a finite number"),
    ("train", "mtl-train", ["--model_dir=/tmp/unused", "--aggregator=modo",
                            "--global_batch_size=64"],
     "must be divisible by 3"),
    ("train", "mtl-train", ["--model_dir=/tmp/unused", "--mode=alternate",
                            "--dwa_window=3"],
     "--dwa_window applies to --mode=joint"),
    ("train", "mtl-train", ["--model_dir=/tmp/unused", "extra"],
     "unexpected arguments: extra"),
    ("evaluate", "mtl-eval", ["--model_dir=/tmp/unused", "--eval_steps=-1"],
     "--eval_steps"),
    ("export", "mtl-export", ["--model_dir=/tmp/unused"],
     "--export_dir must have a value"),
    ("predict", "mtl-predict", ["--export_dir=/tmp/unused", "--input=x.npy",
                                "--output=y.npz", "--batch_size=3e9"],
     "--batch_size"),
    ("report", "mtl-report", ["--modle_dir=/tmp/unused"],
     "Unknown command line flag 'modle_dir'"),
    ("local_cluster", "mtl-local-cluster", ["--num_workers=0"],
     "--num_workers"),
    ("train", "mtl-train", ["--help"], None),
    ("evaluate", "mtl-eval", ["--help"], None),
])
def test_flags_are_checked_before_tensorflow_is_imported(module, program,
                                                         flags, error):
  """A typo or a bad value costs no TensorFlow start-up (issue 21), nor
  does --help; every check that needs no device or file runs first."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  result = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TENSORFLOW.format(module=module),
       program, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=time_limit(1), check=False)
  assert "tensorflow imported: False" in result.stdout, result.stderr[-2000:]
  if error is None:
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--" in result.stdout  # The help's flags.
  else:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"{program}: error: "), result.stderr
    assert error in result.stderr


def test_importing_the_configuration_imports_no_tensorflow():
  """What the launchers define and check their flags with; `mtl_dist`'s
  public names import their modules on first use."""
  code = ("import sys\n"
          "import mtl_dist\n"
          "from mtl_dist import TrainConfig, ConfigError, parse_key_values\n"
          "from mtl_dist.methods import catalog\n"
          "from mtl_dist.run import config\n"
          "from launch import cli\n"
          "assert config.TrainConfig is TrainConfig\n"
          "assert 'sum' in catalog.AGGREGATORS.names()\n"
          "assert set(mtl_dist.__all__) <= set(dir(mtl_dist))\n"
          "print(sorted(m for m in sys.modules\n"
          "             if m.split('.')[0] in ('tensorflow', 'tf_keras',\n"
          "                                    'keras')))\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True,
                          timeout=time_limit(1), check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"
