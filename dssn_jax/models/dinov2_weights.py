"""PyTorch / safetensors weights -> DINOv2 + DPT variables.

Four layouts a UniMatch V2 user holds, each first renamed to the DINOv2
hub names, then mapped onto our parameters by one rule:

| layout | file | keys |
| --- | --- | --- |
| `dinov2` | `dinov2_vits14_pretrain.pth` ... (UniMatch V2's `pretrained/dinov2_*.pth`) | `cls_token`, `pos_embed`, `mask_token`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}` (giant `mlp.w12`, `mlp.w3`), `norm.*` |
| `timm_dinov2` | timm `vit_{small,base,large,giant}_patch14_dinov2` | the hub names without `mask_token`; giant's packed SwiGLU is `mlp.fc1` / `mlp.fc2` |
| `hf_dinov2` | Hugging Face `Dinov2Model` (`model.safetensors`) | `embeddings.{cls_token,mask_token,position_embeddings,patch_embeddings.projection}`, `encoder.layer.{i}.attention.attention.{query,key,value}`, `attention.output.dense`, `layer_scale{1,2}.lambda1`, `mlp.{fc1,fc2}` (giant `mlp.weights_in`, `mlp.weights_out`), `norm1`, `norm2`, `layernorm` (optional `dinov2.` prefix) |
| `unimatch_v2` | a whole UniMatch V2 checkpoint (`best.pth`: `model` or `model_ema`) | `backbone.*` (hub names), `head.*` (optional `module.` prefix) |

The first three are encoder weights (what `config.model.pretrained` loads);
`unimatch_v2` is the whole segmenter. Hub name -> our path: `blocks.{i}` ->
`blocks_{i}`, `weight` -> `kernel` (Dense: transposed to `(in, out)`; conv:
`(O, I, kh, kw)` -> `(kh, kw, I, O)`; the DPT's transposed convs
`resize_layers.{0,1}`: `(I, O, kh, kw)` -> `(kh, kw, I, O)`), LayerNorm
`weight` -> `scale`; head: `head.scratch.{layerK_rn,refinenetK}` ->
`head/{layerK_rn,refinenetK}`, `head.scratch.output_conv.{0,2}` ->
`head/output_conv{1,2}`, `head.{projects,resize_layers}.{i}` ->
`head/{projects,resize_layers}_{i}`. The stored 37x37 position grid is
kept; the model resizes it at run time as the authors' does.

`export_state_dict` runs the same names (`torch_key`, the Hugging Face
table `_HF_NAMES` read the other way) and the inverse transposes (`python
-m dssn_jax.export --to torch`), for `unimatch_v2`, `dinov2` and `hf_dinov2`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dssn_jax.models.dinov2 import ENCODERS
from dssn_jax.state_dicts import (
  ConversionError,
  flatten,
  mismatch_error,
  set_path,
  strip_prefix,
  to_numpy,
)

ENCODER_LAYOUTS = ('dinov2', 'timm_dinov2', 'hf_dinov2')
MODEL_LAYOUTS = ('unimatch_v2',)

_HEAD_SCRATCH = re.compile(r'^(layer\d_rn|refinenet\d)$')
_INDEXED = re.compile(r'^(blocks|projects|resize_layers)_(\d+)$')
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'gamma': 'gamma'}


def torch_key(path: tuple[str, ...]) -> str:
  """Our variable path -> the hub / UniMatch V2 state-dict key."""
  *modules, leaf = path
  parts = []
  in_head = bool(modules) and modules[0] == 'head'
  for m in modules:
    if (g := _INDEXED.match(m)) is not None:
      parts.append(f'{g.group(1)}.{g.group(2)}')
    elif in_head and _HEAD_SCRATCH.match(m):
      parts.append(f'scratch.{m}')
    elif in_head and m in ('output_conv1', 'output_conv2'):
      parts.append(f'scratch.output_conv.{0 if m == "output_conv1" else 2}')
    else:
      parts.append(m)
  parts.append(_LEAVES.get(leaf, leaf))  # cls_token, pos_embed, mask_token as they are
  return '.'.join(parts)


def _permutation(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
  """How a torch tensor's axes become ours at `path` (None: as they are).

  Dense `(out, in)` -> `(in, out)`; conv `(O, I, kh, kw)` -> `(kh, kw, I, O)`;
  the DPT's transposed convs `(I, O, kh, kw)` -> `(kh, kw, I, O)`.
  """
  if path[-1] != 'kernel':
    return None
  if ndim == 2:
    return (1, 0)
  if ndim == 4:
    transposed = any(m in ('resize_layers_0', 'resize_layers_1') for m in path)
    return (2, 3, 0, 1) if transposed else (2, 3, 1, 0)
  return None


def _to_ours(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """A torch tensor (numpy) -> our layout of the leaf at `path`."""
  perm = _permutation(path, value.ndim)
  return value if perm is None else value.transpose(perm)


def _to_torch(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """Our leaf at `path` -> the torch tensor's layout (`_to_ours` inverted)."""
  perm = _permutation(path, value.ndim)
  return value if perm is None else value.transpose(np.argsort(perm))


def _from_timm(state: dict[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(state)
  swiglu = 'w12' in template.get('blocks_0', {}).get('mlp', {})
  if swiglu:
    for key in list(out):
      g = re.match(r'^(blocks\.\d+\.mlp\.)fc([12])\.(weight|bias)$', key)
      if g:
        out[f'{g.group(1)}{"w12" if g.group(2) == "1" else "w3"}.{g.group(3)}'] = out.pop(key)
  if 'mask_token' not in out and 'mask_token' in template:  # timm drops it; torch inits zeros
    out['mask_token'] = np.zeros(template['mask_token'].shape, np.float32)
  return out


# Hugging Face name <-> hub name, read both ways: `{i}` is a block index; a
# name ending in '.' is a prefix (the leaf follows), any other is whole.
_HF_NAMES = (
  ('embeddings.cls_token', 'cls_token'),
  ('embeddings.mask_token', 'mask_token'),
  ('embeddings.position_embeddings', 'pos_embed'),
  ('embeddings.patch_embeddings.projection.', 'patch_embed.proj.'),
  ('encoder.layer.{i}.attention.output.dense.', 'blocks.{i}.attn.proj.'),
  ('encoder.layer.{i}.layer_scale1.lambda1', 'blocks.{i}.ls1.gamma'),
  ('encoder.layer.{i}.layer_scale2.lambda1', 'blocks.{i}.ls2.gamma'),
  ('encoder.layer.{i}.mlp.weights_in.', 'blocks.{i}.mlp.w12.'),
  ('encoder.layer.{i}.mlp.weights_out.', 'blocks.{i}.mlp.w3.'),
  ('encoder.layer.{i}.norm1.', 'blocks.{i}.norm1.'),
  ('encoder.layer.{i}.norm2.', 'blocks.{i}.norm2.'),
  ('encoder.layer.{i}.mlp.fc1.', 'blocks.{i}.mlp.fc1.'),
  ('encoder.layer.{i}.mlp.fc2.', 'blocks.{i}.mlp.fc2.'),
  ('layernorm.', 'norm.'),
)
_HF_QKV = re.compile(
  r'^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$'
)
_HUB_QKV = re.compile(r'^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$')
_QKV = ('query', 'key', 'value')


def _name_rule(src: str, dst: str) -> tuple[re.Pattern, str]:
  """One `_HF_NAMES` row as `(pattern, replacement)` from `src` to `dst` names."""
  pattern = re.escape(src).replace(re.escape('{i}'), r'(\d+)')
  return re.compile('^' + pattern + ('' if src.endswith('.') else '$')), dst.replace('{i}', r'\1')


_HF_TO_HUB = tuple(_name_rule(hf, hub) for hf, hub in _HF_NAMES)
_HUB_TO_HF = tuple(_name_rule(hub, hf) for hf, hub in _HF_NAMES)


def _rename(key: str, rules: tuple[tuple[re.Pattern, str], ...]) -> str | None:
  for pattern, repl in rules:
    new, n = pattern.subn(repl, key)
    if n:
      return new
  return None


def _from_hf(state: dict[str, Any]) -> dict[str, Any]:
  """Hugging Face `Dinov2Model` names -> hub names; q, k, v concatenated into qkv."""
  if state and all(k.startswith('dinov2.') for k in state):
    state = {k[len('dinov2.') :]: v for k, v in state.items()}
  out, qkv = {}, {}
  for key, value in state.items():
    if (g := _HF_QKV.match(key)) is not None:
      qkv.setdefault((g.group(1), g.group(3)), {})[g.group(2)] = value
      continue
    out[_rename(key, _HF_TO_HUB) or key] = value  # unknown: left for the unexpected-key report
  for (i, leaf), parts in qkv.items():
    if set(parts) == set(_QKV):
      out[f'blocks.{i}.attn.qkv.{leaf}'] = np.concatenate([to_numpy(parts[p]) for p in _QKV])
    else:  # incomplete: report the pieces that are there
      for p, value in parts.items():
        out[f'encoder.layer.{i}.attention.attention.{p}.{leaf}'] = value
  return out


def _to_hf(hub: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Hub names -> Hugging Face `Dinov2Model` names; qkv split into q, k, v."""
  out = {}
  for key, value in hub.items():
    if (g := _HUB_QKV.match(key)) is not None:
      for p, part in zip(_QKV, np.split(value, 3)):
        out[f'encoder.layer.{g.group(1)}.attention.attention.{p}.{g.group(2)}'] = part
      continue
    new = _rename(key, _HUB_TO_HF)
    if new is None:
      raise ConversionError(f'no Hugging Face name for {key}')
    out[new] = value
  return out


def to_hub_names(state: Mapping[str, Any], template: Mapping[str, Any], layout: str) -> dict:
  """Renames a state dict of `layout` to the hub / UniMatch V2 names."""
  state = dict(state)
  if layout == 'dinov2':
    return state
  if layout == 'timm_dinov2':
    return _from_timm(state, template)
  if layout == 'hf_dinov2':
    return _from_hf(state)
  if layout == 'unimatch_v2':
    return strip_prefix(state, 'module.')
  raise ValueError(f'layout={layout!r} must be one of {", ".join(ENCODER_LAYOUTS + MODEL_LAYOUTS)}')


def convert_state_dict(
  state: Mapping[str, Any], template: Mapping[str, Any], layout: str
) -> dict[str, Any]:
  """Fills `template`'s params from a state dict of `layout`.

  Args:
    state: key -> tensor or array.
    template: `{'params': ...}` (arrays or `ShapeDtypeStruct`s): the
      encoder's subtree for the encoder layouts, the whole segmenter's for
      `unimatch_v2`.
    layout: `dinov2`, `timm_dinov2`, `hf_dinov2` or `unimatch_v2`.

  Returns:
    `{'params': ...}` of float32 numpy arrays shaped like `template`.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  params = template['params']
  return fill_params(to_hub_names(state, params, layout), params, layout)


def fill_params(state: Mapping[str, Any], params: Mapping[str, Any], layout: str) -> dict:
  """`{'params': ...}` shaped like `params`, each leaf read from `state` (in
  hub names) at `torch_key(path)` and laid out as ours (`_to_ours`).

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  used, missing, misshaped, out = set(), [], [], {}
  for path, leaf in flatten(params):
    key = torch_key(path)
    if key not in state:
      missing.append(f'{key} (for params/{"/".join(path)}, shape {tuple(leaf.shape)})')
      continue
    used.add(key)
    raw = to_numpy(state[key])
    value = _to_ours(path, raw)
    if tuple(value.shape) != tuple(leaf.shape):
      misshaped.append(
        f'{key}: {tuple(raw.shape)} does not fit params/{"/".join(path)} {tuple(leaf.shape)}'
      )
      continue
    set_path(out, ('params',) + path, np.asarray(value, np.float32))
  unexpected = sorted(k for k in state if k not in used)
  error = mismatch_error(layout, missing, unexpected, misshaped)
  if error:
    raise error
  return out


def export_state_dict(variables: Mapping[str, Any], layout: str) -> dict[str, np.ndarray]:
  """Our params -> a state dict of `layout` (numpy float32), the inverse of
  `convert_state_dict` through the same names (`torch_key`, `_HF_NAMES`).

  Args:
    variables: `{'params': ...}` of the whole segmenter.
    layout: `unimatch_v2` (every key of the authors' DPT, without the
      `module.` prefix), or the encoder alone as `dinov2` (hub) or
      `hf_dinov2` (Hugging Face `Dinov2Model`, no prefix).
  """
  if layout not in ('unimatch_v2', 'dinov2', 'hf_dinov2'):
    raise ValueError(f'layout={layout!r}: export writes unimatch_v2, dinov2 or hf_dinov2')
  params = variables['params']
  if layout != 'unimatch_v2':
    params = params['backbone']
  hub = {
    torch_key(path): _to_torch(path, np.asarray(leaf, np.float32)) for path, leaf in flatten(params)
  }
  return _to_hf(hub) if layout == 'hf_dinov2' else hub


def hf_config(backbone: str) -> dict[str, Any]:
  """The `config.json` of a Hugging Face `Dinov2Model` with `backbone`'s
  encoder (`Dinov2Model.from_pretrained` reads it beside `model.safetensors`)."""
  spec = ENCODERS[backbone]
  return {
    'architectures': ['Dinov2Model'],
    'model_type': 'dinov2',
    'hidden_size': spec.dim,
    'num_hidden_layers': spec.depth,
    'num_attention_heads': spec.heads,
    'mlp_ratio': 4,
    'use_swiglu_ffn': spec.ffn == 'swiglu',
    'hidden_act': 'gelu',
    'qkv_bias': True,
    'layerscale_value': 1.0,
    'layer_norm_eps': 1e-6,
    'image_size': 518,
    'patch_size': 14,
    'num_channels': 3,
  }


def detect(state: Mapping[str, Any]) -> str | None:
  """The DINOv2-family layout the keys look like, or None."""
  keys = set(state)
  if any(k.startswith(('module.backbone.blocks.', 'backbone.blocks.')) for k in keys):
    return 'unimatch_v2'
  if any(re.match(r'^(dinov2\.)?encoder\.layer\.\d+\.attention\.attention\.', k) for k in keys):
    return 'hf_dinov2'
  if 'blocks.0.attn.qkv.weight' in keys and 'pos_embed' in keys:
    return 'dinov2' if 'mask_token' in keys else 'timm_dinov2'
  return None


def encoder_dims(state: Mapping[str, Any], layout: str) -> tuple[int, int]:
  """`(dim, depth)` of the encoder a state dict holds."""
  state = to_hub_names(state, {}, layout)
  prefix = 'backbone.' if layout in MODEL_LAYOUTS else ''
  if f'{prefix}cls_token' not in state:
    raise ConversionError(f'no {prefix}cls_token in the state dict; pass backbone=')
  dim = int(to_numpy(state[f'{prefix}cls_token']).shape[-1])
  blocks = {
    int(g.group(1)) for k in state if (g := re.match(re.escape(prefix) + r'blocks\.(\d+)\.', k))
  }
  return dim, (max(blocks) + 1 if blocks else 0)


def num_classes_of(state: Mapping[str, Any], layout: str = 'unimatch_v2') -> int:
  """Classes of a whole UniMatch V2 checkpoint (its last output conv)."""
  del layout
  state = strip_prefix(dict(state), 'module.')
  key = 'head.scratch.output_conv.2.weight'
  if key not in state:
    raise ConversionError(f'no {key} in the state dict; pass num_classes=')
  return int(to_numpy(state[key]).shape[0])


def backbone_of(state: Mapping[str, Any], layout: str) -> str:
  """The DINOv2 encoder whose width and depth a state dict of `layout` holds."""
  dim_depth = encoder_dims(state, layout)
  for name, spec in ENCODERS.items():
    if (spec.dim, spec.depth) == dim_depth:
      return name
  raise ConversionError(
    f'no DINOv2 encoder has width {dim_depth[0]} and {dim_depth[1]} blocks; pass backbone='
  )
