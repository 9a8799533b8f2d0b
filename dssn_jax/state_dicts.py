"""Generic helpers for PyTorch and safetensors weights: reading files,
walking nested variables, and the one report of keys that do not fit.

Every family's conversion (`models.resnet_weights`, `models.dinov2_weights`)
and the conversion CLI (`python -m dssn_jax.convert`) build on these.

`.pth` files are read with `torch.load(..., weights_only=True)` (a pickle
from the internet can run code); torch is imported only when a `.pth` is
read (the `convert` extra). `.safetensors` files (Hugging Face) are read
with `safetensors.numpy`, without torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from dssn_jax import hf_hub
from dssn_jax.errors import ConversionError

__all__ = [
  'ConversionError',
  'flatten',
  'set_path',
  'to_numpy',
  'strip_prefix',
  'strip_module_prefix',
  'mismatch_error',
  'read_file',
  'read_state_dict',
  'save_npz',
  'load_npz',
]


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple]:
  """`(path, leaf)` of every leaf of a nested mapping, paths as key tuples."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  """`tree[path[0]][path[1]]... = value`, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_numpy(value) -> np.ndarray:
  """A torch tensor (floats as float32) or array-like as a numpy array."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """`state` without `prefix` on its keys, if every key has it; else unchanged."""
  state = dict(state)
  if state and all(k.startswith(prefix) for k in state):
    return {k[len(prefix) :]: v for k, v in state.items()}
  return state


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the `module.` prefix DistributedDataParallel adds to every key."""
  return strip_prefix(state, 'module.')


def mismatch_error(
  layout: str, missing: list[str], unexpected: list[str], misshaped: list[str]
) -> ConversionError | None:
  """One error listing every missing, unexpected and mis-shaped key, or None."""
  if not (missing or unexpected or misshaped):
    return None
  lines = [f'state dict does not match the model (layout {layout!r}):']
  for title, keys in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
    if keys:
      lines.append(f'  {len(keys)} {title} key(s):')
      lines.extend(f'    {k}' for k in keys)
  return ConversionError('\n'.join(lines))


def read_file(path: str | os.PathLike) -> Any:
  """What a weights file holds: `.safetensors` as numpy arrays (no torch),
  anything else with `torch.load(..., weights_only=True)` (a state dict or a
  whole checkpoint dict)."""
  path = os.fspath(path)
  if hf_hub.is_name(path):  # hf:ORG/REPO: its model.safetensors in the Hugging Face cache
    path = hf_hub.resolve(path)
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


def save_npz(variables: Mapping[str, Any], path: str) -> str:
  """Saves `{'params', 'batch_stats'}` as `.npz` with keys like `params/a/b/kernel`."""
  flat = {'/'.join(p): np.asarray(v) for p, v in flatten(variables)}
  if not path.endswith('.npz'):
    path += '.npz'
  np.savez(path, **flat)
  return path


def load_npz(path: str) -> dict[str, Any]:
  """Reads a `save_npz` file back into nested `{'params', 'batch_stats'}`."""
  out: dict[str, Any] = {}
  with np.load(path, allow_pickle=False) as data:
    for key in data.files:
      set_path(out, tuple(key.split('/')), data[key])
  if 'params' not in out:
    raise ConversionError(f'{path} holds no params/... arrays; keys: {sorted(out)}')
  return out
