"""The cluster layer: the tf.distribute strategy and where its workers are.

- `strategy`: logical CPU devices and the strategy (one device,
  `MirroredStrategy`, `MultiWorkerMirroredStrategy`);
- `resolver`: the cluster from TF_CONFIG or SLURM;
- `settings`: the cluster section of the configuration, and `gpus`: this
  host's GPUs (both without TensorFlow).
"""
