"""Loops of any length run without retracing after the first call."""

import pytest


@pytest.mark.parametrize("mode", ["joint", "alternate"])
def test_train_and_eval_loops_trace_once(build_trainer, mode):
  trainer, iterators, eval_datasets, groups = build_trainer(2, mode)
  # Alternate (round robin over 2 tasks): 3 steps are a round in the round
  # loop and a step in the switched loop; each loop is traced once.
  loops = 1 if mode == "joint" else 2
  trainer.train(iterators, 3)
  assert trainer.train_trace_count == loops
  for num_steps in (5, 1, 7, 2):
    trainer.train(iterators, num_steps)
  assert trainer.train_trace_count == loops
  assert int(trainer.global_step.numpy()) == 18

  trainer.evaluate(eval_datasets, groups)
  trainer.evaluate(eval_datasets, groups)
  trainer.train(iterators, 4)
  trainer.evaluate(eval_datasets, groups)
  assert trainer.eval_trace_count == 1
  assert trainer.train_trace_count == loops
