"""UniMatch V2 (TPAMI 2025): EMA teacher, cutmix with the batch reversed,
complementary dropout of the two strong views.

The iteration (docs/method.md "UniMatch V2", the authors' `unimatch_v2.py`):

1. EMA teacher (eval mode, no gradient) on `u_w` -> confidence
   `conf = max softmax` and labels `argmax`;
2. cutmix partner = the batch reversed within each loss group (the
   authors' GPU batch: `config.train.loss_groups`): `u_sk` takes its
   reversal inside `box_k`; labels, confidences and ignore maps take theirs
   inside the box (no mix-partner batch, no teacher call on a partner);
3. student on x -> `P_x`; student on concat(u_s1, u_s2) with complementary
   dropout of its tapped features (pairs `m`, `2 - m` per image and
   channel, `m = 2 Bernoulli(0.5)`; half of each group's pairs undropped)
   -> `P_s1, P_s2`;
4. `L_x` = CE (or OHEM); `L_sk = sum(CE * (conf_k >= 0.95) * valid_k) / count(valid_k)`,
   each a mean within its loss group, the groups averaged;
5. total `(L_x + (L_s1 + L_s2) / 2) / 2`: effective weights sup 0.5, strong 0.25;
6. (train_step) AdamW step; EMA keep rate `min(1 - 1/(step + 1), 0.996)`.

With `loss_groups=4` (the recipes') this is the authors' update on their 4
GPUs; with 1, one objective over the global batch, reversed as a whole.
With `grad_accum > 1` the targets and the cutmixed images are composed over
the global batch before it is split, so the pairs cross micro-batches freely.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dssn_jax.methods import base, common, dssn
from dssn_jax.methods.base import knob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(base.Settings):
  """UniMatch V2's knobs: `L_x` and the two strong-view terms, a fixed
  threshold, complementary dropout, the batch reversed as mix partner."""

  sup: float = knob('loss.sup', 0.5)
  strong: float = knob('loss.strong', 0.25)
  fp: float = knob('loss.fp', 0.0)
  align_image: float = knob('loss.align_image', 0.0)
  align_feature: float = knob('loss.align_feature', 0.0)
  strong_views: int = 2
  pseudo_label: str = knob('loss.pseudo_label', 'fixed', choices=('class_aware', 'fixed'))
  threshold: float = knob('loss.threshold', 0.95)
  strong_view_bn_stats: bool = knob('train.strong_view_bn_stats')
  partner: str = knob('data.mix_partner', 'reversed', choices=('reversed',))
  comp_drop: bool = knob('model.comp_drop', True)
  comp_drop_kept: float = knob('model.comp_drop_kept')

  @property
  def mix_partner(self) -> str:
    return self.partner


KEYS = ('x', 'y', 'u_w', 'u_s1', 'u_s2', 'u_ignore', 'box1', 'box2')


def check(batch, s) -> None:
  common.check_keys(batch, KEYS, s.method)
  if s.pseudo_label != 'fixed':
    raise ValueError(f"method 'unimatch_v2' uses loss.pseudo_label='fixed', got {s.pseudo_label!r}")
  for key in ('fp', 'align_image', 'align_feature'):
    if getattr(s, key) > 0:
      raise ValueError(f"method 'unimatch_v2' has no {key} term; loss.{key} must be 0")


def prepare(state, batch, rng, ctx):
  """Steps 1-2 and the dropout masks, over the global batch (no gradient)."""
  s, model = ctx.settings, ctx.model
  check(batch, s)
  n, groups = batch['u_w'].shape[0], s.loss_groups
  flip = lambda x: common.reversed_within(x, groups)

  def one(mb):
    logits, _, _ = common.forward(
      model,
      state.teacher_params,
      state.teacher_batch_stats,
      common.normalized(mb['u_w']),
      train=False,
    )
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.max(probs, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)

  conf, labels = jax.lax.stop_gradient(ctx.map_micro(one, {'u_w': batch['u_w']}))
  ignore = batch['u_ignore']
  valid_w = ignore != s.ignore_index
  out = {
    'x': batch['x'],
    'y': batch['y'],
    'den_x': common.denominator(batch['y'] != s.ignore_index, groups),
    # A global statistic, reported once (not summed over micro-batches).
    'metrics': {
      'mask_ratio': common.count((conf >= s.threshold) & valid_w)
      / jnp.maximum(common.count(valid_w), 1.0)
    },
  }
  out['strong'] = common.mixed_strong_images(batch, 2, partner='reversed', groups=groups)
  for k, (_, _, box) in enumerate(common.VIEW_KEYS):
    b = batch[box]
    valid_k = common.compose(b, flip(ignore), ignore) != s.ignore_index
    out[f'labels_s{k}'] = common.compose(b, flip(labels), labels)
    out[f'mask_s{k}'] = common.compose(b, flip(conf), conf) >= s.threshold
    out[f'valid_s{k}'] = valid_k
    out[f'den_s{k}'] = common.denominator(valid_k, groups)
  masks = dssn.strong_feature_masks(jax.random.fold_in(rng, 2), model, s, n)
  if masks is not None:
    out['strong_masks'] = masks  # (n, 2, D)
  return out, state.teacher_batch_stats


def loss(params, state, mb, rng, ctx):
  """Steps 3-5 on one micro-batch."""
  s, model = ctx.settings, ctx.model
  rope_rng = common.rope_key(rng)
  p_x, _, bs = common.forward(
    model, params, state.batch_stats, common.normalized(mb['x']), train=True, rope_rng=rope_rng
  )
  strong = common.normalized(common.interleave(mb['strong'][:, 0], mb['strong'][:, 1]))
  fmasks = None
  if 'strong_masks' in mb:
    fmasks = common.interleave(mb['strong_masks'][:, 0], mb['strong_masks'][:, 1])
  logits_s, _, bs_s = common.forward(
    model, params, bs, strong, train=True, feature_masks=fmasks, rope_rng=rope_rng
  )
  if s.strong_view_bn_stats:
    bs = bs_s
  p_s = common.deinterleave(logits_s, 2)
  terms = {}
  weighted = []
  if s.sup > 0:
    terms['loss_x'] = common.sup_term(p_x, mb['y'], mb['den_x'], s, ctx.micro_batches)
    weighted.append(s.sup * terms['loss_x'])
  if s.strong > 0:
    for k in range(2):
      term = common.pseudo_term(
        p_s[k],
        mb[f'labels_s{k}'],
        mb[f'mask_s{k}'],
        mb[f'valid_s{k}'],
        mb[f'den_s{k}'],
        s.loss_groups,
      )
      terms[f'loss_s{k + 1}'] = term
      weighted.append(s.strong * term)
  total = sum(weighted, jnp.float32(0.0))
  return total, common.LossAux(bs, state.teacher_batch_stats, terms)


base.register(base.Method('unimatch_v2', Settings, prepare, loss, ema_schedule='unimatch_v2'))
