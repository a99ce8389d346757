"""The loop layer: the compiled train loop and what runs between its calls.

- `trainer`: `Trainer`, a run's state (model, optimizers, counters) and its
  compiled loop, which returns what it measured (`LoopResult`);
- `evaluator`: `Evaluator`, the compiled evaluation over finite datasets;
- `checkpointing`, `preemption`, `profiling`: checkpoints with a fallback
  past damaged ones, SIGTERM handling, profiles of chosen steps;
- `run_files`: metrics.jsonl, TensorBoard events, progress lines and atomic
  JSON files of a run.
"""
