"""The run layer: what the launchers call.

- `config`: `TrainConfig`, every check that needs no device;
- `training`: `train()`, the training run's set-up and host loop;
- `sidecar`: `evaluate()`, checkpoints evaluated once or as they appear;
- `export`: SavedModels with a signature per task, and predictions;
- `saved_run`: a model_dir read back (model.json, config.json, checkpoints);
- `report`, `delta_m`: report.png, and Δm against single-task baselines.
"""
