"""--jit_compile: compiled replica passes train like uncompiled ones."""

import numpy as np
import pytest
import tensorflow as tf
from test_bad_data import _config
from test_bad_data import _data

import mtl_dist
from mtl_dist import data as data_lib


@pytest.mark.parametrize("replicas, mode, options", [
    (1, "joint", {}),
    (2, "joint", {}),
    (1, "alternate", {}),
    (2, "alternate", {}),
    (2, "joint", {"weighting": "uncertainty"}),
    (2, "joint", {"weighting": "dwa", "dwa_window": 2}),
    (2, "joint", {"weighting": "gradnorm"}),
    (2, "joint", {"aggregator": "pcgrad"}),
    (2, "joint", {"aggregator": "cagrad"}),
    (2, "joint", {"aggregator": "mgda", "weighting": "gradnorm"}),
    (2, "joint", {"partial_labels": True}),
])
def test_compiled_training_matches_uncompiled(build_trainer, replicas, mode,
                                              options):
  tasks = ("shape", "x", "y")
  plain, plain_its, _, _ = build_trainer(replicas, mode, tasks, **options)
  initial = plain.model.get_weights()
  jit, jit_its, _, _ = build_trainer(replicas, mode, tasks, jit_compile=True,
                                     initial_weights=initial, **options)
  # Two calls. Joint: the second reuses the first trace. Alternate: 3 steps
  # are a round of the 3 tasks (the round loop), the next 4 a round and a
  # step (the switched loop).
  for num_steps in (3, 4):
    want_losses, want_counts = plain.train(plain_its, num_steps)[:2]
    got_losses, got_counts = jit.train(jit_its, num_steps)[:2]
    np.testing.assert_array_equal(got_counts, want_counts)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-4, atol=1e-6)
  for got, want in zip(jit.model.get_weights(), plain.model.get_weights()):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for got, want in zip(jit.weighting.variables, plain.weighting.variables):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4,
                               atol=1e-5)
  assert any(not np.allclose(w, i) for w, i in zip(
      jit.model.get_weights(), initial)), "training changed nothing"
  assert jit.train_trace_count == (1 if mode == "joint" else 2)


@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_compiled_loop_traces_once(build_trainer, mode):
  trainer, iterators, eval_datasets, groups = build_trainer(
      2, mode, jit_compile=True)
  for num_steps in (3, 5, 1, 7):
    trainer.train(iterators, num_steps)
  trainer.evaluate(eval_datasets, groups)
  trainer.train(iterators, 2)  # Alternate: the first 3 steps used both.
  assert trainer.train_trace_count == (1 if mode == "joint" else 2)
  assert int(trainer.global_step.numpy()) == 18


@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_out_of_range_class_label_fails_under_jit(build_trainer,
                                                  shapes_arrays, mode):
  features, labels = shapes_arrays
  labels = {k: v.copy() for k, v in labels.items()}
  labels["shape"][:] = 7  # Every batch of every replica holds one.
  trainer, iterators, _, _ = build_trainer(2, mode, jit_compile=True,
                                           arrays=(features, labels))
  # The graph error's text escapes the quotes around the task's name.
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"task \W*shape\W*: class labels must be in "
                     r"\[0, 3\)"):
    trainer.train(iterators, 2)


def test_bad_label_stops_a_jit_run_with_data_error(tmp_path, shapes_arrays,
                                                   monkeypatch):
  features, labels = shapes_arrays
  labels = {k: v.copy() for k, v in labels.items()}
  labels["shape"][400] = 7  # Past the first batch the up-front check reads.
  monkeypatch.setattr(data_lib, "load",
                      lambda config: _data(features, labels, streamed=True))
  config = _config(tmp_path / "run")
  config.jit_compile = True
  with pytest.raises(mtl_dist.DataError,
                     match=r"bad data near step \d+: task 'shape': class "
                     r"labels must be in \[0, 3\)"):
    mtl_dist.train(config)


def test_rep_grad_cannot_be_compiled(build_trainer):
  config = mtl_dist.TrainConfig(model_dir="d", aggregator="mgda",
                                rep_grad=True, jit_compile=True)
  with pytest.raises(mtl_dist.ConfigError,
                     match="--jit_compile cannot be combined with --rep_grad"):
    config.validate()
  with pytest.raises(ValueError, match="jit_compile cannot compile rep_grad"):
    build_trainer(2, "joint", aggregator="mgda", rep_grad=True,
                  jit_compile=True)
