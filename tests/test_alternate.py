"""Alternate mode: one task per step, other heads and optimizers untouched."""

from conftest import snapshot
import numpy as np
import pytest
import tensorflow as tf

TASKS = ("shape", "x", "y")


def _changed(before, after) -> list[bool]:
  return [not np.array_equal(b, a) for b, a in zip(before, after)]


@pytest.mark.parametrize("replicas", [1, 2])
def test_step_for_one_task_leaves_other_heads_and_optimizers_bitwise(
    build_trainer, replicas):
  trainer, iterators, _, _ = build_trainer(replicas, "alternate", TASKS,
                                           optimizer="adam",
                                           learning_rate=0.01)
  model, optimizers = trainer.model, trainer.optimizers
  for step, task in enumerate(TASKS):  # Round robin: step i trains task i.
    others = [t for t in TASKS if t != task]
    frozen = [v for t in others for v in model.heads[t].variables]
    frozen += [v for t in others for v in optimizers[t].variables]
    before_frozen = snapshot(frozen)
    before_trunk = snapshot(model.trunk.variables)
    before_head = snapshot(model.heads[task].variables)
    before_slots = snapshot(optimizers[task].variables)

    trainer.train(iterators, 1)

    assert not any(_changed(before_frozen, snapshot(frozen))), (
        f"a step for {task!r} changed another task's head or optimizer")
    assert all(_changed(before_trunk, snapshot(model.trunk.variables)))
    assert all(_changed(before_head, snapshot(model.heads[task].variables)))
    assert all(_changed(before_slots, snapshot(optimizers[task].variables)))
    assert int(optimizers[task].iterations.numpy()) == 1, step


def test_shared_optimizer_touches_only_trunk_and_trained_head_slots(
    build_trainer):
  trainer, iterators, _, _ = build_trainer(2, "alternate", TASKS,
                                           optimizer="adam",
                                           per_task_optimizer=False)
  model = trainer.model
  shared = trainer.optimizers["shape"]
  assert all(trainer.optimizers[t] is shared for t in TASKS)
  heads_before = {t: snapshot(model.heads[t].variables) for t in TASKS}
  slots_before = snapshot(shared.variables)

  trainer.train(iterators, 1)  # Step 0 trains "shape".

  for task in ("x", "y"):
    assert not any(_changed(heads_before[task],
                            snapshot(model.heads[task].variables)))
  trained = len(model.trunk_and_head_variables("shape"))
  # The iteration counter plus Adam's m and v of each trained variable.
  assert sum(_changed(slots_before, snapshot(shared.variables))) == (
      1 + 2 * trained)


def test_one_round_robin_cycle_gives_each_task_one_step(build_trainer):
  trainer, iterators, _, _ = build_trainer(2, "alternate", TASKS)
  loss_sums, counts = trainer.train(iterators, len(TASKS))[:2]
  np.testing.assert_array_equal(counts, [1, 1, 1])
  np.testing.assert_array_equal(trainer.task_steps.numpy(), [1, 1, 1])
  assert np.all(loss_sums > 0)
  trainer.train(iterators, 2 * len(TASKS) + 1)  # Two cycles and one step.
  np.testing.assert_array_equal(trainer.task_steps.numpy(), [4, 3, 3])
  assert int(trainer.global_step.numpy()) == 10


def _op_types(function) -> set[str]:
  graph_def = function.graph.as_graph_def()
  return ({node.op for node in graph_def.node} |
          {node.op for f in graph_def.library.function for node in f.node_def})


@pytest.mark.parametrize("replicas, options", [
    (1, {}), (2, {}), (1, {"per_task_optimizer": False}),
    (1, {"optimizer": "adam", "learning_rate": 1e-3}),
])
def test_round_robin_rounds_run_without_a_switch_and_match_switched_steps(
    build_trainer, replicas, options):
  # The whole rounds of a call run one step per task in order, with no
  # in-graph switch; the steps before a round's start and after the last
  # round run switched. Together they must train exactly what the switched
  # loop trains one step at a time, and report the same sums.
  switched, switched_its, _, _ = build_trainer(replicas, "alternate", TASKS,
                                               **options)
  rounds, rounds_its, _, _ = build_trainer(
      replicas, "alternate", TASKS,
      initial_weights=switched.model.get_weights(), **options)
  want_losses, want_counts = np.zeros(3), np.zeros(3)
  for _ in range(14):
    losses, counts = switched.train(switched_its, 1)[:2]
    want_losses += losses
    want_counts += counts
  got_losses, got_counts = np.zeros(3), np.zeros(3)
  # Two rounds; a lone step; from step 7: 2 switched steps to the round's
  # start at 9, a round, 2 switched steps.
  for num_steps in (6, 1, 7):
    losses, counts = rounds.train(rounds_its, num_steps)[:2]
    got_losses += losses
    got_counts += counts
  # pylint: disable=protected-access
  assert rounds._cycles_loop.experimental_get_tracing_count() == 1
  assert switched._cycles_loop.experimental_get_tracing_count() == 0
  op_types = _op_types(rounds._cycles_loop.get_concrete_function(
      tuple(rounds_its), tf.constant(1, tf.int64)))
  assert not op_types & {"Case", "StatelessCase"}, op_types
  assert {"Case", "StatelessCase"} & _op_types(
      switched._train_loop.get_concrete_function(
          tuple(switched_its), tf.constant(1, tf.int64)))
  # pylint: enable=protected-access
  np.testing.assert_array_equal(got_counts, want_counts)
  np.testing.assert_array_equal(rounds.task_steps.numpy(), [5, 5, 4])
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
  for got, want in zip(rounds.model.get_weights(),
                       switched.model.get_weights()):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  for task in TASKS:
    assert (int(rounds.optimizers[task].iterations.numpy()) ==
            int(switched.optimizers[task].iterations.numpy()))


def test_alternate_replicas_match_one_device(build_trainer):
  # SGD: Adam divides by sqrt(v), which turns float32 summation-order noise
  # in near-zero gradients into full-size updates on any hardware.
  single, single_its, _, _ = build_trainer(1, "alternate", TASKS)
  multi, multi_its, _, _ = build_trainer(
      4, "alternate", TASKS, initial_weights=single.model.get_weights())
  single.train(single_its, 5)
  multi.train(multi_its, 5)
  np.testing.assert_array_equal(multi.task_steps.numpy(), [2, 2, 1])
  for got, want in zip(multi.model.get_weights(), single.model.get_weights()):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_loop_calls_merge_into_one_result():
  from mtl_dist.loop import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  def part(losses, skipped, first_step, first_losses, scale):
    counts = np.array([1.0, 1.0])
    return (np.array(losses), counts, (np.array([2.0]), np.array([1.0])),
            (skipped, first_step, np.array(first_losses), counts),
            {"loss_scale": scale}, {"learning_rate": scale / 10})

  merged = trainer_lib._merged([  # pylint: disable=protected-access
      part([1.0, 2.0], 0, -1, [0.0, 0.0], 1.0),
      part([3.0, 4.0], 2, 7, [np.nan, 0.0], 2.0),
      part([5.0, 6.0], 1, 12, [0.0, np.inf], 3.0)])
  sums, counts, (metric_sums, metric_counts), skipped, scales, rates = merged
  np.testing.assert_array_equal(sums, [9.0, 12.0])
  np.testing.assert_array_equal(counts, [3.0, 3.0])
  np.testing.assert_array_equal(metric_sums, [6.0])
  np.testing.assert_array_equal(metric_counts, [3.0])
  count, first_step, first_losses, _ = skipped
  assert (count, first_step) == (3, 7)  # The earliest skipped step's.
  assert np.isnan(first_losses[0]) and first_losses[1] == 0.0
  assert scales == {"loss_scale": 3.0} and rates == {"learning_rate": 0.3}
