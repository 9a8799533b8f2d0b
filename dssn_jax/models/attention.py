"""Softmax attention for the ViT encoders, by implementation (`config.model.attention`).

`attend(q, k, v, scale, implementation)` on `(N, T, heads, head_dim)`
queries, keys and values computes `softmax(q k^T * scale) v` with the logits
and the softmax in float32 and the products in the inputs' dtype, as
`jax.nn.dot_product_attention` does:

  xla      XLA's plain attention: the `(N, heads, T, T)` probabilities are
           materialized, and kept for the backward pass (the reference's
           arithmetic; the default).
  cudnn    cuDNN's fused flash attention (NVIDIA GPUs, bfloat16 / float16
           inputs): the probabilities are never stored.
  chunked  the queries in blocks of `CHUNK`, each block's probabilities
           recomputed in the backward pass (`jax.checkpoint`): at most
           `(N, heads, CHUNK, T)` of them live at a time. Any device; the
           TPU path of the accelerator preset (below), where XLA has no
           fused attention.
  auto     what the device wants: `cudnn` on a GPU with bfloat16 compute,
           `chunked` on a TPU, `xla` otherwise (`resolve`).

The `precision=bf16` config argument (`config_lib.apply_precision`) sets
`auto` with bfloat16 compute.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dssn_jax.errors import one_of

IMPLEMENTATIONS = ('xla', 'cudnn', 'chunked', 'auto')
CHUNK = 512  # queries per block of `chunked` (DINOv2 at 518: 1370 tokens, 3 blocks)


def resolve(implementation: str, dtype: Any, platform: str | None = None) -> str:
  """`implementation` with `auto` replaced by the device's choice.

  Args:
    implementation: one of `IMPLEMENTATIONS` (`config.model.attention`).
    dtype: the model's compute dtype.
    platform: `jax.default_backend()` when None ('cpu', 'gpu', 'tpu').
  Returns:
    'xla' | 'cudnn' | 'chunked'.
  """
  one_of('model.attention', implementation, IMPLEMENTATIONS)
  if implementation != 'auto':
    return implementation
  platform = platform or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform in ('gpu', 'cuda') and half:
    return 'cudnn'
  if platform == 'tpu':
    return 'chunked'
  return 'xla'


def chunked_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float, chunk: int = CHUNK
) -> jax.Array:
  """`softmax(q k^T * scale) v` over blocks of `chunk` queries, `(N, T, H, D)`
  -> `(N, T, H, D)`; each block rematerialized in the backward pass."""
  n, t, h, d = q.shape
  size = min(chunk, t)
  pad = -t % size
  blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  blocks = blocks.reshape(n, (t + pad) // size, size, h, d).swapaxes(0, 1)

  @jax.checkpoint
  def block(qb: jax.Array) -> jax.Array:
    logits = jnp.einsum('nqhd,nkhd->nhqk', qb, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * jnp.float32(scale), axis=-1).astype(v.dtype)
    return jnp.einsum('nhqk,nkhd->nqhd', probs, v)

  out = jax.lax.map(block, blocks)  # (blocks, N, size, H, D)
  return out.swapaxes(0, 1).reshape(n, t + pad, h, d)[:, :t]


def attend(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float, implementation: str
) -> jax.Array:
  """Attention by `implementation` ('xla' | 'cudnn' | 'chunked'; `resolve`
  `auto` first), `(N, T, H, D)` each -> `(N, T, H, D)`."""
  if implementation == 'chunked':
    return chunked_attention(q, k, v, scale)
  if implementation not in ('xla', 'cudnn'):
    raise ValueError(f'attention implementation {implementation!r}: resolve it first')
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
