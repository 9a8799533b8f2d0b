"""The dataset registry: one entry per `config.data.name`.

A dataset is a name, a source builder `(config, split) -> source` (see
`sources`), its number of classes (None: from the config, for `folder` and
`tfds`), its class names and palette, its known split names and a one-line
description of where its files are (for `python -m dssn_jax.data check`).
`get_source`, `class_names`, `palette` (below), the data checker and the
pipeline read this registry. Each dataset registers itself in its own
module (the split-file layouts and `folder`/`tfds` in `sources`, `ade20k`,
`digits`), imported the first time its name is asked for; a new dataset is
one module calling `register` plus its config (e.g. `data/ade20k.py` and
`configs/ade20k.py`), named in `config.imports` if it lives outside
dssn_jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from dssn_jax.registry import Registry

SPLITS = ('labeled', 'unlabeled', 'val')


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
    input_profile: the measured input cost it reads like (a key of
      `pipeline.SAMPLE_CPU_S`: 'voc' or 'cityscapes'), for auto workers.
  """

  name: str
  source: Callable[[Any, str], Any]
  num_classes: int | None
  class_names: Callable[[Any], tuple[str, ...]]
  palette: Callable[[Any], np.ndarray]
  splits: tuple[str, ...] = ()
  where: Callable[[Any], str] = lambda config: ''
  input_profile: str = 'voc'


DATASETS: Registry[Dataset] = Registry(
  'dataset',
  'config.data.name',
  builtins={
    'pascal': 'dssn_jax.data.sources',
    'cityscapes': 'dssn_jax.data.sources',
    'coco': 'dssn_jax.data.sources',
    'ade20k': 'dssn_jax.data.ade20k',
    'folder': 'dssn_jax.data.sources',
    'tfds': 'dssn_jax.data.sources',
    'digits': 'dssn_jax.data.digits',
  },
)
register, get, names = DATASETS.register, DATASETS.get, DATASETS.names


def _dataset(config: ml_collections.ConfigDict):
  """The registered dataset of `config`, after checking `num_classes` against it."""
  name = config.data.name
  dataset = DATASETS.get(name)
  expected = dataset.num_classes
  if expected is not None and config.data.num_classes != expected:
    raise ValueError(
      f'config.data.num_classes={config.data.num_classes} but {name} has {expected} classes'
    )
  if not 0 < config.data.num_classes <= 255:
    raise ValueError(f'config.data.num_classes={config.data.num_classes} must be in 1..255')
  return dataset


def get_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of `split` (labeled | unlabeled | val)."""
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is not one of {", ".join(SPLITS)}')
  return _dataset(config).source(config, split)


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the `config.data.num_classes` classes, indexed by train id."""
  return tuple(_dataset(config).class_names(config))


def palette(config: ml_collections.ConfigDict) -> np.ndarray:
  """`(num_classes, 3)` uint8 colors, indexed by train id."""
  return np.asarray(_dataset(config).palette(config), np.uint8)
