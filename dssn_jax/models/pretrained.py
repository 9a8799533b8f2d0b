"""Pretrained and trained weights -> a model's variables, for any family.

`from_torch` converts a PyTorch (or safetensors) state dict of any
registered layout into our variables; `load_pretrained` puts a pretrained
backbone into a freshly initialized model (`config.model.pretrained`). The
layouts, their detection and their conversion belong to the families
(`registry.Family`); the file reading and the mismatch report to
`dssn_jax.state_dicts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dssn_jax.models import registry
from dssn_jax.state_dicts import (
  ConversionError,
  flatten,
  load_npz,
  read_state_dict,
  strip_module_prefix,
)


def from_torch(
  path_or_state_dict,
  backbone: str | None = None,
  num_classes: int | None = None,
  layout: str | None = None,
  deep_stem: bool | None = None,
  ema: bool = False,
  **model_options,
) -> dict[str, Any]:
  """Converts PyTorch (or safetensors) weights into our variables.

  Args:
    path_or_state_dict: a `.pth` / `.safetensors` path or a state dict (a
      whole checkpoint dict is unwrapped, see `read_state_dict`).
    backbone: a registered backbone name; None infers it from the keys
      (ResNet: 50/101 from the layer3 blocks; DINOv2: from width and depth).
    num_classes: classes of a whole-model layout (None: read from its last
      conv); unused by the backbone layouts.
    layout: a registered layout (`dssn`, `timm`, `torchvision`, `model`,
      `dinov2`, `timm_dinov2`, `hf_dinov2`, `unimatch_v2`); None detects it
      from the keys.
    deep_stem: ResNet only; None follows the layout (torchvision: 7x7;
      `model`: whatever the state dict holds; else deep).
    ema: take UniMatch V2's `model_ema` from a whole checkpoint.
    **model_options: more `create_model` options (head widths, stage_sizes,
      depth and taps of a reduced DINOv2).

  Returns:
    numpy float32 variables: the backbone subtree (what sits under
    `backbone` in the model's variables) for the backbone layouts, the whole
    model's for `model` / `unimatch_v2`. ResNets have `params` and
    `batch_stats`, DINOv2 models `params` only.
  """
  if layout is not None:
    registry.find_layout(layout)  # a clear error for an unknown name
  state = read_state_dict(path_or_state_dict, ema=ema)
  if layout is None:
    layout = registry.detect_layout(state)
  family, lay = registry.find_layout(layout)
  if backbone is None:
    backbone = family.infer_backbone(state, layout)
  elif registry.family_of(backbone) is not family:
    raise ConversionError(
      f'layout {layout!r} holds {family.name} weights but backbone {backbone!r} is a'
      f' {registry.family_of(backbone).name}; layouts of that family:'
      f' {", ".join(x.name for x in registry.family_of(backbone).layouts)}'
    )
  if num_classes is None:
    num_classes = family.infer_num_classes(state, layout) if lay.part == 'model' else 1
  options = family.convert_options(state, layout)
  if deep_stem is not None:
    options['deep_stem'] = deep_stem
  options.update(model_options)
  model = registry.create_model(backbone, num_classes, **options)
  template = registry.variable_shapes(model, backbone)
  if lay.part == 'backbone':
    template = {c: v['backbone'] for c, v in template.items() if 'backbone' in v}
  return family.convert(state, template, layout)


def load_pretrained(
  variables: Mapping[str, Any],
  path: str,
  layout: str | None = 'dssn',
  backbone: str | None = None,
) -> dict[str, Any]:
  """Returns `variables` with the backbone replaced by pretrained weights.

  Args:
    variables: the model's freshly initialized variables (`params`, and
      `batch_stats` for the ResNets).
    path: a `.pth` / `.safetensors` (converted with `layout`) or a `.npz`
      from `python -m dssn_jax.convert` (a backbone tree or a whole model,
      whose backbone is taken).
    layout: layout of a `.pth`; a whole-model layout (`model`,
      `unimatch_v2`) contributes its backbone; None or 'auto': detected
      from the keys.
    backbone: the backbone's name, for error messages and to check that
      the layout is of its family.

  Raises:
    ConversionError: listing every key whose name or shape does not match.
  """
  collections = [c for c in variables if 'backbone' in variables[c]]
  target = {c: variables[c]['backbone'] for c in collections}
  what = f'{backbone} backbone' if backbone else 'backbone'
  if path.endswith('.npz'):
    loaded = load_npz(path)
    if 'backbone' in loaded['params']:
      loaded = {c: loaded.get(c, {}).get('backbone', {}) for c in collections}
    want = {(c,) + p: v.shape for c in target for p, v in flatten(target[c])}
    have = {(c,) + p: v.shape for c in loaded for p, v in flatten(loaded[c])}
    problems = [f'missing {"/".join(k)} {want[k]}' for k in sorted(set(want) - set(have))]
    problems += [f'unexpected {"/".join(k)} {have[k]}' for k in sorted(set(have) - set(want))]
    problems += [
      f'mis-shaped {"/".join(k)}: {have[k]} vs {want[k]}'
      for k in sorted(set(want) & set(have))
      if tuple(have[k]) != tuple(want[k])
    ]
    if problems:
      raise ConversionError(f'{path} does not fit the {what}:\n  ' + '\n  '.join(problems))
  else:
    state = read_state_dict(path)
    if layout in (None, 'auto'):
      layout = registry.detect_layout(state)
    family, lay = registry.find_layout(layout)
    if backbone is not None and registry.family_of(backbone) is not family:
      raise ConversionError(
        f'{path}: layout {layout!r} holds {family.name} weights but the backbone {backbone!r}'
        f' is a {registry.family_of(backbone).name}; set config.model.pretrained_layout to one'
        f' of {", ".join(x.name for x in registry.family_of(backbone).layouts)} (or auto)'
      )
    if lay.part == 'model':
      state = {
        k[len('backbone.') :]: v
        for k, v in strip_module_prefix(state).items()
        if k.startswith('backbone.')
      }
      layout = lay.backbone_layout
    try:
      loaded = family.convert(state, target, layout)
    except ConversionError as e:
      raise ConversionError(f'{path} does not fit the {what}: {e}') from None
  out = {k: dict(v) for k, v in variables.items()}
  for c in collections:
    out[c]['backbone'] = jax.tree_util.tree_map(
      lambda new, old: jnp.asarray(new, old.dtype), loaded[c], target[c]
    )
  return out
