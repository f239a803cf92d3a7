"""ADM's evaluator files (evaluation/adm.py): sample batches written as `arr_0` uint8
[N, H, W, 3] that numpy (and so ADM's evaluator) reads back, and reference batches whose `mu` /
`sigma` become our reference statistics, checked with small fake files."""

import numpy as np
import pytest

from asyncpatch_jax.evaluation import adm
from asyncpatch_jax.evaluation.fid import feature_statistics, frechet_distance


def test_sample_batch_is_uint8_arr_0_numpy_reads(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
  path = tmp_path / "samples.npz"
  with adm.SampleBatchWriter(path, 5, (4, 6)) as writer:  # streamed in two batches
    writer.add(images[:3])
    writer.add(images[3:])
  with np.load(path) as data:
    assert data.files == ["arr_0"]
    np.testing.assert_array_equal(data["arr_0"], images)
  assert adm.array_shape(path) == ((5, 4, 6, 3), np.dtype(np.uint8))


def test_float_and_grey_samples_are_converted(tmp_path):
  x = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 7.0], np.float32).reshape(1, 1, 6, 1)
  adm.write_sample_batch(tmp_path / "s.npz", x)
  with np.load(tmp_path / "s.npz") as data:
    out = data["arr_0"]
  assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0, :, 0], [0, 64, 128, 255, 255, 255])  # round((x+1)·127.5)
  assert (out[..., 0] == out[..., 2]).all()


def test_wrong_count_or_shape_leaves_no_file(tmp_path):
  path = tmp_path / "s.npz"
  writer = adm.SampleBatchWriter(path, 3, (2, 2))
  writer.add(np.zeros((2, 2, 2, 3), np.uint8))
  with pytest.raises(ValueError, match="2 of 3 images"):
    writer.close()
  assert list(tmp_path.iterdir()) == []  # no file, no temporary
  with pytest.raises(ValueError, match="do not match"), adm.SampleBatchWriter(path, 1, (2, 2)) as w:
    w.add(np.zeros((1, 3, 2, 3), np.uint8))
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_iter_images_streams_arr_0(tmp_path, save):
  images = np.random.default_rng(1).integers(0, 256, (7, 3, 3, 3), dtype=np.uint8)
  save(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(2), sigma=np.eye(2))
  batches = list(adm.iter_images(tmp_path / "ref.npz", batch_size=3))
  assert [len(b) for b in batches] == [3, 3, 1]
  np.testing.assert_array_equal(np.concatenate(batches), images)


def test_iter_images_refuses_other_layouts(tmp_path):
  np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 3, 3, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    next(adm.iter_images(tmp_path / "f.npz"))
  np.savez(tmp_path / "g.npz", images=np.zeros((2, 3, 3, 3), np.uint8))
  with pytest.raises(ValueError, match="no 'arr_0'"):
    next(adm.iter_images(tmp_path / "g.npz"))


class _MeanColour:
  """A stand-in feature network: per-image channel means and their squares (D = 6)."""

  def features(self, batches):
    f = np.concatenate([b.reshape(len(b), -1, 3).mean(1) / 255.0 for b in batches])
    return np.concatenate([f, f**2], axis=1)


def test_reference_batch_statistics_and_agreement(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
  theirs = feature_statistics(_MeanColour().features([images]))
  path = tmp_path / "VIRTUAL_fake_labeled.npz"
  np.savez(path, arr_0=images, mu=theirs.mean, sigma=theirs.cov)
  reference = adm.read_reference(path)
  assert reference.name == "adm-VIRTUAL_fake_labeled" and reference.stats.count == 40
  assert reference.features is None  # FID only; KID needs features of arr_0
  np.testing.assert_array_equal(reference.stats.cov, theirs.cov)
  assert adm.agreement(path, _MeanColour(), batch_size=16) == pytest.approx(0.0, abs=1e-9)
  shifted = tmp_path / "shifted.npz"  # another network's statistics of the same images
  np.savez(shifted, arr_0=images, mu=theirs.mean + 0.1, sigma=theirs.cov)
  assert adm.agreement(shifted, _MeanColour()) == pytest.approx(6 * 0.01, rel=1e-6)
  assert frechet_distance(reference.stats, theirs) == pytest.approx(0.0, abs=1e-9)


def test_reference_without_statistics_is_refused(tmp_path):
  np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 2, 2, 3), np.uint8))
  with pytest.raises(ValueError, match="not an ADM reference batch"):
    adm.read_reference(tmp_path / "samples.npz")


def test_missing_reference_names_the_download(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)download https://openaipublic\.blob\.core\."
                     r"windows\.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                     r"VIRTUAL_imagenet256_labeled\.npz.*fid_reference"):
    adm.read_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz")


FID_PROTOCOL_CASES = [("mnist", ""), ("digits", ""), ("textures", ""), ("cifar10", ""),
                      ("celeba_hq", ""), ("lsun", ""), ("lsun", "bedroom"), ("imagenet", ""),
                      ("imagenet", "unet"), ("imagenet", "pixel64"), ("imagenet", "pixel128")]


@pytest.mark.parametrize("name, arg", FID_PROTOCOL_CASES)
def test_every_config_states_its_fid_protocol_in_the_readme(name, arg):
  """The README's table of FID protocols is the configs' own values (and ADM's files are ones
  whose download the missing-file message names)."""
  import importlib
  import pathlib
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  sys.path.insert(0, str(root))
  config = importlib.import_module(f"configs.{name}").get_config(arg or None)
  e, s = config.eval, config.sampling
  reference = (f"ADM's `{e.fid_reference}`" if e.fid_reference
               else f"split `{e.fid_split}` of the training data")
  row = (f"| `configs/{name}.py{':' + arg if arg else ''}` | {e.fid_samples:,} | {reference} | "
         f"`{s.strategy}`, {s.num_steps} {'ancestral' if s.stochastic else 'DDIM'} steps | "
         f"{s.cfg_scale:g} |")
  assert row in (root / "README.md").read_text()
  assert e.fid_samples > 0 and (not e.fid_reference or e.fid_reference in adm.REFERENCE_URLS)
  if name in ("imagenet", "lsun"):
    assert e.fid_samples == 50_000
  assert importlib.import_module(f"configs.{name}").get_config(
      ",".join(filter(None, [arg, "debug"]))).eval.fid_samples == 0


def test_mode_eval_follows_the_protocol_exports_and_logs(tmp_path, monkeypatch):
  """--mode=eval with an ADM reference batch: FID against its mu / sigma, the protocol in the
  JSON, the samples as ADM's sample batch, and the scalars in TensorBoard."""
  import json
  import pathlib
  import sys

  import jax.numpy as jnp
  from flax import nnx

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from asyncpatch_jax import evaluation
  from asyncpatch_jax.train import eval_job, trainer
  from configs import digits

  class TinyFeatures(nnx.Module):  # a stand-in for Inception: 64 features
    def __init__(self):
      self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
      pooled = jnp.stack([x[:, i::37, j::41].mean((1, 2)) for i in range(4) for j in range(4)], 1)
      return jnp.tanh(self.dense(pooled)).reshape(x.shape[0], -1)

  class Extractor(evaluation.FeatureExtractor):
    def __init__(self, mesh=None, **kwargs):
      super().__init__(model=TinyFeatures(), mesh=mesh, **kwargs)

  monkeypatch.setattr(evaluation, "FeatureExtractor", Extractor)
  config = digits.get_config("debug")
  config.num_steps, config.sampling.num_inpaint = 2, 0
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(config, workdir)
  reference = tmp_path / "VIRTUAL_digits8_labeled.npz"
  np.savez(reference, mu=np.zeros(64), sigma=np.eye(64))
  config.eval.fid_samples, config.eval.fid_batch_size = 6, 4
  config.eval.fid_reference, config.eval.fid_export = str(reference), True
  results = eval_job.evaluate(config, workdir)
  assert np.isfinite(results["eval/fid"]) and "eval/kid" not in results  # mu / sigma: FID only
  saved = json.loads((workdir / "eval_step_2.json").read_text())
  assert saved["protocol"] == {
      "samples": 6, "reference": "VIRTUAL_digits8_labeled.npz (ADM reference batch)",
      "sampler": "uniform", "steps": 2, "stochastic": True, "cfg_scale": 0.0,
      "ema": saved["settings"]["ema"], "features": evaluation.fid.PROTOCOL}
  with np.load(workdir / "fid_samples_step_2.npz") as exported:
    assert exported["arr_0"].shape == (6, 8, 8, 3) and exported["arr_0"].dtype == np.uint8
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
  assert {"eval/fid", "eval/loss"} <= tags, tags
  config.eval.fid_reference = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
  with pytest.raises(FileNotFoundError, match="download"):  # before any work
    eval_job.evaluate(config, workdir)
