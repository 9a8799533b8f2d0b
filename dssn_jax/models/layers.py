"""Layers with PyTorch semantics that the segmentation model needs.

The reference trains in PyTorch and its pretrained weights come from
PyTorch, so three layers must behave like their torch counterparts, not like
the Flax defaults:

- `BatchNorm`: eps 1e-5, running statistics `0.9 * old + 0.1 * batch`, the
  running variance updated with the *unbiased* batch variance while the batch
  itself is normalized with the biased one (`torch.nn.BatchNorm2d`).
  Statistics and affine parameters are float32 whatever the compute dtype.
  The batch statistics are global over a batch sharded across devices
  (sync-BN), in one collective per forward in the train step.
- `resize_bilinear`: bilinear resize with `align_corners=True` (corner pixels
  map onto corner pixels), which `jax.image.resize` does not offer; by
  interpolation matrices, so its gradient scatters nothing.
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

from dssn_jax import parallel

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

  Synchronized statistics: under plain `jax.jit` with the batch sharded,
  the reductions are global and XLA all-reduces each of them (two in the
  forward: the mean, then the squared deviations from it). When the
  program is traced under `parallel.tracing_mesh` (the train step is) and
  the `data` axis divides the batch, the layer runs as a `shard_map` over
  `data` instead, as PyTorch's SyncBatchNorm: each device computes its
  rows' mean and sum of squared deviations (two passes, locally), one
  all-gather brings every device's pair, and the parallel-variance (Chan)
  combination gives the global mean and biased variance, as accurate as
  the global two-pass form (they differ by float32 rounding). The backward
  needs one all-reduce, of the gradients of the mean, the scale and the
  bias together (`(3, C)`), which are the BatchNorm parameters' gradients too.

  Attributes:
    use_running_average: normalize with the running statistics (eval mode)
      instead of the batch statistics (train mode).
    momentum: weight of the old running value (torch's `1 - momentum`).
    epsilon: added to the variance.
    dtype: dtype of the output; the statistics are computed in float32.
    scale_init, bias_init: initializers of the affine parameters.
    stats_every: in train mode, compute the batch statistics (and their
      running update) from rows `0, k, 2k, ...` only (`k = stats_every`:
      the first copy of each sample in a sample-major batch of `k` copies)
      and normalize every row with them; 1: all rows.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  stats_every: int = 1

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
      y = _normalize(x32, mean, var, scale, bias, self.epsilon)
      return y.astype(self.dtype)
    every = self.stats_every
    if every < 1 or x.shape[0] % every:
      raise ValueError(f'BatchNorm stats_every={every} does not divide the batch {x.shape[0]}')
    count = x.size // features // every
    if count < 2 and not self.is_initializing():
      raise ValueError(
        f'BatchNorm in train mode needs more than one value per channel; got'
        f' input shape {x.shape} (torch raises the same)'
      )
    groups = parallel.data_axis_size()
    if groups > 1 and x.shape[0] % (groups * every) == 0:
      y, mean, var = _synced_batch_norm(x32, scale, bias, self.epsilon, every)
    else:
      mean, var = _moments(_stats_rows(x32, every))
      y = _normalize(x32, mean, var, scale, bias, self.epsilon)
    if not self.is_initializing():
      unbiased = var * (count / (count - 1))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    return y.astype(self.dtype)


def _stats_rows(x: jax.Array, every: int) -> jax.Array:
  """Rows `0, every, 2 * every, ...` of `x` (all of them for 1)."""
  return x if every == 1 else x.reshape(-1, every, *x.shape[1:])[:, 0]


def _moments(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance over every axis but the last; two passes,
  so no cancellation when |mean| >> std."""
  axes = tuple(range(rows.ndim - 1))
  mean = jnp.mean(rows, axis=axes)
  return mean, jnp.mean(jnp.square(rows - mean), axis=axes)


def _normalize(x, mean, var, scale, bias, epsilon):
  return (x - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias


def _synced_batch_norm(x, scale, bias, epsilon: float, every: int):
  """Train-mode BatchNorm of a `data`-sharded float32 `x` as a `shard_map`
  (class docstring): one all-gather forward, one all-reduce backward.

  Returns:
    `(y, mean, var)`: `y` sharded like `x`; the global mean and biased
    variance replicated.
  """
  axis = parallel.AXIS

  def local(x, scale, bias):
    rows = _stats_rows(x, every)
    mean, var = _moments(rows)  # this device's rows
    n = rows.size // rows.shape[-1]
    gathered = jax.lax.all_gather(jnp.stack([mean, var * n]), axis, to='invarying')
    means, m2s = gathered[:, 0], gathered[:, 1]  # (devices, C), equal counts
    mean = jnp.mean(means, axis=0)
    m2 = jnp.sum(m2s, axis=0) + n * jnp.sum(jnp.square(means - mean), axis=0)
    var = m2 / (n * gathered.shape[0])
    # One varying copy of what every row reads: its cotangent is the
    # backward's single all-reduce.
    factors = jnp.stack([mean, scale * jax.lax.rsqrt(var + epsilon), bias])
    factors = jax.lax.pcast(factors, axis, to='varying')
    return (x - factors[0]) * factors[1] + factors[2], mean, var

  spec = jax.sharding.PartitionSpec
  return jax.shard_map(
    local, in_specs=(spec(axis), spec(), spec()), out_specs=(spec(axis), spec(), spec())
  )(x, scale, bias)


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


def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`(out, in)` float32 matrix of the 1-D align-corners linear resize
  (`_interpolation`): row `j` holds `1 - w` at `lo` and `w` at `hi`, the
  weights rounded as the gather form computes them."""
  lo, hi, w = _interpolation(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), np.float32(1) - w)
  np.add.at(m, (rows, hi), w)
  return m


def resize_with_matrices(x: jax.Array, rows: Any, cols: Any) -> jax.Array:
  """Separable resize of `(..., H, W, C)` by an `(h, H)` and a `(w, W)` matrix.

  Two contractions at float32 `HIGHEST` precision (no TF32 or one-pass bf16
  on accelerators): no gather, so the gradient is two matrix products
  rather than a scatter-add, and every row of a batch stays on its device.
  Returns float32 `(..., h, w, C)`.
  """
  hi = jax.lax.Precision.HIGHEST
  x = x.astype(jnp.float32)
  x = jnp.einsum('ip,...pqc->...iqc', jnp.asarray(rows, jnp.float32), x, precision=hi)
  return jnp.einsum('jq,...iqc->...ijc', jnp.asarray(cols, jnp.float32), x, precision=hi)


RESIZE_METHODS = ('matrix', 'gather')


def resize_bilinear(x: jax.Array, size: tuple[int, int], method: str = 'matrix') -> jax.Array:
  """Bilinear resize of `(N, H, W, C)` to `(N, h, w, C)`, align_corners=True.

  Matches `F.interpolate(..., mode='bilinear', align_corners=True)` for any
  input and output size, including the broadcast of a 1x1 map (image
  pooling). The weights are float32 and the result has the dtype of `x`.

  Args:
    x: `(N, H, W, C)`.
    size: `(h, w)`.
    method: 'matrix' (default): one interpolation matrix per axis
      (`resize_with_matrices`); its gradient is a matrix product.
      'gather': the former form, two gathers and lerps (rows, then
      columns), whose gradient is a scatter-add. The two agree to float32
      rounding (a product summed with exact zeros may round once
      differently where the backend fuses a multiply-add).
  """
  if x.ndim != 4:
    raise ValueError(f'resize_bilinear expects (N, H, W, C), got shape {x.shape}')
  if method not in RESIZE_METHODS:
    raise ValueError(f'resize_bilinear method {method!r} must be one of {RESIZE_METHODS}')
  out_h, out_w = int(size[0]), int(size[1])
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  dtype = x.dtype
  if method == 'matrix':
    rows, cols = linear_matrix(in_h, out_h), linear_matrix(in_w, out_w)
    return resize_with_matrices(x, rows, cols).astype(dtype)
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
  collection. Also takes `(n, k, H, W, C)`, `k` copies of each of `n`
  samples kept sample-major (so each copy stays on its sample's device),
  and drops the same planes as on their copy-major concatenation
  `(k * n, H, W, C)` (`jnp.concatenate` of the copies).
  """

  rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f'Dropout2d rate must be in [0, 1), got {self.rate}')
    if x.ndim not in (4, 5):
      raise ValueError(f'Dropout2d expects (N, H, W, C) or (n, k, H, W, C), got {x.shape}')
    if deterministic or self.rate == 0.0:
      return x
    n, copies = (x.shape[0], 1) if x.ndim == 4 else x.shape[:2]
    keep = jax.random.bernoulli(
      self.make_rng('dropout'), 1.0 - self.rate, (copies * n, 1, 1, x.shape[-1])
    )
    if x.ndim == 5:  # copy-major draw, sample-major layout
      keep = keep.reshape(copies, n, 1, 1, x.shape[-1]).swapaxes(0, 1)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))
