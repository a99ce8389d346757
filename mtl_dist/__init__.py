"""mtl_dist: multi-task training on many devices and hosts.

Public API:
  TrainConfig, train, parse_key_values: configure and run a training job
    (what the `mtl-train` launcher calls), with the built-in data and trunks
    or your own (`train(config, data=..., trunk_fn=..., head_fn=...)`).
  ConfigError (exit 2), ClusterError, DataError, NonFiniteError (exit 1),
    Preempted (exit 143): how a run ends early.
  TaskSpec, LossFn: one task (its head, loss and metrics), a loss function.
  SharedTrunkModel, build_model, build_trunk, TrunkFn, HeadFn: the
    shared-trunk model, and the functions that make a user's trunk and
    heads.
  MultiTaskModel, ArchitectureConfig, ModelFunctions, build_architecture,
    ExpertFn, GateFn, ColumnFn: every architecture (hps, mmoe, cgc, ple,
    cross_stitch, dselect_k, mtan), its settings and the user's pieces.
  Trainer: a run's state and its compiled train and eval loops.
  make_optimizer_factory, FusedAdam: optimizers (tf_keras's Adam with a fused
    update kernel, SGD).
  ExampleSource, MultiTaskData, source_from_arrays, source_from_dataset,
    distribute_train, distribute_eval: inputs.
  export_run, predict, write_predictions: SavedModels with a serving
    signature per task (`mtl-export`, `mtl-predict`).
  evaluate, Evaluation, EvalTimeout: evaluate checkpoints, once or as a
    sidecar (`mtl-eval`).
  write_report: report.png of a run's curves (`mtl-report`, needs
    matplotlib).
  create_strategy: a tf.distribute strategy over this host's devices or a
    cluster's (TF_CONFIG, SLURM); configure_cpu_devices: split the CPU
    into logical devices (replicas without GPUs) before TensorFlow starts.
  format_results: a text table of a run summary.
  aggregate, loss_weights: every gradient aggregator and loss weighting as
    a function (what the joint step calls), by name.

Each name is imported on first use (PEP 562), so that importing a module
that needs no TensorFlow (`mtl_dist.run.config`, what the launchers check
their flags with) does not start it; `import mtl_dist` alone imports
nothing else.
"""

import importlib
from typing import Any

# Each public name: the module that defines it, and its name there.
_PUBLIC = {
    "aggregate": ("mtl_dist.methods.aggregators", "aggregate"),
    "ArchitectureConfig": ("mtl_dist.model.settings", "ArchitectureConfig"),
    "build_architecture": ("mtl_dist.model.architectures", "build"),
    "build_model": ("mtl_dist.model.hps", "build_model"),
    "build_trunk": ("mtl_dist.model.hps", "build_trunk"),
    "ClusterError": ("mtl_dist.errors", "ClusterError"),
    "ColumnFn": ("mtl_dist.model.architectures", "ColumnFn"),
    "ConfigError": ("mtl_dist.errors", "ConfigError"),
    "configure_cpu_devices": ("mtl_dist.cluster.strategy",
                              "configure_cpu_devices"),
    "create_strategy": ("mtl_dist.cluster.strategy", "create_strategy"),
    "DataError": ("mtl_dist.errors", "DataError"),
    "distribute_eval": ("mtl_dist.data", "distribute_eval"),
    "distribute_train": ("mtl_dist.data", "distribute_train"),
    "EvalTimeout": ("mtl_dist.run.sidecar", "EvalTimeout"),
    "evaluate": ("mtl_dist.run.sidecar", "evaluate"),
    "Evaluation": ("mtl_dist.run.sidecar", "Evaluation"),
    "ExampleSource": ("mtl_dist.data", "ExampleSource"),
    "ExpertFn": ("mtl_dist.model.architectures", "ExpertFn"),
    "export_run": ("mtl_dist.run.export", "export_run"),
    "format_results": ("mtl_dist.loop.run_files", "format_results"),
    "FusedAdam": ("mtl_dist.methods.optimizers", "FusedAdam"),
    "GateFn": ("mtl_dist.model.architectures", "GateFn"),
    "HeadFn": ("mtl_dist.model.hps", "HeadFn"),
    "loss_weights": ("mtl_dist.methods.weightings", "loss_weights"),
    "LossFn": ("mtl_dist.tasks", "LossFn"),
    "make_optimizer_factory": ("mtl_dist.methods.optimizers",
                               "make_optimizer_factory"),
    "ModelFunctions": ("mtl_dist.model.architectures", "ModelFunctions"),
    "MultiTaskData": ("mtl_dist.data", "MultiTaskData"),
    "MultiTaskModel": ("mtl_dist.model.base", "MultiTaskModel"),
    "NonFiniteError": ("mtl_dist.errors", "NonFiniteError"),
    "parse_key_values": ("mtl_dist.run.flag_values", "parse_key_values"),
    "predict": ("mtl_dist.run.export", "predict"),
    "Preempted": ("mtl_dist.errors", "Preempted"),
    "SharedTrunkModel": ("mtl_dist.model.hps", "SharedTrunkModel"),
    "source_from_arrays": ("mtl_dist.data", "source_from_arrays"),
    "source_from_dataset": ("mtl_dist.data", "source_from_dataset"),
    "TaskSpec": ("mtl_dist.tasks", "TaskSpec"),
    "train": ("mtl_dist.run.training", "train"),
    "TrainConfig": ("mtl_dist.run.config", "TrainConfig"),
    "Trainer": ("mtl_dist.loop.trainer", "Trainer"),
    "TrunkFn": ("mtl_dist.model.hps", "TrunkFn"),
    "write_predictions": ("mtl_dist.run.export", "write_predictions"),
    "write_report": ("mtl_dist.run.report", "write_report"),
}

__all__ = sorted(_PUBLIC)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
  if name not in _PUBLIC:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module, attribute = _PUBLIC[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_PUBLIC})
