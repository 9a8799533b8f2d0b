"""Dataset sources on tiny generated trees, their errors, and the check CLI."""

import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dssn_jax.data import classes, datasets, digits, sources
from dssn_jax.testing import fake_datasets as fd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
  root, splits = fd.make_pascal(str(tmp_path_factory.mktemp('voc')))
  return fd.config_for('pascal', root, splits)


def _check_record(record, with_mask, num_classes):
  image = record['image']
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert isinstance(record['id'], str)
  if with_mask:
    mask = record['mask']
    assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
    values = np.unique(mask)
    assert ((values < num_classes) | (values == 255)).all()
  else:
    assert 'mask' not in record


def test_pascal_splits_records_and_palette_masks(voc):
  counts = {s: len(datasets.get_source(voc, s)) for s in datasets.SPLITS}
  assert counts == {'labeled': 4, 'unlabeled': 10, 'val': 3}
  labeled = datasets.get_source(voc, 'labeled')
  for i in range(len(labeled)):
    _check_record(labeled[i], True, 21)
  # Palette PNG: the record holds the indices, not the colors.
  entry = labeled.entries[0]
  with Image.open(entry.mask) as img:
    assert img.mode == 'P'
    np.testing.assert_array_equal(labeled[0]['mask'], np.asarray(img))
  assert (labeled[0]['mask'] == 255).any()
  # Grayscale JPEG (index 1): three equal channels.
  gray = labeled[1]['image']
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  assert labeled[0]['id'] == 'JPEGImages/2007_000000.jpg'
  unlabeled = datasets.get_source(voc, 'unlabeled')
  _check_record(unlabeled[0], False, 21)
  # Picklable, for grain's worker processes.
  again = pickle.loads(pickle.dumps(labeled))
  np.testing.assert_array_equal(again[2]['mask'], labeled[2]['mask'])
  assert 'pascal/92/labeled' in repr(labeled)


def test_cityscapes_train_ids_and_raw_label_ids(tmp_path):
  root, splits = fd.make_cityscapes(str(tmp_path), raw_ids_for=(1,))
  config = fd.config_for('cityscapes', root, splits)
  labeled = datasets.get_source(config, 'labeled')
  assert len(labeled) == 3
  for i in range(3):
    _check_record(labeled[i], True, 19)
  raw_entry = labeled.entries[1]
  assert raw_entry.mask.endswith('_labelIds.png') and raw_entry.label_map == 'cityscapes'
  raw = np.asarray(Image.open(raw_entry.mask))
  assert raw.max() > 18  # label ids, not train ids
  np.testing.assert_array_equal(labeled[1]['mask'], classes.cityscapes_label_lut()[raw])
  assert len(datasets.get_source(config, 'unlabeled')) == 4
  assert datasets.class_names(config)[0] == 'road'
  assert datasets.palette(config).shape == (19, 3)


def test_coco_layout(tmp_path):
  root, splits = fd.make_coco(str(tmp_path))
  config = fd.config_for('coco', root, splits)
  val = datasets.get_source(config, 'val')
  assert len(val) == 2
  _check_record(val[0], True, 81)
  assert val[0]['id'].startswith('val2017/')
  assert len(datasets.class_names(config)) == 81
  assert datasets.palette(config).shape == (81, 3)


def test_folder_layout_with_nested_dirs_and_list_file(tmp_path):
  root = fd.make_folder(str(tmp_path))
  config = fd.config_for('folder', root)
  config.data.folder.class_names = 'bg,a,b,c'
  labeled = datasets.get_source(config, 'labeled')
  assert len(labeled) == 3
  _check_record(labeled[0], True, 4)
  assert sorted(e.id for e in labeled.entries) == ['a/img1.png', 'b/img0.png', 'b/img2.png']
  unlabeled = datasets.get_source(config, 'unlabeled')
  assert len(unlabeled) == 5
  _check_record(unlabeled[0], False, 4)
  assert len(datasets.get_source(config, 'val')) == 2
  # Unlabeled images may also come from a list file (relative to the root).
  fd.write_lines(os.path.join(root, 'u.txt'), ['unlabeled/u1.jpg', 'unlabeled/u3.jpg x.png'])
  config.data.folder.unlabeled_images = 'u.txt'
  assert [e.id for e in datasets.get_source(config, 'unlabeled').entries] == [
    'unlabeled/u1.jpg',
    'unlabeled/u3.jpg',
  ]
  assert datasets.class_names(config) == ('bg', 'a', 'b', 'c')
  config.data.folder.class_names = ''
  assert datasets.class_names(config)[3] == 'class_3'


def test_folder_image_without_mask(tmp_path):
  root = fd.make_folder(str(tmp_path))
  os.remove(os.path.join(root, 'train', 'masks', 'a', 'img1_mask.png'))
  with pytest.raises(sources.DatasetError, match=r'img1\.png has no mask.*img1_mask\.png'):
    datasets.get_source(fd.config_for('folder', root), 'labeled')


class FakeTrimaps(tfds.core.GeneratorBasedBuilder):
  """A pet-like TFDS dataset: trimap masks 1 (object), 2 (background), 3 (border)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3)),
          'segmentation_mask': tfds.features.Image(shape=(None, None, 1), use_colormap=False),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(6), 'validation': self._generate_examples(2)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      h, w = fd.SIZES[i % len(fd.SIZES)]
      image = np.asarray(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
      mask = rng.integers(1, 4, (h, w), dtype=np.uint8)
      # Images as encoded bytes: preparing then needs no TensorFlow.
      yield i, {'image': fd.png_bytes(image), 'segmentation_mask': fd.png_bytes(mask)}


def test_tfds_source_without_tensorflow(tmp_path):
  FakeTrimaps(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  name = 'fake_trimaps'
  config = fd.config_for('tfds', num_classes=2)
  t = config.data.tfds
  t.name, t.data_dir, t.num_labeled = name, str(tmp_path), 2
  t.label_map = '1:1,2:0,3:255'
  labeled, unlabeled, val = (datasets.get_source(config, s) for s in datasets.SPLITS)
  assert (len(labeled), len(unlabeled), len(val)) == (2, 4, 2)
  record = labeled[0]
  _check_record(record, True, 2)
  assert set(np.unique(record['mask'])) == {0, 1, 255}
  _check_record(unlabeled[0], False, 2)
  assert pickle.loads(pickle.dumps(val))[1]['mask'].shape == val[1]['image'].shape[:2]
  # Without the mapping, trimap value 3 is out of range for 2 classes.
  t.label_map = ''
  with pytest.raises(sources.DatasetError, match=r'example \d+.*values \[2, 3\]'):
    datasets.get_source(config, 'labeled')[0]
  t.mask_key = 'mask'
  with pytest.raises(sources.DatasetError, match="mask_key='mask' is not a feature"):
    datasets.get_source(config, 'labeled')


def test_digits_dispatch():
  """The embedded dataset registers itself in its own module, which the
  registry imports the first time `digits` is asked for."""
  config = fd.config_for('digits', num_classes=11)
  assert datasets.get('digits').source is digits.get_source
  assert datasets.class_names(config) == digits.CLASS_NAMES
  np.testing.assert_array_equal(datasets.palette(config), digits.PALETTE)


# ----------------------------------------------------------------------------
# Bad input.


@pytest.fixture
def broken(tmp_path):
  """A fresh VOC tree per test, to break."""
  root, splits = fd.make_pascal(str(tmp_path), n_labeled=3, n_unlabeled=3, n_val=2)
  return fd.config_for('pascal', root, splits)


def _labeled_line(config, i):
  with open(os.path.join(config.data.splits_dir, '92', 'labeled.txt')) as f:
    return f.read().splitlines()[i]


def test_missing_image_names_file_and_line(broken):
  line = _labeled_line(broken, 1)
  os.remove(os.path.join(broken.data.root, line.split()[0]))
  with pytest.raises(sources.DatasetError) as e:
    datasets.get_source(broken, 'labeled')
  assert 'image' in str(e.value) and line.split()[0] in str(e.value)
  assert 'labeled.txt:2' in str(e.value)


def test_missing_mask_names_file_and_line(broken):
  line = _labeled_line(broken, 2)
  os.remove(os.path.join(broken.data.root, line.split()[1]))
  with pytest.raises(sources.DatasetError, match=r'mask .*2007_000002\.png.*labeled\.txt:3'):
    datasets.get_source(broken, 'labeled')
  # Unlabeled lines never need the mask they name.
  unl_line = open(os.path.join(broken.data.splits_dir, '92', 'unlabeled.txt')).readline()
  os.remove(os.path.join(broken.data.root, unl_line.split()[1]))
  assert len(datasets.get_source(broken, 'unlabeled')) == 3


def test_unreadable_image_and_mask(broken):
  line = _labeled_line(broken, 0)
  with open(os.path.join(broken.data.root, line.split()[0]), 'wb') as f:
    f.write(b'not a jpeg')
  source = datasets.get_source(broken, 'labeled')
  with pytest.raises(
    sources.DatasetError, match=r'cannot read image .*2007_000000\.jpg.*labeled\.txt:1'
  ):
    source[0]
  with open(os.path.join(broken.data.root, _labeled_line(broken, 1).split()[1]), 'wb') as f:
    f.write(b'\x89PNG broken')
  with pytest.raises(
    sources.DatasetError, match=r'cannot read mask .*2007_000001\.png.*labeled\.txt:2'
  ):
    source[1]


def test_truncated_jpeg_is_an_error_naming_the_file(broken):
  """OpenCV decodes a JPEG cut short (grey below the cut); PIL, the reference's
  decoder, refuses it: so does `read_image`."""
  line = _labeled_line(broken, 0)
  path = os.path.join(broken.data.root, line.split()[0])
  with open(path, 'rb') as f:
    data = f.read()
  source = datasets.get_source(broken, 'labeled')
  whole = source[0]['image']
  with open(path, 'ab') as f:  # bytes after the end-of-image marker are allowed
    f.write(b'\x00trailing')
  np.testing.assert_array_equal(source[0]['image'], whole)
  with open(path, 'wb') as f:
    f.write(data[: len(data) * 2 // 3])
  assert cv2.imread(path) is not None  # what OpenCV alone would train on
  with pytest.raises(
    sources.DatasetError,
    match=r'image .*2007_000000\.jpg \(listed at .*labeled\.txt:1 .*\) is a truncated JPEG',
  ):
    source[0]


def test_size_mismatch_names_both_files_and_sizes(broken):
  line = _labeled_line(broken, 0)
  mask_path = os.path.join(broken.data.root, line.split()[1])
  fd.save_mask(mask_path, np.zeros((11, 13), np.uint8), palette=True)
  with pytest.raises(sources.DatasetError) as e:
    datasets.get_source(broken, 'labeled')[0]
  msg = str(e.value)
  assert line.split()[0] in msg and line.split()[1] in msg
  assert '60x40' in msg and '13x11' in msg


def test_out_of_range_mask_values(broken):
  line = _labeled_line(broken, 1)
  mask = np.zeros((64, 48), np.uint8)
  mask[0, 0], mask[1, 1], mask[2, 2] = 21, 200, 255
  fd.save_mask(os.path.join(broken.data.root, line.split()[1]), mask, palette=True)
  with pytest.raises(sources.DatasetError, match=r'2007_000001\.png.*values \[21, 200\]'):
    datasets.get_source(broken, 'labeled')[1]


def test_color_mask_rejected(broken):
  line = _labeled_line(broken, 0)
  color = np.zeros((40, 60, 3), np.uint8)
  color[..., 0] = 128
  Image.fromarray(color).save(os.path.join(broken.data.root, line.split()[1]))
  with pytest.raises(sources.DatasetError, match='color image'):
    datasets.get_source(broken, 'labeled')[0]


def test_empty_and_malformed_split_files(broken):
  path = os.path.join(broken.data.splits_dir, '92', 'labeled.txt')
  lines = open(path).read().splitlines()
  with open(path, 'w') as f:
    f.write('\n'.join([lines[0], lines[1].split()[0], lines[2]]) + '\n')
  with pytest.raises(sources.DatasetError, match=r'labeled\.txt:2: malformed line'):
    datasets.get_source(broken, 'labeled')
  open(path, 'w').close()
  with pytest.raises(sources.DatasetError, match=r'labeled\.txt is empty'):
    datasets.get_source(broken, 'labeled')


def test_config_errors(broken, tmp_path):
  broken.data.num_classes = 20
  with pytest.raises(ValueError, match='num_classes=20 but pascal has 21'):
    datasets.get_source(broken, 'labeled')
  broken.data.num_classes = 21
  broken.data.split = '183'
  with pytest.raises(FileNotFoundError, match="split='183'"):
    datasets.get_source(broken, 'labeled')
  broken.data.root = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='config.data.root'):
    datasets.get_source(broken, 'val')
  broken.data.name = 'imagenet'
  with pytest.raises(ValueError, match="name='imagenet'"):
    datasets.get_source(broken, 'val')
  with pytest.raises(ValueError, match="split 'train'"):
    datasets.get_source(broken, 'train')


def test_label_map_parsing():
  lut = sources.parse_label_map('1:0, 3:255')
  assert lut[1] == 0 and lut[3] == 255 and lut[2] == 2
  assert sources.parse_label_map('') is None
  assert sources.parse_label_map('cityscapes')[7] == 0
  with pytest.raises(ValueError, match="'1-2'"):
    sources.parse_label_map('1-2')


def test_voc_colormap():
  cmap = classes.voc_colormap(21)
  assert tuple(cmap[0]) == (0, 0, 0) and tuple(cmap[1]) == (128, 0, 0)
  assert tuple(cmap[15]) == (192, 128, 128)  # person


# ----------------------------------------------------------------------------
# python -m dssn_jax.data check


def _run_check(config, *extra):
  cmd = [
    sys.executable,
    '-m',
    'dssn_jax.data',
    'check',
    '--config',
    os.path.join(REPO, 'configs', 'pascal.py'),
    f'--config.data.root={config.data.root}',
    f'--config.data.splits_dir={config.data.splits_dir}',
    *extra,
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_check_cli_on_good_and_broken_trees(broken):
  result = _run_check(broken)
  assert result.returncode == 0, result.stdout + result.stderr
  out = result.stdout
  assert 'labeled' in out and '3 records' in out and 'OK' in out
  assert 'class pixel histogram' in out and 'background' in out
  assert 'sizes (HxW) 30x30 .. 64x60' in out, out
  # Break two masks: both are listed, and the exit status is 1.
  for i in (0, 2):
    line = _labeled_line(broken, i)
    fd.save_mask(
      os.path.join(broken.data.root, line.split()[1]), np.full((5, 5), 30, np.uint8), palette=False
    )
  result = _run_check(broken)
  assert result.returncode == 1
  assert result.stdout.count('labeled.txt') >= 2 and '2 errors' in result.stdout
