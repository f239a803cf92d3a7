"""Data on a bucket (issue 24), without network: `gs://` is served by an in-memory fsspec
filesystem through etils.epath (the `gcs` fixture). A latent cache is built to it from LSUN
exports on it and trained from; the shards are read from the local staging copy
(`data.staging`, array_record reads local files only); bad bucket paths fail at start-up; and no
module of the package reads a data path with `os.path` or the built-in `open`."""

import ast
import io
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import jax
import lmdb
import numpy as np
import pytest
from absl import flags
from etils import epath
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from asyncpatch_jax import file_io, pixels
from asyncpatch_jax.autoencoder import VAEConfig, init_vae, weights
from asyncpatch_jax.data import latent_cache, preparation, staging
from asyncpatch_jax.evaluation import adm
from asyncpatch_jax.latents import build, encode
from asyncpatch_jax.train import file_paths, sample_io, trainer, validation
from configs import digits
from configs import lsun as lsun_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "asyncpatch_jax"
fsspec_registry = sys.modules["fsspec.registry"]


class InMemoryGcs(MemoryFileSystem):
  """`gs://` as a process-local in-memory store (its own, not fsspec's `memory://` one)."""

  protocol = ("gs", "gcs")
  root_marker = ""
  store: ClassVar[dict] = {}
  pseudo_dirs: ClassVar[list] = [""]


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """epath's `gs://` on an empty in-memory bucket store; staging into `tmp_path/staging`."""
  for name in ("gs", "gcs"):
    monkeypatch.setitem(fsspec_registry._registry, name, InMemoryGcs)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's fsspec backend
  epath.backend.fsspec_backend._get_filesystem.cache_clear()
  InMemoryGcs.store.clear()
  InMemoryGcs.pseudo_dirs[:] = [""]
  monkeypatch.setenv(staging.STAGING_ENV, str(tmp_path / "staging"))
  epath.Path("gs://bucket").mkdir()
  yield InMemoryGcs.store
  epath.backend.fsspec_backend._get_filesystem.cache_clear()
  InMemoryGcs.store.clear()


def test_file_io_round_trips_through_the_bucket(gcs, tmp_path):
  file_io.write_json("gs://bucket/a/m.json", {"x": 1})
  assert json.loads(epath.Path("gs://bucket/a/m.json").read_text()) == {"x": 1}
  with file_io.atomic_path("gs://bucket/a/w.bin") as tmp:  # a library writing a local file
    assert not file_io.is_url(tmp)
    Path(tmp).write_bytes(b"abc")
  assert epath.Path("gs://bucket/a/w.bin").read_bytes() == b"abc"
  with pytest.raises(RuntimeError), file_io.atomic_path("gs://bucket/a/failed.bin") as tmp:
    Path(tmp).write_bytes(b"partial")
    raise RuntimeError("interrupted")
  assert sorted(gcs) == ["gs://bucket/a/m.json", "gs://bucket/a/w.bin"]  # no temporaries left
  with file_io.local_file("gs://bucket/a/w.bin") as local:
    assert Path(local).read_bytes() == b"abc"
  assert not Path(local).exists()


def test_vae_weights_read_from_the_bucket(gcs):
  vae = init_vae(VAEConfig.tiny(), seed=0)
  weights.save_vae(vae, "gs://bucket/vae/tiny.safetensors")
  loaded = weights.load_vae("gs://bucket/vae/tiny.safetensors", VAEConfig.tiny())
  assert weights.params_fingerprint(loaded) == weights.params_fingerprint(vae)
  assert len(weights.file_sha256("gs://bucket/vae/tiny.safetensors")) == 64


class Images:
  def __init__(self, n=6):
    self.images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(i % 3)}


def test_inpainting_inputs_outputs_and_the_adm_reference_on_the_bucket(gcs):
  for i in range(3):
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(png, "PNG")
    epath.Path(f"gs://bucket/in/{i}.png").write_bytes(png.getvalue())
  epath.Path("gs://bucket/in/notes.txt").write_text("not an image")
  paths = sample_io.image_paths("gs://bucket/in")
  assert paths == [f"gs://bucket/in/{i}.png" for i in range(3)]
  assert sample_io.image_paths("gs://bucket/in/*.png") == paths
  images = sample_io.load_images(paths, (8, 8, 1))
  np.testing.assert_allclose(images[:, 0, 0, 0],
                             pixels.to_model_range(np.array([0, 40, 80], np.uint8)))
  written = sample_io.write_outputs(images, {"nfe": 2}, {"mode": "inpaint"}, "gs://bucket/out")
  assert {k: epath.Path(v).exists() for k, v in written.items()} == {
      "grid": True, "npz": True, "settings": True}
  assert json.loads(epath.Path(written["settings"]).read_text())["nfe"] == 2

  with file_io.atomic_open("gs://bucket/ref/VIRTUAL_x.npz", "wb") as f:
    np.savez(f, mu=np.zeros(4), sigma=np.eye(4))
  reference = adm.read_reference("gs://bucket/ref/VIRTUAL_x.npz")
  assert reference.name == "adm-VIRTUAL_x" and reference.stats.count == 0
  np.testing.assert_array_equal(reference.stats.cov, np.eye(4))
  with pytest.raises(FileNotFoundError, match=r"ADM reference batch .* not found"):
    adm.read_reference("gs://bucket/ref/missing.npz")


def test_cache_built_to_a_bucket_reads_back_like_a_local_one(gcs, tmp_path):
  vae = init_vae(VAEConfig.tiny(), seed=0)
  mesh = encode.data_mesh(jax.devices()[:1])
  kwargs = dict(image_size=16, batch_size=2, shard_size=4, mesh=mesh, log=None)
  encode.build_latent_cache(Images(), vae, "gs://bucket/latents/train", **kwargs)
  encode.build_latent_cache(Images(), vae, tmp_path / "local", **kwargs)
  names = [latent_cache.shard_name(k, 2) for k in range(2)]
  assert sorted(gcs) == sorted(f"gs://bucket/latents/train/{n}" for n in [*names, "metadata.json"])
  remote = latent_cache.LatentCacheSource("gs://bucket/latents/train", vae=vae, image_size=16)
  local = latent_cache.LatentCacheSource(tmp_path / "local", vae=vae, image_size=16)
  assert len(remote) == len(local) == 6
  for i in range(6):
    a, b = remote[i], local[i]
    assert a["label"] == b["label"] and np.array_equal(a["mean"], b["mean"])
  staged = staging.local_dir("gs://bucket/latents/train")
  assert sorted(p.name for p in staged.iterdir()) == names  # the shards, read from local disk
  # Resuming a complete bucket cache writes nothing; a restarted reader copies nothing.
  messages = []
  encode.build_latent_cache(Images(), vae, "gs://bucket/latents/train",
                            **{**kwargs, "log": messages.append})
  assert "2 of 2 shards already complete" in messages[0]
  logged = []
  assert staging.stage("gs://bucket/latents/train", names, log=logged.append) == os.fspath(staged)
  assert logged == []


def test_lsun_latent_run_built_to_and_trained_from_a_bucket(gcs, tmp_path):
  """configs/lsun.py:debug with its LSUN exports and latent caches on the bucket: the commands
  the run prints build the caches there, and two training steps read them (via staging)."""
  for part in ("train", "val"):
    export = tmp_path / "export" / f"church_outdoor_{part}_lmdb"
    export.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(export), map_size=2**24)
    rng = np.random.default_rng(len(part))
    with env.begin(write=True) as txn:
      for i in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
        txn.put(f"{i:04d}".encode(), buffer.getvalue())
    env.close()
    for f in export.iterdir():
      file_io.copy_file(f, f"gs://bucket/lsun/{export.name}/{f.name}")
  config = lsun_config.get_config("debug")
  config.data.lsun_dir = "gs://bucket/lsun"
  config.data.latent_dir = "gs://bucket/latents"
  file_paths.check_urls(config, "gs://bucket/run")
  message = preparation.missing_preparation(config)
  commands = [shlex.split(line) for line in message.splitlines()
              if line.strip().startswith("python -m asyncpatch_jax.latents.build")]
  assert [c[-1] for c in commands] == ["--out=gs://bucket/latents/train",
                                       "--out=gs://bucket/latents/validation"]
  parsed = flags.FLAGS.is_parsed()
  try:
    for command in commands:
      flags.FLAGS.unparse_flags()
      flags.FLAGS(command[2:])
      build.main(command[2:3])
  finally:
    flags.FLAGS.unparse_flags()
    if parsed:
      flags.FLAGS.mark_as_parsed()
  assert "gs://bucket/latents/train/metadata.json" in gcs
  assert preparation.missing_preparation(config) is None
  validation.validate_config(config)
  config.num_steps = 2
  state = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 2
  assert list(staging.local_dir("gs://bucket/latents/train").glob("*.array_record"))


def test_bad_bucket_paths_fail_at_start_up_with_the_fix(gcs):
  config = digits.get_config("debug")
  config.data.latent_dir = "gs://no-such-bucket/latents"
  config.init_from = "gs://bucket/missing/checkpoint"
  with pytest.raises(file_paths.BucketPathError) as error:
    file_paths.check_urls(config, "gs://bucket/run")
  message = str(error.value)
  assert "data.latent_dir=gs://no-such-bucket/latents: bucket gs://no-such-bucket does not" in (
      message) and "gcloud storage buckets create gs://no-such-bucket" in message
  assert "init_from=gs://bucket/missing/checkpoint does not exist" in message
  assert "--workdir" not in message  # the workdir's bucket exists; the folder is created


def test_a_bucket_without_access_names_the_credentials_fix(gcs, monkeypatch):

  def denied(self):
    raise PermissionError("401 Anonymous caller does not have storage.objects.list access")

  monkeypatch.setattr(epath.Path("gs://bucket").__class__, "exists", denied)
  with pytest.raises(file_paths.BucketPathError, match="gcloud auth application-default login"):
    file_paths.check_urls(digits.get_config("debug"), "gs://bucket/run")


def test_a_hanging_bucket_check_times_out(gcs, monkeypatch):
  release = threading.Event()
  monkeypatch.setattr(epath.Path("gs://bucket").__class__, "exists",
                      lambda self: release.wait(30))
  try:
    with pytest.raises(file_paths.BucketPathError, match="no answer in 0 s"):
      file_paths.check_urls(digits.get_config("debug"), "gs://bucket/run", timeout_s=0.2)
  finally:
    release.set()


# `os.path` calls and built-in `open`s that are not on a data path: (file, code on the line) ->
# why. Everything else a module reads or writes goes through etils.epath (`file_io`), which also
# takes bucket URLs. Methods named open (`Image.open`, `zipfile.open`, `path.open`) are not calls
# of the built-in and are not listed.
ALLOWED = {
    ("train/file_paths.py", "os.path.abspath(os.path.expanduser(path))"):
        "makes a local path absolute; URLs are returned before it",
    ("latents/lsun.py", "os.path.realpath(path)"):
        "LMDB environment key; LMDB opens local files only (a bucket export is staged first)",
    ("latents/lsun.py", "os.path.isdir(path)"): "lmdb.open's subdir flag, a local path (staged)",
    ("latents/lsun.py", "os.path.abspath(self.lmdb_path)"):
        "the keys file's header (a label; changing it would invalidate written keys files)",
    ("evaluation/inception.py", 'open(path, "rb")'):
        "Inception network weights (a model file in the local weights cache, not data)",
    ("evaluation/lpips.py", 'open(path, "rb")'): "LPIPS network weights (local weights cache)",
    ("train/eval_job.py", "os.path.basename(reference)"): "a label in the results",
    ("train/perf.py", 'open("/proc/cpuinfo")'): "the host CPU's model (Linux), not data",
}


def _file_calls(tree: ast.AST):
  """The calls of `os.path.*` and of the built-in `open` in a module."""
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    if isinstance(func, ast.Name) and func.id == "open":
      yield node
    elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute)
          and func.value.attr == "path" and isinstance(func.value.value, ast.Name)
          and func.value.value.id == "os"):
      yield node


def test_no_os_path_or_builtin_open_on_data_paths():
  found, used = [], set()
  for file in sorted(PACKAGE.rglob("*.py")):
    rel = file.relative_to(PACKAGE).as_posix()
    source = file.read_text()
    lines = source.splitlines()
    for call in _file_calls(ast.parse(source)):
      line = lines[call.lineno - 1]
      allowed = [key for key in ALLOWED if key[0] == rel and key[1] in line]
      used.update(allowed)
      if not allowed:
        found.append(f"{rel}:{call.lineno}: {line.strip()}")
  assert not found, ("os.path / built-in open on what may be a data path; use etils.epath "
                     "(asyncpatch_jax/file_io.py) or, for a use that is not data, add it to "
                     "ALLOWED:\n" + "\n".join(found))
  assert used == set(ALLOWED), f"stale ALLOWED entries: {sorted(set(ALLOWED) - used)}"


def test_pod_setup_stages_where_the_run_reads(monkeypatch, tmp_path):
  """`launch/tpu_pod.sh setup --stage URL` copies into the folder `data.staging` reads."""
  monkeypatch.setenv(staging.STAGING_ENV, "~/.cache/asyncpatch_jax/staging")
  url = "gs://b/latents/imagenet256/train"
  out = subprocess.run(
      ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "setup", "--name", "ap", "--zone", "z",
       "--dry-run", "--stage", url + "/"], capture_output=True, text=True, check=True,
      timeout=60).stdout
  expected = os.fspath(staging.local_dir(url)).replace(os.path.expanduser("~"), "~", 1)
  assert f"gcloud\\ storage\\ rsync\\ --recursive\\ {url}\\ {expected}" in out
  run = subprocess.run(
      ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "run", "--name", "ap", "--zone", "z",
       "--workdir", "gs://b/run", "--dry-run"], capture_output=True, text=True, check=True,
      timeout=60).stdout
  assert "ASYNCPATCH_STAGING_DIR=\\~/.cache/asyncpatch_jax/staging" in run
