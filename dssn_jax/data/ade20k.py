"""ADE20K (SceneParsing, 150 classes) in UniMatch V2's layout.

    root/images/{training,validation}/ADE_*.jpg
    root/annotations/{training,validation}/ADE_*.png

with the authors' split files (`splits/ade20k/<split>/{labeled,unlabeled}.txt`,
`val.txt`, `image_path mask_path` per line; splits 1_64, 1_32, 1_16, 1_8,
1_4, 1_2, all). Label convention (`config.data.ade20k.labels`):

- `'authors'` (default): the annotations UniMatch V2 distributes, already
  train ids 0..149 with 255 = ignore. Their `dataset/semi.py` reads masks as
  stored and trains with 150 classes and ignore_index 255, which only works
  if the stored values are 0..149 and 255.
- `'raw'`: the official ADEChallengeData2016 annotations, 0 = "other"
  (ignored) and classes 1..150, mapped here to 255 and 0..149 (the usual
  "reduce zero label").

A raw mask read as `'authors'` fails with the value 150 named (its class
150 is outside 0..149), pointing at this key.
"""

from __future__ import annotations

import numpy as np

from dssn_jax.data import classes, datasets, sources

SPLITS = ('1_64', '1_32', '1_16', '1_8', '1_4', '1_2', 'all')
LABELS = ('authors', 'raw')

# Class names by train id (ADE20K SceneParsing's objectInfo150 short names).
CLASS_NAMES = (
  'wall',
  'building',
  'sky',
  'floor',
  'tree',
  'ceiling',
  'road',
  'bed',
  'windowpane',
  'grass',
  'cabinet',
  'sidewalk',
  'person',
  'earth',
  'door',
  'table',
  'mountain',
  'plant',
  'curtain',
  'chair',
  'car',
  'water',
  'painting',
  'sofa',
  'shelf',
  'house',
  'sea',
  'mirror',
  'rug',
  'field',
  'armchair',
  'seat',
  'fence',
  'desk',
  'rock',
  'wardrobe',
  'lamp',
  'bathtub',
  'railing',
  'cushion',
  'base',
  'box',
  'column',
  'signboard',
  'chest of drawers',
  'counter',
  'sand',
  'sink',
  'skyscraper',
  'fireplace',
  'refrigerator',
  'grandstand',
  'path',
  'stairs',
  'runway',
  'case',
  'pool table',
  'pillow',
  'screen door',
  'stairway',
  'river',
  'bridge',
  'bookcase',
  'blind',
  'coffee table',
  'toilet',
  'flower',
  'book',
  'hill',
  'bench',
  'countertop',
  'stove',
  'palm',
  'kitchen island',
  'computer',
  'swivel chair',
  'boat',
  'bar',
  'arcade machine',
  'hovel',
  'bus',
  'towel',
  'light',
  'truck',
  'tower',
  'chandelier',
  'awning',
  'streetlight',
  'booth',
  'television receiver',
  'airplane',
  'dirt track',
  'apparel',
  'pole',
  'land',
  'bannister',
  'escalator',
  'ottoman',
  'bottle',
  'buffet',
  'poster',
  'stage',
  'van',
  'ship',
  'fountain',
  'conveyer belt',
  'canopy',
  'washer',
  'plaything',
  'swimming pool',
  'stool',
  'barrel',
  'basket',
  'waterfall',
  'tent',
  'bag',
  'minibike',
  'cradle',
  'oven',
  'ball',
  'food',
  'step',
  'tank',
  'trade name',
  'microwave',
  'pot',
  'animal',
  'bicycle',
  'lake',
  'dishwasher',
  'screen',
  'blanket',
  'sculpture',
  'hood',
  'sconce',
  'vase',
  'traffic light',
  'tray',
  'ashcan',
  'fan',
  'pier',
  'crt screen',
  'plate',
  'monitor',
  'bulletin board',
  'shower',
  'radiator',
  'glass',
  'clock',
  'flag',
)
NUM_CLASSES = len(CLASS_NAMES)  # 150


def raw_label_lut() -> np.ndarray:
  """`(256,)` uint8: 0 -> 255 (ignore), k -> k - 1 for 1..150, others unchanged."""
  lut = np.arange(256, dtype=np.uint8)
  lut[0] = 255
  lut[1 : NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)
  return lut


sources.register_label_map('ade20k_raw', raw_label_lut())


def get_source(config, split: str):
  """The labeled, unlabeled or val split, masks in the chosen label convention."""
  labels = config.data.ade20k.labels
  if labels not in LABELS:
    raise ValueError(f'config.data.ade20k.labels={labels!r} is not one of {", ".join(LABELS)}')
  label_map_fn = (lambda path: (path, 'ade20k_raw')) if labels == 'raw' else None
  return sources.split_file_source(config, split, label_map_fn=label_map_fn)


datasets.register(
  datasets.Dataset(
    'ade20k',
    get_source,
    NUM_CLASSES,
    lambda config: CLASS_NAMES,
    lambda config: classes.voc_colormap(NUM_CLASSES),
    SPLITS,
    lambda config: sources.split_files_where(config) + f', labels {config.data.ade20k.labels!r}',
  )
)
