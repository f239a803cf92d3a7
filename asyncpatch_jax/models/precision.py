"""Mixed-precision matmuls: bf16 operands, float32 accumulation, forward and backward.

With `model.dtype='bfloat16'` every weight matmul and attention product takes bf16 operands,
accumulates in float32 (`preferred_element_type`) and rounds the result to bf16: what
accelerators do natively. Spelling it out matters on CPUs: XLA runs a bf16 × bf16 → f32 dot on
the AMX / AVX512-BF16 kernels (0.8-1.5 TFLOP/s on this project's 2-core Xeon, against about
0.25 for float32), while a bf16-output dot takes a slow generic path (about 0.15), and plain
autodiff of the f32-accumulating form hands the backward matmuls float32 cotangents (float32
dots again). `einsum` is therefore a custom-VJP op whose backward pass rounds the cotangent to
bf16 and accumulates both gradient matmuls in float32 as well.

`Linear` is `nnx.Linear` (same parameters) with this behaviour for `dtype='bfloat16'`; float32
operands take the plain `jnp.einsum` / `nnx.Linear`: the float32 model is unchanged, bit for
bit. `attention` is softmax attention on `[B, N, heads, head_dim]` built from `einsum` (bf16) or
`jax.nn.dot_product_attention` (float32, or `implementation='cudnn'`).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
BF16 = jnp.dtype(jnp.bfloat16)


def _terms(spec: str) -> tuple[str, str, str]:
  """`'ab,bc->ac'` → `('ab', 'bc', 'ac')`, checking that the gradient formula of `_einsum_bwd`
  holds: every index appears in at least two of the three terms (all three: a batch index), once
  in each (no traces, no index summed within one operand)."""
  match = re.fullmatch(r"\s*([\w.]*)\s*,\s*([\w.]*)\s*->\s*([\w.]*)\s*", spec)
  if match is None:
    raise ValueError(f"precision.einsum takes two operands and an explicit output, "
                     f"'ab,bc->ac', got {spec!r}")
  terms = match.groups()
  letters = [t.replace("...", "") for t in terms]
  for letter in set("".join(letters)):
    if sum(letter in t for t in letters) < 2 or any(t.count(letter) > 1 for t in letters):
      raise ValueError(f"precision.einsum: index {letter!r} of {spec!r} must appear in at least "
                       f"two of the three terms, once in each")
  if sum("..." in t for t in terms) not in (0, 2):
    raise ValueError(f"precision.einsum: '...' of {spec!r} must appear in exactly two terms")
  return terms


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _mixed_einsum(spec: str, a: Array, b: Array, out_dtype: str) -> Array:
  out = jnp.einsum(spec, a.astype(BF16), b.astype(BF16), preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _einsum_fwd(spec, a, b, out_dtype):
  # Dtypes travel as zero-size arrays: residuals must be JAX types.
  dtypes = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))
  return _mixed_einsum(spec, a, b, out_dtype), (a.astype(BF16), b.astype(BF16), dtypes)


def _einsum_bwd(spec, out_dtype, residuals, g):
  a, b, (a_dtype, b_dtype) = residuals
  sa, sb, so = _terms(spec)
  g = g.astype(BF16)
  da = jnp.einsum(f"{so},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f"{sa},{so}->{sb}", a, g, preferred_element_type=jnp.float32)
  return da.astype(a_dtype.dtype), db.astype(b_dtype.dtype)


_mixed_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, a: Array, b: Array, *, out_dtype=None) -> Array:
  """`jnp.einsum(spec, a, b)`; if either operand is bf16, the mixed-precision form: bf16
  operands, float32 accumulation, result in `out_dtype` (default bf16), and the same in the
  backward pass. `spec` names two operands and the output; each index appears in two or three
  terms."""
  if jnp.dtype(a.dtype) != BF16 and jnp.dtype(b.dtype) != BF16:
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
  _terms(spec)
  return _mixed_einsum(spec, a, b, str(jnp.dtype(out_dtype or BF16)))


def attention(q: Array, k: Array, v: Array, *, implementation: str | None = None) -> Array:
  """Softmax self-attention of `[B, N, heads, head_dim]` queries, keys and values.

  bf16 inputs (and `implementation` None or 'xla'): scores and the weighted sum through the
  mixed-precision `einsum` (heads moved next to the batch, the layout XLA:CPU's bf16 kernels
  take), softmax in float32. Otherwise `jax.nn.dot_product_attention` with `implementation`.
  """
  if implementation == "cudnn" or jnp.dtype(q.dtype) != BF16:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
  logits = einsum("bhqd,bhkd->bhqk", q, k, out_dtype=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)


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


@jax.custom_vjp
def add_bias(x: Array, bias: Array) -> Array:
  """`x + bias` (bias broadcast over the leading axes, result in x's dtype) whose bias gradient
  is a float32 sum: XLA:CPU turns a bf16 sum over many rows into a slow windowed reduction."""
  return x + bias.astype(x.dtype)


def _add_bias_fwd(x, bias):
  return add_bias(x, bias), jnp.zeros((0,), bias.dtype)


def _add_bias_bwd(bias_dtype, g):
  db = jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
  return g, db.astype(bias_dtype.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Linear(nnx.Linear):
  """`nnx.Linear` (the same parameters and float32 computation) whose `dtype='bfloat16'` form is
  mixed precision: bf16 operands, float32 accumulation and bias, a bf16 result; the backward
  pass likewise, with float32 weight and bias gradients."""

  def __call__(self, inputs: Array, *, out_sharding=None) -> Array:
    if self.dtype is None or jnp.dtype(self.dtype) != BF16 or out_sharding is not None:
      return super().__call__(inputs, out_sharding=out_sharding)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else jnp.zeros((kernel.shape[-1],),
                                                                  kernel.dtype)
    return _dense(inputs, kernel, bias)
