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
"""

from mtl_dist.cluster.strategy import configure_cpu_devices
from mtl_dist.cluster.strategy import create_strategy
from mtl_dist.data import distribute_eval
from mtl_dist.data import distribute_train
from mtl_dist.data import ExampleSource
from mtl_dist.data import MultiTaskData
from mtl_dist.data import source_from_arrays
from mtl_dist.data import source_from_dataset
from mtl_dist.errors import ClusterError
from mtl_dist.errors import ConfigError
from mtl_dist.errors import DataError
from mtl_dist.errors import NonFiniteError
from mtl_dist.errors import Preempted
from mtl_dist.loop.run_files import format_results
from mtl_dist.loop.trainer import Trainer
from mtl_dist.methods.aggregators import aggregate
from mtl_dist.methods.optimizers import FusedAdam
from mtl_dist.methods.optimizers import make_optimizer_factory
from mtl_dist.methods.weightings import loss_weights
from mtl_dist.model.architectures import build as build_architecture
from mtl_dist.model.architectures import ColumnFn
from mtl_dist.model.architectures import ExpertFn
from mtl_dist.model.architectures import GateFn
from mtl_dist.model.architectures import ModelFunctions
from mtl_dist.model.base import MultiTaskModel
from mtl_dist.model.hps import build_model
from mtl_dist.model.hps import build_trunk
from mtl_dist.model.hps import HeadFn
from mtl_dist.model.hps import SharedTrunkModel
from mtl_dist.model.hps import TrunkFn
from mtl_dist.model.settings import ArchitectureConfig
from mtl_dist.run.config import TrainConfig
from mtl_dist.run.export import export_run
from mtl_dist.run.export import predict
from mtl_dist.run.export import write_predictions
from mtl_dist.run.flag_values import parse_key_values
from mtl_dist.run.report import write_report
from mtl_dist.run.sidecar import EvalTimeout
from mtl_dist.run.sidecar import evaluate
from mtl_dist.run.sidecar import Evaluation
from mtl_dist.run.training import train
from mtl_dist.tasks import LossFn
from mtl_dist.tasks import TaskSpec

__all__ = [
    "ArchitectureConfig", "ColumnFn", "ExpertFn", "GateFn", "ModelFunctions",
    "MultiTaskModel", "build_architecture",
    "ClusterError", "ConfigError", "DataError", "EvalTimeout", "Evaluation",
    "ExampleSource", "FusedAdam", "HeadFn", "LossFn", "MultiTaskData",
    "NonFiniteError", "Preempted", "SharedTrunkModel", "TaskSpec",
    "TrainConfig", "Trainer", "TrunkFn", "aggregate", "build_model",
    "build_trunk", "configure_cpu_devices", "create_strategy",
    "distribute_eval",
    "distribute_train", "evaluate", "export_run", "format_results",
    "loss_weights", "make_optimizer_factory", "parse_key_values", "predict",
    "source_from_arrays", "source_from_dataset", "train", "write_predictions",
    "write_report",
]

__version__ = "0.1.0"
