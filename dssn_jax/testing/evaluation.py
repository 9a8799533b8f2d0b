"""Toy models, records and workdirs for the evaluation and prediction tests.

- A fixed toy prediction set (`TOY`) with its hand-computed confusion
  matrix and mIoU, and `DecodeModel`, a "model" that reads its prediction
  from the image, so an `Evaluator` over `toy_records()` has known counts
  (the multi-device and multi-process tests run them in subprocesses).
- `TinySeg`, a small BatchNorm net with the `(logits, aux)` API, with
  `tiny_variables` (non-trivial BN statistics) and `random_records`.
- `make_workdir`, a workdir like training leaves (the digits config,
  `resnet_tiny`), and `run_module`, `python -m MODULE` in the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dssn_jax import checkpoint as ckpt_lib
from dssn_jax import config_lib, models
from dssn_jax.normalize import IMAGENET_MEAN, IMAGENET_STD
from dssn_jax.testing.configs import REPO, load_config

NAMES3 = ('bg', 'cat', 'dog')

# A fixed toy prediction set (C = 3, 255 = ignore) with its hand-computed
# confusion. Image b has no class 2 at all; image c has an ignored pixel
# predicted as class 1, which must not count.
TOY = [
  dict(id='a', label=[[0, 0, 1], [1, 255, 2]], pred=[[0, 1, 1], [1, 2, 2]]),
  dict(id='b', label=[[0, 0], [0, 1]], pred=[[0, 0], [1, 1]]),
  dict(id='c', label=[[2], [2], [255]], pred=[[2], [0], [1]]),
]
# Summed over the set (rows: label, columns: prediction):
#   label 0: pred 0 = 1+2, pred 1 = 1+1          -> 3, 2, 0
#   label 1: pred 1 = 2+1                        -> 0, 3, 0
#   label 2: pred 2 = 1+1, pred 0 = 1            -> 1, 0, 2
TOY_CM = np.array([[3, 2, 0], [0, 3, 0], [1, 0, 2]])
# IoU: class 0: 3 / (4 + 5 - 3) = 1/2; class 1: 3 / (5 + 3 - 3) = 3/5;
# class 2: 2 / (2 + 3 - 2) = 2/3.  mIoU = (1/2 + 3/5 + 2/3) / 3.
TOY_IOU = np.array([1 / 2, 3 / 5, 2 / 3]) * 100
TOY_MIOU = (1 / 2 + 3 / 5 + 2 / 3) / 3 * 100  # 58.89
# Per-image averaging (wrong) gives: a (1/2, 2/3, 1), b (2/3, 1/2, 0),
# c (0, 0, 1/2); the mean of the per-image means is 42.59.
PER_IMAGE_MEAN = (
  np.mean([np.mean([1 / 2, 2 / 3, 1]), np.mean([2 / 3, 1 / 2, 0]), np.mean([0, 0, 1 / 2])]) * 100
)


def toy_config(mode='original', crop=8, num_classes=3):
  c = config_lib.base_config()
  c.data.num_classes = num_classes
  c.data.crop_size = crop
  c.data.eval_mode = mode
  return c


class DecodeModel:
  """A "model" whose prediction is written in the image's red channel.

  It undoes the ImageNet normalization, reads the class id from channel 0
  and adds `params['shift']` (mod C), so the predictions are known exactly.
  """

  def __init__(self, num_classes=3):
    self.num_classes = num_classes
    self.traces = 0  # apply runs only when jit traces a new input shape

  def apply(self, variables, x, train=False):
    assert not train
    self.traces += 1
    red = (x[..., 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255.0
    cls = (jnp.round(red).astype(jnp.int32) + variables['params']['shift']) % self.num_classes
    return jax.nn.one_hot(cls, self.num_classes) * 10.0, {}


def toy_records():
  out = []
  for t in TOY:
    pred = np.asarray(t['pred'], np.uint8)
    image = np.stack([pred, np.full_like(pred, 7), np.full_like(pred, 200)], -1)
    out.append({'image': image, 'label': np.asarray(t['label'], np.int32), 'id': t['id']})
  return out


def shift_vars(shift):
  return {'params': {'shift': jnp.int32(shift)}}


class TinySeg(nn.Module):
  """A small fully convolutional net with BatchNorm, `(logits, aux)` API."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    y = nn.BatchNorm(use_running_average=not train)(y)
    y = nn.relu(y)
    y = nn.Conv(8, (3, 3), kernel_dilation=(2, 2))(y)
    y = nn.relu(y)
    y = nn.Conv(self.num_classes, (1, 1))(y)
    y = jax.image.resize(y, x.shape[:3] + (self.num_classes,), 'bilinear')
    return y, {}


def tiny_variables(model, seed):
  """Random variables, non-trivial BN statistics included (`random_like`)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  return random_like(shapes, seed)


def random_records(shapes, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i, (h, w) in enumerate(shapes):
    label = rng.integers(0, num_classes, (h, w)).astype(np.int32)
    label[rng.random((h, w)) < 0.1] = 255
    out.append(
      {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': label, 'id': f'r{i}'}
    )
  return out


def numpy_confusion(pred, label, c):
  keep = label != 255
  return np.bincount(label[keep] * c + pred[keep], minlength=c * c).reshape(c, c)


def digits_config(num_val=3):
  config = load_config('digits')
  config.data.digits.num_val = num_val
  return config


def random_like(shapes, seed):
  """Random variables of the given shapes without compiling `init`: kernels
  scaled by fan-in, BN scales and variances near 1, the rest near 0
  (`params`, and `batch_stats` where the model has them)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      value = rng.normal(0.0, 1.0, s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif 'var' in name or 'scale' in name:
      value = rng.uniform(0.5, 1.5, s.shape)
    else:
      value = rng.normal(0.0, 0.1, s.shape)
    return jnp.asarray(value, s.dtype)

  tree = jax.tree_util.tree_map_with_path(leaf, shapes)
  return {k: tree[k] for k in ('params', 'batch_stats') if k in tree}


def write_workdir(path, config, student, teacher, step):
  """A workdir like training leaves: `config.json` and one checkpoint at
  `step` holding the two models' variables."""
  state = {
    'step': jnp.int32(step),
    'params': student['params'],
    'batch_stats': student['batch_stats'],
    'teacher_params': teacher['params'],
    'teacher_batch_stats': teacher['batch_stats'],
  }
  ckpt_lib.save_config(str(path), config)
  saver = ckpt_lib.Checkpointer(os.path.join(str(path), 'checkpoints'))
  saver.save(step, state, jax.random.key(0), metrics={'miou_teacher': 1.0})
  saver.close()


def make_workdir(path, step=3):
  """A workdir like training leaves, of random digits-config variables."""
  config = digits_config()
  model = models.model_from_config(config)
  dummy = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
  student, teacher = random_like(shapes, 1), random_like(shapes, 2)
  write_workdir(path, config, student, teacher, step)
  return config, model, {'student': student, 'teacher': teacher}


def run_module(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
  )
