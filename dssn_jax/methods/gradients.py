"""The shared gradient code: one iteration's loss and gradient, over
micro-batches, and the teacher's EMA keep rate.

`value_and_grad` runs a method's `prepare` once over the global batch, then
its `loss` and gradient over `settings.grad_accum` micro-batches (a
`lax.scan`), summing totals, metrics and gradients. Each term's denominator
is global (`prepare` counts it), so the sums equal the full-batch values.
Micro-batching belongs here alone: a method sees it only through
`Context.map_micro` (for its no-gradient forwards) and `Context.global_batch`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dssn_jax.methods import base, common


def ema_keep(ema_schedule: str, schedule, step, ema_decay: float) -> jax.Array:
  """The teacher's keep rate after step `step` (counted from 0), by the
  method's rule (`Method.ema_schedule`):

  `warmup` (DSSN): 0 while `step < warmup_steps`, then `ema_decay`;
  `unimatch_v2`: `min(1 - 1/(step + 1), ema_decay)` (0 at step 0);
  `student` (no EMA teacher): 0, the teacher tracks the student.
  """
  step = jnp.asarray(step)
  if ema_schedule == 'warmup':
    return jnp.where(step < schedule.warmup_steps, 0.0, jnp.float32(ema_decay))
  if ema_schedule == 'unimatch_v2':
    ramp = 1.0 - 1.0 / (step.astype(jnp.float32) + 1.0)
    return jnp.minimum(ramp, jnp.float32(ema_decay))
  return jnp.float32(0.0)


def _context(model, settings, schedule, batch, micro_batches: int) -> common.Context:
  batch_size = batch['u_w' if 'u_w' in batch else 'x'].shape[0]
  return common.Context(model, settings, schedule, int(batch_size), int(micro_batches))


def _with_metrics(aux: common.LossAux, metrics) -> common.LossAux:
  return aux.replace(metrics={**aux.metrics, **metrics}) if metrics else aux


def _micro_block(settings, batch) -> int:
  """Samples kept together in a micro-batch: a whole loss group when OHEM
  selects per group (`config_lib` checks that the groups split evenly), else 1."""
  if settings.sup_type == 'ohem' and settings.loss_groups > 1:
    return batch['x'].shape[0] // settings.loss_groups
  return 1


def objective(params, state, batch, rng, *, model, settings, schedule):
  """The whole batch's total loss as a function of `params` (one micro-batch).

  `settings` is the method's own `Settings`.
  """
  method = base.get(settings.method)
  ctx = _context(model, settings, schedule, batch, 1)
  prepared, teacher_bs = method.prepare(state, batch, rng, ctx)
  metrics = prepared.pop('metrics', None)
  total, aux = method.loss(params, state, prepared, rng, ctx)
  return total, _with_metrics(aux, metrics).replace(teacher_batch_stats=teacher_bs)


def value_and_grad(state, batch, rng, *, model, settings, schedule, grad_accum: int = 1):
  """`((total, LossAux), grads)` of the iteration, over `grad_accum` micro-batches.

  Args:
    settings: the method's own `Settings` (`config_lib.Settings.method`).
    grad_accum: micro-batches per global batch (`config.train.grad_accum`).
  """
  k = int(grad_accum)
  if k == 1:
    fn = lambda p: objective(
      p, state, batch, rng, model=model, settings=settings, schedule=schedule
    )
    return jax.value_and_grad(fn, has_aux=True)(state.params)
  if jax.tree.leaves(state.batch_stats):
    raise ValueError(
      f'config.train.grad_accum={k} needs a model without BatchNorm: BatchNorm statistics '
      'per micro-batch would change the method (use grad_accum=1 for ResNet/DeepLabV3+)'
    )
  method = base.get(settings.method)
  ctx = _context(model, settings, schedule, batch, k)
  prepared, teacher_bs = method.prepare(state, batch, rng, ctx)
  metrics = prepared.pop('metrics', None)
  grad_fn = jax.value_and_grad(lambda p, mb: method.loss(p, state, mb, rng, ctx), has_aux=True)
  micro = common.split_micro(prepared, k, _micro_block(settings, batch))
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, state.params, first)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  init = (zeros[0][0], zeros[0][1].metrics, zeros[1])

  def body(carry, mb):
    (total, aux), grads = grad_fn(state.params, mb)
    return jax.tree.map(jnp.add, carry, (total, aux.metrics, grads)), None

  (total, summed, grads), _ = jax.lax.scan(body, init, micro)
  aux = common.LossAux(state.batch_stats, teacher_bs, summed)
  return (total, _with_metrics(aux, metrics)), grads
