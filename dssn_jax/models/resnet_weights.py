"""PyTorch ResNet / DeepLabV3+ weights -> DeepLabV3+ variables.

Every published result starts from ImageNet weights of a PyTorch ResNet, and
the authors' trained models are PyTorch state dicts too. This module maps
those state dicts onto our variables, name by name:

| layout | keys | model |
| --- | --- | --- |
| `dssn` | `conv1.0/1/3/4/6.*`, `bn1.*`, `layerN.M.*` | UniMatch/DSSN `resnet50.pth` / `resnet101.pth` (deep stem, backbone only) |
| `timm` | the same names (plus `fc.*`) | timm `gluon_resnet50_v1s` / `gluon_resnet101_v1s` (deep stem, backbone only) |
| `torchvision` | `conv1.*`, `bn1.*`, `layerN.M.*`, `fc.*` | torchvision `resnet50` / `resnet101` (7x7 stem, backbone only) |
| `model` | `backbone.*`, `head.*`, `reduce.*`, `fuse.*`, `classifier.*` (optional `module.` prefix) | a whole reference DeepLabV3+ |

Conv weights `(O, I, kh, kw)` become kernels `(kh, kw, I, O)`; BN `weight`,
`bias`, `running_mean`, `running_var` become `params/scale`, `params/bias`,
`batch_stats/mean`, `batch_stats/var`. `num_batches_tracked` and the ImageNet
classifier `fc.*` are ignored; any other missing, unexpected or mis-shaped
key is reported, all of them in one `ConversionError`.

`export_state_dict` runs the same names (`torch_key`) and the inverse
transposes the other way (`python -m dssn_jax.export --to torch`), for the
`model` and `dssn` layouts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dssn_jax.state_dicts import (
  ConversionError,
  flatten,
  mismatch_error,
  set_path,
  strip_module_prefix,
  to_numpy,
)

LAYOUTS = ('dssn', 'timm', 'torchvision', 'model')
BACKBONE_LAYOUTS = ('dssn', 'timm', 'torchvision')

# Our leaf name -> torch parameter/buffer name.
_LEAVES = {
  'kernel': 'weight',
  'scale': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
}
# Deep stem: the reference's `conv1 = nn.Sequential(conv, bn, relu, conv, bn, relu, conv)`.
_STEM = {
  'stem_conv1': 'conv1.0',
  'stem_bn1': 'conv1.1',
  'stem_conv2': 'conv1.3',
  'stem_bn2': 'conv1.4',
  'stem_conv3': 'conv1.6',
}
_BLOCK = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
_CONV_BN = {'conv': '0', 'bn': '1'}
_FUSE = {'conv1': '0', 'bn1': '1', 'conv2': '3', 'bn2': '4'}
_IGNORED = re.compile(r'(^|\.)num_batches_tracked$')
_IGNORED_BACKBONE = re.compile(r'^fc\.')
_LAYER = re.compile(r'^layer(\d+)_(\d+)$')


def _module_key(path: tuple[str, ...]) -> str:
  """Our module path (no leaf) -> torch module name, e.g. `layer1.0.conv1`."""
  head, rest = path[0], path[1:]
  if head == 'backbone':
    return 'backbone.' + _module_key(rest)
  if head in _STEM and not rest:
    return _STEM[head]
  if head in ('conv1', 'bn1') and not rest:
    return head
  m = _LAYER.match(head)
  if m and len(rest) == 1:
    return f'layer{m.group(1)}.{m.group(2)}.{_BLOCK.get(rest[0], rest[0])}'
  if head == 'head' and len(rest) == 2 and rest[1] in _CONV_BN:
    branch, layer = rest
    if branch == 'b4':  # image pooling: gap = (AdaptiveAvgPool2d, conv, bn, relu)
      return f'head.b4.gap.{int(_CONV_BN[layer]) + 1}'
    return f'head.{branch}.{_CONV_BN[layer]}'
  if head == 'reduce' and len(rest) == 1 and rest[0] in _CONV_BN:
    return f'reduce.{_CONV_BN[rest[0]]}'
  if head == 'fuse' and len(rest) == 1 and rest[0] in _FUSE:
    return f'fuse.{_FUSE[rest[0]]}'
  if head == 'classifier' and not rest:
    return 'classifier'
  raise KeyError(f'no torch name for module {"/".join(path)}')


def torch_key(path: tuple[str, ...]) -> str:
  """Our variable path (module path + leaf) -> its torch state-dict key."""
  return f'{_module_key(path[:-1])}.{_LEAVES[path[-1]]}'


# Conv weights: torch `(O, I, kh, kw)` -> our `(kh, kw, I, O)`; the inverse
# permutation (`np.argsort`) takes them back.
_CONV_TO_OURS = (2, 3, 1, 0)


def to_ours(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """A torch tensor (numpy) -> our array for the leaf at `path`."""
  if path[-1] == 'kernel' and value.ndim == 4:
    return value.transpose(_CONV_TO_OURS)
  return value


def to_torch(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """Our array at `path` -> the torch tensor's layout (`to_ours` inverted)."""
  if path[-1] == 'kernel' and value.ndim == 4:
    return value.transpose(np.argsort(_CONV_TO_OURS))
  return value


def detect(state: Mapping[str, Any]) -> str | None:
  """The ResNet-family layout the keys look like, or None."""
  state = strip_module_prefix(dict(state))
  if any(k.startswith('backbone.layer1.') for k in state):
    return 'model'
  if 'layer1.0.conv1.weight' not in state:
    return None
  if 'conv1.0.weight' in state:
    return 'timm' if 'fc.weight' in state else 'dssn'
  return 'torchvision' if 'conv1.weight' in state else None


def convert_state_dict(
  state: Mapping[str, Any], template: Mapping[str, Any], layout: str
) -> dict[str, Any]:
  """Fills `template`'s variables from a torch state dict.

  Args:
    state: torch key -> tensor (or array).
    template: `{'params': ..., 'batch_stats': ...}` of the target (arrays or
      `jax.ShapeDtypeStruct`s); a backbone-only template for the backbone
      layouts, the whole model's for `model`.
    layout: one of `LAYOUTS`.

  Returns:
    `{'params', 'batch_stats'}` of float32 numpy arrays shaped like `template`.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r} must be one of {", ".join(LAYOUTS)}')
  state = dict(state)
  if layout == 'model':
    state = strip_module_prefix(state)
  _check_stem(template, layout)
  used, missing, misshaped = set(), [], []
  out: dict[str, Any] = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in flatten(template.get(collection, {})):
      key = torch_key(path)
      if key not in state:
        missing.append(f'{key} (for {collection}/{"/".join(path)}, shape {tuple(leaf.shape)})')
        continue
      used.add(key)
      value = to_ours(path, to_numpy(state[key]))
      if tuple(value.shape) != tuple(leaf.shape):
        misshaped.append(
          f'{key}: {tuple(to_numpy(state[key]).shape)} does not fit'
          f' {collection}/{"/".join(path)} {tuple(leaf.shape)}'
        )
        continue
      set_path(out, (collection,) + path, value.astype(np.float32))
  unexpected = []
  for key in state:
    if key in used or _IGNORED.search(key):
      continue
    if layout in BACKBONE_LAYOUTS and _IGNORED_BACKBONE.match(key):
      continue
    unexpected.append(key)
  error = mismatch_error(layout, missing, sorted(unexpected), misshaped)
  if error:
    raise error
  return out


def export_state_dict(
  variables: Mapping[str, Any], layout: str, num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
  """Our variables -> a torch state dict of `layout` (numpy), the inverse of
  `convert_state_dict` through the same names (`torch_key`).

  Args:
    variables: `{'params', 'batch_stats'}` of the whole DeepLabV3+.
    layout: `model` (every key of the reference DeepLabV3+, without the
      `module.` prefix) or `dssn` (the backbone alone, as the reference's
      `resnet*.pth`).
    num_batches_tracked: the value of every BN's `num_batches_tracked`
      buffer (torch reads it only with `momentum=None`).

  Returns:
    torch key -> numpy array (float32; the `num_batches_tracked` int64).
  """
  if layout not in ('model', 'dssn'):
    raise ValueError(f'layout={layout!r}: export writes model or dssn')
  out: dict[str, np.ndarray] = {}
  for collection in ('params', 'batch_stats'):
    tree = variables.get(collection, {})
    if layout == 'dssn':
      tree = tree.get('backbone', {})
    for path, leaf in flatten(tree):
      out[torch_key(path)] = to_torch(path, np.asarray(leaf, np.float32))
      if path[-1] == 'mean':  # one per BatchNorm
        out[f'{_module_key(path[:-1])}.num_batches_tracked'] = np.asarray(
          num_batches_tracked, np.int64
        )
  return out


def _check_stem(template: Mapping[str, Any], layout: str) -> None:
  """A clear error when the layout's stem is not the model's."""
  params = template.get('params', {})
  params = params.get('backbone', params)
  deep = 'stem_conv1' in params
  if layout == 'torchvision' and deep:
    raise ConversionError(
      'the torchvision layout has the 7x7 stem but the model has the deep stem;'
      ' build it with deep_stem=False (config.model.deep_stem=False)'
    )
  if layout in ('dssn', 'timm') and not deep and 'conv1' in params:
    raise ConversionError(
      f'the {layout} layout has the deep stem but the model has the 7x7 stem;'
      ' build it with deep_stem=True (config.model.deep_stem=True)'
    )


def infer_backbone(state: Mapping[str, Any], prefix: str) -> str:
  blocks = {
    int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r'layer3\.(\d+)\.', k))
  }
  depth = max(blocks) + 1 if blocks else 0
  names = {6: 'resnet50', 23: 'resnet101'}
  if depth not in names:
    raise ConversionError(
      f'cannot tell the backbone from the state dict ({depth} blocks in layer3); pass backbone='
    )
  return names[depth]


def infer_num_classes(state: Mapping[str, Any]) -> int:
  if 'classifier.weight' not in state:
    raise ConversionError('no classifier.weight in the state dict; pass num_classes=')
  return int(state['classifier.weight'].shape[0])


def convert_options(state: Mapping[str, Any], layout: str) -> dict[str, Any]:
  """The `create_deeplabv3plus` options the weights imply: the stem."""
  if layout == 'torchvision':
    return dict(deep_stem=False)
  if layout == 'model':
    return dict(deep_stem='backbone.conv1.weight' not in strip_module_prefix(state))
  return dict(deep_stem=True)


def backbone_of(state: Mapping[str, Any], layout: str) -> str:
  """resnet50 or resnet101, from the layer3 blocks of a state dict of `layout`."""
  if layout == 'model':
    return infer_backbone(strip_module_prefix(state), 'backbone.')
  return infer_backbone(state, '')


def num_classes_of(state: Mapping[str, Any], layout: str) -> int:
  """Classes of a whole DeepLabV3+ state dict (its classifier)."""
  del layout
  return infer_num_classes(strip_module_prefix(state))
