"""UniMatch V2 and DSSN train steps on DINOv3 + DPT (`dinov3_tiny`, crop 32),
from the repository's DINOv3 recipe (`configs/pascal.py:...,backbone=dinov3_base`
with the tiny override), and gradient accumulation with the training-mode
RoPE rescale on."""

import dataclasses

import jax
import numpy as np
import pytest

from dssn_jax import config_lib, optim, train
from dssn_jax import train_step as ts
from dssn_jax.models import registry
from dssn_jax.testing import batches, configs, fake_datasets

CROP = 32  # two 16-pixel patches


def recipe(method: str, **overrides):
  config = configs.tiny(
    configs.load_config('pascal', f'split=92,backbone=dinov3_base,method={method}')
  )
  config.data.batch_size = 4
  config.data.num_classes = 3
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def first_step(config, model):
  """`(state before, state after, metrics)` of one compiled step from a fixed
  init whose LayerScale is 1 (not 1e-5), so that the blocks, and RoPE in
  them, shape the loss."""
  settings = config_lib.resolve(config)
  schedule = dataclasses.replace(settings.schedule(80), warmup_steps=0)
  tx = optim.make_optimizer(schedule, config)
  state = ts.create_train_state(model, tx, jax.random.key(0, impl='rbg'), CROP)
  ones = lambda path, p: p * 0 + 1 if path[-2].key in ('ls1', 'ls2') else p
  params = jax.tree_util.tree_map_with_path(ones, state.params)
  state = state.replace(params=params, teacher_params=jax.tree.map(lambda p: p * 1.1, params))
  step = jax.jit(
    lambda st, b, r: ts.train_step(
      st, b, r, model=model, tx=tx, settings=settings, schedule=schedule
    )
  )
  batch = batches.synthetic_batch(4, CROP, 3, supervised=False, seed=0)
  new, metrics = jax.device_get(step(state, batch, jax.random.key(3)))
  return state, new, {k: float(v) for k, v in metrics.items()}


def check_step(before, after, metrics):
  assert metrics['nonfinite'] == 0.0 and metrics['loss'] > 0.0 and metrics['grad_norm'] > 0.0
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before.params, after.params)
  assert max(jax.tree.leaves(moved['backbone'])) > 0.0  # the encoder is trained


@pytest.mark.slow
def test_dssn_recipe_step_runs_on_dinov3_tiny():
  """The recipe's DSSN step on DINOv3 trains the encoder (one train-step
  compile, about 35 s on a 2-core CPU). Every run's suite trains the same
  step end to end: test_main.py's Cityscapes `backbone=dinov3_small,method=dssn`."""
  config = recipe('dssn')
  assert config.model.backbone == 'dinov3_tiny' and config.data.crop_size == CROP
  check_step(*first_step(config, registry.model_from_config(config)))


def test_unimatch_v2_grad_accum_with_the_rope_rescale_gives_the_full_batch_step():
  """UniMatch V2 (the recipe's step on dinov3_tiny), rope_rescale 2: 2
  micro-batches of 2 against one batch of 4 give the same first-step loss,
  terms and gradient norm (float32 sums in another order): the methods
  derive the 'rope' key from the step key (`methods.common.rope_key`), the
  same for every micro-batch. Two compiles, about 25 s each on a 2-core CPU."""
  out = {}
  for k in (1, 2):
    config = recipe(
      'unimatch_v2', **{'loss.threshold': 0.0, 'train.grad_accum': k, 'model.rope_rescale': 2.0}
    )
    model = registry.model_from_config(config)
    assert model.backbone.rope_rescale == 2.0
    before, after, out[k] = first_step(config, model)
    check_step(before, after, out[k])
  for name in ('loss', 'grad_norm', 'loss_x', 'loss_s1', 'loss_s2'):
    assert out[2][name] == pytest.approx(out[1][name], rel=1e-5), name


def test_rope_rescale_config_checks():
  config = recipe('unimatch_v2', **{'model.rope_rescale': 0.5})
  with pytest.raises(config_lib.ConfigError, match='rope_rescale=0.5 must be 0'):
    registry.model_from_config(config)


DATASETS = ('pascal', 'cityscapes', 'ade20k', 'coco')


@pytest.mark.parametrize('name', DATASETS)
@pytest.mark.parametrize('method', ['unimatch_v2', 'dssn'])
def test_dinov3_recipes_validate_with_crops_of_whole_patches(name, method):
  """Every dataset's DINOv3 recipe as shipped: UniMatch V2's with the crop at
  the nearest multiple of 16 (518 -> 512, Cityscapes 798 -> 800), the
  evaluation resize at 16, the weights' layout detected from their keys."""
  config = configs.load_config(name, f'backbone=dinov3_base,method={method}')
  config_lib.validate(config)
  assert config.data.crop_size == (800 if name == 'cityscapes' else 512)
  assert config.data.eval_resize_multiple == (0 if name == 'cityscapes' else 16)
  assert config.model.pretrained_layout == 'auto' and config.train.optimizer == 'adamw'


@pytest.mark.slow
@pytest.mark.parametrize('method', ['unimatch_v2', 'dssn'])
def test_pascal_dinov3_recipe_trains_and_evaluates(method, tmp_path):
  """`main.py`'s path end to end on fake VOC data: two steps and an evaluation
  at the original sizes (resized to multiples of 16)."""
  config = configs.tiny(configs.load_config('pascal', f'backbone=dinov3_small,method={method}'))
  root, splits = fake_datasets.make_pascal(str(tmp_path / 'data'), split=config.data.split, n_val=1)
  config.data.root, config.data.splits_dir = root, splits
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['step'] == 2 and summary['miou_teacher'] is not None
