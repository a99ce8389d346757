"""The state of gradvac, moco and db_mtl inside `tf.function` and
`strategy.run` on 2 replicas: the per-parameter [T, None] variables of moco
and db_mtl take their shape at the first applied step, keep it through a
skipped step, agree on both replicas, equal one device's sequence, and
survive a checkpoint."""

from conftest import make_strategy
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import aggregators
from mtl_dist.methods import registry


def _steps(num_tasks: int = 3, size: int = 7):
  """(jacobian, losses) per step; the first and the third are not finite."""
  rng = np.random.default_rng(0)
  steps = []
  for k in range(5):
    grads = rng.normal(size=(num_tasks, size)).astype(np.float32)
    losses = rng.uniform(0.5, 2.0, size=num_tasks).astype(np.float32)
    if k in (0, 2):
      grads[1, 3] = np.nan
    steps.append((grads, losses))
  return steps


def _runner(strategy, aggregator):
  @tf.function
  def run(jacobian, step, losses):
    def replica_fn():
      return aggregator(jacobian, step, losses)
    return strategy.experimental_local_results(strategy.run(replica_fn))
  return run


@pytest.mark.parametrize("name", ["gradvac", "moco", "db_mtl"])
def test_state_on_two_replicas_equals_one_device(name, tmp_path):
  options = {"beta": 0.5} if name == "gradvac" else {}
  steps = _steps()
  # One device, eagerly, through the API.
  want, states, state = [], [], None
  for k, (grads, losses) in enumerate(steps):
    update, state = mtl_dist.aggregate(name, grads, step=k, seed=2,
                                       state=state, losses=losses, **options)
    want.append(update.numpy())
    states.append(state)
  # The non-finite first step moved nothing.
  fresh = registry.state_of(aggregators.create(name, 3, 2, **options))
  assert fresh.keys() == states[0].keys()
  for key, value in fresh.items():
    np.testing.assert_array_equal(states[0][key], value)

  strategy = make_strategy(2)
  with strategy.scope():
    aggregator = aggregators.create(name, 3, 2, **options)
  run = _runner(strategy, aggregator)
  for k, (grads, losses) in enumerate(steps[:3]):
    per_replica = run(tf.constant(grads), tf.constant(k, tf.int64),
                      tf.constant(losses))
    assert len(per_replica) == 2
    for got in per_replica:
      np.testing.assert_allclose(got, want[k], rtol=1e-5, atol=1e-6)
    for variable in aggregator.variables:
      key = variable.name.split(":")[0]
      replicas = variable.values
      assert len(replicas) == 2
      for value in replicas:
        np.testing.assert_allclose(value.numpy(), states[k][key], rtol=1e-6)
  checkpoint = tf.train.Checkpoint(aggregator=aggregator)
  path = checkpoint.save(str(tmp_path / "ckpt"))

  # A new run (new strategy, new aggregator) restores and goes on.
  strategy = make_strategy(2)
  with strategy.scope():
    resumed = aggregators.create(name, 3, 2, **options)
  tf.train.Checkpoint(aggregator=resumed).restore(path).assert_consumed()
  run = _runner(strategy, resumed)
  for k in (3, 4):
    grads, losses = steps[k]
    for got in run(tf.constant(grads), tf.constant(k, tf.int64),
                   tf.constant(losses)):
      np.testing.assert_allclose(got, want[k], rtol=1e-5, atol=1e-6)
  final = registry.state_of(resumed)
  for key, value in states[-1].items():
    np.testing.assert_allclose(final[key], value, rtol=1e-6)
