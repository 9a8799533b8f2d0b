"""The segmentation models: DeepLabV3+ on ResNet, DPT on DINOv2.

Two backbone families, registered at the end of this module
(`registry.FAMILIES`); `create_model` and `model_from_config` dispatch on
the backbone's name.

    model = create_model('resnet101', 21)        # or 'dinov2_base' (variables: params only)
    variables = model.init(rng, images)                 # {'params', 'batch_stats'}
    logits, aux = model.apply(variables, images)        # eval: running BN stats
    (logits, aux), updates = model.apply(
        variables, images, train=True, perturb=2,
        rngs={'dropout': key}, mutable=['batch_stats'])

See `deeplabv3plus.DeepLabV3Plus` and `dpt.DPTSegmenter` for what `aux` holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from dssn_jax import config_lib
from dssn_jax.models import dinov2_weights, registry
from dssn_jax.models.deeplabv3plus import DeepLabV3Plus
from dssn_jax.models.dinov2 import ENCODERS
from dssn_jax.models.dpt import DPTSegmenter, create_dpt
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


def create_model(backbone: str, num_classes: int, **options):
  """The segmenter of `backbone`'s family: `create_deeplabv3plus` for the
  ResNets, `dpt.create_dpt` for DINOv2 (see those for `options`; `dtype`
  may be a string for both)."""
  if 'dtype' in options:
    options['dtype'] = parse_dtype(options['dtype'])
  return registry.family_of(backbone).create(backbone, num_classes, **options)


def model_from_config(config):
  """The model `config.model.backbone` names, built by its family from the config."""
  return registry.family_of(config.model.backbone).from_config(config)


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


def _deeplabv3plus_from_config(config) -> DeepLabV3Plus:
  """`create_deeplabv3plus` from `config.model`, `config.data.num_classes`, `config.train.remat`."""
  m = config.model
  fp_bn = config_lib.one_of('model.fp_bn', m.get('fp_bn', 'joint'), ('joint', 'clean'))
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


def _dpt_from_config(config) -> DPTSegmenter:
  """`create_dpt` from `config.model` (backbone, dtype, dropout, attention) and
  `config.train` (remat, freeze_backbone)."""
  m = config.model
  return create_dpt(
    m.backbone,
    config.data.num_classes,
    dtype=parse_dtype(m.dtype),
    dropout=m.dropout,
    remat=config.train.remat,
    freeze_backbone=config.train.freeze_backbone,
    attention=config_lib.one_of('model.attention', m.attention, ('xla', 'cudnn')),
  )


# ---------------------------------------------------------------------------
# The families. ResNet's weight conversion lives in `dssn_jax.convert`,
# DINOv2's in `dinov2_weights`; both are imported lazily by `convert`.


def _resnet_convert(state, template, layout):
  from dssn_jax import convert  # pylint: disable=g-import-not-at-top

  return convert.convert_state_dict(state, template, layout)


def _resnet_detect(state):
  from dssn_jax import convert  # pylint: disable=g-import-not-at-top

  return convert.detect_resnet_layout(state)


def _resnet_backbone(state, layout):
  from dssn_jax import convert  # pylint: disable=g-import-not-at-top

  state = convert._strip_module_prefix(dict(state)) if layout == 'model' else state
  return convert._infer_backbone(state, 'backbone.' if layout == 'model' else '')


def _resnet_classes(state, layout):
  from dssn_jax import convert  # pylint: disable=g-import-not-at-top

  return convert._infer_num_classes(convert._strip_module_prefix(dict(state)))


def _resnet_options(state, layout):
  from dssn_jax import convert  # pylint: disable=g-import-not-at-top

  if layout == 'torchvision':
    return dict(deep_stem=False)
  if layout == 'model':
    return dict(deep_stem='backbone.conv1.weight' not in convert._strip_module_prefix(dict(state)))
  return dict(deep_stem=True)


def _dinov2_backbone(state, layout):
  dim_depth = dinov2_weights.encoder_dims(state, layout)
  for name, spec in ENCODERS.items():
    if (spec.dim, spec.depth) == dim_depth:
      return name
  raise dinov2_weights.ConversionError(
    f'no DINOv2 encoder has width {dim_depth[0]} and {dim_depth[1]} blocks; pass backbone='
  )


registry.register(
  registry.Family(
    name='resnet',
    title='DeepLabV3+',
    backbones=tuple(BACKBONES),
    test_backbones=('resnet_tiny',),
    create=create_deeplabv3plus,
    from_config=_deeplabv3plus_from_config,
    init_size=65,
    layouts=(
      registry.WeightLayout('dssn', 'backbone', 'UniMatch/DSSN resnet50.pth / resnet101.pth'),
      registry.WeightLayout('timm', 'backbone', 'timm gluon_resnet*_v1s'),
      registry.WeightLayout('torchvision', 'backbone', 'torchvision resnet50 / resnet101'),
      registry.WeightLayout(
        'model', 'model', 'a whole DSSN/UniMatch DeepLabV3+ checkpoint', backbone_layout='dssn'
      ),
    ),
    convert=_resnet_convert,
    detect_layout=_resnet_detect,
    infer_backbone=_resnet_backbone,
    infer_num_classes=_resnet_classes,
    convert_options=_resnet_options,
  )
)

registry.register(
  registry.Family(
    name='dinov2',
    title='DINOv2 + DPT',
    backbones=tuple(ENCODERS),
    test_backbones=('dinov2_tiny',),
    create=create_dpt,
    from_config=_dpt_from_config,
    init_size=28,
    layouts=(
      registry.WeightLayout('dinov2', 'backbone', 'DINOv2 hub dinov2_vit*14_pretrain.pth'),
      registry.WeightLayout('timm_dinov2', 'backbone', 'timm vit_*_patch14_dinov2'),
      registry.WeightLayout('hf_dinov2', 'backbone', 'Hugging Face Dinov2Model (.safetensors)'),
      registry.WeightLayout(
        'unimatch_v2', 'model', 'a whole UniMatch V2 checkpoint', backbone_layout='dinov2'
      ),
    ),
    convert=lambda state, template, layout: dinov2_weights.convert_state_dict(
      state, template, layout
    ),
    detect_layout=dinov2_weights.detect,
    infer_backbone=_dinov2_backbone,
    infer_num_classes=lambda state, layout: dinov2_weights.num_classes_of(state),
  )
)


__all__ = [
  'DeepLabV3Plus',
  'DPTSegmenter',
  'ResNet',
  'create_model',
  'create_deeplabv3plus',
  'create_dpt',
  'model_from_config',
  'parse_dtype',
  'BACKBONES',
]
