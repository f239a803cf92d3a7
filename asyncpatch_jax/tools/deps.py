r"""The package's import graph, read from the source with `ast` (nothing is imported).

  python -m asyncpatch_jax.tools.deps           # modules, packages, cycles, function-local imports
  python -m asyncpatch_jax.tools.deps --check   # exit 1: a module cycle or an unlisted lazy import

An edge goes to the module an import names: `from asyncpatch_jax.x import y` is module `x.y`
where `y` is a module, else `x` itself. Imports under `if TYPE_CHECKING:` count like any other,
so the graph never hides a cycle. Package level: a subpackage, or a top-level module, is one node.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import pathlib
import sys
from collections.abc import Iterable

PACKAGE = "asyncpatch_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1]

# The only function-local imports of package modules allowed: (importer, imported) -> reason.
# (Training loads CLU's writers and TensorFlow; sampling needs neither the trainer nor FID.)
_PER_MODE = "main's per-mode import: start-up loads only the job the mode runs"
LAZY_IMPORTS: dict[tuple[str, str], str] = {
  (f"{PACKAGE}.main", f"{PACKAGE}.train.{job}"): _PER_MODE
  for job in ("trainer", "sample_job", "eval_job")
}


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str
  imported: str
  line: int
  local: bool  # inside a function body


def module_files(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, pathlib.Path]:
  """Module name -> source file, for every .py below `root` (a package's `__init__` is the
  package's own name)."""
  files = {}
  for path in sorted(root.rglob("*.py")):
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
      parts.pop()
    files[".".join(parts)] = path
  return files


def _imports(name: str, path: pathlib.Path, modules: Iterable[str]) -> list[Import]:
  """The package modules that the module `name` (source at `path`) imports."""
  modules = set(modules)
  is_package = path.name == "__init__.py"
  found = []

  def add(target: str, node: ast.AST, local: bool) -> None:
    while target and target not in modules:
      target = target.rpartition(".")[0]
    imp = Import(name, target, node.lineno, local)
    if target and target != name and imp not in found:  # `from x import a, b`: one edge
      found.append(imp)

  def visit(node: ast.AST, local: bool) -> None:
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node, local)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against the importer's package
        anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
        base = ".".join([*anchor, base] if base else anchor)
      for alias in node.names:
        add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node, local)
    local = local or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    for child in ast.iter_child_nodes(node):
      visit(child, local)

  visit(ast.parse(path.read_text(), str(path)), local=False)
  return found


def build_graph(root: pathlib.Path = ROOT, package: str = PACKAGE) -> list[Import]:
  """Every import of a package module by a package module, in module and line order."""
  files = module_files(root, package)
  return [imp for name, path in files.items() for imp in _imports(name, path, files)]


def layer(module: str) -> str:
  """The package-level node: `asyncpatch_jax.train.step` -> `train`, `asyncpatch_jax.main` ->
  `main`, the package's own `__init__` -> `__init__`."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  found = []

  def connect(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if nxt not in index:
        connect(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while not component or component[-1] != node:
        component.append(stack.pop())
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(edges):
    if node not in index:
      connect(node)
  return sorted(found)


def report(imports: list[Import], modules: Iterable[str]) -> tuple[str, list[str]]:
  """The printed report, and the problems that `--check` fails on."""
  module_edges: dict[str, set[str]] = {m: set() for m in modules}
  layer_edges: dict[str, set[str]] = {layer(m): set() for m in modules}
  for imp in imports:
    module_edges[imp.importer].add(imp.imported)
    if layer(imp.importer) != layer(imp.imported):
      layer_edges[layer(imp.importer)].add(layer(imp.imported))
  short = lambda m: m.partition(".")[2] or m
  lines = ["# modules (-> package modules imported)"]
  lines += [f"{short(m)} -> {', '.join(sorted(map(short, t))) or '-'}"
            for m, t in sorted(module_edges.items())]
  lines += ["", "# packages (-> packages imported)"]
  lines += [f"{p} -> {', '.join(sorted(t)) or '-'}" for p, t in sorted(layer_edges.items())]
  module_cycles, layer_cycles = cycles(module_edges), cycles(layer_edges)
  lines += ["", f"# module cycles: {len(module_cycles)}"]
  lines += [" <-> ".join(map(short, c)) for c in module_cycles]
  lines += ["", f"# package cycles: {len(layer_cycles)}"]
  lines += [" <-> ".join(c) for c in layer_cycles]
  local = [imp for imp in imports if imp.local]
  lines += ["", f"# function-local imports of package modules: {len(local)}"]
  problems = [f"import cycle between modules: {' <-> '.join(c)}" for c in module_cycles]
  for imp in local:
    reason = LAZY_IMPORTS.get((imp.importer, imp.imported))
    lines.append(f"{short(imp.importer)}:{imp.line} -> {short(imp.imported)}"
                 f"  ({'allowed: ' + reason if reason else 'NOT in LAZY_IMPORTS'})")
    if not reason:
      problems.append(f"function-local import {imp.importer}:{imp.line} -> {imp.imported} is not "
                      "in LAZY_IMPORTS: move it to the top of the module (or list it, with why)")
  return "\n".join(lines), problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="exit 1 on a module cycle or a function-local import not allowed")
  parser.add_argument("--root", type=pathlib.Path, default=ROOT,
                      help="the package folder to read (default: this package), e.g. a checkout "
                           "of another commit; its name is the package's")
  args = parser.parse_args(argv)
  root = args.root.resolve()
  text, problems = report(build_graph(root, root.name), module_files(root, root.name))
  print(text)
  if args.check and problems:
    print("\ndeps --check failed:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
