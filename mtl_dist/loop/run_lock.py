"""One training run per model_dir: the `model_dir/lock` file.

Two runs writing one directory (a requeued job whose first copy is still
alive, a typo in a sweep) would interleave their metrics and overwrite each
other's checkpoints. A training run therefore holds `model_dir/lock` from
before it restores a checkpoint until it ends; readers (the sidecar,
mtl-eval, mtl-export, mtl-report) never take it.

The lock is an exclusive `flock` on the file, which the kernel releases when
its process dies however it dies, plus the holder's identity written in the
file (host, pid, start time, command) for the message of a refused run.
A file naming this host whose flock nobody holds was left by a killed run:
it is taken over with a warning. So is one left by an earlier run of the
same SLURM job (a requeued job keeps its SLURM_JOB_ID, and SLURM runs one
copy of it at a time). One naming another host cannot be checked from here
(flock does not reach across hosts on every network file system), so the
run is refused and the message says how to clear it. On a file system
without flock (Lustre without its `flock` mount option, NFS without a lock
daemon) the file alone decides, with the holder's pid checked on this host.

A released lock is an empty file, not a deleted one: deleting it would let
a run that opened it just before lock an unlinked file while a third run
makes a new one.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any, Optional

from absl import logging

from mtl_dist import errors

LOCK_FILE = "lock"


class RunLock:
  """The held lock of one model_dir; `release()` (or `with`) gives it up."""

  def __init__(self, path: str, fd: int, made_dirs: list[str]):
    self.path = path
    self._fd: Optional[int] = fd
    self._made_dirs = made_dirs  # Deepest first.

  def release(self) -> None:
    """Empties the lock file and unlocks it; a second call does nothing.

    Directories the lock made are removed again while they hold nothing
    but the lock, so a refused run leaves no trace.
    """
    if self._fd is None:
      return
    made_here = (self._made_dirs and
                 os.listdir(self._made_dirs[0]) == [LOCK_FILE])
    try:
      if made_here:
        os.remove(self.path)
      else:
        os.ftruncate(self._fd, 0)
    except OSError:
      pass  # Cleared by hand while the run was running: nothing to do.
    os.close(self._fd)  # Unlocks.
    self._fd = None
    if made_here:
      for directory in self._made_dirs:
        try:
          os.rmdir(directory)  # Only if empty.
        except OSError:
          break

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.release()


def is_local(model_dir: str) -> bool:
  """Whether `model_dir` is a local path (not gs://, hdfs://, ...)."""
  return "://" not in model_dir


def acquire(model_dir: str) -> Optional[RunLock]:
  """Takes `model_dir/lock` for this process, creating `model_dir`.

  Args:
    model_dir: The run's directory.

  Returns:
    The held lock, or None for a remote file system (gs://, ...), where a
    warning says that no lock protects the directory.

  Raises:
    ConfigError: If another run holds the directory, or it cannot be
      written (not a directory, no permission, full).
  """
  if not is_local(model_dir):
    logging.warning("--model_dir=%s is not a local path: no lock keeps a "
                    "second run from writing it at the same time.", model_dir)
    return None
  where = f"--model_dir={model_dir}"
  path = os.path.join(model_dir, LOCK_FILE)
  try:
    made_dirs = _make_dirs(model_dir)
    for _ in range(10):  # Until the locked file is the one at `path`.
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      _lock(fd, where, path)
      if _is_at(fd, path):
        break
      os.close(fd)  # Deleted by a refused run's release meanwhile.
    else:
      raise errors.ConfigError(f"{where}: {path} keeps being replaced; is "
                               "another run starting there?")
  except OSError as e:
    raise errors.ConfigError(f"{where}: cannot be written "
                             f"({_os_reason(e)})") from None
  try:
    _check_holder(_read_holder(fd), where, path)
    _write_holder(fd)
  except BaseException as e:
    os.close(fd)
    if isinstance(e, OSError):
      raise errors.ConfigError(f"{where}: cannot be written "
                               f"({_os_reason(e)})") from None
    raise
  return RunLock(path, fd, made_dirs)


def _make_dirs(directory: str) -> list[str]:
  """Makes `directory` and missing parents; returns those made, deepest first."""
  missing = []
  current = os.path.abspath(directory)
  while not os.path.exists(current):
    missing.append(current)
    current = os.path.dirname(current)
  os.makedirs(directory, exist_ok=True)
  return missing


_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


def _lock(fd: int, where: str, path: str) -> None:
  """Flocks `fd` without waiting; warns where flock is not supported.

  Raises:
    ConfigError: If another process holds the flock.
    OSError: If flock fails otherwise.
  """
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EAGAIN, errno.EACCES):
      holder = _read_holder(fd)
      os.close(fd)
      raise _in_use(where, holder) from None
    if e.errno in _NO_FLOCK:
      logging.warning("%s: the file system does not support flock (%s); the "
                      "lock file alone keeps a second run out.", path,
                      _os_reason(e))
      return
    raise


def _is_at(fd: int, path: str) -> bool:
  """Whether `fd` is still the file at `path` (not one deleted meanwhile)."""
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except OSError:
    return False


def _check_holder(holder: Optional[dict[str, Any]], where: str,
                  path: str) -> None:
  """Refuses a holder the lock file names that may be alive; warns otherwise.

  Called holding the flock (or where there is none): a holder on this host
  that held it would have refused us already, unless flock is missing,
  hence the pid check.

  Raises:
    ConfigError: For a live holder, or one on another host of another job.
  """
  if holder is None:
    return
  this_host = socket.gethostname()
  job = os.environ.get("SLURM_JOB_ID")
  if holder and holder.get("host") != this_host:
    if not (job and holder.get("slurm_job_id") == job):
      raise errors.ConfigError(
          f"{where}: {path} says a run on another host holds it "
          f"({_describe(holder)}); if that run has ended, delete {path} "
          "and run again")
  elif holder and _alive(holder.get("pid")) and holder.get("pid") != (
      os.getpid()) and _flock_missing(path):
    raise _in_use(where, holder)
  logging.warning("Taking over %s from a run that ended without releasing "
                  "it (%s).", path, _describe(holder))


def _alive(pid: Any) -> bool:
  """Whether a process `pid` runs on this host."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process.
  return True


def _flock_missing(path: str) -> bool:
  """Whether flock fails on `path`'s file system as unsupported."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  except OSError as e:
    return e.errno in _NO_FLOCK
  finally:
    os.close(fd)


def holder_of(model_dir: str) -> Optional[dict[str, Any]]:
  """Who holds `model_dir`'s lock as its file says, or None if nobody."""
  path = os.path.join(model_dir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    return _read_holder(fd)
  finally:
    os.close(fd)


def _write_holder(fd: int) -> None:
  text = json.dumps({
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%dT%H:%M:%SZ"),
      "command": " ".join(sys.argv)[:500],
      "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
  }) + "\n"
  os.ftruncate(fd, 0)
  os.pwrite(fd, text.encode(), 0)
  os.fsync(fd)


def _read_holder(fd: int) -> Optional[dict[str, Any]]:
  """The holder the lock file names; {} if it names none readably."""
  try:
    text = os.pread(fd, 4096, 0)
  except OSError:
    return {}
  if not text.strip():
    return None
  try:
    holder = json.loads(text.decode("utf-8", errors="replace"))
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _in_use(where: str, holder: Optional[dict[str, Any]]
            ) -> errors.ConfigError:
  """The refusal of a run that finds the directory held by a live one."""
  return errors.ConfigError(
      f"{where}: in use by another run ({_describe(holder)}); wait for it to "
      "end or give another --model_dir")


def _describe(holder: Optional[dict[str, Any]]) -> str:
  if not holder:
    return "its lock file names no holder"
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"started {holder.get('started', '?')}")


def _os_reason(error: OSError) -> str:
  return f"{type(error).__name__}: {error.strerror or error}"
