"""A/B timing: contenders measured in rotation, medians of paired ratios.

A comparison builds its contenders, starts each (building, tracing and a first
steady-state segment, timed as start-up), then runs them in rotation A, B, A,
B, ... for several repetitions of the same number of steps. Throughput is the
examples (or FLOPs) per second of one segment; a ratio of two contenders is
the median over repetitions of their throughputs' ratio in the same
repetition, so that slow drifts of the machine cancel.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import (Any, Callable, Mapping, Optional, Protocol, Sequence,
                    TypeVar)

import numpy as np
import tensorflow as tf

T = TypeVar("T")

# What `python -m benchmarks.run --update_doc=FILE` replaces in FILE.
RESULTS_BEGIN = "<!-- benchmark results: begin (written by benchmarks.run) -->"
RESULTS_END = "<!-- benchmark results: end -->"


class Contender(Protocol):
  """One way of training, measured in steady-state segments."""

  name: str
  work_per_step: float  # Examples (or FLOPs, for a FLOP/s comparison).

  def start(self) -> None:
    """Builds, traces and warms up; everything before steady state."""

  def run(self, steps: int) -> float:
    """Runs `steps` steady-state steps; returns the seconds they took."""


@dataclasses.dataclass
class Measured:
  """What a comparison measured for one contender.

  Attributes:
    name: The contender's name.
    startup_seconds: Building and tracing (`start()`); the warm-up segment
      that follows is not counted anywhere.
    throughput: Work (examples or FLOPs) per second, one value per
      repetition.
  """

  name: str
  startup_seconds: float
  throughput: list[float]

  @property
  def median_throughput(self) -> float:
    """The median over repetitions."""
    return statistics.median(self.throughput)


def measure(contenders: Sequence[Contender], steps: int, repeats: int,
            log: Callable[[str], None] = print,
            warm_up: bool = True) -> list[Measured]:
  """Starts every contender, then times them in rotation.

  Args:
    contenders: What to compare; all are built before any is timed.
    steps: Steps per timed segment (the same for all).
    repeats: Rotations A, B, ...; each gives one value per contender.
    log: Where progress goes.
    warm_up: Run one untimed segment per contender after its start
      (contenders can opt out with `warm_up = False`); --quick skips it.

  Returns:
    One `Measured` per contender, in order.
  """
  startup = []
  for contender in contenders:
    started = time.perf_counter()
    contender.start()
    startup.append(time.perf_counter() - started)
    if warm_up and getattr(contender, "warm_up", True):
      contender.run(steps)  # Warm-up segment: caches, allocator, prefetch.
    log(f"  {contender.name}: started in {startup[-1]:.1f} s")
  seconds = [[] for _ in contenders]
  for repeat in range(repeats):
    for i, contender in enumerate(contenders):
      seconds[i].append(contender.run(steps))
    log(f"  repetition {repeat + 1}/{repeats}: " + ", ".join(
        f"{c.name} {c.work_per_step * steps / s[-1]:,.0f}/s"
        for c, s in zip(contenders, seconds)))
  return [Measured(c.name, start, [c.work_per_step * steps / t for t in times])
          for c, start, times in zip(contenders, startup, seconds)]


def machine() -> dict[str, str]:
  """What produced the numbers: CPU, cores, Python, TensorFlow."""
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
      "cpu": cpu,
      "cores": str(len(os.sched_getaffinity(0))
                   if hasattr(os, "sched_getaffinity") else os.cpu_count()),
      "python": sys.version.split()[0],
      "tensorflow": tf.__version__,
      "numpy": np.__version__,
      "platform": platform.platform(),
  }


@dataclasses.dataclass(frozen=True)
class Claim:
  """A ratio of two contenders' throughput, and its target if one is set.

  Attributes:
    label: What is compared, e.g. "joint / fit (steps_per_execution=1)".
    numerator: The contender whose throughput is divided.
    denominator: The contender it is divided by.
    target: The minimum ratio the issue sets, or None.
    invert: Report denominator / numerator (a cost: step time relative to
      the denominator's), e.g. for the cost of a method relative to `sum`.
  """

  label: str
  numerator: str
  denominator: str
  target: Optional[float] = None
  invert: bool = False

  def __post_init__(self):
    if self.invert and self.target is not None:
      raise ValueError(f"{self.label}: a cost (invert) has no minimum target")


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A claim as measured: the median of paired ratios and their range."""

  claim: Claim
  ratio: float
  low: float
  high: float

  @property
  def outcome(self) -> str:
    if self.claim.target is None:
      return ""
    return "met" if self.ratio >= self.claim.target else "missed"

  def as_dict(self) -> dict[str, Any]:
    return {"label": self.claim.label, "ratio": self.ratio, "min": self.low,
            "max": self.high, "target": self.claim.target,
            "outcome": self.outcome}


def judge(results: Sequence[Measured], claim: Claim) -> Verdict:
  """The claim's ratio, paired repetition by repetition."""
  by_name = {r.name: r for r in results}
  top = by_name[claim.numerator].throughput
  bottom = by_name[claim.denominator].throughput
  ratios = [(b / a) if claim.invert else (a / b) for a, b in zip(top, bottom)]
  return Verdict(claim, statistics.median(ratios), min(ratios), max(ratios))


def contenders_table(results: Sequence[Measured],
                     unit: str = "examples/s") -> str:
  """A Markdown table of each contender's median throughput and start-up."""
  lines = [f"| contender | {unit} (median) | min-max | start-up s |",
           "|---|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r.name} | {_number(r.median_throughput)} | "
                 f"{_number(min(r.throughput))}-{_number(max(r.throughput))} "
                 f"| {r.startup_seconds:.1f} |")
  return "\n".join(lines)


def ratio_matrix(corner: str, rows: Sequence[str], columns: Sequence[str],
                 cells: Mapping[tuple[str, str], Verdict]) -> str:
  """A Markdown table of ratios, one row and one column per key.

  Args:
    corner: The header of the row names' column.
    rows: The row names, in order.
    columns: The column headers, in order.
    cells: The verdict at (row, column); a missing one shows as "-".

  Returns:
    The table; a cell reads "1.30x (1.27-1.41)": the median and its range.
  """
  lines = [f"| {corner} | " + " | ".join(columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for row in rows:
    values = []
    for column in columns:
      v = cells.get((row, column))
      values.append("-" if v is None else
                    f"{v.ratio:.2f}x ({v.low:.2f}-{v.high:.2f})")
    lines.append(f"| {row} | " + " | ".join(values) + " |")
  return "\n".join(lines)


def verdicts_table(verdicts: Sequence[Verdict]) -> str:
  """A Markdown table of measured ratios against their targets."""
  lines = ["| ratio | measured (min-max) | target | verdict |",
           "|---|---:|---:|---|"]
  for v in verdicts:
    target = f">= {v.claim.target:g}x" if v.claim.target is not None else ""
    lines.append(f"| {v.claim.label} | {v.ratio:.2f}x ({v.low:.2f}-"
                 f"{v.high:.2f}) | {target} | {v.outcome} |")
  return "\n".join(lines)


@dataclasses.dataclass
class Settings:
  """How long each comparison runs."""

  quick: bool
  repeats: int

  def steps(self, full: int, quick: int) -> int:
    """Steps per segment: `quick` in quick mode, else `full`."""
    return quick if self.quick else full

  def sizes(self, groups: Sequence[T], quick: int) -> Sequence[T]:
    """All of `groups` (one per model size, or contenders), or in quick
    mode the one at `quick`."""
    return groups if not self.quick else [groups[quick]]

  @property
  def warm_up(self) -> bool:
    """Whether segments are preceded by an untimed one (not in quick mode)."""
    return not self.quick


@dataclasses.dataclass
class Section:
  """One comparison's report.

  Attributes:
    name: The comparison's name (`--comparisons`).
    title: The Markdown heading.
    setup: What was measured, and how.
    tables: (caption, results, unit) of each group of contenders measured
      together.
    verdicts: The ratios.
    notes: Markdown shown last.
    seconds: How long the comparison took.
    summary: Markdown shown instead of the contenders' and ratios' tables
      (for a comparison of many contenders: e.g. a `ratio_matrix`); they
      stay in `as_dict`.
  """

  name: str
  title: str
  setup: str
  tables: list[tuple[str, list[Measured], str]]
  verdicts: list[Verdict]
  notes: str = ""
  seconds: float = 0.0
  summary: str = ""

  def markdown(self) -> str:
    parts = [f"### {self.title}", "", self.setup, ""]
    if self.summary:
      parts += [self.summary, ""]
    else:
      for caption, results, unit in self.tables:
        if caption:
          parts += [caption, ""]
        parts += [contenders_table(results, unit), ""]
      if self.verdicts:
        parts += [verdicts_table(self.verdicts), ""]
    if self.notes:
      parts += [self.notes, ""]
    return "\n".join(parts)

  def as_dict(self) -> dict:
    return {
        "name": self.name, "title": self.title, "setup": self.setup,
        "seconds": self.seconds,
        "contenders": [{"caption": caption, "unit": unit,
                        **dataclasses.asdict(r)}
                       for caption, results, unit in self.tables
                       for r in results],
        "verdicts": [v.as_dict() for v in self.verdicts],
    }


def _number(value: float) -> str:
  """1,234 or 12.3G: readable throughput of examples or FLOPs."""
  if value >= 1e9:
    return f"{value / 1e9:.1f}G"
  return f"{value:,.0f}"
