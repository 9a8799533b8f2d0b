"""ADE20K: the registry entry, the authors' layout and both label conventions."""

import numpy as np
import pytest

from dssn_jax.data import ade20k, datasets, sources
from dssn_jax.testing.fake_datasets import config_for, make_ade20k


def test_registry_entry():
  entry = datasets.get('ade20k')
  assert entry.num_classes == 150 == len(ade20k.CLASS_NAMES)
  assert ade20k.CLASS_NAMES[0] == 'wall' and ade20k.CLASS_NAMES[-1] == 'flag'
  assert '1_64' in entry.splits and 'all' in entry.splits
  assert 'ade20k' in datasets.names()


@pytest.mark.parametrize('raw', [False, True])
def test_reads_both_label_conventions_to_train_ids(tmp_path, raw):
  root, splits = make_ade20k(str(tmp_path / 'data'), raw=raw)
  config = config_for('ade20k', root, splits)
  config.data.ade20k.labels = 'raw' if raw else 'authors'
  counts = {s: len(datasets.get_source(config, s)) for s in datasets.SPLITS}
  assert counts == {'labeled': 3, 'unlabeled': 4, 'val': 2}
  record = datasets.get_source(config, 'labeled')[0]
  assert 'mask' in record and record['id'].startswith('images/training/ADE_train_')
  values = set(np.unique(record['mask']).tolist())
  assert 149 in values and 255 in values and max(values - {255}) <= 149
  assert 'mask' not in datasets.get_source(config, 'unlabeled')[0]
  # Both conventions give the same train ids for the same generated masks.
  authors_root, authors_splits = make_ade20k(str(tmp_path / 'authors'))
  other = config_for('ade20k', authors_root, authors_splits)
  np.testing.assert_array_equal(record['mask'], datasets.get_source(other, 'labeled')[0]['mask'])


def test_raw_masks_read_as_authors_name_the_key(tmp_path):
  root, splits = make_ade20k(str(tmp_path / 'data'), raw=True)
  config = config_for('ade20k', root, splits)
  with pytest.raises(sources.DatasetError, match='150'):
    datasets.get_source(config, 'labeled')[0]
  config.data.ade20k.labels = 'other'
  with pytest.raises(ValueError, match='ade20k.labels'):
    datasets.get_source(config, 'labeled')


def test_lut():
  lut = ade20k.raw_label_lut()
  assert lut[0] == 255 and lut[1] == 0 and lut[150] == 149 and lut[255] == 255
