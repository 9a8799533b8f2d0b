"""DINOv3 ViT encoders (patch 16, axial RoPE) and their DPT segmenter, channels-last.

    tokens = patch_embed(x) (16x16 stride-16 conv)     # (N, h*w, dim), h = H/16, w = W/16
    tokens = [cls, storage_0..3, tokens]               # no position table
    sin, cos = rope(h, w)                              # (h*w, head_dim), patch tokens only
    for i, block in enumerate(blocks):                 # pre-norm, LayerScale, RoPE on q and k
      tokens = block(tokens, sin, cos)
      if i in taps: out.append(norm(tokens)[:, 5:])    # final norm; cls and storage dropped

`DinoV3VisionTransformer(x)` returns the tapped token maps, a tuple of
`(N, h*w, dim)` arrays: Meta's `get_intermediate_layers(x, n=taps,
norm=True)` (`facebookresearch/dinov3`, `dinov3/models/vision_transformer.py`)
in evaluation mode, computed the same way:

- Sizes: `dinov3/hub/backbones.py`'s arguments (`ENCODERS`): LayerNorm eps
  1e-5 (its `'layernormbf16'`, a float32 LayerNorm), LayerScale, 4 storage
  tokens, qkv bias with its key third masked to zero (`mask_k_bias`: the
  bias is multiplied by `[1, 0, 1]` per third; the 7B has no qkv bias),
  FFN `fc2(gelu(fc1(x)))` (exact GELU, hidden `int(dim * ffn_ratio)`) or
  SwiGLU `w3(silu(w1(x)) * w2(x))` with hidden `d` rounded up to a multiple
  of 8 (`swiglu`) or 64 (`swiglu64`, the 7B), `d = int(int(dim * ffn_ratio) * 2/3)`.
- RoPE (`dinov3/layers/rope_position_encoding.py`, `attention.py`):
  periods `100 ** (2k / (head_dim / 2))`, k < head_dim/4; patch centres
  `(i + 0.5) / h` and `(j + 0.5) / w` mapped to [-1, 1] per axis
  (`normalize_coords='separate'`); angles `2 pi coord / period`, laid out
  `[rows' D/4 | columns' D/4]` and tiled twice to head_dim; queries and keys
  of the patch tokens (not the 5 prefix tokens) become
  `x cos + rotate_half(x) sin`, `rotate_half([a, b]) = [-b, a]`, in float32.
- Training mode: Meta's module multiplies the coordinates by a log-uniform
  draw in `[1/r, r]` (`rescale_coords=2`) when the torch module is in
  training mode. Here it is `rope_rescale` (`config.model.rope_rescale`, 0
  = off, the default; docs/backbones.md says why): one scalar per call,
  drawn from the `'rope'` rng stream, shared by every image, so calls that
  share the key (micro-batches, devices) share the draw.

Parameter names mirror Meta's module names so the weight import is
mechanical (`dinov3_weights`): `patch_embed/proj/{kernel,bias}`,
`cls_token` `(1, 1, dim)`, `storage_tokens` `(1, 4, dim)`, `mask_token`
`(1, dim)` (unused by the forward, kept because checkpoints hold it),
`blocks_{i}/{norm1,norm2}/{scale,bias}`, `blocks_{i}/attn/qkv/{kernel,bias}`
(the whole `3*dim` bias, its key third unused), `blocks_{i}/attn/proj`,
`blocks_{i}/{ls1,ls2}/gamma`, `blocks_{i}/mlp/{fc1,fc2}` or
`blocks_{i}/mlp/{w1,w2,w3}`, `norm/{scale,bias}`. The RoPE periods are no
variable: they follow from `base` and the head width (Meta keeps them as a
buffer; the converter checks a checkpoint's against them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dssn_jax.errors import ConfigError, ConversionError, one_of
from dssn_jax.models import attention as attention_lib
from dssn_jax.models import dinov3_weights, dpt, layers, registry
from dssn_jax.models.dinov2 import LayerScale, Mlp, PatchEmbed

PATCH = 16
STORAGE_TOKENS = 4
ROPE_BASE = 100.0
LAYERSCALE_INIT = 1e-5
NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Size of one DINOv3 encoder (`dinov3/hub/backbones.py`).

  Attributes:
    dim: token width.
    depth: number of blocks.
    heads: attention heads.
    ffn: 'mlp', 'swiglu' (hidden rounded up to 8) or 'swiglu64' (to 64).
    ffn_ratio: the FFN's nominal hidden width over `dim`.
    taps: 0-based blocks whose normed outputs feed the DPT head.
    qkv_bias: whether qkv has a bias (all but the 7B).
  """

  dim: int
  depth: int
  heads: int
  ffn: str
  ffn_ratio: float
  taps: tuple[int, ...]
  qkv_bias: bool = True


ENCODERS = {
  'dinov3_small': EncoderSpec(384, 12, 6, 'mlp', 4, (2, 5, 8, 11)),
  'dinov3_small_plus': EncoderSpec(384, 12, 6, 'swiglu', 6, (2, 5, 8, 11)),
  'dinov3_base': EncoderSpec(768, 12, 12, 'mlp', 4, (2, 5, 8, 11)),
  'dinov3_large': EncoderSpec(1024, 24, 16, 'mlp', 4, (4, 11, 17, 23)),
  'dinov3_large_plus': EncoderSpec(1024, 24, 16, 'swiglu', 6, (4, 11, 17, 23)),
  # 32 blocks: the last of each quarter, as [2, 5, 8, 11] for 12 blocks and
  # depthers.py's [9, 19, 29, 39] for the 7B's 40.
  'dinov3_huge_plus': EncoderSpec(1280, 32, 20, 'swiglu', 6, (7, 15, 23, 31)),
  'dinov3_7b': EncoderSpec(4096, 40, 32, 'swiglu64', 3, (9, 19, 29, 39), qkv_bias=False),
  # For tests only: 4 narrow blocks, every one tapped; not a published model.
  'dinov3_tiny': EncoderSpec(32, 4, 2, 'mlp', 4, (0, 1, 2, 3)),
}

# DPT head widths: UniMatch V2's for the DINOv2 encoder of the same width
# (S, B, L), ViT-L's fusion width with L's width ratios for H+ (no reference
# has an H+ DPT), Meta's depthers.py DPT for the 7B (channels 512,
# post-process channels 2048).
HEAD_SIZES = {
  'dinov3_small': dict(features=64, out_channels=(48, 96, 192, 384)),
  'dinov3_small_plus': dict(features=64, out_channels=(48, 96, 192, 384)),
  'dinov3_base': dict(features=128, out_channels=(96, 192, 384, 768)),
  'dinov3_large': dict(features=256, out_channels=(256, 512, 1024, 1024)),
  'dinov3_large_plus': dict(features=256, out_channels=(256, 512, 1024, 1024)),
  'dinov3_huge_plus': dict(features=256, out_channels=(320, 640, 1280, 1280)),
  'dinov3_7b': dict(features=512, out_channels=(2048, 2048, 2048, 2048)),
  'dinov3_tiny': dict(features=16, out_channels=(8, 16, 32, 32)),
}

FFNS = ('mlp', 'swiglu', 'swiglu64')


def ffn_hidden(dim: int, ffn: str, ffn_ratio: float) -> int:
  """Hidden width of the FFN: `int(dim * ffn_ratio)` for the MLP; for SwiGLU
  `d = int(that * 2/3)` rounded up to a multiple of 8 (64 for `swiglu64`)."""
  hidden = int(dim * ffn_ratio)
  if ffn == 'mlp':
    return hidden
  align = {'swiglu': 8, 'swiglu64': 64}[one_of('ffn', ffn, FFNS[1:])]
  d = int(hidden * 2 / 3)
  return d + (-d % align)


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> np.ndarray:
  """float32 `(head_dim // 4,)` periods `base ** (2k / (head_dim // 2))`."""
  k = np.arange(head_dim // 4, dtype=np.float64)
  return (base ** (2.0 * k / (head_dim // 2))).astype(np.float32)


def rope_sincos(
  h: int, w: int, head_dim: int, scale: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """float32 `(sin, cos)`, each `(h*w, head_dim)`, of an `h x w` patch grid.

  Coordinates are the patch centres in [-1, 1], each axis over its own
  length, times `scale` when given (training-mode rescale); angles
  `2 pi c / period` are `[row angles | column angles]`, tiled twice.
  """
  if head_dim % 4:
    raise ValueError(f'RoPE needs a head width divisible by 4, got {head_dim}')
  ch = (np.arange(h, dtype=np.float64) + 0.5) / h
  cw = (np.arange(w, dtype=np.float64) + 0.5) / w
  coords = np.stack(np.meshgrid(ch, cw, indexing='ij'), axis=-1).reshape(h * w, 2)
  coords = jnp.asarray(2.0 * coords - 1.0, jnp.float32)
  if scale is not None:
    coords = coords * scale.astype(jnp.float32)
  periods = jnp.asarray(rope_periods(head_dim))
  angles = (2 * math.pi) * coords[:, :, None] / periods[None, None, :]  # (hw, 2, D/4)
  angles = jnp.tile(angles.reshape(h * w, head_dim // 2), (1, 2))
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """`x cos + rotate_half(x) sin` on the last `hw` tokens of `x` `(N, T, heads,
  head_dim)` (in float32, back to x's dtype); the prefix tokens unchanged."""
  prefix = x.shape[1] - sin.shape[0]
  p = x[:, prefix:].astype(jnp.float32)
  a, b = jnp.split(p, 2, axis=-1)
  rotated = jnp.concatenate([-b, a], axis=-1)
  p = p * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return jnp.concatenate([x[:, :prefix], p.astype(x.dtype)], axis=1)


# Linear layers: Meta's init (trunc normal 0.02, zero bias).
_dense_init = nn.initializers.truncated_normal(0.02)


class QKV(nn.Module):
  """`x @ kernel + bias * [1, 0, 1]`: Meta's `LinearKMaskedBias` (the key
  third of the bias is masked out), or no bias (`use_bias=False`, the 7B)."""

  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    kernel = self.param('kernel', _dense_init, (dim, 3 * dim), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (3 * dim,), jnp.float32)
      mask = jnp.concatenate([jnp.ones(dim), jnp.zeros(dim), jnp.ones(dim)])
      y = y + (bias * mask).astype(self.dtype)
    return y


class RopeAttention(nn.Module):
  """Multi-head self-attention with RoPE on the patch tokens' queries and keys."""

  heads: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    n, t, dim = x.shape
    qkv = QKV(self.qkv_bias, self.dtype, name='qkv')(x).reshape(n, t, 3, self.heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    out = attention_lib.attend(q, k, v, (dim // self.heads) ** -0.5, self.implementation or 'xla')
    proj = nn.Dense(
      dim, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init, name='proj'
    )
    return proj(out.reshape(n, t, dim))


class SwiGLU(nn.Module):
  """`w3(silu(w1(x)) * w2(x))`: Meta's `SwiGLUFFN` (three separate linears)."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda f, name: nn.Dense(
      f, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init, name=name
    )
    hidden = nn.silu(dense(self.hidden, 'w1')(x)) * dense(self.hidden, 'w2')(x)
    return dense(x.shape[-1], 'w3')(hidden)


class Block(nn.Module):
  """Pre-norm block with RoPE attention and LayerScale on `(N, T, dim)` (float32 stream)."""

  heads: int
  ffn: str = 'mlp'
  ffn_ratio: float = 4.0
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    norm = lambda name: nn.LayerNorm(
      epsilon=NORM_EPS,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      name=name,
    )
    attn = RopeAttention(self.heads, self.qkv_bias, self.dtype, self.attention, name='attn')
    x = x + LayerScale(LAYERSCALE_INIT, name='ls1')(attn(norm('norm1')(x), sin, cos))
    hidden = ffn_hidden(dim, self.ffn, self.ffn_ratio)
    if self.ffn == 'mlp':
      ffn = Mlp(hidden, self.dtype, name='mlp')
    else:
      ffn = SwiGLU(hidden, self.dtype, name='mlp')
    return x + LayerScale(LAYERSCALE_INIT, name='ls2')(ffn(norm('norm2')(x)))


class DinoV3VisionTransformer(nn.Module):
  """DINOv3 ViT with patch 16 returning the normed patch tokens of the tapped blocks.

  Attributes:
    dim, depth, heads, ffn, ffn_ratio, taps, qkv_bias: the size (`EncoderSpec`).
    dtype: compute dtype; params, LayerNorm statistics, RoPE, softmax and the
      residual stream are float32.
    remat: rematerialize each block in the backward pass (`nn.remat`).
    attention: 'xla' (None too), 'cudnn' or 'chunked'
      (`dssn_jax.models.attention`; `auto` is resolved before).
    rope_rescale: in training mode (`train=True`), multiply the RoPE
      coordinates by `exp(u)`, `u ~ U(-log r, log r)`, one draw per call from
      the `'rope'` rng; 0 or 1: off (evaluation mode never rescales).
  """

  dim: int
  depth: int
  heads: int
  ffn: str = 'mlp'
  ffn_ratio: float = 4.0
  taps: tuple[int, ...] = (2, 5, 8, 11)
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str | None = None
  rope_rescale: float = 0.0

  @property
  def patch(self) -> int:
    """Side of a patch in pixels: inputs are multiples of it, the DPT's grid is 1/patch."""
    return PATCH

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
    """Normalized images `(N, H, W, 3)`, H and W multiples of 16 ->
    tuple of `len(taps)` float32 token maps `(N, (H/16) * (W/16), dim)`."""
    n, height, width = x.shape[:3]
    if height % PATCH or width % PATCH:
      raise ValueError(f'DINOv3 needs H and W multiples of {PATCH}; got images {x.shape}')
    if sorted(set(self.taps)) != list(self.taps) or not 0 <= self.taps[-1] < self.depth:
      raise ValueError(f'taps {self.taps} must be increasing blocks of 0..{self.depth - 1}')
    if self.ffn not in FFNS:
      raise ValueError(f'ffn={self.ffn!r} must be one of {", ".join(FFNS)}')
    h, w = height // PATCH, width // PATCH
    patch = PatchEmbed(self.dim, self.dtype, PATCH, name='patch_embed')(x)  # (N, h*w, dim)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param('cls_token', init, (1, 1, self.dim), jnp.float32)
    storage = self.param('storage_tokens', init, (1, STORAGE_TOKENS, self.dim), jnp.float32)
    self.param('mask_token', nn.initializers.zeros, (1, self.dim), jnp.float32)
    prefix = jnp.concatenate([cls, storage], axis=1)
    tokens = jnp.concatenate(
      [jnp.broadcast_to(prefix, (n, 1 + STORAGE_TOKENS, self.dim)), patch.astype(jnp.float32)], 1
    )
    sin, cos = rope_sincos(h, w, self.dim // self.heads, self._rope_scale(train))

    block = nn.remat(Block) if self.remat else Block
    norm = nn.LayerNorm(
      epsilon=NORM_EPS,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      name='norm',
    )
    out = []
    for i in range(self.depth):
      tokens = block(
        self.heads,
        self.ffn,
        self.ffn_ratio,
        self.qkv_bias,
        self.dtype,
        self.attention,
        name=f'blocks_{i}',
      )(tokens, sin, cos)
      if i in self.taps:
        out.append(norm(tokens)[:, 1 + STORAGE_TOKENS :].astype(jnp.float32))
    return tuple(out)

  def _rope_scale(self, train: bool) -> jax.Array | None:
    """The training-mode coordinate scale (a scalar), or None."""
    r = float(self.rope_rescale)
    if not train or r in (0.0, 1.0):
      return None
    if r < 1.0:
      raise ValueError(f'rope_rescale={r} must be 0 (off) or >= 1')
    if not self.has_rng('rope'):
      raise ValueError(
        f'rope_rescale={r} in training mode draws its scale from the "rope" rng: '
        "call the model with rngs={'rope': key} (one key per step), or set "
        'config.model.rope_rescale=0'
      )
    u = jax.random.uniform(self.make_rng('rope'), (), jnp.float32, -math.log(r), math.log(r))
    return jnp.exp(u)


def create_encoder(name: str, **overrides) -> DinoV3VisionTransformer:
  """A named encoder; `overrides` replace `EncoderSpec` fields (`depth`,
  `taps`, `ffn` for reduced tests) or set module attributes (`dtype`,
  `remat`, `attention`, `rope_rescale`); None values are ignored."""
  if name not in ENCODERS:
    raise ValueError(f'unknown DINOv3 encoder {name!r}; known: {", ".join(ENCODERS)}')
  spec = dataclasses.asdict(ENCODERS[name])
  spec.update({k: v for k, v in overrides.items() if v is not None})
  spec['taps'] = tuple(int(t) for t in spec['taps'])
  return DinoV3VisionTransformer(**spec)


def create_dinov3_dpt(
  backbone: str,
  num_classes: int,
  *,
  dtype: Any = jnp.float32,
  dropout: float = 0.5,
  remat: bool = False,
  freeze_backbone: bool = False,
  depth: int | None = None,
  taps: Sequence[int] | None = None,
  ffn: str | None = None,
  ffn_ratio: float | None = None,
  features: int | None = None,
  out_channels: Sequence[int] | None = None,
  attention: str | None = None,
  rope_rescale: float = 0.0,
) -> dpt.DPTSegmenter:
  """DINOv3 encoder + DPT head (`HEAD_SIZES`): UniMatch V2's segmenter on DINOv3.

  Args:
    backbone: a name of `ENCODERS` (`dinov3_tiny`: for tests).
    num_classes: classifier outputs.
    dtype: compute dtype (a jnp dtype; `models.parse_dtype` reads strings).
    dropout: channel-dropout rate of `perturb=k` copies.
    remat: rematerialize each transformer block in the backward pass.
    freeze_backbone: no gradient through the encoder.
    depth, taps, ffn, ffn_ratio: a reduced encoder (tests); None keeps the named one.
    features, out_channels: head widths; None keeps the named ones.
    attention: 'xla' (None too) | 'cudnn' | 'chunked' (`dssn_jax.models.attention`).
    rope_rescale: training-mode RoPE coordinate rescale (0: off).
  """
  if backbone not in HEAD_SIZES:
    raise ValueError(f'unknown DINOv3 backbone {backbone!r}; known: {", ".join(HEAD_SIZES)}')
  encoder = create_encoder(
    backbone,
    depth=depth,
    taps=taps,
    ffn=ffn,
    ffn_ratio=ffn_ratio,
    dtype=dtype,
    remat=remat,
    attention=attention,
    rope_rescale=float(rope_rescale),
  )
  return dpt.segmenter(
    encoder,
    HEAD_SIZES[backbone],
    num_classes,
    dtype=dtype,
    dropout=dropout,
    freeze_backbone=freeze_backbone,
    features=features,
    out_channels=out_channels,
  )


def dinov3_dpt_from_config(config) -> dpt.DPTSegmenter:
  """`create_dinov3_dpt` from `config.model` (backbone, dtype, dropout,
  attention, rope_rescale) and `config.train` (remat, freeze_backbone)."""
  m = config.model
  rescale = float(m.get('rope_rescale', 0.0))
  if 0.0 < rescale < 1.0:
    raise ConfigError(f'config.model.rope_rescale={rescale} must be 0 (off) or >= 1')
  return create_dinov3_dpt(
    m.backbone,
    config.data.num_classes,
    dtype=layers.parse_dtype(m.dtype),
    dropout=m.dropout,
    remat=config.train.remat,
    freeze_backbone=config.train.freeze_backbone,
    attention=attention_lib.resolve(m.attention, layers.parse_dtype(m.dtype)),
    rope_rescale=rescale,
  )


def backbone_of(state, layout: str) -> str:
  """The DINOv3 encoder whose width, depth and FFN a state dict of `layout` holds."""
  dim, depth, swiglu = dinov3_weights.encoder_dims(state, layout)
  for name, spec in ENCODERS.items():
    if (spec.dim, spec.depth, spec.ffn != 'mlp') == (dim, depth, swiglu):
      return name
  ffn = 'SwiGLU' if swiglu else 'MLP'
  raise ConversionError(
    f'no DINOv3 encoder has width {dim}, {depth} blocks and an {ffn} FFN; pass backbone='
  )


registry.register(
  registry.Family(
    name='dinov3',
    title='DINOv3 + DPT',
    backbones=tuple(ENCODERS),
    test_backbones=('dinov3_tiny',),
    create=create_dinov3_dpt,
    from_config=dinov3_dpt_from_config,
    init_size=32,
    layouts=(
      registry.WeightLayout('dinov3', 'backbone', 'DINOv3 hub dinov3_vit*16*_pretrain_*.pth'),
      registry.WeightLayout('timm_dinov3', 'backbone', 'timm vit_*_patch16_dinov3[_qkvb]'),
      registry.WeightLayout('hf_dinov3', 'backbone', 'Hugging Face DINOv3ViTModel (.safetensors)'),
    ),
    convert=dinov3_weights.convert_state_dict,
    detect_layout=dinov3_weights.detect,
    infer_backbone=backbone_of,
    infer_num_classes=dinov3_weights.num_classes_of,
    patch=PATCH,
  )
)
