"""The import graph check (`python -m asyncpatch_jax.tools.deps --check`): the real package has
no module cycle and no unlisted function-local import, and the checker catches both."""

from __future__ import annotations

from asyncpatch_jax.tools import deps


def _write_package(root, files: dict[str, str]):
  for name, source in files.items():
    path = root / "pkg" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
  return root / "pkg"


def test_the_checker_finds_a_cycle_and_a_function_local_import(tmp_path):
  root = _write_package(tmp_path, {
    "__init__.py": "",
    "low/__init__.py": "",
    "low/a.py": "from pkg.low import b\n",
    "low/b.py": "import pkg.high.c\n",
    "high/__init__.py": "",
    "high/c.py": "from ..low import a\n\ndef f():\n  from pkg.low import b\n  return b\n",
    "high/d.py": "from pkg import low\n",
  })
  imports = deps.build_graph(root, "pkg")
  edges = {(i.importer, i.imported, i.local) for i in imports}
  assert edges == {("pkg.low.a", "pkg.low.b", False), ("pkg.low.b", "pkg.high.c", False),
                   ("pkg.high.c", "pkg.low.a", False), ("pkg.high.c", "pkg.low.b", True),
                   ("pkg.high.d", "pkg.low", False)}
  text, problems = deps.report(imports, deps.module_files(root, "pkg"))
  assert "high.c <-> low.a <-> low.b" in text
  assert "high <-> low" in text  # the package-level cycle
  assert len(problems) == 2
  assert problems[0].startswith("import cycle between modules: pkg.high.c <-> pkg.low.a")
  assert problems[1].startswith("function-local import pkg.high.c:4 -> pkg.low.b is not in")
  assert deps.main(["--check", "--root", str(root)]) == 1


def test_a_one_way_package_passes(tmp_path):
  root = _write_package(tmp_path, {
    "__init__.py": "",
    "a.py": "import json\n\ndef f():\n  import numpy\n  return numpy, json\n",
    "b.py": "from pkg import a\nfrom pkg.a import f\n",
  })
  imports = deps.build_graph(root, "pkg")
  assert [(i.importer, i.imported) for i in imports] == [("pkg.b", "pkg.a")] * 2
  assert deps.report(imports, deps.module_files(root, "pkg"))[1] == []
  assert deps.main(["--check", "--root", str(root)]) == 0


def test_the_package_has_no_import_cycle_and_no_unlisted_lazy_import(capsys):
  assert deps.main(["--check"]) == 0, capsys.readouterr().err


def test_the_allowed_lazy_imports_name_modules_that_exist():
  modules = deps.module_files()
  for importer, imported in deps.LAZY_IMPORTS:
    assert importer in modules and imported in modules, (importer, imported)
