"""Mixed precision: bf16 operands, float32 accumulation, forward and backward.

With `model.dtype='bfloat16'` every weight matmul and attention product takes bf16 operands,
accumulates in float32 (`preferred_element_type`) and rounds the result to bf16: what
accelerators do natively. Spelling it out matters on CPUs: XLA runs a bf16 × bf16 → f32 dot on
the AMX / AVX512-BF16 kernels (0.8-1.5 TFLOP/s on this project's 2-core Xeon, against about
0.25 for float32), while a bf16-output dot takes a slow generic path (about 0.15), and plain
autodiff of the f32-accumulating form hands the backward matmuls float32 cotangents (float32
dots again). The ops here are therefore custom-VJP ops whose backward passes round the cotangent
to bf16 and accumulate their matmuls in float32 as well:

  - `Linear`: `nnx.Linear` (same parameters), float32 weight and bias gradients;
  - `attention`: softmax attention on fused `[B, N, 3, heads, head_dim]` queries, keys and
    values (`mixed_attention`; float32 inputs or `implementation='cudnn'` go to
    `jax.nn.dot_product_attention`);
  - `gelu` (tanh approximation) and `add_bias`: elementwise ops whose autodiff XLA:CPU runs
    slowly at this size.

Float32 operands take the plain flax / jax ops: the float32 model is unchanged, bit for bit.

Those forms are for XLA:CPU. GPUs and TPUs run bf16 matmuls with float32 accumulation natively
and fuse elementwise autodiff well, so there the standard path is used: the flax modules with
bf16 `dtype` (float32 parameters), `jax.nn.dot_product_attention` (cuDNN's flash attention on
GPUs where it applies, XLA's on TPUs) and plain autodiff. `model.kernels` picks the path for a
process (`select_kernels`): 'auto' (by `jax.default_backend()`), 'cpu' or 'standard'. Both compute
the same function, within bf16 rounding; the choice is read when a function is traced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

Array = jax.Array
BF16 = jnp.dtype(jnp.bfloat16)
# 'auto': 'cpu' on the CPU backend, else 'standard'; 'cpu': this module's custom-VJP forms for
# bf16; 'standard': the flax / jax ops and autodiff (what accelerators want).
KERNELS = ("auto", "cpu", "standard")
_selected = "auto"
_logged: tuple[str, str] | None = None  # the last (kernels, resolved) written to the log


def resolve_kernels(kernels: str = "auto", backend: str | None = None) -> str:
  """'cpu' or 'standard' for a `model.kernels` value on `backend` (default: JAX's)."""
  if kernels not in KERNELS:
    raise ValueError(f"unknown model.kernels {kernels!r}; choose one of {KERNELS}")
  if kernels != "auto":
    return kernels
  return "cpu" if (backend or jax.default_backend()) == "cpu" else "standard"


def select_kernels(kernels: str) -> str:
  """Sets the process's kernels (`model.kernels`) for every function traced from now on, logs
  the resolved choice when it changes, and returns it ('cpu' or 'standard')."""
  global _selected, _logged
  resolved = resolve_kernels(kernels)
  if _logged != (kernels, resolved):
    logging.info("precision kernels: %s (model.kernels=%r, backend %s)", resolved, kernels,
                 jax.default_backend())
    _logged = (kernels, resolved)
  _selected = kernels
  return resolved


def active_kernels() -> str:
  """The resolved kernels functions are traced with now: 'cpu' or 'standard'."""
  return resolve_kernels(_selected)


@contextlib.contextmanager
def kernels_scope(kernels: str) -> Iterator[str]:
  """`select_kernels(kernels)` inside the block, the previous choice after it (for tests and
  benchmarks that compare the paths in one process; trace inside the block)."""
  previous = _selected
  try:
    yield select_kernels(kernels)
  finally:
    select_kernels(previous)


def _mixed(dtype) -> bool:
  """Whether `dtype` takes this module's custom-VJP forms: bf16 under the 'cpu' kernels."""
  return dtype is not None and jnp.dtype(dtype) == BF16 and active_kernels() == "cpu"


def standard_attention_impl(qkv: Array) -> str:
  """`jax.nn.dot_product_attention`'s implementation on the standard path: cuDNN's flash
  attention on GPUs for bf16 / fp16 heads it supports (head dim a multiple of 8, at most 128),
  else XLA's (TPUs, CPUs, float32)."""
  head_dim = qkv.shape[-1]
  half = jnp.dtype(qkv.dtype) in (BF16, jnp.dtype(jnp.float16))
  supported = half and head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if jax.default_backend() == "gpu" and supported else "xla"


def attention(qkv: Array, *, implementation: str | None = None) -> Array:
  """Softmax self-attention of fused `[B, N, 3, heads, head_dim]` queries, keys and values →
  `[B, N, heads, head_dim]`.

  bf16 inputs under the 'cpu' kernels (and `implementation` None or 'xla'): `mixed_attention`.
  Otherwise `jax.nn.dot_product_attention` with `implementation`; None (automatic) is
  `standard_attention_impl`'s choice on the standard path, XLA's elsewhere.
  """
  if implementation != "cudnn" and _mixed(qkv.dtype):
    return mixed_attention(qkv)
  if implementation is None and active_kernels() == "standard":
    implementation = standard_attention_impl(qkv)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _attention_scale(q: Array) -> np.float32:
  return np.float32(1.0 / np.sqrt(q.shape[-1]))


def _scaled(q: Array) -> Array:
  # The 1/√d scale on the queries, not on the [.., N, N] scores: XLA:CPU's fused product kernels
  # take a scalar factor as a materialised [B, heads, N, N] operand.
  return (q * _attention_scale(q)).astype(q.dtype)


@jax.custom_vjp
def mixed_attention(qkv: Array) -> Array:
  """Attention of bf16 `qkv: [B, N, 3, heads, d]`: float32 scores and softmax, bf16 products
  with float32 accumulation, written for XLA:CPU's kernels (on accelerators, plain einsums).

  Inference (this primal): heads moved next to the batch, where XLA:CPU fuses both products and
  the softmax into one kernel (computed in float32), its fastest forward pass. Training
  (`_attention_fwd`, `_attention_bwd`): every product is a bf16 × bf16 → f32 einsum on the
  `[B, N, heads, d]` layout the qkv projection produces, in operand orders XLA:CPU keeps in
  bf16 (after an explicit transpose it silently upcasts a batched product to a float32 one,
  3-4× slower; 'bqhd,bhqk->bkhd' even fails to run); the probabilities are kept for the
  backward pass, which returns the fused `[B, N, 3, heads, d]` gradient in one piece.
  """
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
  logits = jnp.einsum("bhqd,bhkd->bhqk", _scaled(q), k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(BF16)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs, v, preferred_element_type=jnp.float32)
  return out.astype(BF16).transpose(0, 2, 1, 3)


def _attention_fwd(qkv):
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = jnp.einsum("bqhd,bkhd->bhqk", _scaled(q), k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(BF16)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).astype(BF16)
  return out, (qkv, probs, out)


def _attention_bwd(residuals, g):
  qkv, probs, out = residuals
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  g = g.astype(BF16)
  dv = jnp.einsum("bhqk,bqhd->bkhd", probs, g, preferred_element_type=jnp.float32)
  dprobs = jnp.einsum("bqhd,bkhd->bhqk", g, v, preferred_element_type=jnp.float32)
  # Softmax backward: dlogits = p (dp − Σ_k p dp), with Σ_k p dp = Σ_d g·out.
  rowdot = jnp.einsum("bqhd,bqhd->bhq", g, out, preferred_element_type=jnp.float32)
  dlogits = (probs * (dprobs - rowdot[..., None])).astype(BF16)
  scale = _attention_scale(q)
  dq = scale * jnp.einsum("bhqk,bkhd->bqhd", dlogits, k, preferred_element_type=jnp.float32)
  dk = scale * jnp.einsum("bhqk,bqhd->bkhd", dlogits, q, preferred_element_type=jnp.float32)
  return (jnp.stack([dq, dk, dv], axis=2).astype(BF16),)


mixed_attention.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def _dense(x: Array, kernel: Array, bias: Array) -> Array:
  y = jnp.einsum("...k,kn->...n", x.astype(BF16), kernel.astype(BF16),
                 preferred_element_type=jnp.float32)
  return (y + bias.astype(jnp.float32)).astype(BF16)


def _dense_fwd(x, kernel, bias):
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype), jnp.zeros((0,), bias.dtype))
  return _dense(x, kernel, bias), (x.astype(BF16), kernel.astype(BF16), dtypes)


def _dense_bwd(residuals, g):
  x, kernel, (x_dtype, kernel_dtype, bias_dtype) = residuals
  g = g.astype(BF16)
  dx = jnp.einsum("...n,kn->...k", g, kernel, preferred_element_type=jnp.float32)
  dk = jnp.einsum("...k,...n->kn", x, g, preferred_element_type=jnp.float32)
  # The bias gradient as its own float32 sum (XLA:CPU fuses the bf16 one badly: ~40x slower).
  db = jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
  return dx.astype(x_dtype.dtype), dk.astype(kernel_dtype.dtype), db.astype(bias_dtype.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_GELU_A = np.float32(0.044715)


def gelu(x: Array) -> Array:
  """GELU, tanh approximation (DiT's). bf16 under the 'cpu' kernels: `_mixed_gelu`; otherwise
  flax's `nnx.gelu`."""
  if not _mixed(x.dtype):
    return nnx.gelu(x, approximate=True)
  return _mixed_gelu(x)


def _gelu_tanh(xf: Array) -> Array:
  return jnp.tanh(_GELU_C * (xf + _GELU_A * xf**3))


@jax.custom_vjp
def _mixed_gelu(x: Array) -> Array:
  """Computed in float32, returned in bf16, with a hand-written derivative: one elementwise pass
  over x and the cotangent (autodiff of the tanh form takes several passes over the
  `[B, N, 4d]` activations, a large cost on CPUs)."""
  xf = x.astype(jnp.float32)
  return (0.5 * xf * (1.0 + _gelu_tanh(xf))).astype(x.dtype)


def _gelu_fwd(x):
  return _mixed_gelu(x), x


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  t = _gelu_tanh(xf)
  slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * xf * xf)
  return ((g.astype(jnp.float32) * slope).astype(x.dtype),)


_mixed_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def add_bias(x: Array, bias: Array) -> Array:
  """`x + bias` (bias broadcast over the leading axes, result in x's dtype). bf16 under the 'cpu'
  kernels: `_add_bias_f32_grad`, whose bias gradient is a float32 sum (XLA:CPU turns a bf16 sum
  over many rows into a slow windowed reduction)."""
  if not _mixed(x.dtype):
    return x + bias.astype(x.dtype)
  return _add_bias_f32_grad(x, bias)


@jax.custom_vjp
def _add_bias_f32_grad(x: Array, bias: Array) -> Array:
  return x + bias.astype(x.dtype)


def _add_bias_fwd(x, bias):
  return _add_bias_f32_grad(x, bias), jnp.zeros((0,), bias.dtype)


def _add_bias_bwd(bias_dtype, g):
  db = jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
  return g, db.astype(bias_dtype.dtype)


_add_bias_f32_grad.defvjp(_add_bias_fwd, _add_bias_bwd)


class Linear(nnx.Linear):
  """`nnx.Linear` (the same parameters and float32 computation) whose `dtype='bfloat16'` form
  under the 'cpu' kernels is mixed precision: bf16 operands, float32 accumulation and bias, a
  bf16 result; the backward pass likewise, with float32 weight and bias gradients. Otherwise
  exactly `nnx.Linear`."""

  def __call__(self, inputs: Array, *, out_sharding=None) -> Array:
    if not _mixed(self.dtype) or out_sharding is not None:
      return super().__call__(inputs, out_sharding=out_sharding)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else jnp.zeros((kernel.shape[-1],),
                                                                  kernel.dtype)
    return _dense(inputs, kernel, bias)
