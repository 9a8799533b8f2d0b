"""The dataset registry: one entry per `config.data.name`.

A dataset is a name, a source builder `(config, split) -> source` (see
`sources`), its number of classes (None: from the config, for `folder` and
`tfds`), its class names and palette, its known split names and a one-line
description of where its files are (for `python -m dssn_jax.data check`).
`sources.get_source`, `sources.class_names`, `sources.palette`, the data
checker and the config checks all read this registry, so a new dataset is
one module calling `register` plus its config (e.g. `data/ade20k.py` and
`configs/ade20k.py`), and one import line at the end of this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from dssn_jax.data import classes, sources


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A registered dataset.

  Attributes:
    name: `config.data.name`.
    source: `(config, split) -> source` for split in labeled | unlabeled | val.
    num_classes: fixed class count, or None (set by `config.data.num_classes`).
    class_names: `(config) -> tuple of names`, indexed by train id.
    palette: `(config) -> (num_classes, 3) uint8`.
    splits: the labeled splits its split files ship with ('' = any).
    where: `(config) -> str`, where the data is read from.
  """

  name: str
  source: Callable[[Any, str], Any]
  num_classes: int | None
  class_names: Callable[[Any], tuple[str, ...]]
  palette: Callable[[Any], np.ndarray]
  splits: tuple[str, ...] = ()
  where: Callable[[Any], str] = lambda config: ''


_REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
  if dataset.name in _REGISTRY:
    raise ValueError(f'dataset {dataset.name!r} is registered twice')
  _REGISTRY[dataset.name] = dataset
  return dataset


def get(name: str) -> Dataset:
  if name not in _REGISTRY:
    raise ValueError(f'config.data.name={name!r} is not one of {", ".join(_REGISTRY)}')
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def split_files_where(config) -> str:
  d = config.data
  return f'root {d.root!r}, splits {d.splits_dir!r}, split {d.split!r}'


def _fixed_names(names: tuple[str, ...]):
  return lambda config: names


def _voc_palette(config) -> np.ndarray:
  return classes.voc_colormap(config.data.num_classes)


register(
  Dataset(
    'pascal',
    sources.split_file_source,
    21,
    _fixed_names(classes.PASCAL),
    _voc_palette,
    ('92', '183', '366', '732', '1464', '1_16', '1_8', '1_4', '1_2'),
    split_files_where,
  )
)
register(
  Dataset(
    'cityscapes',
    lambda config, split: sources.split_file_source(
      config, split, label_map_fn=sources.cityscapes_mask
    ),
    19,
    _fixed_names(classes.CITYSCAPES),
    lambda config: np.asarray(classes.CITYSCAPES_COLORS, np.uint8),
    ('1_16', '1_8', '1_4', '1_2'),
    split_files_where,
  )
)
register(
  Dataset(
    'coco',
    sources.split_file_source,
    81,
    _fixed_names(classes.COCO),
    _voc_palette,
    ('1_512', '1_256', '1_128', '1_64', '1_32'),
    split_files_where,
  )
)
register(
  Dataset(
    'folder',
    sources.folder_source,
    None,
    lambda config: sources.names_from_config(config, 'folder'),
    _voc_palette,
    (),
    lambda config: f'root {config.data.root!r}',
  )
)
register(
  Dataset(
    'tfds',
    sources.tfds_source,
    None,
    lambda config: sources.names_from_config(config, 'tfds'),
    _voc_palette,
    (),
    lambda config: f'tfds {config.data.tfds.name!r}',
  )
)


def _digits():
  """The DigitScenes module, imported when first used (it loads scikit-learn)."""
  from dssn_jax.data import digits  # pylint: disable=g-import-not-at-top

  return digits


register(
  Dataset(
    'digits',
    lambda config, split: _digits().get_source(config, split),
    11,  # background + 10 digits (digits.NUM_CLASSES)
    lambda config: tuple(_digits().CLASS_NAMES),
    lambda config: np.asarray(_digits().PALETTE, np.uint8),
    (),
    lambda config: 'embedded DigitScenes (scikit-learn digits)',
  )
)

# Datasets in their own modules register themselves on import.
from dssn_jax.data import ade20k  # noqa: E402,F401  pylint: disable=g-import-not-at-top
