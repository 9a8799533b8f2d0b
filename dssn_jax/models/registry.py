"""Backbone families: one registration per family, read by every CLI.

A `Family` says how to build its segmenter from a backbone name or a
config, which weight layouts it imports and how to recognise them from the
keys, and how `--summary` titles it. Each family registers itself at the
bottom of its segmenter's module (ResNet + DeepLabV3+ in `deeplabv3plus`,
DINOv2 + DPT in `dpt`, DINOv3 + DPT in `dinov3`); `create_model`, `model_from_config`,
`python -m dssn_jax.models --summary`, `python -m dssn_jax.convert` and
`benchmarks/step_speed.py` take their choices from here. A new family is
one module calling `register(Family(...))` (named in `config.imports` if it
lives outside dssn_jax).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dssn_jax.errors import ConfigError, ConversionError
from dssn_jax.models import layers
from dssn_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """One way a family's weights are stored.

  Attributes:
    name: the `--layout` / `config.model.pretrained_layout` value.
    part: 'backbone' (fills the `backbone` subtree) or 'model' (everything).
    description: one line for `--help` and errors.
    backbone_layout: for a 'model' layout, the layout of its `backbone.*`
      keys once that prefix is removed (to take only a pretrained encoder).
  """

  name: str
  part: str
  description: str
  backbone_layout: str | None = None


@dataclasses.dataclass(frozen=True)
class Family:
  """A backbone family and its segmentation model.

  Attributes:
    name: short name ('resnet', 'dinov2', 'dinov3').
    title: the segmenter's name in `--summary` ('DeepLabV3+', 'DINOv2 + DPT').
    backbones: the names `create_model` accepts.
    test_backbones: those among `backbones` that exist only for tests.
    create: `(backbone, num_classes, **options) -> nn.Module`.
    from_config: `config -> nn.Module` (reads `config.model`, `config.train.remat`).
    init_size: side of the dummy image for shape-only initialisation.
    layouts: the weight layouts it imports.
    convert: `(state, template, layout) -> variables` (template: the
      backbone's subtree for 'backbone' layouts, else the whole model's).
    detect_layout: `state -> layout name | None`, from the keys.
    infer_backbone: `(state, layout) -> backbone name` (raises if unsure).
    infer_num_classes: `(state, layout) -> classes` of a 'model' layout.
    convert_options: `(state, layout) -> create options` the weights imply
      (e.g. ResNet's stem).
    patch: the input side must be a multiple of this (a ViT's patch), or
      None (any side of at least the output stride).
  """

  name: str
  title: str
  backbones: Sequence[str]
  test_backbones: Sequence[str]
  create: Callable[..., nn.Module]
  from_config: Callable[[Any], nn.Module]
  init_size: int
  layouts: Sequence[WeightLayout]
  convert: Callable[[Mapping[str, Any], Mapping[str, Any], str], dict]
  detect_layout: Callable[[Mapping[str, Any]], str | None]
  infer_backbone: Callable[[Mapping[str, Any], str], str]
  infer_num_classes: Callable[[Mapping[str, Any], str], int]
  convert_options: Callable[[Mapping[str, Any], str], dict] = lambda state, layout: {}
  patch: int | None = None


FAMILIES: Registry[Family] = Registry(
  'backbone family',
  'family',
  builtins={
    'resnet': 'dssn_jax.models.deeplabv3plus',
    'dinov2': 'dssn_jax.models.dpt',
    'dinov3': 'dssn_jax.models.dinov3',
  },
)


def families() -> list[Family]:
  """Every registered family (built-in modules imported)."""
  return FAMILIES.entries()


def register(family: Family) -> Family:
  """Adds a family; backbone and layout names must be new."""
  for other in FAMILIES.registered():
    clash = set(other.backbones) & set(family.backbones)
    clash |= {lay.name for lay in other.layouts} & {lay.name for lay in family.layouts}
    if clash:
      raise ValueError(f'family {family.name!r} reuses names of {other.name!r}: {sorted(clash)}')
  return FAMILIES.register(family)


def backbone_names(*, include_tests: bool = True) -> list[str]:
  """Every registered backbone, family by family."""
  return [b for f in families() for b in f.backbones if include_tests or b not in f.test_backbones]


def family_of(backbone: str) -> Family:
  for family in families():
    if backbone in family.backbones:
      return family
  raise ConfigError(f'unknown backbone {backbone!r}; known: {", ".join(backbone_names())}')


def layout_names() -> list[str]:
  return [lay.name for f in families() for lay in f.layouts]


def find_layout(name: str) -> tuple[Family, WeightLayout]:
  for family in families():
    for lay in family.layouts:
      if lay.name == name:
        return family, lay
  raise ValueError(f'unknown weight layout {name!r}; known: {", ".join(layout_names())}')


def detect_layout(state: Mapping[str, Any]) -> str:
  """The layout whose keys `state` has.

  Raises:
    `ConversionError` (a ValueError): when no family recognises the
      keys; the message shows a few of them and lists the layouts.
  """
  found = [(f, name) for f in families() if (name := f.detect_layout(state))]
  if len(found) == 1:
    return found[0][1]
  sample = ', '.join(sorted(state)[:6]) or '(no keys)'
  if not found:
    known = '; '.join(f'{lay.name}: {lay.description}' for f in families() for lay in f.layouts)
    raise ConversionError(
      f'cannot tell the weight layout from the keys ({len(state)} keys: {sample}, ...);'
      f' pass --layout (layout=) one of: {known}'
    )
  raise ConversionError(
    f'the keys ({sample}, ...) fit several layouts: {", ".join(n for _, n in found)};'
    ' pass --layout (layout=)'
  )


def variable_shapes(model: nn.Module, backbone: str) -> dict[str, Any]:
  """Abstract variables of `model` (no compute), initialised at the family's size."""
  size = family_of(backbone).init_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.key(0), x)


def create_model(backbone: str, num_classes: int, **options):
  """The segmenter of `backbone`'s family (see its `create` for `options`;
  `dtype` may be a string)."""
  if 'dtype' in options:
    options['dtype'] = layers.parse_dtype(options['dtype'])
  return family_of(backbone).create(backbone, num_classes, **options)


def model_from_config(config):
  """The model `config.model.backbone` names, built by its family from the config."""
  return family_of(config.model.backbone).from_config(config)
