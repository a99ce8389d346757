"""RLW (`--weighting=rlw`): weights softmax(z), z ~ N(0, I), drawn from
(seed, step); checked against a NumPy reference of the paper's update on 1,
2 and 4 replicas, and for its distribution."""

from conftest import whole_batch_task_gradients
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods.weightings import rlw


def reference_weights(num_tasks: int, seed: int, step: int) -> np.ndarray:
  """Lin et al. 2022, Eq. 4: lambda = softmax(z) (LibMTL's RLW: softmax of
  torch.randn). z is the run's draw for (seed, step); softmax in NumPy."""
  z = tf.random.stateless_normal([num_tasks], seed=[seed, step]).numpy()
  z = z.astype(np.float64)
  return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


def test_weights_are_a_softmax_of_the_step_draw():
  for step in (0, 1, 17):
    got = mtl_dist.loss_weights("rlw", [1.0, 2.0, 3.0], step=step, seed=4)
    np.testing.assert_allclose(got, reference_weights(3, 4, step), rtol=1e-6)
  # Another step or seed draws other weights.
  first = mtl_dist.loss_weights("rlw", [1.0, 1.0], step=0, seed=4).numpy()
  assert not np.allclose(first, mtl_dist.loss_weights(
      "rlw", [1.0, 1.0], step=1, seed=4).numpy())
  assert not np.allclose(first, mtl_dist.loss_weights(
      "rlw", [1.0, 1.0], step=0, seed=5).numpy())


def test_weight_distribution():
  draws = np.stack([rlw.rlw_weights(3, tf.constant([9, s], tf.int64)).numpy()
                    for s in range(3000)])
  assert (draws > 0).all()
  np.testing.assert_allclose(draws.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(draws.mean(axis=0), 1 / 3, atol=0.02)
  # log(w_0 / w_1) = z_0 - z_1 ~ N(0, 2).
  differences = np.log(draws[:, 0] / draws[:, 1])
  assert abs(differences.mean()) < 0.1
  assert abs(differences.var() - 2.0) < 0.2


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_training_steps_are_the_papers_update_on_every_replica_count(
    build_trainer, shapes_arrays, replicas):
  features, labels = shapes_arrays
  features = features[:64]  # One global batch: each step sees all of it.
  labels = {k: v[:64] for k, v in labels.items()}
  trainer, iterators, _, _ = build_trainer(
      replicas, "joint", ("shape", "x", "y"), weighting="rlw",
      optimizer="sgd", learning_rate=0.1, global_batch_size=64,
      arrays=(features, labels))
  for step in range(3):
    weights = reference_weights(3, 0, step)  # build_trainer's seed is 0.
    _, gradients = whole_batch_task_gradients(
        trainer, features, labels, trainer.model.trainable_variables)
    want = [v.numpy() - 0.1 * sum(w * g[i] for w, g in zip(weights, gradients))
            for i, v in enumerate(trainer.model.trainable_variables)]
    result = trainer.train(iterators, 1)
    for variable, expected in zip(trainer.model.trainable_variables, want):
      np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4,
                                 atol=1e-6)
    logged = [result.step_metrics[f"{t}/weight"] for t in ("shape", "x", "y")]
    np.testing.assert_allclose(logged, weights, rtol=1e-5)


def test_api_run_and_resume_draw_the_same_weights(tmp_path):
  def config(model_dir, steps):
    return mtl_dist.TrainConfig(
        model_dir=str(model_dir), weighting="rlw", tasks=["shape", "x"],
        train_steps=steps, train_examples=256, eval_examples=128,
        trunk_width=16, steps_per_loop=1, log_every=1, eval_every=100,
        checkpoint_every=2, global_batch_size=32, seed=3)

  def logged_weights(model_dir):
    import json  # pylint: disable=g-import-not-at-top
    with open(model_dir / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
    return {r["step"]: (r["metrics"]["shape/weight"], r["metrics"]["x/weight"])
            for r in records if r["split"] == "train"}

  mtl_dist.train(config(tmp_path / "whole", 4))
  mtl_dist.train(config(tmp_path / "split", 2))
  mtl_dist.train(config(tmp_path / "split", 4))  # Resumes at step 2.
  whole, split = logged_weights(tmp_path / "whole"), logged_weights(
      tmp_path / "split")
  assert sorted(whole) == sorted(split) == [1, 2, 3, 4]
  for step in whole:  # Step s (1-based) trained with the draw of s - 1.
    np.testing.assert_allclose(whole[step], split[step], rtol=1e-6)
    np.testing.assert_allclose(whole[step], reference_weights(2, 3, step - 1),
                               rtol=1e-5)
