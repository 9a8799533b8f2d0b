"""DigitScenes: a small segmentation dataset generated from sklearn's digits.

Every scene is a pure function of `(data_seed, pool, scene index)`: nothing is
downloaded and nothing is written. A scene (`image_size` x `image_size` RGB)
is a textured background (smooth low-frequency colour noise, a linear
gradient, fine pixel noise) with 2 to 5 clutter items that are not digits
(curved strokes, arcs, blobs), and on top 1 to `max_digits` handwritten digits
from `sklearn.datasets.load_digits` (1,797 8x8 images). Each digit is upscaled
with bicubic interpolation to a side of 21% to 50% of the image, rotated by up
to +-15 degrees, given a random colour whose brightness contrasts with the
background under it (the background's own colours are muted), and may overlap
earlier digits, which it then occludes in image and mask.

Mask: the upscaled stroke thresholded at half its peak intensity, labelled
`digit + 1` (classes 1..10); everything else, clutter included, is 0.

Long tail: digit `d` is drawn with probability proportional to
`tail ** rank(d)`, where `rank` is a random permutation of 0..9 fixed by
`data_seed` (`class_probabilities`). `tail=1` is uniform; `tail=0.7` makes the
rarest digit 0.7**9 = 4% as likely as the most common one.

Pools: the 1,797 sklearn samples are split once, by a fixed permutation, into
a `train` half (labeled and unlabeled scenes draw from it) and a disjoint
`val` half. Labeled scenes are scenes `[0, num_labeled)` of the train stream,
unlabeled scenes the next `num_unlabeled`, so the two never share a scene;
validation scenes are scenes `[0, num_val)` of the val stream.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import cv2
import numpy as np

from dssn_jax.data import datasets

CLASS_NAMES = ('background',) + tuple(f'digit {d}' for d in range(10))
NUM_CLASSES = len(CLASS_NAMES)  # 11

# Background black, then the ten digit classes (tab10 colours, all distinct).
PALETTE = np.array(
  [
    [0, 0, 0],
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
  ],
  dtype=np.uint8,
)

SPLITS = ('labeled', 'unlabeled', 'val')
POOLS = ('train', 'val')
_POOL_CODE = {'train': 0, 'val': 1}
_POOL_SEED = 6_2023  # fixes the train/val split of the sklearn samples
_SIZE_RANGE = (0.21, 0.5)  # digit side / image side (20..48 px at 96)
_MAX_ANGLE = 15.0  # degrees
_MIN_CONTRAST = 120.0  # luma difference between a digit and the mean colour under it
_BACKGROUND_SATURATION = 0.3  # background chroma kept (1 = full colour noise)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's digits as float32 `(1797, 8, 8)` in [0, 1] (each sample's peak
  is 1) and int64 labels `(1797,)`. Loaded once per process."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  data = load_digits()
  images = data.images.astype(np.float32)
  images /= images.reshape(len(images), -1).max(axis=1)[:, None, None]
  return images, data.target.astype(np.int64)


@functools.lru_cache(maxsize=2)
def pool_indices(pool: str) -> np.ndarray:
  """The sklearn sample indices (sorted int64) a pool's scenes draw from.

  `train` and `val` are disjoint halves (899 and 898 samples) of the 1,797
  samples, fixed once for all seeds.
  """
  if pool not in POOLS:
    raise ValueError(f'digits pool {pool!r} is not one of {POOLS}')
  _, labels = _load_digits()
  perm = np.random.default_rng(_POOL_SEED).permutation(len(labels))
  half = (len(labels) + 1) // 2
  chosen = perm[:half] if pool == 'train' else perm[half:]
  return np.sort(chosen)


@functools.lru_cache(maxsize=2)
def _pool_by_digit(pool: str) -> tuple[np.ndarray, ...]:
  """For each digit 0..9, the sample indices of that digit in `pool`."""
  _, labels = _load_digits()
  idx = pool_indices(pool)
  return tuple(idx[labels[idx] == d] for d in range(10))


def class_probabilities(tail: float, data_seed: int) -> np.ndarray:
  """float64 `(10,)`: the probability of digit 0..9 in every scene.

  `p[d]` is proportional to `tail ** rank[d]`, `rank` a permutation of 0..9
  drawn from `data_seed`, so which digits are rare depends on the seed.
  """
  tail = float(tail)
  if not 0.0 < tail <= 1.0:
    raise ValueError(f'config.data.digits.tail={tail} must be in (0, 1]')
  rank = np.random.default_rng([int(data_seed), 99]).permutation(10)
  p = tail ** rank.astype(np.float64)
  return p / p.sum()


def _sample_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
  """A random RGB colour whose luma differs from `under`'s (3,) by at least
  `_MIN_CONTRAST`.

  Of 16 uniform candidates, the first far enough wins; failing that, the one
  farthest in luma, moved toward black or white (the far side) until it is
  far enough. Contrast in brightness, not only in hue: a from-scratch network
  finds stroke shapes in luma several times faster (measured on DigitScenes),
  and hue stays free.
  """
  cand = rng.uniform(0.0, 255.0, (16, 3)).astype(np.float32)
  lu_under = float(under @ _LUMA)
  diff = cand @ _LUMA - lu_under
  ok = np.flatnonzero(np.abs(diff) >= _MIN_CONTRAST)
  if ok.size:
    return cand[ok[0]]
  target = 0.0 if lu_under > 127.5 else 255.0
  c = cand[int(np.argmax(np.abs(diff)))]
  lu_c = float(c @ _LUMA)
  # Luma is linear: c + t * (target - c) has luma lu_c + t * (target - lu_c).
  want = lu_under - _MIN_CONTRAST if target == 0.0 else lu_under + _MIN_CONTRAST
  t = np.clip((want - lu_c) / (target - lu_c), 0.0, 1.0) if target != lu_c else 0.0
  return (c + t * (target - c)).astype(np.float32)


def _blend(
  image: np.ndarray, alpha: np.ndarray, color: np.ndarray, box: tuple[int, int, int, int]
) -> None:
  """In place: `image = image * (1 - alpha) + color * alpha` on the window
  `box` = (y0, y1, x0, x1) of `image`; `alpha` has the window's shape."""
  y0, y1, x0, x1 = box
  win = image[y0:y1, x0:x1]
  a = alpha[..., None]
  win *= 1.0 - a
  win += a * color


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """float32 `(S, S, 3)`: low-frequency colour noise plus a linear gradient,
  its chroma scaled by `_BACKGROUND_SATURATION` (brightness texture stays)."""
  k = int(rng.integers(2, 6))
  coarse = rng.uniform(0.0, 255.0, (k, k, 3)).astype(np.float32)
  image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
  ang = rng.uniform(0.0, 2.0 * np.pi)
  ramp = (
    np.cos(ang) * np.arange(size, dtype=np.float32)[None, :]
    + np.sin(ang) * np.arange(size, dtype=np.float32)[:, None]
  ) / size
  strength = rng.uniform(-80.0, 80.0, 3).astype(np.float32)
  image += ramp[..., None] * strength
  gray = image @ _LUMA
  image = gray[..., None] + _BACKGROUND_SATURATION * (image - gray[..., None])
  return np.clip(image, 0.0, 255.0, out=image)


def _draw_clutter(
  rng: np.random.Generator, image: np.ndarray, count: tuple[int, int] = (2, 5)
) -> None:
  """In place: `count[0]..count[1]` non-digit items (curved strokes, arcs,
  blobs) of digit-like stroke width and colour, so that a bright stroke alone
  does not mean "digit"."""
  size = image.shape[0]
  canvas = np.zeros((size, size), np.uint8)
  for _ in range(int(rng.integers(count[0], count[1] + 1))):
    canvas[:] = 0
    kind = int(rng.integers(3))
    thick = int(rng.integers(2, max(3, size // 14)))
    if kind == 0:  # polyline stroke
      n = int(rng.integers(2, 5))
      start = rng.uniform(0, size, 2)
      pts = start + np.cumsum(rng.normal(0.0, size * 0.15, (n, 2)), axis=0)
      pts = np.round(np.concatenate([start[None], pts])).astype(np.int32)
      cv2.polylines(canvas, [pts], False, 255, thick, cv2.LINE_AA)
    elif kind == 1:  # elliptic arc
      center = tuple(int(v) for v in rng.uniform(0, size, 2))
      axes = tuple(int(v) for v in rng.uniform(size * 0.05, size * 0.2, 2))
      start = float(rng.uniform(0, 360))
      sweep = float(rng.uniform(60, 300))
      cv2.ellipse(
        canvas,
        center,
        axes,
        float(rng.uniform(0, 180)),
        start,
        start + sweep,
        255,
        thick,
        cv2.LINE_AA,
      )
    else:  # filled blob
      center = tuple(int(v) for v in rng.uniform(0, size, 2))
      axes = tuple(int(v) for v in rng.uniform(size * 0.02, size * 0.08, 2))
      cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    x0, y0, w, h = cv2.boundingRect(canvas)
    if w == 0 or h == 0:  # drawn entirely outside the image
      continue
    box = (y0, y0 + h, x0, x0 + w)
    alpha = canvas[y0 : y0 + h, x0 : x0 + w].astype(np.float32) / 255.0
    win = image[y0 : y0 + h, x0 : x0 + w]
    sel = alpha > 0.5
    under = win[sel].mean(axis=0) if sel.any() else win.mean(axis=(0, 1))
    _blend(image, alpha, _sample_color(rng, under), box)


def _digit_intensity(
  sample: int, size: float, center: tuple[float, float], angle: float, image_size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """A sample's stroke intensity warped into the scene, on a window.

  The 8x8 sample is scaled to a `size` x `size` square, rotated by `angle`
  degrees (counter-clockwise on screen) about its centre and centred at
  `center` (x, y), bicubic. Returns float32 intensities in [0, 1] on the
  window `box` = (y0, y1, x0, x1) of the `(S, S)` scene that holds the whole
  rotated square (0 elsewhere in the scene).
  """
  images, _ = _load_digits()
  src = np.pad(images[sample], 1)  # 10x10, zero border so strokes fade out
  half = 0.5 * size * 10.0 / 8.0 * 1.42 + 2.0  # rotated padded square, + cubic support
  cx, cy = center
  x0, x1 = max(0, int(cx - half)), min(image_size, int(np.ceil(cx + half)) + 1)
  y0, y1 = max(0, int(cy - half)), min(image_size, int(np.ceil(cy + half)) + 1)
  rot = cv2.getRotationMatrix2D((4.5, 4.5), angle, size / 8.0)  # about src centre
  rot[:, 2] += np.array([cx - x0, cy - y0]) - 4.5  # centre -> `center` in window
  out = cv2.warpAffine(
    src,
    rot,
    (max(1, x1 - x0), max(1, y1 - y0)),
    flags=cv2.INTER_CUBIC,
    borderMode=cv2.BORDER_CONSTANT,
    borderValue=0,
  )
  out = out[: y1 - y0, : x1 - x0]
  return np.clip(out, 0.0, 1.0, out=out), (y0, y1, x0, x1)


def digit_intensity(placement: dict[str, Any], image_size: int) -> np.ndarray:
  """float32 `(S, S)` in [0, 1]: one placement's (from `describe`) stroke
  intensity over the whole scene. The image is changed only where it is
  > 0.3, the mask where it is > 0.5 (`digit_mask`)."""
  inten, (y0, y1, x0, x1) = _digit_intensity(
    placement['sample'], placement['size'], placement['center'], placement['angle'], image_size
  )
  out = np.zeros((image_size, image_size), np.float32)
  out[y0:y1, x0:x1] = inten
  return out


def digit_mask(placement: dict[str, Any], image_size: int) -> np.ndarray:
  """bool `(S, S)`: the pixels one placement labels, before occlusion by
  later digits."""
  return digit_intensity(placement, image_size) > 0.5


class DigitScenes:
  """Random-access DigitScenes split; picklable (grain workers rebuild the
  sklearn cache on first access).

  Records: `{'image': uint8 (S, S, 3), 'mask': uint8 (S, S), 'id': str}`;
  `mask` is left out when `with_mask` is False (default: only for the
  unlabeled split). With `cache`, each record is rendered once per process
  and kept (read-only arrays): rendering is most of the input cost of a
  digits step, and an epoch of 10,000 scenes at 96 px holds ~280 MB. Record `i` is scene `offset + i` of the split's pool
  stream (`train` for labeled and unlabeled, `val` for val).
  """

  def __init__(
    self,
    split: str,
    num_scenes: int,
    *,
    offset: int = 0,
    image_size: int = 96,
    tail: float = 0.7,
    max_digits: int = 4,
    data_seed: int = 0,
    with_mask: bool | None = None,
    clutter: tuple[int, int] = (2, 5),
    cache: bool = False,
  ):
    if split not in SPLITS:
      raise ValueError(f'digits split {split!r} is not one of {SPLITS}')
    if int(num_scenes) < 0 or int(offset) < 0:
      raise ValueError(f'digits {split}: num_scenes={num_scenes} and offset={offset} must be >= 0')
    if int(image_size) < 32:
      raise ValueError(f'config.data.digits.image_size={image_size} must be >= 32')
    if int(max_digits) < 1:
      raise ValueError(f'config.data.digits.max_digits={max_digits} must be >= 1')
    self.split = split
    self.pool = 'val' if split == 'val' else 'train'
    self.num_scenes = int(num_scenes)
    self.offset = int(offset)
    self.image_size = int(image_size)
    self.tail = float(tail)
    self.max_digits = int(max_digits)
    self.data_seed = int(data_seed)
    lo, hi = (int(v) for v in clutter)
    if not 0 <= lo <= hi:
      raise ValueError(f'config.data.digits.clutter={tuple(clutter)} must be 0 <= min <= max')
    self.clutter = (lo, hi)
    self.with_mask = (split != 'unlabeled') if with_mask is None else bool(with_mask)
    self.probs = class_probabilities(self.tail, self.data_seed)
    self.cache = bool(cache)
    self._records: dict[int, dict[str, Any]] = {}

  def __getstate__(self) -> dict[str, Any]:  # workers start with an empty cache
    return {**self.__dict__, '_records': {}}

  def __len__(self) -> int:
    return self.num_scenes

  def __repr__(self) -> str:
    return (
      f'DigitScenes(split={self.split!r}, num_scenes={self.num_scenes}, '
      f'offset={self.offset}, image_size={self.image_size}, '
      f'tail={self.tail}, max_digits={self.max_digits}, '
      f'data_seed={self.data_seed}, clutter={self.clutter}, '
      f'with_mask={self.with_mask})'
    )

  def _scene(self, index: Any) -> int:
    i = operator.index(index)
    if i < 0:
      i += self.num_scenes
    if not 0 <= i < self.num_scenes:
      raise IndexError(f'{self!r}: index {index} out of range')
    return self.offset + i

  def scene_id(self, index: int) -> str:
    return f'digits-{self.pool}-{self._scene(index):06d}'

  def __getitem__(self, index: int) -> dict[str, Any]:
    scene = self._scene(index)
    if scene in self._records:  # arrays shared: the augmentations copy, never write
      return dict(self._records[scene])
    image, mask, _ = self.render(index)
    record = {'image': image, 'id': self.scene_id(index)}
    if self.with_mask:
      record['mask'] = mask
    if self.cache:
      for v in record.values():
        if isinstance(v, np.ndarray):
          v.flags.writeable = False
      self._records[scene] = record
      return dict(record)
    return record

  def describe(self, index: int) -> list[dict[str, Any]]:
    """The digits of record `index` in drawing order, each a dict with
    `digit` (0..9), `class` (digit + 1), `sample` (sklearn index), `size`
    (px), `center` ((x, y) px), `angle` (degrees) and `color` (RGB floats)."""
    return self.render(index)[2]

  def render(
    self, index: int, draw_digits: bool = True
  ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Record `index` as `(image uint8 (S, S, 3), mask uint8 (S, S),
    placements)`. With `draw_digits=False`: the same scene without its digits
    (the background they were drawn on; mask all 0, no placements)."""
    scene = self._scene(index)
    rng = np.random.default_rng([self.data_seed, _POOL_CODE[self.pool], scene, 20231])
    size = self.image_size
    image = _background(rng, size)
    _draw_clutter(rng, image, self.clutter)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    mask = np.zeros((size, size), np.uint8)
    placements = []
    if draw_digits:
      placements = self._draw_digits(rng, image, mask)
    image += 6.0 * noise
    image = np.clip(image, 0.0, 255.0, out=image)
    return np.round(image).astype(np.uint8), mask, placements

  def _draw_digits(
    self, rng: np.random.Generator, image: np.ndarray, mask: np.ndarray
  ) -> list[dict[str, Any]]:
    """In place on `image` and `mask`; returns the placements."""
    size = self.image_size
    by_digit = _pool_by_digit(self.pool)
    placements = []
    for _ in range(int(rng.integers(1, self.max_digits + 1))):
      digit = int(rng.choice(10, p=self.probs))
      sample = int(rng.choice(by_digit[digit]))
      side = float(rng.uniform(*_SIZE_RANGE) * size)
      # Up to 5 tries at a centre not too close to earlier digits' centres:
      # overlaps stay partial, so earlier digits remain mostly visible.
      lo, hi = side * 0.45, size - side * 0.45
      for _ in range(5):
        center = rng.uniform(lo, hi, 2)
        if all(
          np.hypot(*(center - np.asarray(p['center']))) >= 0.4 * (side + p['size'])
          for p in placements
        ):
          break
      angle = float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE))
      center = (float(center[0]), float(center[1]))
      inten, box = _digit_intensity(sample, side, center, angle, size)
      y0, y1, x0, x1 = box
      stroke = inten > 0.5
      if not stroke.any():
        continue
      color = _sample_color(rng, image[y0:y1, x0:x1][stroke].mean(axis=0))
      # Soft edge for the image: alpha 0.5 exactly at the mask threshold.
      alpha = np.clip((inten - 0.3) * 2.5, 0.0, 1.0)
      _blend(image, alpha, color, box)
      mask[y0:y1, x0:x1][stroke] = digit + 1
      placements.append(
        {
          'digit': digit,
          'class': digit + 1,
          'sample': sample,
          'size': side,
          'center': center,
          'angle': angle,
          'color': tuple(float(c) for c in color),
        }
      )
    return placements


def get_source(config, split: str) -> DigitScenes:
  """The `labeled`, `unlabeled` or `val` split from `config.data.digits`."""
  if split not in SPLITS:
    raise ValueError(f'digits split {split!r} is not one of {SPLITS}')
  num_classes = config.data.num_classes
  if num_classes != NUM_CLASSES:
    raise ValueError(
      f'config.data.num_classes={num_classes}, but the digits dataset has '
      f'{NUM_CLASSES} classes (background + 10 digits)'
    )
  d = config.data.digits
  counts = dict(labeled=d.num_labeled, unlabeled=d.num_unlabeled, val=d.num_val)
  for key, value in counts.items():
    if int(value) < 0:
      raise ValueError(f'config.data.digits.num_{key}={value} must be >= 0')
  return DigitScenes(
    split,
    int(counts[split]),
    offset=int(d.num_labeled) if split == 'unlabeled' else 0,
    image_size=int(d.image_size),
    tail=float(d.tail),
    max_digits=int(d.max_digits),
    data_seed=int(d.data_seed),
    clutter=tuple(d.clutter),
    cache=bool(d.cache),
  )


datasets.register(
  datasets.Dataset(
    'digits',
    get_source,
    NUM_CLASSES,  # background + 10 digits
    lambda config: tuple(CLASS_NAMES),
    lambda config: np.asarray(PALETTE, np.uint8),
    (),
    lambda config: 'embedded DigitScenes (scikit-learn digits)',
  )
)
