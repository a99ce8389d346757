"""Devices and distribution strategies."""

from __future__ import annotations

from typing import Optional

from absl import logging
import tensorflow as tf

from mtl_dist import errors
from mtl_dist import typecheck
from mtl_dist.cluster import resolver as cluster_lib
from mtl_dist.cluster import settings as cluster_settings

_mirrored_strategies_made = 0


@typecheck.checked
def configure_cpu_devices(num_devices: int) -> None:
  """Splits the host CPU into `num_devices` logical devices.

  Must run before TensorFlow initialises its runtime (the first op). An
  existing split into at least `num_devices` logical CPUs (made by a test
  harness or a notebook earlier) is kept, and the first `num_devices` of
  them are used.

  Args:
    num_devices: How many logical CPU devices to make.

  Raises:
    ConfigError: If the runtime is already up with fewer logical CPUs.
  """
  if num_devices < 1:
    raise errors.ConfigError(
        f"--num_cpu_devices={num_devices}: must be a positive integer")
  cpu = tf.config.list_physical_devices("CPU")[0]
  existing = tf.config.get_logical_device_configuration(cpu)
  if existing and len(existing) >= num_devices:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
  except RuntimeError:  # The runtime is initialised: keep its devices.
    available = len(tf.config.list_logical_devices("CPU"))
    if available < num_devices:
      raise errors.ConfigError(
          f"--num_cpu_devices={num_devices}: TensorFlow was initialised "
          f"with {available} CPU device(s) before the split could happen "
          "(from Python, call mtl_dist.configure_cpu_devices first, before "
          "creating any tensor or dataset)") from None


@typecheck.checked
def create_strategy(name: str, num_cpu_devices: int = 1, *,
                    cluster: Optional[str] = None, collective: str = "auto",
                    collective_timeout: Optional[float] = None,
                    port_base: Optional[int] = None) -> tf.distribute.Strategy:
  """The strategy called `name` over this host's or the cluster's devices.

  Args:
    name: "auto" (MultiWorkerMirroredStrategy when `cluster` is given or
      TF_CONFIG or SLURM names several workers; else MirroredStrategy over
      all GPUs, or over the logical CPUs when there are no GPUs and more
      than one was asked for; else one device), "multi_worker", "mirrored" (MirroredStrategy even on
      one device) or "one_device".
    num_cpu_devices: Logical CPU devices to use when there is no GPU.
    cluster: Multi-worker: "tf_config" or "slurm"; None takes the one the
      environment sets.
    collective: Multi-worker: "ring", "nccl", or "auto" (NCCL on GPUs, RING
      on CPUs).
    collective_timeout: Multi-worker: seconds after which a collective that
      some worker does not join fails; None waits forever.
    port_base: Multi-worker on SLURM: port of each node's first task.

  Returns:
    The strategy.

  Raises:
    ConfigError: If the cluster or the devices cannot serve the request.
  """
  errors.check_choice("strategy", name, cluster_settings.STRATEGIES)
  if uses_multi_worker(name, cluster):
    return _multi_worker_strategy(cluster, collective, collective_timeout,
                                  port_base, num_cpu_devices)
  configure_cpu_devices(num_cpu_devices)
  gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  devices = gpus or cpus[:num_cpu_devices]
  if name == "one_device" or (name == "auto" and len(devices) == 1):
    return tf.distribute.OneDeviceStrategy(devices[0])
  return _new_mirrored_strategy(devices)


def _multi_worker_strategy(
    cluster: Optional[str], collective: str,
    collective_timeout: Optional[float], port_base: Optional[int],
    num_cpu_devices: int) -> tf.distribute.Strategy:
  """MultiWorkerMirroredStrategy over the cluster the environment names."""
  resolver = cluster_lib.resolve(cluster, port_base)
  if isinstance(resolver, cluster_lib.SlurmClusterResolver):
    # MWMS places replicas by the resolver's count, which may be 0 on a
    # node with fewer GPUs than tasks.
    num_gpus = resolver.num_accelerators().get("GPU", 0)
  else:
    num_gpus = len(tf.config.list_physical_devices("GPU"))
  if num_cpu_devices > 1 and not num_gpus:
    raise errors.ConfigError(
        f"--num_cpu_devices={num_cpu_devices}: MultiWorkerMirroredStrategy "
        "runs one replica per worker on CPUs (start more workers instead)")
  implementations = tf.distribute.experimental.CommunicationImplementation
  if collective == "auto":
    implementation = (implementations.NCCL if num_gpus
                      else implementations.RING)
  elif collective == "nccl":
    if not num_gpus:
      raise errors.ConfigError(
          "--collective=nccl: NCCL needs GPUs, and this worker has none "
          "(use --collective=ring)")
    implementation = implementations.NCCL
  else:
    implementation = implementations.RING
  spec = resolver.cluster_spec()
  logging.info("Worker %s:%d of %d: waiting for all workers to join.",
               resolver.task_type, resolver.task_id,
               sum(spec.num_tasks(job) for job in spec.jobs))
  options = tf.distribute.experimental.CommunicationOptions(
      implementation=implementation, timeout_seconds=collective_timeout)
  return tf.distribute.MultiWorkerMirroredStrategy(
      cluster_resolver=resolver, communication_options=options)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's files (the chief, or the only one).

  Args:
    strategy: The run's strategy.

  Returns:
    True on the chief worker and in single-process runs.
  """
  return strategy.extended.should_checkpoint


def uses_multi_worker(name: str, cluster: Optional[str]) -> bool:
  """Whether `create_strategy(name, cluster=cluster)` spans several workers."""
  return name == "multi_worker" or (
      name == "auto" and (cluster is not None or
                          cluster_lib.detect() is not None))


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether the strategy spans several worker processes."""
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_index(strategy: tf.distribute.Strategy) -> int:
  """This process's task index in the cluster (0 in single-process runs)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  task_id = getattr(resolver, "task_id", None) if resolver else None
  return int(task_id or 0)


def _new_mirrored_strategy(devices: list[str]) -> tf.distribute.Strategy:
  """A MirroredStrategy whose collectives cannot collide with earlier ones.

  Every MirroredStrategy numbers its collective groups from 1, and the runtime
  caches a collective's parameters by (group, instance) key: a second
  strategy in the same process (tests, notebooks, `train` called twice) fails
  with "Shape mismatch in the collective instance 100". TensorFlow's own test
  combinations move the key base between strategies; so does this.
  """
  global _mirrored_strategies_made
  if _mirrored_strategies_made:
    tf.distribute.MirroredStrategy._collective_key_base += 100000  # pylint: disable=protected-access
  _mirrored_strategies_made += 1
  return tf.distribute.MirroredStrategy(devices)
