"""The cluster section of a run's configuration: devices and workers.

Its defaults are the run's: a `TrainConfig` field left unset (None) takes
the value here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from mtl_dist import errors

# Where a multi-worker cluster is described (`resolver` reads each).
TF_CONFIG, SLURM = "tf_config", "slurm"
CLUSTERS = (TF_CONFIG, SLURM)
STRATEGIES = ("auto", "mirrored", "one_device", "multi_worker")
COLLECTIVES = ("auto", "ring", "nccl")
# Flags that configure MultiWorkerMirroredStrategy and mean nothing without it.
MULTI_WORKER_FLAGS = ("cluster", "collective", "collective_timeout",
                      "cluster_start_timeout", "port_base")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Where a run's replicas are and how they talk.

  Attributes:
    strategy: "auto", "mirrored", "one_device" or "multi_worker".
    num_cpu_devices: Logical CPU devices (replicas without GPUs).
    cluster: Multi-worker: where the cluster is described, "tf_config" or
      "slurm" (None: whichever the environment sets).
    collective: Multi-worker: "auto" (NCCL on GPUs, RING on CPUs), "ring"
      or "nccl".
    collective_timeout: Multi-worker: seconds a collective waits for every
      worker (None: no limit; dead workers are found by heartbeats).
    cluster_start_timeout: Multi-worker: seconds to wait at start for every
      worker to join.
    port_base: SLURM: port of each node's first task (None: the resolver's
      default).
  """

  strategy: str = "auto"
  num_cpu_devices: int = 1
  cluster: Optional[str] = None
  collective: str = "auto"
  collective_timeout: Optional[float] = None
  cluster_start_timeout: float = 900.0
  port_base: Optional[int] = None



def refuse_multi_worker_flags(given: Mapping[str, Any]) -> None:
  """Refuses multi-worker flags for a run that turned out single-process.

  Args:
    given: TrainConfig's fields by name, None where unset.

  Raises:
    ConfigError: Naming the first such flag.
  """
  for name in MULTI_WORKER_FLAGS:
    if given[name] is not None:
      raise errors.ConfigError(
          f"--{name} applies to multi-worker runs, but --strategy="
          f"{given['strategy']} runs in one process (no cluster in TF_CONFIG "
          "or SLURM, or --strategy=mirrored/one_device)")


def validate_flags(given: Mapping[str, Any]) -> None:
  """Checks the multi-worker flags' values and that they can apply.

  Args:
    given: TrainConfig's fields by name, None where unset.

  Raises:
    ConfigError: Naming the first flag that does not apply or fit.
  """
  if given["strategy"] in ("mirrored", "one_device"):
    refuse_multi_worker_flags(given)
  if given["cluster"] is not None:
    errors.check_choice("cluster", given["cluster"], CLUSTERS)
  if given["collective"] is not None:
    errors.check_choice("collective", given["collective"], COLLECTIVES)
  for name in ("collective_timeout", "cluster_start_timeout"):
    value = given[name]
    if value is not None and not value > 0:
      raise errors.ConfigError(
          f"--{name}={value}: must be positive (seconds)")
  if given["port_base"] is not None:
    if not 1 <= given["port_base"] <= 65535 - 64:
      raise errors.ConfigError(
          f"--port_base={given['port_base']}: must be a port "
          "number (1 to 65471)")
    if given["cluster"] == "tf_config":
      raise errors.ConfigError(
          "--port_base applies to --cluster=slurm (TF_CONFIG "
          "lists each worker's port), but --cluster=tf_config "
          "is set")
