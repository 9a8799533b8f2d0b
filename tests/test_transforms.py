"""The augmentation ops against PIL (the reference's implementation) and the spec."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dssn_jax.data import transforms as T


def _photo(h=150, w=200, seed=0):
  """A smooth image with noise: every gray level path of the ops is exercised."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (h // 5, w // 5, 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(int)
  return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def _diff(ours, ref):
  return np.abs(ours.astype(int) - np.asarray(ref).astype(int))


IMG = _photo()
PIL_IMG = Image.fromarray(IMG)


@pytest.mark.parametrize('factor', [0.05, 0.5, 0.95, 1.4])
@pytest.mark.parametrize(
  'ours,enhancer',
  [
    (T.brightness, ImageEnhance.Brightness),
    (T.contrast, ImageEnhance.Contrast),
    (T.saturation, ImageEnhance.Color),
    (T.sharpness, ImageEnhance.Sharpness),
  ],
)
def test_enhance_ops_match_pil(ours, enhancer, factor):
  d = _diff(ours(IMG, factor), enhancer(PIL_IMG).enhance(factor))
  # uint8 outputs of two implementations: a rounding step (1) at most, rarely.
  assert d.max() <= 1 and d.mean() < 0.05


def test_exact_imageops():
  np.testing.assert_array_equal(T.autocontrast(IMG), ImageOps.autocontrast(PIL_IMG))
  np.testing.assert_array_equal(T.equalize(IMG), ImageOps.equalize(PIL_IMG))
  for bits in (4, 5, 6, 7, 8):
    np.testing.assert_array_equal(T.posterize(IMG, bits), ImageOps.posterize(PIL_IMG, bits))
  for threshold in (1, 100, 255, 256):
    np.testing.assert_array_equal(T.solarize(IMG, threshold), ImageOps.solarize(PIL_IMG, threshold))


def test_flat_image_autocontrast_and_equalize_are_identity():
  flat = np.full((8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(T.autocontrast(flat), flat)
  np.testing.assert_array_equal(T.equalize(flat), flat)


def test_grayscale_is_pil_luma_in_three_channels():
  ours = T.grayscale(IMG)
  assert ours.shape == IMG.shape
  assert _diff(ours, PIL_IMG.convert('L').convert('RGB')).max() <= 1  # uint8 rounding
  np.testing.assert_array_equal(ours[..., 0], ours[..., 2])


def _pil_hue(img, shift):
  """torchvision's `adjust_hue` on PIL images (the reference's path)."""
  h, s, v = img.convert('HSV').split()
  h = (np.asarray(h).astype(int) + int(shift * 255)) % 256
  return Image.merge('HSV', (Image.fromarray(h.astype(np.uint8), 'L'), s, v)).convert('RGB')


@pytest.mark.parametrize('shift', [-0.45, -0.1, 0.25, 0.5])
def test_hue_shift_close_to_torchvision(shift):
  d = _diff(T.hue_shift(IMG, shift), _pil_hue(PIL_IMG, shift))
  # PIL and OpenCV round HSV differently; the rotation is the same.
  assert d.mean() < 1.5 and np.percentile(d, 99) <= 8


def test_hue_shift_zero_is_identity_and_rotates_red():
  np.testing.assert_array_equal(T.hue_shift(IMG, 0.0), IMG)
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  green = T.hue_shift(red, 1 / 3)[0, 0]
  assert green[1] > 240 and green[0] < 15 and green[2] < 15


@pytest.mark.parametrize('sigma', [0.1, 1.0, 2.0])
def test_gaussian_blur_close_to_pil(sigma):
  d = _diff(T.gaussian_blur(IMG, sigma), PIL_IMG.filter(ImageFilter.GaussianBlur(radius=sigma)))
  # PIL approximates the Gaussian with box blurs.
  assert d.mean() < 1.5


def test_pil_nearest_index_matches_pil_resize():
  rng = np.random.default_rng(1)
  for h, w in ((375, 500), (7, 13), (500, 333)):
    mask = rng.integers(0, 21, (h, w), dtype=np.uint8)
    for ow in rng.integers(max(2, w // 2), 2 * w, 12):
      ow = int(ow)
      oh = int(h * ow / w + 0.5)
      pil = np.asarray(Image.fromarray(mask).resize((ow, oh), Image.NEAREST))
      ours = T.resize_window_nearest(mask, (oh, ow), 0, 0, oh, ow)
      np.testing.assert_array_equal(ours, pil)


@pytest.mark.parametrize('size_hw', [(300, 400), (200, 267), (170, 226)])
def test_resize_window_matches_pil_bilinear(size_hw):
  oh, ow = size_hw
  top, left, h, w = 11, 23, min(100, oh - 11), min(120, ow - 23)
  pil = np.asarray(PIL_IMG.resize((ow, oh), Image.BILINEAR))[top : top + h, left : left + w]
  d = _diff(T.resize_window(IMG, (oh, ow), top, left, h, w), pil)
  if oh > IMG.shape[0]:  # enlarging: the same bilinear interpolation
    assert d.max() <= 1  # uint8 rounding
  else:  # shrinking: area averaging vs PIL's antialiased bilinear
    assert d.mean() < 2.5


def test_sample_resize_follows_the_reference_rule():
  rng = np.random.default_rng(0)
  longs = set()
  for _ in range(300):
    oh, ow = T.sample_resize(375, 500, rng, (0.5, 2.0))
    assert 250 <= ow <= 1000
    assert oh == int(375 * ow / 500 + 0.5)
    longs.add(ow)
  assert min(longs) < 300 and max(longs) > 950
  oh, ow = T.sample_resize(500, 333, np.random.default_rng(0), (1.0, 1.0))
  assert (oh, ow) == (500, 333)


def _halves(h, w):
  """Left half dark with label 1, right half bright with label 2."""
  image = np.full((h, w, 3), 230, np.uint8)
  image[:, : w // 2] = 20
  mask = np.full((h, w), 2, np.uint8)
  mask[:, : w // 2] = 1
  return image, mask


def test_random_resized_crop_keeps_image_and_mask_aligned():
  image, mask = _halves(60, 90)
  orientations = []
  for seed in range(60):
    out, out_mask = T.random_resized_crop(image, mask, np.random.default_rng(seed), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out_mask.shape == (64, 64) and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {1, 2, 255}
    valid = out_mask != 255
    dark = out[..., 0] < 125
    assert np.mean(dark[valid] == (out_mask[valid] == 1)) > 0.97
    np.testing.assert_array_equal(out[~valid], 0)
    cols1, cols2 = np.nonzero((out_mask == 1).any(0))[0], np.nonzero((out_mask == 2).any(0))[0]
    if cols1.size and cols2.size:  # both halves visible: which is on the left?
      orientations.append(cols1.mean() < cols2.mean())
  # The flip happens with p=0.5, to image and mask together.
  assert 0.2 < np.mean(orientations) < 0.8


def test_hflip_off_never_flips_and_keeps_the_other_draws():
  image, mask = _halves(60, 90)
  flipped = 0
  for seed in range(30):
    on = T.random_resized_crop(image, mask, np.random.default_rng(seed), 64)
    off = T.random_resized_crop(image, mask, np.random.default_rng(seed), 64, hflip=False)
    cols1 = np.nonzero((off[1] == 1).any(0))[0]
    cols2 = np.nonzero((off[1] == 2).any(0))[0]
    if cols1.size and cols2.size:
      assert cols1.mean() < cols2.mean()  # label 1 (left half) stays left
    # Same scale and crop: `on` is `off` or its mirror image.
    same = np.array_equal(on[0], off[0]) and np.array_equal(on[1], off[1])
    mirror = np.array_equal(on[0], off[0][:, ::-1]) and np.array_equal(on[1], off[1][:, ::-1])
    assert same or mirror
    flipped += not same
  assert 5 < flipped < 25


def test_crop_of_small_image_pads_right_bottom():
  image = np.full((20, 30, 3), 99, np.uint8)
  rng = np.random.default_rng(3)
  while True:  # find a draw without flip to check the side
    out, pad = T.random_resized_crop(image, None, rng, 48, (1.0, 1.0), mask_fill=T.UNLABELED_PAD)
    if out[0, 0, 0] == 99:
      break
  assert (pad[:20, :30] == 0).all() and (pad[20:] == T.UNLABELED_PAD).all()
  assert (pad[:, 30:] == T.UNLABELED_PAD).all()
  assert (out[:20, :30] == 99).all() and (out[20:] == 0).all() and (out[:, 30:] == 0).all()


def test_unlabeled_views_ignore_marks_exactly_the_padding():
  image = np.random.default_rng(0).integers(1, 256, (20, 30, 3), dtype=np.uint8)
  views = T.unlabeled_views(
    {'image': image}, np.random.default_rng(5), crop_size=40, scale_range=(1.0, 1.0), max_ops=3
  )
  assert set(views) == {'w', 's1', 's2', 'ignore', 'box1', 'box2'}
  assert views['ignore'].dtype == np.uint8
  assert (views['ignore'] == 255).sum() == 40 * 40 - 20 * 30
  np.testing.assert_array_equal(views['w'].max(-1) == 0, views['ignore'] == 255)
  for k in ('box1', 'box2'):
    assert views[k].dtype == bool and views[k].shape == (40, 40)


def test_labeled_views_pad_label_255():
  image = np.full((10, 10, 3), 50, np.uint8)
  mask = np.full((10, 10), 3, np.uint8)
  out = T.labeled_views(
    {'image': image, 'mask': mask}, np.random.default_rng(0), crop_size=16, scale_range=(1.0, 1.0)
  )
  assert (out['y'] == 3).sum() == 100 and (out['y'] == 255).sum() == 256 - 100


def test_cutmix_box_probability_area_and_placement():
  rng = np.random.default_rng(0)
  assert not T.cutmix_box(32, rng, p=0.0).any()
  present = 0
  for _ in range(300):
    box = T.cutmix_box(64, rng, p=0.5)
    if not box.any():
      continue
    present += 1
    rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert box.sum() == h * w  # one filled rectangle inside the crop
    assert 0.3 - 0.1 <= h / w <= 1 / 0.3 + 1  # aspect (int truncation slack)
    assert box.sum() <= 0.4 * 64 * 64
  assert 110 < present < 190


def test_color_jitter_draws_torchvision_ranges():
  rng = np.random.default_rng(0)
  gray = np.full((4, 4, 3), 100, np.uint8)
  values = [int(T.color_jitter(gray, rng, (0.5, 0.0, 0.0, 0.0))[0, 0, 0]) for _ in range(200)]
  assert min(values) >= 50 and max(values) <= 150
  assert min(values) < 60 and max(values) > 140


def test_random_ops_count_and_identity_when_off():
  np.testing.assert_array_equal(T.random_ops(IMG, np.random.default_rng(0), 0), IMG)
  assert len(T.STRONG_OPS) == 11
  names = [name for name, _ in T.STRONG_OPS]
  assert names[0] == 'identity' and 'solarize' in names and 'hue' in names


def test_every_strong_op_keeps_shape_and_dtype():
  rng = np.random.default_rng(0)
  for name, op in T.STRONG_OPS:
    out = op(IMG, rng)
    assert out.shape == IMG.shape and out.dtype == np.uint8, name


def test_strong_view_is_a_function_of_the_rng():
  a = T.strong_view(IMG, np.random.default_rng(7), 3)
  b = T.strong_view(IMG, np.random.default_rng(7), 3)
  np.testing.assert_array_equal(a, b)
  others = [T.strong_view(IMG, np.random.default_rng(s), 3) for s in range(8)]
  assert any(not np.array_equal(a, o) for o in others)


def test_center_crop_centers_and_pads():
  image = np.arange(40 * 50 * 3, dtype=np.int64).reshape(40, 50, 3).astype(np.uint8)
  mask = np.ones((40, 50), np.uint8)
  out, out_mask = T.center_crop(image, mask, 20)
  np.testing.assert_array_equal(out, image[10:30, 15:35])
  out, out_mask = T.center_crop(image, mask, 60)
  assert out.shape == (60, 60, 3)
  assert (out_mask[:40, :50] == 1).all() and (out_mask[40:] == 255).all()
  assert (out_mask[:, 50:] == 255).all()
