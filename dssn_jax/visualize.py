"""A grid of predictions as a PNG, with numpy and PIL only (no matplotlib).

One row per image, columns `image | ground truth | <one per model>` (e.g.
teacher, student), a title over each column and, below the rows, a legend of
the classes that occur in the shown masks (colour swatch + name). Masks are
drawn in the dataset's palette; the ignore label in a neutral light grey.
Every panel is scaled to fit a `cell` x `cell` square (nearest neighbour for
masks, bilinear for images), so the figure's size does not depend on the
images'.

The training loop writes `DIR/predictions.png` at the end of a run and adds
the grid to TensorBoard at every evaluation (`config.train.prediction_grid`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOUR = (220, 220, 220)  # the ignore label: light grey
_CANVAS = (255, 255, 255)
_TEXT = (0, 0, 0)
_PAD = 4  # pixels between panels and around the figure
_SWATCH = 10


def colour_masks(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """Class map `(H, W)` -> uint8 `(H, W, 3)` in `palette`; `ignore_index`
  (and any id the palette lacks) in `IGNORE_COLOUR`."""
  palette = np.asarray(palette, np.uint8)
  table = np.tile(np.asarray(IGNORE_COLOUR, np.uint8), (256, 1))
  n = min(len(palette), 256)
  table[:n] = palette[:n]
  if 0 <= ignore_index < 256:
    table[ignore_index] = IGNORE_COLOUR
  mask = np.asarray(mask)
  return table[np.clip(mask, 0, 255).astype(np.int64)]


def _fit(panel: np.ndarray, cell: int, resample) -> Image.Image:
  """`panel` scaled (aspect kept) to fit `cell` x `cell`, centred on the canvas."""
  im = Image.fromarray(np.ascontiguousarray(panel, np.uint8))
  h, w = panel.shape[:2]
  scale = cell / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  if size != (w, h):
    im = im.resize(size, resample)
  out = Image.new('RGB', (cell, cell), _CANVAS)
  out.paste(im, ((cell - size[0]) // 2, (cell - size[1]) // 2))
  return out


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def _legend_rows(masks, palette, class_names, ignore_index: int, width: int, probe, font):
  """The legend laid out in rows of `(colour, name, x)`: the classes present
  in the shown masks (and the ignore label), wrapped at `width`."""
  present = np.unique(np.concatenate([np.unique(np.asarray(m)) for m in masks]))
  entries = [
    (tuple(int(c) for c in palette[i]), str(class_names[i]))
    for i in present
    if 0 <= i < min(len(palette), len(class_names)) and i != ignore_index
  ]
  if ignore_index in present:
    entries.append((IGNORE_COLOUR, 'ignore'))
  rows: list[list[tuple[tuple[int, ...], str, int]]] = [[]]
  x = _PAD
  for colour, name in entries:
    w = _SWATCH + 3 + _text_size(probe, name, font)[0] + 2 * _PAD
    if rows[-1] and x + w > width:
      rows.append([])
      x = _PAD
    rows[-1].append((colour, name, x))
    x += w
  return rows


def prediction_grid(
  images: Sequence[np.ndarray],
  labels: Sequence[np.ndarray],
  predictions: Mapping[str, Sequence[np.ndarray]],
  palette: np.ndarray,
  class_names: Sequence[str],
  *,
  ignore_index: int = 255,
  cell: int = 96,
) -> np.ndarray:
  """The grid as uint8 `(H, W, 3)`.

  Args:
    images: uint8 `(h, w, 3)` per row.
    labels: ground-truth class maps `(h, w)` per row (`ignore_index` allowed).
    predictions: `{column title: [class map per row]}`, in column order.
    palette: `(num_classes, 3)` uint8 colours, indexed by class id.
    class_names: names indexed by class id (the legend).
    ignore_index: the label drawn in `IGNORE_COLOUR`.
    cell: side of each panel in pixels.
  """
  rows = len(images)
  if rows == 0 or len(labels) != rows:
    raise ValueError(f'{rows} images and {len(labels)} labels: need one label per image, >= 1')
  for title, masks in predictions.items():
    if len(masks) != rows:
      raise ValueError(f'{len(masks)} {title} predictions for {rows} images')
  palette = np.asarray(palette, np.uint8)
  titles = ['image', 'ground truth', *predictions]
  font = ImageFont.load_default()
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  line_h = max(_text_size(probe, t, font)[1] for t in [*titles, 'Ag']) + 2

  width = _PAD + len(titles) * (cell + _PAD)
  masks = [*labels, *(m for ms in predictions.values() for m in ms)]
  legend_rows = _legend_rows(masks, palette, class_names, ignore_index, width, probe, font)
  legend_h = len(legend_rows) * (max(line_h, _SWATCH) + 2) + _PAD if legend_rows[0] else 0
  top = _PAD + line_h
  height = top + rows * (cell + _PAD) + legend_h

  canvas = Image.new('RGB', (width, height), _CANVAS)
  draw = ImageDraw.Draw(canvas)
  for j, title in enumerate(titles):
    tw = _text_size(draw, title, font)[0]
    draw.text(
      (_PAD + j * (cell + _PAD) + (cell - tw) // 2, _PAD // 2), title, fill=_TEXT, font=font
    )
  for i in range(rows):
    image = np.asarray(images[i])
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'image {i} must be (h, w, 3), got shape {image.shape}')
    panels = [_fit(image, cell, Image.BILINEAR)]
    for mask in [labels[i], *(ms[i] for ms in predictions.values())]:
      panels.append(_fit(colour_masks(mask, palette, ignore_index), cell, Image.NEAREST))
    y = top + i * (cell + _PAD)
    for j, panel in enumerate(panels):
      canvas.paste(panel, (_PAD + j * (cell + _PAD), y))
  y = top + rows * (cell + _PAD)
  for row in legend_rows:
    for colour, name, x in row:
      draw.rectangle([x, y + 1, x + _SWATCH - 1, y + _SWATCH], fill=colour, outline=(96, 96, 96))
      draw.text((x + _SWATCH + 3, y), name, fill=_TEXT, font=font)
    y += max(line_h, _SWATCH) + 2
  return np.asarray(canvas)


def predictions_npz(
  images: Sequence[np.ndarray], labels: Sequence[np.ndarray], predictions: Mapping[str, Sequence]
) -> bytes:
  """The grid's inputs as `.npz` bytes: `images` uint8 `(N, H, W, 3)`,
  `labels` and one int32 `(N, H, W)` array per model (`DIR/predictions.npz`,
  which benchmarks/semi_vs_supervised.py draws side by side across runs)."""
  arrays = {'images': np.stack(images), 'labels': np.stack(labels).astype(np.int32)}
  arrays.update({k: np.stack(v).astype(np.int32) for k, v in predictions.items()})
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  return buf.getvalue()


def png_bytes(grid: np.ndarray) -> bytes:
  """The grid as PNG bytes (optimized)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(grid, np.uint8)).save(buf, format='PNG', optimize=True)
  return buf.getvalue()
