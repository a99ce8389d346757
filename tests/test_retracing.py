"""Loops of any length run without retracing after the first call."""

import pytest


@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_train_and_eval_loops_trace_once(build_trainer, mode):
  trainer, iterators, eval_datasets, groups = build_trainer(2, mode)
  trainer.train(iterators, 3)
  assert trainer.train_trace_count == 1
  for num_steps in (5, 1, 7):
    trainer.train(iterators, num_steps)
  assert trainer.train_trace_count == 1
  # Alternate: 16 is a round's start and 2 and 4 whole rounds of 2 tasks,
  # which run in the round loop, traced once.
  rounds = 1 if mode == "joint" else 2
  trainer.train(iterators, 2)
  assert trainer.train_trace_count == rounds
  assert int(trainer.global_step.numpy()) == 18

  trainer.evaluate(eval_datasets, groups)
  trainer.evaluate(eval_datasets, groups)
  trainer.train(iterators, 4)
  trainer.evaluate(eval_datasets, groups)
  assert trainer.eval_trace_count == 1
  assert trainer.train_trace_count == rounds
