"""Configuration checks: every bad value names its flag."""

import pytest

import mtl_dist
from mtl_dist import data as data_lib


def test_parse_key_values():
  assert mtl_dist.parse_key_values("a=1.0, b=0.5", "w", float) == {
      "a": 1.0, "b": 0.5}
  for bad, message in (("a:1", "expected name=value"),
                       ("a=1,a=2", "given twice"),
                       ("a=x", "bad value 'x'"), ("=1", "expected")):
    with pytest.raises(mtl_dist.ConfigError, match=message) as error:
      mtl_dist.parse_key_values(bad, "task_weights", float)
    assert str(error.value).startswith("--task_weights=")


@pytest.mark.parametrize("changes, flag", [
    ({"train_steps": 0}, "--train_steps=0"),
    ({"steps_per_loop": -1}, "--steps_per_loop=-1"),
    ({"global_batch_size": 0}, "--global_batch_size=0"),
    ({"log_every": 0}, "--log_every=0"),
    ({"eval_steps": -2}, "--eval_steps=-2"),
    ({"learning_rate": 0.0}, "--learning_rate=0.0"),
    ({"mode": "both"}, "--mode=both"),
    ({"trunk": "resnet"}, "--trunk=resnet"),
    ({"tasks": ["x", "x"]}, "--tasks=x,x"),
    ({"schedule": "round_robin"}, "--schedule"),
    ({"per_task_optimizer": True}, "--per_task_optimizer"),
    ({"task_sizes": {"x": 5}}, "--task_sizes"),
    ({"mode": "alternate", "task_weights": {"x": 1.0}}, "--task_weights"),
    ({"mode": "alternate", "schedule": "proportional",
      "task_weights": {"x": 1.0}}, "--task_weights"),
    ({"mode": "alternate", "schedule": "lottery"}, "--schedule=lottery"),
    ({"mode": "alternate", "temperature": 2.0}, "--temperature"),
    ({"mode": "alternate", "schedule": "annealed", "mixing_cap": 5},
     "--mixing_cap"),
    ({"mode": "alternate", "schedule": "temperature", "temperature": 0.0},
     "--temperature=0.0"),
    ({"mode": "alternate", "schedule": "temperature", "mixing_cap": -1},
     "--mixing_cap=-1"),
    ({"mode": "alternate", "steps_per_epoch": 10}, "--steps_per_epoch"),
    ({"mode": "alternate", "schedule": "annealed", "steps_per_epoch": 0},
     "--steps_per_epoch=0"),
    ({"temperature": 2.0}, "--temperature"),
    ({"dataset": "imagenet"}, "--dataset=imagenet"),
    ({"aggregator": "median"}, "--aggregator=median"),
    ({"weighting": "magic"}, "--weighting=magic"),
    ({"rep_grad": True}, "--rep_grad"),
    ({"rep_grad": True, "aggregator": "pcgrad"}, "--aggregator=pcgrad"),
    ({"mode": "alternate", "rep_grad": True}, "--rep_grad"),
    ({"dataset": "toy_regression", "mode": "alternate"}, "--dataset"),
    ({"gradnorm_alpha": 1.0}, "--gradnorm_alpha"),
    ({"weighting": "gradnorm", "gradnorm_alpha": -0.5},
     "--gradnorm_alpha=-0.5"),
    ({"mode": "alternate", "cagrad_c": 0.3}, "--cagrad_c"),
    ({"weighting": "gradnorm", "gradnorm_lr": 0.0}, "--gradnorm_lr=0.0"),
    ({"mode": "alternate", "gradnorm_alpha": 1.0}, "--weighting"),
    ({"mode": "alternate", "weighting": "dwa"}, "--weighting=dwa"),
    ({"dwa_window": 5}, "--dwa_window"),
    ({"weighting": "dwa", "dwa_window": 0}, "--dwa_window=0"),
    ({"weighting": "uncertainty", "task_weights": {"x": 2.0}},
     "--task_weights"),
    ({"mode": "alternate", "anneal_epochs": 3}, "--anneal_epochs"),
    ({"mode": "alternate", "schedule": "annealed", "anneal_epochs": 0},
     "--anneal_epochs=0"),
    ({"mode": "alternate", "train_examples": 100}, "--train_examples"),
    ({"dataset": "tfds:mnist", "eval_examples": 100}, "--eval_examples"),
    ({"strategy": "one_device", "num_cpu_devices": 2}, "--num_cpu_devices=2"),
    ({"mode": "alternate", "aggregator": "pcgrad"}, "--aggregator=pcgrad"),
    ({"cagrad_c": 0.3}, "--cagrad_c"),
    ({"aggregator": "cagrad", "cagrad_c": -1.0}, "--cagrad_c=-1.0"),
    ({"aggregator": "graddrop", "graddrop_leak": 1.5},
     "--graddrop_leak=1.5: must be <= 1"),
    ({"data_dir": "/d"}, "--data_dir"),
    ({"split": "train[:5%]"}, "--split"),
    ({"download": True}, "--download"),
    ({"dataset": "tfds:mnist", "channels": 2}, "--channels=2"),
    ({"dataset": "tfds:mnist", "image_size": [0, 4]}, "--image_size=0,4"),
    ({"dataset": "tfds:mnist", "task_sizes": {"x": 5}}, "--task_sizes"),
    ({"dataset": "tfds:mnist", "mode": "alternate"}, "--task_datasets"),
    ({"task_datasets": {"a": "tfds:mnist:label"}}, "--task_datasets"),
    ({"mode": "alternate", "dataset": "tfds:mnist",
      "task_datasets": {"a": "tfds:mnist:label"}}, "--task_datasets"),
    ({"label_fraction": {"x": 0.0}}, "--label_fraction"),
    ({"label_fraction": {"x": 1.5}}, "--label_fraction"),
    ({"mode": "alternate", "label_fraction": {"x": 0.5}}, "--label_fraction"),
    ({"mode": "alternate", "partial_labels": True}, "--partial_labels"),
    ({"task_weights": {"x": -1.0}}, "--task_weights"),
    ({"model_dir": ""}, "--model_dir"),
    ({"architecture": "transformer"}, "--architecture=transformer"),
    ({"num_experts": 3}, "--num_experts"),  # hps has no experts.
    ({"architecture": "cgc", "num_experts": 3}, "--num_experts"),
    ({"architecture": "mmoe", "num_levels": 3}, "--num_levels"),
    ({"architecture": "mmoe", "num_experts": 0}, "--num_experts=0"),
    ({"architecture": "ple", "num_levels": 0}, "--num_levels=0"),
    ({"architecture": "cgc", "num_task_experts": -1},
     "--num_task_experts=-1"),
    ({"architecture": "cgc", "num_shared_experts": 0},
     "--num_shared_experts=0"),
    ({"architecture": "dselect_k", "num_experts": 1}, "--num_experts=1"),
    ({"architecture": "dselect_k", "num_selected_experts": 5},
     "--num_selected_experts=5"),
    ({"architecture": "dselect_k", "dselect_k_gamma": 0.0},
     "--dselect_k_gamma=0.0"),
    ({"architecture": "dselect_k", "dselect_k_entropy_reg": -1.0},
     "--dselect_k_entropy_reg=-1.0"),
    ({"architecture": "mmoe", "dselect_k_gamma": 2.0}, "--dselect_k_gamma"),
    ({"architecture": "ple", "aggregator": "mgda", "rep_grad": True},
     "--rep_grad"),
    ({"architecture": "cross_stitch", "aggregator": "mgda", "rep_grad": True},
     "--rep_grad"),
])
def test_validate_names_the_bad_flag(changes, flag):
  config = mtl_dist.TrainConfig(model_dir="unused")
  for name, value in changes.items():
    setattr(config, name, value)
  with pytest.raises(mtl_dist.ConfigError) as error:
    config.validate()
  assert flag in str(error.value)


@pytest.mark.parametrize("changes, message", [
    ({"tasks": ["shape", "colour"]}, "--tasks=shape,colour: unknown task "
     "'colour'"),
    ({"tasks": ["shape"], "task_weights": {"x": 2.0}},
     "--task_weights: 'x' is not a trained task"),
])
def test_load_rejects_unknown_names(changes, message):
  config = mtl_dist.TrainConfig(model_dir="unused", **changes)
  config.validate()
  with pytest.raises(mtl_dist.ConfigError, match=message):
    data_lib.load(config.data_config())


def test_weights_schedule_accepts_task_weights_as_shares():
  config = mtl_dist.TrainConfig(model_dir="d", mode="alternate",
                                schedule="weights",
                                task_weights={"shape": 3.0, "x": 1.0})
  config.validate()
  assert config.weight_of("shape") == 3.0 and config.weight_of("y") == 1.0


def test_rep_grad_is_valid_where_one_representation_feeds_every_task():
  for architecture, levels in (("mmoe", None), ("cgc", None), ("ple", 1),
                               ("dselect_k", None)):
    mtl_dist.TrainConfig(model_dir="unused", architecture=architecture,
                         num_levels=levels, aggregator="mgda",
                         rep_grad=True).validate()


def test_gradnorm_alpha_zero_is_valid():
  mtl_dist.TrainConfig(model_dir="d", weighting="gradnorm",
                       gradnorm_alpha=0.0).validate()


def test_defaults_depend_on_mode():
  joint = mtl_dist.TrainConfig(model_dir="d")
  alternate = mtl_dist.TrainConfig(model_dir="d", mode="alternate")
  assert not joint.per_task_optimizers
  assert alternate.per_task_optimizers
  alternate.per_task_optimizer = False
  assert not alternate.per_task_optimizers
  assert alternate.schedule_config().schedule == "round_robin"


def test_unset_fields_take_their_sections_defaults():
  config = mtl_dist.TrainConfig(model_dir="d", mode="alternate")
  data = config.data_config()
  assert (data.train_examples, data.eval_examples) == (16384, 2048)
  assert (data.input_key, data.split, data.eval_split) == ("image", "train",
                                                           "test")
  schedule = config.schedule_config()
  assert (schedule.temperature, schedule.mixing_cap) == (2.0, 0)
  cluster = config.cluster_config()
  assert (cluster.collective, cluster.cluster_start_timeout) == ("auto", 900.0)
  given = mtl_dist.TrainConfig(model_dir="d", eval_examples=64, temperature=3.0,
                               collective="ring")
  assert given.data_config().eval_examples == 64
  assert given.schedule_config().temperature == 3.0
  assert given.cluster_config().collective == "ring"
