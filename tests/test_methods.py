"""The method registry on a tiny BatchNorm-free model with tapped features:
UniMatch V2 against a PyTorch rendering of the authors' iteration (on that
model and on a tiny DINOv2 + DPT), the EMA
keep-rate schedule, gradient accumulation, random masks, mix partners and
the evaluation resize."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssn_jax import config_lib, evaluate, methods, optim
from dssn_jax import train_step as ts
from dssn_jax.methods import common
from dssn_jax.methods import unimatch_v2 as uv2
from dssn_jax.models import pretrained
from dssn_jax.normalize import IMAGENET_MEAN, IMAGENET_STD
from dssn_jax.testing.tapped_model import TinyTapped, init, torch_module

C = 3  # classes
SIZE = 12


def make_config(method, **overrides):
  c = config_lib.base_config()
  c.method = method
  c.data.num_classes = C
  c.data.crop_size = SIZE
  c.model.output_stride = 8  # the config check's; the test models have no stride
  c.data.batch_size = 8
  c.train.steps = 10
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return c


def make_batch(n=8, size=SIZE, seed=0):
  rng = np.random.default_rng(seed)
  image = lambda: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)

  def box():
    out = np.zeros((n, size, size), bool)
    for i in range(n):
      if rng.random() < 0.75:
        h, w = rng.integers(2, size // 2 + 1, 2)
        t, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        out[i, t : t + h, left : left + w] = True
    return out

  ignore = np.zeros((n, size, size), np.int32)
  for i in range(n):
    ignore[i, size - 1 - i % 3 :, :] = 255  # padded rows, different per image
  y = rng.integers(0, C, (n, size, size)).astype(np.int32)
  y[:, :, -1] = 255
  return dict(
    x=image(), y=y, u_w=image(), u_s1=image(), u_s2=image(), u_ignore=ignore,
    box1=box(), box2=box(), m_w=image(), m_s1=image(), m_s2=image(), m_ignore=ignore[::-1].copy(),
  )  # fmt: skip


def state_for(model, tx, seed=0, teacher_scale=1.3, step=0):
  params = init(model, SIZE, seed)
  state = ts.create_train_state(model, tx, None, SIZE, variables={'params': params})
  # A teacher that differs from the student, so its targets are its own.
  teacher = jax.tree.map(lambda p: p * teacher_scale, state.params)
  return state.replace(teacher_params=teacher, step=jnp.int32(step))


# ----------------------------------------------------------------------------
# UniMatch V2 against the authors' iteration, rendered in PyTorch.


def torch_unimatch_v2(net, ema, batch, strong_masks, thresh=0.95):
  """The authors' loop body (`unimatch_v2.py`) on the same inputs and masks:
  `net` (student) and `ema` (teacher) are torch modules taking
  `(images, feature_masks)`. Leaves the gradients in `net`'s parameters.

  Returns:
    `(total, loss_x, [loss_s1, loss_s2])` as floats.
  """
  import torch  # pylint: disable=g-import-not-at-top

  mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
  img = lambda k: (torch.from_numpy(batch[k]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
  img_x, mask_x = img('x'), torch.from_numpy(batch['y']).long()
  img_u_w, img_u_s1, img_u_s2 = img('u_w'), img('u_s1'), img('u_s2')
  ignore_mask = torch.from_numpy(batch['u_ignore']).long()
  cutmix_box1 = torch.from_numpy(batch['box1']).long()
  cutmix_box2 = torch.from_numpy(batch['box2']).long()
  with torch.no_grad():
    pred_u_w = ema(img_u_w).detach()
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)
  b1 = cutmix_box1.unsqueeze(1).expand(img_u_s1.shape) == 1
  b2 = cutmix_box2.unsqueeze(1).expand(img_u_s2.shape) == 1
  img_u_s1[b1] = img_u_s1.flip(0)[b1]
  img_u_s2[b2] = img_u_s2.flip(0)[b2]
  pred_x = net(img_x)
  dropout_mask = torch.from_numpy(np.asarray(strong_masks))
  pred_u_s1, pred_u_s2 = net(torch.cat((img_u_s1, img_u_s2)), dropout_mask).chunk(2)

  def composed(box, value):
    out = value.clone()
    out[box == 1] = value.flip(0)[box == 1]
    return out

  criterion_l = torch.nn.CrossEntropyLoss(ignore_index=255)
  criterion_u = torch.nn.CrossEntropyLoss(reduction='none')
  loss_x = criterion_l(pred_x, mask_x)
  losses = []
  for pred, box in ((pred_u_s1, cutmix_box1), (pred_u_s2, cutmix_box2)):
    mask, conf, ign = composed(box, mask_u_w), composed(box, conf_u_w), composed(box, ignore_mask)
    loss = criterion_u(pred, mask) * ((conf >= thresh) & (ign != 255))
    losses.append(loss.sum() / (ign != 255).sum().item())
  loss = (loss_x + (losses[0] + losses[1]) / 2.0) / 2.0
  loss.backward()
  return float(loss.detach()), float(loss_x.detach()), [float(v.detach()) for v in losses]


def check_against_torch(total, aux, grads, ref_total, ref_x, ref_s, ref_grads):
  """Same float32 arithmetic in two frameworks (different summation orders):
  losses of order 1 agree to ~1e-6, so rel 1e-5; gradients to 1e-5 of their
  largest magnitude (a wrong mask or target changes them by far more)."""
  assert 0.0 < float(aux.metrics['loss_s1']) and 0.0 < float(aux.metrics['loss_s2'])
  assert float(total) == pytest.approx(ref_total, rel=1e-5)
  assert float(aux.metrics['loss_x']) == pytest.approx(ref_x, rel=1e-5)
  assert float(aux.metrics['loss_s1']) == pytest.approx(ref_s[0], rel=1e-5)
  assert float(aux.metrics['loss_s2']) == pytest.approx(ref_s[1], rel=1e-5)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  jax.tree.map(
    lambda g, r: np.testing.assert_allclose(np.asarray(g), r, atol=1e-5 * scale, rtol=0),
    grads,
    ref_grads,
  )


def check_strong_masks(prepared, n, groups=1):
  """The authors' masks: pairs (m, 2 - m) with m in {0, 2}; in each GPU's
  batch of n / groups pairs, int(n / groups / 2) undropped."""
  m1, m2 = np.asarray(prepared['strong_masks'][:, 0]), np.asarray(prepared['strong_masks'][:, 1])
  np.testing.assert_array_equal(m1 + m2, 2.0)
  kept = np.all(m1 == 1.0, axis=1)
  np.testing.assert_array_equal(kept.reshape(groups, -1).sum(1), n // groups // 2)
  assert np.all(np.isin(m1[~kept], (0.0, 2.0)))
  return np.concatenate([m1, m2])


def skewed_batch(size, groups=4, n=8):
  """`make_batch` whose GPU batches (`groups` quarters) have very different
  valid-pixel counts: quarter q keeps the top (q + 1) / groups of its
  unlabeled rows and the top (groups - q) / groups of its labeled rows, so
  a global mean weights the quarters unlike the per-GPU means."""
  batch = make_batch(n=n, size=size)
  per = n // groups
  for q in range(groups):
    rows = slice(q * per, (q + 1) * per)
    batch['u_ignore'][rows, size * (q + 1) // groups :] = 255
    batch['y'][rows, size * (groups - q) // groups :] = 255
  return batch


def torch_per_gpu(net, ema, batch, masks, groups, **kwargs):
  """`torch_unimatch_v2` on each of `groups` GPUs (consecutive blocks of the
  batch and of the complementary masks), gradients averaged as DDP does.

  Returns:
    the per-GPU `(total, loss_x, [loss_s1, loss_s2])`, averaged.
  """
  n = batch['x'].shape[0]
  per = n // groups
  outs = []
  for q in range(groups):
    rows = slice(q * per, (q + 1) * per)
    part = {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}
    part_masks = np.concatenate([masks[:n][rows], masks[n:][rows]])
    outs.append(torch_unimatch_v2(net, ema, part, part_masks, **kwargs))
  for param in net.parameters():
    if param.grad is not None:
      param.grad /= groups
  mean = lambda values: float(np.mean(values))
  return (
    mean([o[0] for o in outs]),
    mean([o[1] for o in outs]),
    [mean([o[2][k] for o in outs]) for k in range(2)],
  )


@pytest.mark.parametrize('groups', [1, 4])
def test_unimatch_v2_matches_the_authors_iteration_in_torch(groups):
  """One GPU (`loss_groups=1`, the whole batch) and the authors' 4 GPUs
  (`loss_groups=4`: each GPU's means, its own flip(0) pairing and
  undropped pairs, gradients averaged) on batches whose quarters have
  different valid-pixel counts."""
  pytest.importorskip('torch')
  model = TinyTapped(C)
  config = make_config(
    'unimatch_v2', **{'loss.threshold': 0.4, 'train.loss_groups': groups}
  )  # threshold: some pixels pass at init
  settings = config_lib.resolve(config)
  schedule = config_lib.resolve(config).schedule(80)
  state = state_for(model, optax.sgd(0.0))
  batch = skewed_batch(SIZE)
  rng = jax.random.key(7)
  ctx = common.Context(model, settings.method, schedule)
  prepared, _ = uv2.prepare(state, batch, rng, ctx)
  masks = check_strong_masks(prepared, 8, groups)
  (total, aux), grads = methods.value_and_grad(
    state, batch, rng, model=model, settings=settings.method, schedule=schedule
  )
  net, ema = torch_module(state.params), torch_module(state.teacher_params)
  ref_total, ref_x, ref_s = torch_per_gpu(net, ema, batch, masks, groups, thresh=0.4)
  ref_grads = {
    name: {
      'kernel': layer.weight.grad.numpy().transpose(2, 3, 1, 0),
      'bias': layer.bias.grad.numpy(),
    }
    for name, layer in (
      ('backbone', net.backbone),
      ('head', net.head),
      ('classifier', net.classifier),
    )
  }
  check_against_torch(total, aux, grads, ref_total, ref_x, ref_s, ref_grads)
  if groups > 1:
    # The global mean (loss_groups=1) is not the authors' update here: its
    # L_x (no pairing, no masks: only the denominators differ) fails the check.
    one = config_lib.resolve(make_config('unimatch_v2', **{'loss.threshold': 0.4}))
    (_, aux1), _ = methods.value_and_grad(
      state, batch, rng, model=model, settings=one.method, schedule=schedule
    )
    with pytest.raises(AssertionError):
      check_against_torch(total, aux1, grads, ref_total, ref_x, ref_s, ref_grads)
    assert float(aux1.metrics['loss_x']) != pytest.approx(ref_x, rel=1e-5)


def test_unimatch_v2_on_a_tiny_vit_matches_the_authors_4_gpu_iteration_in_torch():
  """The same comparison on DINOv2 + DPT (`dinov2_tiny`, 2x2 patches) as the
  authors' 4 GPUs (`loss_groups=4`): the complementary masks multiply the
  four tapped token maps, and the gradient reaches every encoder and head
  weight (converted back with the layout that converts the torch weights)."""
  torch = pytest.importorskip('torch')
  from dssn_jax.models import create_model  # pylint: disable=g-import-not-at-top
  from dssn_jax.testing import torch_dinov2_reference as ref  # pylint: disable=g-import-not-at-top

  size, taps, groups = 28, (0, 1, 2, 3), 4

  def torch_dpt(seed):
    net = ref.DPT(C, 32, 4, 2, taps, 16, (8, 16, 32, 32))
    return ref.randomize(net, seed).train()

  def to_ours(state_dict):
    return pretrained.from_torch(state_dict, 'dinov2_tiny', layout='unimatch_v2')['params']

  net, ema = torch_dpt(0), torch_dpt(1)
  model = create_model('dinov2_tiny', C)
  config = make_config(
    'unimatch_v2',
    **{'data.crop_size': size, 'loss.threshold': 0.6, 'train.loss_groups': groups},
  )
  settings = config_lib.resolve(config)
  schedule = config_lib.resolve(config).schedule(80)
  params = to_ours(net.state_dict())
  state = ts.create_train_state(model, optax.sgd(0.0), None, size, variables={'params': params})
  state = state.replace(teacher_params=to_ours(ema.state_dict()))
  batch = skewed_batch(size)
  rng = jax.random.key(7)
  # Compiled: op by op, a ViT's forward and backward dispatch thousands of
  # small programs.
  ctx = common.Context(model, settings.method, schedule)
  prepared, _ = jax.jit(lambda st, b, r: uv2.prepare(st, b, r, ctx))(state, batch, rng)
  masks = check_strong_masks(prepared, 8, groups)
  (total, aux), grads = jax.jit(
    functools.partial(
      methods.value_and_grad, model=model, settings=settings.method, schedule=schedule
    )
  )(state, batch, rng)
  ref_total, ref_x, ref_s = torch_per_gpu(net, ema, batch, masks, groups, thresh=0.6)
  ref_grads = to_ours(
    {
      k: torch.zeros_like(p) if p.grad is None else p.grad  # mask_token: unused
      for k, p in net.named_parameters()
    }
  )
  check_against_torch(total, aux, grads, ref_total, ref_x, ref_s, ref_grads)


def test_unimatch_v2_optimizer_is_the_authors_adamw():
  """AdamW (0.9, 0.999, wd 0.01), encoder 5e-6, head x40: the first update of a
  fresh AdamW is `-lr * (g / (|g| + eps) + wd * p)`."""
  config = make_config('unimatch_v2')
  config_lib.apply_unimatch_v2_recipe(config)
  schedule = config_lib.resolve(config).schedule(80)
  assert (schedule.lr, schedule.head_lr) == (5e-6, 5e-6 * 40)
  tx = optim.make_optimizer(schedule, config)
  params = {'backbone': {'w': jnp.array([1.0, -2.0])}, 'head': {'w': jnp.array([0.5, 3.0])}}
  grads = {'backbone': {'w': jnp.array([0.3, -0.1])}, 'head': {'w': jnp.array([-2.0, 0.7])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  for group, lr in (('backbone', 5e-6), ('head', 2e-4)):
    g, p = np.asarray(grads[group]['w'], np.float64), np.asarray(params[group]['w'], np.float64)
    want = -lr * (g / (np.abs(g) + 1e-8) + 0.01 * p)
    # optax computes Adam's bias correction 1 - 0.999 in float32 (relative
    # error ~3e-5 of v, half of it after the square root); torch in float64.
    np.testing.assert_allclose(np.asarray(updates[group]['w']), want, rtol=5e-5)


def test_ema_keep_rate_schedule():
  """UniMatch V2: min(1 - 1/(it + 1), 0.996), 0 at the first iteration; DSSN:
  0 during the warm-up, then ema_decay; student methods: 0."""
  schedule = config_lib.resolve(make_config('dssn')).schedule(80)
  s_v2 = config_lib.resolve(make_config('unimatch_v2'))
  for step in (0, 1, 2, 9, 248, 249, 250, 1000):
    got = float(methods.ema_keep(s_v2.ema_schedule, schedule, step, 0.996))
    assert got == pytest.approx(min(1 - 1 / (step + 1), 0.996), rel=1e-6), step
  s_dssn = config_lib.resolve(make_config('dssn'))
  warm = dataclasses.replace(schedule, warmup_steps=3)
  assert [float(methods.ema_keep(s_dssn.ema_schedule, warm, t, 0.99)) for t in (0, 2, 3)] == [
    0.0,
    0.0,
    pytest.approx(0.99),
  ]
  s_um = config_lib.resolve(make_config('unimatch'))
  assert float(methods.ema_keep(s_um.ema_schedule, schedule, 50, 0.996)) == 0.0


def test_unimatch_v2_step_blends_the_teacher_with_its_keep_rate():
  model = TinyTapped(C)
  config = make_config('unimatch_v2', **{'train.optimizer': 'adamw'})
  settings = config_lib.resolve(config)
  schedule = config_lib.resolve(config).schedule(80)
  tx = optim.make_optimizer(schedule, config)
  state = state_for(model, tx, step=5)
  new, metrics = ts.train_step(
    state, make_batch(), jax.random.key(1), model=model, tx=tx, settings=settings,
    schedule=schedule,
  )  # fmt: skip
  keep = 1 - 1 / 6
  jax.tree.map(
    lambda got, t, s: np.testing.assert_allclose(got, keep * t + (1 - keep) * s, rtol=1e-6),
    new.teacher_params,
    state.teacher_params,
    new.params,
  )
  assert set(metrics) == {
    'loss',
    'loss_x',
    'loss_s1',
    'loss_s2',
    'mask_ratio',
    'lr',
    'grad_norm',
    'nonfinite',
  }


# ----------------------------------------------------------------------------
# Gradient accumulation.


@pytest.mark.parametrize(
  'method,overrides',
  [
    ('unimatch_v2', {'loss.threshold': 0.4}),
    ('dssn', {'loss.class_aware_high': 0.3, 'loss.class_aware_scale': 0.9}),
    (
      'dssn',
      {
        'model.fp_masks': 'complementary',
        'model.comp_drop': True,
        'loss.class_aware_high': 0.3,
        'loss.class_aware_scale': 0.9,
      },
    ),
    ('unimatch_v2', {'loss.threshold': 0.4, 'train.loss_groups': 4}),
    (
      'unimatch_v2',
      {
        'loss.threshold': 0.4,
        'train.loss_groups': 4,
        'loss.sup_type': 'ohem',
        'loss.ohem_min_kept': 150,  # of a group's 2 x 12 x 11 labeled pixels
      },
    ),
    (
      'dssn',
      {
        'model.comp_drop': True,
        'loss.class_aware_high': 0.3,
        'loss.class_aware_scale': 0.9,
        'train.loss_groups': 4,
      },
    ),
  ],
)
def test_grad_accum_gives_the_full_batch_update(method, overrides):
  """4 micro-batches give the one-batch update, global and per-group
  objectives (OHEM's micro-batches hold whole groups)."""
  model = TinyTapped(C)
  batch = skewed_batch(SIZE)
  out = {}
  # 2 micro-batches: test_dinov3_train.py and the slow layouts test.
  for k in (1, 4):
    config = make_config(method, **overrides, **{'train.grad_accum': k})
    settings = config_lib.resolve(config)
    schedule = dataclasses.replace(config_lib.resolve(config).schedule(80), warmup_steps=0)
    tx = optim.make_optimizer(schedule, config)
    state = state_for(model, tx)
    step = jax.jit(
      lambda st, b, r, settings=settings, schedule=schedule, tx=tx: ts.train_step(
        st, b, r, model=model, tx=tx, settings=settings, schedule=schedule
      )
    )
    new, metrics = step(state, batch, jax.random.key(3))
    out[k] = jax.device_get((new, metrics))
  (new1, m1), (new4, m4) = out[1], out[4]
  assert m1.keys() == m4.keys()
  for key in m1:
    if key.startswith('loss') or key == 'mask_ratio':
      assert float(m1[key]) > 0.0, key
    # Same terms summed in another order (float32): 1e-5 relative.
    assert float(m4[key]) == pytest.approx(float(m1[key]), rel=1e-5, abs=1e-7), key
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    (new4.params, new4.teacher_params),
    (new1.params, new1.teacher_params),
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  'method,overrides',
  [
    ('unimatch_v2', {'loss.threshold': 0.4}),
    ('dssn', {'loss.class_aware_high': 0.3, 'loss.class_aware_scale': 0.9}),
  ],
)
def test_grad_accum_gives_the_full_batch_update_on_dinov2_dpt(method, overrides):
  """The same equality on the real DINOv2 + DPT model (`dinov2_tiny`, crop 28):
  4 micro-batches of 2 against one batch of 8. Same terms summed in another
  order (float32): 1e-5 relative to each leaf's scale."""
  from dssn_jax import models  # pylint: disable=g-import-not-at-top

  size = 28
  model = models.create_model('dinov2_tiny', C)
  batch = make_batch(size=size)
  out = {}
  for k in (1, 4):
    config = make_config(method, **overrides, **{'train.grad_accum': k})
    config.data.crop_size = size
    settings = config_lib.resolve(config)
    schedule = dataclasses.replace(config_lib.resolve(config).schedule(80), warmup_steps=0)
    tx = optim.make_optimizer(schedule, config)
    state = ts.create_train_state(model, tx, jax.random.key(0), size)
    state = state.replace(teacher_params=jax.tree.map(lambda p: p * 1.1, state.params))
    step = jax.jit(
      lambda st, b, r, settings=settings, schedule=schedule, tx=tx: ts.train_step(
        st, b, r, model=model, tx=tx, settings=settings, schedule=schedule
      )
    )
    out[k] = jax.device_get(step(state, batch, jax.random.key(3)))
  (new1, m1), (new4, m4) = out[1], out[4]
  for key in m1:
    assert float(m4[key]) == pytest.approx(float(m1[key]), rel=1e-5, abs=1e-7), key

  def close(a, b):
    scale = max(float(np.max(np.abs(b))), 1e-30)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)

  jax.tree.map(close, (new4.params, new4.teacher_params), (new1.params, new1.teacher_params))


def test_grad_accum_refuses_batchnorm_models():
  from dssn_jax import models  # pylint: disable=g-import-not-at-top

  model = models.create_model('resnet_tiny', C)
  config = make_config('dssn', **{'train.grad_accum': 2})
  settings = config_lib.resolve(config)
  schedule = config_lib.resolve(config).schedule(80)
  tx = optim.make_optimizer(schedule, config)
  state = ts.create_train_state(model, tx, jax.random.key(0, impl='rbg'), SIZE)
  with pytest.raises(ValueError, match='BatchNorm'):
    jax.eval_shape(
      lambda st: ts.train_step(
        st, make_batch(), jax.random.key(0), model=model, tx=tx, settings=settings,
        schedule=schedule,
      ),
      state,
    )  # fmt: skip


def test_grad_accum_checks():
  with pytest.raises(ValueError, match='grad_accum=3 does not divide'):
    config_lib.resolve(make_config('unimatch_v2', **{'train.grad_accum': 3}))
  with pytest.raises(ValueError, match='ohem'):
    config_lib.resolve(
      make_config('unimatch_v2', **{'train.grad_accum': 2, 'loss.sup_type': 'ohem'})
    )
  with pytest.raises(ValueError, match='loss_groups=2: OHEM'):
    config_lib.resolve(
      make_config(
        'unimatch_v2',
        **{'train.grad_accum': 4, 'loss.sup_type': 'ohem', 'train.loss_groups': 2},
      )
    )
  with pytest.raises(ValueError, match='loss_groups=3 does not divide config.data.batch_size=8'):
    config_lib.resolve(make_config('unimatch_v2', **{'train.loss_groups': 3}))


# ----------------------------------------------------------------------------
# Masks, mix partners, flags.


def test_masks_come_from_global_positions():
  """A sample's masks depend on its global index only, not on the batch it
  sits in: the first 4 of a batch of 8 get the masks of a batch of 4."""
  key = jax.random.key(5)
  a = common.channel_dropout_masks(key, 8, 16)
  b = common.channel_dropout_masks(key, 4, 16)
  np.testing.assert_array_equal(a[:4], b)
  assert set(np.unique(np.asarray(a))) == {0.0, 2.0}
  m, m2 = common.complementary_masks(key, 8, 16, kept_fraction=0.0)
  np.testing.assert_array_equal(np.asarray(m) + np.asarray(m2), 2.0)


def test_mix_partner_defaults_live_in_the_presets():
  for method, want in (
    ('dssn', 'same'),
    ('unimatch', 'same'),
    ('fixmatch', 'same'),
    ('unimatch_v2', 'reversed'),
  ):
    assert config_lib.resolve(make_config(method)).mix_partner == want
  assert (
    config_lib.resolve(make_config('dssn', **{'data.mix_partner': 'shuffled'})).mix_partner
    == 'shuffled'
  )
  with pytest.raises(ValueError, match="mix_partner='reversed'"):
    config_lib.resolve(make_config('dssn', **{'data.mix_partner': 'reversed'}))
  with pytest.raises(ValueError, match="mix_partner='same'"):
    config_lib.resolve(make_config('unimatch_v2', **{'data.mix_partner': 'same'}))


def test_dssn_feature_mask_flags_on_the_tapped_model():
  """fp_masks='complementary' gives the two fp branches m and 2 - m;
  comp_drop adds UniMatch V2's pairs to the strong views; both need a model
  with tapped features."""
  model = TinyTapped(C)
  config = make_config('dssn', **{'model.fp_masks': 'complementary', 'model.comp_drop': True})
  settings = config_lib.resolve(config)
  ctx = common.Context(model, settings.method, config_lib.resolve(config).schedule(80))
  state = state_for(model, optax.sgd(0.0))
  prepared, _ = methods.get('dssn').prepare(state, make_batch(), jax.random.key(0), ctx)
  fp = np.asarray(prepared['fp_masks'])  # (n, 2, D)
  np.testing.assert_array_equal(fp[:, 0] + fp[:, 1], 2.0)
  sm = np.asarray(prepared['strong_masks'])
  np.testing.assert_array_equal(sm[:, 0] + sm[:, 1], 2.0)
  assert np.all(sm[:, 0] == 1.0, axis=1).sum() == 4
  default = config_lib.resolve(make_config('dssn'))
  assert (default.method.fp_masks, default.method.comp_drop) == ('independent', False)

  class NoTaps:  # a model without feature_dim (DeepLabV3+)
    pass

  ctx = common.Context(NoTaps(), settings.method, ctx.schedule)
  with pytest.raises(ValueError, match='feature_dim'):
    methods.get('dssn').prepare(state, make_batch(), jax.random.key(0), ctx)


def test_method_registry_is_the_one_list():
  # Built-in first, in their order (a test may have registered more after them).
  builtin = ('dssn', 'unimatch', 'fixmatch', 'supervised', 'unimatch_v2')
  assert methods.names()[:5] == builtin
  with pytest.raises(ValueError, match='not one of'):
    methods.get('meanteacher')


# ----------------------------------------------------------------------------
# Evaluation resize.


def test_eval_resize_to_a_multiple_of_14_matches_torch():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  assert evaluate.resized_size(500, 375, 14) == (504, 378)
  assert evaluate.resized_size(20, 27, 14) == (14, 28)  # 1.43 -> 1, 1.93 -> 2
  model = TinyTapped(C)
  params = init(model, SIZE)
  images = np.random.default_rng(0).integers(0, 256, (2, 20, 27, 3), dtype=np.uint8)
  got = evaluate.model_logits_fn(model, {'params': params}, resize_multiple=14)(images)
  x = torch.from_numpy(np.asarray(evaluate.normalize(images))).permute(0, 3, 1, 2)
  x = F.interpolate(x, (14, 28), mode='bilinear', align_corners=True)
  with torch.no_grad():
    logits = torch_module(jax.device_get(params))(x)
  want = F.interpolate(logits, (20, 27), mode='bilinear', align_corners=True)
  # Two float32 programs of the same arithmetic, logits of order 1.
  np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  # 0 (the default, ResNet): the model sees the image as is.
  plain = evaluate.model_logits_fn(model, {'params': params})(images)
  direct = model.apply({'params': params}, evaluate.normalize(images))[0]
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(direct))
  assert config_lib.base_config().data.eval_resize_multiple == 0


def authors_v2_windows(size, window, stride):
  """UniMatch V2's `evaluate` loop over one axis (`supervised.py`)."""
  starts, pos = [], 0
  while True:
    starts.append(pos)
    if pos == size - window:
      break
    pos = min(pos + stride, size - window)
  return starts


def test_shifted_sliding_windows_follow_unimatch_v2():
  for size in (1024, 2048, 800, 799):
    want = authors_v2_windows(size, 798, int(798 * 2 / 3))
    assert evaluate.window_starts(size, int(798 * 2 / 3), 798, shift=True) == want, size
  assert evaluate.window_starts(2048, 532, 798, shift=True) == [0, 532, 1064, 1250]
  assert evaluate.window_starts(500, 532, 798, shift=True) == [0]
  # Probabilities: every window whole, summed where they overlap.
  h, w, win = 20, 31, 14
  images = np.random.default_rng(0).normal(size=(1, h, w, 3)).astype(np.float32)

  def logits_fn(x):
    assert x.shape[1:3] == (win, win)  # never truncated
    return jnp.concatenate([x, -x], axis=-1)

  got = np.asarray(evaluate.sliding_window_probs(logits_fn, images, win, shift=True))
  want = np.zeros((1, h, w, 6))
  stride = int(win * 2 / 3)
  for r in authors_v2_windows(h, win, stride):
    for c in authors_v2_windows(w, win, stride):
      crop = images[:, r : r + win, c : c + win]
      want[:, r : r + win, c : c + win] += jax.nn.softmax(np.concatenate([crop, -crop], -1), -1)
  # float32 softmax sums of at most 4 windows.
  np.testing.assert_allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------
# DSSN on a tiny ResNet against the authors' loop on 4 GPUs with SyncBN.


def recorded_dropout_masks(model, variables, images, rng):
  """The channel masks the model's Dropout2d layers drew in one forward
  (`perturb=2`, the `dropout` rng the DSSN step passes), whatever order the
  model stacks its copies in: `[c1's, c4's]`, each `(2, N, C)` in {0, 2},
  mask k of input row i (a dropped row is matched to the row of `aux['c1']`
  / `aux['c4']` it copies, exactly)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from dssn_jax.models import layers  # pylint: disable=g-import-not-at-top

  def forward(variables, images, rng):
    records = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, layers.Dropout2d):
        records.append((args[0], out))
      return out

    with nn.intercept_methods(interceptor):
      (_, aux), _ = model.apply(
        variables, images, train=True, perturb=2, rngs={'dropout': rng}, mutable=['batch_stats']
      )
    return records, (aux['c1'], aux['c4'])

  records, features = jax.device_get(jax.jit(forward)(variables, images, rng))
  out = []
  for feats in features:
    rows = [  # (sample, copy, ...) or (copy * sample, ...): every dropped row
      (x, y)
      for xs, ys in records
      if xs.shape[-3:] == feats.shape[1:]
      for x, y in zip(xs.reshape((-1,) + feats.shape[1:]), ys.reshape((-1,) + feats.shape[1:]))
    ]
    masks, seen = np.zeros((2, feats.shape[0], feats.shape[-1])), np.zeros(feats.shape[0], int)
    for x, y in rows:
      (i,) = [i for i in range(feats.shape[0]) if np.array_equal(x, feats[i])]
      # y = x * mask: the mask where x != 0 (a plane that is 0 everywhere gets
      # 0; its mask changes neither the value nor, behind a ReLU, the gradient).
      masks[seen[i], i] = np.where(x != 0, y / np.where(x != 0, x, 1), 0).max(axis=(0, 1))
      seen[i] += 1
    assert np.all(seen == 2)
    out.append(masks)
  return out


def torch_dssn(net, ema, batch, masks, groups, w, high, scale):
  """DSSN's loop body (docs/method.md, the authors' `dssn.py`) on `groups`
  GPUs with SyncBN: each call is one forward over the global batch (the
  GPUs' synchronized statistics), each GPU's terms on its own rows, the
  gradients averaged as DDP does (left in `net`).

  Returns:
    the terms averaged over the GPUs, by our metric names, the total, and
    `global_loss_x`: L_x as one mean over the whole batch's pixels.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
  img = lambda k: (torch.from_numpy(batch[k]).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
  box = lambda k: torch.from_numpy(batch[k])
  long = lambda k: torch.from_numpy(np.asarray(batch[k])).long()
  b1, b2 = box('box1'), box('box2')
  u_s1 = torch.where(b1[:, None], img('m_s1'), img('u_s1'))
  u_s2 = torch.where(b2[:, None], img('m_s2'), img('u_s2'))
  with torch.no_grad():
    ema.train()
    t_m, t_w = ema(img('m_w')), ema(img('u_w'))
  x = img('x')
  n_x, n = x.shape[0], u_s1.shape[0]
  c1, c4 = net.backbone(torch.cat([x, img('u_w')]))
  m1, m4 = (torch.from_numpy(m).float() for m in masks)
  rows = c1.shape[0]
  drop = lambda c, m: torch.cat(
    [c] + [c * m[i * rows : (i + 1) * rows, :, None, None] for i in range(2)]
  )
  clean, fp1, fp2 = net.decode(drop(c1, m1), drop(c4, m4), x.shape[-2:]).chunk(3)
  p_x, p_w, fp = clean[:n_x], clean[n_x:].detach(), (fp1[n_x:], fp2[n_x:])
  p_s = net(torch.cat([u_s1, u_s2])).chunk(2)

  def cplg(logits):
    probs = logits.softmax(1)
    top = probs.amax(dim=(2, 3), keepdim=True)
    return (probs > torch.where(top > high, scale * top, top)).any(1)

  z = lambda p: (p - p.mean(1, keepdim=True)) / p.std(1, keepdim=True)
  ce = lambda logits, labels: F.cross_entropy(logits, labels, reduction='none')
  per_x, per = n_x // groups, n // groups
  terms = []
  for q in range(groups):
    rx, r = slice(q * per_x, (q + 1) * per_x), slice(q * per, (q + 1) * per)
    t = {'loss_x': F.cross_entropy(p_x[rx], long('y')[rx], ignore_index=255)}
    valid = long('u_ignore')[r] != 255
    for k, (bk, mk) in enumerate(((b1, 'm_ignore'), (b2, 'm_ignore'))):
      t_k = torch.where(bk[r][:, None], t_m[r], t_w[r])
      vk = torch.where(bk[r], long(mk)[r], long('u_ignore')[r]) != 255
      t[f'loss_s{k + 1}'] = (ce(p_s[k][r], t_k.argmax(1)) * cplg(t_k) * vk).sum() / vk.sum()
      fp_mask = cplg(p_w[r]) * valid
      t[f'loss_fp{k + 1}'] = (ce(fp[k][r], p_w[r].argmax(1)) * fp_mask).sum() / valid.sum()
    t['loss_align_image'] = F.mse_loss(z(p_s[0][r]), z(p_s[1][r]))
    t['loss_align_feature'] = F.mse_loss(z(fp[0][r]), z(fp[1][r]))
    t['loss'] = (
      w.sup * t['loss_x']
      + w.strong * (t['loss_s1'] + t['loss_s2'])
      + w.fp * (t['loss_fp1'] + t['loss_fp2'])
      + w.align_image * t['loss_align_image']
      + w.align_feature * t['loss_align_feature']
    )
    terms.append(t)
  (sum(t['loss'] for t in terms) / groups).backward()
  out = {k: float(np.mean([float(t[k].detach()) for t in terms])) for k in terms[0]}
  out['global_loss_x'] = float(F.cross_entropy(p_x, long('y'), ignore_index=255).detach())
  return out


def test_dssn_on_a_tiny_resnet_matches_the_authors_4_gpu_iteration_in_torch():
  """DSSN with `loss_groups=4` against its loop on 4 GPUs with SyncBN, on
  quarters with different valid-pixel counts: every term, the total and
  every gradient within `numerics.NETWORK` (JAX vs torch through a ResNet);
  L_x as one global mean fails that check."""
  torch = pytest.importorskip('torch')
  from dssn_jax.models import create_model  # pylint: disable=g-import-not-at-top
  from dssn_jax.testing import numerics, torch_reference  # pylint: disable=g-import-not-at-top

  size, groups, high, scale = 33, 4, 0.3, 0.9
  tiny = dict(widths=(8, 16, 32, 64), stem=8, aspp=32, low=8, decoder=32)

  def torch_net(seed):
    net = torch_reference.DeepLabV3Plus(C, blocks=(1, 1, 1, 1), **tiny)
    return torch_reference.randomize(net, image_size=size, seed=seed).train()

  def to_ours(state_dict):
    return pretrained.from_torch(state_dict, backbone='resnet_tiny', layout='model')

  net, ema = torch_net(0), torch_net(1)
  model = create_model('resnet_tiny', C)
  overrides = {
    'data.crop_size': size,
    'loss.class_aware_high': high,
    'loss.class_aware_scale': scale,
  }
  config = make_config('dssn', **overrides, **{'train.loss_groups': groups})
  settings = config_lib.resolve(config)
  schedule = dataclasses.replace(settings.schedule(80), warmup_steps=0)
  variables, teacher = to_ours(net.state_dict()), to_ours(ema.state_dict())
  state = ts.create_train_state(model, optax.sgd(0.0), None, size, variables=variables)
  state = state.replace(
    teacher_params=teacher['params'], teacher_batch_stats=teacher['batch_stats']
  )
  batch = skewed_batch(size)
  rng = jax.random.key(7)
  # The step's joint forward interleaves x and u_w; torch_dssn concatenates.
  images = common.normalized(common.interleave(batch['x'], batch['u_w']))
  order = np.asarray(common.interleave(np.arange(8), np.arange(8, 16)))
  masks = [
    np.concatenate([m[:, np.argsort(order)][k] for k in range(2)])
    for m in recorded_dropout_masks(model, variables, images, jax.random.fold_in(rng, 0))
  ]
  assert {float(v) for m in masks for v in np.unique(m)} <= {0.0, 2.0}

  def run(settings):
    fn = functools.partial(
      methods.value_and_grad, model=model, settings=settings.method, schedule=schedule
    )
    return jax.jit(fn)(state, batch, rng)

  (total, aux), grads = run(settings)
  ref = torch_dssn(net, ema, batch, masks, groups, settings.method, high, scale)
  got = {k: float(v) for k, v in aux.metrics.items() if k != 'mask_ratio'}
  assert got.keys() == ref.keys() - {'loss', 'global_loss_x'}
  assert min(got.values()) > 0.0
  for key, value in {**got, 'loss': float(total)}.items():
    numerics.assert_close(value, ref[key], numerics.NETWORK, err_msg=key)
  ref_grads = to_ours(
    {
      k: dict(net.named_parameters())[k].grad if k in dict(net.named_parameters()) else v
      for k, v in net.state_dict().items()
    }
  )['params']
  # Gradients to 3 x NETWORK of the largest: the backward adds BatchNorm's
  # reductions again, and JAX sums the rows in the step's (interleaved)
  # order, torch in concat(x, u_w)'s (measured: 1.2e-4, 5 of 216 elements
  # of one kernel over 1e-4; the global mean moves L_x by 5e-3 of itself).
  scale_of = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(
    lambda g, r: np.testing.assert_allclose(
      np.asarray(g), np.asarray(r), atol=3 * numerics.NETWORK * scale_of, rtol=0
    ),
    grads,
    ref_grads,
  )
  with pytest.raises(AssertionError):
    numerics.assert_close(got['loss_x'], ref['global_loss_x'], numerics.NETWORK)
  del torch
