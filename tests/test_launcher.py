"""The mtl-train launcher end to end, in subprocesses; resumes also in process."""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

from conftest import event_tags
from conftest import time_limit
import pytest
import tensorflow as tf

import mtl_dist

pytestmark = pytest.mark.slow

_SMALL = ["--num_cpu_devices=2", "--trunk_width=64", "--steps_per_loop=50",
          "--log_every=100", "--eval_every=150", "--checkpoint_every=150",
          "--eval_examples=1024"]


def run_launcher(*flags: str, startups: float = 10
                 ) -> subprocess.CompletedProcess:
  """mtl-train; `startups`: its time limit (conftest.time_limit)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "launch.train", *flags],
                        capture_output=True, text=True,
                        timeout=time_limit(startups), env=env, check=False)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_joint_end_to_end_then_resume(tmp_path):
  model_dir = str(tmp_path / "joint")
  first = run_launcher(f"--model_dir={model_dir}", "--mode=joint",
                       "--train_steps=300", "--train_examples=4096", *_SMALL)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "shape" in first.stdout and "accuracy" in first.stdout
  assert "step 300/300" in first.stderr and "examples/s" in first.stderr
  assert "ETA" in first.stderr
  # One console line per evaluation, as metrics.jsonl records them.
  assert re.findall(r"step (\d+) eval \| shape: loss=\S+ accuracy=",
                    first.stderr) == ["150", "300"], first.stderr[-3000:]

  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["step"] == 300 and summary["mode"] == "joint"
  assert summary["replicas"] == 2
  assert summary["task_steps"] == {t: 300 for t in
                                   ("shape", "scale", "orientation", "x", "y")}
  assert summary["eval"]["shape"]["accuracy"] > 0.45  # Chance is 1/3.
  assert summary["eval"]["x"]["mae"] < 0.25  # Predicting 0.5 gives 0.25.
  assert summary["examples_per_second"] > 0

  records = read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  # Every 100 steps, and at the checkpoint at 150 (the steps a restart from
  # there would not train again).
  assert [r["step"] for r in train] == [100, 150, 200, 300]
  assert [r["step"] for r in evals] == [150, 300]
  assert {"shape/loss", "x/loss", "examples_per_second"} <= set(
      train[0]["metrics"])
  assert {"shape/accuracy", "shape/loss", "y/mae"} <= set(evals[0]["metrics"])

  checkpoint = tf.train.latest_checkpoint(os.path.join(model_dir,
                                                       "checkpoints"))
  assert checkpoint.endswith("ckpt-300")
  names = [name for name, _ in tf.train.list_variables(checkpoint)]
  assert any(n.startswith("model/trunk/") for n in names)
  for task in ("shape", "x"):
    assert any(n.startswith(f"model/heads/{task}/") for n in names)
  # Per-task loss, weight and step share, the learning rate and the speed.
  assert {"shape/loss", "x/loss", "shape/weight", "x/share", "learning_rate",
          "examples_per_second"} <= event_tags(
              os.path.join(model_dir, "tensorboard", "train"))
  assert {"shape/accuracy", "y/mae"} <= event_tags(
      os.path.join(model_dir, "tensorboard", "eval"))

  # A second run on the same model_dir continues from step 300.
  second = run_launcher(f"--model_dir={model_dir}", "--mode=joint",
                        "--train_steps=400", "--train_examples=4096", *_SMALL)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming from" in second.stderr and "at step 300" in second.stderr
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["step"] == 400 and summary["task_steps"]["shape"] == 400
  train_steps = [r["step"] for r in read_jsonl(
      os.path.join(model_dir, "metrics.jsonl")) if r["split"] == "train"]
  assert train_steps == [100, 150, 200, 300, 400]

  # The finished run run again says so, and trains and records nothing.
  files = {name: open(os.path.join(model_dir, name), "rb").read()
           for name in ("summary.json", "metrics.jsonl")}
  again = run_launcher(f"--model_dir={model_dir}", "--mode=joint",
                       "--train_steps=400", "--train_examples=4096", *_SMALL)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.startswith(
      f"mtl-train: the run in {model_dir} had finished at step 400 already;")
  assert files == {name: open(os.path.join(model_dir, name), "rb").read()
                   for name in files}

  # A different model on the same directory is refused from its config.json,
  # naming the difference, before any restore; nothing is written, and
  # nothing follows the error line.
  config_before = open(os.path.join(model_dir, "config.json")).read()
  third = run_launcher(f"--model_dir={model_dir}", "--mode=joint",
                       "--train_steps=500", *_SMALL[:1], "--trunk_width=32")
  assert third.returncode == 2, third.stderr[-3000:]
  assert third.stderr.splitlines()[-1] == (
      f"mtl-train: error: --model_dir={model_dir}: holds a run with other "
      "settings than these flags: --trunk_width=32 (the run's: "
      "--trunk_width=64). Resume it with its settings (its config.json), or "
      "give a new --model_dir"), third.stderr[-3000:]
  assert "Traceback" not in third.stderr
  assert open(os.path.join(model_dir, "config.json")).read() == config_before


def test_alternate_end_to_end(tmp_path):
  model_dir = str(tmp_path / "alternate")
  result = run_launcher(f"--model_dir={model_dir}", "--mode=alternate",
                        "--tasks=shape,x,y", "--train_steps=450",
                        "--task_sizes=shape=4000,x=1000,y=500", *_SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["mode"] == "alternate" and summary["step"] == 450
  assert summary["task_steps"] == {"shape": 150, "x": 150, "y": 150}
  assert summary["eval"]["shape"]["accuracy"] > 0.45
  names = [n for n, _ in tf.train.list_variables(
      os.path.join(model_dir, "checkpoints"))]
  for task in ("shape", "x", "y"):
    assert any(n.startswith(f"optimizers/{task}/") for n in names)
  train = [r for r in read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
           if r["split"] == "train"]
  assert train[-1]["metrics"]["shape/steps"] == 150
  # One optimizer per task: a learning rate per task.
  assert {"shape/share", "y/share", "shape/learning_rate", "y/learning_rate",
          "x/loss", "examples_per_second"} <= event_tags(
              os.path.join(model_dir, "tensorboard", "train"))
  assert train[-1]["metrics"]["x/learning_rate"] == pytest.approx(1e-3)


@pytest.mark.parametrize("schedule", ["temperature", "annealed"])
def test_sampled_schedule_resumes_with_the_same_choices(tmp_path, schedule):
  """150 steps, then a resume to 300, give each task what 300 steps give.

  Annealed: the split run derives its plan (E = 150 / 30 = 5 epochs) from
  its first --train_steps and keeps it in the checkpoint; the uninterrupted
  run states the same plan with --anneal_epochs=5.
  """
  # In process: the launcher's flags map onto these fields one to one.
  settings = dict(mode="alternate", tasks=["shape", "x", "y"],
                  schedule=schedule, task_sizes={"shape": 3000, "x": 600,
                                                 "y": 150},
                  seed=11, num_cpu_devices=2, trunk_width=64,
                  steps_per_loop=50, log_every=100, eval_every=150,
                  checkpoint_every=150, eval_examples=1024)
  whole_settings = {}
  if schedule == "temperature":
    settings["temperature"] = 1.5
  else:
    settings["steps_per_epoch"] = 30
    whole_settings["anneal_epochs"] = 5
  whole_dir, split_dir = str(tmp_path / "whole"), str(tmp_path / "split")
  mtl_dist.train(mtl_dist.TrainConfig(model_dir=whole_dir, train_steps=300,
                                      **settings, **whole_settings))
  for steps in (150, 300):
    mtl_dist.train(mtl_dist.TrainConfig(model_dir=split_dir,
                                        train_steps=steps, **settings))
  whole_summary = json.load(open(os.path.join(whole_dir, "summary.json")))
  split_summary = json.load(open(os.path.join(split_dir, "summary.json")))
  assert split_summary["task_steps"] == whole_summary["task_steps"]
  steps = whole_summary["task_steps"]
  assert sum(steps.values()) == 300 and steps["shape"] > steps["y"] > 0
  train = [r for r in read_jsonl(os.path.join(whole_dir, "metrics.jsonl"))
           if r["split"] == "train"]
  shares = [train[-1]["metrics"][f"{t}/share"] for t in ("shape", "x", "y")]
  assert abs(sum(shares) - 1.0) < 1e-9
  assert train[-1]["metrics"]["y/epochs"] == steps["y"] * 64 / 150


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa", "gradnorm"])
def test_joint_with_dynamic_weighting(tmp_path, weighting):
  model_dir = str(tmp_path / weighting)
  # In process, like the launcher with the same flags.
  mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=model_dir, tasks=["shape", "x", "y"], weighting=weighting,
      dwa_window=20 if weighting == "dwa" else None, train_examples=2048,
      train_steps=200, num_cpu_devices=2, trunk_width=64, steps_per_loop=50,
      log_every=100, eval_every=150, checkpoint_every=150,
      eval_examples=1024))
  train = [r for r in read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
           if r["split"] == "train"]
  last = train[-1]["metrics"]
  weights = [last[f"{t}/weight"] for t in ("shape", "x", "y")]
  assert all(w > 0 for w in weights) and len(set(weights)) > 1
  if weighting in ("dwa", "gradnorm"):
    assert abs(sum(weights) - 3.0) < 1e-4  # These weights sum to T.
  assert "x/weight" in event_tags(os.path.join(model_dir, "tensorboard",
                                               "train"))
  names = [n for n, _ in tf.train.list_variables(
      os.path.join(model_dir, "checkpoints"))]
  assert any(n.startswith("weighting/") for n in names)


def _toy_regression_script(*flags, startups):
  return subprocess.run(
      [sys.executable, "-m", "benchmarks.toy_regression", *flags],
      capture_output=True, text=True, timeout=time_limit(startups),
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False,
      cwd=os.path.join(os.path.dirname(__file__), ".."))


def test_toy_regression_table_script_runs(tmp_path):
  """The docs' benchmark script, shortened, still produces its table."""
  output = tmp_path / "table.md"
  results = tmp_path / "part.json"
  result = _toy_regression_script(
      "--train_steps=20", "--seeds=2", "--methods=static,gradnorm,pcgrad",
      f"--output={output}", f"--results={results}", startups=13)
  assert result.returncode == 0, result.stderr[-3000:]
  text = output.read_text()
  # A second part, run elsewhere, merges into one table in registry order.
  other = tmp_path / "other.json"
  other.write_text(json.dumps({
      "command": "part two", "train_steps": 20,
      "results": {"mgda": {"losses": [[0.3] * 10, [0.5] * 10],
                           "seconds": [1.0, 3.0]}}}))
  merged = tmp_path / "merged.md"
  result = _toy_regression_script(f"--merge={other},{results}",
                                  f"--output={merged}", startups=4)
  assert result.returncode == 0, result.stderr[-3000:]
  merged_rows = [line.split(" | ")[0][2:] for line in
                 merged.read_text().splitlines() if line.startswith("| ")]
  assert merged_rows[1:] == ["static", "gradnorm", "pcgrad", "mgda"]
  assert "| mgda | 0.400 ± 0.141 |" in merged.read_text()
  assert "part two" in merged.read_text()
  rows = {line.split(" | ")[0][2:]: line.split(" | ")
          for line in text.splitlines() if line.startswith("| ")}
  assert [name for name in rows if name not in ("method", "---|")] == [
      "static", "gradnorm", "pcgrad"], list(rows)
  for name in ("static", "gradnorm", "pcgrad"):
    cells = rows[name]
    # Ten tasks, the mean and the seconds, each task as mean ± std.
    assert len(cells) == 13, cells
    assert all(" ± " in cell for cell in cells[1:12]), cells
    assert float(cells[12].rstrip(" |")) > 0
  assert "--seeds=2" in text and "seeds 0 to 1" in text
  assert "static weighting here" in text and "over 2 seeds" in text
  assert re.search(r"(exceeds|is within) the seeds' spread", text)


def test_toy_regression_script_defaults_to_every_registered_method():
  from mtl_dist.methods import registry  # pylint: disable=g-import-not-at-top
  expected = ["static"] + [
      name for name in (*registry.WEIGHTINGS.names()[1:],
                        *registry.AGGREGATORS.names()[1:])
      if not name.startswith("test_")]
  result = _toy_regression_script("--methods=no_such_method", startups=4)
  assert result.returncode != 0
  known = re.search(r"--methods: unknown no_such_method \(known: ([^)]*)\)",
                    result.stderr)
  assert known, result.stderr[-3000:]
  assert known.group(1).split(", ") == expected


# One case per way a launcher error arises; test_config.py checks every
# validation message in process.
@pytest.mark.parametrize("flags, named", [
    (["--tasks=shape,colour"], "--tasks=shape,colour"),  # From the data.
    (["--task_weights=shape:1"], "--task_weights=shape:1"),  # Flag parsing.
    (["--global_batch_size=33", "--num_cpu_devices=2"],  # The strategy.
     "--global_batch_size=33"),
    (["--train_steps=0"], "--train_steps=0"),  # TrainConfig.validate.
    (["--train_steps=ten"], "--train_steps"),  # absl.
    (["--mode=sideways"], "--mode"),  # absl enum.
    (["--no-such-flag=1"], "no-such-flag"),  # absl, unknown flag.
    (["--profile_steps=1,x"], "--profile_steps=1,x"),  # The launcher.
    (["--architecture=cgc", "--num_levels=3"], "--num_levels"),  # The model.
])
def test_bad_input_exits_2_naming_the_flag(tmp_path, flags, named):
  model_dir = tmp_path / "run"
  result = run_launcher(f"--model_dir={model_dir}", *flags, startups=4)
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("mtl-train: error:")]
  assert len(error_lines) == 1 and named in error_lines[0], result.stderr
  assert "Traceback" not in result.stderr
  assert not model_dir.exists(), "a failed validation wrote into model_dir"


def test_missing_model_dir_exits_2():
  result = run_launcher("--train_steps=10", startups=4)
  assert result.returncode == 2
  assert "--model_dir" in result.stderr and "Traceback" not in result.stderr


def test_nonfinite_loss_stops_with_status_1_or_is_skipped(tmp_path):
  model_dir = str(tmp_path / "diverge")
  flags = [f"--model_dir={model_dir}", "--optimizer=sgd",
           "--learning_rate=1e6", "--log_every=20", "--steps_per_loop=10",
           "--train_examples=1024",
           "--checkpoint_every=10", "--trunk_width=32", "--eval_examples=256"]
  # A sane first run leaves a checkpoint; the diverging resume must not
  # replace it.
  sane = run_launcher(*flags[:1], "--optimizer=sgd", "--train_steps=10",
                      *flags[3:])
  assert sane.returncode == 0, sane.stderr[-3000:]
  stopped = run_launcher(*flags, "--train_steps=200")
  assert stopped.returncode == 1, stopped.stderr[-3000:]
  assert re.search(r"mtl-train: error: NaN or Inf loss of task\(s\) [a-z, ]+ "
                   r"at step \d+; stopped without saving, the newest "
                   r"checkpoint \(.*ckpt-10\)", stopped.stderr), stopped.stderr
  assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [
      "checkpoint", "ckpt-10.data-00000-of-00001", "ckpt-10.index"]

  skipped = run_launcher(*flags, "--train_steps=60", "--on_nonfinite=skip")
  assert skipped.returncode == 0, skipped.stderr[-3000:]
  summary = json.load(open(os.path.join(model_dir, "summary.json")))
  assert summary["step"] == 60 and summary["nonfinite_skipped"] > 0
  records = [r for r in read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
             if r["split"] == "train" and r["step"] > 10]
  assert sum(r["metrics"]["nonfinite_skipped"] for r in records) == summary[
      "nonfinite_skipped"]


def test_every_config_field_is_a_flag_of_the_same_default():
  from absl import flags  # pylint: disable=g-import-not-at-top
  importlib.import_module("launch.train")  # Defines the flags.
  fields = {field.name: field.default
            for field in dataclasses.fields(mtl_dist.TrainConfig)}
  defined = {name: flags.FLAGS[name].default for name in fields
             if name in flags.FLAGS}
  assert sorted(defined) == sorted(fields)
  assert {name: value for name, value in defined.items()
          if name != "model_dir"} == {
              name: value for name, value in fields.items()
              if name != "model_dir"}
