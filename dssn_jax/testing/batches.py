"""Random train batches in the docs/design.md layout, for tests and benchmarks.

The keys a semi-supervised step reads: labeled `x`, `y`; the unlabeled weak
and two strong views `u_w`, `u_s1`, `u_s2` with their `u_ignore` map and one
cutmix box per strong view (`box1`, `box2`); the mix partner's `m_w`,
`m_s1`, `m_s2`, `m_ignore`. A supervised batch has `x` and `y` only.
"""

from __future__ import annotations

import numpy as np


def synthetic_batch(
  global_batch: int, crop: int, num_classes: int, *, supervised: bool, seed: int = 0
) -> dict[str, np.ndarray]:
  """A random train batch in the docs/design.md layout (numpy).

  Images are uniform uint8; labels uniform classes with a padded strip of
  255; ignore maps 255 in the bottom rows; one cutmix box per image and view.
  """
  rng = np.random.default_rng(seed)
  shape = (global_batch, crop, crop)
  pad = max(1, crop // 10)

  def image():
    return rng.integers(0, 256, shape + (3,), dtype=np.uint8)

  def ignore():
    out = np.zeros(shape, np.int32)
    out[:, crop - pad :, :] = 255
    return out

  def box():
    out = np.zeros(shape, bool)
    for i in range(global_batch):
      h, w = rng.integers(max(1, crop // 4), crop // 2 + 2, 2)
      top, left = rng.integers(0, crop - h + 1), rng.integers(0, crop - w + 1)
      out[i, top : top + h, left : left + w] = True
    return out

  y = rng.integers(0, num_classes, shape).astype(np.int32)
  y[:, :, crop - pad :] = 255
  batch = dict(x=image(), y=y)
  if not supervised:
    batch.update(
      u_w=image(),
      u_s1=image(),
      u_s2=image(),
      u_ignore=ignore(),
      box1=box(),
      box2=box(),
      m_w=image(),
      m_s1=image(),
      m_s2=image(),
      m_ignore=ignore(),
    )
  return batch
