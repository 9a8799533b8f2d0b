"""The configuration contract of dssn_jax, and the one place durations and
method presets are resolved.

Every file in `configs/` starts from `base_config()` and overrides what its
recipe changes. `resolve(config)` turns a config into the frozen `Settings`
the train step, the pipeline and the loop read, once: values left as
placeholders (None) mean "the method's default" and are filled from the
method's own `Settings` class (`dssn_jax.methods`); training durations given
in epochs are turned into steps by `Settings.schedule`, which needs the size
of the unlabeled set and so runs once the data is known.

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
import difflib
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from dssn_jax import methods as methods_lib
from dssn_jax import registry
from dssn_jax.errors import ConfigError, one_of
from dssn_jax.models import layers
from dssn_jax.models import registry as model_registry

LOSS_WEIGHTS = ('sup', 'strong', 'fp', 'align_image', 'align_feature')

__all__ = [
  'ConfigError',
  'one_of',
  'base_config',
  'validate',
  'resolve',
  'Settings',
  'Schedule',
  'parse_arg',
  'resume_changes',
]


def base_config() -> ml_collections.ConfigDict:
  """All keys any part of dssn_jax reads, with the VOC reference recipe."""
  c = ml_collections.ConfigDict()
  c.method = 'dssn'
  c.seed = 0
  # Modules to import before the config is resolved: each registers datasets,
  # backbone families or methods from outside dssn_jax (docs/extending.md).
  c.imports = ()

  c.model = ml_collections.ConfigDict()
  # resnet50 | resnet101 | resnet_tiny | dinov2_small | dinov2_base | dinov2_large
  # | dinov2_giant | dinov2_tiny | dinov3_small | dinov3_small_plus | dinov3_base
  # | dinov3_large | dinov3_large_plus | dinov3_huge_plus | dinov3_7b | dinov3_tiny
  # (dssn_jax.models.registry)
  c.model.backbone = 'resnet101'
  c.model.pretrained = ''  # path of backbone weights (.pth / .npz); '' = random init
  # dssn | torchvision | timm | model (ResNet); dinov2 | timm_dinov2 | hf_dinov2
  # | unimatch_v2 (DINOv2); dinov3 | timm_dinov3 | hf_dinov3 (DINOv3); auto:
  # detected from the keys
  c.model.pretrained_layout = 'dssn'
  c.model.deep_stem = True  # False: torchvision 7x7 stem
  c.model.output_stride = 16  # 16 or 8
  c.model.width_multiplier = 1.0  # scales every backbone and head width
  c.model.dtype = 'float32'  # compute dtype; params and BN statistics stay float32
  c.model.dropout = 0.5  # Dropout2d rate of the feature-perturbation branches
  # ViT attention (dssn_jax.models.attention): xla (softmax(QK^T)V, the T x T
  # probabilities kept for the backward pass) | cudnn (GPU flash attention,
  # bfloat16/float16 only) | chunked (blocks of queries, recomputed in the
  # backward pass) | auto (cudnn on GPUs in bf16, chunked on TPUs, else xla)
  c.model.attention = 'xla'
  # DINOv3 only: in training mode, scale the RoPE coordinates by a log-uniform
  # draw in [1/r, r] per forward (Meta's pre-training `rescale_coords=2`),
  # from the model's 'rope' rng. 0: off (the default: docs/backbones.md).
  c.model.rope_rescale = 0.0
  # Decoder BN with perturbed copies: joint (reference: statistics over clean
  # and perturbed rows) | clean (statistics from the clean rows only).
  c.model.fp_bn = 'joint'
  c.model.fp_branches = config_dict.placeholder(int)  # None: method preset
  # Models with tapped features (model.feature_dim: DINOv2/DPT): the fp
  # branches' channel masks, 'independent' (DSSN's Dropout2d, each branch its
  # own mask) | 'complementary' (m and 2 - m); None: method preset.
  c.model.fp_masks = config_dict.placeholder(str)
  # UniMatch V2's complementary dropout of the two strong views' tapped
  # features (None: method preset; on for unimatch_v2 only) and the fraction
  # of pairs it leaves undropped.
  c.model.comp_drop = config_dict.placeholder(bool)
  c.model.comp_drop_kept = 0.5

  c.data = ml_collections.ConfigDict()
  c.data.name = 'pascal'  # a dssn_jax.data.datasets name: pascal | cityscapes | coco | ade20k | folder | tfds | digits
  c.data.root = ''
  c.data.splits_dir = ''
  c.data.split = '92'
  c.data.num_classes = 21
  c.data.ignore_index = 255
  c.data.crop_size = 513
  c.data.batch_size = 8  # global labeled batch; the unlabeled batch is the same
  # grain worker processes per host: 0 = in-process; -1 = auto, from the
  # available cores and the measured input cost (data.pipeline.auto_workers),
  # enough to feed a step of `workers_step_s` seconds.
  c.data.workers = -1
  c.data.workers_step_s = 0.1
  c.data.prefetch = 2  # batches buffered per worker
  c.data.scale_range = (0.5, 2.0)  # long-side rescale range
  c.data.hflip = True  # random horizontal flip p=0.5 (False: never, e.g. digits)
  c.data.strong_ops = 3  # RandAugment-style ops per strong view, k ~ U{1..n}; 0 = off
  c.data.cutmix_p = 0.5
  # Mix partner of the cutmix (None: method preset): 'same' = the reference
  # code's zip of one loader with itself, i.e. the same image with other
  # random views (dssn, unimatch, fixmatch); 'shuffled' = an independently
  # ordered pass over the unlabeled list; 'reversed' = the batch reversed,
  # no partner stream (unimatch_v2 only).
  c.data.mix_partner = config_dict.placeholder(str)
  c.data.eval_mode = 'original'  # original | center_crop | sliding_window
  # 'original' mode only: resize each image (bilinear, align corners) to the
  # nearest multiple of this per side, predict, resize the logits back
  # (UniMatch V2's ViTs: 14). 0 = whole image as is (ResNet, the default).
  c.data.eval_resize_multiple = 0
  # sliding_window mode: 'truncate' (UniMatch V1 / DSSN: border windows cut
  # short) | 'shift' (UniMatch V2: the last window ends at the border, whole).
  c.data.eval_window_edges = 'truncate'
  c.data.eval_crop_size = config_dict.placeholder(int)  # None: crop_size
  # Evaluation shape buckets: 0 = every image at its own shape (reference);
  # N = pad each side to a multiple of N (zeros / ignore): few programs,
  # slightly different predictions near the padding (docs/performance.md);
  # -1 = auto: 0 on a CPU, 64 on GPUs and TPUs (evaluate.resolve_pad_to).
  c.data.eval_pad_to = -1
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
  # ADE20K's label convention: 'authors' (UniMatch V2's annotations, train ids
  # 0..149) | 'raw' (ADEChallengeData2016: 0 = ignore, 1..150 -> 0..149).
  c.data.ade20k = ml_collections.ConfigDict(dict(labels='authors'))
  c.data.digits = ml_collections.ConfigDict(
    dict(
      image_size=96,
      num_labeled=20,
      num_unlabeled=2000,
      num_val=300,
      tail=0.7,
      max_digits=4,
      data_seed=0,
      clutter=(2, 5),  # min, max non-digit clutter items per scene
      # Keep each rendered scene in memory (per process; ~28 KB a 96x96
      # scene): a scene is drawn again every epoch, the same bytes each time.
      cache=True,
    )
  )

  c.loss = ml_collections.ConfigDict()
  c.loss.sup_type = 'ce'  # ce | ohem
  c.loss.ohem_thresh = 0.7
  # Pixels OHEM keeps at least: per group (one GPU's batch) with
  # train.loss_groups > 1, per image with loss_groups = 1.
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
  # Micro-batches per global batch: one optimizer update from the summed
  # gradients, equal to the full-batch update (models without BatchNorm).
  c.train.grad_accum = 1
  # The number of GPUs of the recipe being reproduced: every per-GPU quantity
  # of the authors' loop (loss denominators, cutmix partners, complementary
  # dropout's undropped pairs, OHEM's min_kept) is computed per group of
  # batch_size / loss_groups consecutive samples, the groups averaged as DDP
  # averages gradients (methods.common). 1: one objective over the global batch.
  c.train.loss_groups = 1
  # Warm-up (DSSN only): strong-view terms off and EMA keep rate 0 while
  # step < warmup.
  c.train.warmup_steps = 1  # VOC reference: the first iteration only
  c.train.warmup_epochs = config_dict.placeholder(float)  # overrides warmup_steps
  # Which terms the warm-up switches off: 'strong' (reference: the strong-view
  # terms only; fp and alignment train from step 0) | 'unlabeled' (every
  # unlabeled term: strong, fp, align_image, align_feature) | 'supervised'
  # (as 'unlabeled', and the warm-up steps run the supervised iteration
  # itself: only x, y are transferred and forwarded, BatchNorm statistics
  # come from the labeled forward; a fraction of the full step's cost).
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
  c.train.prediction_grid = 8  # validation scenes in DIR/predictions.png and TensorBoard; 0: off
  # A live, paired baseline (semi-supervised methods): after the run, the
  # supervised iteration trains on the run's own labeled batches from the
  # state where its labeled-only steps end (DSSN's supervised warm-up; step 0
  # otherwise) to the same last step, in DIR/supervised/; the last lines
  # compare the teacher with it. Costs the supervised steps after that point.
  c.train.supervised_branch = False
  # A step whose loss or gradient is not finite applies no update. 'stop':
  # the run ends with an error (the newest checkpoint is the last good
  # state); 'skip': training goes on, failing after `nonfinite_max_skips`
  # such steps in a row.
  c.train.nonfinite = 'stop'
  c.train.nonfinite_max_skips = 10
  # Compile the evaluation programs (one per validation image shape) in a
  # background thread from the start of training; numbers are unchanged.
  c.train.eval_precompile = True
  c.train.eval_precompile_threads = 0  # compiler threads; 0: 1 on CPU, cores/4 (<= 8) else
  # Compile each later phase's step in a background thread from the start:
  # the full step while a supervised warm-up runs, DSSN's running-BN teacher
  # (teacher_bn='reference') while the first epoch runs; numbers are unchanged.
  c.train.step_precompile = True
  # JAX's persistent compilation cache ('' = off unless JAX_COMPILATION_CACHE_DIR
  # is set); a restarted run loads its compiled programs from here.
  c.train.compilation_cache_dir = '~/.cache/dssn_jax/xla'

  # What the final teacher mIoU is to be compared with, printed after the
  # `final:` line: a measured baseline of this config (None: nothing printed).
  c.baseline = ml_collections.ConfigDict()
  c.baseline.miou = config_dict.placeholder(float)  # percent
  c.baseline.std = config_dict.placeholder(float)  # over `seeds`
  c.baseline.seeds = 0
  c.baseline.steps = 0  # the schedule it was measured at
  c.baseline.what = ''  # e.g. 'supervised, same labels'
  c.baseline.command = ''  # reproduces it
  # Its per-class IoU (percent, in class order), printed beside the run's.
  c.baseline.iou_per_class = ()
  return c


def apply_unimatch_v2_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The optimization and evaluation of UniMatch V2's runs (every dataset).

  AdamW (betas 0.9/0.999, weight decay 0.01), encoder lr 5e-6 and everything
  else at 40x, poly decay 0.9, EMA keep rate capped at 0.996, and the
  `original` evaluation with each image resized to a multiple of 14. The
  dataset configs set crop, epochs, batch, loss and `freeze_backbone`.
  """
  c.train.optimizer = 'adamw'
  c.train.weight_decay = 0.01
  c.train.lr = 5e-6
  c.train.lr_multi = 40.0
  c.train.poly_power = 0.9
  c.train.ema_decay = 0.996
  c.data.eval_resize_multiple = 14
  c.data.eval_window_edges = 'shift'
  c.data.strong_ops = 0  # color jitter, grayscale, blur, cutmix only
  return c


def dinov2_recipe(
  c: ml_collections.ConfigDict,
  backbone: str,
  *,
  crop: int,
  epochs: float,
  batch: int,
  freeze_backbone: bool = False,
) -> ml_collections.ConfigDict:
  """A dataset config switched to UniMatch V2's DINOv2/DPT recipe, for any ViT family.

  `crop` is the authors' DINOv2 crop (518, 798): it becomes the nearest
  multiple of the backbone's patch (DINOv2 14: unchanged; DINOv3 16: 512,
  800), as does the evaluation resize multiple. `batch` is the global
  labeled batch (the authors' per-GPU batch x 4 GPUs,
  `config.train.loss_groups=4`: their per-GPU update, also for `dssn`,
  which has no published DINOv2 recipe and takes UniMatch V2's GPUs);
  `freeze_backbone` is their `lock_backbone` (`config.train.freeze_backbone`,
  read by the DINOv2 model's optimizer). Any method runs on it; `dssn` keeps
  its own losses, CPLG and warm-up.
  """
  apply_unimatch_v2_recipe(c)
  c.train.loss_groups = 4  # the authors' 4 GPUs (every UniMatch V2 recipe)
  patch = model_registry.family_of(backbone).patch
  c.data.eval_resize_multiple = patch
  c.model.backbone = backbone
  c.model.pretrained = f'pretrained/{backbone}.pth'
  c.model.pretrained_layout = 'auto'  # hub, timm or Hugging Face keys: told apart by name
  c.data.crop_size = patch * max(1, round(crop / patch))
  c.data.batch_size = batch
  c.train.epochs = float(epochs)
  c.train.freeze_backbone = bool(freeze_backbone)
  return c


# The `precision=` argument every config takes (`apply_precision`).
PRECISIONS = ('fp32', 'bf16')


def apply_precision(c: ml_collections.ConfigDict, precision: str) -> ml_collections.ConfigDict:
  """The `precision=` config argument of every config.

  'fp32' (default): the authors' float32 everywhere, XLA's plain attention.
  'bf16': the accelerator preset: `model.dtype='bfloat16'` (convolutions,
  matmuls and activations in bfloat16; parameters, optimizer state,
  BatchNorm / LayerNorm statistics, softmax, the residual stream of the
  ViTs and every loss stay float32) and `model.attention='auto'` (cuDNN
  flash attention on NVIDIA GPUs, query-chunked attention on TPUs:
  `dssn_jax.models.attention`). What it trades: docs/performance.md.
  """
  if precision not in PRECISIONS:
    raise ConfigError(
      f'config argument precision={precision!r} is not one of {", ".join(PRECISIONS)}'
    )
  if precision == 'bf16':
    c.model.dtype = 'bfloat16'
    c.model.attention = 'auto'
  return c


def is_vit(backbone: str) -> bool:
  """Whether `backbone`'s family is a ViT (has a patch size): configs switch
  to UniMatch V2's recipe (`dinov2_recipe`) for those."""
  return model_registry.family_of(backbone).patch is not None


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Durations in steps, resolved once from steps or epochs."""

  total_steps: int
  steps_per_epoch: int
  warmup_steps: int
  eval_every: int
  lr: float
  head_lr: float


@dataclasses.dataclass(frozen=True)
class Durations:
  """What `Settings.schedule` turns into steps once the epoch size is known."""

  batch: int
  steps: int | None
  epochs: float | None
  warmup: bool  # whether the method has a warm-up (DSSN)
  warmup_steps: int
  warmup_epochs: float | None
  eval_every: int | None
  lr: float
  lr_multi: float
  reference_batch_size: int
  scale_lr_with_batch: bool


@dataclasses.dataclass(frozen=True)
class Settings:
  """A config resolved once: what the train step, the pipeline and the loop read.

  Frozen and hashable (the train step is compiled for one value).

  Attributes:
    method: the method's own settings (`methods.<name>.Settings`): its loss
      weights, pseudo-label rule, teacher and mix-partner choices.
    grad_accum: micro-batches per global batch (`methods.gradients`).
    ema_schedule: the configured method's EMA keep-rate rule.
    unlabeled: whether the method reads the unlabeled stream.
    durations: the inputs of `schedule`.
  """

  method: Any
  grad_accum: int
  ema_schedule: str
  unlabeled: bool
  durations: Durations

  @property
  def mix_partner(self) -> str:
    return self.method.mix_partner

  def schedule(self, num_unlabeled: int) -> Schedule:
    """Turns epochs into steps: one epoch is one pass over the unlabeled list.

    `config.train.steps`, when set, wins over `config.train.epochs`.

    Args:
      num_unlabeled: size of the unlabeled list (for `supervised`, the
        labeled list, since that is what an epoch passes over then).
    """
    d = self.durations
    steps_per_epoch = max(1, num_unlabeled // d.batch)
    # Both set: steps wins, so `--config.train.steps=N` shortens any config.
    total = int(d.steps) if d.steps is not None else int(math.ceil(d.epochs * steps_per_epoch))
    if total <= 0:
      raise ConfigError(f'training length resolves to {total} steps; it must be positive')
    if not d.warmup:
      warmup = 0  # only DSSN has a warm-up
    elif d.warmup_epochs is not None:
      warmup = int(round(d.warmup_epochs * steps_per_epoch))
    else:
      warmup = int(d.warmup_steps)
    lr = float(d.lr)
    if d.scale_lr_with_batch:
      lr *= d.batch / float(d.reference_batch_size)
    return Schedule(
      total_steps=total,
      steps_per_epoch=steps_per_epoch,
      warmup_steps=warmup,
      eval_every=int(d.eval_every or steps_per_epoch),
      lr=lr,
      head_lr=lr * float(d.lr_multi),
    )

  def labeled_only_steps(self, num_unlabeled: int) -> int:
    """How many first steps read the labeled batch alone (a supervised warm-up)."""
    if not self.unlabeled:
      return 0
    return self.method.labeled_only_steps(self.schedule(num_unlabeled))


def _grad_accum(config: ml_collections.ConfigDict, method) -> int:
  grad_accum = int(config.train.grad_accum)
  groups = method.loss_groups
  batch = int(config.data.batch_size)
  if batch % groups:
    raise ConfigError(
      f'config.train.loss_groups={groups} does not divide config.data.batch_size={batch}: '
      'each group is one GPU batch of the reproduced recipe, of batch_size / loss_groups samples'
    )
  if grad_accum < 1:
    raise ConfigError(f'config.train.grad_accum={grad_accum} must be >= 1')
  if grad_accum > 1 and batch % grad_accum:
    raise ConfigError(
      f'config.train.grad_accum={grad_accum} does not divide config.data.batch_size={batch}'
    )
  if grad_accum > 1 and method.sup_type == 'ohem' and (groups == 1 or groups % grad_accum):
    raise ConfigError(
      f"config.train.grad_accum={grad_accum} with loss.sup_type='ohem' and "
      f'config.train.loss_groups={groups}: OHEM keeps a number of pixels whose count is '
      'known only after the forward, so its selection and mean need whole groups in one '
      'micro-batch; set loss_groups to a multiple of grad_accum (each micro-batch then '
      'holds whole groups), or grad_accum=1, or sup_type=ce'
    )
  return grad_accum


def _durations(config: ml_collections.ConfigDict, method: methods_lib.Method) -> Durations:
  t = config.train
  batch = int(config.data.batch_size)
  if batch <= 0:
    raise ConfigError(f'config.data.batch_size={batch} must be positive')
  if t.steps is None and t.epochs is None:
    raise ConfigError('set config.train.steps or config.train.epochs')
  return Durations(
    batch=batch,
    steps=None if t.steps is None else int(t.steps),
    epochs=None if t.epochs is None else float(t.epochs),
    warmup=method.warmup,
    warmup_steps=int(t.warmup_steps),
    warmup_epochs=None if t.warmup_epochs is None else float(t.warmup_epochs),
    eval_every=t.eval_every,
    lr=float(t.lr),
    lr_multi=float(t.lr_multi),
    reference_batch_size=int(t.reference_batch_size),
    scale_lr_with_batch=bool(t.scale_lr_with_batch),
  )


def _resolve_unchecked(config: ml_collections.ConfigDict) -> Settings:
  method = methods_lib.get(config.method)
  settings = method.settings.from_config(config, method.name)
  return Settings(
    method=settings,
    grad_accum=_grad_accum(config, settings),
    ema_schedule=method.ema_schedule,
    unlabeled=method.unlabeled,
    durations=_durations(config, method),
  )


def resolve(config: ml_collections.ConfigDict) -> Settings:
  """The one resolution of a config: imports `config.imports`, checks every
  value (`validate`) and builds the frozen `Settings`.

  Raises:
    ConfigError: naming every key whose value cannot work.
  """
  validate(config)
  return _resolve_unchecked(config)


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
      raise ConfigError(f'config argument {part!r} has no key')
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f'did you mean {close[0]!r}? ' if close else ''
      raise ConfigError(
        f'unknown config argument {key!r} in {arg!r}; {hint}known: {", ".join(defaults)}'
      )
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(
          f'config argument {key}={value!r} cannot be read as {kind.__name__}'
        ) from None
  return out


# Ranges of the numeric keys: key -> (low, high, low_open, high_open, what).
# None leaves a side unbounded.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool, str]] = {
  **{f'loss.{k}': (0.0, None, False, False, 'a loss weight') for k in LOSS_WEIGHTS},
  'loss.threshold': (0.0, 1.0, False, False, 'a confidence threshold'),
  'loss.class_aware_high': (0.0, 1.0, False, False, 'a confidence threshold'),
  'loss.class_aware_scale': (0.0, 1.0, False, False, 'a scale of confidences'),
  'loss.ohem_thresh': (0.0, 1.0, False, False, 'a probability threshold'),
  'loss.ohem_min_kept': (0, None, False, False, 'a pixel count'),
  'train.ema_decay': (0.0, 1.0, False, True, 'an EMA keep rate'),
  'train.momentum': (0.0, 1.0, False, True, 'a momentum'),
  'train.lr': (0.0, None, True, False, 'a learning rate'),
  'train.lr_multi': (0.0, None, True, False, 'a learning-rate factor'),
  'train.weight_decay': (0.0, None, False, False, 'a weight decay'),
  'train.poly_power': (0.0, None, False, False, 'a schedule power'),
  'train.reference_batch_size': (1, None, False, False, 'a batch size'),
  'train.loss_groups': (1, None, False, False, 'a group (GPU) count'),
  'train.steps': (1, None, False, False, 'a step count'),
  'train.epochs': (0.0, None, True, False, 'an epoch count'),
  'train.warmup_steps': (0, None, False, False, 'a step count'),
  'train.warmup_epochs': (0.0, None, False, False, 'an epoch count'),
  'train.log_every': (1, None, False, False, 'a step count'),
  'train.eval_every': (1, None, False, False, 'a step count'),
  'train.checkpoint_every': (1, None, False, False, 'a step count'),
  'train.keep_checkpoints': (1, None, False, False, 'a checkpoint count'),
  'train.nonfinite_max_skips': (1, None, False, False, 'a step count'),
  'train.prediction_grid': (0, None, False, False, 'a scene count'),
  'model.dropout': (0.0, 1.0, False, True, 'a dropout rate'),
  'model.rope_rescale': (0.0, None, False, False, 'a RoPE rescale factor: 0 off, else >= 1'),
  'model.width_multiplier': (0.0, None, True, False, 'a width factor'),
  'model.fp_branches': (0, 2, False, False, 'a branch count'),
  'data.num_classes': (1, 255, False, False, 'a class count (255 is the ignore label)'),
  'data.ignore_index': (0, 255, False, False, 'a uint8 label'),
  'data.batch_size': (1, None, False, False, 'a batch size'),
  'data.workers': (-1, None, False, False, 'a process count; -1: from the host cores'),
  'data.prefetch': (1, None, False, False, 'a batch count'),
  'data.strong_ops': (0, None, False, False, 'an op count'),
  'data.cutmix_p': (0.0, 1.0, False, False, 'a probability'),
}

# String keys and their choices (those the method settings do not check).
_CHOICES: dict[str, tuple[str, ...]] = {
  'model.fp_bn': ('joint', 'clean'),
  'data.eval_mode': ('original', 'center_crop', 'sliding_window'),
  'train.optimizer': ('sgd', 'adamw'),
  'train.nonfinite': ('stop', 'skip'),
}


def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _range_text(low, high, low_open, high_open) -> str:
  if high is None:
    return f'> {low}' if low_open else f'>= {low}'
  return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses impossible values before anything compiles.

  Checks every numeric key of `_RANGES` (None placeholders pass), the
  string choices, the output stride and that the crops hold at least one
  output-stride cell, and the method settings (`resolve`).

  Raises:
    ConfigError: one line per problem, each naming key, value and the
      allowed range.
  """
  registry.import_modules(tuple(config.get('imports', ())))
  problems = []
  for key, (low, high, low_open, high_open, what) in _RANGES.items():
    value = _get(config, key)
    if value is None:
      continue
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    if not ok:
      problems.append(
        f'config.{key}={value!r} must be {_range_text(low, high, low_open, high_open)} ({what})'
      )
  choices = {
    **_CHOICES,
    'method': methods_lib.names(),
    'model.backbone': tuple(model_registry.backbone_names()),
    'model.dtype': tuple(layers.DTYPES),
  }
  for key, options in choices.items():
    value = _get(config, key)
    if value not in options:
      problems.append(f'config.{key}={value!r} must be one of {", ".join(options)}')
  stride = config.model.output_stride
  patch = (
    model_registry.family_of(config.model.backbone).patch
    if config.model.backbone in model_registry.backbone_names()
    else None
  )
  if patch:  # a ViT: the training crop is a whole number of patches
    crop = config.data.crop_size
    if not isinstance(crop, int) or crop < patch or crop % patch:
      problems.append(
        f'config.data.crop_size={crop!r} must be a positive multiple of {patch} '
        f'(the patch size of {config.model.backbone})'
      )
  elif stride not in (8, 16):
    problems.append(f'config.model.output_stride={stride!r} must be 8 or 16')
  else:
    for key in ('data.crop_size', 'data.eval_crop_size'):
      value = _get(config, key)
      if value is not None and (not isinstance(value, int) or value < stride):
        problems.append(
          f'config.{key}={value!r} must be an integer >= {stride} (config.model.output_stride)'
        )
  low, high = (tuple(config.data.scale_range) + (None, None))[:2]
  if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low <= high):
    problems.append(
      f'config.data.scale_range={tuple(config.data.scale_range)!r} must be (low, high) '
      'with 0 < low <= high'
    )
  method = methods_lib.get(config.method) if config.method in methods_lib.names() else None
  if config.train.get('supervised_branch') and method and not method.unlabeled:
    problems.append(
      f'config.train.supervised_branch=True needs a semi-supervised method, not config.method={config.method!r}'
    )
  if config.train.steps is None and config.train.epochs is None:
    problems.append(
      'config.train.steps and config.train.epochs are both unset: set config.train.steps or config.train.epochs'
    )
  if not problems:
    try:
      _resolve_unchecked(config)
    except ConfigError as e:
      problems.append(str(e))
  if problems:
    raise ConfigError('\n'.join(problems))


# Resuming a workdir: keys that shape the train state or the data stream
# (prefixes) must equal the checkpoint's; inside them, the `RESUME_FREE`
# ones (paths, worker counts, evaluation) may change. Every other key may
# change and is noted in the log.
RESUME_FIXED = ('method', 'seed', 'model', 'data', 'train.optimizer')
RESUME_FREE = (
  'model.pretrained',
  'model.pretrained_layout',
  'data.root',
  'data.splits_dir',
  'data.workers',
  'data.prefetch',
  'data.eval_mode',
  'data.eval_crop_size',
  'data.folder',
  'data.tfds.data_dir',
  'data.digits.cache',  # the same scenes, rendered once or every time
)


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
  return any(key == p or key.startswith(p + '.') for p in prefixes)


def resume_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
  """Compares a workdir's `config.json` with the config resuming it.

  Args:
    saved, new: the two configs as JSON-like dicts (tuples as lists).
  Returns:
    `(refused, allowed)`: lines `key: saved -> new`, the first for keys of
    `RESUME_FIXED` (not `RESUME_FREE`), the second for the rest.
  """
  a, b = _flatten(saved), _flatten(new)
  refused, allowed = [], []
  for key in sorted(set(a) | set(b)):
    old, value = a.get(key, '<unset>'), b.get(key, '<unset>')
    if old == value:
      continue
    line = f'config.{key}: {old!r} -> {value!r}'
    fixed = _under(key, RESUME_FIXED) and not _under(key, RESUME_FREE)
    (refused if fixed else allowed).append(line)
  return refused, allowed
