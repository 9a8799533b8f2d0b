"""Trained variables -> the authors' PyTorch state dicts (`--to torch`).

The inverse of `python -m dssn_jax.convert`, through the same name table of
each layout (`models.resnet_weights.torch_key`,
`models.dinov2_weights.torch_key` and its Hugging Face table), so that a
file written here converts back to the very same variables:

| family | `--layout` | written | loads into |
| --- | --- | --- | --- |
| ResNet | `model` (default) | `{'model': {'module.' + key: tensor}}` | the DSSN/UniMatch `DeepLabV3Plus` wrapped in DDP, as their `best.pth` (`num_batches_tracked` included) |
| ResNet | `dssn` | the backbone's state dict | their `ResNet` (a `pretrained/resnet101.pth`) |
| DINOv2 | `unimatch_v2` (default) | `{'model': student, 'model_ema': teacher}`, `module.` keys | UniMatch V2's DPT in DDP, as its `best.pth` |
| DINOv2 | `dinov2` | the encoder's hub state dict | `DinoVisionTransformer` (`dinov2_vit*14_pretrain.pth`) |
| DINOv2 | `hf_dinov2` | the encoder's Hugging Face state dict: a folder (`config.json`, `model.safetensors`), or one `.safetensors` / `.pth` file | `transformers.Dinov2Model.from_pretrained(folder)` |

The authors' code builds only their networks: a test backbone
(`resnet_tiny`, `dinov2_tiny`) or a model whose variables differ from the
named network's (a width multiplier, a 7x7 stem) is refused in one line.
`allow_test_models=True` (`--allow_test_models`) lifts that for the tests,
whose PyTorch renderings (`dssn_jax.testing.torch_reference`,
`torch_dinov2_reference`) take any size.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from dssn_jax import loading
from dssn_jax.errors import ConversionError
from dssn_jax.models import dinov2_weights, registry, resnet_weights
from dssn_jax.state_dicts import flatten

# family -> the layouts export writes, the default (the whole model) first.
LAYOUTS = {'resnet': ('model', 'dssn'), 'dinov2': ('unimatch_v2', 'dinov2', 'hf_dinov2')}
# Whole-model layouts: an authors' checkpoint dict with DDP's `module.` prefix.
CHECKPOINT_LAYOUTS = ('model', 'unimatch_v2')


def layouts_for(backbone: str) -> tuple[str, ...]:
  family = registry.family_of(backbone)
  if family.name not in LAYOUTS:
    raise ConversionError(f'no PyTorch layout to export a {family.name} model to')
  return LAYOUTS[family.name]


@functools.cache
def _named_shapes(backbone: str, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Variable shapes of the named network (its default options)."""
  named = registry.create_model(backbone, num_classes)
  return {p: tuple(v.shape) for p, v in flatten(registry.variable_shapes(named, backbone))}


def check_authors_model(config, variables: Mapping[str, Any]) -> None:
  """Raises a one-line `ConversionError` unless the authors' code can build
  this model: a named (not test) backbone whose variables have exactly the
  shapes of that network with `config.data.num_classes` classes."""
  backbone = config.model.backbone
  family = registry.family_of(backbone)
  if backbone in family.test_backbones:
    raise ConversionError(
      f"{backbone} is a test network: the authors' {family.title} has no such model"
    )
  want = _named_shapes(backbone, int(config.data.num_classes))
  have = {p: tuple(np.shape(v)) for p, v in flatten(variables)}
  if want == have:
    return
  multiplier = float(config.model.get('width_multiplier', 1.0))
  if multiplier != 1.0:
    reason = f'config.model.width_multiplier={multiplier:g} (the authors build width 1 only)'
  elif not config.model.get('deep_stem', True):
    reason = "config.model.deep_stem=False (the authors' ResNet has the deep stem)"
  else:
    diff = sorted(set(want) ^ set(have)) or sorted(p for p in want if want[p] != have[p])
    path = '/'.join(diff[0])
    reason = f'{len(diff)} variables differ, e.g. {path} {have.get(diff[0])} vs {want.get(diff[0])}'
  raise ConversionError(f"the authors' {family.title} cannot hold this {backbone} model: {reason}")


def _with_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {f'module.{k}': v for k, v in state.items()}


def _one(family: str, variables, layout: str, step: int) -> dict[str, np.ndarray]:
  if family == 'resnet':
    return resnet_weights.export_state_dict(variables, layout, num_batches_tracked=step)
  return dinov2_weights.export_state_dict(variables, layout)


def export_state(
  config,
  variables: Mapping[str, Any],
  *,
  which_model: str = 'teacher',
  layout: str | None = None,
  step: int = 0,
  allow_test_models: bool = False,
) -> dict[str, Any]:
  """What `--to torch` saves, as numpy arrays.

  Args:
    config: the model's config (`config.model`, `config.data.num_classes`).
    variables: `{'teacher': ..., 'student': ...}` (or one model) of
      `{'params', 'batch_stats'}`.
    which_model: the model of a single-model layout (UniMatch V2's
      checkpoint holds both: `model` the student, `model_ema` the teacher).
    layout: one of `layouts_for(backbone)`; None: the whole model's.
    step: the checkpoint's step, written as every BatchNorm's
      `num_batches_tracked`.
    allow_test_models: skip `check_authors_model` (tests only).

  Returns:
    `{'model': state[, 'model_ema': state]}` for the whole-model layouts,
    else the bare state dict (torch key -> array).
  """
  layouts = layouts_for(config.model.backbone)
  layout = layouts[0] if layout is None else layout
  if layout not in layouts:
    raise ConversionError(
      f'--layout {layout}: a {config.model.backbone} model exports to {", ".join(layouts)}'
    )
  family = registry.family_of(config.model.backbone).name
  variables = jax.device_get(dict(variables))
  chosen = loading.choose_model(variables, which_model)
  if not allow_test_models:
    check_authors_model(config, chosen)
  if layout == 'unimatch_v2':
    student = loading.choose_model(variables, 'student')
    teacher = loading.choose_model(variables, 'teacher')
    return {
      'model': _with_prefix(_one(family, student, layout, step)),
      'model_ema': _with_prefix(_one(family, teacher, layout, step)),
    }
  state = _one(family, chosen, layout, step)
  return {'model': _with_prefix(state)} if layout in CHECKPOINT_LAYOUTS else state


def save(obj: Mapping[str, Any], path: str, hf_backbone: str | None = None) -> str:
  """Writes `export_state`'s result: `.safetensors` (a bare state dict, no
  torch needed), `.pth`/`.pt` (`torch.save` of torch tensors), or, given
  `hf_backbone` (the `hf_dinov2` layout), any other path as a Hugging Face
  model folder: `config.json` and `model.safetensors`."""
  if hf_backbone is not None and not path.endswith(('.safetensors', '.pth', '.pt')):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(dinov2_weights.hf_config(hf_backbone), f, indent=2)
    save(obj, os.path.join(path, 'model.safetensors'))
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith('.safetensors'):
    if any(isinstance(v, Mapping) for v in obj.values()):
      raise ConversionError(
        f'{path}: a checkpoint dict ({", ".join(obj)}) cannot be a .safetensors file;'
        ' write a .pth, or an encoder layout (dinov2, hf_dinov2)'
      )
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    save_file({k: np.ascontiguousarray(v) for k, v in obj.items()}, path)
    return path
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"writing {path} needs PyTorch: pip install 'dssn-jax[convert]'") from e

  def tensors(tree):
    if isinstance(tree, Mapping):
      return {k: tensors(v) for k, v in tree.items()}
    return torch.from_numpy(np.array(tree))

  torch.save(tensors(obj), path)
  return path
