"""Prediction to PNG: a palette mask and a side-by-side overlay per image.

    python -m dssn_jax.predict --workdir DIR --input IMAGE_OR_DIR --output OUT \
        [--checkpoint best|latest|STEP] [--model teacher|student]

For every input image `NAME.ext` (a file, or the image files directly inside
a folder) it writes, at the image's own size:

    OUT/NAME.png           the class map as a palette ('P' mode) PNG in the
                           dataset's colours (pixel value = class id)
    OUT/NAME_overlay.png   the image | the image blended with the coloured mask

An image no larger than the evaluation crop (`config.data.eval_crop_size` or
`crop_size`) goes through the model whole; a larger one (taller or wider)
through the reference's sliding windows (window = crop, stride 2/3 crop,
summed softmax). The forward is jitted once per image shape.
`--weights FILE --config configs/X.py` predicts with converted weights instead
of a workdir.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import flags
from PIL import Image

from dssn_jax import cli, evaluate, loading, models
from dssn_jax.data import datasets

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.gif')


def list_images(path: str) -> list[str]:
  """The image files to predict: `path` itself, or the images inside it."""
  if os.path.isdir(path):
    files = sorted(
      os.path.join(path, f)
      for f in os.listdir(path)
      if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))
    )
    if not files:
      raise FileNotFoundError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in folder {path}')
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f'input {path} does not exist')
  return [path]


def read_image(path: str) -> np.ndarray:
  """uint8 `(H, W, 3)` RGB; an unreadable file raises an error naming it."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'), dtype=np.uint8)
  except Exception as e:  # PIL raises several kinds for broken files
    raise ValueError(f'cannot read image {path}: {e}') from e


def check_palette(palette: Any, num_classes: int) -> np.ndarray:
  palette = np.asarray(palette)
  if num_classes > 256:
    raise ValueError(f'{num_classes} classes do not fit a palette PNG (at most 256)')
  if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] < num_classes:
    raise ValueError(
      f'palette must be ({num_classes}, 3) colours for {num_classes} classes, '
      f'got shape {palette.shape}'
    )
  return palette[:num_classes].astype(np.uint8)


def mask_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
  """Class map `(H, W)` -> 'P' mode image whose palette is the dataset's."""
  mask = np.ascontiguousarray(mask, np.uint8)
  im = Image.frombytes('P', (mask.shape[1], mask.shape[0]), mask.tobytes())
  colours = np.zeros((256, 3), np.uint8)
  colours[: len(palette)] = palette
  im.putpalette(colours.reshape(-1).tolist())
  return im


def overlay(
  image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
  """Side by side: the image | `(1 - alpha) * image + alpha * colour(mask)`.

  Returns uint8 `(H, 2W, 3)`.
  """
  colour = palette[np.asarray(mask)].astype(np.float32)
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
  blend = np.clip(np.round(blend), 0, 255).astype(np.uint8)
  return np.concatenate([image, blend], axis=1)


def options_from_config(config) -> dict[str, Any]:
  """The evaluation settings of `config` that prediction follows: the
  window (`eval_crop_size` or `crop_size`), `resize_multiple` and
  `shift_windows` (`Predictor`'s arguments)."""
  return dict(
    crop_size=int(config.data.eval_crop_size or config.data.crop_size),
    resize_multiple=int(config.data.eval_resize_multiple),
    shift_windows=config.data.eval_window_edges == 'shift',
  )


def needs_sliding(height: int, width: int, crop_size: int, resize_multiple: int = 0) -> bool:
  """Whether an image of this size goes through sliding windows (taller or
  wider than the crop, unless every image is resized whole)."""
  if resize_multiple:
    return False
  return height > crop_size or width > crop_size


def labels_fn(
  model, crop_size: int, resize_multiple: int = 0, shift_windows: bool = False, *, sliding: bool
):
  """`(variables, uint8 images (B, H, W, 3)) -> int32 labels (B, H, W)`:
  normalization, the evaluation resize, the forward (whole or in windows)
  and the argmax at the input size; traceable, as `Predictor` and the
  StableHLO export (`dssn_jax.export`) run it."""
  return lambda variables, images: evaluate.predict_labels(
    model,
    variables,
    images,
    sliding=sliding,
    window=crop_size,
    resize_multiple=0 if sliding else resize_multiple,
    shift_windows=shift_windows,
  )


class Predictor:
  """Class maps of single images of any size with one model.

  Args:
    model: flax module with the `(logits, aux)` eval API.
    variables: `{'params', 'batch_stats'}`.
    crop_size: the window; larger images use sliding windows.
    resize_multiple: > 0 (`config.data.eval_resize_multiple`, UniMatch V2's
      ViTs): every image is predicted whole, resized to the nearest multiple
      of it per side and back, never in windows.
    shift_windows: the last sliding windows end at the border, whole
      (`config.data.eval_window_edges='shift'`, UniMatch V2).
  """

  def __init__(
    self,
    model,
    variables: Any,
    crop_size: int,
    resize_multiple: int = 0,
    shift_windows: bool = False,
  ):
    self.crop_size = int(crop_size)
    self.resize_multiple = int(resize_multiple)
    evaluate.sliding_window_stride(self.crop_size)  # validates the size
    self._variables = jax.device_put(variables)
    self._fns = {
      sliding: jax.jit(
        labels_fn(model, self.crop_size, self.resize_multiple, shift_windows, sliding=sliding)
      )
      for sliding in (False, True)
    }

  def needs_sliding(self, height: int, width: int) -> bool:
    return needs_sliding(height, width, self.crop_size, self.resize_multiple)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """uint8 `(H, W, 3)` -> int32 class map `(H, W)`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'image must be (H, W, 3), got shape {image.shape}')
    fn = self._fns[self.needs_sliding(*image.shape[:2])]
    pred = fn(self._variables, image[None].astype(np.uint8))
    return np.asarray(pred)[0]


def predict_files(
  predictor: Predictor, paths: Sequence[str], output: str, palette: np.ndarray, alpha: float = 0.5
) -> list[str]:
  """Writes `NAME.png` and `NAME_overlay.png` per input; returns the paths."""
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  seen: dict[str, str] = {}
  for name, path in zip(names, paths):
    if name in seen:
      raise ValueError(f'inputs {seen[name]} and {path} would both write {name}.png')
    seen[name] = path
  os.makedirs(output, exist_ok=True)
  written = []
  for name, path in zip(names, paths):
    image = read_image(path)
    mask = predictor(image)
    mask_path = os.path.join(output, f'{name}.png')
    overlay_path = os.path.join(output, f'{name}_overlay.png')
    mask_image(mask, palette).save(mask_path)
    Image.fromarray(overlay(image, mask, palette, alpha)).save(overlay_path)
    written += [mask_path, overlay_path]
  return written


def run(
  *,
  input_path: str,
  output: str,
  workdir: str | None = None,
  checkpoint: str | int = 'best',
  which_model: str = 'teacher',
  weights: str | None = None,
  config=None,
  alpha: float = 0.5,
) -> list[str]:
  """Loads a checkpoint (or weights) and predicts every input image."""
  if which_model not in evaluate.MODEL_NAMES:
    raise ValueError(f'--model {which_model!r} must be one of {", ".join(evaluate.MODEL_NAMES)}')
  paths = list_images(input_path)  # fail on a bad input before loading anything
  config, variables, _ = loading.load_for_eval(
    workdir=workdir, checkpoint=checkpoint, weights=weights, config=config
  )
  chosen = loading.choose_model(variables, which_model)
  palette = check_palette(datasets.palette(config), int(config.data.num_classes))
  predictor = Predictor(models.model_from_config(config), chosen, **options_from_config(config))
  return predict_files(predictor, paths, output, palette, alpha)


def _define_flags():
  cli.define_model_flags()
  flags.adopt_module_key_flags(cli)  # --helpshort lists them
  flags.DEFINE_enum('model', 'teacher', list(evaluate.MODEL_NAMES), 'Which network.')
  flags.DEFINE_string('input', None, 'An image file or a folder of images.')
  flags.DEFINE_string('output', None, 'Folder for the PNGs.')
  flags.DEFINE_float('alpha', 0.5, 'Opacity of the mask in the overlay.')
  flags.mark_flags_as_required(['input', 'output'])


def main(argv):
  cli.start_command(argv)
  f = flags.FLAGS
  written = run(
    input_path=f.input,
    output=f.output,
    workdir=f.workdir,
    checkpoint=f.checkpoint,
    which_model=f.model,
    weights=f.weights,
    config=f.config,
    alpha=f.alpha,
  )
  print(f'wrote {len(written) // 2} masks and overlays to {f.output}', flush=True)


if __name__ == '__main__':
  cli.run_command(main, _define_flags)
