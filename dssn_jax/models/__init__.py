"""The segmentation models: DeepLabV3+ on ResNet backbones.

    model = create_model('resnet101', 21)
    variables = model.init(rng, images)                 # {'params', 'batch_stats'}
    logits, aux = model.apply(variables, images)        # eval: running BN stats
    (logits, aux), updates = model.apply(
        variables, images, train=True, perturb=2,
        rngs={'dropout': key}, mutable=['batch_stats'])

See `deeplabv3plus.DeepLabV3Plus` for what `aux` holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from dssn_jax import config_lib
from dssn_jax.models.deeplabv3plus import DeepLabV3Plus
from dssn_jax.models.resnet import BACKBONES, ResNet, create_resnet, scale_width

# Decoder widths: the reference's for the full models; scaled down with the
# backbone for `resnet_tiny`.
HEAD_WIDTHS = {
  'resnet50': dict(aspp_features=256, low_level_features=48, decoder_features=256),
  'resnet101': dict(aspp_features=256, low_level_features=48, decoder_features=256),
  'resnet_tiny': dict(aspp_features=32, low_level_features=8, decoder_features=32),
}

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


def create_model(
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
  dtype = parse_dtype(dtype)
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


def model_from_config(config) -> DeepLabV3Plus:
  """`create_model` from `config.model`, `config.data.num_classes`, `config.train.remat`."""
  m = config.model
  fp_bn = config_lib.one_of('model.fp_bn', m.get('fp_bn', 'joint'), ('joint', 'clean'))
  return create_model(
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


__all__ = [
  'DeepLabV3Plus',
  'ResNet',
  'create_model',
  'model_from_config',
  'parse_dtype',
  'BACKBONES',
]
