"""Trains every registered weighting and aggregator a few steps on a strategy.

Imported by tests/test_method_distribution.py (1, 2 and 4 replicas in the
test process) and run as a script by each worker of a 2-worker cluster:

  TF_CONFIG=... python tests/method_runs.py OUTPUT.npz

The cases come from the registries, so a new method is covered as soon as
it is registered: every aggregator (with `static` weights), every
aggregator with a Gram-matrix form again with `--rep_grad`, and every
weighting (with `sum`, and also with `pcgrad` when it hooks into the
backward pass: learned weights, task gradients, losses after the update).
Each case's trained weights, step metrics and method state are returned,
keyed `<case>/...`; the chief of a cluster writes them to OUTPUT.npz. With
`keras3=True` the trunk and heads are the same layers written in Keras 3.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base as weightings_base

TASKS = ("shape", "x", "y")
STEPS = 3
# Divisible by 3 sub-batches on each of 4 replicas (MoDo, SDMGrad).
GLOBAL_BATCH = 24
# Settings that make a method act within STEPS steps (by option name), and
# SDMGrad's inner steps at a rate where they converge: at LibMTL's rate 5
# they do not, and its weights follow the rounding of the all-reduce.
FAST_OPTIONS = {"dwa_window": 1, "stch_warmup_steps": 1, "sdmgrad_lr": 0.2}


class Case(NamedTuple):
  """One training run: a method and what it runs with."""

  name: str
  aggregator: str
  weighting: str
  rep_grad: bool


def _hooks_into_backward(weighting: str) -> bool:
  """Whether a weighting changes the backward pass or the step's end."""
  cls = registry.WEIGHTINGS.get(weighting)
  return (cls.trainable is not weightings_base.LossWeighting.trainable
          or cls.needs_task_gradients or cls.needs_losses
          or cls.needs_updated_losses)


def cases() -> list[Case]:
  """Every registered method, as the module docstring lists them."""
  found = [Case(f"aggregator_{name}", name, "static", False)
           for name in registry.AGGREGATORS.names()
           if not name.startswith("test_")]
  found += [Case(f"rep_grad_{name}", name, "static", True)
            for name in registry.gram_forms() if not name.startswith("test_")]
  for name in registry.WEIGHTINGS.names():
    if name.startswith("test_"):
      continue
    found.append(Case(f"weighting_{name}", "sum", name, False))
    if _hooks_into_backward(name):
      found.append(Case(f"weighting_{name}_pcgrad", "pcgrad", name, False))
  return found


def _options(case: Case) -> dict:
  """FAST_OPTIONS of the case's methods, by flag name."""
  options = {}
  for kind, method in ((registry.AGGREGATORS, case.aggregator),
                       (registry.WEIGHTINGS, case.weighting)):
    for option in kind.get(method).options:
      flag = f"{method}_{option.name}"
      if flag in FAST_OPTIONS:
        options[flag] = FAST_OPTIONS[flag]
  return options


def _keras3_trunk():  # The built-in trunk "mlp" of width 8 and depth 1.
  return keras.Sequential([keras.layers.Flatten(),
                           keras.layers.Dense(8, activation="relu")])


def train_case(strategy: tf.distribute.Strategy, case: Case,
               keras3: bool = False) -> dict[str, np.ndarray]:
  """The weights, step metrics and method state after STEPS steps."""
  features, labels = shapes.generate(96, seed=5)
  specs = {task.name: task for task in shapes.TASKS}
  tasks = [specs[name] for name in TASKS]
  with strategy.scope():
    if keras3:
      model = mtl_dist.build_model(
          tasks, features.shape[1:], _keras3_trunk,
          head_fn=lambda task: keras.layers.Dense(task.output_size))
    else:
      model = mtl_dist.build_model(tasks, features.shape[1:], "mlp", 8, 1)
  rng = np.random.default_rng(11)
  model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(w.dtype)
                     for w in model.get_weights()])
  # SGD: Adam's normalisation magnifies float32 round-off of near-zero
  # gradients far beyond 1e-5.
  trainer = mtl_dist.Trainer(
      strategy, model, tasks, mode="joint", global_batch_size=GLOBAL_BATCH,
      optimizer_factory=mtl_dist.make_optimizer_factory("sgd", 0.1),
      aggregator=case.aggregator, weighting=case.weighting,
      rep_grad=case.rep_grad, method_options=_options(case), seed=3)
  source = mtl_dist.source_from_arrays(features, labels, TASKS)
  iterator = iter(mtl_dist.distribute_train(strategy, source, GLOBAL_BATCH,
                                            seed=7))
  initial = [v.numpy() for v in model.trainable_variables]
  result = trainer.train([iterator], STEPS)
  values = {f"{case.name}/model/{i}": v.numpy()
            for i, v in enumerate(model.trainable_variables)}
  # How far the weights moved: > 0 unless the method trained nothing.
  values[f"{case.name}/moved"] = np.array(max(
      np.abs(v.numpy() - w).max()
      for v, w in zip(model.trainable_variables, initial)))
  for name, value in result.step_metrics.items():
    values[f"{case.name}/metric/{name}"] = np.asarray(value)
  for kind, method in (("aggregator", trainer.aggregator),
                       ("weighting", trainer.weighting)):
    for name, value in registry.state_of(method).items():
      values[f"{case.name}/{kind}/{name}"] = value
  return values


def train_all(strategy: tf.distribute.Strategy) -> dict[str, np.ndarray]:
  """`train_case` of every case."""
  values = {}
  for case in cases():
    values.update(train_case(strategy, case))
  return values


def main(output: str) -> None:
  strategy = mtl_dist.create_strategy("multi_worker")
  values = train_all(strategy)
  if strategy.cluster_resolver.task_id == 0:
    np.savez(output, **values)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main(sys.argv[1])
