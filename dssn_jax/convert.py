"""PyTorch weights -> dssn_jax variables.

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

    python -m dssn_jax.convert resnet101.pth r101.npz --layout dssn
    python -m dssn_jax.convert best.pth model.npz     # layout detected from the keys

The layouts of every backbone family come from `dssn_jax.models.registry`;
the DINOv2 ones (`dinov2`, `timm_dinov2`, `hf_dinov2`, `unimatch_v2`) are
described and converted in `dssn_jax.models.dinov2_weights`. Without
`--layout` (`layout=None`) the layout is detected from the keys, and a file
no family recognises fails with the layouts listed.

`.pth` files are read with `torch.load(..., weights_only=True)` (a pickle
from the internet can run code); torch is imported only here, and only when
a `.pth` is read (the `convert` extra). `.safetensors` files (Hugging Face)
are read with `safetensors.numpy`, without torch.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


class ConversionError(ValueError):
  """A state dict does not match the model; the message lists every bad key."""


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


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_file(path: str | os.PathLike) -> Any:
  """What a weights file holds: `.safetensors` as numpy arrays (no torch),
  anything else with `torch.load(..., weights_only=True)` (a state dict or a
  whole checkpoint dict)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no weights file {path}')
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
        f'reading {path} needs the safetensors package (pip install safetensors)'
      ) from None
    return load_file(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # an optional dependency
    raise ImportError(f"reading {path} needs PyTorch: pip install 'dssn-jax[convert]'") from e
  return torch.load(path, map_location='cpu', weights_only=True)


def read_state_dict(src, ema: bool = False) -> dict[str, Any]:
  """A state dict from a path (`.pth` read safely, `.safetensors`) or a mapping.

  Checkpoints saved as `{'model': state_dict, ...}` (the reference's
  `latest.pth`/`best.pth`) or `{'state_dict': ...}` are unwrapped; with
  `ema=True`, UniMatch V2's `model_ema` is taken instead of `model`.
  """
  if isinstance(src, (str, os.PathLike)):
    src = read_file(src)
  if not isinstance(src, Mapping):
    raise ConversionError(f'expected a state dict (a mapping), got {type(src).__name__}')
  wrappers = ('model_ema',) if ema else ('model', 'state_dict')
  for wrapper in wrappers:
    if isinstance(src.get(wrapper), Mapping):
      src = src[wrapper]
      break
  else:
    if ema:
      raise ConversionError(
        f'ema=True but the checkpoint has no model_ema (keys {sorted(src)[:8]})'
      )
  return dict(src)


def detect_resnet_layout(state: Mapping[str, Any]) -> str | None:
  """The ResNet-family layout the keys look like, or None."""
  state = _strip_module_prefix(dict(state))
  if any(k.startswith('backbone.layer1.') for k in state):
    return 'model'
  if 'layer1.0.conv1.weight' not in state:
    return None
  if 'conv1.0.weight' in state:
    return 'timm' if 'fc.weight' in state else 'dssn'
  return 'torchvision' if 'conv1.weight' in state else None


def _strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
  """Drops the `module.` prefix DistributedDataParallel adds to every key."""
  if state and all(k.startswith('module.') for k in state):
    return {k[len('module.') :]: v for k, v in state.items()}
  return state


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
    state = _strip_module_prefix(state)
  _check_stem(template, layout)
  used, missing, misshaped = set(), [], []
  out: dict[str, Any] = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(template.get(collection, {})):
      key = torch_key(path)
      if key not in state:
        missing.append(f'{key} (for {collection}/{"/".join(path)}, shape {tuple(leaf.shape)})')
        continue
      used.add(key)
      value = _to_numpy(state[key])
      if path[-1] == 'kernel':
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
      if tuple(value.shape) != tuple(leaf.shape):
        misshaped.append(
          f'{key}: {tuple(_to_numpy(state[key]).shape)} does not fit'
          f' {collection}/{"/".join(path)} {tuple(leaf.shape)}'
        )
        continue
      _set(out, (collection,) + path, value.astype(np.float32))
  unexpected = []
  for key in state:
    if key in used or _IGNORED.search(key):
      continue
    if layout in BACKBONE_LAYOUTS and _IGNORED_BACKBONE.match(key):
      continue
    unexpected.append(key)
  if missing or unexpected or misshaped:
    lines = [f'state dict does not match the model (layout {layout!r}):']
    for title, keys in (
      ('missing', missing),
      ('unexpected', sorted(unexpected)),
      ('mis-shaped', misshaped),
    ):
      if keys:
        lines.append(f'  {len(keys)} {title} key(s):')
        lines.extend(f'    {k}' for k in keys)
    raise ConversionError('\n'.join(lines))
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


def _infer_backbone(state: Mapping[str, Any], prefix: str) -> str:
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


def _infer_num_classes(state: Mapping[str, Any]) -> int:
  if 'classifier.weight' not in state:
    raise ConversionError('no classifier.weight in the state dict; pass num_classes=')
  return int(state['classifier.weight'].shape[0])


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
  from dssn_jax.models import create_model, registry  # pylint: disable=g-import-not-at-top

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
  model = create_model(backbone, num_classes, **options)
  template = registry.variable_shapes(model, backbone)
  if lay.part == 'backbone':
    template = {c: v['backbone'] for c, v in template.items() if 'backbone' in v}
  return family.convert(state, template, layout)


def save_npz(variables: Mapping[str, Any], path: str) -> str:
  """Saves `{'params', 'batch_stats'}` as `.npz` with keys like `params/a/b/kernel`."""
  flat = {'/'.join(p): np.asarray(v) for p, v in _flatten(variables)}
  if not path.endswith('.npz'):
    path += '.npz'
  np.savez(path, **flat)
  return path


def load_npz(path: str) -> dict[str, Any]:
  """Reads a `save_npz` file back into nested `{'params', 'batch_stats'}`."""
  out: dict[str, Any] = {}
  with np.load(path, allow_pickle=False) as data:
    for key in data.files:
      _set(out, tuple(key.split('/')), data[key])
  if 'params' not in out:
    raise ConversionError(f'{path} holds no params/... arrays; keys: {sorted(out)}')
  return out


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
  from dssn_jax.models import registry  # pylint: disable=g-import-not-at-top

  collections = [c for c in variables if 'backbone' in variables[c]]
  target = {c: variables[c]['backbone'] for c in collections}
  what = f'{backbone} backbone' if backbone else 'backbone'
  if path.endswith('.npz'):
    loaded = load_npz(path)
    if 'backbone' in loaded['params']:
      loaded = {c: loaded.get(c, {}).get('backbone', {}) for c in collections}
    want = {(c,) + p: v.shape for c in target for p, v in _flatten(target[c])}
    have = {(c,) + p: v.shape for c in loaded for p, v in _flatten(loaded[c])}
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
        for k, v in _strip_module_prefix(state).items()
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


def main(argv=None) -> int:
  from dssn_jax.models import registry  # pylint: disable=g-import-not-at-top

  layouts = '; '.join(
    f'{lay.name}: {lay.description}' for f in registry.FAMILIES.values() for lay in f.layouts
  )
  parser = argparse.ArgumentParser(
    prog='python -m dssn_jax.convert',
    description='Convert a PyTorch state dict (.pth) or Hugging Face .safetensors into'
    ' dssn_jax variables (.npz).',
  )
  parser.add_argument('src', help='the .pth / .safetensors file')
  parser.add_argument('out', help='output .npz path')
  parser.add_argument(
    '--layout',
    default=None,
    choices=registry.layout_names(),
    help=f'default: detected from the keys. {layouts}',
  )
  parser.add_argument(
    '--backbone',
    default=None,
    choices=registry.backbone_names(),
    help='default: inferred from the keys',
  )
  parser.add_argument(
    '--num-classes',
    type=int,
    default=None,
    help='classes of a whole model (default: from its last conv)',
  )
  parser.add_argument(
    '--ema', action='store_true', help="a UniMatch V2 checkpoint's model_ema instead of model"
  )
  args = parser.parse_args(argv)
  from dssn_jax import xla_flags  # pylint: disable=g-import-not-at-top

  xla_flags.set_default_cpu_flags()
  try:
    state = read_state_dict(args.src, ema=args.ema)
    if args.layout is None:
      args.layout = registry.detect_layout(state)
      print(f'layout {args.layout} (detected from the keys)')
    variables = from_torch(
      state, backbone=args.backbone, num_classes=args.num_classes, layout=args.layout
    )
  except (ValueError, FileNotFoundError, ImportError) as e:  # ConversionError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2  # a user error (cli.USER_ERROR_STATUS)
  path = save_npz(variables, args.out)
  n = sum(v.size for _, v in _flatten(variables['params']))
  print(f'wrote {path}: {n / 1e6:.2f}M params ({args.layout} layout)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
