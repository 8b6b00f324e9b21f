"""The house rules, checked on the code: imports point down, no cycles, small rooms; and the
package works installed (not editable) from another folder."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

PACKAGE = REPO / "vit_jax"

# Floors, top to bottom: a module may import from its own floor (within its own package)
# or from a floor below, never from above.
FLOORS = {
    "vit_jax.__main__": 7,
    "vit_jax.cli": 6,
    "vit_jax.tools": 5,
    "vit_jax.train": 4,
    "vit_jax.config": 3,
    "vit_jax.data": 2, "vit_jax.models": 2,
    "vit_jax.parallel": 1, "vit_jax.host_memory": 1, "vit_jax.paths": 1,
    "vit_jax.errors": 0,
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
  """The FLOORS entry a module belongs to (its package, or itself)."""
  for prefix in sorted(FLOORS, key=len, reverse=True):
    if module == prefix or module.startswith(prefix + "."):
      return prefix
  raise AssertionError(f"{module} is on no floor: add it to FLOORS in this test.")


def imports(path: pathlib.Path) -> set[str]:
  """Every vit_jax module `path` imports, at the top or inside functions."""
  module = module_name(path)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      for alias in node.names:
        candidate = f"{base}.{alias.name}"
        is_module = (REPO / candidate.replace(".", "/")).with_suffix(".py").exists() or (
            REPO / candidate.replace(".", "/") / "__init__.py").exists()
        found.add(candidate if is_module else base)
  return {name for name in found if name == "vit_jax" or name.startswith("vit_jax.")}


def library_files() -> list[pathlib.Path]:
  return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_point_down():
  upward = []
  for path in library_files():
    module = module_name(path)
    if module == "vit_jax":
      continue
    here = room(module)
    for target in imports(path) - {"vit_jax"}:
      if target == "vit_jax.configs" or target.startswith("vit_jax.configs."):
        assert here == "vit_jax.cli", f"{module} imports the recipes ({target})"
        continue
      there = room(target)
      if FLOORS[there] > FLOORS[here] or (FLOORS[there] == FLOORS[here] and there != here):
        upward.append(f"{module} -> {target}")
  assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycles():
  graph = {module_name(p): imports(p) - {"vit_jax"} for p in library_files()}
  state: dict[str, str] = {}

  def visit(node: str, trail: list[str]) -> None:
    state[node] = "open"
    for target in sorted(graph.get(node, ())):
      if state.get(target) == "open":
        raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):]
                                                            + [target]))
      if target not in state:
        visit(target, trail + [target])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_recipes_import_the_schema_only():
  for path in sorted((REPO / "configs").glob("*.py")):
    names = {alias.name if isinstance(node, ast.Import) else node.module
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names}
    assert names <= {"ml_collections", "vit_jax.config", "vit_jax.configs"}, (path, names)


def test_rooms_and_functions_are_small():
  big = [f"{p.relative_to(REPO)} ({n})" for p in library_files()
         if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
  long = [f"{p.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1})"
          for p in library_files() for node in ast.walk(ast.parse(p.read_text()))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not big and not long, f"modules over {MAX_MODULE_LINES} lines: {big}; functions " \
                               f"over {MAX_FUNCTION_LINES} lines: {long}"


def test_installed_package_trains_from_another_folder(tmp_path, fashion_mnist_dirs):
  pytest.importorskip("setuptools")  # pip builds the wheel with it, without the network.
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", "--no-index", "--target", str(target), str(REPO)],
                 check=True, capture_output=True, text=True, timeout=300)
  away = tmp_path / "elsewhere"
  away.mkdir()
  env = {**os.environ, "PYTHONPATH": str(target)}
  out = subprocess.run(
      [sys.executable, "-c", "import vit_jax, vit_jax.configs; "
       "from vit_jax import train, models, config; print(vit_jax.__file__); "
       "print(vit_jax.configs.__file__)"],
      cwd=away, env=env, check=True, capture_output=True, text=True, timeout=300)
  assert out.stdout.split() == [str(target / "vit_jax" / "__init__.py"),
                                str(target / "vit_jax" / "configs" / "__init__.py")]
  manual_dir, data_dir = fashion_mnist_dirs
  out = subprocess.run(
      [sys.executable, "-m", "vit_jax", "--config=fashion_mnist", "--workdir=run",
       f"--config.manual_dir={manual_dir}", f"--config.data_dir={data_dir}",
       "--config.train_split=train[:256]", "--config.eval_split=test[:64]",
       "--config.batch_size=64", "--config.eval_batch_size=64", "--config.total_steps=2",
       "--config.optim.warmup_steps=1", "--config.model.overrides.width=16",
       "--config.model.overrides.depth=1", "--config.model.overrides.num_heads=2",
       "--config.model.overrides.mlp_dim=32"],
      cwd=away, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (away / "run" / "checkpoints" / "2").is_dir()
  assert "eval/top1" in (away / "run" / "final_metrics.json").read_text()
