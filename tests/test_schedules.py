"""Task schedules: observed shares match each formula; choices are stable."""

import numpy as np
import pytest
import tensorflow as tf

from mtl_dist.methods import schedules

SIZES = [8000, 2000, 500, 100]
NUM_STEPS = 20000


def draw(schedule, first_step: int, num_steps: int) -> np.ndarray:
  """The task chosen at each of `num_steps` steps from `first_step` on."""

  @tf.function
  def run():
    choices = tf.TensorArray(tf.int32, size=num_steps)
    for i in tf.range(num_steps):
      step = tf.cast(first_step, tf.int64) + tf.cast(i, tf.int64)
      choices = choices.write(i, schedule.task_index(step))
    return choices.stack()

  return run().numpy()


def assert_shares_match(choices: np.ndarray, expected: np.ndarray) -> None:
  """Each task's share within 5 binomial standard deviations of expected."""
  n = len(choices)
  observed = np.bincount(choices, minlength=len(expected)) / n
  sigma = np.sqrt(expected * (1 - expected) / n)
  assert np.all(np.abs(observed - expected) <= 5 * sigma + 1e-12), (
      observed, expected)


def normalised(values) -> np.ndarray:
  values = np.asarray(values, np.float64)
  return values / values.sum()


@pytest.mark.parametrize("name, kwargs, expected", [
    ("proportional", {}, normalised(SIZES)),
    ("temperature", {"temperature": 2.0}, normalised(np.sqrt(SIZES))),
    ("temperature", {"temperature": 3.0, "mixing_cap": 1000},
     normalised(np.minimum(SIZES, 1000)**(1 / 3))),
    ("weights", {"weights": [1.0, 0.0, 3.0, 1.0]},
     normalised([1.0, 0.0, 3.0, 1.0])),
])
def test_sampled_shares_match_formula(name, kwargs, expected):
  schedule = schedules.create(name, sizes=SIZES, seed=3, **kwargs)
  choices = draw(schedule, 0, NUM_STEPS)
  assert_shares_match(choices, expected)
  if name == "weights":
    assert not (choices == 1).any()  # A zero share is never drawn.


def test_round_robin_cycles():
  choices = draw(schedules.create("round_robin", sizes=SIZES), 5, 12)
  np.testing.assert_array_equal(choices, [1, 2, 3, 0] * 3)


def test_annealed_alpha_runs_from_one_to_point_two():
  schedule = schedules.create("annealed", sizes=SIZES, seed=1,
                              steps_per_epoch=100, num_epochs=5)
  alphas = [float(schedule.alpha(tf.constant(step, tf.int64)))
            for step in (0, 99, 100, 250, 399, 400, 499, 10_000)]
  np.testing.assert_allclose(alphas,
                             [1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2],
                             atol=1e-6)
  single_epoch = schedules.create("annealed", sizes=SIZES, steps_per_epoch=10,
                                  num_epochs=1)
  assert float(single_epoch.alpha(tf.constant(5, tf.int64))) == 1.0


def test_annealed_shares_follow_alpha_per_epoch():
  epoch = 10000
  schedule = schedules.create("annealed", sizes=SIZES, seed=2,
                              steps_per_epoch=epoch, num_epochs=3)
  first = draw(schedule, 0, epoch)
  last = draw(schedule, 2 * epoch, epoch)
  assert_shares_match(first, normalised(SIZES))  # alpha = 1.0
  assert_shares_match(last, normalised(np.power(SIZES, 0.2)))


def test_choices_are_a_pure_function_of_seed_and_step():
  schedule = schedules.create("proportional", sizes=SIZES, seed=9)
  whole = draw(schedule, 0, 600)
  # A resumed run (starting at step 250) makes the same choices.
  np.testing.assert_array_equal(draw(schedule, 250, 350), whole[250:])
  again = schedules.create("proportional", sizes=SIZES, seed=9)
  np.testing.assert_array_equal(draw(again, 0, 600), whole)
  other_seed = schedules.create("proportional", sizes=SIZES, seed=10)
  assert not np.array_equal(draw(other_seed, 0, 600), whole)


def test_trainer_counts_follow_the_schedule(build_trainer):
  schedule = schedules.create("weights", sizes=[1, 1, 1], seed=4,
                              weights=[2.0, 1.0, 1.0])
  trainer, iterators, _, _ = build_trainer(2, "alternate", ("shape", "x", "y"),
                                           schedule=schedule)
  counts = trainer.train(iterators, 200).counts
  expected = np.bincount(draw(schedule, 0, 200), minlength=3)
  np.testing.assert_array_equal(counts, expected)
  np.testing.assert_array_equal(trainer.task_steps.numpy(), expected)


def test_invalid_probabilities_are_refused():
  with pytest.raises(ValueError, match="positive sum"):
    schedules.create("weights", sizes=[5, 5], weights=[0.0, 0.0])
  with pytest.raises(ValueError, match="unknown schedule"):
    schedules.create("lottery", sizes=[5])
