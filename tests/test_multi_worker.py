"""MultiWorkerMirroredStrategy: 2 worker processes on localhost (CPU, RING)."""

import glob
import json
import os
import re
import subprocess
import sys

from conftest import communicate
from conftest import read_lines_until
from conftest import time_limit
from conftest import wait_until
import numpy as np
import pytest
import tensorflow as tf

from launch import local_cluster
from mtl_dist.loop import checkpointing

# Tests that start clusters on localhost ports run one after the other on one
# xdist worker (setup.cfg: --dist loadgroup): ports are picked free and
# released before TensorFlow binds them, so two clusters started at once could
# pick the same port.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("localhost_cluster")]

_SMALL = ["--train_steps=60", "--steps_per_loop=20", "--log_every=20",
          "--checkpoint_every=60", "--eval_every=60", "--global_batch_size=32",
          "--trunk_width=32", "--eval_examples=256", "--seed=7"]


def _env(tmp_path) -> dict:
  # TMPDIR: where non-chief workers keep their throw-away checkpoints.
  scratch = tmp_path / "tmp"
  scratch.mkdir(exist_ok=True)
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch))


def run_local_cluster(tmp_path, *flags, num_workers=2, startups=8):
  """mtl-local-cluster; `startups`: its time limit (conftest.time_limit)."""
  return subprocess.run(
      [sys.executable, "-m", "launch.local_cluster",
       f"--num_workers={num_workers}", "--", *flags],
      capture_output=True, text=True, timeout=time_limit(startups),
      env=_env(tmp_path), check=False)


def run_single_process(tmp_path, *flags, startups=5):
  """mtl-train; `startups`: its time limit (conftest.time_limit)."""
  return subprocess.run(
      [sys.executable, "-m", "launch.train", *flags],
      capture_output=True, text=True, timeout=time_limit(startups),
      env=_env(tmp_path), check=False)


def start_workers(tmp_path, args, stderr=subprocess.PIPE):
  """Two processes of `python *args`, each with its TF_CONFIG."""
  ports = local_cluster.free_ports(2)
  return [subprocess.Popen([sys.executable, *args],
                           env=dict(_env(tmp_path),
                                    TF_CONFIG=local_cluster.tf_config(ports,
                                                                      i)),
                           stdout=subprocess.PIPE, stderr=stderr, text=True)
          for i in range(2)]


def checkpoint_values(model_dir: str) -> dict:
  reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints"))
  return {name: reader.get_tensor(name)
          for name, _ in tf.train.list_variables(
              os.path.join(model_dir, "checkpoints"))
          if not name.startswith(("_CHECKPOINTABLE", "save_counter",
                                  "task_order"))}


@pytest.mark.parametrize("mode_flags", [
    ["--mode=joint"],
    ["--mode=alternate", "--tasks=shape,x,y", "--schedule=temperature"],
], ids=["joint", "alternate"])
def test_two_workers_equal_two_mirrored_devices(tmp_path, mode_flags):
  cluster_dir = str(tmp_path / "cluster")
  mirrored_dir = str(tmp_path / "mirrored")
  cluster = run_local_cluster(tmp_path, f"--model_dir={cluster_dir}",
                              *mode_flags, *_SMALL)
  assert cluster.returncode == 0, cluster.stdout[-4000:]
  assert "over 2 workers (this is worker 1)" in cluster.stdout
  # The results table once, the chief's; the other worker says it is done.
  assert cluster.stdout.count("eval results:") == 1, cluster.stdout[-4000:]
  assert re.search(r"\[worker 0\] mtl-train: \w+ mode, step 60, .*eval "
                   "results:", cluster.stdout), cluster.stdout[-4000:]
  assert re.search(r"\[worker 1\] mtl-train: this worker finished at step "
                   "60; the chief prints the results", cluster.stdout)
  mirrored = run_single_process(tmp_path, f"--model_dir={mirrored_dir}",
                                "--strategy=mirrored", "--num_cpu_devices=2",
                                *mode_flags, *_SMALL)
  assert mirrored.returncode == 0, mirrored.stderr[-4000:]

  expected = checkpoint_values(mirrored_dir)
  got = checkpoint_values(cluster_dir)
  assert sorted(got) == sorted(expected)
  assert any(name.startswith("model/heads/") for name in got)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)

  # Only the chief wrote the run's files: one line per event, one event
  # file per split, and the other worker's scratch checkpoints are gone.
  records = [json.loads(line)
             for line in open(os.path.join(cluster_dir, "metrics.jsonl"))]
  assert [(r["step"], r["split"]) for r in records] == [
      (20, "train"), (40, "train"), (60, "train"), (60, "eval")]
  for split in ("train", "eval"):
    assert len(os.listdir(os.path.join(cluster_dir, "tensorboard",
                                       split))) == 1
  assert os.listdir(tmp_path / "tmp") == []
  summary = json.load(open(os.path.join(cluster_dir, "summary.json")))
  single = json.load(open(os.path.join(mirrored_dir, "summary.json")))
  assert summary["replicas"] == 2 and summary["step"] == 60
  assert summary["task_steps"] == single["task_steps"]
  for task, metrics in single["eval"].items():
    for name, value in metrics.items():
      assert summary["eval"][task][name] == pytest.approx(value, abs=1e-5)


def _latest_step(model_dir: str) -> int:
  """The step a restart resumes from: the newest readable checkpoint.

  Found from the .index files, as the launcher does: a chief killed between
  writing a checkpoint and updating the `checkpoint` list file leaves a
  checkpoint that tf.train.latest_checkpoint does not name yet.
  """
  path, _ = checkpointing.newest_readable(os.path.join(model_dir,
                                                       "checkpoints"))
  return checkpointing.step_of(path) if path else 0


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "chief"])
def test_dead_worker_fails_the_other_and_a_restart_resumes(tmp_path, victim):
  survivor = 1 - victim
  model_dir = str(tmp_path / "run")
  flags = [f"--model_dir={model_dir}", "--train_steps=1000",
           "--checkpoint_every=100", "--steps_per_loop=50", "--log_every=100",
           "--eval_every=1000", "--eval_examples=256", "--trunk_width=32"]
  workers = start_workers(tmp_path, ["-m", "launch.train", *flags])
  try:
    # Both workers start, form the cluster and train 100 steps.
    wait_until(lambda: glob.glob(os.path.join(model_dir, "checkpoints",
                                              "*.index")),
               "the first checkpoint", 10, process=workers[0])
    workers[victim].kill()
    # Found by broken connections or the coordination service's heartbeats
    # (TensorFlow's default heartbeat timeout: 10 s), with no
    # --collective_timeout: without them the survivor would wait forever.
    _, stderr = communicate(workers[survivor],
                            f"worker {survivor} failing after worker "
                            f"{victim} was killed", 2, fixed_seconds=10)
  finally:
    for worker in workers:
      worker.kill()
      worker.communicate()
  assert workers[survivor].returncode == 1, stderr[-3000:]
  assert re.search(rf"mtl-train: error: worker {survivor}: the cluster "
                   r"failed near step \d+ \(UnavailableError", stderr), (
                       stderr[-3000:])
  assert "run the same command on all workers to resume" in stderr
  saved_step = _latest_step(model_dir)
  assert 0 < saved_step < 1000
  assert "ckpt-" in stderr

  # The same command again, through mtl-local-cluster, resumes from it.
  restart = run_local_cluster(tmp_path, *flags)
  assert restart.returncode == 0, restart.stdout[-4000:]
  assert f"Resuming from {model_dir}/checkpoints/ckpt-{saved_step} at step " \
         f"{saved_step}" in restart.stdout
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["step"] == 1000
  steps = [json.loads(line)["step"]
           for line in open(os.path.join(model_dir, "metrics.jsonl"))
           if json.loads(line)["split"] == "train"]
  assert steps[-1] == 1000


_STALLING_WORKER = """
import os, sys, time
import tensorflow as tf
import mtl_dist
strategy = mtl_dist.create_strategy("multi_worker", collective_timeout=3)
if strategy.cluster_resolver.task_id == 1:
  time.sleep(3600)  # Alive (sending heartbeats) until killed; never joins.
started = time.monotonic()
try:
  strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
except tf.errors.DeadlineExceededError:
  print(f"timed out after {time.monotonic() - started:.0f} s")
"""


def test_collective_timeout_bounds_a_collective_a_live_worker_skips(tmp_path):
  workers = start_workers(tmp_path, ["-c", _STALLING_WORKER],
                          stderr=subprocess.STDOUT)
  try:
    # Worker 1 lives until it is killed here, so only the 3-s timeout can
    # end worker 0's collective (DeadlineExceededError); without it, the
    # wait here would reach its limit.
    output, _ = communicate(workers[0], "worker 0's collective timing out",
                            4, fixed_seconds=3)
  finally:
    for worker in workers:
      worker.kill()
      worker.communicate()
  match = re.search(r"timed out after (\d+) s", output)
  assert match, output[-3000:]
  assert int(match.group(1)) >= 3


def test_a_worker_that_never_starts_fails_the_others_in_time(tmp_path):
  ports = local_cluster.free_ports(2)
  # Without --cluster_start_timeout it would wait 900 s; the limit here is
  # far less on an idle machine.
  alone = subprocess.run(
      [sys.executable, "-m", "launch.train",
       f"--model_dir={tmp_path / 'run'}", "--cluster_start_timeout=5"],
      env=dict(_env(tmp_path), TF_CONFIG=local_cluster.tf_config(ports, 0)),
      capture_output=True, text=True, timeout=time_limit(2, fixed_seconds=5),
      check=False)
  assert alone.returncode == 1, alone.stderr[-3000:]
  assert "Waiting up to 5 s for every worker to join" in alone.stderr
  # What ended the wait: faulthandler's 5-s timer (started after the
  # start-up, so a slow start-up cannot fire it early).
  assert "Timeout (0:00:05)!" in alone.stderr, alone.stderr[-3000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_locked_model_dir_stops_every_worker_with_status_2(tmp_path):
  model_dir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import time; from mtl_dist.loop import run_lock; "
       f"lock = run_lock.acquire({str(model_dir)!r}); print('held', "
       "flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
  try:
    read_lines_until(holder, "^held$", "the lock's holder", 1)
    cluster = run_local_cluster(tmp_path, f"--model_dir={model_dir}",
                                *_SMALL)
  finally:
    holder.kill()
    holder.wait()
  assert cluster.returncode == 2, cluster.stdout[-4000:]
  assert re.search(r"worker 0.*mtl-train: error: --model_dir=\S+: in use by "
                   rf"another run \(host \S+, pid {holder.pid}",
                   cluster.stdout), cluster.stdout[-4000:]
  assert re.search(r"worker 1.*mtl-train: error: --model_dir=\S+: the chief "
                   r"\(worker 0\) refused the run", cluster.stdout), (
                       cluster.stdout[-4000:])
  assert os.listdir(model_dir) == ["lock"]
