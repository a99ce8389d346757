"""--mixed_precision: low-precision compute, float32 state, loss scaling."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.model import precision

TASKS = ("shape", "x", "y")


def _mean_losses(result) -> np.ndarray:
  return result.loss_sums / np.maximum(result.counts, 1)


def _loss_scale_optimizer(initial_scale: float):
  """A factory of LossScaleOptimizers starting at `initial_scale`."""
  return lambda: tf_keras.mixed_precision.LossScaleOptimizer(
      tf_keras.optimizers.SGD(0.1), initial_scale=initial_scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_mixed_precision_trains_with_float32_state(build_trainer, dtype,
                                                   mode):
  trainer, iterators, eval_datasets, groups = build_trainer(
      2, mode, TASKS, optimizer="adam", learning_rate=0.01,
      mixed_precision=dtype)
  model = trainer.model
  assert {layer.compute_dtype for layer in model.trunk.layers} == {dtype}
  outputs = model(tf.zeros([2, 32, 32, 1]))
  assert {output.dtype for output in outputs.values()} == {tf.float32}
  assert trainer.loss_scaling == (dtype == "float16")

  first = _mean_losses(trainer.train(iterators, 6))
  trainer.train(iterators, 42)
  last = _mean_losses(trainer.train(iterators, 6))
  assert (last < first).all(), (first, last)
  assert int(trainer.nonfinite_skipped.numpy()) == 0
  variables = model.variables + [v for optimizer in trainer.optimizers.values()
                                 for v in optimizer.variables]
  assert {v.dtype for v in variables if v.dtype.is_floating} == {tf.float32}
  results = trainer.evaluate(eval_datasets, groups)
  assert all(np.isfinite(value) for value in results.values())


@pytest.mark.parametrize("dtype, atol", [("bfloat16", 2e-2),
                                         ("float16", 2e-3)])
@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_two_replicas_match_one_device_loosely(build_trainer, dtype, atol,
                                               mode):
  # Half-size batches round differently in the low dtype: bfloat16 keeps 8
  # mantissa bits, float16 11. At the fixture's SGD step of 0.1 such
  # rounding grows chaotically for some initial weights (losses 25% apart
  # after 6 steps for 2 of 6 seeds); at 0.03 every seed agrees to 1e-2.
  tf_keras.utils.set_random_seed(0)
  single, single_its, _, _ = build_trainer(1, mode, TASKS,
                                           mixed_precision=dtype,
                                           learning_rate=0.03)
  initial = single.model.get_weights()
  multi, multi_its, _, _ = build_trainer(2, mode, TASKS, mixed_precision=dtype,
                                         learning_rate=0.03,
                                         initial_weights=initial)
  want = _mean_losses(single.train(single_its, 6))
  got = _mean_losses(multi.train(multi_its, 6))
  np.testing.assert_allclose(got, want, rtol=1e-2)
  for got, want in zip(multi.model.get_weights(), single.model.get_weights()):
    np.testing.assert_allclose(got, want, atol=atol)
  assert any(not np.allclose(w, i) for w, i in zip(
      single.model.get_weights(), initial)), "training changed nothing"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("options", [{}, {"aggregator": "mgda",
                                          "weighting": "gradnorm"}])
def test_compiled_mixed_precision_matches_uncompiled_loosely(
    build_trainer, dtype, options):
  plain, plain_its, _, _ = build_trainer(2, "joint", TASKS,
                                         mixed_precision=dtype, **options)
  jit, jit_its, _, _ = build_trainer(
      2, "joint", TASKS, mixed_precision=dtype, jit_compile=True,
      initial_weights=plain.model.get_weights(), **options)
  np.testing.assert_allclose(_mean_losses(jit.train(jit_its, 5)),
                             _mean_losses(plain.train(plain_its, 5)),
                             rtol=1e-2)
  for got, want in zip(jit.model.get_weights(), plain.model.get_weights()):
    np.testing.assert_allclose(got, want, atol=2e-2)


def test_rep_grad_trains_in_float16(build_trainer):
  trainer, iterators, _, _ = build_trainer(
      2, "joint", TASKS, aggregator="cagrad", rep_grad=True,
      mixed_precision="float16")
  before = trainer.model.get_weights()
  result = trainer.train(iterators, 3)
  assert np.isfinite(_mean_losses(result)).all() and not result.skipped.count
  assert any(not np.allclose(w, b) for w, b in zip(
      trainer.model.get_weights(), before))


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_float16_gradient_overflow_is_the_optimizers_to_skip(
    build_trainer, skip_nonfinite):
  # 2**30 times a loss near 1 overflows float16 (max 65504) in the backward
  # pass: the optimizer skips the step and halves the scale; the trainer's
  # own finite check, on the losses, neither skips nor reports it.
  trainer, iterators, _, _ = build_trainer(
      2, "joint", mixed_precision="float16",
      optimizer_factory=_loss_scale_optimizer(2.0**30),
      skip_nonfinite=skip_nonfinite)
  before = trainer.model.get_weights()
  assert trainer.train(iterators, 1).loss_scales == {"loss_scale": 2.0**29}
  assert trainer.loss_scales() == {"loss_scale": 2.0**29}
  for got, want in zip(trainer.model.get_weights(), before):
    np.testing.assert_array_equal(got, want)
  result = trainer.train(iterators, 25)  # Halving until the gradients fit.
  assert result.loss_scales["loss_scale"] < 2.0**20
  assert result.skipped.count == 0
  assert int(trainer.nonfinite_skipped.numpy()) == 0
  assert any(not np.allclose(w, b) for w, b in zip(
      trainer.model.get_weights(), before))


def test_float16_nonfinite_loss_is_still_reported(build_trainer,
                                                  shapes_arrays):
  features, labels = shapes_arrays
  labels = dict(labels, x=np.full_like(labels["x"], np.nan))
  trainer, iterators, _, _ = build_trainer(
      2, "joint", arrays=(features, labels), mixed_precision="float16")
  before = trainer.model.get_weights()
  skipped = trainer.train(iterators, 2).skipped
  assert skipped.count == 2
  assert skipped.nonfinite_losses == ["x"]
  for got, want in zip(trainer.model.get_weights(), before):
    np.testing.assert_array_equal(got, want)


def test_float16_checkpoint_restores_the_loss_scale(build_trainer, tmp_path):
  trainer, iterators, _, _ = build_trainer(
      2, "joint", mixed_precision="float16",
      optimizer_factory=_loss_scale_optimizer(2.0**30))
  trainer.train(iterators, 3)
  optimizer = trainer.optimizers["shape"]
  assert precision.loss_scale(optimizer) == 2.0**27
  path = tf.train.Checkpoint(**trainer.checkpoint_items()).save(
      str(tmp_path / "ckpt"))
  names = [name for name, _ in tf.train.list_variables(path)]
  assert any(name.startswith("optimizer/loss_scale/current_loss_scale")
             for name in names)

  restored, restored_its, _, _ = build_trainer(2, "joint",
                                               mixed_precision="float16")
  assert restored.loss_scales() == {"loss_scale": 2.0**15}  # The default.
  tf.train.Checkpoint(**restored.checkpoint_items()).restore(
      path).assert_consumed()
  assert restored.loss_scales() == {"loss_scale": 2.0**27}
  restored_optimizer = restored.optimizers["shape"]
  assert int(restored_optimizer.dynamic_counter.numpy()) == int(
      optimizer.dynamic_counter.numpy())
  restored.train(restored_its, 1)  # The restored scale overflows again.
  assert restored.loss_scales() == {"loss_scale": 2.0**26}


def test_float16_run_resumes_and_logs_its_loss_scale(tmp_path, caplog):
  def config(steps, **changes):
    values = dict(model_dir=str(tmp_path / "run"), tasks=["shape", "x"],
                  train_examples=512, eval_examples=128, train_steps=steps,
                  steps_per_loop=10, log_every=10, eval_every=20,
                  checkpoint_every=10, trunk_width=16, num_cpu_devices=2,
                  mixed_precision="float16")
    values.update(changes)
    return mtl_dist.TrainConfig(**values)

  with caplog.at_level("WARNING"):
    mtl_dist.train(config(20))
  # On a CPU, once per run: why it is slow, and what to use instead.
  warnings = [record.getMessage() for record in caplog.records
              if "--mixed_precision=float16 on a CPU" in record.getMessage()]
  on_cpu = not tf.config.list_logical_devices("GPU")
  assert len(warnings) == (1 if on_cpu else 0), warnings
  assert not on_cpu or "use --mixed_precision=bfloat16" in warnings[0].lower()
  summary = mtl_dist.train(config(40))
  assert summary["step"] == 40 and summary["nonfinite_skipped"] == 0
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    train = [json.loads(line) for line in f if '"train"' in line]
  assert [r["step"] for r in train] == [10, 20, 30, 40]
  assert all(r["metrics"]["loss_scale"] > 0 for r in train)
  with pytest.raises(mtl_dist.ConfigError, match="--mixed_precision"):
    mtl_dist.train(config(60, mixed_precision="none"))
  assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-40.index")


def test_a_float32_model_built_after_a_mixed_one_is_float32():
  tasks = [shapes.TASKS[0], shapes.TASKS[3]]
  mixed = mtl_dist.build_model(tasks, (32, 32, 1), "conv", 8, 1,
                               mixed_precision="float16")
  plain = mtl_dist.build_model(tasks, (32, 32, 1), "conv", 8, 1)
  assert tf_keras.mixed_precision.global_policy().name == "float32"
  assert precision.computes_in_float16(mixed)
  assert not precision.computes_in_float16(plain)
  layers = [m for m in plain.submodules
            if isinstance(m, tf_keras.layers.Layer)]
  assert {layer.compute_dtype for layer in layers} == {"float32"}
  assert {v.dtype for v in mixed.variables + plain.variables} == {tf.float32}


def test_unknown_mixed_precision_is_refused():
  config = mtl_dist.TrainConfig(model_dir="d", mixed_precision="float8")
  with pytest.raises(mtl_dist.ConfigError, match="--mixed_precision=float8"):
    config.validate()
