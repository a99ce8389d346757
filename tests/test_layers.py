"""The package's layers: every import goes downward, and none goes round.

The layers, bottom first, are listed in docs/design.md. A module may import
its own layer and the layers below; `mtl_dist/__init__.py` (the public API)
sits above them all.
"""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mtl_dist"
LAYERS = {"errors": 0, "typecheck": 0, "tasks": 0, "cluster": 1, "data": 2, "model": 3,
          "methods": 4, "steps": 5, "loop": 6, "run": 7}


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = ("mtl_dist",) + path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _imports(path: pathlib.Path, modules, top_level_only: bool) -> set[str]:
  """The package's modules that `path` imports (anywhere, or at top level)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else ast.walk(tree)
  found = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith("mtl_dist")):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        found.add(full if full in modules else node.module)
  return found


def _layer(module: str):
  parts = module.split(".")
  return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
  unplaced = [m for m in _modules() if m != "mtl_dist" and _layer(m) is None]
  assert not unplaced, f"modules outside every layer: {unplaced}"


def test_no_module_imports_a_higher_layer():
  modules = _modules()
  upward = []
  for module, path in modules.items():
    mine = _layer(module)
    if mine is None:
      continue
    for imported in _imports(path, modules, top_level_only=False):
      theirs = _layer(imported)
      if theirs is not None and theirs > mine:
        upward.append(f"{module} -> {imported}")
  assert not upward, f"imports of a higher layer: {upward}"


def test_no_import_circle():
  modules = _modules()
  graph = {m: {d for d in _imports(p, modules, top_level_only=True)
               if d in modules and d != m} for m, p in modules.items()}
  state, path, circles = {}, [], []

  def visit(module):
    state[module] = "open"
    path.append(module)
    for dependency in sorted(graph[module]):
      if state.get(dependency) == "open":
        circles.append(path[path.index(dependency):] + [dependency])
      elif dependency not in state:
        visit(dependency)
    path.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module)
  assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("upward", ["mtl_dist.run.config"])
def test_the_check_sees_an_upward_import(tmp_path, upward, monkeypatch):
  # The checker itself: a data module importing the run layer is caught.
  fake = tmp_path / "mtl_dist"
  (fake / "data").mkdir(parents=True)
  (fake / "__init__.py").write_text("")
  (fake / "data" / "__init__.py").write_text("")
  (fake / "data" / "bad.py").write_text(
      f"from {upward.rsplit('.', 1)[0]} import config\n")
  (fake / "run").mkdir()
  (fake / "run" / "__init__.py").write_text("")
  (fake / "run" / "config.py").write_text("")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
  with pytest.raises(AssertionError, match="mtl_dist.data.bad -> "
                     "mtl_dist.run.config"):
    test_no_module_imports_a_higher_layer()
