"""Trains every architecture a few steps in both modes on one strategy.

Imported by tests/test_architectures.py (2 mirrored replicas in the test
process) and run as a script by each worker of a 2-worker cluster:

  TF_CONFIG=... python tests/architecture_runs.py OUTPUT.npz

The chief writes every trained weight to OUTPUT.npz, keyed
`<architecture>/<mode>/<index>`; the test compares the two.
"""

import os
import sys

import numpy as np
import tensorflow as tf

import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.model import architectures
from mtl_dist.model import settings as model_settings

TASKS = ("shape", "x")
OPTIONS = {"mmoe": {"num_experts": 3}, "ple": {"num_shared_experts": 1},
           "dselect_k": {"num_experts": 3}}
STEPS = 2
GLOBAL_BATCH = 16


def train_all(strategy: tf.distribute.Strategy) -> dict[str, np.ndarray]:
  """Every architecture's weights after STEPS steps in each mode."""
  features, labels = shapes.generate(128, seed=5)
  specs = {task.name: task for task in shapes.TASKS}
  tasks = [specs[name] for name in TASKS]
  weights = {}
  for architecture in model_settings.ARCHITECTURES:
    for mode in ("joint", "alternate"):
      with strategy.scope():
        model = architectures.build(
            tasks, features.shape[1:], model_settings.ArchitectureConfig(
                architecture=architecture,
                **OPTIONS.get(architecture, {})),
            trunk="mlp", trunk_width=8, trunk_depth=1)
      rng = np.random.default_rng(11)
      model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(w.dtype)
                         for w in model.get_weights()])
      trainer = mtl_dist.Trainer(
          strategy, model, tasks, mode=mode, global_batch_size=GLOBAL_BATCH,
          optimizer_factory=mtl_dist.make_optimizer_factory("adam", 0.01))
      if mode == "joint":
        sources = [mtl_dist.source_from_arrays(features, labels, TASKS)]
      else:
        sources = [mtl_dist.source_from_arrays(features, labels, [name])
                   for name in TASKS]
      iterators = [iter(mtl_dist.distribute_train(strategy, source,
                                                  GLOBAL_BATCH, seed=7 + i))
                   for i, source in enumerate(sources)]
      trainer.train(iterators, STEPS)
      for i, variable in enumerate(model.trainable_variables):
        weights[f"{architecture}/{mode}/{i}"] = variable.numpy()
  return weights


def main(output: str) -> None:
  strategy = mtl_dist.create_strategy("multi_worker")
  weights = train_all(strategy)
  if strategy.cluster_resolver.task_id == 0:
    np.savez(output, **weights)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main(sys.argv[1])
