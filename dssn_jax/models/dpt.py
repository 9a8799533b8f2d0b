"""The DPT head and the DINOv2 + DPT segmenter of UniMatch V2, channels-last.

    f1..f4 = encoder(x)                             # tapped tokens, (N, h*w, dim) each
    l_i = layer{i}_rn(resize_layers_i(projects_i(f_i)))   # strides p/4, p/2, p, 2p (p: patch)
    p4 = refinenet4(l4, size=l3);  p3 = refinenet3(p4, l3, size=l2)
    p2 = refinenet2(p3, l2, size=l1);  p1 = refinenet1(p2, l1)  # x2
    logits = up(output_conv2(relu(output_conv1(p1))))  # to (p*h, p*w)

As the authors' `model/semseg/dpt.py` and `model/util/blocks.py`
(LiheYoung/UniMatch-V2) with `use_bn=False`: `projects_i` 1x1 convs with
bias to `out_channels[i]`; `resize_layers_0` a 4x4 stride-4 transposed
conv, `resize_layers_1` 2x2 stride 2, level 3 unchanged, `resize_layers_3`
a 3x3 stride-2 conv (padding 1); `layer{i}_rn` 3x3 convs without bias to
`features`; RefineNet fusion `out = a (+ RCU1(b))`, `RCU2`, bilinear
(align_corners) resize, 1x1 `out_conv`, with `RCU(x) = x +
conv2(relu(conv1(relu(x))))`; every resize is bilinear with
align_corners=True. No BatchNorm anywhere.

Parameter tree (torch name in brackets, `head.scratch.` abbreviated `s.`):
`head/projects_{i}` [`head.projects.{i}`], `head/resize_layers_{0,1,3}`
[`head.resize_layers.{i}`], `head/layer{k}_rn` [`s.layer{k}_rn`],
`head/refinenet{k}/{resConfUnit1,resConfUnit2}/{conv1,conv2}`, `.../out_conv`
[`s.refinenet{k}.*`], `head/output_conv1` [`s.output_conv.0`],
`head/output_conv2` [`s.output_conv.2`]; each holds `kernel` and (except
`layer{k}_rn`) `bias`. Conv kernels are `(kh, kw, in, out)`; the transposed
convs' too (torch's `(in, out, kh, kw)` reordered).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dssn_jax.models import attention as attention_lib
from dssn_jax.models import dinov2_weights, layers, registry
from dssn_jax.models.deeplabv3plus import torch_default_kernel_init
from dssn_jax.models.dinov2 import ENCODERS, PATCH, create_encoder

# The authors' head sizes per encoder (unimatch_v2.py's model_configs).
HEAD_SIZES = {
  'dinov2_small': dict(features=64, out_channels=(48, 96, 192, 384)),
  'dinov2_base': dict(features=128, out_channels=(96, 192, 384, 768)),
  'dinov2_large': dict(features=256, out_channels=(256, 512, 1024, 1024)),
  'dinov2_giant': dict(features=384, out_channels=(1536, 1536, 1536, 1536)),
  'dinov2_tiny': dict(features=16, out_channels=(8, 16, 32, 32)),
}


class PatchDeconv(nn.Module):
  """torch `ConvTranspose2d(k, stride=k, padding=0)`: every input pixel
  becomes a `k x k` output patch, `out[k*i + a, k*j + b] = x[i, j] @ kernel[a, b] + bias`.

  `kernel` `(k, k, in, out)` (torch's `(in, out, k, k)` reordered), `bias` `(out,)`.
  """

  features: int
  size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    k = self.size
    kernel = self.param(
      'kernel', torch_default_kernel_init, (k, k, c, self.features), jnp.float32
    ).astype(self.dtype)
    bound = 1.0 / (self.features * k * k) ** 0.5  # torch's fan_in of a transposed conv
    bias = self.param(
      'bias',
      lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
      (self.features,),
    )
    y = jnp.einsum('nhwc,abco->nhawbo', x.astype(self.dtype), kernel)
    return y.reshape(n, h * k, w * k, self.features) + bias.astype(self.dtype)


class ResidualConvUnit(nn.Module):
  """`x + conv2(relu(conv1(relu(x))))`, 3x3 convs with bias."""

  conv: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv((3, 3), padding=1, name='conv1')(nn.relu(x))
    return x + self.conv((3, 3), padding=1, name='conv2')(nn.relu(y))


class FusionBlock(nn.Module):
  """RefineNet fusion: `out_conv(up(RCU2(a + RCU1(b))))`; `size` None doubles.

  Without `b` (refinenet4) `resConfUnit1` is unused but still has
  parameters, as in torch (its checkpoints hold them, and the authors'
  10.9M head count includes them).
  """

  conv: Any

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array | None = None, size=None) -> jax.Array:
    rcu1 = ResidualConvUnit(self.conv, name='resConfUnit1')
    if b is not None:
      a = a + rcu1(b)
    elif self.is_initializing():
      rcu1(a)  # creates the parameters only
    a = ResidualConvUnit(self.conv, name='resConfUnit2')(a)
    if size is None:
      size = (2 * a.shape[1], 2 * a.shape[2])
    a = layers.resize_bilinear(a, size)
    return self.conv((1, 1), padding=0, name='out_conv')(a)


class DPTHead(nn.Module):
  """Four `(N, h, w, dim)` maps -> logits `(N, 4h, 4w, num_classes)` (compute dtype)."""

  num_classes: int
  features: int = 128
  out_channels: Sequence[int] = (96, 192, 384, 768)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array]) -> jax.Array:
    if len(feats) != 4 or len(self.out_channels) != 4:
      raise ValueError(f'DPTHead takes 4 feature maps and 4 out_channels, got {len(feats)}')
    conv = functools.partial(
      nn.Conv, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_default_kernel_init
    )
    levels = []
    for i, (f, c) in enumerate(zip(feats, self.out_channels)):
      f = conv(c, (1, 1), name=f'projects_{i}')(f.astype(self.dtype))
      if i == 0:
        f = PatchDeconv(c, 4, self.dtype, name='resize_layers_0')(f)
      elif i == 1:
        f = PatchDeconv(c, 2, self.dtype, name='resize_layers_1')(f)
      elif i == 3:
        f = conv(c, (3, 3), strides=2, padding=1, name='resize_layers_3')(f)
      rn = conv(self.features, (3, 3), padding=1, use_bias=False, name=f'layer{i + 1}_rn')(f)
      levels.append(rn)
    l1, l2, l3, l4 = levels
    fconv = functools.partial(conv, self.features)
    p = FusionBlock(fconv, name='refinenet4')(l4, size=l3.shape[1:3])
    p = FusionBlock(fconv, name='refinenet3')(p, l3, size=l2.shape[1:3])
    p = FusionBlock(fconv, name='refinenet2')(p, l2, size=l1.shape[1:3])
    p = FusionBlock(fconv, name='refinenet1')(p, l1)
    p = nn.relu(fconv((3, 3), padding=1, name='output_conv1')(p))
    return conv(self.num_classes, (1, 1), name='output_conv2')(p)


class DPTSegmenter(nn.Module):
  """DINOv2 encoder + DPT head: the UniMatch V2 segmentation model.

  Attributes:
    backbone: a `DinoVisionTransformer` (4 taps).
    head: a `DPTHead`.
    dropout: channel-dropout rate of the perturbed copies (`perturb=k`).
    freeze_backbone: stop gradients at the encoder's outputs (the authors'
      `lock_backbone`): the backward pass then skips the encoder and keeps
      none of its activations; the optimizer must also leave it alone
      (`optim.make_optimizer` with `config.train.freeze_backbone`).
  """

  backbone: nn.Module
  head: nn.Module
  dropout: float = 0.5
  freeze_backbone: bool = False

  @property
  def feature_dim(self) -> int:
    """Channels `D` of the tapped features (the masks' last axis)."""
    return self.backbone.dim

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    train: bool = False,
    perturb: int = 0,
    feature_masks: jax.Array | None = None,
    perturb_masks: jax.Array | None = None,
  ):
    """Segments normalized images `x` `(N, H, W, 3)`, H and W multiples of the
    backbone's patch `p` (`backbone.patch`: DINOv2 14, DINOv3 16).

    Args:
      x: normalized images, any float dtype.
      train: unused (no dropout in the clean path, no BatchNorm); kept for
        the shared model contract.
      perturb: number of perturbed copies (0: plain forward). Without
        `perturb_masks` each copy multiplies the four tapped token maps by
        one channel mask per image, `Bernoulli(1 - dropout) / (1 - dropout)`
        of shape `(N, dim)` shared by the four levels (Dropout2d on the
        feature maps), drawn from the `dropout` rng.
      feature_masks: `(N, dim)` masks of the main forward's tapped features
        (UniMatch V2's complementary dropout of the strong views, `m` and
        `2 - m`): the head runs on `f * feature_masks[:, None, :]` for each
        tapped map `f`. The perturbed copies start from the unmasked maps.
      perturb_masks: explicit masks `(k, N, dim)` of the perturbed copies
        instead of drawn ones (e.g. DSSN's complementary pair); copy `j` is
        the head on `f * perturb_masks[j][:, None, :]`. `perturb` must then
        be 0 or `k`.

    Returns:
      `(logits, aux)`: float32 logits `(N, p*h, p*w, num_classes)` with
      `h, w = H // p, W // p` (here `(N, H, W, C)`); `aux['perturbed']`,
      a tuple of the k perturbed float32 logit maps shaped like `logits`;
      `aux['features']`, the four clean tapped maps as float32
      `(N, h, w, dim)`.
    """
    patch = self.backbone.patch
    n, h, w = _patch_grid(x, perturb, patch)
    tokens = self.backbone(x, train=train)
    if self.freeze_backbone:
      tokens = jax.lax.stop_gradient(tokens)
    dim = tokens[0].shape[-1]
    perturb, perturb_masks = self._perturb_masks(perturb, perturb_masks, n, dim)
    maps = [t.reshape(n, h, w, dim) for t in tokens]
    main = _mask_features(maps, feature_masks)
    head_in = _with_perturbed_copies(main, maps, perturb_masks) if perturb else main
    logits = self.head(head_in).astype(jnp.float32)
    logits = layers.resize_bilinear(logits, (patch * h, patch * w))
    copies = jnp.split(logits, 1 + perturb) if perturb else [logits]
    return copies[0], dict(perturbed=tuple(copies[1:]), features=tuple(maps))

  def _perturb_masks(self, perturb: int, perturb_masks: jax.Array | None, n: int, dim: int):
    """`(k, masks)`: the given `(k, N, dim)` masks checked, or `perturb` drawn
    channel masks `Bernoulli(1 - dropout) / (1 - dropout)` (None when k = 0)."""
    if perturb_masks is not None:
      perturb_masks = jnp.asarray(perturb_masks)
      if perturb_masks.ndim != 3 or perturb_masks.shape[1:] != (n, dim):
        raise ValueError(f'perturb_masks must be (k, {n}, {dim}), got {perturb_masks.shape}')
      if perturb not in (0, perturb_masks.shape[0]):
        raise ValueError(f'perturb={perturb} but {perturb_masks.shape[0]} perturb_masks')
      return perturb_masks.shape[0], perturb_masks
    if perturb:
      if not 0.0 <= self.dropout < 1.0:
        raise ValueError(f'dropout={self.dropout} must be in [0, 1)')
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.dropout, (perturb, n, dim))
      return perturb, keep.astype(jnp.float32) / (1.0 - self.dropout)
    return perturb, None


def _patch_grid(x: jax.Array, perturb: int, patch: int) -> tuple[int, int, int]:
  """`(N, H // patch, W // patch)` of images `x`, after checking their shape and `perturb`."""
  if x.ndim != 4:
    raise ValueError(f'DPTSegmenter expects images (N, H, W, C), got shape {x.shape}')
  n, height, width = x.shape[:3]
  if height % patch or width % patch:
    raise ValueError(
      f'DPT on a patch-{patch} ViT needs image sides that are multiples of {patch};'
      f' got images {x.shape} (resize to e.g. {patch * max(1, round(height / patch))}'
      f'x{patch * max(1, round(width / patch))})'
    )
  if perturb < 0:
    raise ValueError(f'perturb={perturb} must be >= 0')
  return n, height // patch, width // patch


def _mask_features(maps: list[jax.Array], feature_masks: jax.Array | None) -> list[jax.Array]:
  """The main forward's head input: each `(N, h, w, dim)` tapped map times
  `feature_masks[:, None, :]` (in float32, back to the map's dtype), or the
  maps themselves without masks."""
  if feature_masks is None:
    return maps
  n, _, _, dim = maps[0].shape
  feature_masks = jnp.asarray(feature_masks)
  if feature_masks.shape != (n, dim):
    raise ValueError(f'feature_masks must be ({n}, {dim}), got {feature_masks.shape}')
  fm = feature_masks.astype(jnp.float32)[:, None, None, :]
  return [(f.astype(jnp.float32) * fm).astype(f.dtype) for f in maps]


def _with_perturbed_copies(
  main: list[jax.Array], maps: list[jax.Array], perturb_masks: jax.Array
) -> list[jax.Array]:
  """Per level, the main input followed by the k copies `maps * mask_j`:
  `((1 + k) * N, h, w, dim)`, one head call for all of them."""
  k = perturb_masks.shape[0]
  n, h, w, dim = maps[0].shape
  m = perturb_masks.astype(jnp.float32)[:, :, None, None, :]  # (k, N, 1, 1, dim)
  return [
    jnp.concatenate([c[None], f[None] * m]).reshape((1 + k) * n, h, w, dim)
    for c, f in zip(main, maps)
  ]


def create_dpt(
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
  features: int | None = None,
  out_channels: Sequence[int] | None = None,
  attention: str | None = None,
) -> DPTSegmenter:
  """DINOv2 encoder + DPT head of the authors' sizes (`HEAD_SIZES`).

  Args:
    backbone: `dinov2_small` | `dinov2_base` | `dinov2_large` |
      `dinov2_giant` (`dinov2_tiny`: for tests).
    num_classes: classifier outputs.
    dtype: compute dtype (a jnp dtype; `models.parse_dtype` reads strings).
    dropout: channel-dropout rate of `perturb=k` copies.
    remat: rematerialize each transformer block in the backward pass.
    freeze_backbone: no gradient through the encoder.
    depth, taps: a reduced-depth encoder (tests); None keeps the named one.
    ffn: 'mlp' | 'swiglu' instead of the named encoder's (tests: a narrow
      SwiGLU encoder); None keeps it.
    features, out_channels: head widths; None keeps the named ones.
    attention: 'xla' (None too) | 'cudnn' | 'chunked' (`dssn_jax.models.attention`).
  """
  if backbone not in HEAD_SIZES:
    raise ValueError(f'unknown DINOv2 backbone {backbone!r}; known: {", ".join(HEAD_SIZES)}')
  encoder = create_encoder(
    backbone, depth=depth, taps=taps, ffn=ffn, dtype=dtype, remat=remat, attention=attention
  )
  return segmenter(
    encoder,
    HEAD_SIZES[backbone],
    num_classes,
    dtype=dtype,
    dropout=dropout,
    freeze_backbone=freeze_backbone,
    features=features,
    out_channels=out_channels,
  )


def segmenter(
  encoder: nn.Module,
  head_size: dict,
  num_classes: int,
  *,
  dtype: Any = jnp.float32,
  dropout: float = 0.5,
  freeze_backbone: bool = False,
  features: int | None = None,
  out_channels: Sequence[int] | None = None,
) -> DPTSegmenter:
  """`encoder` + a DPT head of `head_size` (`{'features', 'out_channels'}`),
  `features` / `out_channels` replacing its widths when given."""
  if int(num_classes) < 1:
    raise ValueError(f'num_classes={num_classes} must be positive')
  size = dict(head_size)
  if features is not None:
    size['features'] = int(features)
  if out_channels is not None:
    size['out_channels'] = tuple(int(c) for c in out_channels)
  head = DPTHead(int(num_classes), size['features'], tuple(size['out_channels']), dtype, name=None)
  return DPTSegmenter(encoder, head, float(dropout), bool(freeze_backbone))


def dpt_from_config(config) -> DPTSegmenter:
  """`create_dpt` from `config.model` (backbone, dtype, dropout, attention) and
  `config.train` (remat, freeze_backbone)."""
  m = config.model
  return create_dpt(
    m.backbone,
    config.data.num_classes,
    dtype=layers.parse_dtype(m.dtype),
    dropout=m.dropout,
    remat=config.train.remat,
    freeze_backbone=config.train.freeze_backbone,
    attention=attention_lib.resolve(m.attention, layers.parse_dtype(m.dtype)),
  )


registry.register(
  registry.Family(
    name='dinov2',
    title='DINOv2 + DPT',
    backbones=tuple(ENCODERS),
    test_backbones=('dinov2_tiny',),
    create=create_dpt,
    from_config=dpt_from_config,
    init_size=28,
    layouts=(
      registry.WeightLayout('dinov2', 'backbone', 'DINOv2 hub dinov2_vit*14_pretrain.pth'),
      registry.WeightLayout('timm_dinov2', 'backbone', 'timm vit_*_patch14_dinov2'),
      registry.WeightLayout('hf_dinov2', 'backbone', 'Hugging Face Dinov2Model (.safetensors)'),
      registry.WeightLayout(
        'unimatch_v2', 'model', 'a whole UniMatch V2 checkpoint', backbone_layout='dinov2'
      ),
    ),
    convert=dinov2_weights.convert_state_dict,
    detect_layout=dinov2_weights.detect,
    infer_backbone=dinov2_weights.backbone_of,
    infer_num_classes=dinov2_weights.num_classes_of,
    patch=PATCH,
  )
)
