"""The docs run as written: README.md's and docs/api.md's Python examples,
the shell blocks of README.md and of the docs pages in DOC_PAGES, and the
README's commands match CI."""

import glob
import json
import os
import re
import subprocess
import sys

from conftest import time_limit
import pytest

from mtl_dist.methods import registry

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(ROOT, "README.md")
API_DOC = os.path.join(ROOT, "docs", "api.md")
FLAGS_DOC = os.path.join(ROOT, "docs", "flags.md")
# The pages whose shell blocks run after README.md's, in this order: a block
# may use the runs of the blocks before it (docs/running.md uses the README's
# /tmp/mtl_shapes).
DOC_PAGES = [
    "docs/modes.md",
    "docs/architectures.md",
    "docs/methods.md",
    "docs/data.md",
    "docs/running.md",
    "docs/fault_tolerance.md",
    "docs/cluster.md",
    "docs/speed.md",
    "docs/flags.md",
    "docs/api.md",
    "docs/design.md",
]
# Pages with shell blocks that are not in DOC_PAGES, and what runs them.
NOT_COLLECTED = {
    "docs/benchmarks.md": "tests/test_benchmarks.py runs benchmarks.run --quick",
}
CI_SCRIPT = os.path.join(ROOT, ".ci", "run")
# Marks a shell block the tests do not run, with the reason, right above it.
_NOT_RUN = re.compile(r"<!-- not run by the tests: (.+?) -->\s*$")


def _blocks(path: str, language: str) -> list[tuple[str, str]]:
  """(the text before the block, the block) for each `language` block."""
  text = open(path).read()
  return [(text[:match.start()], match.group(1)) for match in re.finditer(
      rf"^ *```{language}\n(.*?)^ *```", text, flags=re.DOTALL | re.MULTILINE)]


def _fresh_machine_commands() -> list[str]:
  return [block.strip() for _, block in _blocks(README, "sh")
          if block.strip().startswith("python3 -m venv")]


@pytest.mark.parametrize("path", [README, API_DOC],
                         ids=["README.md", "docs/api.md"])
def test_python_examples_run(path, tmp_path, monkeypatch, capsys):
  examples = [block for _, block in _blocks(path, "python")]
  assert examples
  monkeypatch.chdir(tmp_path)
  for example in examples:  # Each in a namespace of its own.
    exec(compile(example, path, "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  assert "accuracy" in printed
  assert list((tmp_path / "runs").glob("*/summary.json"))


def test_readme_shows_two_fresh_machine_commands_and_ci_runs_the_tests():
  commands = _fresh_machine_commands()
  assert len(commands) == 2
  install_and_train, install_and_test = commands
  assert "mtl-train" in install_and_train
  test_command = install_and_test.split("&&")[-1].strip()
  ci_lines = [line.strip() for line in open(CI_SCRIPT)
              if line.strip() and not line.lstrip().startswith("#")]
  assert test_command in ci_lines
  assert 'pip install -e ".[test]"' in ci_lines


def test_every_launcher_flag_is_in_the_flags_doc_table():
  source = open(os.path.join(ROOT, "launch", "train.py")).read()
  names = re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source)
  assert len(names) > 40
  table = "".join(line.split("|")[1] for line in open(FLAGS_DOC)
                  if line.startswith("| `--"))
  # Method options are defined in a loop over the registries.
  names += [flag for kind in (registry.AGGREGATORS, registry.WEIGHTINGS)
            for flag, _, _ in kind.options()]
  missing = [name for name in names
             if not re.search(rf"`--(\[no\])?{name}`", table)]
  assert not missing


def test_every_method_has_a_row_in_the_methods_doc():
  text = open(os.path.join(ROOT, "docs", "methods.md")).read()
  rows = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
  registered = [name for kind in (registry.AGGREGATORS, registry.WEIGHTINGS)
                for name in kind.names() if not name.startswith("test_")]
  assert [name for name in registered if name not in rows] == []


def _runnable_doc_blocks() -> tuple[list[str], list[str]]:
  """The shell blocks to run, in order, and the reasons of the rest.

  README.md's blocks come first, then each page of DOC_PAGES in turn.
  Of the fresh-machine commands, what follows `pip install` runs: creating
  the environment and installing is what CI's `.ci/run` does (checked
  above), and the test command is the suite this test is part of.
  """
  runnable, reasons = [], []
  for path in [README] + [os.path.join(ROOT, page) for page in DOC_PAGES]:
    for before, block in _blocks(path, "sh"):
      marker = _NOT_RUN.search(before)
      if marker:
        reasons.append(marker.group(1))
        continue
      if block.strip().startswith("python3 -m venv"):
        after_install = block.strip().split("&&")[3:]
        if "pytest" not in block:
          runnable.append("&&".join(after_install))
        continue
      runnable.append(block)
  return runnable, reasons


def test_every_doc_shell_block_runs_or_says_why_not():
  runnable, reasons = _runnable_doc_blocks()
  assert len(runnable) >= 4
  for reason in reasons:  # Only what this machine cannot give.
    assert re.search(r"network|cluster|GPU", reason), reason


def test_every_docs_page_with_shell_blocks_is_collected():
  pages = sorted(os.path.relpath(path, ROOT) for path in
                 glob.glob(os.path.join(ROOT, "docs", "*.md")))
  with_blocks = [page for page in pages
                 if _blocks(os.path.join(ROOT, page), "sh")]
  assert not [page for page in with_blocks
              if page not in DOC_PAGES and page not in NOT_COLLECTED]
  assert all(os.path.exists(os.path.join(ROOT, page)) for page in DOC_PAGES)


@pytest.mark.slow
@pytest.mark.xdist_group("localhost_cluster")  # mtl-local-cluster.
def test_doc_shell_blocks_run_as_written(tmp_path):
  """Each block runs in the checkout with bash -e, in the order of README.md
  and DOC_PAGES (later blocks use earlier blocks' runs); /tmp/ is this
  test's scratch directory."""
  runnable, _ = _runnable_doc_blocks()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ["PATH"])
  scratch = f"{tmp_path}/"
  for block in runnable:
    script = block.replace("/tmp/", scratch)
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=time_limit(19), check=False)
    assert done.returncode == 0, (block, done.stderr[-3000:])
  assert (tmp_path / "mtl_shapes" / "report.png").exists()
  assert (tmp_path / "predictions.jsonl").read_text().count("\n") == 8
  # The sidecar (mtl-eval --watch beside mtl-train) evaluated checkpoints
  # once each, in order, up to the last one, as training itself did.
  side = tmp_path / "mtl_side"
  records = [json.loads(line)
             for line in (side / "evaluations.jsonl").read_text().splitlines()]
  steps = [record["step"] for record in records]
  assert steps == sorted(set(steps)) and steps[-1] == 1500, steps
  summary = json.loads((side / "summary.json").read_text())
  for task, metrics in summary["eval"].items():
    for name, value in metrics.items():
      assert abs(records[-1]["metrics"][f"{task}/{name}"] - value) <= (
          1e-5 * max(1.0, abs(value)))


def test_the_methods_catalogue_matches_the_registries():
  text = open(os.path.join(ROOT, "docs", "methods.md")).read()
  section = text.split("## The catalogue at a glance")[1].split("\n## ")[0]
  rows = {}
  for line in section.splitlines():
    if line.startswith("| `"):
      cells = [cell.strip() for cell in line.strip("|").split(" | ")]
      rows[cells[0].strip("`")] = cells
  for kind, level in ((registry.AGGREGATORS, "aggregator"),
                      (registry.WEIGHTINGS, "weighting")):
    for name in kind.names():
      if name.startswith("test_"):
        continue
      cls = kind.get(name)
      _, row_level, _, _, promises, rep_grad, _, flags = rows.pop(name)
      assert row_level == level, name
      if name != "static":  # Its flag is --task_weights.
        assert set(re.findall(r"`--(\w+)`", flags)) == {
            f"{name}_{option.name}" for option in cls.options}, name
      if level == "aggregator":
        assert set(promises.split(", ")) - {"\u2014"} == set(cls.promises), name
        assert rep_grad == ("yes" if cls.has_gram_form else "no"), name
  assert not rows, f"rows of unregistered methods: {sorted(rows)}"
