"""Datasets as random-access record sources, one per split.

`datasets.get_source(config, split)` with `split` in `labeled | unlabeled | val`
returns a picklable object with `__len__`, `__getitem__` and `__repr__` (what
grain's `MapDataset.source` and its worker processes need). Records are

    {'image': uint8 (H, W, 3) RGB, 'mask': uint8 (H, W) class ids, 'id': str}

and unlabeled records have no `mask`: unlabeled images never need one.
Masks hold train ids in `[0, num_classes)` and 255 (ignore).

The builders of the shared layouts live here, and the datasets of these
layouts register here (`dssn_jax.data.datasets`: name -> source builder,
classes, palette, splits); `ade20k` and `digits` register in their own
modules. `datasets.get_source(config, split)` is the entry point.
Layouts (`config.data.name`):

- `pascal`, `cityscapes`, `coco`, `ade20k`: `config.data.root` plus the UniMatch/DSSN
  split files under `config.data.splits_dir`: `<split>/labeled.txt`,
  `<split>/unlabeled.txt` and `val.txt`, one `image_path mask_path` pair per
  line, relative to the root (`JPEGImages/x.jpg SegmentationClass/x.png`,
  `leftImg8bit/... gtFine/..._labelTrainIds.png`, `train2017/x.jpg
  masks/x.png`, `images/training/x.jpg annotations/training/x.png`). Cityscapes masks may also be raw `_labelIds.png` files
  (mapped to the 19 train ids); a listed `_labelTrainIds.png` that does not
  exist falls back to its `_labelIds.png` sibling.
- `folder`: directories of images and masks matched by relative path and
  stem (`config.data.folder.*`); unlabeled images come from a directory or a
  list file and need no masks.
- `tfds`: a prepared TFDS dataset read with `tfds.data_source` (ArrayRecord,
  no TensorFlow); the first `num_labeled` examples of the train split are
  labeled and the rest unlabeled (all of it both when `num_labeled` is 0).
- `digits`: the embedded synthetic dataset (`dssn_jax.data.digits`).

Every problem with the data raises `DatasetError` naming the file and the
split line (or directory, or TFDS example) it came from.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import cv2
import ml_collections
import numpy as np
from PIL import Image

from dssn_jax.cli import UserError
from dssn_jax.data import classes, datasets

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
IGNORE = 255


class DatasetError(UserError, ValueError):
  """Bad data: the message names the file and where it was listed."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One example of a file-based split.

  Attributes:
    image: path of the image file.
    mask: path of the mask file, or None (unlabeled).
    origin: where the example was listed, e.g. `splits/92/labeled.txt:17`.
    id: the example's name (the image path as written in the split).
    label_map: '' or the name of a lookup table applied to the mask
      (`cityscapes`: labelIds -> train ids).
  """

  image: str
  mask: str | None
  origin: str
  id: str
  label_map: str = ''


# ----------------------------------------------------------------------------
# Decoding and validation.


def read_image(path: str, origin: str) -> np.ndarray:
  """Decodes an image file to uint8 RGB `(H, W, 3)`.

  Grayscale and palette images become three equal channels. EXIF orientation
  is ignored, as PIL's `Image.open(...).convert('RGB')` does, so masks stay
  aligned. A truncated JPEG is an error, as it is for PIL (the reference's
  decoder): OpenCV would decode its first part and fill the rest with grey.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise DatasetError(f'image {path} does not exist (listed at {origin})') from None
  except OSError as e:
    raise DatasetError(f'cannot read image {path} (listed at {origin}): {e}') from None
  if truncated_jpeg(data):
    raise DatasetError(
      f'image {path} (listed at {origin}) is a truncated JPEG ({len(data)} bytes, no'
      ' end-of-image marker after its last scan); restore or replace the file'
    )
  image = cv2.imdecode(
    np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
  )
  if image is not None:
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  try:  # formats OpenCV cannot decode (e.g. GIF)
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(
      f'cannot read image {path} (listed at {origin}): {type(e).__name__}: {e}'
    ) from None


def truncated_jpeg(data: bytes) -> bool:
  """Whether `data` is a JPEG cut short: no end-of-image marker (FFD9) after
  its last start-of-scan (FFDA). Entropy-coded data never holds FF followed
  by D9 or DA, so a file cut inside a scan has neither after the scan's start;
  metadata before the first scan (an EXIF thumbnail's markers) comes earlier."""
  if data[:2] != b'\xff\xd8':
    return False
  return data.rfind(b'\xff\xd9') < data.rfind(b'\xff\xda')


def read_mask(path: str, origin: str) -> np.ndarray:
  """Decodes a mask file to uint8 `(H, W)` class ids.

  Palette PNGs give their indices (VOC's `SegmentationClass`), grayscale
  PNGs their values. A color mask whose channels are all equal is accepted;
  any other color mask is an error (masks hold class ids, not colors).
  """
  if not os.path.exists(path):
    raise DatasetError(f'mask {path} does not exist (listed at {origin})')
  try:
    with Image.open(path) as img:
      mode = img.mode
      mask = np.asarray(img)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(
      f'cannot read mask {path} (listed at {origin}): {type(e).__name__}: {e}'
    ) from None
  if mask.ndim == 3:
    if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, min(3, mask.shape[2]))):
      raise DatasetError(
        f'mask {path} (listed at {origin}) is a color image (mode {mode}); masks must '
        'hold class ids (palette or grayscale PNG)'
      )
    mask = mask[..., 0]
  if mask.dtype != np.uint8:
    if mask.dtype == bool:
      mask = mask.astype(np.uint8)
    else:
      values = np.unique(mask)
      bad = values[(values < 0) | (values > 255)]
      if bad.size:
        raise DatasetError(
          f'mask {path} (listed at {origin}) has values {bad[:10].tolist()} outside '
          f'0..255 (mode {mode})'
        )
      mask = mask.astype(np.uint8)
  return np.ascontiguousarray(mask)


def check_mask_values(mask: np.ndarray, num_classes: int, path: str, origin: str) -> None:
  """Raises unless every value is a class id in `[0, num_classes)` or 255."""
  if not mask.size or int(mask.max()) < num_classes:
    return
  if not np.any((mask >= num_classes) & (mask != IGNORE)):
    return
  values = np.unique(mask)
  bad = values[(values >= num_classes) & (values != IGNORE)]
  raise DatasetError(
    f'mask {path} (listed at {origin}) has values {bad[:20].tolist()} outside '
    f'[0, {num_classes}) and {IGNORE}; check config.data.num_classes={num_classes} '
    'and the label mapping'
  )


def check_same_size(
  image: np.ndarray, mask: np.ndarray, image_path: str, mask_path: str, origin: str
) -> None:
  if image.shape[:2] != mask.shape[:2]:
    raise DatasetError(
      f'image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but mask '
      f'{mask_path} is {mask.shape[1]}x{mask.shape[0]} (listed at {origin})'
    )


def parse_label_map(spec: str) -> np.ndarray | None:
  """`'cityscapes'` or `'src:dst,...'` -> a `(256,)` uint8 lookup table.

  Values not named map to themselves. '' means no mapping (None).
  """
  spec = (spec or '').strip()
  if not spec:
    return None
  if spec == 'cityscapes':
    return classes.cityscapes_label_lut()
  lut = np.arange(256, dtype=np.uint8)
  for part in spec.split(','):
    part = part.strip()
    if not part:
      continue
    try:
      src, dst = (int(v) for v in part.split(':'))
    except ValueError:
      raise ValueError(f'label map {spec!r}: {part!r} is not "src:dst" with integers') from None
    if not (0 <= src <= 255 and 0 <= dst <= 255):
      raise ValueError(f'label map {spec!r}: {part!r} values must be in 0..255')
    lut[src] = dst
  return lut


_LUTS = {'cityscapes': classes.cityscapes_label_lut()}


def register_label_map(name: str, lut: np.ndarray) -> None:
  """Makes `(256,)` uint8 table `lut` usable as an `Entry.label_map` named `name`."""
  lut = np.asarray(lut, np.uint8)
  if lut.shape != (256,):
    raise ValueError(f'label map {name!r} must be a (256,) table, got shape {lut.shape}')
  _LUTS[name] = lut


# ----------------------------------------------------------------------------
# File-based sources.


class FileSource:
  """Records read from image (and mask) files listed in `entries`.

  Args:
    entries: the examples, in split order.
    num_classes: masks must hold ids in `[0, num_classes)` or 255.
    with_mask: read and validate masks (labeled and val splits).
    description: for `repr` and messages, e.g. `pascal/92/labeled`.
  """

  def __init__(
    self, entries: Sequence[Entry], *, num_classes: int, with_mask: bool, description: str
  ):
    self._entries = list(entries)
    self._num_classes = int(num_classes)
    self._with_mask = with_mask
    self._description = description

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    kind = 'images+masks' if self._with_mask else 'images'
    return f'FileSource({self._description}, {len(self._entries)} {kind})'

  @property
  def entries(self) -> list[Entry]:
    return self._entries

  def __getitem__(self, index: int) -> dict[str, Any]:
    entry = self._entries[index]
    image = read_image(entry.image, entry.origin)
    record = {'image': image, 'id': entry.id}
    if self._with_mask:
      mask = read_mask(entry.mask, entry.origin)
      if entry.label_map:
        mask = _LUTS[entry.label_map][mask]
      check_same_size(image, mask, entry.image, entry.mask, entry.origin)
      check_mask_values(mask, self._num_classes, entry.mask, entry.origin)
      record['mask'] = mask
    return record


def read_split_file(path: str, root: str, *, with_mask: bool, label_map_fn=None) -> list[Entry]:
  """Parses a split file of `image_path [mask_path]` lines relative to `root`.

  Args:
    path: the split file.
    root: the directory the listed paths are relative to.
    with_mask: each line must name a mask (labeled, val). Otherwise a second
      field is allowed and ignored (UniMatch's unlabeled lists name masks).
    label_map_fn: optional `(mask_path) -> (mask_path, label_map)` to resolve
      the listed mask file (Cityscapes labelIds fallback).
  Returns:
    One `Entry` per non-blank line.
  Raises:
    DatasetError: a malformed line, an empty file, or listed files that do
      not exist (all of them are named, with their lines).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'split file {path} does not exist')
  entries, missing = [], []
  with open(path) as f:
    lines = f.read().splitlines()
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    origin = f'{path}:{lineno}'
    fields = line.split()
    if len(fields) > 2 or (with_mask and len(fields) != 2):
      want = '"image_path mask_path"' if with_mask else '"image_path [mask_path]"'
      raise DatasetError(f'split file {origin}: malformed line {line!r}; expected {want}')
    image = os.path.join(root, fields[0])
    if not os.path.isfile(image):
      missing.append(f'image {image} does not exist (listed at {origin}: {line!r})')
    mask, label_map = None, ''
    if with_mask:
      mask = os.path.join(root, fields[1])
      if label_map_fn is not None:
        mask, label_map = label_map_fn(mask)
      if not os.path.isfile(mask):
        missing.append(f'mask {mask} does not exist (listed at {origin}: {line!r})')
    entries.append(
      Entry(
        image=image,
        mask=mask,
        origin=f'{origin} {line.strip()!r}',
        id=fields[0],
        label_map=label_map,
      )
    )
  if missing:
    more = f'\n  ... and {len(missing) - 10} more' if len(missing) > 10 else ''
    raise DatasetError(
      f'{len(missing)} files listed in {path} are missing:\n  ' + '\n  '.join(missing[:10]) + more
    )
  if not entries:
    raise DatasetError(f'split file {path} is empty')
  return entries


def cityscapes_mask(path: str) -> tuple[str, str]:
  """Resolves a Cityscapes mask path: train ids as is, raw labelIds mapped."""
  if path.endswith('_labelTrainIds.png') and not os.path.isfile(path):
    raw = path[: -len('_labelTrainIds.png')] + '_labelIds.png'
    if os.path.isfile(raw):
      return raw, 'cityscapes'
  if path.endswith('_labelIds.png'):
    return path, 'cityscapes'
  return path, ''


def _require_dir(value: str, key: str) -> str:
  if not value:
    raise ValueError(f'{key} is not set')
  if not os.path.isdir(value):
    raise FileNotFoundError(f'{key}={value!r} is not a directory')
  return value


def split_file_source(
  config: ml_collections.ConfigDict, split: str, *, label_map_fn=None
) -> FileSource:
  """The UniMatch/DSSN layout: `root` plus `splits_dir/<split>/{labeled,unlabeled}.txt`
  and `splits_dir/val.txt`; `label_map_fn` as in `read_split_file`."""
  data = config.data
  root = _require_dir(data.root, 'config.data.root')
  splits_dir = _require_dir(data.splits_dir, 'config.data.splits_dir')
  if split == 'val':
    path = os.path.join(splits_dir, 'val.txt')
  else:
    split_dir = os.path.join(splits_dir, str(data.split))
    if not os.path.isdir(split_dir):
      raise FileNotFoundError(f'config.data.split={data.split!r}: {split_dir} does not exist')
    path = os.path.join(split_dir, f'{split}.txt')
  with_mask = split != 'unlabeled'
  entries = read_split_file(path, root, with_mask=with_mask, label_map_fn=label_map_fn)
  return FileSource(
    entries,
    num_classes=data.num_classes,
    with_mask=with_mask,
    description=f'{data.name}/{data.split}/{split}' if split != 'val' else f'{data.name}/val',
  )


def _under_root(config, value: str) -> str:
  if not value or os.path.isabs(value):
    return value
  return os.path.join(config.data.root, value) if config.data.root else value


def _scan_images(directory: str, exclude_suffix: str = '') -> list[str]:
  """Relative paths of the image files under `directory`, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames.sort()
    for name in sorted(filenames):
      if name.lower().endswith(IMAGE_EXTENSIONS) and not (
        exclude_suffix and name.endswith(exclude_suffix)
      ):
        found.append(os.path.relpath(os.path.join(dirpath, name), directory))
  return found


def folder_source(config: ml_collections.ConfigDict, split: str) -> FileSource:
  f = config.data.folder
  keys = {
    'labeled': ('labeled_images', 'labeled_masks'),
    'val': ('val_images', 'val_masks'),
    'unlabeled': ('unlabeled_images', None),
  }[split]
  image_key, mask_key = keys
  images = _under_root(config, f[image_key])
  if not images:
    raise ValueError(f'config.data.folder.{image_key} is not set')
  entries = []
  if mask_key is None and os.path.isfile(images):
    # A list file: one image path per line (relative to the root); a second
    # field (UniMatch's unlabeled.txt) is ignored.
    entries = read_split_file(images, config.data.root, with_mask=False)
  else:
    _require_dir(images, f'config.data.folder.{image_key}')
    masks = (
      _require_dir(_under_root(config, f[mask_key]), f'config.data.folder.{mask_key}')
      if mask_key
      else None
    )
    same_dir = masks is not None and os.path.samefile(images, masks)
    rel_paths = _scan_images(images, f.mask_suffix if same_dir else '')
    if not rel_paths:
      raise DatasetError(
        f'config.data.folder.{image_key}: no images ({", ".join(IMAGE_EXTENSIONS)}) under {images}'
      )
    for rel in rel_paths:
      image = os.path.join(images, rel)
      origin = f'directory {images}'
      mask = None
      if masks is not None:
        mask = os.path.join(masks, os.path.splitext(rel)[0] + f.mask_suffix)
        if not os.path.isfile(mask):
          raise DatasetError(
            f'image {image} has no mask: {mask} does not exist '
            f'(config.data.folder.{mask_key}, mask_suffix={f.mask_suffix!r})'
          )
      entries.append(Entry(image=image, mask=mask, origin=origin, id=rel))
  return FileSource(
    entries,
    num_classes=config.data.num_classes,
    with_mask=mask_key is not None,
    description=f'folder/{split}',
  )


# ----------------------------------------------------------------------------
# TFDS.


class TfdsSource:
  """Records of a prepared TFDS dataset through `tfds.data_source`.

  Args:
    name, split, data_dir: what `tfds.data_source` opens.
    start, stop: the range of examples of that split this source covers.
    image_key, mask_key: feature names; `mask_key=None` reads no masks.
    label_map: optional `(256,)` uint8 table applied to masks.
    num_classes: for validating masks.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | None,
    *,
    start: int,
    stop: int,
    image_key: str,
    mask_key: str | None,
    label_map: np.ndarray | None,
    num_classes: int,
  ):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # an optional dependency
      raise ImportError(
        "config.data.name='tfds' needs TensorFlow Datasets: pip install 'dssn-jax[tfds]'"
      ) from e

    self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self._name, self._split = name, split
    self._start, self._stop = start, stop
    self._image_key, self._mask_key = image_key, mask_key
    self._label_map = label_map
    self._num_classes = num_classes
    features = list(self._source.dataset_info.features.keys())
    for key, value in (('image_key', image_key), ('mask_key', mask_key)):
      if value is not None and value not in features:
        raise DatasetError(
          f'config.data.tfds.{key}={value!r} is not a feature of {name}; features: {features}'
        )

  def __len__(self) -> int:
    return self._stop - self._start

  def __repr__(self) -> str:
    return f'TfdsSource({self._name}, split={self._split!r}, examples {self._start}:{self._stop})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f'{self!r}: index {index} out of range')
    i = self._start + int(index)
    origin = f'tfds {self._name} split {self._split!r} example {i}'
    example = self._source[i]
    image = np.asarray(example[self._image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.dtype != np.uint8:
      raise DatasetError(
        f'{origin}: feature {self._image_key!r} is {image.dtype} {image.shape}; '
        'expected uint8 (H, W, 1|3|4)'
      )
    if image.shape[2] == 1:
      image = np.repeat(image, 3, axis=2)
    image = np.ascontiguousarray(image[..., :3])
    record = {'image': image, 'id': f'{self._name}/{self._split}/{i}'}
    if self._mask_key is not None:
      mask = np.asarray(example[self._mask_key])
      if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
      if mask.ndim != 2:
        raise DatasetError(
          f'{origin}: feature {self._mask_key!r} has shape {mask.shape}; expected (H, W[, 1])'
        )
      if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
          raise DatasetError(f'{origin}: feature {self._mask_key!r} has values outside 0..255')
        mask = mask.astype(np.uint8)
      if self._label_map is not None:
        mask = self._label_map[mask]
      check_same_size(image, mask, f'{origin} {self._image_key!r}', f'{self._mask_key!r}', origin)
      check_mask_values(mask, self._num_classes, f'{self._mask_key!r}', origin)
      record['mask'] = np.ascontiguousarray(mask)
    return record


def tfds_source(config: ml_collections.ConfigDict, split: str) -> TfdsSource:
  t = config.data.tfds
  if not t.name:
    raise ValueError('config.data.tfds.name is not set')
  tfds_split = t.val_split if split == 'val' else t.train_split
  common = dict(
    image_key=t.image_key,
    label_map=parse_label_map(t.label_map),
    num_classes=config.data.num_classes,
  )
  probe = TfdsSource(t.name, tfds_split, t.data_dir, start=0, stop=0, mask_key=None, **common)
  total = len(probe._source)  # pylint: disable=protected-access
  start, stop = 0, total
  n = int(t.num_labeled)
  if split != 'val' and n:
    if not 0 < n < total:
      raise ValueError(
        f'config.data.tfds.num_labeled={n} must be below the {total} examples of '
        f'{t.name} split {tfds_split!r}'
      )
    start, stop = (0, n) if split == 'labeled' else (n, total)
  return TfdsSource(
    t.name,
    tfds_split,
    t.data_dir,
    start=start,
    stop=stop,
    mask_key=None if split == 'unlabeled' else t.mask_key,
    **common,
  )


def _names_from_key(value: str, key: str, num_classes: int) -> tuple[str, ...] | None:
  if not value:
    return None
  if os.path.isfile(value):
    with open(value) as f:
      names = tuple(line.strip() for line in f if line.strip())
  else:
    names = tuple(n.strip() for n in value.split(','))
  if len(names) != num_classes:
    raise ValueError(f'{key} gives {len(names)} names but config.data.num_classes={num_classes}')
  return names


def names_from_config(config: ml_collections.ConfigDict, section: str) -> tuple[str, ...]:
  """`config.data.<section>.class_names` (a file or a comma list), or class_0, ..."""
  n = config.data.num_classes
  key = f'config.data.{section}.class_names'
  names = _names_from_key(config.data[section].class_names, key, n)
  return names or tuple(f'class_{i}' for i in range(n))


# ----------------------------------------------------------------------------
# The datasets of these layouts.


def split_files_where(config) -> str:
  d = config.data
  return f'root {d.root!r}, splits {d.splits_dir!r}, split {d.split!r}'


def _fixed_names(names: tuple[str, ...]):
  return lambda config: names


def _voc_palette(config) -> np.ndarray:
  return classes.voc_colormap(config.data.num_classes)


datasets.register(
  datasets.Dataset(
    'pascal',
    split_file_source,
    21,
    _fixed_names(classes.PASCAL),
    _voc_palette,
    ('92', '183', '366', '732', '1464', '1_16', '1_8', '1_4', '1_2'),
    split_files_where,
  )
)
datasets.register(
  datasets.Dataset(
    'cityscapes',
    lambda config, split: split_file_source(config, split, label_map_fn=cityscapes_mask),
    19,
    _fixed_names(classes.CITYSCAPES),
    lambda config: np.asarray(classes.CITYSCAPES_COLORS, np.uint8),
    ('1_16', '1_8', '1_4', '1_2'),
    split_files_where,
    input_profile='cityscapes',
  )
)
datasets.register(
  datasets.Dataset(
    'coco',
    split_file_source,
    81,
    _fixed_names(classes.COCO),
    _voc_palette,
    ('1_512', '1_256', '1_128', '1_64', '1_32'),
    split_files_where,
  )
)
datasets.register(
  datasets.Dataset(
    'folder',
    folder_source,
    None,
    lambda config: names_from_config(config, 'folder'),
    _voc_palette,
    (),
    lambda config: f'root {config.data.root!r}',
  )
)
datasets.register(
  datasets.Dataset(
    'tfds',
    tfds_source,
    None,
    lambda config: names_from_config(config, 'tfds'),
    _voc_palette,
    (),
    lambda config: f'tfds {config.data.tfds.name!r}',
  )
)
