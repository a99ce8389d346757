"""Every launcher flag, given bad values, exits 2 with one line naming it.

Each launcher runs its cases in one subprocess of its own (the launchers
define flags of the same names, and importing TensorFlow once per case
would take an hour): this file is also that subprocess's program. A case
resets absl's flags, parses the case's command line with the launcher's
parser and calls its `main`, catching the exit. Bad values are negative,
zero, huge, non-numeric, empty, NaN and infinite numbers, unknown names and
unusable paths. The few of them that are valid for a flag are listed in
`VALID`, with the reason; they are checked to pass the flag checks instead
of being run.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback

from conftest import time_limit
import pytest

_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_runs")

_INTEGER = ["-1", "0", "1000000000000", "abc", "", "nan", "1.5"]
_FLOAT = ["-1", "0", "1e300", "abc", "", "nan", "inf", "-inf"]
_ENUM = ["nonexistent", ""]
_BOOL = ["maybe"]

# Values of string and list flags, by flag; numbers, enums and booleans get
# the lists above by their type.
_TEXT_VALUES = {
    "model_dir": ["", "/dev/null", "/proc/mtl_dist_fuzz"],
    "dataset": ["nonexistent", "", "tfds:"],
    "tasks": ["", "nonexistent", "shape,shape"],
    "task_weights": ["", "abc", "shape=abc", "shape=inf", "shape=nan",
                     "shape=-1", "shape=1e300", "nonexistent=1",
                     "shape=0,scale=0,orientation=0,x=0,y=0"],
    "task_sizes": ["", "abc", "shape=abc", "shape=0", "shape=-1",
                   "shape=1000000000000", "nonexistent=64"],
    "label_fraction": ["", "abc", "shape=0", "shape=2", "shape=nan",
                       "shape=inf", "nonexistent=0.5"],
    "baselines": ["abc", "shape=/nonexistent", "nonexistent=/tmp"],
    "task_datasets": ["", "abc", "digits=tfds:", "digits=nonexistent",
                      "digits=tfds:no_such_dataset_xyz:label"],
    "image_size": ["", "abc", "-1,-1", "0,0", "1000000000000,1", "1,2,3"],
    "profile_steps": ["", "abc", "0,0", "-1,5", "3,1",
                      "1000000000000,1000000000000"],
    "export_dir": ["/dev/null", "/proc/mtl_dist_fuzz"],
    "checkpoint": ["abc", "-1", "999999"],
    "input": ["", "/nonexistent.npy"],
    "output": ["", "predictions.txt"],
    "signature": ["", "nonexistent"],
}

# (flag, value) pairs that are valid, and why; each is checked to pass the
# flag checks (mtl-train: TrainConfig.validate) instead of being run.
VALID = {
    ("seed", "0"): "the default seed",
    ("eval_steps", "0"): "evaluates the whole eval split",
    ("mixing_cap", "0"): "no cap (the default)",
    ("num_task_experts", "0"): "cgc and ple without private experts",
    ("dselect_k_entropy_reg", "0"): "no entropy regularizer",
    ("poll_seconds", "0"): "look again at once",
    ("timeout", "0"): "wait forever",
    ("grace_seconds", "0"): "SIGKILL right after SIGTERM",
}



def _in_option_range(flag: str, value: str) -> bool:
  """Whether a method option's value is in the range the option declares.

  Those ranges are the methods' own (docs/methods.md lists them; each
  method's tests cover its edge values): 0 is valid for most options.
  """
  import mtl_dist  # pylint: disable=g-import-not-at-top
  from mtl_dist.methods import registry  # pylint: disable=g-import-not-at-top
  for methods in (registry.WEIGHTINGS, registry.AGGREGATORS):
    for option_flag, _, option in methods.options():
      if option_flag != flag:
        continue
      try:
        number = type(option.default)(value)
        option.check(flag, number)
      except (ValueError, mtl_dist.ConfigError):
        return False
      return True
  return False


# Flags whose values only the dataset they name can check, which the TFDS
# tests cover with a prepared dataset: this suite has none to open, so the
# message names --dataset (TFDS has no such dataset here).
_NEEDS_TFDS_DATASET = {"data_dir", "input_key", "split", "eval_split"}


def _context(flag: str, method_flags: dict[str, tuple[str, str]],
             architecture_flags: dict[str, str]) -> list[str]:
  """mtl-train flags that make `flag` apply, so its value is what is checked."""
  if flag in method_flags:
    kind, method = method_flags[flag]
    return [f"--{kind}={method}"]
  if flag in architecture_flags:
    return [f"--architecture={architecture_flags[flag]}"]
  if flag in ("temperature", "mixing_cap"):
    return ["--mode=alternate", "--schedule=temperature"]
  if flag in ("steps_per_epoch", "anneal_epochs"):
    return ["--mode=alternate", "--schedule=annealed"]
  if flag in ("schedule", "per_task_optimizer", "task_sizes", "task_datasets"):
    return ["--mode=alternate"]
  if flag in ("image_size", "channels", "download", "data_dir", "input_key",
              "split", "eval_split"):
    return ["--dataset=tfds:mnist"]
  return []


def _values(flag) -> list[str]:
  """The bad values tried for an absl flag."""
  if flag.name in _TEXT_VALUES:
    return _TEXT_VALUES[flag.name]
  kind = flag.flag_type()
  if kind == "int":
    return _INTEGER
  if kind == "float":
    return _FLOAT
  if kind == "bool":
    return _BOOL
  if flag.name.endswith(("_dir", "_path")):
    return ["", "/proc/mtl_dist_fuzz"]
  return _ENUM if hasattr(flag, "enum_values") or kind.startswith(
      "enum") else [""]


# The subprocess: one launcher's cases.


def _cases(program: str, module, work: str) -> list[dict]:
  """Every (flag, bad value) case of a launcher, with its command line."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  from mtl_dist.methods import registry  # pylint: disable=g-import-not-at-top
  from mtl_dist.model import settings  # pylint: disable=g-import-not-at-top
  method_flags = {flag: (methods.kind, method)
                  for methods in (registry.WEIGHTINGS, registry.AGGREGATORS)
                  for flag, method, _ in methods.options()}
  architecture_flags = {name: used[0]
                        for name, used in settings.OPTIONS.items()}
  own = flags.FLAGS.flags_by_module_dict()[module.__name__]
  cases = []
  for flag in sorted(own, key=lambda f: f.name):
    if program == "mtl-train" and flag.name in _NEEDS_TFDS_DATASET:
      continue
    for value in _values(flag):
      run = f"{work}/run{len(cases)}"
      if program == "mtl-train":
        base = [f"--model_dir={run}", "--train_steps=2", "--log_every=1",
                "--eval_every=2", "--checkpoint_every=2", "--trunk_width=8",
                "--global_batch_size=12"]
        context = _context(flag.name, method_flags, architecture_flags)
        if flag.name != "task_datasets" and not any(
            c.startswith("--dataset") for c in context):
          base.append("--eval_examples=64")  # shapes: small data.
          if "--mode=alternate" not in context:
            base.append("--train_examples=256")
        args = base + context
      elif program == "mtl-local-cluster":
        args = []
      else:
        args = list(_BASES[program](work))
      args.append(f"--{flag.name}={value}")
      if program == "mtl-local-cluster":
        args += ["--", "--model_dir="]
      cases.append({"flag": flag.name, "value": value, "args": args,
                    "run": run})
  return cases


# The other launchers' valid flags, around the one under test.
_BASES = {
    "mtl-eval": lambda work: [f"--model_dir={work}/joint"],
    "mtl-export": lambda work: [f"--model_dir={work}/joint",
                                f"--export_dir={work}/export_out"],
    "mtl-predict": lambda work: [f"--export_dir={work}/export",
                                 f"--input={work}/inputs.npy",
                                 f"--output={work}/out.npz"],
    "mtl-report": lambda work: [f"--model_dir={work}/joint"],
}


def _check_valid(program: str) -> str:
  """'' if a documented-valid value passes the flag checks, else why not."""
  if program != "mtl-train":
    return ""  # absl's bounds are what checks these; they parsed.
  from launch import train  # pylint: disable=g-import-not-at-top
  import mtl_dist  # pylint: disable=g-import-not-at-top
  try:
    train._config_from_flags().validate()  # pylint: disable=protected-access
  except mtl_dist.ConfigError as e:
    return str(e)
  return ""


def _run_one(program: str, module, case: dict) -> dict:
  from absl import flags  # pylint: disable=g-import-not-at-top

  from launch import cli  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  captured = io.StringIO()
  status, valid_problem = 0, None
  with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(
      io.StringIO()):
    try:
      argv = cli.flags_parser(program)([program, *case["args"]])
      if (case["flag"], case["value"]) in VALID or (
          program == "mtl-train" and
          _in_option_range(case["flag"], case["value"])):
        valid_problem = _check_valid(program)
        status = "valid"
      else:
        module.main(argv)
    except SystemExit as e:
      status = e.code
    except BaseException:  # pylint: disable=broad-except
      status = "traceback"
      captured.write(traceback.format_exc())
  return dict(case, status=status, stderr=captured.getvalue(),
              valid_problem=valid_problem,
              wrote=os.path.exists(case["run"]))


def _main(program: str, module_name: str, work: str) -> None:
  module = importlib.import_module(module_name)
  results = [_run_one(program, module, case)
             for case in _cases(program, module, work)]
  sys.__stdout__.write("RESULTS " + json.dumps(results) + "\n")


# The tests.

_LAUNCHERS = {
    "mtl-train": "launch.train",
    "mtl-eval": "launch.evaluate",
    "mtl-export": "launch.export",
    "mtl-predict": "launch.predict",
    "mtl-report": "launch.report",
    "mtl-local-cluster": "launch.local_cluster",
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """A run, an export of it and inputs, for the launchers that read them."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  import mtl_dist  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("fuzz"))
  shutil.copytree(os.path.join(_FIXTURES, "joint"), f"{root}/joint")
  mtl_dist.export_run(f"{root}/joint", f"{root}/export")
  np.save(f"{root}/inputs.npy", np.zeros((4, 32, 32, 1), np.float32))
  return root


@pytest.mark.slow
@pytest.mark.parametrize("program", sorted(_LAUNCHERS))
def test_every_flag_refuses_bad_values_in_one_line(program, work):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, __file__, program, _LAUNCHERS[program], work],
      capture_output=True, text=True, env=env, timeout=time_limit(56),
      check=False)
  lines = [line for line in result.stdout.splitlines()
           if line.startswith("RESULTS ")]
  assert lines, result.stderr[-3000:]
  cases = json.loads(lines[-1][len("RESULTS "):])
  assert cases  # Every launcher has flags with bad values.
  failures = []
  for case in cases:
    where = f"--{case['flag']}={case['value']!r}"
    if case["status"] == "valid":
      if case["valid_problem"]:
        failures.append(f"{where}: documented valid, but refused: "
                        f"{case['valid_problem']}")
      continue
    errors = [line for line in case["stderr"].splitlines()
              if line.startswith(f"{program}: error: ")]
    if case["status"] != 2:
      failures.append(f"{where}: exit status {case['status']}: "
                      f"{case['stderr'][-500:]}")
    elif "Traceback" in case["stderr"]:
      failures.append(f"{where}: a traceback: {case['stderr'][-500:]}")
    elif len(errors) != 1 or case["flag"] not in errors[0]:
      failures.append(f"{where}: no one error line naming the flag: "
                      f"{case['stderr'][-300:]!r}")
    elif case["wrote"]:
      failures.append(f"{where}: wrote {case['run']}")
  assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(
      failures)


if __name__ == "__main__":
  _main(*sys.argv[1:4])
