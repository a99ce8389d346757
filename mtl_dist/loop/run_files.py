"""What a run writes: metrics.jsonl, TensorBoard events, progress, JSON files."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Optional

from absl import logging
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from mtl_dist import typecheck

# TensorBoard shows a summary as a scalar curve when its metadata names the
# "scalars" plugin. Writing it with core tf.summary.write (what TensorBoard's
# own tf.summary.scalar does) keeps the tensorboard package optional: it is
# needed to look at the curves, not to train.
METRICS_FILE = "metrics.jsonl"

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def write_json_atomic(path: str, value: Any) -> None:
  """Writes JSON to `path` through a temporary file and a rename.

  A reader never sees a half-written file, and a crash mid-write leaves the
  previous version in place.
  """
  _write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _write_text_atomic(path: str, text: str) -> None:
  """Replaces `path` by `text` through a temporary file and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    _copy_mode(path, temporary)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def append_json_line(path: str, record: Mapping[str, Any]) -> None:
  """Appends `record` to a JSON lines file as one line."""
  with open(path, "a") as f:
    f.write(json.dumps(record, allow_nan=True) + "\n")


def read_json_lines(path: str) -> list[dict[str, Any]]:
  """The records of a JSON lines file; [] if it does not exist.

  A line that is no JSON object (the last one cut short by a crash or a reader
  racing a writer, or bytes that are not UTF-8) is left out.
  """
  if not tf.io.gfile.exists(path):
    return []
  records = []
  with tf.io.gfile.GFile(path, "rb") as f:
    for line in f:
      try:
        record = json.loads(line.decode("utf-8"))
      except ValueError:  # Also bytes that are not UTF-8.
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def read_records(path: str) -> list[dict[str, Any]]:
  """The metrics records of metrics.jsonl; [] if it does not exist.

  Lines that are no record (see `read_json_lines`, or JSON without an int
  `step`, a `split` and a `metrics` object) are left out.
  """
  return [record for record in read_json_lines(path)
          if _is_record(record)]


def write_scalars(writer: tf.summary.SummaryWriter, step: int,
                  metrics: Mapping[str, float]) -> None:
  """Writes each metric as a TensorBoard scalar at `step`, then flushes."""
  with writer.as_default():
    for name, value in metrics.items():
      tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                       metadata=_SCALAR_METADATA)
  writer.flush()


def tensorboard_dir(model_dir: str, split: str) -> str:
  """The TensorBoard run directory of `split` ("train", "eval", "sidecar").

  The train run also holds the profile of --profile_steps, under
  `plugins/profile/`, where TensorBoard's Profile tab finds it.
  """
  return os.path.join(model_dir, "tensorboard", split)


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard, and logs progress.

  Writes `model_dir/metrics.jsonl` (one `{"step", "split", "metrics"}` object
  per line) and event files under `model_dir/tensorboard/{train,eval}`.
  A run resumed at `start_step` first drops the records of later steps,
  which the interrupted run wrote after its last checkpoint and the resumed
  run trains again, so that every step is recorded once. An inactive writer
  (a non-chief worker's) writes and logs nothing.
  """

  def __init__(self, model_dir: str, total_steps: int, start_step: int,
               active: bool = True):
    self._active = active
    self._jsonl_path = os.path.join(model_dir, METRICS_FILE)
    self._kept: list[dict[str, Any]] = []
    if active and os.path.exists(self._jsonl_path):
      self._kept = _drop_records_after(self._jsonl_path, start_step)
    self._writers = {
        split: tf.summary.create_file_writer(
            tensorboard_dir(model_dir, split))
        for split in ("train", "eval")} if active else {}
    self._total_steps = total_steps
    self._warm: Optional[tuple[float, int]] = None  # (time, step).

  def recorded(self, step: int, split: str) -> Optional[dict[str, float]]:
    """The metrics an earlier run recorded at `step` for `split`, or None.

    A resumed run asks before it evaluates a step the interrupted run may
    have evaluated already, so that each record is written once.
    """
    for record in self._kept:
      if record.get("step") == step and record.get("split") == split:
        return record.get("metrics")
    return None

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    """Records one event's metrics at `step` for `split` ("train"/"eval")."""
    if not self._active:
      return
    append_json_line(self._jsonl_path, {
        "step": int(step), "split": split,
        "metrics": {k: float(v) for k, v in metrics.items()}})
    write_scalars(self._writers[split], step, metrics)

  def warmed_up(self, step: int) -> None:
    """Marks the end of the first loop call (tracing): ETAs start from here.

    Until a loop call after it ends, the ETA shows "?": the first call's
    time is mostly tracing and would project a run several times longer.
    """
    if self._warm is None:
      self._warm = (time.perf_counter(), step)

  def progress(self, step: int, losses: Mapping[str, float],
               examples_per_second: float) -> None:
    """Logs `step/total | task losses | examples/s | ETA`.

    The ETA projects the time per step since the first loop call, so it
    counts evaluations and checkpoints but not tracing.
    """
    if not self._active:
      return
    eta = math.nan
    if self._warm is not None and step > self._warm[1]:
      elapsed = time.perf_counter() - self._warm[0]
      eta = elapsed / (step - self._warm[1]) * (self._total_steps - step)
    loss_text = " ".join(f"{task}={loss:.4g}" for task, loss in losses.items())
    logging.info("step %d/%d | loss %s | %.0f examples/s | ETA %s", step,
                 self._total_steps, loss_text, examples_per_second,
                 _format_seconds(eta))

  def evaluated(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs one evaluation: `step N eval | task: metric=value ... | ...`."""
    if not self._active:
      return
    logging.info("step %d eval | %s", step, format_eval_metrics(metrics))

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()


def _copy_mode(path: str, temporary: str) -> None:
  """Gives a temporary file (owner-only from mkstemp) `path`'s permissions."""
  if os.path.exists(path):
    shutil.copymode(path, temporary)
  else:  # What open() would have made: 0666 less the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)


def _drop_records_after(path: str, step: int) -> list[dict[str, Any]]:
  """Rewrites metrics.jsonl without records past `step` (atomically).

  Lines that are no record (cut short by a crash, or not UTF-8) go too,
  counted in the warning.

  Returns:
    The records kept.
  """
  kept, lines, dropped, damaged = [], [], 0, 0
  with open(path, "rb") as f:
    for raw in f:
      record = _record(raw)
      if record is None:
        damaged += 1
      elif record["step"] <= step:
        kept.append(record)
        lines.append(raw.decode() if raw.endswith(b"\n")
                     else raw.decode() + "\n")
      else:
        dropped += 1
  if not dropped and not damaged:
    return kept
  if dropped:
    logging.info("Dropping %d record(s) after step %d from %s: the resumed "
                 "run trains those steps again.", dropped, step, path)
  if damaged:
    logging.warning("Dropping %d damaged line(s) from %s (cut short or not "
                    "UTF-8 JSON).", damaged, path)
  _write_text_atomic(path, "".join(lines))
  return kept


def _record(raw: bytes) -> Optional[dict[str, Any]]:
  """The metrics record on one line of metrics.jsonl, or None if damaged."""
  try:
    record = json.loads(raw.decode("utf-8"))
  except ValueError:  # Includes UnicodeDecodeError.
    return None
  return record if _is_record(record) else None


def _is_record(record: Any) -> bool:
  """Whether a JSON value is a metrics record: step, split, metrics."""
  return (isinstance(record, dict) and isinstance(record.get("step"), int)
          and isinstance(record.get("split"), str)
          and isinstance(record.get("metrics"), dict))


def format_eval_metrics(metrics: Mapping[str, float]) -> str:
  """`task: metric=value ... | task: ...` for `task/metric` keys, in order."""
  by_task: dict[str, list[str]] = {}
  for key, value in metrics.items():
    task, _, metric = key.partition("/")
    by_task.setdefault(task, []).append(f"{metric or task}={value:.4g}")
  return " | ".join(f"{task}: {' '.join(items)}"
                    for task, items in by_task.items())


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


@typecheck.checked
def format_results(summary: Mapping[str, Any],
                   title: Optional[str] = None) -> str:
  """A plain-text table of a summary's per-task eval results and step counts.

  Args:
    summary: A run summary as returned by `mtl_dist.train`; without
      `task_steps` (an evaluation's) the steps column is left out.
    title: An optional first line.

  Returns:
    The table, one task a line.
  """
  metric_names = sorted({m for metrics in summary["eval"].values()
                         for m in metrics})
  steps = summary.get("task_steps") or {}  # None or {}: no steps column.
  header = ["task"] + (["steps"] if steps else []) + metric_names
  rows = [[task] + ([str(steps.get(task, ""))] if steps else []) +
          [f"{metrics[m]:.4f}" if m in metrics else "-" for m in metric_names]
          for task, metrics in summary["eval"].items()]
  widths = [max(len(row[i]) for row in [header] + rows)
            for i in range(len(header))]
  lines = [title] if title else []
  for row in [header] + rows:
    lines.append("  ".join(cell.ljust(width)
                           for cell, width in zip(row, widths)).rstrip())
  return "\n".join(lines)
