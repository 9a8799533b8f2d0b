"""SGD with torch semantics, the reference's poly schedule and the head multiplier.

`config.train.optimizer='adamw'` swaps SGD for AdamW (same schedule, same two
groups); the reference, and the default, is 'sgd'. From-scratch narrow models
(DigitScenes' `resnet_tiny`) learn digit shapes several times faster with it.

The reference trains with `torch.optim.SGD(momentum=0.9, weight_decay=1e-4)`:
the decay is added to the gradient of every parameter (BatchNorm scales and
biases included), the momentum buffer starts as the first gradient (optax's
`trace` from zeros gives the same), no dampening, no Nesterov. Two parameter
groups: the backbone at `lr`, everything else (the head) at `lr * lr_multi`.

The schedule is the reference's: after iteration `it` it sets
`lr * (1 - it / total) ** 0.9` for the next one. So step 0 and step 1 both
run at `lr`, and step `t >= 1` at `lr * (1 - (t - 1) / total) ** 0.9`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dssn_jax.config_lib import Schedule

BACKBONE = 'backbone'
HEAD = 'head'


def poly_schedule(
  base_lr: float, total_steps: int, power: float = 0.9
) -> Callable[[jax.Array], jax.Array]:
  """Step -> learning rate, exactly as the reference applies its poly decay."""
  if total_steps <= 0:
    raise ValueError(f'poly_schedule: total_steps={total_steps} must be positive')

  def fn(step):
    done = jnp.maximum(jnp.asarray(step, jnp.float32) - 1.0, 0.0)
    frac = jnp.maximum(1.0 - done / float(total_steps), 0.0)
    return jnp.float32(base_lr) * frac ** jnp.float32(power)

  return fn


def learning_rate_fn(
  schedule: Schedule, poly_power: float = 0.9
) -> Callable[[jax.Array], jax.Array]:
  """The backbone learning rate used by step `t` (the `lr` metric)."""
  return poly_schedule(schedule.lr, schedule.total_steps, poly_power)


def param_labels(params: Any) -> Any:
  """'backbone' for the `backbone` subtree, 'head' for every other top-level entry."""
  if not hasattr(params, 'keys'):
    raise ValueError(f'param_labels: params must be a dict of modules, got {type(params)}')
  return {
    k: jax.tree.map(lambda _, k=k: BACKBONE if k == BACKBONE else HEAD, v)
    for k, v in params.items()
  }


def torch_sgd(
  learning_rate, momentum: float = 0.9, weight_decay: float = 1e-4
) -> optax.GradientTransformation:
  """`torch.optim.SGD(lr, momentum, weight_decay)` (no dampening, no Nesterov)."""
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  if momentum:
    parts.append(optax.trace(decay=momentum, nesterov=False))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


OPTIMIZERS = ('sgd', 'adamw')


def make_optimizer(
  schedule: Schedule,
  config=None,
  *,
  momentum: float | None = None,
  weight_decay: float | None = None,
  poly_power: float | None = None,
  optimizer: str | None = None,
  freeze_backbone: bool | None = None,
) -> optax.GradientTransformation:
  """The reference optimizer: backbone at `schedule.lr`, head at `schedule.head_lr`.

  Args:
    schedule: `config_lib.Schedule` (total steps, lr, head lr).
    config: optional experiment config; `config.train.momentum`,
      `weight_decay` and `poly_power` are read from it.
    momentum, weight_decay, poly_power: explicit values win over `config`;
      defaults 0.9, 1e-4, 0.9 (the reference).
    optimizer: 'sgd' (the reference) or 'adamw' (momentum unused); explicit
      wins over `config.train.optimizer`, default 'sgd'.
    freeze_backbone: the backbone group gets zero updates and keeps no
      optimizer state (`optax.set_to_zero`); explicit wins over
      `config.train.freeze_backbone`, default False.
  Returns:
    An optax transformation over the model's `params` dict.
  """
  if not isinstance(schedule, Schedule):
    raise ValueError(
      f'make_optimizer: expected a config_lib.Schedule, got {type(schedule).__name__}'
      ' (build one with config_lib.resolve(config).schedule(n))'
    )

  def pick(value, key, default):
    if value is not None:
      return float(value)
    if config is not None:
      return float(config.train[key])
    return default

  momentum = pick(momentum, 'momentum', 0.9)
  weight_decay = pick(weight_decay, 'weight_decay', 1e-4)
  poly_power = pick(poly_power, 'poly_power', 0.9)
  if optimizer is None:
    optimizer = config.train.optimizer if config is not None else 'sgd'
  if optimizer not in OPTIMIZERS:
    raise ValueError(f'config.train.optimizer={optimizer!r} must be one of {OPTIMIZERS}')

  def group(lr):
    rate = poly_schedule(lr, schedule.total_steps, poly_power)
    if optimizer == 'adamw':  # b1 0.9, b2 0.999, eps 1e-8; decay scaled by the lr
      return optax.adamw(rate, weight_decay=weight_decay)
    return torch_sgd(rate, momentum, weight_decay)

  if freeze_backbone is None:
    freeze_backbone = bool(config.train.freeze_backbone) if config is not None else False
  backbone = optax.set_to_zero() if freeze_backbone else group(schedule.lr)
  return optax.multi_transform({BACKBONE: backbone, HEAD: group(schedule.head_lr)}, param_labels)
