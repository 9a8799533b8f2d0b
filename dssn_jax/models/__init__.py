"""The segmentation models: DeepLabV3+ on ResNet, DPT on DINOv2.

Each backbone family registers itself in its segmenter's module
(`deeplabv3plus`, `dpt`; see `registry`); `create_model` and
`model_from_config` dispatch on the backbone's name.

    model = create_model('resnet101', 21)        # or 'dinov2_base' (variables: params only)
    variables = model.init(rng, images)                 # {'params', 'batch_stats'}
    logits, aux = model.apply(variables, images)        # eval: running BN stats
    (logits, aux), updates = model.apply(
        variables, images, train=True, perturb=2,
        rngs={'dropout': key}, mutable=['batch_stats'])

See `deeplabv3plus.DeepLabV3Plus` and `dpt.DPTSegmenter` for what `aux` holds.
"""

from __future__ import annotations

from dssn_jax.models.deeplabv3plus import HEAD_WIDTHS, DeepLabV3Plus, create_deeplabv3plus
from dssn_jax.models.dpt import DPTSegmenter, create_dpt
from dssn_jax.models.layers import DTYPES, parse_dtype
from dssn_jax.models.registry import create_model, model_from_config
from dssn_jax.models.resnet import BACKBONES, ResNet

__all__ = [
  'BACKBONES',
  'DTYPES',
  'HEAD_WIDTHS',
  'DeepLabV3Plus',
  'DPTSegmenter',
  'ResNet',
  'create_model',
  'create_deeplabv3plus',
  'create_dpt',
  'model_from_config',
  'parse_dtype',
]
