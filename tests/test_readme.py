"""The README's Python example runs as written, and its commands match CI."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
CI_SCRIPT = os.path.join(os.path.dirname(__file__), "..", ".ci", "run")


def _blocks(language: str) -> list[str]:
  text = open(README).read()
  return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
  (example,) = _blocks("python")
  monkeypatch.chdir(tmp_path)
  exec(compile(example, "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  assert "shape" in printed and "accuracy" in printed
  assert (tmp_path / "runs" / "api_example" / "summary.json").exists()


def test_readme_shows_two_fresh_machine_commands_and_ci_runs_the_tests():
  commands = [block.strip() for block in _blocks("sh")
              if block.strip().startswith("python3 -m venv")]
  assert len(commands) == 2
  install_and_train, install_and_test = commands
  assert "mtl-train" in install_and_train
  test_command = install_and_test.split("&&")[-1].strip()
  ci_lines = [line.strip() for line in open(CI_SCRIPT)
              if line.strip() and not line.lstrip().startswith("#")]
  assert test_command in ci_lines
  assert 'pip install -e ".[test]"' in ci_lines


def test_every_launcher_flag_is_in_the_readme_table():
  launchers = os.path.join(os.path.dirname(__file__), "..", "launch")
  source = open(os.path.join(launchers, "train.py")).read()
  names = re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', source)
  assert len(names) > 40
  table = "".join(line.split("|")[1] for line in open(README)
                  if line.startswith("| `--"))
  missing = [name for name in names
             if not re.search(rf"`--(\[no\])?{name}`", table)]
  assert not missing
