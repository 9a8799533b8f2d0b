"""Prediction: class maps of any size, palette PNGs, overlays, the command line."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from dssn_jax import evaluate, predict
from dssn_jax.data import datasets
from dssn_jax.normalize import normalize
from dssn_jax.testing.evaluation import TinySeg, make_workdir, run_module, tiny_variables

PALETTE3 = np.array([[0, 0, 0], [200, 10, 10], [10, 200, 10]], np.uint8)


@pytest.fixture(scope='module')
def tiny():
  model = TinySeg()
  variables = tiny_variables(model, 2)
  return model, variables, predict.Predictor(model, variables, crop_size=12)


def random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predictor_uses_whole_image_up_to_the_crop(tiny):
  model, variables, predictor = tiny
  image = random_image(12, 9)
  assert not predictor.needs_sliding(12, 9)
  logits, _ = model.apply(variables, normalize(image[None]), train=False)
  np.testing.assert_array_equal(predictor(image), np.argmax(np.asarray(logits)[0], -1))


def test_predictor_slides_windows_over_larger_images(tiny):
  model, variables, predictor = tiny
  image = random_image(13, 30, seed=1)  # taller and wider than the 12 px crop
  assert predictor.needs_sliding(13, 30) and predictor.needs_sliding(5, 13)
  probs = jax.jit(
    lambda x: evaluate.sliding_window_probs(evaluate.model_logits_fn(model, variables), x, 12)
  )(image[None])
  got = predictor(image)
  assert got.shape == (13, 30)
  np.testing.assert_array_equal(got, np.argmax(np.asarray(probs)[0], -1))
  whole = jax.jit(evaluate.model_logits_fn(model, variables))(image[None])
  assert (got != np.argmax(np.asarray(whole)[0], -1)).any()  # really not one forward


def test_predict_files_writes_palette_mask_and_overlay(tiny, tmp_path):
  _, _, predictor = tiny
  src = tmp_path / 'in'
  src.mkdir()
  images = {'small': random_image(7, 11, 3), 'wide': random_image(10, 25, 4)}
  Image.fromarray(images['small']).save(src / 'small.png')
  Image.fromarray(images['wide']).save(src / 'wide.bmp')
  (src / 'notes.txt').write_text('not an image')
  paths = predict.list_images(str(src))
  assert [os.path.basename(p) for p in paths] == ['small.png', 'wide.bmp']
  out = tmp_path / 'out'
  written = predict.predict_files(predictor, paths, str(out), PALETTE3, alpha=0.5)
  assert sorted(os.path.basename(p) for p in written) == [
    'small.png',
    'small_overlay.png',
    'wide.png',
    'wide_overlay.png',
  ]
  for name, image in images.items():
    h, w = image.shape[:2]
    with Image.open(out / f'{name}.png') as mask:
      assert mask.mode == 'P' and mask.size == (w, h)
      colours = np.asarray(mask.getpalette()[:9], np.uint8).reshape(3, 3)
      np.testing.assert_array_equal(colours, PALETTE3)
      np.testing.assert_array_equal(np.asarray(mask), predictor(image))
      rgb = np.asarray(mask.convert('RGB'))
    with Image.open(out / f'{name}_overlay.png') as ov:
      assert ov.mode == 'RGB' and ov.size == (2 * w, h)
      ov = np.asarray(ov).astype(np.int32)
    np.testing.assert_array_equal(ov[:, :w], image)
    want = (image.astype(np.float64) + rgb.astype(np.float64)) / 2
    assert np.abs(ov[:, w:] - want).max() <= 0.5 + 1e-9  # uint8 rounding of the mean


def test_bad_inputs_name_the_file(tiny, tmp_path):
  _, _, predictor = tiny
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'\x00 definitely not a jpeg')
  with pytest.raises(ValueError, match='broken.jpg'):
    predict.predict_files(predictor, [str(broken)], str(tmp_path / 'out'), PALETTE3)
  with pytest.raises(FileNotFoundError, match='missing.png'):
    predict.list_images(str(tmp_path / 'missing.png'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='no image files'):
    predict.list_images(str(empty))
  a, b = tmp_path / 'x.png', tmp_path / 'sub'
  b.mkdir()
  Image.fromarray(random_image(4, 4)).save(a)
  Image.fromarray(random_image(4, 4)).save(b / 'x.jpg')
  with pytest.raises(ValueError, match='x.png'):
    predict.predict_files(predictor, [str(a), str(b / 'x.jpg')], str(tmp_path / 'o'), PALETTE3)
  with pytest.raises(ValueError, match=r'\(3, 3\) colours'):
    predict.check_palette(PALETTE3[:2], 3)


def test_command_line_on_a_workdir(tmp_path):
  config, _, _ = make_workdir(tmp_path / 'work')
  src = tmp_path / 'in'
  src.mkdir()
  # Digits crop is 64: one image goes through whole, one through windows.
  Image.fromarray(random_image(30, 70, 5)).save(src / 'a.jpg')
  Image.fromarray(random_image(40, 60, 6)).save(src / 'b.png')
  out = tmp_path / 'out'
  proc = run_module(
    'dssn_jax.predict',
    f'--workdir={tmp_path / "work"}',
    f'--input={src}',
    f'--output={out}',
    '--model=student',
    '--checkpoint=latest',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  palette = np.asarray(datasets.palette(config))
  for name, (h, w) in (('a', (30, 70)), ('b', (40, 60))):
    with Image.open(out / f'{name}.png') as mask:
      assert mask.mode == 'P' and mask.size == (w, h)
      colours = np.asarray(mask.getpalette()[: 3 * len(palette)], np.uint8).reshape(-1, 3)
      np.testing.assert_array_equal(colours, palette)
      assert np.asarray(mask).max() < len(palette)
    with Image.open(out / f'{name}_overlay.png') as ov:
      assert ov.size == (2 * w, h)
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'garbage')
  with pytest.raises(ValueError, match='bad.png'):
    predict.run(input_path=str(bad), output=str(out), workdir=str(tmp_path / 'work'))
