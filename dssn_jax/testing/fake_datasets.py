"""Tiny dataset trees in each supported layout, for tests and benchmarks.

Images are small, of mixed sizes (some non-square, some smaller than the
crops the tests use), with grayscale JPEGs among them; masks are palette
PNGs (PASCAL, as VOC ships them) or grayscale PNGs, with 255 borders.
"""

from __future__ import annotations

import io
import os

import ml_collections
import numpy as np
from PIL import Image

from dssn_jax import config_lib
from dssn_jax.data import classes

# (height, width): non-square, and some below a 48-pixel crop.
SIZES = ((40, 60), (64, 48), (30, 30), (72, 96), (50, 37), (96, 64))


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A smooth random RGB image (compresses like a photo)."""
  small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _mask(rng: np.random.Generator, h: int, w: int, num_classes: int) -> np.ndarray:
  """Blocky class ids with a 255 border around one block (as VOC outlines)."""
  mask = np.zeros((h, w), np.uint8)
  for _ in range(3):
    c = int(rng.integers(0, num_classes))
    y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
    y1, x1 = int(rng.integers(y0 + 4, h + 1)), int(rng.integers(x0 + 4, w + 1))
    mask[y0:y1, x0:x1] = c
    mask[y0, x0:x1] = 255
  return mask


def save_image(path: str, image: np.ndarray, gray: bool = False) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(image)
  if gray:
    img = img.convert('L')
  img.save(path, quality=95) if path.endswith('.jpg') else img.save(path)


def save_mask(path: str, mask: np.ndarray, palette: bool) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(mask, mode='L')
  if palette:
    img = img.convert('P')
    colors = np.zeros((256, 3), np.uint8)
    colors[:21] = classes.voc_colormap(21)
    colors[255] = (224, 224, 192)
    img.putpalette(colors.reshape(-1).tolist())
  img.save(path)


def write_lines(path: str, lines) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def make_pascal(
  base: str, *, n_labeled=4, n_unlabeled=10, n_val=3, split='92', seed=0, sizes=SIZES
) -> tuple[str, str]:
  """A VOC tree: JPEGImages/, SegmentationClass/ (palette PNGs) and splits.

  Returns `(root, splits_dir)`; every third image (1, 4, ...) is a
  grayscale JPEG.
  """
  rng = np.random.default_rng(seed)
  root, splits = os.path.join(base, 'VOC2012'), os.path.join(base, 'splits', 'pascal')
  lines = []
  for i in range(n_labeled + n_unlabeled + n_val):
    h, w = sizes[i % len(sizes)]
    name = f'2007_{i:06d}'
    save_image(os.path.join(root, 'JPEGImages', f'{name}.jpg'), _image(rng, h, w), gray=i % 3 == 1)
    save_mask(
      os.path.join(root, 'SegmentationClass', f'{name}.png'), _mask(rng, h, w, 21), palette=True
    )
    lines.append(f'JPEGImages/{name}.jpg SegmentationClass/{name}.png')
  write_lines(os.path.join(splits, split, 'labeled.txt'), lines[:n_labeled])
  write_lines(
    os.path.join(splits, split, 'unlabeled.txt'), lines[n_labeled : n_labeled + n_unlabeled]
  )
  write_lines(os.path.join(splits, 'val.txt'), lines[n_labeled + n_unlabeled :])
  return root, splits


def make_cityscapes(
  base: str,
  *,
  n_labeled=3,
  n_unlabeled=4,
  n_val=2,
  split='1_16',
  raw_ids_for=(1,),
  seed=0,
  sizes=SIZES,
) -> tuple[str, str]:
  """A Cityscapes tree with PNG images and labelTrainIds masks.

  Examples whose index is in `raw_ids_for` only have a raw `_labelIds.png`
  (ids, not train ids) while the split lists `_labelTrainIds.png`.
  """
  rng = np.random.default_rng(seed)
  root, splits = os.path.join(base, 'cityscapes'), os.path.join(base, 'splits', 'cityscapes')
  inverse = {t: i for i, t in classes.CITYSCAPES_ID_TO_TRAIN_ID.items()}
  lines = []
  for i in range(n_labeled + n_unlabeled + n_val):
    folder = 'val' if i >= n_labeled + n_unlabeled else 'train'
    h, w = sizes[i % len(sizes)]
    name = f'aachen_{i:06d}_000019'
    image = f'leftImg8bit/{folder}/aachen/{name}_leftImg8bit.png'
    mask_rel = f'gtFine/{folder}/aachen/{name}_gtFine_labelTrainIds.png'
    save_image(os.path.join(root, image), _image(rng, h, w))
    train_ids = _mask(rng, h, w, 19)
    if i in raw_ids_for:
      raw = np.vectorize(lambda t: inverse.get(int(t), 0))(train_ids).astype(np.uint8)
      save_mask(
        os.path.join(root, mask_rel.replace('labelTrainIds', 'labelIds')), raw, palette=False
      )
    else:
      save_mask(os.path.join(root, mask_rel), train_ids, palette=False)
    lines.append(f'{image} {mask_rel}')
  write_lines(os.path.join(splits, split, 'labeled.txt'), lines[:n_labeled])
  write_lines(
    os.path.join(splits, split, 'unlabeled.txt'), lines[n_labeled : n_labeled + n_unlabeled]
  )
  write_lines(os.path.join(splits, 'val.txt'), lines[n_labeled + n_unlabeled :])
  return root, splits


def make_coco(
  base: str, *, n_labeled=3, n_unlabeled=4, n_val=2, split='1_512', seed=0
) -> tuple[str, str]:
  """UniMatch's COCO layout: train2017/, val2017/, masks/ (81 classes)."""
  rng = np.random.default_rng(seed)
  root, splits = os.path.join(base, 'coco'), os.path.join(base, 'splits', 'coco')
  lines = []
  for i in range(n_labeled + n_unlabeled + n_val):
    folder = 'val2017' if i >= n_labeled + n_unlabeled else 'train2017'
    h, w = SIZES[i % len(SIZES)]
    name = f'{i:012d}'
    save_image(os.path.join(root, folder, f'{name}.jpg'), _image(rng, h, w), gray=i == 2)
    save_mask(os.path.join(root, 'masks', f'{name}.png'), _mask(rng, h, w, 81), palette=False)
    lines.append(f'{folder}/{name}.jpg masks/{name}.png')
  write_lines(os.path.join(splits, split, 'labeled.txt'), lines[:n_labeled])
  write_lines(
    os.path.join(splits, split, 'unlabeled.txt'), lines[n_labeled : n_labeled + n_unlabeled]
  )
  write_lines(os.path.join(splits, 'val.txt'), lines[n_labeled + n_unlabeled :])
  return root, splits


def make_ade20k(
  base: str, *, n_labeled=3, n_unlabeled=4, n_val=2, split='1_64', raw=False, seed=0
) -> tuple[str, str]:
  """UniMatch V2's ADE20K layout: images/{training,validation}/ADE_*.jpg,
  annotations/... (150 classes). `raw=True` writes the official convention
  (0 = ignore, classes 1..150) instead of the authors' train ids and 255."""
  rng = np.random.default_rng(seed)
  root, splits = os.path.join(base, 'ade20k'), os.path.join(base, 'splits', 'ade20k')
  lines = []
  for i in range(n_labeled + n_unlabeled + n_val):
    val = i >= n_labeled + n_unlabeled
    folder = 'validation' if val else 'training'
    name = f'ADE_{"val" if val else "train"}_{i:08d}'
    h, w = SIZES[i % len(SIZES)]
    mask = _mask(rng, h, w, 150)
    mask[0, 0] = 149  # the last class occurs
    if raw:
      mask = np.where(mask == 255, 0, mask + 1).astype(np.uint8)
    save_image(os.path.join(root, 'images', folder, f'{name}.jpg'), _image(rng, h, w))
    save_mask(os.path.join(root, 'annotations', folder, f'{name}.png'), mask, palette=False)
    lines.append(f'images/{folder}/{name}.jpg annotations/{folder}/{name}.png')
  write_lines(os.path.join(splits, split, 'labeled.txt'), lines[:n_labeled])
  write_lines(
    os.path.join(splits, split, 'unlabeled.txt'), lines[n_labeled : n_labeled + n_unlabeled]
  )
  write_lines(os.path.join(splits, 'val.txt'), lines[n_labeled + n_unlabeled :])
  return root, splits


def make_folder(base: str, *, n_labeled=3, n_unlabeled=5, n_val=2, num_classes=4, seed=0) -> str:
  """A user's folders: images/ + masks/ (nested), unlabeled/ without masks, val."""
  rng = np.random.default_rng(seed)
  root = os.path.join(base, 'mydata')
  for i in range(n_labeled + n_val):
    kind = 'train' if i < n_labeled else 'val'
    h, w = SIZES[i % len(SIZES)]
    sub = 'a' if i % 2 else 'b'
    save_image(os.path.join(root, kind, 'images', sub, f'img{i}.png'), _image(rng, h, w))
    save_mask(
      os.path.join(root, kind, 'masks', sub, f'img{i}_mask.png'),
      _mask(rng, h, w, num_classes),
      palette=False,
    )
  for i in range(n_unlabeled):
    h, w = SIZES[i % len(SIZES)]
    save_image(os.path.join(root, 'unlabeled', f'u{i}.jpg'), _image(rng, h, w), gray=i == 0)
  return root


def config_for(
  name: str, root: str = '', splits_dir: str = '', **data
) -> ml_collections.ConfigDict:
  """A small-crop config for a generated tree (`data` overrides config.data)."""
  c = config_lib.base_config()
  c.data.name = name
  c.data.root = root
  c.data.splits_dir = splits_dir
  c.data.num_classes = {'pascal': 21, 'cityscapes': 19, 'coco': 81, 'ade20k': 150}.get(name, 4)
  c.data.split = {'pascal': '92', 'cityscapes': '1_16', 'coco': '1_512', 'ade20k': '1_64'}.get(
    name, ''
  )
  c.data.crop_size = 48
  c.data.batch_size = 2
  c.data.workers = 0
  c.data.prefetch = 1
  if name == 'folder':
    c.data.folder.labeled_images = 'train/images'
    c.data.folder.labeled_masks = 'train/masks'
    c.data.folder.unlabeled_images = 'unlabeled'
    c.data.folder.val_images = 'val/images'
    c.data.folder.val_masks = 'val/masks'
    c.data.folder.mask_suffix = '_mask.png'
  for key, value in data.items():
    c.data[key] = value
  return c


def png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'PNG')
  return buf.getvalue()
