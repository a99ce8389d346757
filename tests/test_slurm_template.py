"""launch/slurm/train.sbatch under a stand-in for SLURM's srun and scontrol.

The stand-in `srun` starts each task as real srun does on one node: with
SLURM_PROCID and the SLURM_STEP_* variables, so mtl-train builds its cluster
through the SLURM resolver and trains with MultiWorkerMirroredStrategy.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys

from conftest import communicate
from conftest import time_limit
from conftest import wait_until
import pytest

pytestmark = pytest.mark.slow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SBATCH = os.path.join(_REPO, "launch", "slurm", "train.sbatch")

_FAKE_SRUN = """#!{python}
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):  # srun's own options
    args.pop(0)
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(args) + "\\n")
if os.environ.get("FAKE_SRUN_SLEEP"):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.pause()
tasks = int(os.environ["FAKE_SLURM_TASKS"])
procs = [subprocess.Popen(args, env=dict(
    os.environ, SLURM_PROCID=str(i), SLURM_STEP_NUM_TASKS=str(tasks),
    SLURM_STEP_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE=str(tasks)))
    for i in range(tasks)]
sys.exit(max(p.wait() for p in procs))
"""

_FAKE_SCONTROL = """#!/bin/sh
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
"""


def _two_free_ports() -> int:
  """A port p such that p and p+1 are both free on localhost."""
  for _ in range(100):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    if port >= 65535:
      continue
    with socket.socket() as s:
      try:
        s.bind(("localhost", port + 1))
      except OSError:
        continue
    return port
  raise RuntimeError("no two consecutive free ports")


def _environment(tmp_path, **extra) -> dict:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", _FAKE_SRUN.format(python=sys.executable)),
                     ("scontrol", _FAKE_SCONTROL)):
    path = bin_dir / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  # mtl-train is the console script next to this interpreter.
  path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                          os.environ.get("PATH", "")])
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k != "TF_CONFIG"}
  env.update(PATH=path, TF_CPP_MIN_LOG_LEVEL="2", SLURM_JOB_ID="4242",
             FAKE_SLURM_LOG=str(tmp_path / "slurm.log"), **extra)
  return env


@pytest.mark.xdist_group("localhost_cluster")  # See test_multi_worker.py.
def test_sbatch_trains_two_workers_through_the_slurm_resolver(tmp_path):
  model_dir = str(tmp_path / "run")
  env = _environment(tmp_path, FAKE_SLURM_TASKS="2",
                     PORT_BASE=str(_two_free_ports()))
  result = subprocess.run(
      ["bash", _SBATCH, f"--model_dir={model_dir}", "--train_steps=40",
       "--steps_per_loop=20", "--log_every=20", "--eval_every=40",
       "--checkpoint_every=40", "--trunk_width=32", "--eval_examples=256"],
      capture_output=True, text=True, timeout=time_limit(10), env=env,
      cwd=_REPO, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "over 2 workers (this is worker 1)" in result.stderr
  assert "--cluster=slurm --port_base=" in open(env["FAKE_SLURM_LOG"]).read()
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["replicas"] == 2 and summary["step"] == 40


def test_sbatch_requeues_the_job_near_the_time_limit(tmp_path):
  env = _environment(tmp_path, FAKE_SRUN_SLEEP="1")
  script = subprocess.Popen(["bash", _SBATCH, "--model_dir=/unused"],
                            env=env, cwd=_REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  log = tmp_path / "slurm.log"
  # Bash scripts and fakes, no TensorFlow: well under a start-up each.
  wait_until(lambda: log.exists() and "srun" in log.read_text(),
             "the sbatch script starting srun", 1, process=script)
  script.send_signal(signal.SIGUSR1)  # What --signal=B:USR1@180 sends.
  output, _ = communicate(script, "the sbatch script requeueing the job", 1)
  assert script.returncode == 0, output
  assert "time limit near" in output
  assert log.read_text().splitlines()[-1] == "scontrol requeue 4242"
