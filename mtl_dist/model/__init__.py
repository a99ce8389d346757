"""The model layer: what a task's head is fed and what is shared.

- `hps`: hard parameter sharing, the first architecture: one trunk shared by
  every task and one head per task (`SharedTrunkModel`, `build_model`). It
  states the architecture contract the steps rely on: `shared_variables`,
  `task_variables(task)`, `regularization_losses(task)`,
  `last_shared_kernel()` (GradNorm's W), and `call_with_representation`
  for `--rep_grad`.
- `spec`: `ModelSpec`, how a run's model is built, as data (model.json), so
  that training, the sidecar and the exporter build the same model;
- `precision`: mixed-precision dtype policies and float16 loss scaling.
"""
