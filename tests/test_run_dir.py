"""A model_dir under an operator's hands: one run at a time, nothing lost.

The lock that keeps a second run out, the refusal to restart from zero a
run whose checkpoints vanished, evaluation records written exactly once
across restarts, damaged run files, and one-line errors for file systems.
"""

import dataclasses
import errno
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap

from conftest import read_lines_until
from conftest import time_limit
from conftest import train_launcher_failing_with
import pytest

import mtl_dist
from mtl_dist.loop import run_lock
from mtl_dist.run import saved_run

_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_runs")


def _config(model_dir, **changes):
  values = dict(model_dir=str(model_dir), tasks=["shape", "x"],
                train_examples=256, eval_examples=64, train_steps=4,
                steps_per_loop=2, log_every=2, eval_every=2,
                checkpoint_every=2, trunk_width=8, global_batch_size=16)
  values.update(changes)
  return mtl_dist.TrainConfig(**values)


def _records(model_dir) -> list[tuple[int, str]]:
  with open(os.path.join(model_dir, "metrics.jsonl"), "rb") as f:
    return [(r["step"], r["split"]) for r in map(json.loads, f)]


def _hold_lock_in_another_process(model_dir):
  """Starts a process that holds model_dir's lock until it is killed."""
  holder = subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(f"""
          import sys, time
          from mtl_dist.loop import run_lock
          lock = run_lock.acquire({str(model_dir)!r})
          print("held", flush=True)
          time.sleep(600)
      """)], stdout=subprocess.PIPE, text=True)
  read_lines_until(holder, "^held$", "the lock's holder", 1)
  return holder


# The lock.


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  model_dir = str(tmp_path / "run")
  first = run_lock.acquire(model_dir)
  with pytest.raises(mtl_dist.ConfigError) as error:
    run_lock.acquire(model_dir)
  message = str(error.value)
  assert message.startswith(f"--model_dir={model_dir}: in use by another run ")
  assert f"host {socket.gethostname()}, pid {os.getpid()}, started 20" in message
  assert "\n" not in message
  first.release()
  assert not os.path.exists(model_dir)  # It made the directory; empty again.
  run_lock.acquire(model_dir).release()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(
    tmp_path, caplog):
  model_dir = tmp_path / "run"
  holder = _hold_lock_in_another_process(model_dir)
  holder_pid = holder.pid
  holder.kill()  # SIGKILL: the lock file stays, the kernel drops the flock.
  holder.wait()
  assert run_lock.holder_of(str(model_dir))["pid"] == holder_pid
  with caplog.at_level(logging.WARNING):
    lock = run_lock.acquire(str(model_dir))
  assert f"pid {holder_pid}" in caplog.text and "Taking over" in caplog.text
  assert run_lock.holder_of(str(model_dir))["pid"] == os.getpid()
  lock.release()


def test_a_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "lock").write_text(json.dumps(
      {"host": "node-17", "pid": 4242, "started": "2026-11-30T10:00:00Z"}))
  with pytest.raises(mtl_dist.ConfigError,
                     match=r"a run on another host holds it \(host node-17, "
                     r"pid 4242, started 2026-11-30T10:00:00Z\); if that run "
                     r"has ended, delete .*/run/lock and run again"):
    run_lock.acquire(str(model_dir))
  (model_dir / "lock").unlink()
  run_lock.acquire(str(model_dir)).release()


def test_a_lock_of_the_same_slurm_job_on_another_host_is_taken_over(
    tmp_path, monkeypatch, caplog):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "lock").write_text(json.dumps(
      {"host": "node-17", "pid": 4242, "started": "2026-11-30T10:00:00Z",
       "slurm_job_id": "555"}))
  monkeypatch.setenv("SLURM_JOB_ID", "556")  # Another job: refused.
  with pytest.raises(mtl_dist.ConfigError, match="on another host holds it"):
    run_lock.acquire(str(model_dir))
  monkeypatch.setenv("SLURM_JOB_ID", "555")  # The job, requeued.
  with caplog.at_level(logging.WARNING):
    lock = run_lock.acquire(str(model_dir))
  assert "Taking over" in caplog.text and "host node-17" in caplog.text
  assert run_lock.holder_of(str(model_dir))["slurm_job_id"] == "555"
  lock.release()


def test_without_flock_the_lock_file_and_the_pid_decide(tmp_path,
                                                        monkeypatch, caplog):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
  model_dir = tmp_path / "run"
  with caplog.at_level(logging.WARNING):
    first = run_lock.acquire(str(model_dir))
  assert "does not support flock" in caplog.text
  first.release()
  sleeper = subprocess.Popen([sys.executable, "-c",
                              "import time; time.sleep(600)"])
  try:  # A live holder on this host.
    model_dir.mkdir(exist_ok=True)
    (model_dir / "lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": sleeper.pid,
         "started": "2026-11-30T10:00:00Z"}))
    with pytest.raises(mtl_dist.ConfigError,
                       match=f"in use by another run .*pid {sleeper.pid}"):
      run_lock.acquire(str(model_dir))
  finally:
    sleeper.kill()
    sleeper.wait()
  run_lock.acquire(str(model_dir)).release()  # Dead now: taken over.


def test_an_index_lost_after_the_save_is_noticed_one_never_written_is_not(
    tmp_path):
  from mtl_dist.loop import checkpointing  # pylint: disable=g-import-not-at-top
  directory = tmp_path / "checkpoints"
  directory.mkdir()
  (directory / "ckpt-2.data-00000-of-00001").write_bytes(b"x")
  # A save killed between its data file and its index: no checkpoint.
  assert checkpointing.newest_readable(str(directory)) == (None, [])
  (directory / "checkpoint").write_text(
      'model_checkpoint_path: "ckpt-2"\n'
      'all_model_checkpoint_paths: "ckpt-2"\n')
  assert checkpointing.newest_readable(str(directory)) == (
      None, [(str(directory / "ckpt-2"), "its .index file is missing")])


def test_a_directory_that_cannot_be_written_is_refused_in_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  for model_dir, reason in ((tmp_path / "file", "FileExistsError"),
                            (tmp_path / "file" / "run", "NotADirectoryError"),
                            ("/proc/mtl_dist_run", "")):
    with pytest.raises(mtl_dist.ConfigError,
                       match=f"--model_dir={model_dir}: cannot be written "
                       f"\\({reason}"):
      run_lock.acquire(str(model_dir))


@pytest.mark.slow
def test_a_second_launcher_on_the_directory_exits_2_before_writing(tmp_path):
  model_dir = tmp_path / "run"
  holder = _hold_lock_in_another_process(model_dir)
  try:
    result = subprocess.run(
        [sys.executable, "-m", "launch.train", f"--model_dir={model_dir}",
         "--train_steps=2", "--trunk_width=8", "--train_examples=256"],
        capture_output=True, text=True, timeout=time_limit(19),
        check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"mtl-train: error: --model_dir={model_dir}: in use by another run "
      f"(host {socket.gethostname()}, pid {holder.pid}, started "
      f"{run_lock.holder_of(str(model_dir))['started']}); wait for it to end "
      "or give another --model_dir")
  assert os.listdir(model_dir) == ["lock"]  # The holder's, nothing else.


def test_training_holds_the_lock_while_readers_do_without(tmp_path):
  model_dir = tmp_path / "joint"
  shutil.copytree(os.path.join(_FIXTURES, "joint"), model_dir)
  holder = _hold_lock_in_another_process(model_dir)
  try:
    with pytest.raises(mtl_dist.ConfigError, match="in use by another run"):
      mtl_dist.train(dataclasses.replace(
          saved_run.read_config(str(model_dir)), model_dir=str(model_dir),
          train_steps=9))
    # The sidecar, the export and the report read while a run holds it.
    (result,) = mtl_dist.evaluate(str(model_dir))
    assert result.step == 6
    mtl_dist.export_run(str(model_dir), str(tmp_path / "export"))
    mtl_dist.write_report(str(model_dir), str(tmp_path / "report.png"))
  finally:
    holder.kill()
    holder.wait()
  assert os.path.exists(tmp_path / "export" / "saved_model.pb")


def test_a_finished_run_releases_the_lock(tmp_path):
  mtl_dist.train(_config(tmp_path / "run", train_steps=2))
  assert (tmp_path / "run" / "lock").read_text() == ""  # Emptied, kept.
  assert run_lock.holder_of(str(tmp_path / "run")) is None
  run_lock.acquire(str(tmp_path / "run")).release()


# Vanished checkpoints.


def test_a_run_whose_checkpoints_vanished_is_refused_not_restarted(tmp_path):
  model_dir = tmp_path / "run"
  mtl_dist.train(_config(model_dir))
  for path in glob.glob(str(model_dir / "checkpoints" / "ckpt-*")):
    os.remove(path)
  before = {name: open(model_dir / name, "rb").read()
            for name in ("metrics.jsonl", "summary.json")}
  with pytest.raises(mtl_dist.ConfigError) as error:
    mtl_dist.train(_config(model_dir, train_steps=6))
  message = str(error.value)
  assert "holds a run that saved checkpoints (summary.json (step 4); " in message
  assert "checkpoints/checkpoint listing ckpt-2, ckpt-4" in message
  assert "metrics.jsonl records up to step 4" in message
  assert "has none (no ckpt-*.index)" in message
  for name, content in before.items():  # Nothing deleted or rewritten.
    assert open(model_dir / name, "rb").read() == content


def test_metrics_of_a_run_killed_before_its_first_checkpoint_are_no_sign(
    tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "config.json").write_text(json.dumps(
      {"checkpoint_every": 4, "train_steps": 8}))
  with open(model_dir / "metrics.jsonl", "w") as f:
    for step in (2, 4):  # Logged at 4, killed before the save at 4.
      f.write(json.dumps({"step": step, "split": "train", "metrics": {}})
              + "\n")
  assert saved_run.signs_of_training(str(model_dir)) == []
  with open(model_dir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 6, "split": "train", "metrics": {}}) + "\n")
  assert saved_run.signs_of_training(str(model_dir)) == [
      "metrics.jsonl records up to step 6"]


# Records exactly once.


def test_an_evaluation_lost_between_save_and_eval_is_made_up_once(tmp_path):
  model_dir = tmp_path / "run"
  mtl_dist.train(_config(model_dir, train_steps=2))
  # As if killed after the save at step 2, before its evaluation.
  records = [line for line in open(model_dir / "metrics.jsonl")
             if json.loads(line)["split"] != "eval"]
  (model_dir / "metrics.jsonl").write_text("".join(records))
  mtl_dist.train(_config(model_dir, train_steps=4))
  assert _records(model_dir) == [(2, "train"), (2, "eval"), (4, "train"),
                                 (4, "eval")]


def test_a_finished_run_run_again_records_nothing_twice(tmp_path):
  model_dir = tmp_path / "run"
  first = mtl_dist.train(_config(model_dir))
  again = mtl_dist.train(_config(model_dir))
  assert _records(model_dir) == [(2, "train"), (2, "eval"), (4, "train"),
                                 (4, "eval")]
  assert again["eval"] == first["eval"] and again["step"] == 4


# Damaged run files.


def test_bytes_that_are_not_utf8_in_the_run_files_are_survived(tmp_path):
  model_dir = tmp_path / "run"
  mtl_dist.train(_config(model_dir))
  with open(model_dir / "checkpoints" / "checkpoint", "wb") as f:
    f.write(b'model_checkpoint_path: "ckpt-4"\n\xff\xfe\x80 garbage\n')
  with open(model_dir / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 3, "split": "train", "metrics": {"\xff": 1.0}}\n')
  mtl_dist.write_report(str(model_dir), str(tmp_path / "report.png"))
  summary = mtl_dist.train(_config(model_dir, train_steps=8,
                                   keep_checkpoints=2))
  assert summary["step"] == 8
  state = open(model_dir / "checkpoints" / "checkpoint").read()  # UTF-8 now.
  assert 'model_checkpoint_path: "ckpt-8"' in state
  assert sorted(os.listdir(model_dir / "checkpoints")) == [
      "checkpoint", "ckpt-6.data-00000-of-00001", "ckpt-6.index",
      "ckpt-8.data-00000-of-00001", "ckpt-8.index"]
  assert (3, "train") not in _records(model_dir)  # The damaged line.


def test_a_config_json_of_wrong_types_is_refused_by_its_readers(tmp_path):
  model_dir = tmp_path / "joint"
  shutil.copytree(os.path.join(_FIXTURES, "joint"), model_dir)
  config = json.loads((model_dir / "config.json").read_text())
  for field, value, message in (
      ("global_batch_size", "abc", "--global_batch_size='abc': must be"),
      ("train_steps", -3, "--train_steps=-3: must be a positive integer"),
      ("learning_rate", float("inf"), "--learning_rate=inf: must be a finite"),
  ):
    (model_dir / "config.json").write_text(json.dumps({**config,
                                                       field: value}))
    with pytest.raises(mtl_dist.ConfigError,
                       match=f"^{model_dir}/config.json: {message}"):
      mtl_dist.evaluate(str(model_dir))


def test_readers_warn_when_they_skip_a_damaged_newest_checkpoint(tmp_path,
                                                                  caplog):
  model_dir = tmp_path / "joint"
  shutil.copytree(os.path.join(_FIXTURES, "joint"), model_dir)
  os.remove(model_dir / "checkpoints" / "ckpt-6.index")
  with caplog.at_level(logging.WARNING):
    (result,) = mtl_dist.evaluate(str(model_dir))
  assert result.step == 3
  assert ("ckpt-6 cannot be read (its .index file is missing); using the "
          "newest readable one") in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    path = mtl_dist.export_run(str(model_dir), str(tmp_path / "export"))
  assert path.endswith("ckpt-3") and "ckpt-6 cannot be read" in caplog.text


# One line for file-system failures.


def test_mtl_train_turns_a_full_disk_into_one_line(monkeypatch, capsys):
  assert train_launcher_failing_with(
      monkeypatch, capsys,
      OSError(errno.ENOSPC, "No space left on device")) == (
          1, "mtl-train: error: OSError: [Errno 28] No space left on device\n")


def test_an_unwritable_export_dir_is_refused_before_training(tmp_path):
  for export_dir, message in (
      (tmp_path / "file" / "export", "is a file, not a directory"),
      ("/proc/mtl_dist_export", "cannot be written")):
    (tmp_path / "file").write_text("x")
    with pytest.raises(mtl_dist.ConfigError,
                       match=f"--export_dir={export_dir}: .*{message}"):
      mtl_dist.train(_config(tmp_path / "run", export_dir=str(export_dir)))
    assert not os.path.exists(tmp_path / "run")


# mtl-local-cluster's workers import the installed package.


@pytest.mark.slow
def test_local_cluster_workers_ignore_a_mtl_dist_folder_in_the_cwd(tmp_path):
  from launch import local_cluster  # pylint: disable=g-import-not-at-top
  shadow = tmp_path / "mtl_dist"
  shadow.mkdir()
  (shadow / "__init__.py").write_text("raise ImportError('the shadow')\n")
  result = subprocess.run(
      local_cluster.worker_command(["--model_dir=", "--train_steps=1"]),
      cwd=tmp_path, capture_output=True, text=True, timeout=time_limit(19),
      check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "mtl-train: error: --model_dir is required")
