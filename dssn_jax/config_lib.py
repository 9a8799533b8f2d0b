"""The configuration contract of dssn_jax, and the one place durations and
method presets are resolved.

Every file in `configs/` starts from `base_config()` and overrides what its
recipe changes. Values left as placeholders (None) mean "the method's
default" and are filled by `resolve_method` from `METHOD_PRESETS`; training
durations given in epochs are turned into steps by `resolve_steps`, which
needs the size of the unlabeled set and so runs once the data is known.

Loss weights are *effective* weights of the total objective. The reference
writes DSSN's VOC total as

    0.5 * (L_x + 0.25 * (L_s1 + L_s2 + L_fp1 + L_fp2) + 0.01 * (L_img + L_feat))

which is `sup=0.5, strong=0.125, fp=0.125, align_image=0.005,
align_feature=0.005`; its Cityscapes total `(L_x + 0.25*(...))/2 +
0.005*(L_img + L_feat)` gives the same numbers. A weight of 0 is an ablation:
the term is not computed at all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

METHODS = ('dssn', 'unimatch', 'fixmatch', 'supervised')

# Spec "Presets": what each method reduces to.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
  'dssn': dict(
    sup=0.5,
    strong=0.125,
    fp=0.125,
    align_image=0.005,
    align_feature=0.005,
    fp_branches=2,
    strong_views=2,
    pseudo_label='class_aware',
    threshold=0.95,
    teacher='ema',
  ),
  'unimatch': dict(
    sup=0.5,
    strong=0.125,
    fp=0.25,
    align_image=0.0,
    align_feature=0.0,
    fp_branches=1,
    strong_views=2,
    pseudo_label='fixed',
    threshold=0.95,
    teacher='student',
  ),
  'fixmatch': dict(
    sup=0.5,
    strong=0.5,
    fp=0.0,
    align_image=0.0,
    align_feature=0.0,
    fp_branches=0,
    strong_views=1,
    pseudo_label='fixed',
    threshold=0.95,
    teacher='student',
  ),
  'supervised': dict(
    sup=1.0,
    strong=0.0,
    fp=0.0,
    align_image=0.0,
    align_feature=0.0,
    fp_branches=0,
    strong_views=0,
    pseudo_label='fixed',
    threshold=0.95,
    teacher='student',
  ),
}

LOSS_WEIGHTS = ('sup', 'strong', 'fp', 'align_image', 'align_feature')


def base_config() -> ml_collections.ConfigDict:
  """All keys any part of dssn_jax reads, with the VOC reference recipe."""
  c = ml_collections.ConfigDict()
  c.method = 'dssn'
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # resnet50 | resnet101 | resnet_tiny | dinov2_small | dinov2_base | dinov2_large
  # | dinov2_giant | dinov2_tiny (dssn_jax.models.registry)
  c.model.backbone = 'resnet101'
  c.model.pretrained = ''  # path of backbone weights (.pth / .npz); '' = random init
  # dssn | torchvision | timm | model (ResNet); dinov2 | timm_dinov2 | hf_dinov2
  # | unimatch_v2 (DINOv2); auto: detected from the keys
  c.model.pretrained_layout = 'dssn'
  c.model.deep_stem = True  # False: torchvision 7x7 stem
  c.model.output_stride = 16  # 16 or 8
  c.model.width_multiplier = 1.0  # scales every backbone and head width
  c.model.dtype = 'float32'  # compute dtype; params and BN statistics stay float32
  c.model.dropout = 0.5  # Dropout2d rate of the feature-perturbation branches
  # DINOv2 attention: xla (softmax(QK^T)V, the T x T probabilities kept for the
  # backward pass) | cudnn (GPU flash attention, bfloat16/float16 only)
  c.model.attention = 'xla'
  # Decoder BN with perturbed copies: joint (reference: statistics over clean
  # and perturbed rows) | clean (statistics from the clean rows only).
  c.model.fp_bn = 'joint'
  c.model.fp_branches = config_dict.placeholder(int)  # None: method preset

  c.data = ml_collections.ConfigDict()
  c.data.name = 'pascal'  # pascal | cityscapes | coco | folder | tfds | digits
  c.data.root = ''
  c.data.splits_dir = ''
  c.data.split = '92'
  c.data.num_classes = 21
  c.data.ignore_index = 255
  c.data.crop_size = 513
  c.data.batch_size = 8  # global labeled batch; the unlabeled batch is the same
  c.data.workers = 2  # grain worker processes per host (0 = in-process)
  c.data.prefetch = 2  # batches buffered per worker
  c.data.scale_range = (0.5, 2.0)  # long-side rescale range
  c.data.hflip = True  # random horizontal flip p=0.5 (False: never, e.g. digits)
  c.data.strong_ops = 3  # RandAugment-style ops per strong view, k ~ U{1..n}; 0 = off
  c.data.cutmix_p = 0.5
  # Mix partner of the cutmix: 'shuffled' = an independently ordered pass over
  # the unlabeled list (spec); 'same' = the reference code's zip of one
  # loader with itself, i.e. the same image with other random views.
  c.data.mix_partner = 'shuffled'
  c.data.eval_mode = 'original'  # original | center_crop | sliding_window
  c.data.eval_crop_size = config_dict.placeholder(int)  # None: crop_size
  # Source-specific settings (read only by that source).
  c.data.folder = ml_collections.ConfigDict(
    dict(
      labeled_images='',
      labeled_masks='',
      unlabeled_images='',
      val_images='',
      val_masks='',
      mask_suffix='.png',
      class_names='',
    )
  )
  c.data.tfds = ml_collections.ConfigDict(
    dict(
      name='',
      data_dir='',
      train_split='train',
      val_split='validation',
      image_key='image',
      mask_key='segmentation_mask',
      label_map='',
      num_labeled=0,
      class_names='',
    )
  )
  c.data.digits = ml_collections.ConfigDict(
    dict(
      image_size=96,
      num_labeled=20,
      num_unlabeled=2000,
      num_val=300,
      tail=0.7,
      max_digits=4,
      data_seed=0,
      clutter=(2, 5),
    )
  )  # min, max non-digit clutter items per scene

  c.loss = ml_collections.ConfigDict()
  c.loss.sup_type = 'ce'  # ce | ohem
  c.loss.ohem_thresh = 0.7
  c.loss.ohem_min_kept = 100000
  for name in LOSS_WEIGHTS:  # None: method preset
    c.loss[name] = config_dict.placeholder(float)
  c.loss.pseudo_label = config_dict.placeholder(str)  # class_aware | fixed
  c.loss.class_aware_high = 0.92
  c.loss.class_aware_scale = 0.96
  c.loss.threshold = config_dict.placeholder(float)  # fixed rule; None: preset

  c.train = ml_collections.ConfigDict()
  c.train.steps = config_dict.placeholder(int)  # either steps or epochs
  c.train.epochs = config_dict.placeholder(float)
  c.train.lr = 0.002
  c.train.lr_multi = 10.0  # head (all but the backbone) learns at lr * lr_multi
  c.train.optimizer = 'sgd'  # sgd (reference) | adamw
  c.train.momentum = 0.9  # sgd only
  c.train.weight_decay = 1e-4
  c.train.poly_power = 0.9
  c.train.scale_lr_with_batch = False
  c.train.reference_batch_size = 8  # global labeled batch the lr was tuned for
  c.train.ema_decay = 0.996
  # Warm-up (DSSN only): strong-view terms off and EMA keep rate 0 while
  # step < warmup.
  c.train.warmup_steps = 1  # VOC reference: the first iteration only
  c.train.warmup_epochs = config_dict.placeholder(float)  # overrides warmup_steps
  # Which terms the warm-up switches off: 'strong' (reference: the strong-view
  # terms only; fp and alignment train from step 0) | 'unlabeled' (every
  # unlabeled term: strong, fp, align_image, align_feature).
  c.train.warmup_terms = 'strong'
  # BatchNorm of the clean student forward: 'joint' (reference: one forward
  # on concat(x, u_w), statistics over both) | 'separate' (x alone, then u_w
  # with its fp copies; the running statistics threaded from one to the next).
  c.train.labeled_bn = 'joint'
  # Teacher BatchNorm: reference (batch statistics in the first epoch, running
  # after, as the reference's eval() leaves it) | batch | running.
  c.train.teacher_bn = 'reference'
  # The student's forward on the strong (photometric + cutmix) views updates
  # its running BatchNorm statistics, as in the reference (True); False keeps
  # them from the labeled and weak views only (the strong forward still
  # normalizes with its own batch statistics).
  c.train.strong_view_bn_stats = True
  c.train.remat = False  # rematerialize each residual / transformer block
  # No gradient and no optimizer state for the backbone (UniMatch V2's
  # lock_backbone); DINOv2 models also stop the backward pass at the encoder.
  c.train.freeze_backbone = False
  c.train.log_every = 20
  c.train.eval_every = config_dict.placeholder(int)  # None: once per epoch
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.eval_student = True
  return c


@dataclasses.dataclass(frozen=True)
class MethodSettings:
  """The resolved, hashable view of a method and its loss terms.

  Passed as a static argument to the jitted train step.
  """

  method: str
  sup: float
  strong: float
  fp: float
  align_image: float
  align_feature: float
  fp_branches: int
  strong_views: int
  pseudo_label: str
  threshold: float
  class_aware_high: float
  class_aware_scale: float
  teacher: str  # 'ema' (DSSN) or 'student' (UniMatch, FixMatch)
  teacher_bn: str
  sup_type: str
  ohem_thresh: float
  ohem_min_kept: int
  ignore_index: int
  strong_view_bn_stats: bool = True  # strong-view forward updates running BN stats
  warmup_terms: str = 'strong'  # terms the warm-up switches off: strong | unlabeled
  labeled_bn: str = 'joint'  # clean forward: concat(x, u_w) (joint) or x, u_w apart


def one_of(key: str, value, options: tuple[str, ...]):
  """`value` if it is one of `options`, else a ValueError naming `config.<key>`."""
  if value not in options:
    raise ValueError(f'config.{key}={value!r} must be one of {", ".join(options)}')
  return value


def resolve_method(config: ml_collections.ConfigDict) -> MethodSettings:
  """Fills the method's defaults into every placeholder; explicit values win."""
  if config.method not in METHOD_PRESETS:
    raise ValueError(f'config.method={config.method!r} is not one of {", ".join(METHODS)}')
  preset = METHOD_PRESETS[config.method]

  def pick(value, key):
    return preset[key] if value is None else value

  rule = one_of(
    'loss.pseudo_label', pick(config.loss.pseudo_label, 'pseudo_label'), ('class_aware', 'fixed')
  )
  one_of('train.teacher_bn', config.train.teacher_bn, ('reference', 'batch', 'running'))
  warmup_terms = one_of(
    'train.warmup_terms', config.train.get('warmup_terms', 'strong'), ('strong', 'unlabeled')
  )
  labeled_bn = one_of(
    'train.labeled_bn', config.train.get('labeled_bn', 'joint'), ('joint', 'separate')
  )
  one_of('loss.sup_type', config.loss.sup_type, ('ce', 'ohem'))
  fp_branches = pick(config.model.fp_branches, 'fp_branches')
  weights = {k: float(pick(config.loss[k], k)) for k in LOSS_WEIGHTS}
  if fp_branches == 0:
    weights['fp'] = 0.0
  if fp_branches < 2:
    weights['align_feature'] = 0.0
  return MethodSettings(
    method=config.method,
    **weights,
    fp_branches=int(fp_branches),
    strong_views=int(preset['strong_views']),
    pseudo_label=rule,
    threshold=float(pick(config.loss.threshold, 'threshold')),
    class_aware_high=float(config.loss.class_aware_high),
    class_aware_scale=float(config.loss.class_aware_scale),
    teacher=preset['teacher'],
    teacher_bn=config.train.teacher_bn,
    sup_type=config.loss.sup_type,
    ohem_thresh=float(config.loss.ohem_thresh),
    ohem_min_kept=int(config.loss.ohem_min_kept),
    ignore_index=int(config.data.ignore_index),
    strong_view_bn_stats=bool(config.train.get('strong_view_bn_stats', True)),
    warmup_terms=warmup_terms,
    labeled_bn=labeled_bn,
  )


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Durations in steps, resolved once from steps or epochs."""

  total_steps: int
  steps_per_epoch: int
  warmup_steps: int
  eval_every: int
  lr: float
  head_lr: float


def resolve_steps(config: ml_collections.ConfigDict, num_unlabeled: int) -> Schedule:
  """Turns epochs into steps: one epoch is one pass over the unlabeled list.

  `config.train.steps`, when set, wins over `config.train.epochs`.

  Args:
    config: the experiment config.
    num_unlabeled: size of the unlabeled list (for `supervised`, the labeled
      list, since that is what an epoch passes over then).
  """
  batch = int(config.data.batch_size)
  if batch <= 0:
    raise ValueError(f'config.data.batch_size={batch} must be positive')
  steps_per_epoch = max(1, num_unlabeled // batch)
  steps, epochs = config.train.steps, config.train.epochs
  if steps is None and epochs is None:
    raise ValueError('set config.train.steps or config.train.epochs')
  # Both set: steps wins, so `--config.train.steps=N` shortens any config.
  total = int(steps) if steps is not None else int(math.ceil(epochs * steps_per_epoch))
  if total <= 0:
    raise ValueError(f'training length resolves to {total} steps; it must be positive')
  if config.method != 'dssn':
    warmup = 0  # UniMatch / FixMatch have no warm-up
  elif config.train.warmup_epochs is not None:
    warmup = int(round(config.train.warmup_epochs * steps_per_epoch))
  else:
    warmup = int(config.train.warmup_steps)
  eval_every = config.train.eval_every or steps_per_epoch
  lr = float(config.train.lr)
  if config.train.scale_lr_with_batch:
    lr *= batch / float(config.train.reference_batch_size)
  return Schedule(
    total_steps=total,
    steps_per_epoch=steps_per_epoch,
    warmup_steps=warmup,
    eval_every=int(eval_every),
    lr=lr,
    head_lr=lr * float(config.train.lr_multi),
  )


def parse_arg(arg: str | None, **defaults) -> dict[str, Any]:
  """Parses a `get_config` argument `k=v,k2=v2` (or a bare first value).

  A bare value (`pascal.py:92`) sets the first key of `defaults`. Values are
  converted to the type of the default. Unknown keys are an error that names
  them.
  """
  out = dict(defaults)
  if not arg:
    return out
  first = next(iter(defaults)) if defaults else None
  for part in arg.split(','):
    if not part:
      continue
    if '=' in part:
      key, value = part.split('=', 1)
    elif first is not None:
      key, value = first, part
    else:
      raise ValueError(f'config argument {part!r} has no key')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r} in {arg!r}; known: {", ".join(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = kind(value)
  return out
