"""Devices and distribution strategies."""

from __future__ import annotations

import tensorflow as tf

from mtl_dist import config as config_lib

_mirrored_strategies_made = 0


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
      raise config_lib.ConfigError(
          f"--num_cpu_devices={num_devices}: TensorFlow was initialised "
          f"with {available} CPU device(s) before the split could happen"
      ) from None


def create_strategy(name: str, num_cpu_devices: int) -> tf.distribute.Strategy:
  """The strategy called `name` over this host's devices.

  Args:
    name: "auto" (MirroredStrategy over all GPUs, or over the logical CPUs
      when there are no GPUs and more than one was asked for; otherwise one
      device), "mirrored" (MirroredStrategy even on one device) or
      "one_device".
    num_cpu_devices: Logical CPU devices to use when there is no GPU.

  Returns:
    The strategy.
  """
  configure_cpu_devices(num_cpu_devices)
  gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  devices = gpus or cpus[:num_cpu_devices]
  if name == "one_device" or (name == "auto" and len(devices) == 1):
    return tf.distribute.OneDeviceStrategy(devices[0])
  return _new_mirrored_strategy(devices)


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
