"""The augmentations of DSSN/UniMatch training views, in numpy and OpenCV.

Each op is a small function of a uint8 RGB image `(H, W, 3)` (and an
`np.random.Generator` where it draws): grain's `random_map` hands every
record its own generator, so the views are reproducible for a seed whatever
the number of workers. The ops reproduce the reference's PIL/torchvision
semantics (`ImageEnhance`, `ImageOps`, `ColorJitter`, `RandomGrayscale`,
`GaussianBlur`) with vectorized lookup tables and OpenCV kernels: the unit
tests hold them to PIL within a gray level or two.

Composition (spec "Data and augmentation"):

- geometry (`random_resized_crop`): long side to `U{int(0.5 L), int(2.0 L)}`
  (bilinear image, nearest mask, PIL's rounding), pad right/bottom to the
  crop (image 0, mask `fill`), random crop, horizontal flip p=0.5. Only the
  crop window of the rescaled image is computed.
- strong view (`strong_view`): color jitter p=0.8 (brightness, contrast,
  saturation 0.5, hue 0.25, random order), grayscale p=0.2, Gaussian blur
  p=0.5 with sigma ~ U(0.1, 2), then `k ~ U{1..max_ops}` ops drawn with
  replacement from `STRONG_OPS`.
- `cutmix_box`: p=`cutmix_p`, area U(0.02, 0.4), aspect U(0.3, 1/0.3),
  fully inside the crop.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

IGNORE = 255
UNLABELED_PAD = 254  # the reference pads unlabeled masks with 254 -> ignore

_RANGE = np.arange(256, dtype=np.float64)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Applies a `(256,)` table to every channel, or `(256, 3)` per channel."""
  table = np.clip(table, 0, 255).astype(np.uint8)
  if table.ndim == 2:
    table = np.ascontiguousarray(table.reshape(256, 1, 3))
  return cv2.LUT(image, table)


def _blend(image: np.ndarray, degenerate: np.ndarray, factor: float) -> np.ndarray:
  """PIL's `Image.blend(degenerate, image, factor)`: truncated to uint8."""
  # addWeighted rounds; -0.499 turns rounding into PIL's truncation.
  return cv2.addWeighted(image, factor, degenerate, 1.0 - factor, -0.499)


def _gray(image: np.ndarray) -> np.ndarray:
  return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


# ----------------------------------------------------------------------------
# Geometry.


def sample_resize(
  height: int, width: int, rng: np.random.Generator, scale_range: tuple[float, float] = (0.5, 2.0)
) -> tuple[int, int]:
  """New `(height, width)`: long side `U{int(lo L), int(hi L)}`, aspect kept.

  Rounds the short side as the reference (`int(x + 0.5)`).
  """
  long_side = max(height, width)
  lo, hi = int(long_side * scale_range[0]), int(long_side * scale_range[1])
  if hi < lo:
    raise ValueError(f'scale_range={tuple(scale_range)} must be increasing')
  side = int(rng.integers(lo, hi, endpoint=True))
  if height > width:
    return max(side, 1), max(int(width * side / height + 0.5), 1)
  return max(int(height * side / width + 0.5), 1), max(side, 1)


def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each of `n_out` pixels in PIL's NEAREST resize.

  PIL accumulates the source position pixel by pixel in float64 from half a
  step; accumulating the same way matches it bit for bit.
  """
  step = n_in / n_out
  steps = np.full(n_out, step)
  steps[0] = 0.5 * step
  return np.minimum(np.add.accumulate(steps).astype(np.int64), n_in - 1)


def resize_window(
  image: np.ndarray, size_hw: tuple[int, int], top: int, left: int, height: int, width: int
) -> np.ndarray:
  """The window `[top:top+height, left:left+width]` of `image` resized to `size_hw`.

  Bilinear: when enlarging, only the window is interpolated (a warp with the
  resize's half-pixel mapping); when shrinking, the whole image is resized
  with area averaging, which is close to PIL's antialiased bilinear.
  """
  h, w = image.shape[:2]
  oh, ow = size_hw
  if (oh, ow) == (h, w):
    return image[top : top + height, left : left + width]
  if oh * ow <= h * w:
    full = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_AREA)
    return full[top : top + height, left : left + width]
  sy, sx = h / oh, w / ow
  matrix = np.array([[sx, 0.0, (left + 0.5) * sx - 0.5], [0.0, sy, (top + 0.5) * sy - 0.5]])
  return cv2.warpAffine(
    image,
    matrix,
    (width, height),
    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
    borderMode=cv2.BORDER_REPLICATE,
  )


def resize_window_nearest(
  mask: np.ndarray, size_hw: tuple[int, int], top: int, left: int, height: int, width: int
) -> np.ndarray:
  """Like `resize_window` for masks, with PIL's NEAREST (exact)."""
  h, w = mask.shape[:2]
  rows = pil_nearest_index(h, size_hw[0])[top : top + height]
  cols = pil_nearest_index(w, size_hw[1])[left : left + width]
  return mask[rows[:, None], cols[None, :]]


def random_resized_crop(
  image: np.ndarray,
  mask: np.ndarray | None,
  rng: np.random.Generator,
  crop_size: int,
  scale_range: tuple[float, float] = (0.5, 2.0),
  *,
  mask_fill: int = IGNORE,
  hflip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """Rescale, pad right/bottom, random crop and random horizontal flip.

  Args:
    image: uint8 `(H, W, 3)`.
    mask: uint8 `(H, W)` or None (unlabeled: only the padding is tracked).
    rng: the record's generator.
    crop_size: S.
    scale_range: long-side range, as a fraction of the original long side.
    mask_fill: label of padded pixels (255 labeled; unlabeled views use
      `UNLABELED_PAD`, which the caller turns into the ignore map).
    hflip: flip with p=0.5 (the reference); False never flips (the coin is
      still drawn, so the other draws do not move).
  Returns:
    `(image (S, S, 3) uint8, mask (S, S) uint8)`; without a mask, the second
    is `mask_fill` where padded and 0 elsewhere.
  """
  oh, ow = sample_resize(image.shape[0], image.shape[1], rng, scale_range)
  s = crop_size
  left = int(rng.integers(0, max(ow, s) - s, endpoint=True))
  top = int(rng.integers(0, max(oh, s) - s, endpoint=True))
  vh, vw = min(s, oh - top), min(s, ow - left)
  out = np.zeros((s, s, 3), np.uint8)
  out[:vh, :vw] = resize_window(image, (oh, ow), top, left, vh, vw)
  out_mask = np.full((s, s), mask_fill, np.uint8)
  if mask is not None:
    out_mask[:vh, :vw] = resize_window_nearest(mask, (oh, ow), top, left, vh, vw)
  else:
    out_mask[:vh, :vw] = 0
  if rng.random() < 0.5 and hflip:
    out, out_mask = cv2.flip(out, 1), cv2.flip(out_mask, 1)
  return out, out_mask


def center_crop(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Center `size x size` crop; where the image is smaller, pad right/bottom.

  Padding is 0 in the image and 255 (ignore) in the mask.
  """
  h, w = image.shape[:2]
  top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
  image, mask = (
    image[top : top + size, left : left + size],
    mask[top : top + size, left : left + size],
  )
  out = np.zeros((size, size, 3), np.uint8)
  out_mask = np.full((size, size), IGNORE, np.uint8)
  out[: image.shape[0], : image.shape[1]] = image
  out_mask[: mask.shape[0], : mask.shape[1]] = mask
  return out, out_mask


# ----------------------------------------------------------------------------
# Photometric ops (PIL ImageEnhance / ImageOps / torchvision semantics).


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """`ImageEnhance.Brightness`: blend with black."""
  return _lut(image, np.trunc(_RANGE * factor))


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """`ImageEnhance.Contrast`: blend with the rounded mean gray level."""
  r, g, b = cv2.mean(image)[:3]
  mean = int(0.299 * r + 0.587 * g + 0.114 * b + 0.5)
  return _lut(image, np.trunc(mean + factor * (_RANGE - mean)))


def saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """`ImageEnhance.Color`: blend with the grayscale image."""
  gray = cv2.cvtColor(_gray(image), cv2.COLOR_GRAY2RGB)
  return _blend(image, gray, factor)


def hue_shift(image: np.ndarray, shift: float) -> np.ndarray:
  """torchvision `adjust_hue`: rotate the hue by `shift` turns (|shift| <= 0.5).

  As the reference, the shift is `int(shift * 255)` steps of the 8-bit hue
  circle, wrapping around.
  """
  steps = int(shift * 255) % 256
  if steps == 0:
    return image
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
  hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + steps) % 256).astype(np.uint8))
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def grayscale(image: np.ndarray) -> np.ndarray:
  """`RandomGrayscale`'s output: luma (ITU-R 601) in all three channels."""
  return cv2.cvtColor(_gray(image), cv2.COLOR_GRAY2RGB)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """`ImageFilter.GaussianBlur(radius=sigma)`: a Gaussian of std `sigma`."""
  return cv2.GaussianBlur(
    image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE
  )


def autocontrast(image: np.ndarray) -> np.ndarray:
  """`ImageOps.autocontrast`: stretch each channel's [min, max] to [0, 255]."""
  tables = []
  for c in range(3):
    lo, hi = cv2.minMaxLoc(image[..., c])[:2]
    if hi <= lo:
      tables.append(_RANGE)
    else:
      scale = 255.0 / (hi - lo)
      tables.append(np.trunc(_RANGE * scale - lo * scale))
  return _lut(image, np.stack(tables, axis=1))


def equalize(image: np.ndarray) -> np.ndarray:
  """`ImageOps.equalize`: per-channel histogram equalization, PIL's rule."""
  tables = []
  for c in range(3):
    hist = cv2.calcHist([image], [c], None, [256], [0, 256]).reshape(256).astype(np.int64)
    nonzero = hist[hist > 0]
    step = (int(nonzero.sum()) - int(nonzero[-1])) // 255 if nonzero.size > 1 else 0
    if not step:
      tables.append(_RANGE)
      continue
    cum = step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])
    tables.append(np.minimum(cum // step, 255).astype(np.float64))
  return _lut(image, np.stack(tables, axis=1))


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """`ImageEnhance.Sharpness`: blend with PIL's SMOOTH filter (border kept)."""
  smooth = cv2.filter2D(image, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
  smooth[0], smooth[-1] = image[0], image[-1]
  smooth[:, 0], smooth[:, -1] = image[:, 0], image[:, -1]
  return _blend(image, smooth, factor)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """`ImageOps.posterize`: keep the top `bits` bits."""
  mask = ~(2 ** (8 - int(bits)) - 1) & 0xFF
  return cv2.LUT(image, (np.arange(256) & mask).astype(np.uint8))


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """`ImageOps.solarize`: invert every value at or above `threshold`."""
  values = np.arange(256)
  return cv2.LUT(image, np.where(values < threshold, values, 255 - values).astype(np.uint8))


# ----------------------------------------------------------------------------
# Random composition.


def color_jitter(
  image: np.ndarray,
  rng: np.random.Generator,
  strength: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
) -> np.ndarray:
  """torchvision `ColorJitter(b, c, s, h)`: the four adjustments in random order.

  Factors: brightness, contrast and saturation `U(1 - v, 1 + v)`, hue
  `U(-h, h)`; the order is a random permutation, as torchvision draws it.
  """
  b, c, s, h = strength
  order = rng.permutation(4)
  factors = (
    rng.uniform(max(0.0, 1 - b), 1 + b),
    rng.uniform(max(0.0, 1 - c), 1 + c),
    rng.uniform(max(0.0, 1 - s), 1 + s),
    rng.uniform(-h, h),
  )
  ops = (brightness, contrast, saturation, hue_shift)
  for i in order:
    image = ops[i](image, factors[i])
  return image


def _factor(rng: np.random.Generator, lo: float = 0.05, hi: float = 0.95) -> float:
  return hi - (hi - lo) * rng.random()


def _ceil_at_least_1(x: float) -> int:
  return max(1, int(math.ceil(x)))


# The reference's (DSSN `strong_img_aug`) op list and parameter draws.
STRONG_OPS = (
  ('identity', lambda im, rng: im),
  ('autocontrast', lambda im, rng: autocontrast(im)),
  ('equalize', lambda im, rng: equalize(im)),
  ('blur', lambda im, rng: gaussian_blur(im, rng.uniform(0.1, 2.0))),
  ('contrast', lambda im, rng: contrast(im, _factor(rng))),
  ('brightness', lambda im, rng: brightness(im, _factor(rng))),
  ('color', lambda im, rng: saturation(im, _factor(rng))),
  ('sharpness', lambda im, rng: sharpness(im, _factor(rng))),
  ('posterize', lambda im, rng: posterize(im, 8 - _ceil_at_least_1(4 * rng.random()))),
  ('solarize', lambda im, rng: solarize(im, 256 - _ceil_at_least_1(255 * rng.random()))),
  ('hue', lambda im, rng: hue_shift(im, (0.5 * rng.random()) * (-1 if rng.random() < 0.5 else 1))),
)


def random_ops(image: np.ndarray, rng: np.random.Generator, max_ops: int) -> np.ndarray:
  """`k ~ U{1..max_ops}` ops of `STRONG_OPS`, drawn with replacement."""
  if max_ops <= 0:
    return image
  k = int(rng.integers(1, max_ops, endpoint=True))
  for i in rng.integers(0, len(STRONG_OPS), size=k):
    image = STRONG_OPS[i][1](image, rng)
  return image


def strong_view(image: np.ndarray, rng: np.random.Generator, max_ops: int) -> np.ndarray:
  """One strong view of a weak crop (jitter, grayscale, blur, random ops)."""
  if rng.random() < 0.8:
    image = color_jitter(image, rng)
  if rng.random() < 0.2:
    image = grayscale(image)
  if rng.random() < 0.5:
    image = gaussian_blur(image, rng.uniform(0.1, 2.0))
  return random_ops(image, rng, max_ops)


def cutmix_box(
  size: int,
  rng: np.random.Generator,
  p: float = 0.5,
  area: tuple[float, float] = (0.02, 0.4),
  aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
  """Bool `(size, size)`: a random box with probability `p`, else all False.

  The area is drawn once; aspect and position are redrawn until the box
  fits, as the reference does.
  """
  box = np.zeros((size, size), bool)
  if rng.random() > p:
    return box
  target = rng.uniform(*area) * size * size
  while True:
    ratio = rng.uniform(*aspect)
    w, h = int(math.sqrt(target / ratio)), int(math.sqrt(target * ratio))
    x, y = int(rng.integers(0, size)), int(rng.integers(0, size))
    if x + w <= size and y + h <= size:
      break
  box[y : y + h, x : x + w] = True
  return box


# ----------------------------------------------------------------------------
# Record-level views.


def labeled_views(
  record: dict[str, Any],
  rng: np.random.Generator,
  *,
  crop_size: int,
  scale_range=(0.5, 2.0),
  hflip: bool = True,
) -> dict[str, np.ndarray]:
  """`{'x': uint8 (S, S, 3), 'y': uint8 (S, S)}` (255 = ignore and padding)."""
  x, y = random_resized_crop(
    record['image'], record['mask'], rng, crop_size, scale_range, mask_fill=IGNORE, hflip=hflip
  )
  return {'x': x, 'y': y}


def unlabeled_views(
  record: dict[str, Any],
  rng: np.random.Generator,
  *,
  crop_size: int,
  scale_range=(0.5, 2.0),
  max_ops: int = 3,
  cutmix_p: float = 0.5,
  boxes: bool = True,
  hflip: bool = True,
) -> dict[str, np.ndarray]:
  """The weak view, two strong views, the ignore map and two cutmix boxes.

  Returns:
    `w`, `s1`, `s2`: uint8 `(S, S, 3)`; `ignore`: uint8 `(S, S)`, 255 where
    the crop was padded, else 0; with `boxes`, `box1`, `box2`: bool `(S, S)`.
  """
  weak, pad = random_resized_crop(
    record['image'], None, rng, crop_size, scale_range, mask_fill=UNLABELED_PAD, hflip=hflip
  )
  out = {'w': weak, 'ignore': np.where(pad == UNLABELED_PAD, IGNORE, 0).astype(np.uint8)}
  for k in ('1', '2'):
    out['s' + k] = strong_view(weak, rng, max_ops)
    if boxes:
      out['box' + k] = cutmix_box(crop_size, rng, cutmix_p)
  return out
