"""Layers with PyTorch semantics that the segmentation model needs.

The reference trains in PyTorch and its pretrained weights come from
PyTorch, so three layers must behave like their torch counterparts, not like
the Flax defaults:

- `BatchNorm`: eps 1e-5, running statistics `0.9 * old + 0.1 * batch`, the
  running variance updated with the *unbiased* batch variance while the batch
  itself is normalized with the biased one (`torch.nn.BatchNorm2d`).
  Statistics and affine parameters are float32 whatever the compute dtype.
  No `axis_name`: under `jax.jit` with the batch sharded over devices the
  batch statistics are already global (sync-BN).
- `resize_bilinear`: bilinear resize with `align_corners=True` (corner pixels
  map onto corner pixels), which `jax.image.resize` does not offer.
- `Dropout2d`: drops whole channels of each sample.

All tensors are channels-last, `(N, H, W, C)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def parse_dtype(dtype: Any) -> Any:
  """'float32' | 'bfloat16' (or the jnp dtype itself) -> jnp dtype."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f'model dtype {dtype!r} must be one of {", ".join(DTYPES)}')
    return DTYPES[dtype]
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f'model dtype {dtype!r} must be float32 or bfloat16')
  return dtype


class BatchNorm(nn.Module):
  """`torch.nn.BatchNorm2d` over the last axis of `(..., C)` inputs.

  Variables: `params/scale`, `params/bias` (`(C,)` float32) and
  `batch_stats/mean`, `batch_stats/var` (`(C,)` float32).

  Attributes:
    use_running_average: normalize with the running statistics (eval mode)
      instead of the batch statistics (train mode).
    momentum: weight of the old running value (torch's `1 - momentum`).
    epsilon: added to the variance.
    dtype: dtype of the output; the statistics are computed in float32.
    scale_init, bias_init: initializers of the affine parameters.
    stats_rows: in train mode, compute the batch statistics (and their
      running update) from the first `stats_rows` rows only and normalize
      every row with them; None: all rows.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  stats_rows: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', self.bias_init, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))

    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      rows = x32 if self.stats_rows is None else x32[: self.stats_rows]
      count = int(np.prod([rows.shape[a] for a in axes]))
      if count < 2 and not self.is_initializing():
        raise ValueError(
          f'BatchNorm in train mode needs more than one value per channel; got'
          f' input shape {x.shape} (torch raises the same)'
        )
      mean = jnp.mean(rows, axis=axes)
      # Two-pass variance: no cancellation when |mean| >> std.
      var = jnp.mean(jnp.square(rows - mean), axis=axes)
      if not self.is_initializing():
        unbiased = var * (count / (count - 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased

    y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


def _interpolation(in_size: int, out_size: int):
  """Source indices and weights of a 1-D align-corners linear resize.

  Output position `j` reads `src = j * (in - 1) / (out - 1)` (0 when `out` is
  1), i.e. `(1 - w) * x[lo] + w * x[hi]`.
  """
  if out_size == 1 or in_size == 1:
    src = np.zeros((out_size,), np.float64)
  else:
    src = np.arange(out_size, dtype=np.float64) * ((in_size - 1) / (out_size - 1))
  lo = np.clip(np.floor(src).astype(np.int32), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  w = (src - lo).astype(np.float32)
  return lo, hi, w


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of `(N, H, W, C)` to `(N, h, w, C)`, align_corners=True.

  Matches `F.interpolate(..., mode='bilinear', align_corners=True)` for any
  input and output size, including the broadcast of a 1x1 map (image
  pooling). Written as two gathers and lerps (rows, then columns), which are
  exact elementwise ops on every backend; the weights are computed in float32
  and the result has the dtype of `x`.
  """
  if x.ndim != 4:
    raise ValueError(f'resize_bilinear expects (N, H, W, C), got shape {x.shape}')
  out_h, out_w = int(size[0]), int(size[1])
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  dtype = x.dtype
  x = x.astype(jnp.float32)
  if in_h != out_h:
    lo, hi, w = _interpolation(in_h, out_h)
    w = jnp.asarray(w)[None, :, None, None]
    x = x[:, lo] * (1 - w) + x[:, hi] * w
  if in_w != out_w:
    lo, hi, w = _interpolation(in_w, out_w)
    w = jnp.asarray(w)[None, None, :, None]
    x = x[:, :, lo] * (1 - w) + x[:, :, hi] * w
  return x.astype(dtype)


class Dropout2d(nn.Module):
  """Channel dropout (`torch.nn.Dropout2d`) on `(N, H, W, C)`.

  Each `(sample, channel)` plane is zeroed with probability `rate`; the
  survivors are scaled by `1 / (1 - rate)`. Draws from the `dropout` rng
  collection.
  """

  rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'Dropout2d rate must be in [0, 1), got {self.rate}')
    if deterministic or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(
      self.make_rng('dropout'), 1.0 - self.rate, (x.shape[0], 1, 1, x.shape[-1])
    )
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))
