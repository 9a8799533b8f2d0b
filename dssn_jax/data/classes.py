"""Class names and color palettes of the datasets dssn_jax knows.

Palettes are `(num_classes, 3)` uint8 arrays indexed by train id; they color
predictions and masks (`dssn_jax.predict`) and can be written as the palette
of a PNG. PASCAL VOC and COCO use the VOC color map (the one stored in VOC's
palette PNGs), Cityscapes its official train-id colors.
"""

from __future__ import annotations

import numpy as np

PASCAL = (
  'background',
  'aeroplane',
  'bicycle',
  'bird',
  'boat',
  'bottle',
  'bus',
  'car',
  'cat',
  'chair',
  'cow',
  'dining table',
  'dog',
  'horse',
  'motorbike',
  'person',
  'potted plant',
  'sheep',
  'sofa',
  'train',
  'tv/monitor',
)

CITYSCAPES = (
  'road',
  'sidewalk',
  'building',
  'wall',
  'fence',
  'pole',
  'traffic light',
  'traffic sign',
  'vegetation',
  'terrain',
  'sky',
  'person',
  'rider',
  'car',
  'truck',
  'bus',
  'train',
  'motorcycle',
  'bicycle',
)

# UniMatch's COCO setting: 'void' (background) plus the 80 thing classes.
COCO = (
  'void',
  'person',
  'bicycle',
  'car',
  'motorcycle',
  'airplane',
  'bus',
  'train',
  'truck',
  'boat',
  'traffic light',
  'fire hydrant',
  'stop sign',
  'parking meter',
  'bench',
  'bird',
  'cat',
  'dog',
  'horse',
  'sheep',
  'cow',
  'elephant',
  'bear',
  'zebra',
  'giraffe',
  'backpack',
  'umbrella',
  'handbag',
  'tie',
  'suitcase',
  'frisbee',
  'skis',
  'snowboard',
  'sports ball',
  'kite',
  'baseball bat',
  'baseball glove',
  'skateboard',
  'surfboard',
  'tennis racket',
  'bottle',
  'wine glass',
  'cup',
  'fork',
  'knife',
  'spoon',
  'bowl',
  'banana',
  'apple',
  'sandwich',
  'orange',
  'broccoli',
  'carrot',
  'hot dog',
  'pizza',
  'donut',
  'cake',
  'chair',
  'couch',
  'potted plant',
  'bed',
  'dining table',
  'toilet',
  'tv',
  'laptop',
  'mouse',
  'remote',
  'keyboard',
  'cell phone',
  'microwave',
  'oven',
  'toaster',
  'sink',
  'refrigerator',
  'book',
  'clock',
  'vase',
  'scissors',
  'teddy bear',
  'hair drier',
  'toothbrush',
)

CITYSCAPES_COLORS = (
  (128, 64, 128),
  (244, 35, 232),
  (70, 70, 70),
  (102, 102, 156),
  (190, 153, 153),
  (153, 153, 153),
  (250, 170, 30),
  (220, 220, 0),
  (107, 142, 35),
  (152, 251, 152),
  (70, 130, 180),
  (220, 20, 60),
  (255, 0, 0),
  (0, 0, 142),
  (0, 0, 70),
  (0, 60, 100),
  (0, 80, 100),
  (0, 0, 230),
  (119, 11, 32),
)

# Cityscapes labelIds (gtFine_labelIds.png) -> the 19 train ids, 255 = ignore.
CITYSCAPES_ID_TO_TRAIN_ID = {
  7: 0,
  8: 1,
  11: 2,
  12: 3,
  13: 4,
  17: 5,
  19: 6,
  20: 7,
  21: 8,
  22: 9,
  23: 10,
  24: 11,
  25: 12,
  26: 13,
  27: 14,
  28: 15,
  31: 16,
  32: 17,
  33: 18,
}


def voc_colormap(n: int) -> np.ndarray:
  """The PASCAL VOC color map, `(n, 3)` uint8: bits of the index interleaved.

  Index 0 is black; any `n` up to 256 is defined, so it also colors datasets
  with more classes than VOC.
  """
  if not 0 < n <= 256:
    raise ValueError(f'voc_colormap(n={n}): n must be in 1..256')
  idx = np.arange(n)
  cmap = np.zeros((n, 3), np.int64)
  for bit in range(8):
    for channel in range(3):
      cmap[:, channel] |= ((idx >> (3 * bit + channel)) & 1) << (7 - bit)
  return cmap.astype(np.uint8)


def cityscapes_label_lut() -> np.ndarray:
  """`(256,)` uint8 lookup table mapping Cityscapes labelIds to train ids."""
  lut = np.full(256, 255, np.uint8)
  for label_id, train_id in CITYSCAPES_ID_TO_TRAIN_ID.items():
    lut[label_id] = train_id
  return lut
