"""The benchmark harness: its arithmetic, and a --quick run of every comparison.

Benchmarks are not tests: nothing here asserts a speed. These tests keep the
harness from rotting: ratios are paired and inverted correctly, the FLOP
count matches the model, whole processes are timed at two lengths, the
recipes they are compared with run, and `python -m benchmarks.run --quick`
runs every comparison end to end and writes its report.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

from conftest import communicate
from conftest import time_limit
import numpy as np
import pytest

from benchmarks import comparisons
from benchmarks import contenders
from benchmarks import harness
from benchmarks import recipes
from mtl_dist.data import shapes
from mtl_dist.methods import catalog
from mtl_dist.methods import registry

ROOT = os.path.join(os.path.dirname(__file__), "..")


class _Scripted:
  """A contender whose segments take scripted (not measured) seconds."""

  def __init__(self, name, seconds_per_step):
    self.name = name
    self.work_per_step = 10
    self._seconds = list(seconds_per_step)
    self.started = False

  def start(self):
    self.started = True

  def run(self, steps):
    return steps * self._seconds.pop(0)


def test_measure_pairs_repetitions_and_judges_ratios():
  # Warm-up segment first (not reported), then one value per repetition.
  fast = _Scripted("fast", [9.0, 0.01, 0.02, 0.01])
  slow = _Scripted("slow", [9.0, 0.02, 0.02, 0.04])
  results = harness.measure([fast, slow], steps=5, repeats=3,
                            log=lambda _: None)
  assert fast.started and slow.started
  assert [r.name for r in results] == ["fast", "slow"]
  assert results[0].throughput == pytest.approx([1000, 500, 1000])
  assert results[1].throughput == pytest.approx([500, 500, 250])
  # Paired per repetition: 2, 1, 4 -> median 2 (unpaired medians give 2 too,
  # but the range shows the pairing).
  verdict = harness.judge(results, harness.Claim("fast / slow", "fast",
                                                 "slow", target=1.5))
  assert (verdict.ratio, verdict.low, verdict.high) == pytest.approx((2, 1, 4))
  assert verdict.outcome == "met"
  cost = harness.judge(results, harness.Claim("cost", "slow", "fast",
                                              invert=True))
  assert cost.ratio == pytest.approx(2) and cost.outcome == ""
  missed = harness.judge(results, harness.Claim("slow / fast", "slow", "fast",
                                                target=1.0))
  assert missed.ratio == pytest.approx(0.5) and missed.outcome == "missed"
  table = harness.verdicts_table([verdict, missed])
  assert "| fast / slow | 2.00x (1.00-4.00) | >= 1.5x | met |" in table
  assert "| slow / fast | 0.50x (0.25-1.00) | >= 1x | missed |" in table


def test_a_contender_without_warm_up_runs_only_the_timed_segments():
  launched = _Scripted("launched", [0.01, 0.02])
  launched.warm_up = False
  (result,) = harness.measure([launched], steps=1, repeats=2,
                              log=lambda _: None)
  assert result.throughput == pytest.approx([1000, 500])


def test_process_contender_times_the_difference_of_two_lengths(
    monkeypatch):
  walls = {100: 3.0, 150: 5.5}  # Seconds of a whole process, by length.
  calls, directories = [], []

  def command(steps, directory):
    assert os.path.isdir(directory) and not os.listdir(directory)
    directories.append(directory)
    return ["train", f"--model_dir={directory}", str(steps)]

  def run_process(argv):
    calls.append(int(argv[-1]))
    return walls[int(argv[-1])]

  monkeypatch.setattr(contenders, "run_process", run_process)
  contender = contenders.ProcessContender("p", command, global_batch_size=8,
                                          base_steps=100)
  assert contender.warm_up is False and contender.work_per_step == 8
  (result,) = harness.measure([contender], steps=50, repeats=3,
                              log=lambda _: None)
  # start() runs the short length once; then each repetition both, the
  # first of them alternating.
  assert calls == [100, 100, 150, 150, 100, 100, 150]
  assert result.throughput == pytest.approx([8 * 50 / 2.5] * 3)
  assert len(set(directories)) == len(calls)  # A fresh directory each.
  assert not any(os.path.exists(d) for d in directories)  # Removed.

  walls[150] = 3.0  # 50 steps more take no longer: start-up noise wins.
  with pytest.raises(RuntimeError, match="too short for the start-up noise"):
    contender.run(50)


def test_process_contender_appends_the_length_to_a_command_list(
    monkeypatch):
  commands = []
  monkeypatch.setattr(contenders, "run_process",
                      lambda argv: commands.append(argv) or len(commands))
  contender = contenders.ProcessContender(
      "recipe", contenders.recipe_command("fit", ["--tasks=shape"]), 32, 10)
  assert contender.run(5) == 1  # Second process minus first.
  assert commands == [
      [sys.executable, "-m", "benchmarks.recipes", "fit", "--tasks=shape",
       f"--train_steps={steps}"] for steps in (10, 15)]


def test_process_contender_runs_real_processes():
  # Each process sleeps 5 ms per step: 200 steps more are 1 s more.
  sleep = [sys.executable, "-c", "import sys, time; "
           "time.sleep(int(sys.argv[1].split('=')[1]) * 0.005)"]
  contender = contenders.ProcessContender("sleep", sleep, 4, base_steps=10)
  contender.start()
  assert contender.run(200) > 0

  failing = contenders.ProcessContender(
      "failing", [sys.executable, "-c", "import sys; sys.exit('no data')"],
      4, base_steps=10)
  with pytest.raises(RuntimeError) as error:
    failing.start()
  message = str(error.value)
  assert f"{sys.executable} -c" in message and "--train_steps=10" in message
  assert "exited 1" in message and message.endswith("no data\n")


def test_processes_import_this_checkout(monkeypatch):
  root = os.path.abspath(ROOT)
  monkeypatch.setenv("PYTHONPATH", "/elsewhere")
  env = contenders.process_environment()
  assert env["PYTHONPATH"] == f"{root}{os.pathsep}/elsewhere"
  assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
  monkeypatch.delenv("PYTHONPATH")
  assert contenders.process_environment()["PYTHONPATH"] == root


def test_launcher_command_trains_in_the_given_model_dir():
  command = contenders.launcher_command(["--mode=joint"])
  assert command(7, "/tmp/run") == [
      sys.executable, "-m", "launch.train", "--model_dir=/tmp/run",
      "--train_steps=7", "--mode=joint"]
  cluster = contenders.launcher_command(["--mode=joint"], num_workers=2)
  assert cluster(7, "/tmp/run")[2:5] == [
      "launch.local_cluster", "--num_workers=2", "--"]


def _steps_of(command):
  (flag,) = [a for a in command if a.startswith("--train_steps=")]
  return int(flag.split("=")[1])


def test_launcher_comparison_runs_the_processes_it_describes(monkeypatch):
  commands = []

  def run_process(command):  # 5 s of start-up, then 1 ms a step.
    commands.append(command)
    return 5.0 + 1e-3 * _steps_of(command)

  monkeypatch.setattr(contenders, "run_process", run_process)
  # With Model Garden (faked: no process starts, installed or not).
  find_spec = comparisons.importlib.util.find_spec
  monkeypatch.setattr(
      comparisons.importlib.util, "find_spec",
      lambda name, *args: object() if name == "official" else find_spec(
          name, *args))
  section = comparisons.launcher(harness.Settings(quick=False, repeats=2),
                                 None)
  overhead, compute = (comparisons.OVERHEAD_BOUND.describe(),
                       comparisons.COMPUTE_BOUND.describe())
  assert [caption for caption, _, _ in section.tables] == [
      f"**Alternate mode, tasks shape, scale: {overhead}; N = 20000**",
      f"**Joint mode, five tasks: {compute}; N = 400**",
      f"**Joint mode, five tasks: {overhead}; N = 20000**"]
  names = [[r.name for r in results] for _, results, _ in section.tables]
  assert names == [["mtl-train alternate", "mtl-train single task",
                    "naive recipe", "Model Garden interleaving"],
                   ["mtl-train joint", "fit"], ["mtl-train joint", "fit"]]
  # The start-up cancels: 1 ms a step is a global batch per ms.
  batches = [size.global_batch_size for size in (
      comparisons.OVERHEAD_BOUND, comparisons.COMPUTE_BOUND,
      comparisons.OVERHEAD_BOUND)]
  for (_, results, _), batch in zip(section.tables, batches):
    for r in results:
      assert r.throughput == pytest.approx([batch * 1000] * 2)
  assert [(v.claim.label, v.claim.target, v.ratio) for v in
          section.verdicts] == [
              ("alternate / naive recipe", 1.5, pytest.approx(1)),
              ("alternate / Model Garden interleaving", 1.0,
               pytest.approx(1)),
              ("alternate / single task", 0.9, pytest.approx(1)),
              (f"{compute}: mtl-train joint / fit (steps_per_execution=1)",
               1.0, pytest.approx(1)),
              (f"{overhead}: mtl-train joint / fit (steps_per_execution=1)",
               1.5, pytest.approx(1))]
  # Each contender: one short run to start, then short and long in turn.
  assert len(commands) == 8 * 5
  assert sorted({_steps_of(c) for c in commands}) == [200, 600, 20200]
  trains = [c for c in commands if c[1:3] == ["-m", "launch.train"]]
  assert len(trains) == 4 * 5
  for command in trains:
    assert command[3].startswith("--model_dir=")
    for flag in ("--strategy=one_device", "--optimizer=adam",
                 "--log_every=1000000", "--eval_every=1000000",
                 "--checkpoint_every=1000000"):
      assert flag in command
  fits = [c for c in commands if c[1:4] == ["-m", "benchmarks.recipes",
                                            "fit"]]
  assert len(fits) == 2 * 5
  assert all("--steps_per_loop=1" in c and
             f"--tasks={','.join(shapes.TASK_NAMES)}" in c for c in fits)
  assert not section.notes

  # Without Model Garden, and in --quick mode: not the compute-bound model.
  commands.clear()
  monkeypatch.setattr(comparisons.importlib.util, "find_spec",
                      lambda name: None)
  quick = comparisons.launcher(harness.Settings(quick=True, repeats=1), None)
  assert [len(results) for _, results, _ in quick.tables] == [3, 2]
  assert len(quick.verdicts) == 3
  assert recipes.MODEL_GARDEN_INSTALL in quick.notes
  assert sorted({_steps_of(c) for c in commands}) == [100, 4100]


_TINY_RECIPE = ["--train_steps=4", "--steps_per_loop=2", "--tasks=shape,x",
                "--trunk_width=8", "--trunk_depth=1", "--global_batch_size=4"]


def _recipe(*args):
  return subprocess.Popen(
      [sys.executable, "-m", "benchmarks.recipes", *args], cwd=ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("recipe", [
    "naive_alternate", "fit",
    pytest.param("model_garden", marks=pytest.mark.skipif(
        importlib.util.find_spec("official") is None,
        reason="TF Model Garden is not installed (an optional dependency: "
        f"{recipes.MODEL_GARDEN_INSTALL})"))])
def test_each_recipe_trains_in_a_whole_process(recipe):
  process = _recipe(recipe, *_TINY_RECIPE)
  stdout, stderr = communicate(process, f"the {recipe} recipe", 3)
  assert process.returncode == 0, stderr[-3000:]
  if recipe == "model_garden":
    assert stdout.splitlines()[-1] == "global step 4"
  else:
    last = stdout.splitlines()[-1]
    assert last.startswith("last loss ")
    assert math.isfinite(float(last.split()[-1]))


def test_recipes_refuse_bad_arguments_in_one_error_line():
  cases = {"--tasks": ("naive_alternate", "--train_steps=3",
                       "--tasks=shape,nope"),
           "--train_steps": ("fit", "--train_steps=0")}
  processes = {flag: _recipe(*args) for flag, args in cases.items()}
  errors = {}
  for flag, process in processes.items():
    _, stderr = communicate(process, f"the recipe refusing {flag}", 2)
    assert process.returncode == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines()
             if line.startswith("python -m benchmarks.recipes: error: ")]
    assert len(lines) == 1 and lines[0] == stderr.splitlines()[-1], stderr
    errors[flag] = lines[0]
  assert errors["--tasks"].endswith(
      "--tasks: unknown nope (known: shape, scale, orientation, x, y)")
  assert errors["--train_steps"].endswith(
      "argument --train_steps: must be at least 1, not 0")


def test_matmul_flops_of_a_training_step():
  tasks = [t for t in shapes.TASKS if t.name in ("shape", "x")]
  size = contenders.ModelSize(width=8, depth=2, global_batch_size=4)
  shapes_of_step = contenders.dense_matmuls(16, tasks, size)
  # Layers 16->8, 8->8, heads 8->3 and 8->1: forward and kernel gradient
  # for each, the input's gradient for all but the first.
  layer_flops = [2 * 4 * k * n for k, n in ((16, 8), (8, 8), (8, 3), (8, 1))]
  expected = 2 * layer_flops[0] + 3 * sum(layer_flops[1:])
  assert contenders.matmul_flops(shapes_of_step) == expected
  assert len(shapes_of_step) == 2 + 3 * 3


def _method(name, gram=False, sub_batches=None):
  attributes = {"name": name, "has_gram_form": gram}
  if sub_batches is not None:
    attributes["sub_batches"] = sub_batches
  return type(name, (), attributes)


def test_method_rows_come_from_the_registries(monkeypatch):
  weightings = registry.Registry(catalog.Catalogue(
      "weighting", ("static", "dwa"), ()))
  aggregators = registry.Registry(catalog.Catalogue(
      "aggregator", ("sum", "pcgrad"), ()))
  for name in ("static", "dwa", "test_weighting", "famo"):
    weightings.register(_method(name), catalog.Method(name, name))
  for method in (_method("sum"), _method("pcgrad"), _method("mgda", True),
                 _method("test_gram", True), _method("modo", sub_batches=3)):
    aggregators.register(method, catalog.Method(
        method.name, method.name, has_gram_form=method.has_gram_form,
        sub_batches=getattr(method, "sub_batches", 1)))
  monkeypatch.setattr(registry, "WEIGHTINGS", weightings)
  monkeypatch.setattr(registry, "AGGREGATORS", aggregators)
  rows = comparisons._method_rows()
  assert rows == [
      ("sum", {}), ("dwa", {"weighting": "dwa"}),
      ("famo", {"weighting": "famo"}), ("pcgrad", {"aggregator": "pcgrad"}),
      ("mgda", {"aggregator": "mgda"}), ("modo", {"aggregator": "modo"}),
      ("mgda --rep_grad", {"aggregator": "mgda", "rep_grad": True})]
  # Every row trains the same global batch, which modo's 3 sub-batches
  # divide; without it, the default model's.
  assert comparisons._methods_size(rows).global_batch_size == 66
  assert comparisons._methods_size(rows[:5]) == comparisons.DEFAULT


def test_linear_tasks_are_distinct_unit_variance_regressions():
  tasks, features, labels = comparisons._linear_tasks(512, 3)
  assert [(t.name, t.kind, t.output_size) for t in tasks] == [
      (f"t{i}", "regression", 1) for i in range(3)]
  assert features.shape == (512, 32, 32, 1) and features.dtype == np.float32
  targets = np.concatenate([labels[t.name] for t in tasks], axis=1)
  assert targets.shape == (512, 3) and targets.dtype == np.float32
  assert np.allclose(targets.std(axis=0), 1.0, atol=0.15)
  assert abs(np.corrcoef(targets.T)[0, 1]) < 0.2  # Different maps.
  assert comparisons._linear_tasks(512, 3)[1] is features  # Cached.


def test_ratio_matrix_shows_each_cell_and_a_dash_where_none():
  verdict = harness.Verdict(harness.Claim("a", "a", "sum", invert=True),
                            1.3, 1.27, 1.41)
  table = harness.ratio_matrix("method", ["a", "b"], ["T = 2", "T = 40"],
                               {("a", "T = 2"): verdict})
  assert table.splitlines() == [
      "| method | T = 2 | T = 40 |", "|---|---:|---:|",
      "| a | 1.30x (1.27-1.41) | - |", "| b | - | - |"]


@pytest.mark.slow
def test_quick_run_measures_every_comparison_and_updates_the_doc(tmp_path):
  doc = tmp_path / "benchmarks.md"
  doc.write_text(f"intro\n{harness.RESULTS_BEGIN}\nstale\n"
                 f"{harness.RESULTS_END}\noutro\n")
  report_path = tmp_path / "report.json"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.run", "--quick", "--repeats=1",
       f"--json_output={report_path}", f"--update_doc={doc}"],
      cwd=ROOT, env=env, capture_output=True, text=True,
      # Comparison 8 adds 56 start-ups: 18 processes of ~3 each, 3 min.
      timeout=time_limit(47 + 56), check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(report_path.read_text())
  sections = report["sections"]
  assert [s["name"] for s in sections] == list(comparisons.ALL)
  for section in sections:
    assert section["contenders"], section["name"]
    for contender in section["contenders"]:
      assert len(contender["throughput"]) == 1
      assert all(t > 0 and math.isfinite(t) for t in contender["throughput"])
      assert contender["startup_seconds"] >= 0
    for verdict in section["verdicts"]:
      assert verdict["ratio"] > 0 and math.isfinite(verdict["ratio"])
      if verdict["target"] is None:
        assert verdict["outcome"] == ""
      else:
        assert verdict["outcome"] == (
            "met" if verdict["ratio"] >= verdict["target"] else "missed")
  # Comparison 6 measures every registered method (as the child process
  # registers them) at T = 2 and 5 in --quick mode.
  (methods,) = [s for s in sections if s["name"] == "methods"]
  rows = [name for name, _ in comparisons._method_rows()]
  assert [c["name"] for c in methods["contenders"]] == rows * 2
  assert [v["label"] for v in methods["verdicts"]] == [
      f"T = {count}: step time of {name} / sum"
      for count in (2, 5) for name in rows[1:]]
  assert "| method | T = 2 | T = 5 |" in result.stdout
  assert "MB at T = 40" in result.stdout
  # Comparison 8 runs whole processes: in --quick mode the alternate group
  # (Model Garden's trainer where it is installed) and the overhead-bound
  # joint one.
  (launcher,) = [s for s in sections if s["name"] == "launcher"]
  model_garden = importlib.util.find_spec("official") is not None
  alternate = ["mtl-train alternate", "mtl-train single task",
               "naive recipe"] + ["Model Garden interleaving"] * model_garden
  assert [c["name"] for c in launcher["contenders"]] == alternate + [
      "mtl-train joint", "fit"]
  labels = ["alternate / naive recipe"] + [
      "alternate / Model Garden interleaving"] * model_garden + [
          "alternate / single task",
          f"{comparisons.OVERHEAD_BOUND.describe()}: mtl-train joint / fit "
          "(steps_per_execution=1)"]
  assert [v["label"] for v in launcher["verdicts"]] == labels
  assert "### 8. The launcher path: whole processes" in result.stdout
  for label in labels:
    assert f"| {label} | " in result.stdout
  assert ("Model Garden's interleaving trainer was not measured" in
          result.stdout) != model_garden
  targets = [v for s in sections for v in s["verdicts"] if v["target"]]
  # --quick measures one model size per comparison: 1(b) twice, 2 at one
  # size x 2 task counts x 2, 3 at one size, 4; 8 the claims above.
  assert len(targets) == 2 + 4 + 1 + 1 + len(labels)
  with pytest.raises(ValueError, match="a cost"):
    harness.Claim("cost", "a", "b", target=1.0, invert=True)
  text = doc.read_text()
  assert text.startswith("intro\n") and text.endswith("outro\n")
  assert "stale" not in text
  for section in sections:
    assert section["title"] in text
  assert "targets missed:" in result.stdout


def test_update_doc_without_markers_fails_before_measuring(tmp_path):
  doc = tmp_path / "benchmarks.md"
  doc.write_text("no markers here\n")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.run", f"--update_doc={doc}"],
      cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
      capture_output=True, text=True, timeout=time_limit(10), check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      "benchmarks.run: error: --update_doc=")
  assert "has no results markers" in result.stderr
  assert "== joint_fit" not in result.stdout
