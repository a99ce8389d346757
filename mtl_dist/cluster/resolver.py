"""Which cluster this process is a worker of: from TF_CONFIG or a SLURM step.

MultiWorkerMirroredStrategy needs a cluster resolver: the addresses of all
workers, and which of them this process is. Batch systems describe the
cluster in the environment. Kubernetes operators (TFJob) and
`mtl-local-cluster` set TF_CONFIG. SLURM sets SLURM_PROCID and the
SLURM_STEP_* variables in every task that `srun` starts.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import tensorflow as tf

from mtl_dist import errors
from mtl_dist.cluster import gpus
from mtl_dist.cluster import settings

TF_CONFIG, SLURM = settings.TF_CONFIG, settings.SLURM
CLUSTERS = settings.CLUSTERS
DEFAULT_PORT_BASE = 8888
# The GPU ids this host showed before a resolver narrowed
# CUDA_VISIBLE_DEVICES to one task's share (resolving again must not split
# the share again).
_node_gpus: Optional[list[str]] = None
visible_gpu_ids = gpus.visible_gpu_ids
_SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                    "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")


def detect() -> Optional[str]:
  """The kind of cluster the environment names with more than one task.

  Returns:
    "tf_config" when TF_CONFIG lists more than one task, else "slurm" when
    the SLURM job step has more than one task, else None (one process).

  Raises:
    ConfigError: If TF_CONFIG is set but is not a cluster description.
  """
  if os.environ.get("TF_CONFIG"):
    cluster = _read_tf_config()["cluster"]
    if sum(len(addresses) for addresses in cluster.values()) > 1:
      return TF_CONFIG
  tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
  if tasks.isdigit() and int(tasks) > 1:
    return SLURM
  return None


def resolve(
    kind: Optional[str], port_base: Optional[int] = None
) -> tf.distribute.cluster_resolver.ClusterResolver:
  """The cluster resolver for this process.

  Args:
    kind: "tf_config", "slurm", or None for whichever `detect` finds.
    port_base: SLURM: the port of each node's first task; the node's k-th
      task listens on port_base + k (default 8888).

  Returns:
    A resolver with `task_type` and `task_id` set.

  Raises:
    ConfigError: If the environment does not describe the cluster.
  """
  if kind is None:
    kind = detect()
    if kind is None:
      raise errors.ConfigError(
          "--strategy=multi_worker: the environment names no cluster of "
          "several workers (set TF_CONFIG, run each worker with srun, or "
          "start them with mtl-local-cluster)")
  if kind == TF_CONFIG:
    if port_base is not None:
      raise errors.ConfigError(
          "--port_base applies to SLURM clusters, but the cluster comes from "
          "TF_CONFIG, which lists each worker's port")
    spec = _read_tf_config()
    task = spec.get("task")
    if (not isinstance(task, dict) or not isinstance(task.get("type"), str)
        or not isinstance(task.get("index"), int)):
      raise errors.ConfigError(
          "TF_CONFIG: 'task' must name this process's type and index, e.g. "
          f'{{"type": "worker", "index": 0}}, got {json.dumps(task)}')
    addresses = spec["cluster"].get(task["type"], [])
    if not 0 <= task["index"] < len(addresses):
      raise errors.ConfigError(
          f"TF_CONFIG: task {task['type']}:{task['index']} is not in the "
          f"cluster, which has {len(addresses)} {task['type']} task(s)")
    return tf.distribute.cluster_resolver.TFConfigClusterResolver()
  if kind == SLURM:
    for name in _SLURM_VARIABLES:
      if name not in os.environ:
        raise errors.ConfigError(
            f"--cluster=slurm: {name} is not set; start each worker with "
            "srun inside the allocation")
    try:
      resolver = SlurmClusterResolver(
          port_base=DEFAULT_PORT_BASE if port_base is None else port_base)
      resolver.cluster_spec()  # Sets task_type and task_id.
    except (RuntimeError, ValueError) as e:
      raise errors.ConfigError(f"SLURM environment: {e}") from None
    return resolver
  raise errors.ConfigError(
      f"--cluster={kind}: must be one of {', '.join(CLUSTERS)}")


def _read_tf_config() -> dict:
  """TF_CONFIG parsed, with a one-line error for anything malformed."""
  text = os.environ.get("TF_CONFIG", "")
  if not text:
    raise errors.ConfigError(
        "--cluster=tf_config: TF_CONFIG is not set (it must describe the "
        "cluster and this process's task)")
  try:
    spec = json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.ConfigError(f"TF_CONFIG is not JSON ({e}): "
                             f"{text[:200]}") from None
  if not (isinstance(spec, dict) and isinstance(spec.get("cluster"), dict) and
          all(isinstance(v, list) for v in spec["cluster"].values())):
    raise errors.ConfigError(
        "TF_CONFIG: expected {\"cluster\": {\"worker\": [\"host:port\", "
        f"...]}}, \"task\": {{...}}}}, got {text[:200]}")
  return spec


class SlurmClusterResolver(
    tf.distribute.cluster_resolver.SlurmClusterResolver):
  """TensorFlow's SLURM resolver, made to work on nodes with and without GPUs.

  When CUDA_VISIBLE_DEVICES is unset, TensorFlow's resolver runs
  `nvidia-smi` (FileNotFoundError on nodes without it); with zero GPUs per
  node its cluster_spec() fails with "range() arg 3 must not be zero".
  This one counts GPUs from CUDA_VISIBLE_DEVICES or nvidia-smi and takes
  zero when neither exists; gives each task a share of the node's visible
  GPUs by their ids (so an allocation like CUDA_VISIBLE_DEVICES=2,3 is
  respected), or leaves each task its own GPUs when SLURM bound them
  (--gpus-per-task); and lists tasks in SLURM's node order, matching the
  ranks of SLURM's default block distribution (ranks 0..n-1 on the first
  node, and so on).
  """

  def __init__(self, port_base: int = DEFAULT_PORT_BASE,
               gpus_per_node: Optional[int] = None):
    global _node_gpus
    if _node_gpus is None:  # Before any resolver narrowed the variable.
      _node_gpus = visible_gpu_ids()
    visible = _node_gpus
    # --gpus-per-task (or --gpu-bind): SLURM already gave each task its own
    # GPUs in CUDA_VISIBLE_DEVICES; they are all this task's.
    self._bound = "SLURM_GPUS_PER_TASK" in os.environ
    if gpus_per_node is None:
      gpus_per_node = 0 if self._bound else len(visible)
    self._visible_gpus = visible or [str(i) for i in range(gpus_per_node)]
    super().__init__(port_base=port_base, gpus_per_node=gpus_per_node,
                     auto_set_gpu=False)
    if self._bound:
      self._gpus_per_task = len(visible)
    elif self._gpus_per_node and not self._gpus_per_task:
      raise RuntimeError(
          f"{self._gpus_per_node} GPU(s) per node cannot be shared by "
          f"{max(self._task_configuration.values())} tasks per node; start "
          "fewer tasks per node or give each its GPUs with --gpus-per-task")

  def cluster_spec(self) -> tf.train.ClusterSpec:
    """The workers' addresses, host:port_base+k for a node's k-th task.

    Also sets `task_type`/`task_id`, and on GPU nodes CUDA_VISIBLE_DEVICES to
    this task's share of the node's GPUs.

    Returns:
      The cluster spec.
    """
    addresses, gpu_shares = [], []
    for host, num_tasks in self._task_configuration.items():
      for k in range(num_tasks):
        addresses.append(f"{host}:{self._port_base + k}")
        share = self._visible_gpus[k * self._gpus_per_task:
                                   (k + 1) * self._gpus_per_task]
        gpu_shares.append(",".join(share))
    if not 0 <= self._rank < len(addresses):
      raise RuntimeError(f"SLURM_PROCID={self._rank} is not among the "
                         f"{len(addresses)} tasks of the step")
    jobs, first = {}, 0
    for task_type, num_tasks in sorted(self._jobs.items()):
      jobs[task_type] = addresses[first:first + num_tasks]
      if first <= self._rank < first + num_tasks:
        self.task_type, self.task_id = task_type, self._rank - first
      first += num_tasks
    if self._gpus_per_task and not self._bound:
      os.environ["CUDA_VISIBLE_DEVICES"] = gpu_shares[self._rank]
    return tf.train.ClusterSpec(jobs)
