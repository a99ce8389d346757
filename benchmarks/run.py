"""Speed of mtl_dist, measured against what users would run instead.

Every comparison builds its contenders in this one process, warms them up,
then times them in rotation (A, B, A, B, ...) and reports medians of paired
ratios (see harness.py). Nothing here is a test: targets are reported as met
or missed, never asserted.

  python -m benchmarks.run                    # every comparison, full length
  python -m benchmarks.run --quick            # every comparison, short
  python -m benchmarks.run --comparisons=joint_fit,alternate
  python -m benchmarks.run --update_doc=docs/benchmarks.md   # refresh docs
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from launch import cli

_PROGRAM = "benchmarks.run"

NUM_LOGICAL_CPUS = 4  # Scaling runs 1, 2 and 4 replicas on logical CPUs.

_COMPARISONS = flags.DEFINE_list(
    "comparisons", None,
    "Comparisons to run, in order (default: all). Known: joint_fit, "
    "alternate, input_pipeline, flops, scaling, methods, options, "
    "launcher.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Short segments, no warm-up segment, one model size per "
    "comparison and 2 repetitions: every comparison in a few minutes, to "
    "check that the harness works, not to quote numbers.")
_REPEATS = flags.DEFINE_integer(
    "repeats", None, "Repetitions per comparison (default 5, 2 with --quick).",
    lower_bound=1)
_JSON_OUTPUT = flags.DEFINE_string(
    "json_output", None, "Also write every measurement to this JSON file.")
_UPDATE_DOC = flags.DEFINE_string(
    "update_doc", None, "Replace the generated part of this Markdown file "
    "(between the results markers) with the report.")


def _split_cpu() -> None:
  """Four logical CPU devices, before TensorFlow initialises its runtime."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS)


def _strategy(replicas: int) -> tf.distribute.Strategy:
  import mtl_dist  # pylint: disable=g-import-not-at-top
  if replicas == 1:
    return mtl_dist.create_strategy("one_device", 1)
  return mtl_dist.create_strategy("mirrored", replicas)


def _main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(_PROGRAM, f"unexpected arguments: {' '.join(argv[1:])}")
  _split_cpu()
  from benchmarks import comparisons  # pylint: disable=g-import-not-at-top
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  names = _COMPARISONS.value or list(comparisons.ALL)
  unknown = [name for name in names if name not in comparisons.ALL]
  if unknown:
    cli.fail(_PROGRAM, f"--comparisons: unknown {', '.join(unknown)} "
             f"(known: {', '.join(comparisons.ALL)})")
  if _UPDATE_DOC.value:  # Before the run, not after it.
    _read_doc(_UPDATE_DOC.value)
  settings = harness.Settings(
      quick=_QUICK.value, repeats=_REPEATS.value or (2 if _QUICK.value else 5))
  machine = harness.machine()
  command = "python -m benchmarks.run " + " ".join(sys.argv[1:])
  print(f"{command}\non {machine['cpu']}, {machine['cores']} cores, "
        f"TensorFlow {machine['tensorflow']}", flush=True)
  sections = []
  for name in names:
    print(f"\n== {name}", flush=True)
    started = time.perf_counter()
    section = comparisons.ALL[name](settings, _strategy)
    section.seconds = time.perf_counter() - started
    sections.append(section)
    print("\n" + section.markdown(), flush=True)
  report = _report(command, machine, settings, sections)
  if _JSON_OUTPUT.value:
    with open(_JSON_OUTPUT.value, "w") as f:
      json.dump({"command": command, "machine": machine,
                 "quick": settings.quick, "repeats": settings.repeats,
                 "sections": [s.as_dict() for s in sections]}, f, indent=1)
  if _UPDATE_DOC.value:
    _update_doc(_UPDATE_DOC.value, report)
    print(f"Updated {_UPDATE_DOC.value}")
  missed = [v.claim.label for s in sections for v in s.verdicts
            if v.outcome == "missed"]
  print(f"\n{sum(len(s.verdicts) for s in sections)} ratios measured; "
        f"targets missed: {', '.join(missed) or 'none'}")


def _report(command: str, machine: dict, settings, sections) -> str:
  """The Markdown report: the command, the machine, then every section."""
  lines = [
      f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}"
      f"{' (quick mode: indicative only)' if settings.quick else ''}, "
      f"{settings.repeats} repetitions per comparison.",
      "",
      f"Machine: {machine['cpu']}, {machine['cores']} cores; Python "
      f"{machine['python']}, TensorFlow {machine['tensorflow']}, NumPy "
      f"{machine['numpy']}; {machine['platform']}.",
      "",
  ]
  for section in sections:
    lines += [section.markdown(), ""]
  return "\n".join(lines)


def _update_doc(path: str, report: str) -> None:
  """Replaces the part of `path` between the results markers with `report`."""
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  text, pattern = _read_doc(path)
  text = pattern.sub(lambda _: f"{harness.RESULTS_BEGIN}\n{report}\n"
                     f"{harness.RESULTS_END}", text)
  with open(path, "w") as f:
    f.write(text)


def _read_doc(path: str) -> tuple[str, re.Pattern]:
  """The file's text and the pattern of its results part.

  Exits 2 if the file cannot be read or has no results markers.
  """
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  begin, end = harness.RESULTS_BEGIN, harness.RESULTS_END
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    cli.fail(_PROGRAM, f"--update_doc={path}: {e.strerror}")
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
  if not pattern.search(text):
    cli.fail(_PROGRAM, f"--update_doc={path}: the file has no results "
             f"markers ({begin} ... {end})")
  return text, pattern


def run() -> None:
  app.run(_main, flags_parser=cli.flags_parser(_PROGRAM))


if __name__ == "__main__":
  run()
