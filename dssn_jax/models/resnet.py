"""ResNet backbones (bottleneck v1.5) with the deep stem and dilated stages.

The layout follows the reference backbone (the torchvision ResNet with the
3-conv "deep" stem that UniMatch/DSSN and timm's `gluon_resnet*_v1s` use),
so that PyTorch weights convert name by name (`dssn_jax.convert`):

  stem (deep):  stem_conv1 3x3/2 -> stem_bn1 -> relu -> stem_conv2 3x3
                -> stem_bn2 -> relu -> stem_conv3 3x3 (-> 2 * stem_width)
  stem (torchvision): conv1 7x7/2 (-> stem_width)
  then bn1 -> relu -> maxpool 3x3/2, and stages layer1..layer4 of
  `Bottleneck` blocks named `layer{i}_{j}`.

`replace_stride_with_dilation` replaces the stride of stages 2-4 by a
dilation, with torchvision's rule: the first block of a dilated stage still
uses the previous dilation. `(False, False, True)` gives output stride 16,
`(False, True, True)` output stride 8.

Inputs and outputs are channels-last; `__call__` returns the four stage
outputs `(c1, c2, c3, c4)` at strides 4, 8, 8|16, 8|16|32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dssn_jax.models import layers

ModuleDef = Any

# torch `kaiming_normal_(mode='fan_out', nonlinearity='relu')`, the
# reference's backbone initialization.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

EXPANSION = 4


def conv_padding(kernel_size: int, dilation: int = 1):
  """torch's symmetric padding `dilation * (k - 1) / 2` as flax explicit pads."""
  pad = dilation * (kernel_size - 1) // 2
  return ((pad, pad), (pad, pad))


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4).

  Attributes:
    planes: width of the 1x1/3x3 convs; the block outputs `4 * planes`.
    strides: stride of the 3x3 conv (and of the projection shortcut).
    dilation: dilation of the 3x3 conv.
    downsample: whether the shortcut is a 1x1 conv + BN projection.
    conv, norm: partials of the conv and norm layers (dtype, mode, init).
  """

  planes: int
  strides: int = 1
  dilation: int = 1
  downsample: bool = False
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = layers.BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_features = self.planes * EXPANSION
    y = self.conv(self.planes, (1, 1), padding='VALID', name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(
      self.planes,
      (3, 3),
      strides=(self.strides, self.strides),
      padding=conv_padding(3, self.dilation),
      kernel_dilation=(self.dilation, self.dilation),
      name='conv2',
    )(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(out_features, (1, 1), padding='VALID', name='conv3')(y)
    y = self.norm(name='bn3')(y)
    if self.downsample:
      x = self.conv(
        out_features,
        (1, 1),
        strides=(self.strides, self.strides),
        padding='VALID',
        name='downsample_conv',
      )(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(y + x)


def stage_plan(
  stage_sizes: Sequence[int],
  widths: Sequence[int],
  in_features: int,
  replace_stride_with_dilation: Sequence[bool],
):
  """The per-block settings of the four stages (torchvision's `_make_layer`).

  Returns:
    A list per stage of `(planes, strides, dilation, downsample)` per block.
  """
  if len(stage_sizes) != 4 or len(widths) != 4:
    raise ValueError(
      f'stage_sizes={tuple(stage_sizes)} and widths={tuple(widths)} must have'
      ' 4 entries (layer1..layer4)'
    )
  if len(replace_stride_with_dilation) != 3:
    raise ValueError(
      'replace_stride_with_dilation must have 3 entries (layer2..layer4), got'
      f' {tuple(replace_stride_with_dilation)}'
    )
  dilate = (False,) + tuple(bool(d) for d in replace_stride_with_dilation)
  plan, dilation, features = [], 1, in_features
  for i, (blocks, planes) in enumerate(zip(stage_sizes, widths)):
    strides = 1 if i == 0 else 2
    previous_dilation = dilation
    if dilate[i]:
      dilation *= strides
      strides = 1
    stage = []
    for j in range(blocks):
      if j == 0:
        downsample = strides != 1 or features != planes * EXPANSION
        stage.append((planes, strides, previous_dilation, downsample))
      else:
        stage.append((planes, 1, dilation, False))
      features = planes * EXPANSION
    plan.append(stage)
  return plan


class ResNet(nn.Module):
  """Bottleneck ResNet with a deep or 7x7 stem and optional dilation.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101.
    widths: `planes` of each stage (outputs are 4x these).
    stem_width: deep stem: 3 -> w -> w -> 2w; 7x7 stem: 3 -> w.
    deep_stem: the reference's 3-conv stem (default) or torchvision's 7x7.
    replace_stride_with_dilation: for layer2..layer4.
    dtype: compute dtype; parameters stay float32.
    remat: recompute each bottleneck in the backward pass (saves memory).
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  deep_stem: bool = True
  replace_stride_with_dilation: Sequence[bool] = (False, False, True)
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init,
    )
    norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=self.dtype)
    x = x.astype(self.dtype)
    w = self.stem_width
    if self.deep_stem:
      x = conv(w, (3, 3), strides=(2, 2), padding=conv_padding(3), name='stem_conv1')(x)
      x = nn.relu(norm(name='stem_bn1')(x))
      x = conv(w, (3, 3), padding=conv_padding(3), name='stem_conv2')(x)
      x = nn.relu(norm(name='stem_bn2')(x))
      x = conv(2 * w, (3, 3), padding=conv_padding(3), name='stem_conv3')(x)
      stem_features = 2 * w
    else:
      x = conv(w, (7, 7), strides=(2, 2), padding=conv_padding(7), name='conv1')(x)
      stem_features = w
    x = nn.relu(norm(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
    plan = stage_plan(
      self.stage_sizes, self.widths, stem_features, self.replace_stride_with_dilation
    )
    outputs = []
    for i, stage in enumerate(plan):
      for j, (planes, strides, dilation, downsample) in enumerate(stage):
        x = block_cls(
          planes=planes,
          strides=strides,
          dilation=dilation,
          downsample=downsample,
          conv=conv,
          norm=norm,
          name=f'layer{i + 1}_{j}',
        )(x)
      outputs.append(x)
    return tuple(outputs)


# name -> (stage_sizes, widths, stem_width)
BACKBONES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
  'resnet50': ((3, 4, 6, 3), (64, 128, 256, 512), 64),
  'resnet101': ((3, 4, 23, 3), (64, 128, 256, 512), 64),
  # The same architecture, narrow and one block per stage: fast on CPU.
  'resnet_tiny': ((1, 1, 1, 1), (8, 16, 32, 64), 8),
}


def dilation_for_output_stride(output_stride: int) -> tuple[bool, bool, bool]:
  """`replace_stride_with_dilation` of output stride 8, 16 or 32."""
  table = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
  if output_stride not in table:
    raise ValueError(f'output_stride={output_stride!r} must be 8, 16 or 32')
  return table[output_stride]


def scale_width(width: int, multiplier: float) -> int:
  """`width * multiplier` rounded to whole channels (at least 1)."""
  if not float(multiplier) > 0:
    raise ValueError(f'width_multiplier={multiplier} must be positive')
  return max(1, int(round(width * float(multiplier))))


def create_resnet(
  name: str,
  *,
  deep_stem: bool = True,
  output_stride: int = 16,
  dtype: Any = jnp.float32,
  remat: bool = False,
  stage_sizes: Sequence[int] | None = None,
  width_multiplier: float = 1.0,
) -> ResNet:
  """A ResNet by name (`resnet50`, `resnet101`, `resnet_tiny`).

  `stage_sizes` overrides the number of blocks per stage (e.g. reduced-depth
  test networks); `width_multiplier` scales the stem and stage widths
  (rounded; 1 keeps those of `name`).
  """
  if name not in BACKBONES:
    raise ValueError(f'unknown backbone {name!r}; known: {", ".join(BACKBONES)}')
  sizes, widths, stem_width = BACKBONES[name]
  widths = tuple(scale_width(w, width_multiplier) for w in widths)
  stem_width = scale_width(stem_width, width_multiplier)
  return ResNet(
    stage_sizes=tuple(stage_sizes) if stage_sizes is not None else sizes,
    widths=widths,
    stem_width=stem_width,
    deep_stem=deep_stem,
    replace_stride_with_dilation=dilation_for_output_stride(output_stride),
    dtype=dtype,
    remat=remat,
  )
