"""DINOv2 ViT encoders (patch 14) as UniMatch V2 uses them, channels-last.

    tokens = patch_embed(x) (14x14 stride-14 conv)   # (N, h*w, dim), h = H/14, w = W/14
    tokens = [cls, tokens] + pos_embed(h, w)          # the stored 37x37 grid, resized
    for i, block in enumerate(blocks):                # pre-norm, LayerScale
      tokens = block(tokens)
      if i in taps: out.append(norm(tokens)[:, 1:])   # final norm, cls dropped

`DinoVisionTransformer(x)` returns the tapped token maps, a tuple of
`(N, h*w, dim)` arrays (the authors' `get_intermediate_layers(x, taps)`).

Exactly the authors' computation (`model/backbone/dinov2.py` of
LiheYoung/UniMatch-V2, the official DINOv2 code):

- Block: `x + ls1 * attn(norm1(x))`, then `x + ls2 * ffn(norm2(x))`;
  LayerNorm eps 1e-6; attention scale head_dim^-0.5, qkv with bias; FFN
  `fc2(gelu(fc1(x)))` with exact (erf) GELU, or for giant SwiGLU
  `w3(silu(a) * b)` with `a, b = split(w12(x))`, hidden
  `(int(4 * dim * 2 / 3) + 7) // 8 * 8` (4096 for dim 1536).
- Position embedding: the stored `(1, 1 + 37*37, dim)` table is used as is
  for a 37x37 grid and otherwise resized like torch's
  `F.interpolate(grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37),
  mode='bicubic', align_corners=False, antialias=False)`: cubic convolution
  with a = -0.75, source coordinate `(dst + 0.5) / scale_factor - 0.5` (the
  given factor, not the size ratio), indices clamped at the borders. That is
  one small matrix per axis (`torch_bicubic_matrix`, built with numpy from
  static shapes) applied with an einsum; `jax.image.resize` (a = -0.5, size
  ratio) would not match. The cls position is kept as is.
- Attention: `jax.nn.dot_product_attention` (logits and softmax in float32
  whatever the compute dtype). LayerNorm statistics are float32 too, and the
  residual stream stays float32 under bfloat16 compute (torch autocast does
  the same: a bf16 sublayer output added to a float32 stream is float32).

Parameter names mirror the torch module names, so the weight import is
mechanical: `patch_embed/proj/{kernel,bias}`, `cls_token` `(1, 1, dim)`,
`pos_embed` `(1, 1 + 37*37, dim)`, `mask_token` `(1, dim)` (unused by the
forward, kept because every checkpoint holds it and torch counts it),
`blocks_{i}/{norm1,norm2}/{scale,bias}`, `blocks_{i}/attn/{qkv,proj}/{kernel,bias}`,
`blocks_{i}/{ls1,ls2}/gamma`, `blocks_{i}/mlp/{fc1,fc2}` (giant:
`blocks_{i}/mlp/{w12,w3}`), `norm/{scale,bias}`. Dense kernels are
`(in, out)` (torch's weight transposed), the patch conv `(14, 14, 3, dim)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dssn_jax.models import attention as attention_lib

PATCH = 14
POS_GRID = 37  # DINOv2 is trained at 518 = 37 * 14
INTERPOLATE_OFFSET = 0.1


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Size of one DINOv2 encoder.

  Attributes:
    dim: token width.
    depth: number of blocks.
    heads: attention heads.
    ffn: 'mlp' (GELU MLP, 4x) or 'swiglu' (giant).
    taps: 0-based blocks whose normed outputs feed the DPT head.
  """

  dim: int
  depth: int
  heads: int
  ffn: str
  taps: tuple[int, ...]


ENCODERS = {
  'dinov2_small': EncoderSpec(384, 12, 6, 'mlp', (2, 5, 8, 11)),
  'dinov2_base': EncoderSpec(768, 12, 12, 'mlp', (2, 5, 8, 11)),
  'dinov2_large': EncoderSpec(1024, 24, 16, 'mlp', (4, 11, 17, 23)),
  'dinov2_giant': EncoderSpec(1536, 40, 24, 'swiglu', (9, 19, 29, 39)),
  # For tests only: 4 narrow blocks, every one tapped; not a published model.
  'dinov2_tiny': EncoderSpec(32, 4, 2, 'mlp', (0, 1, 2, 3)),
}


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
  """Hidden width of the authors' `SwiGLUFFNFused`: 2/3 of 4*dim, rounded up to 8."""
  return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
  """torch's cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def torch_bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
  """`(out, in)` float64 matrix of torch's 1-D bicubic resize by `scale_factor`.

  `out = floor(in * scale_factor)`; output `i` reads around source
  `(i + 0.5) / scale_factor - 0.5` with taps clamped to `[0, in - 1]`
  (`align_corners=False`, no antialias), as torch's `upsample_bicubic2d`.
  """
  out_size = int(math.floor(in_size * scale_factor))
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) / scale_factor - 0.5
    base = math.floor(src)
    for k, weight in zip(range(-1, 3), _cubic_weights(src - base)):
      m[i, min(max(base + k, 0), in_size - 1)] += weight
  return m


def interpolate_pos_embed(pos_embed: jax.Array, h: int, w: int) -> jax.Array:
  """The authors' `interpolate_pos_encoding` for an `h x w` patch grid.

  Args:
    pos_embed: `(1, 1 + g*g, dim)`, cls position first, then the `g x g` grid
      row-major.
    h, w: patch rows and columns of the input.

  Returns:
    float32 `(1, 1 + h*w, dim)`.
  """
  pos_embed = pos_embed.astype(jnp.float32)
  g = math.isqrt(pos_embed.shape[1] - 1)
  if g * g != pos_embed.shape[1] - 1:
    raise ValueError(f'pos_embed {pos_embed.shape} does not hold a square grid')
  if h == g and w == g:
    return pos_embed
  rows = torch_bicubic_matrix(g, (h + INTERPOLATE_OFFSET) / g)
  cols = torch_bicubic_matrix(g, (w + INTERPOLATE_OFFSET) / g)
  if rows.shape[0] != h or cols.shape[0] != w:  # the authors assert the same
    raise ValueError(f'bicubic resize of the {g}x{g} grid gave {rows.shape[0]}x{cols.shape[0]}')
  grid = pos_embed[0, 1:].reshape(g, g, -1)
  grid = jnp.einsum(
    'ip,jq,pqd->ijd',
    jnp.asarray(rows, jnp.float32),
    jnp.asarray(cols, jnp.float32),
    grid,
    precision=jax.lax.Precision.HIGHEST,
  )
  return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, h * w, -1)], axis=1)


# Linear layers: the DINOv2 init (trunc normal 0.02, zero bias).
_dense_init = nn.initializers.truncated_normal(0.02)


class LayerScale(nn.Module):
  """`x * gamma`, gamma `(dim,)` initialized to `init_value` (UniMatch V2's
  DINOv2: 1; DINOv3's `layerscale_init`: 1e-5)."""

  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param(
      'gamma', nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32
    )
    return x * gamma.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention: `proj(attend(qkv(x)))` on `(N, T, dim)`."""

  heads: int
  dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, t, dim = x.shape
    dense = lambda f, name: nn.Dense(
      f, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init, name=name
    )
    qkv = dense(3 * dim, 'qkv')(x).reshape(n, t, 3, self.heads, dim // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention_lib.attend(q, k, v, (dim // self.heads) ** -0.5, self.implementation or 'xla')
    return dense(dim, 'proj')(out.reshape(n, t, dim))


class Mlp(nn.Module):
  """`fc2(gelu(fc1(x)))`, exact GELU."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda f, name: nn.Dense(
      f, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init, name=name
    )
    return dense(x.shape[-1], 'fc2')(nn.gelu(dense(self.hidden, 'fc1')(x), approximate=False))


class SwiGLU(nn.Module):
  """`w3(silu(a) * b)`, `a, b` the two halves of `w12(x)` (giant's FFN)."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda f, name: nn.Dense(
      f, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init, name=name
    )
    a, b = jnp.split(dense(2 * self.hidden, 'w12')(x), 2, axis=-1)
    return dense(x.shape[-1], 'w3')(nn.silu(a) * b)


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale on `(N, T, dim)` (float32 stream)."""

  heads: int
  ffn: str = 'mlp'
  dtype: Any = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    norm = lambda name: nn.LayerNorm(
      epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name
    )
    y = Attention(self.heads, self.dtype, self.attention, name='attn')(norm('norm1')(x))
    x = x + LayerScale(name='ls1')(y)
    if self.ffn == 'swiglu':
      ffn = SwiGLU(swiglu_hidden(dim), self.dtype, name='mlp')
    elif self.ffn == 'mlp':
      ffn = Mlp(4 * dim, self.dtype, name='mlp')
    else:
      raise ValueError(f'ffn={self.ffn!r} must be mlp or swiglu')
    return x + LayerScale(name='ls2')(ffn(norm('norm2')(x)))


class DinoVisionTransformer(nn.Module):
  """DINOv2 ViT with patch 14 returning the normed tokens of the tapped blocks.

  Attributes:
    dim, depth, heads, ffn, taps: the encoder's size (`EncoderSpec`).
    pos_grid: side of the stored position grid (37).
    dtype: compute dtype; params, LayerNorm statistics, softmax and the
      residual stream are float32.
    remat: rematerialize each block in the backward pass (`nn.remat`).
    attention: 'xla' (None too), 'cudnn' or 'chunked'
      (`dssn_jax.models.attention`; `auto` is resolved before).
  """

  dim: int
  depth: int
  heads: int
  ffn: str = 'mlp'
  taps: tuple[int, ...] = (2, 5, 8, 11)
  pos_grid: int = POS_GRID
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str | None = None

  @property
  def patch(self) -> int:
    """Side of a patch in pixels: inputs are multiples of it, the DPT's grid is 1/patch."""
    return PATCH

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    """Normalized images `(N, H, W, 3)`, H and W multiples of 14 ->
    tuple of `len(taps)` float32 token maps `(N, (H/14) * (W/14), dim)`."""
    del train  # no dropout, no drop path, no BatchNorm
    n, height, width = x.shape[:3]
    if height % PATCH or width % PATCH:
      raise ValueError(f'DINOv2 needs H and W multiples of {PATCH}; got images {x.shape}')
    if sorted(set(self.taps)) != list(self.taps) or not 0 <= self.taps[-1] < self.depth:
      raise ValueError(f'taps {self.taps} must be increasing blocks of 0..{self.depth - 1}')
    h, w = height // PATCH, width // PATCH
    patch = PatchEmbed(self.dim, self.dtype, name='patch_embed')(x)  # (N, h*w, dim)
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.dim), jnp.float32)
    pos = self.param(
      'pos_embed',
      nn.initializers.truncated_normal(0.02),
      (1, 1 + self.pos_grid**2, self.dim),
      jnp.float32,
    )
    self.param('mask_token', nn.initializers.zeros, (1, self.dim), jnp.float32)
    tokens = jnp.concatenate(
      [jnp.broadcast_to(cls, (n, 1, self.dim)), patch.astype(jnp.float32)], 1
    )
    tokens = tokens + interpolate_pos_embed(pos, h, w)

    block = nn.remat(Block) if self.remat else Block
    norm = nn.LayerNorm(
      epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, use_fast_variance=False, name='norm'
    )
    out = []
    for i in range(self.depth):
      tokens = block(self.heads, self.ffn, self.dtype, self.attention, name=f'blocks_{i}')(tokens)
      if i in self.taps:
        out.append(norm(tokens)[:, 1:].astype(jnp.float32))
    return tuple(out)


class PatchEmbed(nn.Module):
  """`patch x patch` stride-`patch` conv (`proj`, with bias) -> `(N, h*w, dim)`
  tokens, row-major (DINOv2: 14; DINOv3: 16)."""

  dim: int
  dtype: Any = jnp.float32
  patch: int = PATCH

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Conv(
      self.dim,
      (self.patch, self.patch),
      strides=(self.patch, self.patch),
      padding='VALID',
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name='proj',
    )(x.astype(self.dtype))
    return y.reshape(y.shape[0], -1, self.dim)


def create_encoder(name: str, **overrides) -> DinoVisionTransformer:
  """A named encoder; `overrides` replace `EncoderSpec` fields (`depth`,
  `taps` for reduced-depth tests) or set module attributes (`dtype`,
  `remat`, `attention`)."""
  if name not in ENCODERS:
    raise ValueError(f'unknown DINOv2 encoder {name!r}; known: {", ".join(ENCODERS)}')
  spec = dataclasses.asdict(ENCODERS[name])
  spec.update({k: v for k, v in overrides.items() if v is not None})
  spec['taps'] = tuple(int(t) for t in spec['taps'])
  return DinoVisionTransformer(**spec)
