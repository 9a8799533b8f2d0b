"""Supervised baseline: `L_x` on the labeled images only."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dssn_jax.methods import base, common


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(base.Settings):
  """Only `L_x`: the base knobs (weight `loss.sup`, default 1)."""


def of(settings: base.Settings) -> Settings:
  """The supervised iteration with the knobs every method shares taken from
  `settings` (another method's): DSSN's supervised warm-up steps and the
  supervised branch of `train.supervised_branch`."""
  shared = {f.name: getattr(settings, f.name) for f in dataclasses.fields(base.Settings)}
  return Settings(**{**shared, 'method': 'supervised'})


def prepare(state, batch, rng, ctx):
  del rng
  s = ctx.settings
  common.check_keys(batch, ('x', 'y'), s.method)
  den_x = common.denominator(batch['y'] != s.ignore_index, s.loss_groups)
  out = {'x': batch['x'], 'y': batch['y'], 'den_x': den_x}
  return out, state.teacher_batch_stats


def loss(params, state, mb, rng, ctx):
  s = ctx.settings
  images = common.normalized(mb['x'])
  logits, _, bs = common.forward(
    ctx.model, params, state.batch_stats, images, train=True, rope_rng=common.rope_key(rng)
  )
  terms = {}
  total = jnp.float32(0.0)
  if s.sup > 0:
    terms['loss_x'] = common.sup_term(logits, mb['y'], mb['den_x'], s, ctx.micro_batches)
    total = s.sup * terms['loss_x']
  return total, common.LossAux(bs, state.teacher_batch_stats, terms)


base.register(base.Method('supervised', Settings, prepare, loss, unlabeled=False))
