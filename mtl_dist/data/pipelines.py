"""Per-task input pipelines under a tf.distribute strategy.

`distribute_train` and `distribute_eval` turn a source into a distributed
dataset with `strategy.distribute_datasets_from_function`: each input
pipeline reads its own shard and batches with the per-replica share of the
global batch.
"""

from __future__ import annotations

from typing import Optional, Union

import tensorflow as tf

from mtl_dist import typecheck
from mtl_dist.data import sources

_MAX_SHUFFLE_BUFFER = 16384
# In-memory sources: examples gathered per call of the pipeline's map. One
# call per batch cost a small model a quarter of its step; a few MB per call
# leaves only the rebatching per batch.
_GATHER_BYTES = 4 << 20


def input_options(
    strategy: tf.distribute.Strategy) -> Optional[tf.distribute.InputOptions]:
  """How input is laid out over the strategy's replicas.

  On CPU devices every replica gets its own input pipeline, read on the host
  (PER_REPLICA without fetching to the device). TensorFlow's default layout,
  one pipeline per worker feeding per-device prefetch iterators, is kept for
  GPUs, where the prefetch hides copies; on CPUs it only adds per-device
  iterators whose tf.data autotuning threads make every iterator deletion
  wait seconds to a minute (the wait doubles as the iterator ages).

  Args:
    strategy: The distribution strategy.

  Returns:
    Options for `distribute_datasets_from_function`, or None for the default.
  """
  devices = getattr(strategy.extended, "worker_devices", ())
  if (isinstance(strategy, tf.distribute.MirroredStrategy) and
      all("CPU" in device.upper() for device in devices)):
    return tf.distribute.InputOptions(
        experimental_replication_mode=(
            tf.distribute.InputReplicationMode.PER_REPLICA),
        experimental_fetch_to_device=False)
  return None


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Each input pipeline shards itself below; no automatic sharding.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  options.deterministic = True
  # Autotuning runs a background thread per iterator that iterator deletion
  # waits for (see `input_options`); parallelism is set explicitly instead.
  options.autotune.enabled = False
  return options


def _replica_batches_per_step(ctx: tf.distribute.InputContext,
                              global_batch_size: int) -> tuple[int, int]:
  """(per-replica batch size, per-replica batches each pipeline yields)."""
  per_replica = ctx.get_per_replica_batch_size(global_batch_size)
  replicas = global_batch_size // per_replica
  if replicas % ctx.num_input_pipelines:
    raise ValueError(f"{replicas} replicas cannot be split evenly over "
                     f"{ctx.num_input_pipelines} input pipelines")
  return per_replica, replicas // ctx.num_input_pipelines


def _global_index_chunks(num_examples: int, seed: int, start_position: int,
                         chunk_size: int) -> tf.data.Dataset:
  """Example indices in training order, from `start_position` on, in chunks.

  Epoch e visits every index once, in the order of a stateless permutation
  seeded by (seed, e): the stream is a pure function of the seed, so every
  input pipeline, replica and worker derives the same one, and a restart can
  begin at any position. Each element holds the next `chunk_size` indices of
  the stream, across epoch boundaries.
  """
  first_epoch, skip = divmod(start_position, num_examples)

  def epoch_indices(epoch: tf.Tensor) -> tf.Tensor:
    permutation = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
    return permutation[tf.where(epoch == first_epoch, skip, 0):]

  return (tf.data.Dataset.counter(first_epoch).map(epoch_indices)
          .rebatch(chunk_size, drop_remainder=True))


def _steps_per_gather(arrays, global_batch_size: int) -> int:
  """Steps whose examples one call of the gather reads: about
  `_GATHER_BYTES`, at most an epoch, at least one step."""
  features, labels = arrays
  example_bytes = sum(a.itemsize * (a.size // max(len(a), 1))
                      for a in [features, *labels.values()])
  step_bytes = max(global_batch_size * example_bytes, 1)
  return max(1, min(_GATHER_BYTES // step_bytes,
                    len(features) // global_batch_size))


def _on_host(strategy: tf.distribute.Strategy) -> bool:
  """Whether the strategy is one replica on this host's CPU."""
  if not isinstance(strategy, tf.distribute.OneDeviceStrategy):
    return False
  device = tf.DeviceSpec.from_string(strategy.extended.worker_devices[0])
  return (device.device_type or "").upper() == "CPU" and device.job in (
      None, "localhost")


@typecheck.checked
def distribute_train(strategy: tf.distribute.Strategy,
                     source: sources.ExampleSource, global_batch_size: int,
                     seed: int, start_step: int = 0,
                     exact_resume: bool = False
                    ) -> Union[tf.distribute.DistributedDataset,
                               tf.data.Dataset]:
  """An endless, shuffled training pipeline for one source.

  In-memory sources (with `arrays`) use an index-based pipeline: step k's
  global batch is the k-th run of `global_batch_size` indices of a seeded
  per-epoch permutation, and each input pipeline gathers only its replicas'
  part of it. Any number of replicas, pipelines or workers therefore consume
  exactly the examples one device would with the same global batch, and a
  run resumed at `start_step` continues the same sequence. Other sources are
  sharded per input pipeline and shuffled with a seeded buffer.

  Args:
    strategy: The distribution strategy.
    source: What to read.
    global_batch_size: Examples per step over all replicas.
    seed: The shuffle seed.
    start_step: The step the pipeline starts at. The index-based pipeline
      continues exactly. A streamed one starts a new order seeded by
      (seed, start_step), not the continuation of the interrupted one,
      unless `exact_resume` is set.
    exact_resume: Streamed sources: rebuild the interrupted pipeline and skip
      the batches it had served (exact, at the cost of reading them again).

  Returns:
    A distributed dataset of per-replica batches; with one replica on the
    host's CPU (OneDeviceStrategy), the tf.data dataset of its batches.
  """

  def indexed_dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    per_replica, batches = _replica_batches_per_step(ctx, global_batch_size)
    own = per_replica * batches  # This pipeline's share of a global batch.
    offset = ctx.input_pipeline_id * own
    steps = _steps_per_gather(source.arrays, global_batch_size)
    features = tf.constant(source.arrays[0])
    labels = {k: tf.constant(v) for k, v in source.arrays[1].items()}

    def gather(chunk: tf.Tensor):
      # This pipeline's part of each of the chunk's global batches, in order.
      ids = tf.reshape(
          tf.reshape(chunk, [steps, global_batch_size])[:, offset:offset + own],
          [-1])
      return (tf.gather(features, ids),
              {k: tf.gather(v, ids) for k, v in labels.items()})

    dataset = _global_index_chunks(source.num_examples, seed,
                                   start_step * global_batch_size,
                                   steps * global_batch_size)
    dataset = dataset.map(gather).rebatch(per_replica, drop_remainder=True)
    return dataset.prefetch(2).with_options(_options())

  # A streamed pipeline cannot seek. It is rebuilt and fast-forwarded
  # (exact_resume), or started in an order seeded by the start step, which at
  # least keeps it from replaying the examples it began with.
  streamed_seed = seed if exact_resume else seed + 1_000_003 * start_step

  def streamed_dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    if source.read is not None:
      dataset = source.read(ctx, streamed_seed, True)
    else:
      dataset = source.make_dataset().shard(ctx.num_input_pipelines,
                                            ctx.input_pipeline_id)
    buffer = source.shuffle_buffer or min(source.num_examples,
                                          _MAX_SHUFFLE_BUFFER)
    dataset = dataset.shuffle(buffer, seed=streamed_seed,
                              reshuffle_each_iteration=True).repeat()
    per_replica, batches = _replica_batches_per_step(ctx, global_batch_size)
    dataset = dataset.batch(per_replica, drop_remainder=True)
    if exact_resume and start_step:  # Before decoding: skipping is cheap.
      dataset = dataset.skip(start_step * batches)
    if source.read is not None and source.decode_batch is not None:
      dataset = dataset.map(source.decode_batch,
                            num_parallel_calls=sources.DECODE_CALLS)
    return dataset.prefetch(2).with_options(_options())

  dataset_fn = (indexed_dataset_fn if source.arrays is not None
                else streamed_dataset_fn)
  if _on_host(strategy):
    # One replica whose device is the host: the batches already are where
    # they are used, and TensorFlow's distributed iterator around them cost
    # a small model a fifth of its step.
    return dataset_fn(tf.distribute.InputContext())
  return strategy.distribute_datasets_from_function(dataset_fn,
                                                    input_options(strategy))


@typecheck.checked
def distribute_eval(strategy: tf.distribute.Strategy,
                    source: sources.ExampleSource, global_batch_size: int,
                    max_batches: int) -> tf.distribute.DistributedDataset:
  """A finite evaluation pipeline: the whole source, or `max_batches` batches.

  The last batches may be partial or missing on some replicas; evaluation
  sums over examples, so that does not bias the result.

  Args:
    strategy: The distribution strategy.
    source: What to read.
    global_batch_size: Examples per step over all replicas.
    max_batches: Global batches to read; 0 reads the whole source.

  Returns:
    A distributed dataset of per-replica batches.
  """

  def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
    if source.read is not None:  # Sharded by the source; take per pipeline.
      dataset = source.read(ctx, 0, False)
      if max_batches:
        dataset = dataset.take(max_batches * global_batch_size //
                               ctx.num_input_pipelines)
      dataset = source.decoded(
          dataset, ctx.get_per_replica_batch_size(global_batch_size))
    else:
      dataset = source.make_dataset()
      if max_batches:
        dataset = dataset.take(max_batches * global_batch_size)
      dataset = dataset.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
      dataset = dataset.batch(
          ctx.get_per_replica_batch_size(global_batch_size))
    return dataset.prefetch(2).with_options(_options())

  return strategy.distribute_datasets_from_function(dataset_fn,
                                                    input_options(strategy))
