"""mtl-local-cluster: runs mtl-train as N workers of one cluster on this host.

Each worker is a process with its own TF_CONFIG (free localhost ports), so
MultiWorkerMirroredStrategy runs as it would across hosts. Worker output is
prefixed with `[worker I]`. When a worker fails, the others are stopped at
once (SIGTERM, then SIGKILL after --grace_seconds).

Examples:
  mtl-local-cluster --num_workers=2 -- --model_dir=/tmp/mtl_mw --train_steps=500
  mtl-local-cluster --num_workers=2 -- \\
      --flagfile=launch/configs/alternate.flags --num_cpu_devices=1 \\
      --model_dir=/tmp/mtl_mw_alt

SIGTERM or SIGINT to this launcher reaches every worker as SIGTERM (a worker
saves a checkpoint on SIGTERM and exits 143).

Exit status: 0 when every worker succeeded; otherwise the exit status of the
first worker that failed (1 if it was killed by a signal), or 2 for bad flags.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Optional, Sequence

from absl import flags

from launch import cli
from launch import startup
# This launcher never imports TensorFlow: its workers (mtl-train) do.
from mtl_dist.cluster import gpus as gpus_lib

_PROGRAM = "mtl-local-cluster"

_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", 2, "Worker processes to start (at most 64).", lower_bound=1,
    upper_bound=64)
_GRACE_SECONDS = flags.DEFINE_float(
    "grace_seconds", 30.0, "When stopping workers: seconds between SIGTERM "
    "and SIGKILL.", lower_bound=0.0)


def free_ports(count: int) -> list[int]:
  """`count` distinct TCP ports that are free on localhost right now."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("localhost", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_config(ports: Sequence[int], index: int) -> str:
  """The TF_CONFIG of worker `index` of a localhost cluster on `ports`."""
  return json.dumps({
      "cluster": {"worker": [f"localhost:{port}" for port in ports]},
      "task": {"type": "worker", "index": index},
  })


def _die_with_parent() -> None:
  """In a worker, before exec: get SIGKILL when the launcher dies (Linux)."""
  try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass  # Not Linux: orphans are possible if the launcher is killed.


def gpu_shares(num_workers: int) -> Optional[list[str]]:
  """CUDA_VISIBLE_DEVICES for each worker: the host's GPUs split evenly.

  Returns:
    None when the host has no GPU (workers train on the CPU).

  Raises:
    ValueError: With fewer GPUs than workers, or a count that does not split
      evenly.
  """
  gpus = gpus_lib.visible_gpu_ids()
  if not gpus:
    return None
  if len(gpus) % num_workers:
    raise ValueError(f"--num_workers={num_workers}: the {len(gpus)} visible "
                     "GPU(s) do not split evenly over the workers")
  per_worker = len(gpus) // num_workers
  return [",".join(gpus[i * per_worker:(i + 1) * per_worker])
          for i in range(num_workers)]


class LocalCluster:
  """N worker processes of one command, each with its TF_CONFIG.

  Workers run in their own session (a terminal's Ctrl-C reaches them only
  through this launcher) and die with it. On a GPU host each worker gets
  its share of the visible GPUs.
  """

  def __init__(self, command: Sequence[str], num_workers: int,
               grace_seconds: float, out: Optional[IO[str]] = None):
    self._command = list(command)
    self._num_workers = num_workers
    self._grace_seconds = grace_seconds
    self._out = out or sys.stdout
    self._lock = threading.Lock()
    self._processes: list[subprocess.Popen] = []
    self._readers: list[threading.Thread] = []
    self._signal: Optional[int] = None  # Set by `request_stop`.

  def _say(self, line: str) -> None:
    with self._lock:
      self._out.write(line if line.endswith("\n") else line + "\n")
      self._out.flush()

  def _relay(self, index: int, stream: IO[str]) -> None:
    for line in stream:
      self._say(f"[worker {index}] {line}")

  def request_stop(self, signum: int) -> None:
    """Asks `wait` to pass `signum` on to the workers (signal-handler safe)."""
    self._signal = signum

  def start(self) -> None:
    """Starts the workers (fewer if a stop is requested meanwhile)."""
    ports = free_ports(self._num_workers)
    shares = gpu_shares(self._num_workers)
    for index, port in enumerate(ports):
      if self._signal is not None:
        break
      env = dict(os.environ, TF_CONFIG=tf_config(ports, index),
                 PYTHONUNBUFFERED="1")
      if shares is not None:
        env["CUDA_VISIBLE_DEVICES"] = shares[index]
      process = subprocess.Popen(
          self._command, env=env, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True, bufsize=1,
          start_new_session=True, preexec_fn=_die_with_parent)
      self._processes.append(process)
      gpus = f", GPUs {shares[index]}" if shares else ""
      self._say(f"[{_PROGRAM}] worker {index}: pid {process.pid}, "
                f"localhost:{port}{gpus}")
      reader = threading.Thread(target=self._relay,
                                args=(index, process.stdout), daemon=True)
      reader.start()
      self._readers.append(reader)

  def wait(self) -> int:
    """Waits for all workers; stops the rest as soon as one fails.

    Returns:
      0 if all succeeded, else the exit status of the first worker seen to
      fail (1 if a signal ended it). After a forwarded SIGTERM, workers that
      saved a checkpoint exit 143, and so does this.
    """
    first_failure: Optional[int] = None
    stopping = False
    while True:
      if self._signal is not None and not stopping:
        stopping = True
        self._say(f"[{_PROGRAM}] passing signal {self._signal} on to the "
                  "workers.")
        self.stop(self._signal)
      statuses = [process.poll() for process in self._processes]
      for index, status in enumerate(statuses):
        if status not in (None, 0) and first_failure is None:
          first_failure = status if status > 0 else 1
          if not stopping and None in statuses:
            stopping = True
            self._say(f"[{_PROGRAM}] worker {index} failed with status "
                      f"{status}; stopping the other workers.")
            self.stop()
      if None not in statuses:
        break
      time.sleep(0.2)
    for reader in self._readers:
      reader.join(timeout=5)
    return first_failure or 0

  def stop(self, sig: int = signal.SIGTERM) -> None:
    """Sends `sig` to running workers, then SIGKILL after the grace period."""
    running = [p for p in self._processes if p.poll() is None]
    for process in running:
      process.send_signal(sig)
    deadline = time.monotonic() + self._grace_seconds
    for process in running:
      try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# `python -m launch.train` would put the working directory first on a
# worker's import path, where a folder named mtl_dist/ (the parent of a
# clone) shadows the package. A worker drops that entry; the directory that
# holds the packages this launcher imported comes last, for a checkout that
# is not installed.
_WORKER_MAIN = ("import sys; sys.path = [p for p in sys.path if p]; "
                "sys.path.append({root!r}); sys.argv[0] = 'mtl-train'; "
                "from launch import train; train.run()")


def worker_command(train_flags: list[str]) -> list[str]:
  """The command that starts one worker, mtl-train with `train_flags`."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return [sys.executable, "-c", _WORKER_MAIN.format(root=root), *train_flags]


def main(argv: list[str]) -> None:
  """Starts the workers with mtl-train's flags (after `--`) and waits."""
  train_flags = argv[1:]
  if not train_flags:
    cli.fail(_PROGRAM, "give mtl-train's flags after --, e.g. "
             f"{_PROGRAM} --num_workers=2 -- --model_dir=/tmp/mtl_mw")
  command = worker_command(train_flags)
  cluster = LocalCluster(command, _NUM_WORKERS.value, _GRACE_SECONDS.value)
  # Preemption of the whole job (SIGTERM) or Ctrl-C: workers get SIGTERM,
  # on which they save a checkpoint.
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: cluster.request_stop(signal.SIGTERM))
  try:
    cluster.start()
  except ValueError as e:
    cli.fail(_PROGRAM, str(e))
  sys.exit(cluster.wait())


def run() -> None:
  """Console-script entry point."""
  startup.run(main, cli.flags_parser(_PROGRAM), __doc__)


if __name__ == "__main__":
  run()
