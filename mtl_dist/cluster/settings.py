"""The cluster section of a run's configuration: devices and workers.

Its defaults are the run's: a `TrainConfig` field left unset (None) takes
the value here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


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

  @classmethod
  def from_settings(cls, **given) -> "ClusterConfig":
    """The section from settings where None means unset (the default)."""
    return cls(**{name: value for name, value in given.items()
                  if value is not None})
