"""PyTorch / safetensors DINOv3 weights -> DINOv3 encoder variables.

Three layouts hold the same weights, each first renamed to Meta's hub names,
then mapped onto our parameters by `dinov2_weights.fill_params`'s one rule
(`blocks.{i}` -> `blocks_{i}`, `weight` -> `kernel` transposed / `scale`):

| layout | file | keys |
| --- | --- | --- |
| `dinov3` | Meta's `dinov3_vit*16*_pretrain_lvd1689m-*.pth` | `cls_token`, `storage_tokens`, `mask_token`, `patch_embed.proj.*`, `rope_embed.periods`, `blocks.{i}.{norm1,attn.qkv,attn.qkv.bias_mask,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}` (SwiGLU `mlp.w1`, `mlp.w2`, `mlp.w3`), `norm.*`, 7B and ViT-L SAT: `local_cls_norm.*` |
| `timm_dinov3` | timm `vit_*_patch16_dinov3[_qkvb]` | hub names, `reg_token` for `storage_tokens`, `blocks.{i}.gamma_{1,2}`, qkv bias as `attn.q_bias` + `attn.v_bias` (none without `_qkvb`), SwiGLU `mlp.fc1_g`, `mlp.fc1_x`, `mlp.fc2`; no `mask_token`, periods or masks |
| `hf_dinov3` | Hugging Face `DINOv3ViTModel` (`model.safetensors`) | `embeddings.{cls_token,mask_token,register_tokens,patch_embeddings}`, `[model.]layer.{i}.attention.{q,k,v,o}_proj`, `layer_scale{1,2}.lambda1`, `mlp.{up,down}_proj` (SwiGLU `mlp.{gate,up,down}_proj`), `norm1`, `norm2`, `norm` |

Meta's buffers are checked, not loaded: `rope_embed.periods` must be
`100 ** (2k / (head_dim/2))` to the stored dtype's precision (bfloat16
keeps 8 bits: the model computes the periods in float32 from `base`
instead of reading a rounded copy, and a checkpoint with other periods is
refused); `attn.qkv.bias_mask` must be `[1, 0, 1]` per third where it is
finite (a NaN mask is an unfilled buffer: the known mask is used). The key
third of the qkv bias is stored zeroed (the model masks it anyway).
`local_cls_norm.*` (a class-token norm for local crops in pre-training) is
dropped: nothing here reads the class token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dssn_jax.models.dinov2_weights import fill_params
from dssn_jax.state_dicts import ConversionError, to_numpy

LAYOUTS = ('dinov3', 'timm_dinov3', 'hf_dinov3')
ROPE_BASE = 100.0
_BF16_RTOL = 2.0**-8  # bfloat16's relative rounding error is at most 2^-9

_HF_RENAMES = (
  (r'^embeddings\.cls_token$', 'cls_token'),
  (r'^embeddings\.register_tokens$', 'storage_tokens'),
  (r'^embeddings\.patch_embeddings\.', 'patch_embed.proj.'),
  (r'^layer\.(\d+)\.attention\.o_proj\.', r'blocks.\1.attn.proj.'),
  (r'^layer\.(\d+)\.layer_scale([12])\.lambda1$', r'blocks.\1.ls\2.gamma'),
  (r'^layer\.(\d+)\.(norm1|norm2)\.', r'blocks.\1.\2.'),
  (r'^norm\.', 'norm.'),
)
_HF_QKV = re.compile(r'^layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$')
_HF_MLP = re.compile(r'^layer\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)$')
_TIMM_RENAMES = (
  (r'^reg_token$', 'storage_tokens'),
  (r'^blocks\.(\d+)\.gamma_([12])$', r'blocks.\1.ls\2.gamma'),
  (r'^blocks\.(\d+)\.mlp\.fc1_g\.', r'blocks.\1.mlp.w1.'),
  (r'^blocks\.(\d+)\.mlp\.fc1_x\.', r'blocks.\1.mlp.w2.'),
)


def _qkv_bias(i: str, biases: dict, dim: int, template_bias: bool, problems: list):
  """Block `i`'s fused qkv bias `[q, 0, v]` from separate pieces (`biases`:
  'q' / 'k' / 'v' -> array), zeros for a missing q or v bias (timm's and
  HF's bias-free variants) when the model has a bias; None if neither has one."""
  biases = {p: to_numpy(b) for p, b in biases.items()}
  if 'k' in biases and np.any(biases['k']):
    problems.append(f'block {i}: a non-zero key bias (DINOv3 masks the key third of the qkv bias)')
  if not biases and not template_bias:
    return None
  zero = np.zeros(dim, np.float32)
  return np.concatenate([biases.get('q', zero), zero, biases.get('v', zero)])


def _from_hf(state: Mapping[str, Any], template_bias: bool, problems: list) -> dict:
  """Hugging Face `DINOv3ViTModel` names -> hub names (q, k, v fused)."""
  state = {re.sub(r'^model\.layer\.', 'layer.', k): v for k, v in state.items()}
  out, qkv, mlp = {}, {}, {}
  for key, value in state.items():
    if key == 'embeddings.mask_token':
      out['mask_token'] = to_numpy(value).reshape(1, -1)
    elif (g := _HF_QKV.match(key)) is not None:
      qkv.setdefault(g.group(1), {})[(g.group(2), g.group(3))] = value
    elif (g := _HF_MLP.match(key)) is not None:
      mlp.setdefault(g.group(1), {})[(g.group(2), g.group(3))] = value
    else:
      for pattern, repl in _HF_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
          out[new] = value
          break
      else:
        out[key] = value  # left for the unexpected-key report
  for i, parts in qkv.items():
    weights = [parts.get((p, 'weight')) for p in 'qkv']
    if any(w is None for w in weights):  # incomplete: report the pieces that are there
      out.update({f'layer.{i}.attention.{p}_proj.{leaf}': v for (p, leaf), v in parts.items()})
      continue
    out[f'blocks.{i}.attn.qkv.weight'] = np.concatenate([to_numpy(w) for w in weights])
    biases = {p: v for (p, leaf), v in parts.items() if leaf == 'bias'}
    bias = _qkv_bias(i, biases, weights[0].shape[0], template_bias, problems)
    if bias is not None:
      out[f'blocks.{i}.attn.qkv.bias'] = bias
  for i, parts in mlp.items():
    gated = any(name == 'gate' for name, _ in parts)
    names = {'gate': 'w1', 'up': 'w2', 'down': 'w3'} if gated else {'up': 'fc1', 'down': 'fc2'}
    for (name, leaf), value in parts.items():
      out[f'blocks.{i}.mlp.{names[name]}.{leaf}'] = value
  return out


def _from_timm(state: Mapping[str, Any], template_bias: bool, problems: list) -> dict:
  """timm `Eva` (dinov3) names -> hub names."""
  out, biases = {}, {}
  for key, value in state.items():
    if (g := re.match(r'^blocks\.(\d+)\.attn\.([qv])_bias$', key)) is not None:
      biases.setdefault(g.group(1), {})[g.group(2)] = value
      continue
    g = re.match(r'^(blocks\.(\d+)\.mlp\.)fc2\.', key)
    if g and f'blocks.{g.group(2)}.mlp.fc1_g.weight' in state:  # SwiGLU's out linear
      key = g.group(1) + 'w3.' + key[g.end() :]
    for pattern, repl in _TIMM_RENAMES:
      key = re.sub(pattern, repl, key)
    out[key] = value
  for key in [k for k in out if re.match(r'^blocks\.\d+\.attn\.qkv\.weight$', k)]:
    i = key.split('.')[1]
    dim = to_numpy(out[key]).shape[0] // 3
    bias = _qkv_bias(i, biases.get(i, {}), dim, template_bias, problems)
    if bias is not None:
      out[f'blocks.{i}.attn.qkv.bias'] = bias
  if 'mask_token' not in out and 'storage_tokens' in out:  # timm drops it; Meta inits zeros
    out['mask_token'] = np.zeros((1, to_numpy(out['storage_tokens']).shape[-1]), np.float32)
  return out


def _check_buffers(state: dict, problems: list) -> dict:
  """Meta's hub state without its buffers, each checked (see the module doc)."""
  out = {}
  for key, value in state.items():
    if key == 'rope_embed.periods':
      _check_periods(to_numpy(value), state, problems)
    elif key.endswith('.attn.qkv.bias_mask'):
      mask = to_numpy(value)
      d = mask.shape[0] // 3
      want = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)])
      if np.all(np.isfinite(mask)) and not np.array_equal(mask, want):
        problems.append(f'{key}: not the key mask [1, 0, 1] per third')
    elif not key.startswith('local_cls_norm.'):
      out[key] = value
  for key in [k for k in out if k.endswith('.attn.qkv.bias')]:
    bias = to_numpy(out[key]).copy()
    d = bias.shape[0] // 3
    bias[d : 2 * d] = 0.0
    out[key] = bias
  return out


def _check_periods(periods: np.ndarray, state: Mapping[str, Any], problems: list) -> None:
  """`rope_embed.periods` must be base-100 periods of the checkpoint's head width."""
  head_dim = 4 * periods.shape[0]
  k = np.arange(periods.shape[0], dtype=np.float64)
  want = ROPE_BASE ** (2.0 * k / (head_dim // 2))
  if not np.allclose(periods, want, rtol=_BF16_RTOL, atol=0.0):
    problems.append(
      f'rope_embed.periods: {np.round(periods[:4], 4).tolist()}... are not the base-100 RoPE'
      f' periods {np.round(want[:4], 4).tolist()}... of head width {head_dim}'
    )


def to_hub_names(state: Mapping[str, Any], params: Mapping[str, Any], layout: str) -> dict:
  """Renames a state dict of `layout` to Meta's hub names, buffers checked and dropped.

  Raises:
    ConversionError: on a bad buffer or a non-zero key bias.
  """
  bias = 'bias' in params.get('blocks_0', {}).get('attn', {}).get('qkv', {})
  problems: list[str] = []
  if layout == 'dinov3':
    out = dict(state)
  elif layout == 'timm_dinov3':
    out = _from_timm(state, bias, problems)
  elif layout == 'hf_dinov3':
    out = _from_hf(state, bias, problems)
  else:
    raise ValueError(f'layout={layout!r} must be one of {", ".join(LAYOUTS)}')
  out = _check_buffers(out, problems)
  if problems:
    raise ConversionError(
      f'DINOv3 weights (layout {layout!r}) do not fit the model:\n  ' + '\n  '.join(problems)
    )
  return out


def convert_state_dict(
  state: Mapping[str, Any], template: Mapping[str, Any], layout: str
) -> dict[str, Any]:
  """Fills the encoder `template`'s params from a state dict of `layout`.

  Args:
    state: key -> tensor or array.
    template: `{'params': ...}` of the encoder (arrays or `ShapeDtypeStruct`s).
    layout: `dinov3`, `timm_dinov3` or `hf_dinov3`.

  Returns:
    `{'params': ...}` of float32 numpy arrays shaped like `template`.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  params = template['params']
  return fill_params(to_hub_names(state, params, layout), params, layout)


def detect(state: Mapping[str, Any]) -> str | None:
  """The DINOv3 layout the keys look like, or None."""
  keys = set(state)
  if any(re.match(r'^(model\.)?layer\.\d+\.attention\.[qkv]_proj\.', k) for k in keys):
    return 'hf_dinov3'
  if 'blocks.0.attn.qkv.weight' in keys and 'pos_embed' not in keys:
    if 'storage_tokens' in keys:
      return 'dinov3'
    if 'reg_token' in keys:
      return 'timm_dinov3'
  return None


def encoder_dims(state: Mapping[str, Any], layout: str) -> tuple[int, int, bool]:
  """`(dim, depth, swiglu)` of the encoder a state dict of `layout` holds."""
  state = to_hub_names(state, {}, layout)
  if 'cls_token' not in state:
    raise ConversionError('no cls_token in the state dict; pass backbone=')
  dim = int(to_numpy(state['cls_token']).shape[-1])
  blocks = {int(g.group(1)) for k in state if (g := re.match(r'blocks\.(\d+)\.', k))}
  return dim, (max(blocks) + 1 if blocks else 0), 'blocks.0.mlp.w1.weight' in state


def num_classes_of(state: Mapping[str, Any], layout: str) -> int:
  """DINOv3 layouts are encoder weights: they hold no classifier."""
  raise ConversionError(f'layout {layout!r} holds encoder weights only; pass num_classes=')
