"""The Colab notebooks in colabs/: built from their script, committed without outputs, and each one
runs top to bottom on a CPU, headless (nbclient, an ipykernel kernel on this interpreter).

The notebooks share one workdir root (under pytest's temporary folder), as on one machine: the first
to run trains the tiny config, the others find its finished checkpoint. A notebook run alone
(`-k inpainting`) trains it itself.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys
import zipfile

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = ("quickstart", "inpainting", "adaptive_autoregressive", "elbo_paths")
KERNEL = "asyncpatch-test"
CELL_TIMEOUT_S = 900  # the training cell is the longest: about 3 minutes on two busy cores


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(COLABS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  assert "widgets" not in nb.metadata
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells
  for index, cell in enumerate(nb.cells):
    assert "attachments" not in cell, f"{name} cell {index} has attachments"
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name} cell {index} has outputs"
      assert cell.execution_count is None, f"{name} cell {index} has an execution count"


def test_notebooks_match_their_build_script():
  result = subprocess.run([sys.executable, str(COLABS / "build_notebooks.py"), "--check"],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr


def test_readme_has_a_colab_badge_per_notebook():
  readme = (COLABS / "README.md").read_text()
  for name in NOTEBOOKS:
    link = ("https://colab.research.google.com/github/OWNER/asyncpatch_jax/blob/main/colabs/"
            f"{name}.ipynb")
    assert link in readme, name


@pytest.fixture(scope="module")
def colab_runtime(tmp_path_factory):
  """A kernelspec for this interpreter and the environment of a CPU runtime; side effects
  (workdirs, Jupyter and IPython state) go under a temporary folder."""
  root = tmp_path_factory.mktemp("colabs")
  spec_dir = root / "jupyter" / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": f"Python ({sys.executable})",
      "language": "python",
  }))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JUPYTER_PATH", str(root / "jupyter"))
    patch.setenv("JUPYTER_RUNTIME_DIR", str(root / "jupyter" / "runtime"))
    patch.setenv("IPYTHONDIR", str(root / "ipython"))
    patch.setenv("ASYNCPATCH_COLAB_WORKDIR", str(root / "workdirs"))
    patch.setenv("JAX_PLATFORMS", "cpu")
    patch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on Colab (conftest asks for 8)
    yield root


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, colab_runtime):
  nb = _read(name)
  cwd = colab_runtime / "cwd" / name
  cwd.mkdir(parents=True)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                                   startup_timeout=120, resources={"metadata": {"path": str(cwd)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
  # Executing works on a copy: the committed file keeps no outputs.
  assert all(c.outputs == [] for c in _read(name).cells if c.cell_type == "code")


def _setup_cell(monkeypatch, clone_dir):
  """The shared first cell, run here (it finds this checkout), with CLONE_DIR moved under a
  temporary /content."""
  spec = importlib.util.spec_from_file_location("build_notebooks", COLABS / "build_notebooks.py")
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)
  monkeypatch.chdir(ROOT)
  namespace = {}
  exec(builder.SETUP[1], namespace)
  assert namespace["ROOT"] == ROOT  # a checkout: nothing installed
  namespace["CLONE_DIR"] = clone_dir
  return namespace


def _zip(path, files):
  with zipfile.ZipFile(path, "w") as archive:
    for name, text in files.items():
      archive.writestr(name, text)
  return path


def test_first_cell_installs_from_an_archive_without_editing(tmp_path, monkeypatch):
  content = tmp_path / "content"
  content.mkdir()
  cell = _setup_cell(monkeypatch, content / "asyncpatch_jax")
  assert cell["SOURCE"] == ""  # a Colab form field, empty: no placeholder to replace
  _zip(content / "asyncpatch_jax-main.zip", {"asyncpatch_jax-main/configs/base.py": "",
                                             "asyncpatch_jax-main/asyncpatch_jax/__init__.py": ""})
  assert cell["fetch_source"]() == "the archive asyncpatch_jax-main.zip"
  assert (content / "asyncpatch_jax" / "configs" / "base.py").is_file()
  wheel_like = _zip(tmp_path / "wheel.zip", {"asyncpatch_jax/__init__.py": ""})
  with pytest.raises(RuntimeError, match=r"no configs/base\.py"):
    cell["unpack"](wheel_like)
  assert (content / "asyncpatch_jax" / "configs" / "base.py").is_file()  # left as it was


def test_first_cell_pins_only_missing_or_older_requirements(tmp_path, monkeypatch):
  cell = _setup_cell(monkeypatch, tmp_path / "asyncpatch_jax")
  installed = {"jax": "0.11.0", "numpy": "2.0.0", "tensorflow": "2.18.0", "absl-py": "2.5.1"}
  lines = ["# a comment", "jax==0.10.2", "numpy==2.4.6", "grain==0.2.18",
           "tensorflow-cpu==2.21.0", "absl-py==2.5.1  # pinned", ""]
  assert cell["needed"](lines, installed.get) == ["numpy==2.4.6", "grain==0.2.18"]
  requirements = (ROOT / "requirements.txt").read_text().splitlines()
  assert cell["needed"](requirements, lambda name: None) == [
      line.split("#")[0].strip() for line in requirements if line.split("#")[0].strip()]
