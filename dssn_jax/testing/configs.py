"""The repository's experiment configs (`configs/*.py`) for tests and
benchmarks, and the tiny override every one of them must accept.

`load_config('pascal', 'split=92')` is what `--config configs/pascal.py:split=92`
gives `main.py`. The configs live beside the package in a checkout
(`REPO/configs`), not inside it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections

from dssn_jax import config_lib
from dssn_jax.data import pipeline
from dssn_jax.models import registry as model_registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`configs/NAME.py`'s `get_config(arg)`."""
  spec = importlib.util.spec_from_file_location(
    f'configs_{name}', os.path.join(REPO, 'configs', f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny(config: ml_collections.ConfigDict, steps: int = 2) -> ml_collections.ConfigDict:
  """The tiny override every config must accept: `resnet_tiny`, or for a ViT
  config its family's test backbone (`dinov2_tiny`, `dinov3_tiny`) at a crop
  of two patches (28, 32), a global batch of 2 (a recipe's loss groups
  become 2 of one sample each, still per group)."""
  family = model_registry.family_of(config.model.backbone)
  vit = family.patch is not None
  config.model.backbone = family.test_backbones[0] if vit else 'resnet_tiny'
  crop = 2 * family.patch if vit else 33
  config.model.pretrained = ''
  config.data.crop_size = crop
  config.data.batch_size = 2
  config.train.loss_groups = min(config.train.loss_groups, 2)
  config.data.workers = 0
  config.data.eval_crop_size = crop
  config.data.digits.num_unlabeled = 16
  config.data.digits.num_labeled = 4
  config.data.digits.num_val = 4
  config.train.steps = steps
  config.train.warmup_epochs = None
  config.train.log_every = 1
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of a run's `metrics.jsonl`."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_data(config, *args, **kwargs):
  """`pipeline.TrainData` of `config`, with the settings `config_lib.resolve`
  gives it (a length of 1 step set if the config has none)."""
  resolved = config.copy_and_resolve_references()
  if resolved.train.steps is None and resolved.train.epochs is None:
    resolved.train.steps = 1
  return pipeline.TrainData(config, *args, settings=config_lib.resolve(resolved), **kwargs)
