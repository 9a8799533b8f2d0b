"""A trained model -> a serialized inference program (`--to stablehlo`).

The program is `predict`'s (`predict.labels_fn`): ImageNet normalization of
uint8 images, the evaluation resize the config uses (UniMatch V2's resize
to a multiple of 14), the forward whole or in the reference's sliding
windows, the argmax at the input size. `jax.export` serializes it for
CPU, CUDA and TPU, one program per image size (the batch is symbolic;
sliding windows and align-corners resizes need concrete sizes), with the
variables beside it as arguments. `program.load` runs the file without
this package's model code (`dssn_jax/export/program.py` has the format).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dssn_jax import models, predict
from dssn_jax.data import datasets
from dssn_jax.errors import ConfigError
from dssn_jax.export import program
from dssn_jax.models import registry

PLATFORMS = ('cpu', 'cuda', 'tpu')

# The weights a model starts from (`config.model.pretrained`), per family:
# their terms (docs/training.md lists the sources).
PRETRAINED_TERMS = {
  'resnet': 'ImageNet ResNet weights linked from the UniMatch / DSSN READMEs:'
  ' no licence stated with them',
  'dinov2': 'DINOv2 weights (github.com/facebookresearch/dinov2): Apache-2.0',
}
NO_PRETRAINED = 'none: trained from a random initialization'


def pretrained_licence(config) -> str:
  """The terms of the pretrained weights the model derives from."""
  if not config.model.get('pretrained', ''):
    return NO_PRETRAINED
  family = registry.family_of(config.model.backbone).name
  return PRETRAINED_TERMS.get(family, 'unknown: see where config.model.pretrained came from')


def parse_sizes(text: str | None, default: int) -> list[tuple[int, int]]:
  """`'512x512,321x480'` (height x width; a bare `N` is `NxN`) -> sizes;
  empty or None: `default x default`."""
  if not text:
    return [(int(default), int(default))]
  sizes = []
  for part in text.split(','):
    m = re.fullmatch(r'\s*(\d+)(?:x(\d+))?\s*', part)
    if m is None or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
      raise ConfigError(f'--sizes {text!r}: expected HxW[,HxW...] of positive integers')
    h = int(m.group(1))
    sizes.append((h, int(m.group(2) or h)))
  return list(dict.fromkeys(sizes))


def _check_size(config, size: tuple[int, int], options: dict[str, Any]) -> bool:
  """Whether `size` goes through sliding windows; a clear error if the model
  cannot take it."""
  sliding = predict.needs_sliding(*size, options['crop_size'], options['resize_multiple'])
  patch = registry.family_of(config.model.backbone).patch
  if patch and not sliding and not options['resize_multiple'] and any(s % patch for s in size):
    raise ConfigError(
      f'--sizes {size[0]}x{size[1]}: a {config.model.backbone} model takes sides that are'
      f' multiples of {patch} (or set config.data.eval_resize_multiple)'
    )
  return sliding


def build(
  config,
  variables: Any,
  sizes: Sequence[tuple[int, int]],
  platforms: Sequence[str] = PLATFORMS,
) -> tuple[list[np.ndarray], dict[str, bytes], list[list]]:
  """Serializes the inference program of `variables` at every size.

  Returns:
    `(weights, programs, size_rows)`: the flattened variables (numpy),
    `{program_name: serialized bytes}`, and `[h, w, 'whole'|'sliding']` rows.
  """
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ConfigError(f'--platforms {",".join(platforms)}: choose from {", ".join(PLATFORMS)}')
  model = models.model_from_config(config)
  options = predict.options_from_config(config)
  leaves, treedef = jax.tree.flatten(jax.device_get(variables))
  leaves = [np.asarray(x) for x in leaves]
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  (batch,) = jax.export.symbolic_shape('b')
  programs, rows = {}, []
  for h, w in sizes:
    sliding = _check_size(config, (h, w), options)
    labels = predict.labels_fn(model, sliding=sliding, **options)

    def fn(weights, images, labels=labels):
      return labels(jax.tree.unflatten(treedef, weights), images)

    images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8)
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(specs, images)
    programs[program.program_name(h, w)] = bytes(exported.serialize())
    rows.append([h, w, 'sliding' if sliding else 'whole'])
  return leaves, programs, rows


def export_program(
  config,
  variables: Any,
  path: str,
  *,
  sizes: Sequence[tuple[int, int]],
  platforms: Sequence[str] = PLATFORMS,
  about: dict[str, Any] | None = None,
  licence: str | None = None,
) -> str:
  """Writes the StableHLO export of one model's `variables` to `path`.

  Args:
    config: the model's config (model, data: classes, palette, eval settings).
    variables: `{'params', 'batch_stats'}` of one model.
    path: the file to write.
    sizes: `(height, width)` of the images it will take.
    platforms: among `PLATFORMS`.
    about: more to record in `meta.json['model']` (which model, step, source).
    licence: the pretrained weights' terms; None: `pretrained_licence(config)`.
  """
  weights, programs, rows = build(config, variables, sizes, platforms)
  num_classes = int(config.data.num_classes)
  meta = {
    'class_names': list(datasets.class_names(config)),
    'palette': predict.check_palette(datasets.palette(config), num_classes).tolist(),
    'pretrained': {
      'weights': config.model.get('pretrained', ''),
      'licence': licence or pretrained_licence(config),
    },
    'model': dict(
      about or {}, backbone=config.model.backbone, method=config.method, dataset=config.data.name
    ),
    'inference': predict.options_from_config(config),
    'sizes': rows,
    'platforms': list(platforms),
    'input': 'uint8 (batch, height, width, 3) RGB',
    'output': 'int32 (batch, height, width) class ids',
    'jax_version': jax.__version__,
  }
  return program.write(path, meta, weights, programs)
