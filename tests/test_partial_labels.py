"""Joint mode with partial labels: missing labels add nothing, means are global."""

import numpy as np
import tensorflow as tf
import tf_keras

import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist.data import shapes
from mtl_dist.steps import losses as steps

SHAPE, X = shapes.TASKS[0], shapes.TASKS[3]


def _model():
  tf_keras.utils.set_random_seed(0)
  return mtl_dist.build_model([SHAPE, X], (32, 32, 1), "mlp", 8, 1)


def _head_gradients(model, features, labels, global_batch_size=None):
  with tf.GradientTape() as tape:
    outputs = model(features, training=True)
    total, per_task = steps.task_losses(
        [SHAPE, X], labels, outputs,
        global_batch_size or len(features), partial_labels=True)
  variables = (model.heads["shape"].trainable_variables +
               model.heads["x"].trainable_variables)
  return per_task, tape.gradient(total, variables)


def test_missing_labels_add_no_gradient(shapes_arrays):
  features, labels = shapes_arrays
  features = features[:8]
  shape_labels = labels["shape"][:8].copy()
  x_labels = labels["x"][:8].copy()
  shape_labels[1] = -1  # Example 1 lacks its class ...
  x_labels[0] = np.nan  # ... example 0 its x, example 2 by an explicit mask.
  x_mask = np.ones(8, np.float32)
  x_mask[2] = 0.0
  model = _model()
  per_task, grads = _head_gradients(
      model, features, {"shape": shape_labels, "x": x_labels, "x_mask": x_mask})

  keep_shape = [i for i in range(8) if i != 1]
  keep_x = [i for i in range(8) if i not in (0, 2)]
  want_shape, grads_shape = _head_gradients(
      model, features[keep_shape],
      {"shape": shape_labels[keep_shape], "x": x_labels[keep_shape] * 0})
  want_x, grads_x = _head_gradients(
      model, features[keep_x],
      {"shape": np.full(len(keep_x), -1, np.int32), "x": x_labels[keep_x]})

  assert all(np.isfinite(g.numpy()).all() for g in grads)
  np.testing.assert_allclose(per_task[0], want_shape[0], rtol=1e-6)
  np.testing.assert_allclose(per_task[1], want_x[1], rtol=1e-6)
  for got, want in zip(grads[:2], grads_shape[:2]):  # The shape head.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for got, want in zip(grads[2:], grads_x[2:]):  # The x head.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_task_without_any_label_has_zero_loss_and_gradient(shapes_arrays):
  features, labels = shapes_arrays
  x_missing = np.full((6, 1), np.nan, np.float32)
  per_task, grads = _head_gradients(
      _model(), features[:6], {"shape": labels["shape"][:6], "x": x_missing})
  assert per_task.numpy()[1] == 0.0
  assert per_task.numpy()[0] > 0.0
  for gradient in grads[2:]:
    np.testing.assert_array_equal(gradient.numpy(), 0.0)


def test_replicas_agree_with_partial_labels(build_trainer, shapes_arrays):
  features, labels = shapes_arrays
  thinned = shapes.drop_labels(labels, {"shape": 0.4, "x": 0.25},
                               num_examples=len(features), seed=1)
  assert np.isnan(thinned["x"]).mean() > 0.6
  arrays = (features, thinned)
  single, single_its, _, _ = build_trainer(1, "joint", arrays=arrays,
                                           partial_labels=True)
  multi, multi_its, multi_eval, groups = build_trainer(
      4, "joint", arrays=arrays, partial_labels=True,
      initial_weights=single.model.get_weights())
  for _ in range(2):
    single_losses = single.train(single_its, 4).loss_sums
    multi_losses = multi.train(multi_its, 4).loss_sums
  assert np.isfinite(single_losses).all()
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  for got, want in zip(multi.model.get_weights(), single.model.get_weights()):
    np.testing.assert_allclose(got, want, atol=1e-5)
  results = multi.evaluate(multi_eval, groups)
  assert all(np.isfinite(v) for v in results.values())


def test_drop_labels_thins_only_the_training_part():
  _, labels = shapes.generate(4000, seed=0)
  thinned = shapes.drop_labels(labels, {"shape": 0.3, "scale": 0.5},
                               num_examples=3000, seed=0)
  assert abs((thinned["shape"][:3000] >= 0).mean() - 0.3) < 0.03
  assert abs(np.isfinite(thinned["scale"][:3000]).mean() - 0.5) < 0.03
  assert (thinned["shape"][3000:] >= 0).all()
  assert np.isfinite(thinned["scale"][3000:]).all()
  np.testing.assert_array_equal(thinned["x"], labels["x"])
  assert (labels["shape"] >= 0).all(), "the input was modified"


def test_label_fraction_run_loads_partial_data():
  config = mtl_dist.TrainConfig(model_dir="unused", tasks=["shape", "x"],
                                label_fraction={"x": 0.5},
                                train_examples=1000, eval_examples=200)
  config.validate()
  data = data_lib.load(config.data_config())
  assert data.partial_labels
  x_train = data.train[0].arrays[1]["x"]
  assert 0.4 < np.isfinite(x_train).mean() < 0.6
  assert np.isfinite(data.eval[0].arrays[1]["x"]).all()
