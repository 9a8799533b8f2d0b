"""DeepLabV3+ with the feature-perturbation forward of UniMatch/DSSN.

    c1, c4 = backbone(x)                      # strides 4 and 16 (or 8)
    a = head(c4)                              # ASPP: 1x1, 3x3 @ 6/12/18, pooling
    f = fuse(concat(reduce(c1), up(a)))       # two 3x3 convs
    logits = up(classifier(f))                # at input size

Every `up` is a bilinear resize with align_corners=True. With `perturb=k`
the backbone runs once and the decoder runs once on the batch of clean and
k channel-dropped copies of (c1, c4) (Dropout2d, independently per copy), so
the decoder's BN statistics cover all 1 + k copies as in the reference.

Submodule names follow the reference's attributes: `backbone`, `head`
(ASPP `b0`..`b4`, `project`), `reduce`, `fuse`, `classifier`; everything but
`backbone` is "the head" that learns at `lr * lr_multi`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dssn_jax.errors import one_of
from dssn_jax.models import layers, registry, resnet_weights
from dssn_jax.models.resnet import BACKBONES, conv_padding, create_resnet, scale_width

ModuleDef = Any

# torch's default Conv2d init (kaiming_uniform with a=sqrt(5)), which the
# reference keeps for the head.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int):
  """torch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ConvBNReLU(nn.Module):
  """conv (no bias) -> BN -> ReLU, children `conv` and `bn`."""

  features: int
  kernel_size: int = 1
  dilation: int = 1
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, d = self.kernel_size, self.dilation
    x = self.conv(
      self.features, (k, k), padding=conv_padding(k, d), kernel_dilation=(d, d), name='conv'
    )(x)
    return nn.relu(self.norm(name='bn')(x))


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling on `(N, h, w, C)` -> `(N, h, w, features)`.

  Branches `b0` (1x1), `b1`..`b3` (3x3, dilation `rates`), `b4` (global
  average pool -> 1x1 -> broadcast back), concatenated and projected by a
  1x1 conv (`project`), each conv followed by BN + ReLU.
  """

  features: int = 256
  rates: Sequence[int] = (6, 12, 18)
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.rates) != 3:
      raise ValueError(f'ASPP takes 3 atrous rates (branches b1..b3), got {self.rates}')
    branch = functools.partial(ConvBNReLU, self.features, conv=self.conv, norm=self.norm)
    outs = [branch(1, name='b0')(x)]
    for i, rate in enumerate(self.rates):
      outs.append(branch(3, rate, name=f'b{i + 1}')(x))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = branch(1, name='b4')(pooled)
    outs.append(layers.resize_bilinear(pooled, x.shape[1:3]))
    return branch(1, name='project')(jnp.concatenate(outs, axis=-1))


class Fuse(nn.Module):
  """The decoder's two 3x3 conv -> BN -> ReLU (`conv1`, `bn1`, `conv2`, `bn2`)."""

  features: int = 256
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in (1, 2):
      x = self.conv(self.features, (3, 3), padding=conv_padding(3), name=f'conv{i}')(x)
      x = nn.relu(self.norm(name=f'bn{i}')(x))
    return x


class DeepLabV3Plus(nn.Module):
  """DeepLabV3+ segmentation model, channels-last.

  Attributes:
    backbone: a module mapping `(x, train)` to stage outputs `(c1, ..., c4)`.
    num_classes: classifier outputs.
    aspp_features: ASPP width (256 in the reference).
    low_level_features: width of the c1 projection `reduce` (48).
    decoder_features: width of the `fuse` convs (256).
    atrous_rates: ASPP dilations (6, 12, 18).
    dropout: Dropout2d rate of the perturbed copies (0.5).
    fp_bn: decoder BatchNorm with perturbed copies: 'joint' (reference:
      statistics over the clean and perturbed rows together) or 'clean'
      (statistics, and their running update, from the clean rows only,
      applied to every row; the clean prediction is then that of a plain
      forward).
    dtype: compute dtype; params and BN statistics stay float32, logits are
      returned as float32.
  """

  backbone: nn.Module
  num_classes: int
  aspp_features: int = 256
  low_level_features: int = 48
  decoder_features: int = 256
  atrous_rates: Sequence[int] = (6, 12, 18)
  dropout: float = 0.5
  fp_bn: str = 'joint'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, perturb: int = 0):
    """Segments normalized images `x` `(N, H, W, 3)`.

    Args:
      x: normalized images, any float dtype.
      train: batch statistics (and their running update) instead of the
        running statistics in every BatchNorm.
      perturb: number of channel-dropped decoder copies (0: plain forward).
        Needs a `dropout` rng when positive; the dropout is active whatever
        `train` is, as in the reference.

    Returns:
      `(logits, aux)`: float32 logits `(N, H, W, num_classes)`; `aux` holds
      `perturbed` (tuple of `perturb` float32 logit maps shaped like
      `logits`), `c1` and `c4` (backbone features) and `features` (the
      clean decoder output before the classifier, stride 4).
    """
    if x.ndim != 4:
      raise ValueError(f'DeepLabV3Plus expects images (N, H, W, C), got shape {x.shape}')
    if perturb < 0:
      raise ValueError(f'perturb={perturb} must be >= 0')
    if self.fp_bn not in ('joint', 'clean'):
      raise ValueError(f'fp_bn={self.fp_bn!r} must be joint or clean')
    n, h, w = x.shape[:3]
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_kernel_init,
    )
    norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)

    head_norm = norm
    copies = 1 + perturb
    if perturb and self.fp_bn == 'clean':
      head_norm = functools.partial(norm, stats_every=copies)
    feats = self.backbone(x, train=train)
    c1, c4 = feats[0], feats[-1]
    lo, hi = c1, c4
    if perturb:
      # Sample-major: row `i * copies + k` is copy k of sample i (0 clean),
      # so every copy stays on its sample's device (no rows move between
      # devices, as a concatenation along the batch would make them).
      drop = layers.Dropout2d(self.dropout, name='dropout')
      lo, hi = (_with_dropped_copies(f, drop, perturb) for f in (c1, c4))

    a = ASPP(self.aspp_features, self.atrous_rates, conv=conv, norm=head_norm, name='head')(hi)
    a = layers.resize_bilinear(a, lo.shape[1:3])
    r = ConvBNReLU(self.low_level_features, conv=conv, norm=head_norm, name='reduce')(lo)
    f = Fuse(self.decoder_features, conv=conv, norm=head_norm, name='fuse')(
      jnp.concatenate([r, a], axis=-1)
    )
    logits = nn.Conv(
      self.num_classes,
      (1, 1),
      use_bias=True,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(self.decoder_features),
      name='classifier',
    )(f)
    logits = layers.resize_bilinear(logits.astype(jnp.float32), (h, w))

    per_copy = logits.reshape(n, copies, *logits.shape[1:])
    first = lambda a: a.reshape(n, copies, *a.shape[1:])[:, 0]
    aux = dict(
      perturbed=tuple(per_copy[:, k] for k in range(1, copies)), c1=c1, c4=c4, features=first(f)
    )
    return per_copy[:, 0], aux


def _with_dropped_copies(x: jax.Array, drop: nn.Module, perturb: int) -> jax.Array:
  """`(N, ...)` -> `(N * (1 + perturb), ...)`: each sample followed by
  `perturb` channel-dropped copies of it (sample-major; `layers.Dropout2d`
  drops the planes it drops on the copy-major concatenation)."""
  dropped = drop(jnp.broadcast_to(x[:, None], (x.shape[0], perturb, *x.shape[1:])))
  out = jnp.concatenate([x[:, None], dropped], axis=1)
  return out.reshape(-1, *x.shape[1:])


# Decoder widths: the reference's for the full models; scaled down with the
# backbone for `resnet_tiny`.
HEAD_WIDTHS = {
  'resnet50': dict(aspp_features=256, low_level_features=48, decoder_features=256),
  'resnet101': dict(aspp_features=256, low_level_features=48, decoder_features=256),
  'resnet_tiny': dict(aspp_features=32, low_level_features=8, decoder_features=32),
}


def create_deeplabv3plus(
  backbone: str,
  num_classes: int,
  *,
  deep_stem: bool = True,
  output_stride: int = 16,
  dtype: Any = jnp.float32,
  dropout: float = 0.5,
  fp_bn: str = 'joint',
  remat: bool = False,
  aspp_features: int | None = None,
  low_level_features: int | None = None,
  decoder_features: int | None = None,
  atrous_rates: Sequence[int] = (6, 12, 18),
  stage_sizes: Sequence[int] | None = None,
  width_multiplier: float = 1.0,
) -> DeepLabV3Plus:
  """DeepLabV3+ on a named ResNet backbone.

  Args:
    backbone: `resnet50`, `resnet101` or `resnet_tiny`.
    num_classes: classifier outputs.
    deep_stem: the reference's 3-conv stem (True) or torchvision's 7x7.
    output_stride: 16 (reference) or 8.
    dtype: compute dtype, `float32` or `bfloat16` (string or jnp dtype).
    dropout: Dropout2d rate of the perturbed decoder copies.
    fp_bn: decoder BatchNorm statistics with perturbed copies, 'joint'
      (reference) or 'clean' (`DeepLabV3Plus.fp_bn`).
    remat: rematerialize each bottleneck block in the backward pass.
    aspp_features, low_level_features, decoder_features: head widths; None
      takes the backbone's default (256/48/256 for the full models).
    atrous_rates: ASPP dilations.
    stage_sizes: blocks per stage, overriding the backbone's (for
      reduced-depth networks).
    width_multiplier: scales every width, backbone (stem and stages) and
      head, rounded to whole channels; 1 is the named network.
  """
  if backbone not in BACKBONES:
    raise ValueError(f'unknown backbone {backbone!r}; known: {", ".join(BACKBONES)}')
  if int(num_classes) < 1:
    raise ValueError(f'num_classes={num_classes} must be positive')
  dtype = layers.parse_dtype(dtype)
  widths = {k: scale_width(v, width_multiplier) for k, v in HEAD_WIDTHS[backbone].items()}
  for key, value in (
    ('aspp_features', aspp_features),
    ('low_level_features', low_level_features),
    ('decoder_features', decoder_features),
  ):
    if value is not None:
      widths[key] = int(value)
  net = create_resnet(
    backbone,
    deep_stem=deep_stem,
    output_stride=output_stride,
    dtype=dtype,
    remat=remat,
    stage_sizes=stage_sizes,
    width_multiplier=width_multiplier,
  )
  return DeepLabV3Plus(
    backbone=net,
    num_classes=int(num_classes),
    atrous_rates=tuple(atrous_rates),
    dropout=float(dropout),
    fp_bn=fp_bn,
    dtype=dtype,
    **widths,
  )


def deeplabv3plus_from_config(config) -> DeepLabV3Plus:
  """`create_deeplabv3plus` from `config.model`, `config.data.num_classes`, `config.train.remat`."""
  m = config.model
  fp_bn = one_of('model.fp_bn', m.get('fp_bn', 'joint'), ('joint', 'clean'))
  return create_deeplabv3plus(
    m.backbone,
    config.data.num_classes,
    deep_stem=m.deep_stem,
    output_stride=m.output_stride,
    dtype=m.dtype,
    dropout=m.dropout,
    fp_bn=fp_bn,
    remat=config.train.remat,
    width_multiplier=m.get('width_multiplier', 1.0),
  )


registry.register(
  registry.Family(
    name='resnet',
    title='DeepLabV3+',
    backbones=tuple(BACKBONES),
    test_backbones=('resnet_tiny',),
    create=create_deeplabv3plus,
    from_config=deeplabv3plus_from_config,
    init_size=65,
    layouts=(
      registry.WeightLayout('dssn', 'backbone', 'UniMatch/DSSN resnet50.pth / resnet101.pth'),
      registry.WeightLayout('timm', 'backbone', 'timm gluon_resnet*_v1s'),
      registry.WeightLayout('torchvision', 'backbone', 'torchvision resnet50 / resnet101'),
      registry.WeightLayout(
        'model', 'model', 'a whole DSSN/UniMatch DeepLabV3+ checkpoint', backbone_layout='dssn'
      ),
    ),
    convert=resnet_weights.convert_state_dict,
    detect_layout=resnet_weights.detect,
    infer_backbone=resnet_weights.backbone_of,
    infer_num_classes=resnet_weights.num_classes_of,
    convert_options=resnet_weights.convert_options,
  )
)
