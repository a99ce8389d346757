"""The aggregator contract for a method with state, as a function.

`mtl_dist.aggregate` takes and returns a stateful method's state, as the
step keeps it in its checkpointed variables. Checked with an aggregator
defined here: the sum of running means of each task's gradient.
"""

import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import catalog
from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base


class _RunningMean(base.Aggregator):
  """sum_i m_i, m_i <- 0.5 m_i + 0.5 g_i, m starting at 0."""

  name = "test_running_mean"

  def __init__(self, num_tasks: int, seed: int = 0):
    super().__init__(num_tasks, seed)
    self.means = tf.Variable(tf.zeros([num_tasks, 0]), name="means",
                             shape=tf.TensorShape([num_tasks, None]),
                             trainable=False)

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses=None) -> tf.Tensor:
    del step, losses
    previous = tf.cond(tf.size(self.means) > 0, lambda: self.means.value(),
                       lambda: tf.zeros_like(jacobian))
    self.means.assign(0.5 * previous + 0.5 * jacobian)
    return tf.reduce_sum(self.means, axis=0)


if _RunningMean.name not in registry.AGGREGATORS.names():
  registry.AGGREGATORS.register(
      _RunningMean, catalog.Method(_RunningMean.name, "a test aggregator"))


def test_state_is_taken_and_returned():
  first = np.array([[2.0, 0.0], [0.0, 4.0]], np.float32)
  second = np.array([[4.0, 0.0], [0.0, 0.0]], np.float32)
  update, state = mtl_dist.aggregate(_RunningMean.name, first)
  np.testing.assert_allclose(update, [1.0, 2.0])
  np.testing.assert_allclose(state["means"], 0.5 * first)
  update, state = mtl_dist.aggregate(_RunningMean.name, second, state=state)
  np.testing.assert_allclose(update, [2.5, 1.0])  # 0.25 g1 + 0.5 g2, summed.
  with pytest.raises(ValueError, match="no state 'velocity'"):
    mtl_dist.aggregate(_RunningMean.name, first, state={"velocity": first})


def test_a_stateless_method_returns_the_update_alone():
  got = mtl_dist.aggregate("sum", np.ones((2, 3), np.float32))
  assert isinstance(got, tf.Tensor)
  np.testing.assert_allclose(got, [2.0, 2.0, 2.0])


class _CountingNan(base.Aggregator):
  """Counts its calls in its state and returns a NaN update."""

  name = "test_counting_nan"

  def __init__(self, num_tasks: int, seed: int = 0):
    super().__init__(num_tasks, seed)
    self.calls = base.state_variable("calls", [])

  def __call__(self, jacobian: tf.Tensor, step: tf.Tensor,
               losses=None) -> tf.Tensor:
    del step, losses
    base.assign_if(base.inputs_finite(jacobian), self.calls, self.calls + 1)
    return tf.fill([jacobian.shape[1]], float("nan"))


if _CountingNan.name not in registry.AGGREGATORS.names():
  registry.AGGREGATORS.register(
      _CountingNan, catalog.Method(_CountingNan.name, "a test aggregator"))


def test_a_step_the_trainer_skips_leaves_the_aggregator_state_alone(
    build_trainer):
  """Its inputs are finite, so the method moves its state; the step skips
  (the update is NaN), and puts the state back."""
  trainer, iterators, _, _ = build_trainer(2, "joint", ("shape", "x"),
                                           aggregator=_CountingNan.name)
  before = [w.copy() for w in trainer.model.get_weights()]
  result = trainer.train(iterators, 2)
  assert result.skipped.count == 2
  assert float(trainer.aggregator.calls.numpy()) == 0.0
  for got, want in zip(trainer.model.get_weights(), before):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name, options, flag", [
    ("cagrad", {"c": -1.0}, "--cagrad_c=-1.0"),
    ("graddrop", {"leak": 2.0}, "--graddrop_leak=2.0"),
    ("nash_mtl", {"update_every": 0}, "--nash_mtl_update_every=0"),
    ("sdmgrad", {"lr": 0.0}, "--sdmgrad_lr=0.0"),
])
def test_the_api_checks_option_bounds_as_the_flags_do(name, options, flag):
  with pytest.raises(mtl_dist.ConfigError, match=flag):
    mtl_dist.aggregate(name, np.ones((6, 3), np.float32), **options)


@pytest.mark.parametrize("kind", [catalog.AGGREGATOR, catalog.WEIGHTING])
def test_the_catalogue_and_the_registered_classes_agree(kind):
  """Every catalogued method has a registered class and vice versa, with
  the entry's summary, options and declarations; and each class is its
  name's module in aggregators/ or weightings/ (tests' methods aside)."""
  methods = registry.AGGREGATORS if kind == catalog.AGGREGATOR else (
      registry.WEIGHTINGS)
  entries = catalog.BY_KIND[kind]
  classes = methods.registered()
  assert sorted(classes) == sorted(entries.names())
  assert entries.default in entries.names()
  assert methods.names() == entries.names()
  for name, cls in classes.items():
    entry = entries.get(name)
    assert cls.name == entry.name == name
    assert (cls.summary, cls.options) == (entry.summary, entry.options), name
    assert cls.needs_losses == entry.needs_losses, name
    assert getattr(cls, "has_gram_form", False) == entry.has_gram_form, name
    assert getattr(cls, "sub_batches", 1) == entry.sub_batches, name
    if not name.startswith("test_"):
      assert cls.__module__ == f"mtl_dist.methods.{kind}s.{name}"


def test_a_class_that_disagrees_with_its_entry_is_refused():
  methods = registry.Registry(catalog.Catalogue("aggregator", ("a",), (
      catalog.Method("a", "one"),
      catalog.Method("b", "two", has_gram_form=True))))

  class A(base.Aggregator):
    name = "a"
    summary = "its own"

  class B(base.Aggregator):
    name = "b"

  class C(base.Aggregator):
    name = "c"

  with pytest.raises(ValueError, match="declares its summary"):
    methods.register(A)
  with pytest.raises(ValueError, match="has_gram_form=False"):
    methods.register(B)
  with pytest.raises(ValueError, match="no entry"):
    methods.register(C)
