"""Config contract: method presets, ablation flags, steps/epochs, arguments."""

import json

import pytest

from dssn_jax import config_lib, methods
from dssn_jax.testing.configs import load_config


def method_settings(c):
  """The method's own settings of `c` (a length set if it has none)."""
  if c.train.steps is None and c.train.epochs is None:
    c.train.steps = 1
  return config_lib.resolve(c).method


def test_dssn_preset_matches_reference_total():
  s = method_settings(config_lib.base_config())
  # 0.5 * (L_x + 0.25*(L_s1+L_s2+L_fp1+L_fp2) + 0.01*(L_img+L_feat))
  assert (s.sup, s.strong, s.fp) == (0.5, 0.125, 0.125)
  assert (s.align_image, s.align_feature) == (0.005, 0.005)
  assert s.fp_branches == 2 and s.strong_views == 2
  assert s.pseudo_label == 'class_aware' and methods.get('dssn').ema_schedule == 'warmup'


@pytest.mark.parametrize(
  'method,expected',
  [
    (
      'unimatch',
      dict(
        sup=0.5,
        strong=0.125,
        fp=0.25,
        align_image=0.0,
        fp_branches=1,
        pseudo_label='fixed',
        threshold=0.95,
      ),
    ),
    ('fixmatch', dict(sup=0.5, strong=0.5, fp=0.0, strong_views=1, fp_branches=0)),
    ('supervised', dict(sup=1.0)),
  ],
)
def test_method_presets(method, expected):
  c = config_lib.base_config()
  c.method = method
  s = method_settings(c)
  for key, value in expected.items():
    assert getattr(s, key) == value, key
  if method == 'supervised':  # its settings hold L_x's knobs alone: no unlabeled term
    assert not any(hasattr(s, k) for k in ('strong', 'fp', 'align_image', 'align_feature'))


def test_explicit_values_override_the_preset():
  c = config_lib.base_config()
  c.loss.align_image = 0.0
  c.loss.pseudo_label = 'fixed'
  c.loss.threshold = 0.9
  s = method_settings(c)
  assert s.align_image == 0.0 and s.align_feature == 0.005
  assert s.pseudo_label == 'fixed' and s.threshold == 0.9


def test_one_fp_branch_has_no_feature_alignment():
  c = config_lib.base_config()
  c.model.fp_branches = 1
  assert method_settings(c).align_feature == 0.0


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('method', 'meanteacher', 'config.method'),
    ('loss.pseudo_label', 'soft', 'config.loss.pseudo_label'),
    ('train.teacher_bn', 'eval', 'config.train.teacher_bn'),
  ],
)
def test_bad_values_are_named(key, value, message):
  c = config_lib.base_config()
  section, _, name = key.rpartition('.')
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=message):
    method_settings(c)


def test_supervised_branch_needs_a_semi_supervised_method():
  c = load_config('digits', None)
  assert c.train.supervised_branch  # a DSSN run's live baseline
  config_lib.validate(c)
  c = load_config('digits', 'supervised')
  assert not c.train.supervised_branch
  c.train.supervised_branch = True
  with pytest.raises(config_lib.ConfigError, match="supervised_branch=True.*method='supervised'"):
    config_lib.validate(c)


def test_epochs_resolve_to_steps_and_warmup():
  c = config_lib.base_config()
  c.train.epochs = 2.5
  c.train.warmup_epochs = 1.0
  s = config_lib.resolve(c).schedule(num_unlabeled=100)  # batch 8 -> 12 steps/epoch
  assert s.steps_per_epoch == 12 and s.total_steps == 30 and s.warmup_steps == 12
  # float64 schedule arithmetic: approx's default rel 1e-6.
  assert s.eval_every == 12 and s.lr == 0.002 and s.head_lr == pytest.approx(0.02)


def test_steps_win_over_epochs():
  c = config_lib.base_config()
  with pytest.raises(ValueError, match='steps or config.train.epochs'):
    config_lib.resolve(c).schedule(100)
  c.train.steps, c.train.epochs = 10, 1.0
  assert config_lib.resolve(c).schedule(100).total_steps == 10


def test_lr_scales_with_global_batch_only_when_asked():
  c = config_lib.base_config()
  c.train.steps = 10
  c.data.batch_size = 4
  assert config_lib.resolve(c).schedule(100).lr == 0.002
  c.train.scale_lr_with_batch = True
  s = config_lib.resolve(c).schedule(100)
  assert s.lr == pytest.approx(0.001) and s.head_lr == pytest.approx(0.01)


def test_parse_arg():
  assert config_lib.parse_arg('183', split='92', backbone='r')['split'] == '183'
  out = config_lib.parse_arg('split=1_8,backbone=resnet50', split='92', backbone='r')
  assert out == {'split': '1_8', 'backbone': 'resnet50'}
  assert config_lib.parse_arg('labeled=40', method='dssn', labeled=20)['labeled'] == 40
  with pytest.raises(
    config_lib.ConfigError, match="unknown config argument 'splt'.*did you mean 'split'"
  ):
    config_lib.parse_arg('splt=92', split='92')
  with pytest.raises(config_lib.ConfigError, match="labeled='many' cannot be read as int"):
    config_lib.parse_arg('labeled=many', method='dssn', labeled=20)


# The authors' configs/*.yaml (crop, epochs, batch per GPU x 4 GPUs).
UNIMATCH_V2_YAML = {
  'pascal': (518, 60, 16, 'ce'),
  'cityscapes': (798, 180, 8, 'ohem'),
  'ade20k': (518, 60, 8, 'ce'),
  'coco': (518, 20, 16, 'ce'),
}


def test_dinov2_configs_reproduce_the_authors_yaml():
  for name, (crop, epochs, batch, sup) in UNIMATCH_V2_YAML.items():
    c = load_config(name, 'backbone=dinov2_base,method=unimatch_v2')
    assert (c.data.crop_size, c.train.epochs, c.data.batch_size) == (crop, epochs, batch), name
    assert c.loss.sup_type == sup, name
    assert (c.train.optimizer, c.train.lr, c.train.lr_multi) == ('adamw', 5e-6, 40.0), name
    assert (c.train.weight_decay, c.train.poly_power, c.train.ema_decay) == (0.01, 0.9, 0.996)
    assert c.train.freeze_backbone is False, name  # the logged runs: lock_backbone False
    assert c.model.pretrained == 'pretrained/dinov2_base.pth'
    assert c.train.loss_groups == 4, name  # their 4 GPUs
    s = method_settings(c)
    assert (s.sup, s.strong, s.threshold, s.comp_drop, s.mix_partner) == (
      0.5,
      0.25,
      0.95,
      True,
      'reversed',
    )
    if name == 'cityscapes':
      assert (c.data.eval_mode, c.data.eval_window_edges) == ('sliding_window', 'shift')
      assert (c.loss.ohem_thresh, c.loss.ohem_min_kept) == (0.7, 200000)  # per GPU batch
    else:
      assert (c.data.eval_mode, c.data.eval_resize_multiple) == ('original', 14)
  # The ResNet recipes keep their meaning.
  voc = load_config('pascal', 'split=92')
  assert (voc.data.crop_size, voc.train.optimizer, voc.data.eval_resize_multiple) == (513, 'sgd', 0)
  assert config_lib.resolve(voc).mix_partner == 'same'


# The authors' GPU counts (their per-GPU batch x GPUs = the global batch).
RESNET_GPUS = {
  ('pascal', 'resnet101'): 4,  # DSSN: 4 x (2 + 2)
  ('cityscapes', 'resnet101'): 8,  # DSSN: 8 x 1
  ('cityscapes', 'resnet50'): 4,  # DSSN: 4 x 2
  ('coco', 'resnet101'): 8,  # UniMatch: 8 x 1
  ('ade20k', 'resnet101'): 4,  # VOC's recipe
}


def test_each_recipe_computes_its_authors_per_gpu_update():
  for (name, backbone), gpus in RESNET_GPUS.items():
    c = load_config(name, f'backbone={backbone}')
    assert c.train.loss_groups == gpus, (name, backbone)
    assert c.data.batch_size % gpus == 0
    assert config_lib.resolve(c).method.loss_groups == gpus
  # DSSN on DINOv2 (unpublished) takes UniMatch V2's 4 GPUs.
  assert load_config('pascal', 'backbone=dinov2_small,method=dssn').train.loss_groups == 4
  assert load_config('digits').train.loss_groups == 1  # one CPU, no published recipe


def test_resume_changes_refuse_data_keys_but_not_the_scene_cache():
  saved = json.loads(config_lib.base_config().to_json_best_effort())
  new = config_lib.base_config()
  new.data.digits.cache = not new.data.digits.cache
  new.data.crop_size = 17
  refused, allowed = config_lib.resume_changes(saved, json.loads(new.to_json_best_effort()))
  assert [line.split(':')[0] for line in refused] == ['config.data.crop_size']
  assert [line.split(':')[0] for line in allowed] == ['config.data.digits.cache']
