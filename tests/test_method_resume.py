"""A run of a method with state, stopped and resumed, equals one that is not.

Every stateful weighting and aggregator keeps its state in the checkpoint
(issue: "a resume continues exactly"): 4 steps in one run and 2 + 2 steps
in two runs of `mtl_dist.train` end with the same checkpoint, model and
method state alike. Each case pairs a stateful aggregator with a stateful
weighting; the options make the state matter across the resume (Nash-MTL
reuses its weights of step 2 at step 3; STCH's warm-up ends at step 1).
"""

import os

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist

CASES = [
    ("moco", "famo", {}),
    ("db_mtl", "excess_mtl", {}),
    ("gradvac", "stch", {"stch_warmup_steps": 1}),
    ("nash_mtl", "imtl_l", {"nash_mtl_update_every": 3}),
    ("modo", "dwa", {"dwa_window": 1}),
    ("sdmgrad", "gradnorm", {}),
]


def _config(model_dir, steps: int, aggregator: str, weighting: str,
            options: dict) -> mtl_dist.TrainConfig:
  return mtl_dist.TrainConfig(
      model_dir=str(model_dir), aggregator=aggregator, weighting=weighting,
      tasks=["shape", "x", "y"], train_steps=steps, train_examples=240,
      eval_examples=48, trunk_width=16, steps_per_loop=1, log_every=1,
      eval_every=100, checkpoint_every=2, global_batch_size=24, seed=3,
      **options)


def _checkpoint(model_dir) -> dict[str, np.ndarray]:
  directory = os.path.join(model_dir, "checkpoints")
  reader = tf.train.load_checkpoint(directory)
  return {name: reader.get_tensor(name)
          for name, _ in tf.train.list_variables(directory)
          if not name.startswith(("_CHECKPOINTABLE", "save_counter"))}


@pytest.mark.parametrize("aggregator, weighting, options", CASES,
                         ids=[f"{a}+{w}" for a, w, _ in CASES])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path, aggregator, weighting, options):
  mtl_dist.train(_config(tmp_path / "whole", 4, aggregator, weighting,
                         options))
  mtl_dist.train(_config(tmp_path / "split", 2, aggregator, weighting,
                         options))
  mtl_dist.train(_config(tmp_path / "split", 4, aggregator, weighting,
                         options))  # Resumes at step 2.
  whole = _checkpoint(tmp_path / "whole")
  split = _checkpoint(tmp_path / "split")
  assert sorted(whole) == sorted(split)
  for kind in ("aggregator", "weighting"):
    assert any(name.startswith(kind + "/") for name in whole), kind
  for name, value in whole.items():
    if np.asarray(value).dtype.kind in "SUO":  # Task names, kept as text.
      np.testing.assert_array_equal(split[name], value, err_msg=name)
    else:
      np.testing.assert_allclose(split[name], value, atol=1e-6, rtol=1e-6,
                                 err_msg=name)
