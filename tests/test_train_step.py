"""The train step: each method end to end, warm-up, EMA teacher, ablations,
and 1 vs 8 devices.

Compiles are the cost on CPU, so each compiled step is built once per module
and shared; the ablation comparison runs `objective` eagerly (one cache of
small op compiles serves every variant).
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dssn_jax import compilation, config_lib, losses, models, optim, parallel, pseudo_labels, train
from dssn_jax import train_step as ts
from dssn_jax.methods import common
from dssn_jax.normalize import normalize
from dssn_jax.testing import numerics
from dssn_jax.testing.train_steps import (
  NUM_CLASSES,
  initial_state,
  initial_variables,
  make_batch,
  make_config,
  make_schedule,
  run_steps,
  to_host,
)


def assert_tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, to_host(a), to_host(b))


def assert_ema(got, teacher, student, rel):
  """Leaf by leaf, `got` is the EMA `0.996 * teacher + 0.004 * student`
  within `rel` of its scale (`numerics.assert_close`)."""
  jax.tree.map(
    lambda g, t, s: numerics.assert_close(g, 0.996 * t + 0.004 * s, rel), got, teacher, student
  )


@pytest.fixture(scope='module')
def model():
  return models.create_model('resnet_tiny', NUM_CLASSES)


@pytest.fixture(scope='module')
def mesh():
  return parallel.make_mesh(jax.devices()[:1])


def test_create_train_state(model):
  state = initial_state(model)
  assert int(state.step) == 0
  assert set(state.params) == {'backbone', 'head', 'reduce', 'fuse', 'classifier'}
  assert_tree_equal(state.teacher_params, state.params)
  assert_tree_equal(state.teacher_batch_stats, state.batch_stats)
  # Distinct buffers, so donating the state never donates one buffer twice.
  pairs = zip(jax.tree.leaves(state.params), jax.tree.leaves(state.teacher_params))
  assert all(a is not b for a, b in pairs)


@pytest.fixture(scope='module')
def dssn65(model, mesh):
  """Two steps of the full DSSN VOC recipe at 65x65 (step 0 is the warm-up)."""
  config = make_config()
  config.data.crop_size = 65
  config.train.teacher_bn = 'batch'
  batch = make_batch(65)
  return dict(batch=batch, config=config, **run_steps(model, mesh, config, batch, 2))


DSSN_TERMS = {
  'loss',
  'loss_x',
  'loss_s1',
  'loss_s2',
  'loss_fp1',
  'loss_fp2',
  'loss_align_image',
  'loss_align_feature',
  'mask_ratio',
  'lr',
  'grad_norm',
  'nonfinite',
}


def total_of(m, settings, warm):
  """The weighted total from the reported terms."""
  s = settings.method
  weight = lambda name: getattr(s, name, 0.0)  # a method without the term has no knob
  strong = 0.0 if warm else weight('strong')
  parts = {
    'loss_x': weight('sup'),
    'loss_s': strong,
    'loss_s1': strong,
    'loss_s2': strong,
    'loss_fp': weight('fp'),
    'loss_fp1': weight('fp'),
    'loss_fp2': weight('fp'),
    'loss_align_image': weight('align_image'),
    'loss_align_feature': weight('align_feature'),
  }
  return sum(w * m[k] for k, w in parts.items() if k in m)


def test_dssn_step_65(dssn65):
  for t, m in enumerate(dssn65['metrics']):
    assert set(m) == DSSN_TERMS
    assert all(np.isfinite(v) for v in m.values()), m
    # Steps 0 and 1 both at lr; float32 vs float64: one rounding (approx's rel 1e-6).
    assert m['lr'] == pytest.approx(dssn65['schedule'].lr)
    assert 0.0 <= m['mask_ratio'] <= 1.0
    assert m['grad_norm'] > 0
    assert int(dssn65['states'][t + 1].step) == t + 1
  before, after = dssn65['states'][0], dssn65['states'][1]
  changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: not np.array_equal(a, b), before.params, after.params)
  )
  assert all(changed)  # every student parameter moved (weight decay at least)


def test_total_and_warmup(dssn65):
  """VOC weights 0.5 / 0.125 / 0.125 / 0.005; step 0 leaves the strong terms out."""
  settings = dssn65['settings']
  assert (settings.method.sup, settings.method.strong, settings.method.fp) == (0.5, 0.125, 0.125)
  assert settings.method.align_image == settings.method.align_feature == 0.005
  m0, m1 = dssn65['metrics']
  # The step's total vs the weighted sum of its reported terms: one program,
  # but XLA may compute a term twice in different fusions (its mean over
  # ~10^4 pixels reassociated): LAYER.
  assert m0['loss'] == pytest.approx(total_of(m0, settings, warm=True), rel=numerics.LAYER)
  assert m1['loss'] == pytest.approx(total_of(m1, settings, warm=False), rel=numerics.LAYER)


def test_teacher_moves_only_by_ema(model, dssn65):
  s0, s1, s2 = dssn65['states']
  # Step 0 (warm-up): keep rate 0, the teacher becomes the student exactly.
  assert_tree_equal(s1.teacher_params, s1.params)
  assert_tree_equal(s1.teacher_batch_stats, s1.batch_stats)
  # Step 1: teacher = 0.996 * teacher + 0.004 * student, no gradient step.
  # float32 EMA (two products and a sum) vs float64: a few eps of the scale.
  assert_ema(s2.teacher_params, s1.teacher_params, s2.params, numerics.FEW_OPS)
  # BatchNorm: the teacher's own forwards (m_w, then u_w, batch statistics)
  # update its running statistics before the EMA blends in the student's.
  batch = dssn65['batch']

  @jax.jit
  def teacher_forwards(params, stats):
    for key in ('m_w', 'u_w'):
      _, updates = model.apply(
        {'params': params, 'batch_stats': stats},
        normalize(batch[key]),
        train=True,
        mutable=['batch_stats'],
      )
      stats = updates['batch_stats']
    return stats

  stats = to_host(teacher_forwards(s1.teacher_params, s1.teacher_batch_stats))
  # Statistics from the step vs from this test's forward (two programs
  # through the network), then the EMA: NETWORK.
  assert_ema(s2.teacher_batch_stats, stats, s2.batch_stats, numerics.NETWORK)


def test_reference_teacher_bn_and_supervised_warmup_are_phases():
  """DSSN's programs by step (`Settings.for_step`, what `make_train_step`
  compiles per phase): the reference teacher BatchNorm uses batch statistics
  in the first epoch and running ones after; a supervised warm-up's steps
  run the supervised iteration. (Each program compiled and run: the slow
  tests below.)"""
  config = make_config()
  method = config_lib.resolve(config).method
  schedule = types.SimpleNamespace(steps_per_epoch=5, warmup_steps=2)
  assert method.teacher_bn == 'reference' and method.phased
  assert [method.for_step(t, schedule).teacher_bn for t in (0, 4, 5, 9)] == [
    'batch',
    'batch',
    'running',
    'running',
  ]
  config.train.warmup_terms = 'supervised'
  method = config_lib.resolve(config).method
  assert [method.for_step(t, schedule).method for t in (0, 1, 2)] == [
    'supervised',
    'supervised',
    'dssn',
  ]
  assert method.labeled_only_steps(schedule) == 2


@pytest.mark.slow
def test_reference_teacher_bn_switches_to_running_after_the_first_epoch(model, mesh):
  """`teacher_bn='reference'`: after epoch 0 the teacher's forwards no longer
  touch its statistics; they change by the EMA alone (the reference's eval())."""
  config = make_config()
  config.data.crop_size = 33
  assert config.train.teacher_bn == 'reference'
  run = run_steps(model, mesh, config, make_batch(33), 2, steps_per_epoch=1)
  _, s1, s2 = run['states']
  # float32 EMA (two products and a sum) vs float64: a few eps of the scale.
  assert_ema(s2.teacher_batch_stats, s1.teacher_batch_stats, s2.batch_stats, numerics.FEW_OPS)


def test_running_teacher_one_call_gives_the_two_calls_targets(model):
  """With running-statistics BN the teacher labels m_w and u_w in one call;
  the strong-view losses equal those from two separate teacher calls."""
  config = make_config()
  config.train.teacher_bn = 'running'
  settings = config_lib.resolve(config)
  schedule = make_schedule(config, warmup_steps=0)
  state = ts.create_train_state(
    model, optax.sgd(0.1), jax.random.key(0), 33, variables=initial_variables(model)
  )
  # A teacher that differs from the student, with non-trivial statistics.
  state = state.replace(
    teacher_params=jax.tree.map(lambda p: p * 1.1, state.params),
    teacher_batch_stats=jax.tree.map(lambda v: v + 0.1, state.batch_stats),
  )
  batch = make_batch(33, batch=3)
  rng = jax.random.key(3)
  _, aux = ts.objective(
    state.params, state, batch, rng, model=model, settings=settings, schedule=schedule
  )
  assert_tree_equal(aux.teacher_batch_stats, state.teacher_batch_stats)

  teacher = {'params': state.teacher_params, 'batch_stats': state.teacher_batch_stats}
  t_m = model.apply(teacher, normalize(batch['m_w']), train=False)[0]
  t_w = model.apply(teacher, normalize(batch['u_w']), train=False)[0]
  x, u_w = normalize(batch['x']), normalize(batch['u_w'])
  _, _, bs = ts._forward(
    model,
    state.params,
    state.batch_stats,
    jnp.concatenate([x, u_w]),
    train=True,
    perturb=settings.method.fp_branches,
    rng=jax.random.fold_in(rng, 0),
  )
  strong = normalize(
    jnp.concatenate(
      [
        pseudo_labels.compose_cutmix(batch[box], batch[m_s], batch[u_s])
        for u_s, m_s, box in ts.VIEW_KEYS[:2]
      ]
    )
  )
  p_s = jnp.split(ts._forward(model, state.params, bs, strong, train=True)[0], 2)
  for k, (suffix, key) in enumerate((('1', 'box1'), ('2', 'box2'))):
    t_k = pseudo_labels.compose_cutmix(batch[key], t_m, t_w)
    valid = pseudo_labels.compose_cutmix(batch[key], batch['m_ignore'], batch['u_ignore']) != 255
    mask = pseudo_labels.confidence_mask(
      t_k,
      settings.method.pseudo_label,
      threshold=settings.method.threshold,
      high=settings.method.class_aware_high,
      scale=settings.method.class_aware_scale,
    )
    want = losses.pseudo_label_ce(p_s[k], pseudo_labels.hard_labels(t_k), mask, valid)
    # The step's term vs this test's recomputation (two programs through the
    # network): NETWORK of the loss.
    numerics.assert_close(aux.metrics['loss_s' + suffix], want, numerics.NETWORK)


COMMON = {'loss', 'loss_x', 'lr', 'grad_norm', 'nonfinite'}
METHOD_TERMS = {
  'unimatch': COMMON | {'loss_s1', 'loss_s2', 'loss_fp', 'mask_ratio'},
  'fixmatch': COMMON | {'loss_s', 'mask_ratio'},
  'supervised': COMMON,
}


@pytest.mark.slow
def test_strong_view_bn_stats_flag(model):
  """False: the student's running BN statistics are those of the clean
  forward on (x, u_w) alone (interleaved, as the step runs it); True
  (reference): the strong-view forward moves them on from there."""
  batch = make_batch(33, batch=2)
  rng = jax.random.key(4)
  state = ts.create_train_state(
    model, optax.sgd(0.1), jax.random.key(0), 33, variables=initial_variables(model)
  )
  config = make_config()
  settings = config_lib.resolve(config)
  schedule = make_schedule(config, warmup_steps=0)
  _, _, clean = ts._forward(
    model,
    state.params,
    state.batch_stats,
    common.interleave(normalize(batch['x']), normalize(batch['u_w'])),
    train=True,
    perturb=settings.method.fp_branches,
    rng=jax.random.fold_in(rng, 0),
  )
  stats = {}
  for flag in (True, False):
    config.train.strong_view_bn_stats = flag
    settings = config_lib.resolve(config)
    _, aux = ts.objective(
      state.params, state, batch, rng, model=model, settings=settings, schedule=schedule
    )
    stats[flag] = aux.batch_stats
  assert_tree_equal(stats[False], clean)
  moved = jax.tree.leaves(
    jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), stats[True], clean)
  )
  assert max(moved) > 1e-4


@pytest.mark.parametrize('warmup_terms', ['strong', 'unlabeled', 'supervised'])
def test_warmup_terms(model, warmup_terms):
  """Inside the warm-up, 'strong' (reference) leaves fp and alignment in the
  total; 'unlabeled' leaves only the supervised term, and so does the pure
  step under 'supervised' (whose loop runs the supervised program instead)."""
  batch = make_batch(33, batch=2)
  state = ts.create_train_state(
    model, optax.sgd(0.1), jax.random.key(0), 33, variables=initial_variables(model)
  )
  config = make_config(pseudo_label='fixed', threshold=0.0)  # every pixel teaches
  config.train.warmup_terms = warmup_terms
  settings = config_lib.resolve(config)
  total, aux = ts.objective(
    state.params,
    state,
    batch,
    jax.random.key(4),
    model=model,
    settings=settings,
    schedule=make_schedule(config, warmup_steps=1),
  )
  m = {k: float(v) for k, v in aux.metrics.items()}
  assert m['loss_fp1'] > 0 and m['loss_align_feature'] > 0
  if warmup_terms != 'strong':
    expected = settings.method.sup * m['loss_x']
  else:
    expected = total_of(m, settings, warm=True)
    assert expected > settings.method.sup * m['loss_x']
  # Total vs the weighted sum of the reported terms (see test_total_and_warmup).
  assert float(total) == pytest.approx(expected, rel=numerics.LAYER)


@pytest.mark.slow
def test_supervised_warmup_runs_the_supervised_program(model, mesh):
  """`warmup_terms='supervised'`: the warm-up steps compile and run the
  supervised iteration on x, y alone (teacher = student); the next step's
  program is DSSN's (lowered only: its outputs name the DSSN terms)."""
  config = make_config()
  config.data.crop_size = 33
  config.train.teacher_bn = 'batch'
  config.train.labeled_bn = 'separate'
  config.train.warmup_terms = 'supervised'
  settings = config_lib.resolve(config)
  schedule = make_schedule(config, warmup_steps=1)
  tx = optim.make_optimizer(schedule, config)
  state = ts.create_train_state(model, tx, None, 33, variables=initial_variables(model))
  state = parallel.replicate(state, mesh)
  step_fn = ts.make_train_step(model, tx, settings, schedule, mesh)
  assert step_fn.batch_keys(0) == ('x', 'y') and step_fn.batch_keys(1) is None
  full = make_batch(33)
  labeled = parallel.shard_batch({k: full[k] for k in ('x', 'y')}, mesh)
  assert step_fn.compiles(state, 0)
  state, m0 = step_fn(state, labeled, jax.random.key(1), step=0)
  assert not step_fn.compiles(state, 0) and step_fn.compiles(state, 1)
  m0 = {k: float(v) for k, v in m0.items()}
  assert set(m0) == {'loss', 'loss_x', 'lr', 'grad_norm', 'nonfinite'}
  assert m0['loss'] == pytest.approx(settings.method.sup * m0['loss_x'], rel=numerics.FEW_OPS)
  s1 = to_host(state)
  assert_tree_equal(s1.teacher_params, s1.params)  # keep rate 0 in the warm-up
  lowered = step_fn.lower(state, parallel.shard_batch(full, mesh), jax.random.key(2), step=1)
  _, metrics = lowered.out_info
  assert {'loss_s1', 'loss_fp1', 'loss_align_feature', 'mask_ratio'} <= set(metrics)


def test_precompile_runs_the_background_compile_executable():
  """`precompile` compiles a later phase's program in a thread; the first
  call in that phase runs that executable (nothing compiles again) and gives
  what the jitted step gives; a compile error is raised by that call."""
  config = make_config()
  config.train.warmup_terms = 'supervised'
  settings = config_lib.resolve(config)
  schedule = make_schedule(config, warmup_steps=1)

  def compile_for(phase_settings):  # a stand-in step: which program ran shows in its output
    scale = 2.0 if phase_settings.method.method == 'supervised' else 3.0
    return jax.jit(lambda state, batch, rng: (state + scale * batch['x'], {'scale': scale}))

  state, batch, rng = jnp.ones(4), {'x': jnp.arange(4.0)}, jax.random.key(0)
  step_fn = ts._PhasedStep(settings, schedule, compile_for)
  with compilation.CompileCounter() as counter:
    step_fn.precompile(state, batch, rng, step=1)
    assert step_fn.compiles(state, 1)  # waits for the background compile
    out, metrics = step_fn(state, batch, rng, step=1)
    jax.block_until_ready(out)
  assert counter.compiles == 1 and not step_fn.compiles(state, 1)  # compiled once
  np.testing.assert_array_equal(out, compile_for(settings)(state, batch, rng)[0])
  assert metrics['scale'] == 3.0
  warm, _ = step_fn(state, batch, rng, step=0)  # the warm-up phase compiles on its call
  np.testing.assert_array_equal(warm, state + 2.0 * batch['x'])

  broken = ts._PhasedStep(settings, schedule, lambda _: jax.jit(lambda s, b, r: s @ b['x']))
  broken.precompile(jnp.ones((2, 3)), {'x': jnp.ones((2, 3))}, rng, step=1)
  with pytest.raises(TypeError, match='dot_general'):
    broken(jnp.ones((2, 3)), {'x': jnp.ones((2, 3))}, rng, step=1)


def test_labeled_bn_separate(model):
  """'separate': the labeled loss is the supervised method's (x alone in its
  BN batch); 'joint' (reference) normalizes x together with u_w."""
  batch = make_batch(33, batch=2)
  state = ts.create_train_state(
    model, optax.sgd(0.1), jax.random.key(0), 33, variables=initial_variables(model)
  )
  schedule = make_schedule(make_config(), warmup_steps=0)

  def loss_x(config):
    _, aux = ts.objective(
      state.params,
      state,
      batch,
      jax.random.key(4),
      model=model,
      settings=config_lib.resolve(config),
      schedule=schedule,
    )
    return float(aux.metrics['loss_x'])

  sup = loss_x(make_config('supervised'))
  config = make_config()
  config.train.labeled_bn = 'separate'
  # Two programs (the DSSN and the supervised step) through the network.
  assert loss_x(config) == pytest.approx(sup, rel=numerics.NETWORK)
  config.train.labeled_bn = 'joint'
  assert abs(loss_x(config) - sup) > 1e-4
  config.train.labeled_bn = 'split'
  with pytest.raises(ValueError, match='labeled_bn'):
    config_lib.resolve(config)


def test_warmup_terms_rejects_unknown():
  config = make_config()
  config.train.warmup_terms = 'all'
  with pytest.raises(ValueError, match='warmup_terms'):
    config_lib.resolve(config)


# The supervised step is the others' labeled branch (it runs in the
# grad-accum tests) and FixMatch is UniMatch without its second strong view
# and feature perturbation: both slow here.
@pytest.mark.parametrize(
  'method',
  [
    pytest.param(m, marks=pytest.mark.slow) if m in ('supervised', 'fixmatch') else m
    for m in sorted(METHOD_TERMS)
  ],
)
def test_other_methods_step_65(model, mesh, method):
  config = make_config(method)
  config.data.crop_size = 65
  batch = make_batch(65, supervised=method == 'supervised')
  out = run_steps(model, mesh, config, batch, 1, warmup_steps=0)
  (m,), (s0, s1) = out['metrics'], out['states']
  assert set(m) == METHOD_TERMS[method]
  assert all(np.isfinite(v) for v in m.values()), m
  # Total vs the weighted sum of the reported terms (see test_total_and_warmup).
  assert m['loss'] == pytest.approx(total_of(m, out['settings'], warm=False), rel=numerics.LAYER)
  assert not np.array_equal(s0.params['classifier']['kernel'], s1.params['classifier']['kernel'])
  # No EMA teacher: it tracks the student.
  assert_tree_equal(s1.teacher_params, s1.params)
  assert_tree_equal(s1.teacher_batch_stats, s1.batch_stats)


def test_nonfinite_step_leaves_the_state_unchanged(model):
  """A step whose loss is NaN (here from a NaN classifier bias) reports
  `nonfinite` and keeps every variable; only `step` advances. A finite step
  reports 0 and moves the params."""
  config = make_config('supervised')
  settings = config_lib.resolve(config)
  schedule = make_schedule(config, warmup_steps=0)
  tx = optim.make_optimizer(schedule, config)
  step_fn = jax.jit(
    functools.partial(ts.train_step, model=model, tx=tx, settings=settings, schedule=schedule)
  )
  batch = make_batch(33, supervised=True)
  state = ts.create_train_state(
    model, tx, jax.random.key(0), 33, variables=initial_variables(model)
  )
  good, m = step_fn(state, batch, jax.random.key(1))
  assert float(m['nonfinite']) == 0.0 and np.isfinite(float(m['loss']))
  assert not np.array_equal(
    good.params['classifier']['kernel'], state.params['classifier']['kernel']
  )

  params = jax.tree.map(jnp.copy, good.params)
  params['classifier']['bias'] = params['classifier']['bias'].at[0].set(jnp.nan)
  bad = good.replace(params=params)
  after, m = step_fn(bad, batch, jax.random.key(2))
  assert float(m['nonfinite']) == 1.0 and not np.isfinite(float(m['loss']))
  assert int(after.step) == int(bad.step) + 1
  # Unchanged bit for bit (NaN positions included): the update was not applied.
  assert_tree_equal(after.replace(step=bad.step), bad)


def test_batch_missing_key_is_named(model):
  config = make_config()
  settings = config_lib.resolve(config)
  schedule = make_schedule(config)
  tx = optim.make_optimizer(schedule, config)
  batch = make_batch(33)
  del batch['box2']
  # The batch is checked before anything runs: an empty state will do.
  state = ts.TrainState(
    step=jnp.zeros((), jnp.int32),
    params={},
    batch_stats={},
    teacher_params={},
    teacher_batch_stats={},
    opt_state=None,
  )
  with pytest.raises(ValueError, match='box2'):
    ts.train_step(
      state, batch, jax.random.key(1), model=model, tx=tx, settings=settings, schedule=schedule
    )
  fixmatch = config_lib.resolve(make_config('fixmatch'))
  fixmatch = dataclasses.replace(
    fixmatch, method=dataclasses.replace(fixmatch.method, align_image=0.01)
  )
  with pytest.raises(ValueError, match='align_image'):
    ts.train_step(
      state,
      make_batch(33),
      jax.random.key(1),
      model=model,
      tx=tx,
      settings=fixmatch,
      schedule=schedule,
    )


# Ablations: CPLG numbers chosen so that a random init selects some pixels
# (the reference's 0.92 selects none before training).
ABLATIONS = {
  'align_image': (dict(align_image=0.0), {'loss_align_image'}),
  'align_feature': (dict(align_feature=0.0), {'loss_align_feature'}),
  'fp': (dict(fp=0.0), {'loss_fp1', 'loss_fp2'}),
  'strong': (dict(strong=0.0), {'loss_s1', 'loss_s2'}),
}


@pytest.fixture(scope='module')
def ablation_setup(model):
  batch = make_batch(33, seed=3)
  config = make_config(class_aware_high=0.3, class_aware_scale=0.9)
  schedule = make_schedule(config, warmup_steps=0)
  tx = optim.make_optimizer(schedule, config)
  state = ts.create_train_state(
    model, tx, jax.random.key(0), 33, variables=initial_variables(model)
  )

  def run(**loss):
    settings = config_lib.resolve(make_config(class_aware_high=0.3, class_aware_scale=0.9, **loss))
    total, aux = ts.objective(
      state.params,
      state,
      batch,
      jax.random.key(1),
      model=model,
      settings=settings,
      schedule=schedule,
    )
    return float(total), {k: np.asarray(v) for k, v in aux.metrics.items()}, aux

  base = run()
  assert 0.0 < float(base[1]['mask_ratio']) < 1.0
  return run, base


@pytest.mark.parametrize('flag', sorted(ABLATIONS))
def test_ablation_removes_exactly_its_term(ablation_setup, flag):
  run, (base_total, base, base_aux) = ablation_setup
  loss, removed = ABLATIONS[flag]
  total, got, aux = run(**loss)
  assert set(base) - set(got) == removed
  for key in got:
    np.testing.assert_array_equal(got[key], base[key], err_msg=key)  # to the last bit
  settings = config_lib.resolve(make_config(class_aware_high=0.3, class_aware_scale=0.9))
  weight = {
    'align_image': settings.method.align_image,
    'align_feature': settings.method.align_feature,
    'fp': settings.method.fp,
    'strong': settings.method.strong,
  }[flag]
  # Two programs (with and without the term) through the network.
  assert total == pytest.approx(
    base_total - weight * sum(float(base[k]) for k in removed), rel=numerics.NETWORK
  )
  assert_tree_equal(aux.batch_stats, base_aux.batch_stats)


def test_ablation_fixed_threshold_changes_only_pseudo_label_terms(ablation_setup):
  run, (_, base, base_aux) = ablation_setup
  _, got, aux = run(pseudo_label='fixed', threshold=0.0)
  assert set(got) == set(base)
  assert float(got['mask_ratio']) == 1.0  # threshold 0: every valid pixel
  for key in ('loss_x', 'loss_align_image', 'loss_align_feature'):
    np.testing.assert_array_equal(got[key], base[key], err_msg=key)
  for key in ('loss_s1', 'loss_s2', 'loss_fp1', 'loss_fp2'):
    assert float(got[key]) > float(base[key]), key
  # The same teacher forward in two programs: the interpolation matrices'
  # dot products may round a multiply-add differently in each (1 ulp).
  for got_stat, want in zip(
    jax.tree.leaves(to_host(aux.teacher_batch_stats)),
    jax.tree.leaves(to_host(base_aux.teacher_batch_stats)),
  ):
    numerics.assert_close(got_stat, want, numerics.LAYER)


_MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from dssn_jax.testing import train_steps as t
    from dssn_jax import config_lib, models, optim, parallel
    from dssn_jax import train_step as ts
    assert jax.device_count() == 8, jax.devices()
    # Cityscapes-like recipe: OHEM with an active min_kept, fixed threshold 0
    # (every pixel teaches, so every term carries gradient); past the warm-up.
    config = t.make_config(pseudo_label='fixed', threshold=0.0, sup_type='ohem',
                           ohem_min_kept=600)
    model = models.create_model('resnet_tiny', t.NUM_CLASSES)
    batch = t.make_batch(33, batch=8, seed=5)
    out = {}
    for n in (1, 8):
      mesh = parallel.make_mesh(jax.devices()[:n])
      run = t.run_steps(model, mesh, config, batch, 1, warmup_steps=0)
      out[n] = run
    m1, m8 = out[1]['metrics'][0], out[8]['metrics'][0]
    s1, s8 = out[1]['states'][1], out[8]['states'][1]
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b) / (1e-4 + 1e-4 * np.abs(b)))), s8, s1))
    print(json.dumps(dict(m1=m1, m8=m8, worst=max(diffs))))
''')


_GROUPS_SCRIPT = textwrap.dedent('''
    import json
    import jax
    from dssn_jax.testing import train_steps as t
    from dssn_jax import models, parallel
    assert jax.device_count() == 8, jax.devices()

    def first_step(model, config, batch, devices, grad_accum=1):
      config.train.grad_accum = grad_accum
      mesh = parallel.make_mesh(jax.devices()[:devices])
      m = t.run_steps(model, mesh, config, batch, 1, warmup_steps=0)['metrics'][0]
      return {k: m[k] for k in ('loss', 'grad_norm', 'loss_x', 'loss_s1', 'loss_s2')}

    out = {}
    # UniMatch V2 on a tiny DINOv2 as the authors' 4 GPUs: devices x micro-batches.
    config = t.make_config('unimatch_v2', threshold=0.0)  # every pixel teaches
    config.train.loss_groups = 4
    model = models.create_model('dinov2_tiny', t.NUM_CLASSES)
    batch = t.make_batch(28, batch=8, seed=5)
    for devices, accum in ((1, 1), (1, 2), (1, 4), (8, 1)):
      out[f'uv2 {devices} dev x {accum} micro'] = first_step(model, config, batch, devices, accum)
    # DSSN on a tiny ResNet (sync BN), OHEM per group of 2 (Cityscapes-like).
    config = t.make_config(pseudo_label='fixed', threshold=0.0, sup_type='ohem',
                           ohem_min_kept=1200)
    config.train.loss_groups = 4
    model = models.create_model('resnet_tiny', t.NUM_CLASSES)
    batch = t.make_batch(33, batch=8, seed=5)
    for devices in (1, 8):
      out[f'dssn {devices} dev'] = first_step(model, config, batch, devices)
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_loss_groups_give_one_update_on_any_layout():
  """`loss_groups=4` (the authors' 4 GPUs): UniMatch V2 on `dinov2_tiny` on
  1 and 8 devices with 1, 2 and 4 micro-batches, DSSN with OHEM on
  `resnet_tiny` on 1 and 8 devices: the same first-step loss, terms and
  gradient norm (`numerics.NETWORK`: another summation order)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
    [sys.executable, '-c', _GROUPS_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for family, ref in (('uv2', 'uv2 1 dev x 1 micro'), ('dssn', 'dssn 1 dev')):
    want = out[ref]
    assert want['loss_s1'] > 0 and want['loss_x'] > 0
    for name, got in out.items():
      if name.startswith(family):
        for key in want:
          numerics.assert_close(got[key], want[key], numerics.NETWORK, err_msg=f'{name} {key}')


@pytest.mark.slow
def test_one_vs_eight_devices():
  """Same step on 1 and 8 CPU devices: every metric within 1e-4 of its
  value (`numerics.NETWORK`), every state leaf within 1e-4 (the stem-conv gradients sum ~10^5 products, and
  the order of that sum differs between one device and an all-reduce over
  eight: measured 4.5x over a 1e-5 bound on the momentum trace of
  `stem_conv1` with jax 0.10.2 on this CPU)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  script = _MULTI_DEVICE_SCRIPT
  proc = subprocess.run(
    [sys.executable, '-c', script],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  m1, m8 = result['m1'], result['m8']
  assert set(m1) == DSSN_TERMS
  for key in m1:  # two programs (one device, eight) through the network
    numerics.assert_close(m8[key], m1[key], numerics.NETWORK, err_msg=key)
  assert m1['loss_s1'] > 0 and m1['mask_ratio'] == 1.0
  # |a - b| <= 1e-4 + 1e-4 |b| on every params, BN-statistics, teacher and
  # optimizer leaf. Absolute, not relative to a leaf's scale: a gradient that
  # cancels to a small value keeps the rounding of its ~10^5 terms' scale.
  assert result['worst'] <= 1.0, result['worst']


def test_later_phases_compile_in_the_background_from_the_start():
  """`train.step_precompile`: the full step after a supervised warm-up and
  the running-BN teacher after the first epoch (`teacher_bn='reference'`)
  start compiling when the run starts; a resumed run past a boundary skips it."""
  schedule = types.SimpleNamespace(steps_per_epoch=100, total_steps=1000)
  assert train.later_phases(0, 0, schedule) == [100]  # reference teacher BN
  assert train.later_phases(0, 20, schedule) == [20, 100]  # + supervised warm-up
  assert train.later_phases(0, 300, schedule) == [300]  # epoch 1 ends inside the warm-up
  assert train.later_phases(150, 20, schedule) == []  # resumed after both
  assert (
    train.later_phases(0, 0, types.SimpleNamespace(steps_per_epoch=1000, total_steps=1000)) == []
  )


def test_uint8_labels_are_widened_at_the_step_s_entry():
  """The pipeline sends label maps as uint8; the step widens them to int32
  before any method reads them (traced only: the jaxpr's first ops), so it
  computes what the int32 batch computes."""
  config = make_config()
  config.method = 'supervised'
  settings = config_lib.resolve(config)
  schedule = make_schedule(config, warmup_steps=0)
  model = models.create_model('resnet_tiny', NUM_CLASSES)
  tx = optax.sgd(0.1)
  state = jax.eval_shape(lambda: ts.create_train_state(model, tx, jax.random.key(0), 17))
  batch = make_batch(17, batch=2, supervised=True)
  small = {**batch, 'y': np.asarray(batch['y'], np.uint8)}
  step = lambda st, b: ts.train_step(
    st, b, jax.random.key(1), model=model, tx=tx, settings=settings, schedule=schedule
  )
  jaxpr = jax.make_jaxpr(step)(state, small)
  y = jaxpr.jaxpr.invars[-1]  # the batch's last leaf: 'y' (sorted keys x, y)
  assert y.aval.dtype == jnp.uint8
  (first,) = [e for e in jaxpr.jaxpr.eqns if y in e.invars][:1]
  assert first.primitive.name == 'convert_element_type' and first.outvars[0].aval.dtype == jnp.int32
  assert jax.eval_shape(step, state, small) == jax.eval_shape(step, state, batch)


def test_input_workers_follow_the_measured_step_time():
  """`data.workers=-1`: the first log window of the last phase that compiled
  nothing sizes the input workers for its measured step time, once."""

  class Data:
    def __init__(self, auto=True):
      self.labeled_only_steps, self.workers, self.resized, self.auto = 10, 1, [], auto

    def workers_for_step(self, step_s):
      if not self.auto:  # `data.workers=N` in the config
        return None
      return 4 if step_s < 0.05 else 1

    def resize_workers(self, n):
      self.resized.append(n)
      self.workers = n

  data = Data()
  sizer = train._WorkerSizer(data)
  sizer.observe(5, 10.0, compiled=True)  # warm-up, compiling
  sizer.observe(10, 10.5, compiled=False)  # still the warm-up: a mark
  sizer.observe(20, 20.0, compiled=True)  # the full step compiled: a new mark
  assert data.resized == []
  sizer.observe(30, 20.3, compiled=False)  # 0.03 s a step: 4 workers
  assert data.resized == [4] and data.workers == 4
  sizer.observe(40, 30.0, compiled=False)  # once only
  assert data.resized == [4]
  fixed = Data(auto=False)
  sizer = train._WorkerSizer(fixed)
  for step in (20, 30, 40):
    sizer.observe(step, 0.1 * step, compiled=False)
  assert fixed.resized == []
