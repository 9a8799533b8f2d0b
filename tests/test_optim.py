"""The optimizer: torch SGD semantics, the reference's poly schedule, lr_multi."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssn_jax import config_lib, optim
from dssn_jax.testing import numerics


def schedule(total=10, lr=0.01, multi=10.0):
  return config_lib.Schedule(
    total_steps=total,
    steps_per_epoch=total,
    warmup_steps=1,
    eval_every=total,
    lr=lr,
    head_lr=lr * multi,
  )


def reference_lr(step, base, total, power=0.9):
  """The lr the reference's step `step` runs at (set after step - 1)."""
  return base if step == 0 else base * (1 - (step - 1) / total) ** power


def test_poly_schedule_follows_the_reference():
  fn = optim.learning_rate_fn(schedule(total=10, lr=0.01))
  got = [float(fn(t)) for t in range(10)]
  want = [reference_lr(t, 0.01, 10) for t in range(10)]
  # float32 vs float64, a handful of ops (a power): a few eps.
  numerics.assert_close(got, want, numerics.FEW_OPS)
  assert got[0] == got[1] == pytest.approx(0.01)
  assert got[2] == pytest.approx(0.01 * 0.9**0.9)


def test_head_runs_at_lr_multi():
  sched = schedule(total=10, lr=0.01, multi=10.0)
  tx = optim.make_optimizer(sched, momentum=0.0, weight_decay=0.0)
  params = {
    'backbone': {'w': jnp.zeros(3)},
    'head': {'w': jnp.zeros(2)},
    'classifier': {'b': jnp.zeros(1)},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(5):
    updates, state = update(grads, state, params)
    lr = reference_lr(t, 0.01, 10)  # float32 vs float64, a few ops: rtol FEW_OPS
    np.testing.assert_allclose(updates['backbone']['w'], -lr, rtol=numerics.FEW_OPS)
    np.testing.assert_allclose(updates['head']['w'], -10 * lr, rtol=numerics.FEW_OPS)
    np.testing.assert_allclose(updates['classifier']['b'], -10 * lr, rtol=numerics.FEW_OPS)


def _compare_with_torch(torch_opt, tx, total, lr, multi, steps=5, seed=0):
  """Drives `torch_opt(groups)` like the reference loop (poly lr set after
  each step, head at `multi`) and `tx` on the same gradients; asserts the
  parameters agree."""
  torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
  rng = np.random.default_rng(seed)
  init = {
    'backbone': {'w': rng.normal(size=(4, 3)).astype(np.float32)},
    'head': {'w': rng.normal(size=(5,)).astype(np.float32)},
  }
  grads = [
    jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), init) for _ in range(steps)
  ]

  tb = torch.nn.Parameter(torch.tensor(init['backbone']['w']))
  th = torch.nn.Parameter(torch.tensor(init['head']['w']))
  opt = torch_opt([{'params': [tb], 'lr': lr}, {'params': [th], 'lr': lr * multi}])
  for it, g in enumerate(grads):
    tb.grad = torch.tensor(g['backbone']['w'])
    th.grad = torch.tensor(g['head']['w'])
    opt.step()
    new_lr = lr * (1 - it / total) ** 0.9
    opt.param_groups[0]['lr'] = new_lr
    opt.param_groups[1]['lr'] = new_lr * multi

  params = jax.tree.map(jnp.asarray, init)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)
  # JAX vs torch, 5 steps of ~4 elementwise float32 ops: ~sqrt(20) eps, LAYER.
  numerics.assert_close(params['backbone']['w'], tb.detach().numpy(), numerics.LAYER)
  numerics.assert_close(params['head']['w'], th.detach().numpy(), numerics.LAYER)


def test_matches_torch_sgd_with_reference_lr_updates():
  """Five steps against torch.optim.SGD driven like the reference loop."""
  torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
  total, lr, multi = 8, 0.05, 10.0
  _compare_with_torch(
    lambda groups: torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=1e-4),
    optim.make_optimizer(schedule(total=total, lr=lr, multi=multi)),
    total,
    lr,
    multi,
  )


def test_reads_config_values():
  config = config_lib.base_config()
  config.train.momentum = 0.0
  config.train.weight_decay = 0.5
  tx = optim.make_optimizer(schedule(lr=0.1, multi=1.0), config)
  params = {'backbone': {'w': jnp.ones(2)}}
  updates, _ = tx.update({'backbone': {'w': jnp.zeros(2)}}, tx.init(params), params)
  # Zero gradient: only the decay 0.5 * w, at lr 0.1 (float32, two products).
  np.testing.assert_allclose(updates['backbone']['w'], -0.05, rtol=numerics.FEW_OPS)


def test_rejects_a_config_in_place_of_the_schedule():
  with pytest.raises(ValueError, match='Schedule'):
    optim.make_optimizer(config_lib.base_config())


def test_adamw_matches_torch_adamw_with_poly_lr_and_head_multiplier():
  """`optimizer='adamw'`: torch.optim.AdamW per group, lr set by the same
  poly rule as SGD (decay scaled by the lr, as torch's AdamW does)."""
  torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
  total, lr, multi, wd = 6, 0.01, 3.0, 0.05
  config = config_lib.base_config()
  config.train.optimizer = 'adamw'
  config.train.weight_decay = wd
  _compare_with_torch(
    lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=wd),
    optim.make_optimizer(schedule(total=total, lr=lr, multi=multi), config),
    total,
    lr,
    multi,
    steps=6,
    seed=1,
  )


def test_unknown_optimizer_is_named_in_the_error():
  config = config_lib.base_config()
  config.train.optimizer = 'lamb'
  with pytest.raises(ValueError, match=r"config.train.optimizer='lamb'"):
    optim.make_optimizer(schedule(), config)
