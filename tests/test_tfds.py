"""TFDS datasets: feature specs to tasks, mock data, and a prepared dataset."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from test_launcher import run_launcher

import mtl_dist
from mtl_dist import data as data_lib
from mtl_dist.data import tfds as tfds_data
from mtl_dist.data import tfds_features

EMPTY_DATA_DIR = "/nonexistent/mtl_dist_tfds"


def _features(name: str):
  return tfds.builder(name, data_dir=EMPTY_DATA_DIR).info.features


@pytest.mark.parametrize("dataset, path, kind, size", [
    ("dsprites", "label_shape", "classification", 3),
    ("dsprites", "value_scale", "regression", 1),
    ("shapes3d", "label_object_hue", "classification", 10),
    ("shapes3d", "value_orientation", "regression", 1),
    ("smallnorb", "label_category", "classification", 5),
    ("smallnorb", "instance", "classification", 10),
    ("celeb_a", "attributes/Smiling", "classification", 2),
    ("celeb_a", "landmarks/nose_x", "regression", 1),
])
def test_task_kind_and_size_come_from_the_feature_spec(dataset, path, kind,
                                                       size):
  feature = tfds_features.feature_at(_features(dataset), path, dataset)
  task = tfds_features.task_from_feature(path.rsplit("/", 1)[-1], feature)
  assert task.kind == kind and task.output_size == size


def test_non_label_features_are_refused():
  with pytest.raises(mtl_dist.ConfigError, match="cannot be a task"):
    tfds_features.task_from_feature("image", _features("mnist")["image"])
  with pytest.raises(mtl_dist.ConfigError, match="no feature 'colour'"):
    tfds_features.feature_at(_features("mnist"), "colour", "mnist")


@pytest.mark.parametrize("dataset, tasks", [
    ("dsprites", ["label_shape", "value_x_position"]),
    ("shapes3d", ["label_shape", "value_scale"]),
    ("smallnorb", ["label_category", "label_lighting"]),
    ("celeb_a", ["attributes/Smiling", "attributes/Male", "landmarks/nose_x"]),
])
def test_joint_training_on_mock_data(tmp_path, dataset, tasks):
  with tfds.testing.mock_data(num_examples=48):
    config = mtl_dist.TrainConfig(
        model_dir=str(tmp_path / dataset), dataset=f"tfds:{dataset}",
        tasks=tasks, split="train", eval_split="train", image_size=[16, 16],
        data_dir=EMPTY_DATA_DIR, train_steps=6, steps_per_loop=3,
        log_every=3, eval_every=6, checkpoint_every=6, num_cpu_devices=2,
        global_batch_size=16, trunk_width=16)
    summary = mtl_dist.train(config)
  names = [t.rsplit("/", 1)[-1] for t in tasks]
  assert list(summary["eval"]) == names
  assert summary["task_steps"] == {name: 6 for name in names}
  for name, metrics in summary["eval"].items():
    assert all(np.isfinite(v) for v in metrics.values()), name


def test_alternate_training_on_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=40):
    config = mtl_dist.TrainConfig(
        model_dir=str(tmp_path / "alt"), mode="alternate",
        task_datasets={"digits": "tfds:mnist:label",
                       "fashion": "tfds:fashion_mnist:label"},
        data_dir=EMPTY_DATA_DIR, train_steps=8, steps_per_loop=4,
        log_every=4, eval_every=8, checkpoint_every=8, num_cpu_devices=2,
        global_batch_size=8, trunk_width=16)
    summary = mtl_dist.train(config)
  assert summary["task_steps"] == {"digits": 4, "fashion": 4}
  assert set(summary["eval"]["digits"]) == {"loss", "accuracy"}


def _store(name: str, data_dir: str, image_shape, num_classes: int,
           seed: int) -> None:
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 60, (n, *image_shape)).astype(np.uint8)
    images[np.arange(n), labels] = 255  # The class is visible in the image.
    value = labels.astype(np.float32) / num_classes
    value[::3] = np.nan  # A third of the examples lack the regression label.
    return tf.data.Dataset.from_tensor_slices({
        "image": images, "label": labels, "value": value,
        "flag": labels % 2 == 0})

  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=image_shape),
      "label": tfds.features.ClassLabel(num_classes=num_classes),
      "value": tf.float32, "flag": tf.bool})
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version="1.0.0", features=features, data_dir=data_dir,
      split_datasets={"train": split(240), "test": split(64)})


@pytest.fixture(scope="module")
def stored_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  _store("mtl_toy_gray", data_dir, (8, 8, 1), 3, seed=0)
  _store("mtl_toy_rgb", data_dir, (8, 8, 3), 4, seed=1)
  return data_dir


_SHORT = ["--train_steps=40", "--steps_per_loop=20", "--log_every=20",
          "--eval_every=40", "--checkpoint_every=40", "--global_batch_size=16",
          "--num_cpu_devices=2", "--trunk_width=32"]


@pytest.mark.slow
def test_launcher_reads_a_prepared_dataset_by_name(tmp_path, stored_data_dir):
  model_dir = str(tmp_path / "joint")
  result = run_launcher(f"--model_dir={model_dir}", "--dataset=tfds:mtl_toy_gray",
                        f"--data_dir={stored_data_dir}", "--input_key=image",
                        "--tasks=label,value,flag", "--partial_labels",
                        *_SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "auto_shard" not in result.stderr.lower()
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert set(summary["eval"]["label"]) == {"loss", "accuracy"}
  assert set(summary["eval"]["flag"]) == {"loss", "accuracy"}
  assert set(summary["eval"]["value"]) == {"loss", "mae"}
  for name, metrics in summary["eval"].items():  # NaN targets were masked.
    assert all(np.isfinite(v) for v in metrics.values()), name


@pytest.mark.slow
def test_alternate_inputs_must_agree_after_preprocessing(tmp_path,
                                                         stored_data_dir):
  flags = [f"--data_dir={stored_data_dir}", "--mode=alternate",
           "--task_datasets=gray=tfds:mtl_toy_gray:label,"
           "rgb=tfds:mtl_toy_rgb:label", *_SHORT]
  refused = run_launcher(f"--model_dir={tmp_path / 'bad'}", *flags)
  assert refused.returncode == 2, refused.stderr[-3000:]
  (error,) = [line for line in refused.stderr.splitlines()
              if line.startswith("mtl-train: error:")]
  for part in ("mtl_toy_gray", "mtl_toy_rgb", "(8, 8, 1)", "(8, 8, 3)"):
    assert part in error
  assert not (tmp_path / "bad").exists()

  model_dir = str(tmp_path / "good")
  result = run_launcher(f"--model_dir={model_dir}", *flags, "--channels=1")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["task_steps"] == {"gray": 20, "rgb": 20}


@pytest.mark.slow
def test_unprepared_dataset_exits_2_naming_dataset_and_data_dir(tmp_path):
  empty = tmp_path / "empty_tfds"
  empty.mkdir()
  model_dir = tmp_path / "run"
  result = run_launcher(f"--model_dir={model_dir}", "--dataset=tfds:mnist",
                        f"--data_dir={empty}", "--tasks=label", startups=4)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "mnist" in result.stderr and str(empty) in result.stderr
  assert "--download" in result.stderr and "Traceback" not in result.stderr
  assert not model_dir.exists()
  assert not any(empty.iterdir()), "something was downloaded"


def test_unknown_split_names_the_flag(stored_data_dir):
  config = mtl_dist.TrainConfig(model_dir="unused", dataset="tfds:mtl_toy_gray",
                                data_dir=stored_data_dir, tasks=["label"],
                                eval_split="validation")
  config.validate()
  with pytest.raises(mtl_dist.ConfigError,
                     match="--eval_split=validation: no such split"):
    data_lib.load(config.data_config())


def test_file_sharding_falls_back_to_example_sharding(stored_data_dir):
  config = mtl_dist.TrainConfig(model_dir="unused", dataset="tfds:mtl_toy_gray",
                                data_dir=stored_data_dir, tasks=["label"])
  (source,) = data_lib.load(config.data_config()).train
  assert source.num_examples == 240
  # TFRecord files of fixed-shape features: records are parsed per batch.
  assert source.decode_batch is not None
  shards = [source.read(tf.distribute.InputContext(2, i, 2), 0, False)
            for i in range(2)]
  counts = [sum(1 for _ in shard) for shard in shards]
  assert counts == [120, 120]
  image, labels = next(iter(source.decoded(shards[0], 8).unbatch()))
  assert image.dtype == tf.float32 and float(tf.reduce_max(image)) <= 1.0
  assert labels["label"].dtype == tf.int32


def _doc_tfds_commands() -> list[list[str]]:
  """The mtl-train commands of docs/data.md's TFDS section, as arguments."""
  import re  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  page = open(os.path.join(os.path.dirname(__file__), "..", "docs",
                           "data.md")).read()
  section = page.split("## Real datasets through TFDS", 1)[1]
  block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL).group(1)
  commands = []
  for command in block.replace("\\\n", " ").splitlines():
    command = command.split("#", 1)[0].strip()
    if command:
      commands.append(shlex.split(command))
  return commands


def test_doc_tfds_commands_run_on_mock_data(tmp_path):
  """docs/data.md's TFDS examples, with mock data instead of the download."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  from launch import train as launcher  # pylint: disable=g-import-not-at-top
  commands = _doc_tfds_commands()
  assert [c[0] for c in commands] == ["mtl-train", "mtl-train"]
  for i, argv in enumerate(commands):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
      config = launcher._config_from_flags()
    finally:
      flags.FLAGS.unparse_flags()
    assert config.download
    config.model_dir = str(tmp_path / f"run{i}")
    config.download = False  # mock_data stands in for the download.
    config.data_dir = EMPTY_DATA_DIR
    config.train_steps, config.steps_per_loop = 4, 2
    config.log_every = config.eval_every = config.checkpoint_every = 4
    config.global_batch_size = 8
    with tfds.testing.mock_data(num_examples=24):
      summary = mtl_dist.train(config)
    assert summary["step"] == 4
    assert set(summary["eval"]) == {t.rsplit("/", 1)[-1] for t in (
        config.tasks or config.task_datasets)}


def test_batched_parsing_matches_tfds_per_example_decoding(stored_data_dir):
  config = mtl_dist.TrainConfig(model_dir="unused", dataset="tfds:mtl_toy_rgb",
                                data_dir=stored_data_dir,
                                tasks=["label", "value", "flag"],
                                partial_labels=True)
  (source,) = data_lib.load(config.data_config()).train
  assert source.decode_batch is not None
  batches = list(source.decoded(source.read(None, 0, False), 32))
  images = np.concatenate([b[0].numpy() for b in batches])
  labels = {k: np.concatenate([b[1][k].numpy() for b in batches])
            for k in ("label", "value", "flag")}
  reference = list(tfds.as_numpy(tfds.load(
      "mtl_toy_rgb", split="train", data_dir=stored_data_dir, download=False,
      shuffle_files=False)))
  assert len(images) == len(reference) == 240
  np.testing.assert_array_equal(
      images, np.stack([r["image"] for r in reference]) / np.float32(255))
  np.testing.assert_array_equal(labels["label"],
                                [r["label"] for r in reference])
  np.testing.assert_array_equal(labels["value"][:, 0],
                                [r["value"] for r in reference])
  np.testing.assert_array_equal(labels["flag"], [r["flag"] for r in reference])


@pytest.fixture(scope="module")
def nested_data_dir(tmp_path_factory):
  """A stored dataset with nested labels, as celeb_a has."""
  data_dir = str(tmp_path_factory.mktemp("tfds_nested"))
  rng = np.random.default_rng(5)

  def split(n):
    return tf.data.Dataset.from_tensor_slices({
        "image": rng.integers(0, 255, (n, 12, 12, 3)).astype(np.uint8),
        "attributes": {"Smiling": rng.integers(0, 2, n).astype(bool),
                       "pose": rng.integers(0, 4, n).astype(np.int64)},
        "landmarks": {"nose": rng.normal(size=(n, 2)).astype(np.float32)}})

  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(12, 12, 3)),
      "attributes": {"Smiling": tf.bool,
                     "pose": tfds.features.ClassLabel(num_classes=4)},
      "landmarks": {"nose": tfds.features.Tensor(shape=(2,),
                                                 dtype=np.float32)}})
  tfds.dataset_builders.store_as_tfds_dataset(
      name="mtl_toy_nested", version="1.0.0", features=features,
      data_dir=data_dir, split_datasets={"train": split(96), "test": split(32)})
  return data_dir


def test_batched_parsing_reads_nested_features(nested_data_dir):
  config = mtl_dist.TrainConfig(
      model_dir="unused", dataset="tfds:mtl_toy_nested",
      data_dir=nested_data_dir, image_size=[8, 8],
      tasks=["attributes/Smiling", "attributes/pose", "landmarks/nose"])
  (source,) = data_lib.load(config.data_config()).train
  (per_example,) = tfds_data.load_joint(config.data_config(),
                                        batched_parsing=False).train
  assert source.decode_batch is not None and per_example.decode_batch is None
  batched = next(iter(source.decoded(source.read(None, 0, False), 96)))
  reference = next(iter(per_example.decoded(per_example.read(None, 0, False),
                                            96)))
  assert batched[0].shape == (96, 8, 8, 3)
  np.testing.assert_allclose(batched[0].numpy(), reference[0].numpy(),
                             atol=1e-6)
  assert set(batched[1]) == {"Smiling", "pose", "nose"}
  for name in ("Smiling", "pose", "nose"):
    assert batched[1][name].dtype == reference[1][name].dtype, name
    np.testing.assert_array_equal(batched[1][name].numpy(),
                                  reference[1][name].numpy())
  assert batched[1]["nose"].shape == (96, 2)


@pytest.mark.slow
def test_launcher_trains_on_nested_features_with_batched_parsing(
    tmp_path, nested_data_dir):
  model_dir = str(tmp_path / "nested")
  result = run_launcher(f"--model_dir={model_dir}",
                        "--dataset=tfds:mtl_toy_nested",
                        f"--data_dir={nested_data_dir}", "--image_size=8,8",
                        "--tasks=attributes/Smiling,attributes/pose,"
                        "landmarks/nose", *_SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert set(summary["eval"]) == {"Smiling", "pose", "nose"}


def test_streamed_pipeline_with_batch_decoding_resumes_exactly(
    stored_data_dir):
  config = mtl_dist.TrainConfig(model_dir="unused",
                                dataset="tfds:mtl_toy_gray",
                                data_dir=stored_data_dir, tasks=["label"])
  (source,) = data_lib.load(config.data_config()).train
  assert source.decode_batch is not None
  strategy = mtl_dist.create_strategy("mirrored", 2)

  def batches(start_step, count):
    iterator = iter(data_lib.distribute_train(
        strategy, source, 16, seed=3, start_step=start_step,
        exact_resume=True))
    return [np.concatenate([v.numpy() for v in
                            strategy.experimental_local_results(
                                next(iterator)[0])])
            for _ in range(count)]

  uninterrupted = batches(0, 18)  # 240 examples: past one epoch at step 15.
  resumed = batches(16, 2)
  for step, batch in enumerate(resumed, start=16):
    np.testing.assert_array_equal(batch, uninterrupted[step])


def test_decode_batch_needs_read():
  with pytest.raises(ValueError, match="decode_batch applies to what `read`"):
    data_lib.ExampleSource(task_names=("x",), make_dataset=lambda: None,
                           num_examples=1, decode_batch=lambda batch: batch)
