"""mtl_dist: shared-trunk multi-task training on many devices.

Public API:
  TrainConfig, train, parse_key_values: configure and run a training job
    (what the `mtl-train` launcher calls).
  ConfigError (exit 2), ClusterError, DataError, NonFiniteError (exit 1),
    Preempted (exit 143): how a run ends early.
  TaskSpec: one task (its head, loss and metrics).
  SharedTrunkModel, build_model, build_trunk: the model.
  Trainer: a run's state and its compiled train and eval loops.
  make_optimizer_factory, FusedAdam: optimizers (tf_keras's Adam with a fused
    update kernel, SGD).
  ExampleSource, MultiTaskData, source_from_arrays, distribute_train,
    distribute_eval: inputs.
  create_strategy: a tf.distribute strategy over this host's devices or a
    cluster's (TF_CONFIG, SLURM).
  format_results: a text table of a run summary.
"""

from mtl_dist.config import ConfigError
from mtl_dist.config import parse_key_values
from mtl_dist.config import TrainConfig
from mtl_dist.controller import ClusterError
from mtl_dist.controller import DataError
from mtl_dist.controller import NonFiniteError
from mtl_dist.controller import train
from mtl_dist.data import distribute_eval
from mtl_dist.data import distribute_train
from mtl_dist.data import ExampleSource
from mtl_dist.data import MultiTaskData
from mtl_dist.data import source_from_arrays
from mtl_dist.distribution import create_strategy
from mtl_dist.model import build_model
from mtl_dist.model import build_trunk
from mtl_dist.model import SharedTrunkModel
from mtl_dist.outputs import format_results
from mtl_dist.preemption import Preempted
from mtl_dist.optimizers import FusedAdam
from mtl_dist.optimizers import make_optimizer_factory
from mtl_dist.tasks import TaskSpec
from mtl_dist.trainer import Trainer

__all__ = [
    "ClusterError", "ConfigError", "DataError", "ExampleSource", "FusedAdam",
    "MultiTaskData",
    "NonFiniteError", "Preempted", "SharedTrunkModel", "TaskSpec",
    "TrainConfig", "Trainer", "build_model", "build_trunk", "create_strategy",
    "distribute_eval", "distribute_train", "format_results",
    "make_optimizer_factory", "parse_key_values", "source_from_arrays",
    "train",
]

__version__ = "0.1.0"
