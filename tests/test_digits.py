"""Tests of the DigitScenes source: determinism, masks, pools, class tail."""

import pickle

import numpy as np
import pytest

from dssn_jax import config_lib
from dssn_jax.data import digits


def _config(**overrides):
  c = config_lib.base_config()
  c.data.name = 'digits'
  c.data.num_classes = 11
  c.data.digits.update(overrides)
  return c


def test_class_names_and_palette():
  assert len(digits.CLASS_NAMES) == 11
  assert digits.CLASS_NAMES[0] == 'background'
  assert digits.CLASS_NAMES[4] == 'digit 3'  # digit c -> class c + 1
  assert digits.PALETTE.shape == (11, 3) and digits.PALETTE.dtype == np.uint8
  assert len({tuple(c) for c in digits.PALETTE}) == 11


def test_sizes_and_records_follow_config():
  c = _config(image_size=48, num_labeled=3, num_unlabeled=5, num_val=4)
  lab, unl, val = (digits.get_source(c, s) for s in ('labeled', 'unlabeled', 'val'))
  assert (len(lab), len(unl), len(val)) == (3, 5, 4)
  for src, has_mask in ((lab, True), (unl, False), (val, True)):
    rec = src[len(src) - 1]
    assert rec['image'].shape == (48, 48, 3) and rec['image'].dtype == np.uint8
    assert isinstance(rec['id'], str)
    assert ('mask' in rec) == has_mask
    if has_mask:
      assert rec['mask'].shape == (48, 48) and rec['mask'].dtype == np.uint8
      assert rec['mask'].max() <= 10
    with pytest.raises(IndexError):
      src[len(src)]
  # The unlabeled mask exists for diagnostics.
  diag = digits.DigitScenes('unlabeled', 5, offset=3, image_size=48, with_mask=True)
  np.testing.assert_array_equal(diag[2]['mask'], unl.render(2)[1])
  assert 'mask' not in unl[2]


def test_labeled_and_unlabeled_are_different_scenes():
  c = _config(image_size=32, num_labeled=4, num_unlabeled=6)
  lab, unl = digits.get_source(c, 'labeled'), digits.get_source(c, 'unlabeled')
  ids_l = {lab[i]['id'] for i in range(len(lab))}
  ids_u = {unl[i]['id'] for i in range(len(unl))}
  assert len(ids_l) == 4 and len(ids_u) == 6 and not ids_l & ids_u
  # Unlabeled continues the labeled scene stream.
  stream = digits.DigitScenes('labeled', 10, image_size=32)
  np.testing.assert_array_equal(unl[0]['image'], stream[4]['image'])
  assert not np.array_equal(unl[0]['image'], lab[0]['image'])


def test_deterministic_pure_function_of_seed_and_index():
  a = digits.DigitScenes('val', 6, image_size=64, data_seed=3)
  b = pickle.loads(pickle.dumps(digits.DigitScenes('val', 6, image_size=64, data_seed=3)))
  for i in range(6):
    ra, rb = a[i], b[i]
    assert ra['id'] == rb['id']
    np.testing.assert_array_equal(ra['image'], rb['image'])
    np.testing.assert_array_equal(ra['mask'], rb['mask'])
  # Order of access does not matter.
  np.testing.assert_array_equal(
    a[5]['image'], digits.DigitScenes('val', 6, image_size=64, data_seed=3)[5]['image']
  )
  images = [a[i]['image'] for i in range(6)]
  for i in range(6):
    for j in range(i + 1, 6):
      assert not np.array_equal(images[i], images[j])
  other_seed = digits.DigitScenes('val', 6, image_size=64, data_seed=4)
  assert not np.array_equal(a[0]['image'], other_seed[0]['image'])
  assert 'val' in repr(a) and 'data_seed=3' in repr(a)


def test_masks_agree_with_drawn_digits():
  src = digits.DigitScenes('labeled', 25, image_size=96, data_seed=1)
  diffs = []
  for i in range(len(src)):
    image, mask, placements = src.render(i)
    background, bg_mask, none = src.render(i, draw_digits=False)
    assert not bg_mask.any() and none == []
    assert 1 <= len(placements) <= 4
    # Mask = the placements' thresholded strokes, later digits on top.
    expected = np.zeros_like(mask)
    support = np.zeros(mask.shape, bool)
    for p in placements:
      assert p['class'] == p['digit'] + 1
      expected[digits.digit_mask(p, 96)] = p['class']
      support |= digits.digit_intensity(p, 96) > 0
    np.testing.assert_array_equal(mask, expected)
    assert set(np.unique(mask)) <= {0} | {p['class'] for p in placements}
    # Where no digit reaches, the image is exactly the digit-free scene.
    np.testing.assert_array_equal(image[~support], background[~support])
    # Under the mask the digits' colours replace the background.
    d = np.linalg.norm(image.astype(float) - background.astype(float), axis=-1)
    diffs.append(d[mask > 0])
  diffs = np.concatenate(diffs)
  assert diffs.size > 1000
  assert np.mean(diffs > 25) > 0.9, np.mean(diffs > 25)


@pytest.mark.parametrize('gray', [0.0, 60.0, 127.5, 128.0, 200.0, 255.0])
def test_digit_colours_contrast_in_brightness(gray):
  """Whatever the background, a digit's colour is >= _MIN_CONTRAST away in
  luma, and colours still vary (not only black and white)."""
  rng = np.random.default_rng(3)
  luma = np.array([0.299, 0.587, 0.114])
  under = np.full(3, gray, np.float32)
  colours = np.stack([digits._sample_color(rng, under) for _ in range(200)])
  assert colours.min() >= 0.0 and colours.max() <= 255.0
  assert np.all(np.abs(colours @ luma - gray) >= digits._MIN_CONTRAST - 1e-3)
  assert len(np.unique(np.round(colours), axis=0)) > 100


def test_first_digit_contrasts_with_the_scene_under_it():
  """In rendered scenes: the first digit's luma against the digit-free scene."""
  src = digits.DigitScenes('labeled', 40, image_size=96, data_seed=2)
  luma = np.array([0.299, 0.587, 0.114])
  for i in range(len(src)):
    background, _, _ = src.render(i, draw_digits=False)
    first = src.describe(i)[0]
    under = background[digits.digit_mask(first, 96)].astype(float).mean(axis=0)
    # Pixel noise (std 6) is in `background` but not in the colour rule.
    assert abs(np.asarray(first['color']) @ luma - under @ luma) >= digits._MIN_CONTRAST - 3


def test_train_and_val_pools_are_disjoint():
  train, val = digits.pool_indices('train'), digits.pool_indices('val')
  assert not set(train) & set(val)
  assert len(train) + len(val) == 1797
  _, labels = digits._load_digits()  # pylint: disable=protected-access
  for split, pool in (('labeled', train), ('unlabeled', train), ('val', val)):
    src = digits.DigitScenes(split, 40, image_size=32, tail=1.0)
    used = [p for i in range(len(src)) for p in src.describe(i)]
    samples = np.array([p['sample'] for p in used])
    assert np.isin(samples, pool).all(), split
    # Each placement's sklearn sample really is that digit.
    np.testing.assert_array_equal(labels[samples], [p['digit'] for p in used])


@pytest.mark.parametrize('tail', [0.6, 1.0])
def test_class_frequencies_follow_tail(tail):
  probs = digits.class_probabilities(tail, data_seed=2)
  assert probs.shape == (10,) and np.isclose(probs.sum(), 1.0)
  ordered = np.sort(probs)[::-1]
  np.testing.assert_allclose(ordered[1:] / ordered[:-1], tail)  # float64, a few ops
  src = digits.DigitScenes('unlabeled', 600, image_size=32, tail=tail, data_seed=2)
  counts = np.zeros(10)
  for i in range(len(src)):
    for p in src.describe(i):
      counts[p['digit']] += 1
  expected = probs * counts.sum()
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  assert chi2 < 27.9, (chi2, counts, expected)  # p = 0.001 at 9 dof
  if tail < 1.0:
    assert np.argmax(counts) == np.argmax(probs)
    assert counts[np.argmin(probs)] < counts[np.argmax(probs)] / 5


def test_rare_classes_depend_on_seed():
  a = digits.class_probabilities(0.7, data_seed=0)
  b = digits.class_probabilities(0.7, data_seed=1)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(np.sort(a), np.sort(b))  # float64, same values permuted


def test_bad_settings_are_rejected():
  with pytest.raises(ValueError, match='tail'):
    digits.get_source(_config(tail=1.5), 'val')
  with pytest.raises(ValueError, match='num_classes'):
    c = _config()
    c.data.num_classes = 21
    digits.get_source(c, 'val')
  with pytest.raises(ValueError, match='split'):
    digits.get_source(_config(), 'train')
  with pytest.raises(ValueError, match='num_val'):
    digits.get_source(_config(num_val=-1), 'val')
  with pytest.raises(ValueError, match='image_size'):
    digits.get_source(_config(image_size=16), 'val')


def test_cached_scenes_are_the_rendered_ones_and_read_only():
  """`cache=True` keeps each record once rendered: the same bytes as rendering
  again, arrays the augmentations cannot write to, and a pickle (what grain
  workers receive) that carries no cached scene."""
  plain = digits.DigitScenes('labeled', 5, image_size=40)
  cached = digits.DigitScenes('labeled', 5, image_size=40, cache=True)
  for i in (3, 0, 3):
    a, b = plain[i], cached[i]
    assert a.keys() == b.keys() and a['id'] == b['id']
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['mask'], b['mask'])
    assert not b['image'].flags.writeable
  assert cached[3] is not cached[3]  # a fresh dict per access
  assert len(pickle.loads(pickle.dumps(cached))._records) == 0
