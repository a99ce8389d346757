"""The model layer: what each task's head is fed, and what is shared.

- `base`: the architecture contract the steps rely on (`MultiTaskModel`):
  `shared_layers`/`shared_variables`, `task_layers(task)`/`task_variables`,
  `regularization_losses(task)`, `last_shared_kernel()` (GradNorm's W) and
  `forward` (outputs, the representation for `--rep_grad`, diagnostics).
- `hps`: hard parameter sharing, one trunk and a head per task
  (`SharedTrunkModel`, `build_model`), and the built-in trunks;
- `experts`: MMoE, CGC, PLE and DSelect-k; `cross_stitch`; `mtan`;
- `architectures`: builds any of them from `settings.ArchitectureConfig`
  and the user's functions (`ModelFunctions`);
- `settings`: the architecture section of the configuration;
- `spec`: `ModelSpec`, how a run's model is built, as data (model.json), so
  that training, the sidecar and the exporter build the same model;
- `precision`: mixed-precision dtype policies and float16 loss scaling.
"""
