"""A serialized segmenter (`--to stablehlo`): the file and its loader.

The file is a zip archive:

    meta.json           format, class names, palette, the pretrained weights'
                        licence, the model and the settings it was made with,
                        the image sizes and platforms
    weights.npz         the model's variables, flattened (`w0000`, `w0001`, ...)
    program_HxW.bin     per image size: `jax.export`'s serialized StableHLO of
                        `(weights, uint8 (b, H, W, 3)) -> int32 (b, H, W)`,
                        b symbolic

`load(path)(images)` runs it with jax alone: this module imports neither
the model code nor the config of dssn_jax (a fresh process that loads a
file never imports `dssn_jax.models`).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

FORMAT = 'dssn_jax.export/stablehlo/1'
META = 'meta.json'
WEIGHTS = 'weights.npz'


def program_name(height: int, width: int) -> str:
  return f'program_{int(height)}x{int(width)}.bin'


def weight_name(i: int) -> str:
  return f'w{i:04d}'


def write(
  path: str, meta: dict[str, Any], weights: Sequence[np.ndarray], programs: dict[str, bytes]
) -> str:
  """Writes the archive; `programs` maps `program_name(h, w)` -> serialized bytes."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **{weight_name(i): np.asarray(w) for i, w in enumerate(weights)})
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(META, json.dumps(dict(meta, format=FORMAT), indent=1))
    z.writestr(WEIGHTS, buffer.getvalue())
    for name, blob in programs.items():
      z.writestr(name, blob)
  return path


class Segmenter:
  """A loaded export: `segmenter(images) -> masks`.

  Attributes:
    meta: everything `meta.json` holds.
    class_names: one name per class id.
    palette: uint8 `(num_classes, 3)`, the dataset's colours.
    sizes: the `(height, width)` images it takes.
  """

  def __init__(self, meta: dict[str, Any], weights: list[np.ndarray], programs: dict):
    self.meta = meta
    self.class_names = tuple(meta['class_names'])
    self.palette = np.asarray(meta['palette'], np.uint8)
    self.sizes = tuple(tuple(s) for s in programs)
    self._weights = jax.device_put(weights)
    self._fns = {size: jax.jit(exported.call) for size, exported in programs.items()}

  def __call__(self, images) -> np.ndarray:
    """uint8 `(H, W, 3)` or `(B, H, W, 3)` RGB -> int32 class ids `(H, W)` or
    `(B, H, W)`; `(H, W)` must be one of `sizes`."""
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.shape[-1] != 3:
      raise ValueError(f'images must be (H, W, 3) or (B, H, W, 3) RGB, got shape {images.shape}')
    if batch.dtype != np.uint8:
      raise ValueError(f'images must be uint8 RGB in 0..255, got {batch.dtype}')
    size = tuple(batch.shape[1:3])
    if size not in self._fns:
      have = ', '.join(f'{h}x{w}' for h, w in self.sizes)
      raise ValueError(
        f'this export takes images of {have} (height x width), got {size[0]}x{size[1]}'
      )
    masks = np.asarray(self._fns[size](self._weights, batch))
    return masks[0] if single else masks


def load(path: str) -> Segmenter:
  """Reads an export written by `python -m dssn_jax.export --to stablehlo`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no export file {path}')
  try:
    z = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise ValueError(f'{path} is not a dssn_jax StableHLO export (not a zip archive)') from None
  with z:
    names = set(z.namelist())
    if META not in names or WEIGHTS not in names:
      raise ValueError(f'{path} is not a dssn_jax StableHLO export (no {META} / {WEIGHTS})')
    meta = json.loads(z.read(META))
    if meta.get('format') != FORMAT:
      raise ValueError(f'{path}: format {meta.get("format")!r}, this loader reads {FORMAT}')
    with np.load(io.BytesIO(z.read(WEIGHTS)), allow_pickle=False) as data:
      weights = [data[weight_name(i)] for i in range(len(data.files))]
    programs = {
      (int(h), int(w)): jax.export.deserialize(bytearray(z.read(program_name(h, w))))
      for h, w, *_ in meta['sizes']  # [height, width, 'whole' | 'sliding']
    }
  return Segmenter(meta, weights, programs)
