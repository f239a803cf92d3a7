"""Tests of the SD-VAE port: the real architecture's size and key names, the forward pass against
an independent NumPy transcription of diffusers' AutoencoderKL (PyTorch layout), safetensors
loading (diffusers / old-attention / LDM names, fp16, a full-size file), key errors, and the
safetensors format against the reference `safetensors` package."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from asyncpatch_jax.autoencoder import vae as vae_lib
from asyncpatch_jax.autoencoder import weights
from asyncpatch_jax.autoencoder.vae import SD_VAE, AutoencoderKL, VAEConfig

# A handful of tensors of stabilityai/sd-vae-ft-{ema,mse}/diffusion_pytorch_model.safetensors,
# written down from the diffusers AutoencoderKL definition independently of this package.
REAL_DIFFUSERS_TENSORS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
    "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
    "encoder.down_blocks.2.resnets.0.norm1.weight": (256,),
    "encoder.down_blocks.3.resnets.1.conv2.bias": (512,),
    "encoder.mid_block.attentions.0.group_norm.weight": (512,),
    "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "encoder.conv_norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
    "decoder.mid_block.resnets.1.norm2.bias": (512,),
    "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
    "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
    "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
    "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
ABSENT = ("encoder.down_blocks.3.downsamplers.0.conv.weight",
          "decoder.up_blocks.3.upsamplers.0.conv.weight",
          "encoder.down_blocks.0.resnets.0.conv_shortcut.weight")
# The same architecture's tensors under the original CompVis / LDM names
# (vae-ft-mse-840000-ema-pruned.safetensors; attention weights as 1×1 convolutions).
REAL_LDM_TENSORS = {
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.downsample.conv.weight": (256, 256, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.norm.bias": (512,),
    "encoder.mid.block_2.conv1.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
    "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
}
SD_VAE_PARAMS = 83_653_863  # 83.65M: diffusers' AutoencoderKL with the sd-vae-ft-* config
SD_VAE_TENSORS = 248


def tiny(**overrides):
  return VAEConfig.tiny(**overrides)


def random_tensors(config: VAEConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """Random tensors for every diffusers key, scaled so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in weights.expected_tensors(config).items():
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if key.endswith("bias"):
      value = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:  # GroupNorm weights
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    out[key] = value.astype(dtype)
  return out


# --------------------------------------------------------------------------------------------
# The real architecture.


def test_sd_vae_size_and_key_names():
  model = vae_lib.abstract_vae()
  assert vae_lib.num_params(model) == SD_VAE_PARAMS
  expected = weights.expected_tensors()
  assert len(expected) == SD_VAE_TENSORS
  for key, shape in REAL_DIFFUSERS_TENSORS.items():
    assert expected[key] == shape, key
  for key in ABSENT:
    assert key not in expected
  ldm = weights.to_ldm_names({k: np.empty(0) for k in expected})
  assert len(ldm) == SD_VAE_TENSORS
  for key in REAL_LDM_TENSORS:
    assert key in ldm, key


def test_sd_vae_latent_shape_abstract():
  """The full-size VAE maps 256² to 32×32×4 and back, evaluated abstractly (nothing computed)."""
  def roundtrip(x):
    model = AutoencoderKL(SD_VAE, rngs=nnx.Rngs(0))
    dist = model.encode(x)
    return dist.mean, model.decode(dist.mean)

  mean, image = jax.eval_shape(roundtrip, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
  assert mean.shape == (2, 32, 32, 4) and image.shape == (2, 256, 256, 3)
  assert SD_VAE.latent_shape(256) == (32, 32, 4) and SD_VAE.downsample_factor == 8
  assert SD_VAE.scaling_factor == 0.18215


# --------------------------------------------------------------------------------------------
# The forward pass against a NumPy transcription of diffusers (NCHW, OIHW, float64).


def _conv(x, t, name, stride=1, pad=(1, 1, 1, 1)):
  w, b = t[name + ".weight"].astype(np.float64), t[name + ".bias"].astype(np.float64)
  if w.ndim == 2:
    w = w[:, :, None, None]
  x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])))
  kh, kw = w.shape[2:]
  ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def _group_norm(x, t, name, groups, eps=1e-6):
  n = x.shape[0]
  g = x.reshape(n, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  return (g.reshape(x.shape) * t[name + ".weight"][None, :, None, None]
          + t[name + ".bias"][None, :, None, None])


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _resnet(x, t, p, groups):
  h = _conv(_silu(_group_norm(x, t, p + ".norm1", groups)), t, p + ".conv1")
  h = _conv(_silu(_group_norm(h, t, p + ".norm2", groups)), t, p + ".conv2")
  if p + ".conv_shortcut.weight" in t:
    x = _conv(x, t, p + ".conv_shortcut", pad=(0, 0, 0, 0))
  return x + h


def _linear(x, t, name):
  return x @ t[name + ".weight"].T.astype(np.float64) + t[name + ".bias"]


def _attention(x, t, p, groups):
  n, c, h, w = x.shape
  s = _group_norm(x, t, p + ".group_norm", groups).reshape(n, c, h * w).transpose(0, 2, 1)
  q, k, v = (_linear(s, t, f"{p}.{m}") for m in ("to_q", "to_k", "to_v"))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  out = _linear(a @ v, t, p + ".to_out.0")
  return x + out.transpose(0, 2, 1).reshape(n, c, h, w)


def _mid(x, t, p, groups):
  x = _resnet(x, t, p + ".resnets.0", groups)
  x = _attention(x, t, p + ".attentions.0", groups)
  return _resnet(x, t, p + ".resnets.1", groups)


def reference_encode(x_nhwc, t, config):
  g, n = config.norm_num_groups, len(config.block_out_channels)
  x = _conv(x_nhwc.transpose(0, 3, 1, 2).astype(np.float64), t, "encoder.conv_in")
  for i in range(n):
    for j in range(config.layers_per_block):
      x = _resnet(x, t, f"encoder.down_blocks.{i}.resnets.{j}", g)
    if i < n - 1:  # diffusers: F.pad(x, (0, 1, 0, 1)) then a stride-2 conv without padding
      x = _conv(x, t, f"encoder.down_blocks.{i}.downsamplers.0.conv", 2, (0, 1, 0, 1))
  x = _mid(x, t, "encoder.mid_block", g)
  x = _conv(_silu(_group_norm(x, t, "encoder.conv_norm_out", g)), t, "encoder.conv_out")
  moments = _conv(x, t, "quant_conv", pad=(0, 0, 0, 0)).transpose(0, 2, 3, 1)
  mean, logvar = np.split(moments, 2, axis=-1)
  return mean, np.clip(logvar, -30.0, 20.0)


def reference_decode(z_nhwc, t, config):
  g, n = config.norm_num_groups, len(config.block_out_channels)
  z = _conv(z_nhwc.transpose(0, 3, 1, 2).astype(np.float64), t, "post_quant_conv",
            pad=(0, 0, 0, 0))
  x = _mid(_conv(z, t, "decoder.conv_in"), t, "decoder.mid_block", g)
  for i in range(n):
    for j in range(config.layers_per_block + 1):
      x = _resnet(x, t, f"decoder.up_blocks.{i}.resnets.{j}", g)
    if i < n - 1:
      x = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)
      x = _conv(x, t, f"decoder.up_blocks.{i}.upsamplers.0.conv")
  x = _conv(_silu(_group_norm(x, t, "decoder.conv_norm_out", g)), t, "decoder.conv_out")
  return x.transpose(0, 2, 3, 1)


def test_forward_matches_diffusers_reference():
  config = tiny(layers_per_block=2)  # width changes in encoder and decoder: conv shortcuts
  tensors = random_tensors(config)
  model = weights.load_vae(tensors, config)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(2).standard_normal((2, 2, 2, 4)).astype(np.float32)
  dist, image = nnx.jit(lambda m, x, z: (m.encode(x), m.decode(z)))(model, x, z)
  mean, logvar = reference_encode(x, tensors, config)
  assert dist.mean.shape == (2, 2, 2, 4)
  np.testing.assert_allclose(dist.mean, mean, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dist.logvar, logvar, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(image, reference_decode(z, tensors, config), rtol=1e-4, atol=1e-4)


def test_init_vae_is_deterministic():
  a, b = vae_lib.init_vae(tiny(), seed=1), vae_lib.init_vae(tiny(), seed=1)
  assert weights.params_fingerprint(a) == weights.params_fingerprint(b)
  assert weights.params_fingerprint(a) != weights.params_fingerprint(vae_lib.init_vae(tiny()))


def test_tiny_encode_decode_shapes_and_scaling():
  config = tiny()
  model = vae_lib.init_vae(config)
  x = jax.random.uniform(jax.random.key(0), (3, 32, 24, 3), minval=-1, maxval=1)

  @nnx.jit
  def run(model, x):
    dist = model.encode(x)
    scaled = model.encode_scaled(x)
    return (dist, dist.sample(jax.random.key(1)), dist.kl(), scaled, model.decode_scaled(scaled),
            model.decode(dist.mean), model(x, jax.random.key(2)))

  dist, sample, kl, scaled, image, image_from_mean, reconstruction = run(model, x)
  assert dist.mean.shape == dist.logvar.shape == (3, 4, 3, 4)
  assert sample.shape == dist.mean.shape and not np.allclose(sample, dist.mean)
  assert kl.shape == (3,)
  np.testing.assert_allclose(scaled, dist.mean * config.scaling_factor, rtol=1e-6)
  assert image.shape == reconstruction.shape == x.shape
  np.testing.assert_allclose(image, image_from_mean, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(model.encode, jax.ShapeDtypeStruct((1, 20, 20, 3), jnp.float32))
  with pytest.raises(ValueError, match="latents"):
    jax.eval_shape(model.decode, jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32))


# --------------------------------------------------------------------------------------------
# Weights.


def _params(model):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_weights_round_trip_and_placement(tmp_path):
  config = tiny()
  model = weights.load_vae(random_tensors(config, seed=3), config)
  path = tmp_path / "vae.safetensors"
  weights.save_vae(model, path)
  loaded = weights.load_vae(path, config)
  before, after = _params(model), _params(loaded)
  assert before.keys() == after.keys()
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  assert weights.params_fingerprint(model) == weights.params_fingerprint(loaded)
  # Tensors land where diffusers' names say, in the NNX layouts.
  file, _ = weights.read_safetensors(path)
  np.testing.assert_array_equal(after["encoder/conv_in/kernel"],
                                file["encoder.conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(after["decoder/mid_block/attentions/0/to_out/kernel"],
                                file["decoder.mid_block.attentions.0.to_out.0.weight"].T)
  np.testing.assert_array_equal(after["encoder/conv_norm_out/scale"],
                                file["encoder.conv_norm_out.weight"])
  np.testing.assert_array_equal(after["quant_conv/kernel"][0, 0],
                                file["quant_conv.weight"][:, :, 0, 0].T)
  other = vae_lib.init_vae(config, seed=4)
  assert weights.params_fingerprint(other) != weights.params_fingerprint(model)


def test_old_attention_and_ldm_names_load_the_same():
  config = tiny()
  tensors = random_tensors(config, seed=5)
  reference = weights.params_fingerprint(weights.load_vae(tensors, config))
  old = weights.to_old_attention_names(tensors)
  assert "encoder.mid_block.attentions.0.query.weight" in old
  assert "decoder.mid_block.attentions.0.proj_attn.bias" in old
  assert weights.params_fingerprint(weights.load_vae(old, config)) == reference
  ldm = weights.to_ldm_names(tensors)
  assert ldm["encoder.mid.attn_1.q.weight"].ndim == 4  # 1×1 conv attention weights
  assert weights.params_fingerprint(weights.load_vae(ldm, config)) == reference
  # A full SD checkpoint: the VAE under `first_stage_model.`, other models' tensors ignored.
  checkpoint = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 4, 3, 3))
  assert weights.params_fingerprint(weights.load_vae(checkpoint, config)) == reference
  # float16 files load into float32 parameters.
  half = {k: v.astype(np.float16) for k, v in tensors.items()}
  loaded = weights.load_vae(half, config)
  assert all(v.dtype == np.float32 for v in _params(loaded).values())


def test_key_errors_are_listed():
  config = tiny()
  tensors = random_tensors(config)
  bad = dict(tensors)
  del bad["encoder.conv_in.bias"]
  bad["encoder.extra.weight"] = np.zeros((3,), np.float32)
  bad["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
  with pytest.raises(ValueError) as err:
    weights.load_vae(bad, config)
  message = str(err.value)
  assert "1 missing: encoder.conv_in.bias [8]" in message
  assert "1 unexpected: encoder.extra.weight [3]" in message
  assert "decoder.conv_out.weight: file [3, 8, 1, 1], expected [3, 8, 3, 3]" in message
  # The full-size architecture against a tiny file: everything mis-shaped, reported, no crash.
  with pytest.raises(ValueError, match="mis-shaped"):
    weights.load_vae(tensors, SD_VAE)
  dup = dict(tensors)
  dup["encoder.mid_block.attentions.0.query.weight"] = dup[
      "encoder.mid_block.attentions.0.to_q.weight"]
  with pytest.raises(ValueError, match="duplicated"):
    weights.load_vae(dup, config)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
  with pytest.raises(weights.WeightsNotFoundError) as err:
    weights.load_vae(tmp_path / "nope.safetensors", tiny())
  assert "huggingface.co/stabilityai/sd-vae-ft-ema" in str(err.value)
  assert weights.HF_FILENAME in str(err.value)


def test_full_size_generated_file(tmp_path):
  """A float16 file with the real key names (old attention names) and shapes of sd-vae-ft-ema."""
  rng = np.random.default_rng(0)
  tensors = {k: rng.standard_normal(s, dtype=np.float32).astype(np.float16)
             for k, s in weights.expected_tensors().items()}
  path = tmp_path / weights.HF_FILENAME
  weights.write_safetensors(path, weights.to_old_attention_names(tensors), {"format": "pt"})
  model = weights.load_vae(path)
  assert vae_lib.num_params(model) == SD_VAE_PARAMS
  params = _params(model)
  np.testing.assert_array_equal(
      params["decoder/up_blocks/2/resnets/0/conv_shortcut/kernel"],
      tensors["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"].astype(np.float32)
      .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      params["encoder/mid_block/attentions/0/to_v/kernel"],
      tensors["encoder.mid_block.attentions.0.to_v.weight"].astype(np.float32).T)
  np.testing.assert_array_equal(params["encoder/mid_block/attentions/0/to_v/bias"],
                                tensors["encoder.mid_block.attentions.0.to_v.bias"])


# --------------------------------------------------------------------------------------------
# The safetensors format.


def test_safetensors_interoperates_with_reference_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  rng = np.random.default_rng(0)
  tensors = {"a.weight": rng.standard_normal((3, 4, 2, 2)).astype(np.float32),
             "b": rng.standard_normal((5,)).astype(np.float16),
             "c.ids": np.arange(7, dtype=np.int64), "scalar": np.array(2.5, np.float32)}
  theirs, ours = tmp_path / "theirs.safetensors", tmp_path / "ours.safetensors"
  st.save_file(tensors, str(theirs), metadata={"format": "pt"})
  read, metadata = weights.read_safetensors(theirs)
  assert metadata == {"format": "pt"} and read.keys() == tensors.keys()
  for k, v in tensors.items():
    assert read[k].dtype == v.dtype and read[k].shape == v.shape
    np.testing.assert_array_equal(read[k], v)
  weights.write_safetensors(ours, tensors, {"format": "pt"})
  back = st.load_file(str(ours))
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[k], v)
  assert int.from_bytes(ours.read_bytes()[:8], "little") % 8 == 0  # aligned header, as theirs


def test_safetensors_bfloat16_and_corrupt_files(tmp_path):
  path = tmp_path / "bf16.safetensors"
  x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
  weights.write_safetensors(path, {"x": x})
  read, _ = weights.read_safetensors(path)
  assert read["x"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(read["x"], x)
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\xff" * 64)
  with pytest.raises(ValueError, match="not a safetensors file"):
    weights.read_safetensors(bad)
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(ValueError, match="not a safetensors file, or a damaged one"):
    weights.read_safetensors(truncated)
  assert not os.path.exists(str(path) + ".tmp")
