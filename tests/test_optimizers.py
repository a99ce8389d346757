"""FusedAdam: tf_keras's Adam in one kernel, same numbers and checkpoints."""

from conftest import make_strategy
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import mtl_dist


def _train(optimizer_class, replicas, steps=5):
  """Applies the same gradient sequence; returns variables and slots."""
  strategy = make_strategy(replicas)
  rng = np.random.default_rng(0)
  initial = [rng.normal(size=(4, 3)).astype(np.float32),
             rng.normal(size=(3,)).astype(np.float32)]
  gradients = [[rng.normal(size=v.shape).astype(np.float32) for v in initial]
               for _ in range(steps)]
  with strategy.scope():
    variables = [tf.Variable(v) for v in initial]
    optimizer = optimizer_class(learning_rate=0.1)
    optimizer.build(variables)

  @tf.function
  def apply(step_gradients):
    def replica():
      # Every replica applies the same (already reduced) gradients.
      optimizer.apply_gradients(
          zip(step_gradients, variables),
          skip_gradients_aggregation=True)
    strategy.run(replica)

  for step_gradients in gradients:
    apply(step_gradients)
  return ([v.numpy() for v in variables],
          [s.numpy() for s in optimizer.variables], optimizer, variables)


@pytest.mark.parametrize("replicas", [1, 2])
def test_fused_adam_matches_tf_keras_adam(replicas):
  fused, fused_slots, optimizer, _ = _train(mtl_dist.FusedAdam, replicas)
  reference, reference_slots, _, _ = _train(tf_keras.optimizers.Adam, replicas)
  for got, want in zip(fused + fused_slots, reference + reference_slots):
    # Float32 round-off of a different operation order (values ~1).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert int(optimizer.iterations.numpy()) == 5


def test_fused_adam_reads_a_tf_keras_adam_checkpoint(tmp_path):
  _, reference_slots, reference, variables = _train(tf_keras.optimizers.Adam,
                                                    1)
  path = tf.train.Checkpoint(optimizer=reference,
                             variables=variables).save(str(tmp_path / "ckpt"))
  restored_variables = [tf.Variable(tf.zeros_like(v)) for v in variables]
  fused = mtl_dist.FusedAdam(learning_rate=0.1)
  fused.build(restored_variables)
  tf.train.Checkpoint(optimizer=fused, variables=restored_variables).restore(
      path).assert_consumed()
  for got, want in zip(fused.variables, reference_slots):
    np.testing.assert_array_equal(got.numpy(), want)


def test_the_launcher_optimizer_adam_is_fused():
  optimizer = mtl_dist.make_optimizer_factory("adam", 0.01)()
  assert isinstance(optimizer, mtl_dist.FusedAdam)
  assert isinstance(optimizer, tf_keras.optimizers.Adam)
  with pytest.raises(mtl_dist.ConfigError,
                     match="--optimizer=lamb: must be one of adam, sgd"):
    mtl_dist.make_optimizer_factory("lamb", 0.01)


def test_a_fused_adam_checkpoint_restores_into_tf_keras_adam(tmp_path):
  """FusedAdam adds nothing to the checkpoint (its scalar cache is untracked)."""
  _, fused_slots, fused, variables = _train(mtl_dist.FusedAdam, 1)
  _, _, trained_reference, _ = _train(tf_keras.optimizers.Adam, 1)
  assert (set(fused._trackable_children()) ==  # pylint: disable=protected-access
          set(trained_reference._trackable_children()))  # pylint: disable=protected-access
  path = tf.train.Checkpoint(optimizer=fused,
                             variables=variables).save(str(tmp_path / "ckpt"))
  restored_variables = [tf.Variable(tf.zeros_like(v)) for v in variables]
  reference = tf_keras.optimizers.Adam(learning_rate=0.1)
  reference.build(restored_variables)
  tf.train.Checkpoint(optimizer=reference,
                      variables=restored_variables).restore(
                          path).assert_consumed()
  for got, want in zip(reference.variables, fused_slots):
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("replicas", [1, 2])
def test_fused_adam_takes_the_beta_powers_once_per_device(replicas):
  """Per apply call: two Pow ops per replica device, whatever the variables."""
  strategy = make_strategy(replicas)
  with strategy.scope():
    variables = [tf.Variable(tf.ones([3, 2])) for _ in range(6)]
    # tf_keras compiles each variable's update on its own when a GPU is
    # present (jit_compile's default); nothing is shared then.
    optimizer = mtl_dist.FusedAdam(learning_rate=0.1, jit_compile=False)
    optimizer.build(variables)

  @tf.function
  def apply():
    def replica():
      optimizer.apply_gradients(
          [(tf.ones([3, 2]), v) for v in variables],
          skip_gradients_aggregation=True)
    strategy.run(replica)

  graph = apply.get_concrete_function().graph
  pows = [op for op in graph.get_operations() if op.type == "Pow"]
  updates = [op for op in graph.get_operations()
             if op.type == "ResourceApplyAdam"]
  assert len(updates) == 6 * replicas
  assert len(pows) == 2 * replicas
  assert len({op.device for op in pows}) == replicas
  apply()  # The shared scalars run on every device.
  for copy in strategy.experimental_local_results(variables[5]):
    np.testing.assert_allclose(copy.numpy(), 1.0 - 0.1, rtol=1e-5)
