"""Trains every architecture a few steps in both modes on one strategy.

Imported by tests/test_architectures.py (2 mirrored replicas in the test
process) and run as a script by each worker of a 2-worker cluster:

  TF_CONFIG=... python tests/architecture_runs.py OUTPUT.npz

The chief writes every trained weight to OUTPUT.npz, keyed
`<architecture>/<mode>/<index>`; the test compares the two.

`keras3_functions` makes every piece of the built-in models in Keras 3, so
the same runs with them show Keras 3 pieces train like tf_keras ones.
"""

import os
import sys

import keras
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


def keras3_functions(architecture: str) -> architectures.ModelFunctions:
  """Keras 3 pieces equal to the built-in ones of train_all's models."""

  def mlp():  # hps.build_trunk("mlp", 8, 1)
    return keras.Sequential([keras.layers.Flatten(),
                             keras.layers.Dense(8, activation="relu")])

  def gate(num_experts):  # experts.default_gate
    return keras.Sequential([keras.layers.Flatten(dtype="float32"),
                             keras.layers.Dense(num_experts,
                                                dtype="float32")])

  pieces = {"head_fn": lambda task: keras.layers.Dense(task.output_size)}
  if architecture in architectures.USED_BY["trunk_fn"]:
    pieces["trunk_fn"] = mlp
  if architecture in architectures.USED_BY["expert_fn"]:
    pieces["expert_fn"] = mlp
  if architecture in architectures.USED_BY["gate_fn"]:
    pieces["gate_fn"] = gate
  if architecture in architectures.USED_BY["column_fn"]:
    pieces["column_fn"] = lambda: [mlp()]  # One block, as built in.
  return architectures.ModelFunctions(**pieces)


def train_all(strategy: tf.distribute.Strategy, keras3: bool = False
              ) -> dict[str, np.ndarray]:
  """Every architecture's weights after STEPS steps in each mode.

  Args:
    strategy: Where to train.
    keras3: Make every piece with `keras3_functions` instead of built in.
  """
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
            functions=(keras3_functions(architecture) if keras3 else
                       architectures.ModelFunctions()),
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
