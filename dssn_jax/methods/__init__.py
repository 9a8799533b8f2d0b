"""The training methods, registered by name.

Each method is a module with a `PRESET` (its loss weights, branch counts,
pseudo-label rule, teacher, mix partner, EMA schedule and dropout choices;
`config_lib.resolve_method` fills config placeholders from it) and two
functions (see `methods.common` for the split and its contract):

    prepare(state, batch, rng, ctx) -> (prepared, teacher_batch_stats)
    loss(params, state, micro_batch, rng, ctx) -> (total, LossAux)

`value_and_grad` runs them: `prepare` once over the global batch, then
`loss` and its gradient over `settings.grad_accum` micro-batches (a
`lax.scan`), summing totals, metrics and gradients; each term's
denominator is global, so the sums equal the full-batch values.

A new method is one module plus one `register` line below; the CLI, the
config checks and the benchmarks read `names()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dssn_jax.methods import common, dssn, fixmatch, supervised, unimatch, unimatch_v2


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method.

  Attributes:
    name: `config.method`.
    preset: defaults of its settings (`config_lib.MethodSettings` fields).
    prepare, loss: the iteration (module docstring).
    warmup: whether `config.train.warmup_*` applies (DSSN's warm-up).
    unlabeled: whether it reads the unlabeled stream.
  """

  name: str
  preset: dict[str, Any]
  prepare: Callable
  loss: Callable
  warmup: bool = False
  unlabeled: bool = True


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in _REGISTRY:
    raise ValueError(f'method {method.name!r} is registered twice')
  _REGISTRY[method.name] = method
  return method


def get(name: str) -> Method:
  if name not in _REGISTRY:
    raise ValueError(f'config.method={name!r} is not one of {", ".join(_REGISTRY)}')
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


register(Method('dssn', dssn.PRESET, dssn.prepare, dssn.loss, warmup=True))
register(Method('unimatch', unimatch.PRESET, unimatch.prepare, unimatch.loss))
register(Method('fixmatch', fixmatch.PRESET, fixmatch.prepare, fixmatch.loss))
register(
  Method('supervised', supervised.PRESET, supervised.prepare, supervised.loss, unlabeled=False)
)
register(Method('unimatch_v2', unimatch_v2.PRESET, unimatch_v2.prepare, unimatch_v2.loss))


def ema_keep(settings, schedule, step, ema_decay: float) -> jax.Array:
  """The teacher's keep rate after step `step` (counted from 0).

  `warmup` (DSSN): 0 while `step < warmup_steps`, then `ema_decay`;
  `unimatch_v2`: `min(1 - 1/(step + 1), ema_decay)` (0 at step 0);
  `student` (no EMA teacher): 0, the teacher tracks the student.
  """
  step = jnp.asarray(step)
  if settings.ema_schedule == 'warmup':
    return jnp.where(step < schedule.warmup_steps, 0.0, jnp.float32(ema_decay))
  if settings.ema_schedule == 'unimatch_v2':
    ramp = 1.0 - 1.0 / (step.astype(jnp.float32) + 1.0)
    return jnp.minimum(ramp, jnp.float32(ema_decay))
  return jnp.float32(0.0)


def objective(params, state, batch, rng, *, model, settings, schedule):
  """The whole batch's total loss as a function of `params` (one micro-batch)."""
  method = get(settings.method)
  ctx = common.Context(model, settings, schedule)
  prepared, teacher_bs = method.prepare(state, batch, rng, ctx)
  total, aux = method.loss(params, state, prepared, rng, ctx)
  return total, aux.replace(teacher_batch_stats=teacher_bs)


def value_and_grad(state, batch, rng, *, model, settings, schedule):
  """`((total, LossAux), grads)` of the iteration, over `grad_accum` micro-batches."""
  method = get(settings.method)
  ctx = common.Context(model, settings, schedule)
  k = int(settings.grad_accum)
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
  prepared, teacher_bs = method.prepare(state, batch, rng, ctx)
  grad_fn = jax.value_and_grad(lambda p, mb: method.loss(p, state, mb, rng, ctx), has_aux=True)
  micro = common.split_micro(prepared, k)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, state.params, first)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  init = (zeros[0][0], zeros[0][1].metrics, zeros[1])

  def body(carry, mb):
    (total, aux), grads = grad_fn(state.params, mb)
    return jax.tree.map(jnp.add, carry, (total, aux.metrics, grads)), None

  (total, metrics, grads), _ = jax.lax.scan(body, init, micro)
  aux = common.LossAux(state.batch_stats, teacher_bs, metrics)
  return (total, aux), grads


__all__ = ['Method', 'get', 'names', 'register', 'ema_keep', 'objective', 'value_and_grad']
