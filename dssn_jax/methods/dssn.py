"""DSSN (ACM MM 2023): dual-level Siamese structure with an EMA teacher.

The iteration (docs/method.md "DSSN"):

1. EMA teacher on the mix partner's weak view `m_w` -> `T_m` and on `u_w`
   -> `T_w` (batch-statistics BN: two calls, m_w first; running: one call);
2. per strong view k: `T_k = where(box_k, T_m, T_w)`, labels `argmax T_k`,
   mask CPLG(`T_k`), valid `where(box_k, m_ignore, u_ignore) != 255`;
   the strong images `where(box_k, m_sk, u_sk)`;
3. student on concat(x, u_w) with `fp_branches` perturbed copies of its
   features -> `P_x, P_w, P_fp1, P_fp2` (`labeled_bn='separate'`: x, then u_w);
4. student on concat(u_s1, u_s2) -> `P_s1, P_s2`;
5. fp targets: `argmax P_w` (detached), mask CPLG(`P_w`);
6. total `sup*L_x + strong*(L_s1+L_s2) + fp*(L_fp1+L_fp2) + align_image*L_img
   + align_feature*L_feat`, strong terms (or, `warmup_terms='unlabeled'` /
   `'supervised'`, every unlabeled term) weighted 0 while `step < warmup_steps`
   (`'supervised'`: `make_train_step` runs the supervised iteration then);
7. (train_step) optimizer step; EMA with keep rate 0 in the warm-up, then
   `ema_decay`.

A loss weight of 0 removes its term from the program: the strong forward
runs only if `strong` or `align_image` is on, the teacher only if `strong`
is on, the perturbed copies only if `fp` or `align_feature` is on.

On a model with tapped features (`model.feature_dim`, the DINOv2/DPT family)
the fp branches' channel masks are drawn here from global batch positions:
`fp_masks='independent'` (DSSN's Dropout2d, p = `model.dropout`, each branch
its own) or `'complementary'` (`m`, `2 - m`); `comp_drop=True` adds UniMatch
V2's complementary dropout to the strong views' forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dssn_jax.methods import base, common, supervised
from dssn_jax.methods.base import knob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(base.Settings):
  """DSSN's knobs, with its VOC presets; UniMatch and FixMatch subclass it.

  Loss weights are effective weights of the total (`config_lib` docstring).
  """

  sup: float = knob('loss.sup', 0.5)
  strong: float = knob('loss.strong', 0.125)
  fp: float = knob('loss.fp', 0.125)
  align_image: float = knob('loss.align_image', 0.005)
  align_feature: float = knob('loss.align_feature', 0.005)
  fp_branches: int = knob('model.fp_branches', 2)
  strong_views: int = 2  # the method's, not a config key
  pseudo_label: str = knob('loss.pseudo_label', 'class_aware', choices=('class_aware', 'fixed'))
  threshold: float = knob('loss.threshold', 0.95)
  class_aware_high: float = knob('loss.class_aware_high')
  class_aware_scale: float = knob('loss.class_aware_scale')
  teacher_bn: str = knob('train.teacher_bn', choices=('reference', 'batch', 'running'))
  warmup_terms: str = knob('train.warmup_terms', choices=('strong', 'unlabeled', 'supervised'))
  labeled_bn: str = knob('train.labeled_bn', choices=('joint', 'separate'))
  strong_view_bn_stats: bool = knob('train.strong_view_bn_stats')
  partner: str = knob('data.mix_partner', 'same', choices=('same', 'shuffled'))
  comp_drop: bool = knob('model.comp_drop', False)
  comp_drop_kept: float = knob('model.comp_drop_kept')
  fp_masks: str = knob('model.fp_masks', 'independent', choices=('independent', 'complementary'))
  dropout: float = knob('model.dropout')

  def finalized(self):
    """No fp branch: no fp term; fewer than two: no feature alignment."""
    out = self
    if self.fp_branches == 0:
      out = dataclasses.replace(out, fp=0.0)
    if self.fp_branches < 2:
      out = dataclasses.replace(out, align_feature=0.0)
    return out

  @property
  def mix_partner(self) -> str:
    return self.partner

  @property
  def phased(self) -> bool:
    return self.teacher_bn == 'reference' or self.warmup_terms == 'supervised'

  def for_step(self, step: int, schedule) -> base.Settings:
    """The reference's teacher BatchNorm (batch statistics in the first epoch,
    running after) as that step's mode; a supervised warm-up step runs the
    supervised iteration (`sup * L_x`, this method's weight)."""
    out = self
    if self.teacher_bn == 'reference':
      mode = 'batch' if step < schedule.steps_per_epoch else 'running'
      out = dataclasses.replace(out, teacher_bn=mode)
    if self.warmup_terms == 'supervised' and step < schedule.warmup_steps:
      return supervised.of(self)
    return out

  def labeled_only_steps(self, schedule) -> int:
    return schedule.warmup_steps if self.warmup_terms == 'supervised' else 0


def flags(s):
  """Which forwards and terms the settings switch on."""
  views = s.strong_views
  return dict(
    views=views,
    strong_terms=s.strong > 0 and views > 0,
    strong_forward=views > 0 and (s.strong > 0 or s.align_image > 0),
    perturb=s.fp_branches if (s.fp > 0 or s.align_feature > 0) else 0,
  )


def check(batch, s) -> None:
  common.check_keys(batch, common.SEMI_KEYS + sum(common.VIEW_KEYS[: s.strong_views], ()), s.method)
  if s.align_image > 0 and s.strong_views < 2:
    raise ValueError(
      f'loss.align_image={s.align_image} needs two strong views; '
      f'method {s.method!r} has {s.strong_views}'
    )
  if s.align_feature > 0 and s.fp_branches < 2:
    raise ValueError(
      f'loss.align_feature={s.align_feature} needs two fp branches; fp_branches={s.fp_branches}'
    )
  if s.fp > 0 and s.fp_branches < 1:
    raise ValueError(f'loss.fp={s.fp} needs fp_branches >= 1')


def teacher_targets(state, batch, rng, ctx):
  """EMA teacher on (m_w, u_w) -> per-view targets (`view_targets`) and its
  batch_stats after.

  With batch-statistics BN the two calls run in turn over the whole batch,
  m_w first (each normalized by its own batch, the statistics threaded as
  in the reference). With running statistics BN is per sample, so one call
  on both views gives the same logits at half the kernel launches; it runs
  per micro-batch (`ctx.map_micro`).
  """
  model, s = ctx.model, ctx.settings
  views = flags(s)['views']
  stats = state.teacher_batch_stats

  def sequential():
    m_w, u_w = common.normalized(batch['m_w']), common.normalized(batch['u_w'])
    kw = dict(train=True, rope_rng=common.rope_key(rng))
    t_m, _, new = common.forward(model, state.teacher_params, stats, m_w, **kw)
    t_w, _, new = common.forward(model, state.teacher_params, new, u_w, **kw)
    return view_targets(t_m, t_w, batch, s, views), new

  def one(mb):
    both = common.normalized(common.interleave(mb['m_w'], mb['u_w']))
    logits, _, _ = common.forward(model, state.teacher_params, stats, both, train=False)
    t_m, t_w = common.deinterleave(logits, 2)
    return view_targets(t_m, t_w, mb, s, views)

  def batched():
    keys = ['m_w', 'u_w'] + [b for _, _, b in common.VIEW_KEYS[:views]]
    return ctx.map_micro(one, {k: batch[k] for k in keys}), stats

  if s.teacher_bn == 'reference':
    return jax.lax.cond(state.step < ctx.schedule.steps_per_epoch, sequential, batched)
  return sequential() if s.teacher_bn == 'batch' else batched()


def view_targets(t_m, t_w, batch, s, views):
  """Per strong view: composed hard labels and selection masks (CPLG or fixed)."""
  out = {}
  for k in range(views):
    t_k = common.compose(batch[common.VIEW_KEYS[k][2]], t_m, t_w)
    out[f'labels_s{k}'] = jnp.argmax(t_k, axis=-1).astype(jnp.int32)
    out[f'mask_s{k}'] = common.mask_of(t_k, s)
  return out


def fp_masks(key, model, s, n: int, perturb: int):
  """Channel masks `(perturb, n, D)` of the fp branches, or None (model draws)."""
  dim = common.feature_dim(model)
  if dim is None or not perturb:
    if s.fp_masks == 'complementary' and perturb:
      raise ValueError(
        "model.fp_masks='complementary' needs a model with tapped features "
        '(model.feature_dim, the DINOv2/DPT family)'
      )
    return None
  if s.fp_masks == 'complementary':
    if perturb != 2:
      raise ValueError(f"model.fp_masks='complementary' needs fp_branches=2, got {perturb}")
    m, m2 = common.complementary_masks(key, n, dim, kept_fraction=0.0)
    return jnp.stack([m, m2])
  keys = jax.random.split(key, perturb)
  return jnp.stack([common.channel_dropout_masks(k, n, dim, s.dropout) for k in keys])


def strong_feature_masks(key, model, s, n: int):
  """UniMatch V2's complementary dropout of (u_s1, u_s2), `(n, 2, D)`, or None."""
  if not s.comp_drop:
    return None
  if s.strong_views != 2:
    raise ValueError(f'comp_drop needs two strong views; method {s.method!r} has {s.strong_views}')
  dim = common.feature_dim(model)
  if dim is None:
    raise ValueError(
      'comp_drop (complementary dropout of the strong views) needs a model with tapped '
      'features (model.feature_dim, the DINOv2/DPT family)'
    )
  m, m2 = common.complementary_masks(key, n, dim, s.comp_drop_kept, s.loss_groups)
  return jnp.stack([m, m2], 1)


def prepare_views(state, batch, rng, ctx):
  """What every UniMatch-family method prepares: images, valid maps, global
  denominators, strong views (cutmixed with the mix-partner batch) and the
  random feature masks."""
  del state
  s, model = ctx.settings, ctx.model
  check(batch, s)
  f = flags(s)
  views, n, groups = f['views'], batch['u_w'].shape[0], s.loss_groups
  valid_w, valid_s = common.valid_pixels(batch, s.ignore_index, views)
  out = {
    'x': batch['x'],
    'y': batch['y'],
    'u_w': batch['u_w'],
    'valid_w': valid_w,
    'den_x': common.denominator(batch['y'] != s.ignore_index, groups),
    'den_w': common.denominator(valid_w, groups),
  }
  if f['strong_forward']:
    out['strong'] = common.mixed_strong_images(batch, views)  # (n, views, H, W, 3)
    masks = strong_feature_masks(jax.random.fold_in(rng, 2), model, s, n)
    if masks is not None:
      out['strong_masks'] = masks
  if f['strong_terms']:
    for k in range(views):
      out[f'valid_s{k}'] = valid_s[k]
      out[f'den_s{k}'] = common.denominator(valid_s[k], groups)
  masks = fp_masks(jax.random.fold_in(rng, 1), model, s, n, f['perturb'])
  if masks is not None:
    out['fp_masks'] = jnp.moveaxis(masks, 0, 1)  # (n, perturb, D): sliceable by sample
  return out


def prepare(state, batch, rng, ctx):
  """Steps 1-2: the EMA teacher's targets per strong view, plus `prepare_views`."""
  out = prepare_views(state, batch, rng, ctx)
  teacher_bs = state.teacher_batch_stats
  if flags(ctx.settings)['strong_terms']:
    targets, teacher_bs = teacher_targets(state, batch, rng, ctx)
    out.update(jax.lax.stop_gradient(targets))
  return out, teacher_bs


def strong_target(mb, p_w, k: int, s):
  """Labels and mask of strong view k: prepared by the EMA teacher, or (UniMatch,
  FixMatch) composed here from the eval-mode student's `T_m` and `P_w`."""
  if 't_m' in mb:
    t_k = common.compose(mb[f'box_s{k}'], mb['t_m'], p_w)
    return jnp.argmax(t_k, axis=-1).astype(jnp.int32), common.mask_of(t_k, s)
  return mb[f'labels_s{k}'], mb[f'mask_s{k}']


def clean_forward(params, state, mb, rng, ctx):
  """Step 3: the student on (x, u_w) with `perturb` perturbed copies of its
  features (or on x, then u_w: `labeled_bn='separate'`). The joint forward
  interleaves x and u_w (`common.interleave`): the reference's concat(x,
  u_w) up to the order of rows, which only BatchNorm's sums see.

  Returns:
    `(P_x, P_w (detached), [P_fp1, P_fp2], batch_stats)`.
  """
  s, model = ctx.settings, ctx.model
  perturb = flags(s)['perturb']
  dropout_rng = jax.random.fold_in(rng, 0)
  x, u_w = common.normalized(mb['x']), common.normalized(mb['u_w'])
  perturb_masks = None
  if 'fp_masks' in mb:  # model takes masks: ones for the labeled rows
    fp = mb['fp_masks']  # (n, perturb, D)
    if s.labeled_bn != 'separate':
      fp = common.interleave(jnp.ones_like(fp), fp)
    perturb_masks = jnp.moveaxis(fp, 1, 0)
  rope_rng = common.rope_key(rng)
  kwargs = dict(
    train=True, perturb=perturb, rng=dropout_rng, perturb_masks=perturb_masks, rope_rng=rope_rng
  )
  if s.labeled_bn == 'separate':
    p_x, _, bs = common.forward(model, params, state.batch_stats, x, train=True, rope_rng=rope_rng)
    p_w, aux, bs = common.forward(model, params, bs, u_w, **kwargs)
    return p_x, jax.lax.stop_gradient(p_w), list(aux['perturbed']), bs
  if x.shape[0] != u_w.shape[0]:
    raise ValueError(
      f"labeled_bn='joint' needs labeled and unlabeled batches of one size, got "
      f'{x.shape[0]} and {u_w.shape[0]}'
    )
  both = common.interleave(x, u_w)
  logits, aux, bs = common.forward(model, params, state.batch_stats, both, **kwargs)
  p_x, p_w = common.deinterleave(logits, 2)
  p_fp = [common.deinterleave(p, 2)[1] for p in aux['perturbed']]
  return p_x, jax.lax.stop_gradient(p_w), p_fp, bs


def strong_forward(params, mb, bs, rng, ctx):
  """Step 4: the student on the cutmixed strong views -> `([P_s1, P_s2], batch_stats)`."""
  s, model = ctx.settings, ctx.model
  views = flags(s)['views']
  images = common.normalized(common.interleave(*(mb['strong'][:, k] for k in range(views))))
  fmasks = None
  if 'strong_masks' in mb:
    fmasks = common.interleave(mb['strong_masks'][:, 0], mb['strong_masks'][:, 1])
  logits_s, _, bs_s = common.forward(
    model, params, bs, images, train=True, feature_masks=fmasks, rope_rng=common.rope_key(rng)
  )
  return common.deinterleave(logits_s, views), (bs_s if s.strong_view_bn_stats else bs)


def loss(params, state, mb, rng, ctx):
  """The weighted terms on one micro-batch `mb` of `prepare`'s output."""
  s = ctx.settings
  f = flags(s)
  groups = s.loss_groups
  warm = state.step < ctx.schedule.warmup_steps
  terms, weighted = {}, []
  p_x, p_w, p_fp, bs = clean_forward(params, state, mb, rng, ctx)
  p_s = []
  if f['strong_forward']:
    p_s, bs = strong_forward(params, mb, bs, rng, ctx)

  # 5. fp targets from the detached clean weak-view prediction.
  valid_w = mb['valid_w']
  mask_w = common.mask_of(p_w, s)
  labels_w = jnp.argmax(p_w, axis=-1).astype(jnp.int32)
  terms['mask_ratio'] = common.reduce(mask_w & valid_w, mb['den_w'], groups)

  # 6. Loss terms.
  if s.sup > 0:
    terms['loss_x'] = common.sup_term(p_x, mb['y'], mb['den_x'], s, ctx.micro_batches)
    weighted.append(s.sup * terms['loss_x'])
  if f['strong_terms']:
    strong_weight = jnp.where(warm, 0.0, s.strong)
    for k, suffix in enumerate(common.suffixes(f['views'])):
      labels, mask = strong_target(mb, p_w, k, s)
      term = common.pseudo_term(p_s[k], labels, mask, mb[f'valid_s{k}'], mb[f'den_s{k}'], groups)
      terms['loss_s' + suffix] = term
      weighted.append(strong_weight * term)

  def gated(weight):  # other unlabeled terms: on from step 0, or gated too
    return jnp.where(warm, 0.0, weight) if s.warmup_terms != 'strong' else weight

  def elements(p):  # every element of the global batch
    return p.size // p.shape[0] * (ctx.global_batch or p.shape[0])

  if s.fp > 0:
    for p, suffix in zip(p_fp, common.suffixes(len(p_fp))):
      term = common.pseudo_term(p, labels_w, mask_w, valid_w, mb['den_w'], groups)
      terms['loss_fp' + suffix] = term
      weighted.append(gated(s.fp) * term)
  if s.align_image > 0:
    terms['loss_align_image'] = common.align_term(p_s[0], p_s[1], elements(p_s[0]))
    weighted.append(gated(s.align_image) * terms['loss_align_image'])
  if s.align_feature > 0:
    terms['loss_align_feature'] = common.align_term(p_fp[0], p_fp[1], elements(p_fp[0]))
    weighted.append(gated(s.align_feature) * terms['loss_align_feature'])
  total = sum(weighted, jnp.float32(0.0))
  return total, common.LossAux(bs, state.teacher_batch_stats, terms)


base.register(base.Method('dssn', Settings, prepare, loss, ema_schedule='warmup', warmup=True))
