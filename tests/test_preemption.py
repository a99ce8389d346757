"""Killed, preempted and restarted runs, in subprocesses."""

import glob
import json
import os
import re
import signal
import subprocess
import sys

from conftest import communicate
from conftest import read_lines_until
from conftest import time_limit
from conftest import wait_until
import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.slow

_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _start(module: str, *flags: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", module, *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=_ENV)


def _run(module: str, *flags: str) -> subprocess.CompletedProcess:
  # A run of up to 1500 small steps, one or two workers: about 6 start-ups.
  return subprocess.run([sys.executable, "-m", module, *flags],
                        capture_output=True, text=True,
                        timeout=time_limit(6), env=_ENV, check=False)


def _wait_for(pattern: str, process: subprocess.Popen) -> None:
  # A start-up and at most 100 steps: about 3 start-ups.
  wait_until(lambda: glob.glob(pattern), pattern, 3, process=process)


def _state(model_dir: str) -> dict:
  directory = os.path.join(model_dir, "checkpoints")
  reader = tf.train.load_checkpoint(directory)
  return {name: reader.get_tensor(name)
          for name, _ in tf.train.list_variables(directory)
          if not name.startswith(("_CHECKPOINTABLE", "save_counter"))}


def _train_steps(model_dir: str) -> list[int]:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.parametrize("mode_flags", [
    ["--mode=joint"],
    ["--mode=alternate", "--tasks=shape,x,y", "--schedule=proportional"],
    # Shared gates, private experts and per-task Adam slots.
    ["--mode=alternate", "--tasks=shape,x,y", "--schedule=proportional",
     "--architecture=ple", "--num_shared_experts=1", "--trunk_width=16",
     "--trunk_depth=1"],  # Later flags win: eight experts, kept small.
], ids=["joint", "alternate", "alternate_ple"])
def test_sigkill_and_restart_ends_bit_for_bit_like_an_uninterrupted_run(
    tmp_path, mode_flags):
  flags = ["--deterministic", "--num_cpu_devices=2", "--train_steps=600",
           "--steps_per_loop=20", "--log_every=20", "--checkpoint_every=100",
           "--eval_every=600", "--trunk_width=32", "--eval_examples=256",
           *mode_flags]
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  uninterrupted = _run("launch.train", f"--model_dir={whole}", *flags)
  assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

  victim = _start("launch.train", f"--model_dir={killed}", *flags)
  _wait_for(os.path.join(killed, "checkpoints", "ckpt-100.index"), victim)
  victim.kill()  # SIGKILL: no chance to save anything.
  victim.communicate()
  saved = sorted(int(p.rsplit("-", 1)[1].split(".")[0]) for p in glob.glob(
      os.path.join(killed, "checkpoints", "ckpt-*.index")))
  assert saved[-1] < 600, "the run ended before it was killed"

  restarted = _run("launch.train", f"--model_dir={killed}", *flags)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert f"at step {saved[-1]}." in restarted.stderr
  expected, got = _state(whole), _state(killed)
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert _train_steps(killed) == list(range(20, 601, 20))


def test_sigterm_saves_then_the_same_command_resumes(tmp_path):
  model_dir = str(tmp_path / "run")
  flags = [f"--model_dir={model_dir}", "--num_cpu_devices=2",
           "--train_steps=1500", "--steps_per_loop=50", "--log_every=100",
           "--checkpoint_every=100000", "--eval_every=100000",
           "--trunk_width=32", "--eval_examples=256"]
  worker = _start("launch.train", *flags)
  _wait_for(os.path.join(model_dir, "metrics.jsonl"), worker)
  worker.send_signal(signal.SIGTERM)
  output, _ = communicate(worker, "mtl-train saving after SIGTERM", 2)
  assert worker.returncode == 143, output[-3000:]
  (index,) = glob.glob(os.path.join(model_dir, "checkpoints", "*.index"))
  step = int(index.rsplit("-", 1)[1].split(".")[0])
  assert 100 <= step < 1500
  assert (f"mtl-train: stopped by SIGTERM at step {step}; saved checkpoint "
          f"{model_dir}/checkpoints/ckpt-{step}") in output
  assert _train_steps(model_dir)[-1] == step  # The steps since the last log.

  resumed = _run("launch.train", *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"ckpt-{step} at step {step}." in resumed.stderr
  steps = _train_steps(model_dir)
  assert steps == sorted(set(steps))  # Nothing logged twice ...
  assert set(range(100, 1501, 100)) <= set(steps)  # ... or left out.
  assert json.load(open(os.path.join(model_dir, "summary.json")))[
      "step"] == 1500


@pytest.mark.xdist_group("localhost_cluster")  # See test_multi_worker.py.
@pytest.mark.parametrize("target", ["launcher", "worker 1"])
def test_sigterm_to_a_cluster_saves_one_agreed_step_and_resumes(tmp_path,
                                                                 target):
  model_dir = str(tmp_path / "run")
  train_flags = [f"--model_dir={model_dir}", "--train_steps=1500",
                 "--steps_per_loop=50", "--log_every=100",
                 "--checkpoint_every=100000", "--eval_every=100000",
                 "--trunk_width=32", "--eval_examples=256"]
  cluster = _start("launch.local_cluster", "--num_workers=2", "--",
                   *train_flags)
  head = read_lines_until(cluster, r"worker 1: pid (\d+)",
                          "mtl-local-cluster starting worker 1", 1)
  pid = int(re.search(r"worker 1: pid (\d+)", "".join(head)).group(1))
  _wait_for(os.path.join(model_dir, "metrics.jsonl"), cluster)
  if target == "launcher":
    cluster.send_signal(signal.SIGTERM)  # Passed on to both workers.
  else:
    os.kill(pid, signal.SIGTERM)  # Only one worker is preempted.
  output = "".join(head) + communicate(
      cluster, "both workers saving after SIGTERM", 3)[0]
  assert cluster.returncode == 143, output[-3000:]
  (index,) = glob.glob(os.path.join(model_dir, "checkpoints", "*.index"))
  step = int(index.rsplit("-", 1)[1].split(".")[0])
  for worker in (0, 1):
    assert (f"[worker {worker}] mtl-train: stopped by SIGTERM at step "
            f"{step};") in output

  resumed = _run("launch.local_cluster", "--num_workers=2", "--",
                 *train_flags)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  assert f"ckpt-{step} at step {step}." in resumed.stdout
  steps = _train_steps(model_dir)
  assert steps == sorted(set(steps))
  assert set(range(100, 1501, 100)) <= set(steps)
