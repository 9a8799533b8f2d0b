"""Multi-host behaviour, rehearsed on one machine, and the lr/batch rule.

The rehearsal (slow) trains the digits config with a tiny model three ways:

  A. 1 process x 4 CPU devices, 4 steps (checkpoints at steps 2 and 4);
  B. 2 processes x 2 CPU devices (`launch/local_multihost.sh`), the same;
  C. 1 process x 4 devices in a copy of B's workdir without its step-4
     checkpoint: it resumes B's step-2 checkpoint (train state, rng and data
     iterator written by two processes) and runs steps 3 and 4.

B's losses must equal A's, and C's steps 3-4 must equal A's: the global
batches (records, augmentations, order), the sync-BN statistics, the
gradients and the resumed state do not depend on how the devices are spread
over processes. All pseudo-label masks are on (`threshold=0`) so every loss
term sees the unlabeled views. Both DSSN and UniMatch V2 (on `dinov2_tiny`,
2 micro-batches) run it with `loss_groups=4`: the authors' per-GPU update
must not depend on how devices are spread over processes. The persistent
compilation cache lets C reuse A's compiled programs.

On this project's 2-core machine, shared with other jobs (load 7), the
rehearsal took 3 min; most of it is compiling the train step.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dssn_jax import config_lib, train
from dssn_jax.testing.configs import load_config, train_data

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Tiny and short: small crops and sets, no eval before the last step, every
# pixel pseudo-labeled, lr scaled (global batch 8 / reference 4 = 2x).
ARGS = [
  '--config',
  'configs/digits.py',
  '--config.train.steps=4',
  '--config.train.log_every=1',
  '--config.train.checkpoint_every=2',
  '--config.train.eval_every=1000',
  '--config.train.optimizer=sgd',  # Adam's first steps ~ sign(g): ill-conditioned to compare
  '--config.train.warmup_steps=1',  # step 2 is a full DSSN step
  '--config.model.width_multiplier=1',  # near-ties flip less in the narrow net
  '--config.train.scale_lr_with_batch=True',
  '--config.train.reference_batch_size=4',
  '--config.data.crop_size=32',
  '--config.data.digits.image_size=48',
  '--config.data.digits.num_unlabeled=64',
  '--config.data.digits.num_val=4',
  '--config.loss.pseudo_label=fixed',
  '--config.loss.threshold=0.0',
  '--config.train.loss_groups=4',  # the authors' per-GPU update, 2 samples per group
]
# The same rehearsal for UniMatch V2 on a tiny DINOv2 (no BatchNorm), whose
# per-group pairing, undropped pairs and means must not depend on the layout
# either, with 2 micro-batches per update.
UNIMATCH_V2 = [
  '--config.method=unimatch_v2',
  '--config.data.mix_partner=reversed',
  '--config.model.backbone=dinov2_tiny',
  '--config.data.crop_size=28',
  '--config.data.eval_resize_multiple=14',
  '--config.train.grad_accum=2',
]
TOLERANCE = 5e-4
IGNORED = train.WALL_CLOCK_METRICS  # the machine, not the result


def _env(tmp_path, devices=None, cache=True):
  """CPU, quick XLA compiles (the same flags for every run) and, for the
  1-process runs, a persistent compilation cache they share. The 2-process
  run compiles afresh in both processes: a cache hit in one and a miss in
  the other would leave one waiting for the other past gloo's 30 s timeout."""
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHON=sys.executable,
    XLA_FLAGS='--xla_backend_optimization_level=0',
  )
  for var in (
    'JAX_COMPILATION_CACHE_DIR',
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES',
  ):
    env.pop(var, None)
  if cache:
    env.update(
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    )
  if devices:
    env['XLA_FLAGS'] += f' --xla_force_host_platform_device_count={devices}'
  return env


def _check(result, what):
  assert result.returncode == 0, (
    f'{what} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}'
  )


def _single_process(workdir, tmp_path, args=ARGS):
  result = subprocess.run(
    [sys.executable, str(ROOT / 'main.py'), *args, '--workdir', str(workdir)],
    cwd=ROOT,
    env=_env(tmp_path, devices=4),
    capture_output=True,
    text=True,
    timeout=900,
  )
  _check(result, f'1-process run in {workdir}')
  return result


def _train_lines(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r['step']: r for r in records if r['split'] == 'train'}


def _assert_same_losses(got, want, steps, what, tolerance=TOLERANCE, other_rel=1e-2):
  """Every loss term to `tolerance` (absolute); the other numbers (grad norm,
  mask ratio, lr) to `other_rel` relative."""
  for step in steps:
    keys = sorted(k for k in want[step] if k not in IGNORED and k not in ('step', 'split'))
    assert sorted(k for k in got[step] if k not in IGNORED and k not in ('step', 'split')) == keys
    assert 'loss' in keys and 'loss_x' in keys
    # Loss terms first: they are the requirement; then the rest.
    for key in sorted(keys, key=lambda k: not k.startswith('loss')):
      tol = dict(abs=tolerance) if key.startswith('loss') else dict(rel=other_rel)
      assert got[step][key] == pytest.approx(want[step][key], **tol), (
        f'{what}: step {step} {key}: {got[step][key]} vs {want[step][key]}'
      )


# Two programs (one process vs two over gloo: a different all-reduce order).
# Steps 1-2 (the warm-up step and the first full DSSN step) agree to 5e-4
# (measured on the current DigitScenes: 1.4e-4 on loss_s1 at step 2, from
# the near-tie flips described below).
# After that the runs are equal only up to chaos: the two layouts reduce in
# a different order (in-process vs gloo all-reduce; ~1e-7 after step 1), and
# the argmax pseudo labels of a barely trained network flip at near-ties on
# such noise, which moves later losses by up to ~1% (measured: step 4
# loss_align_feature 0.7387 vs 0.7323). Later steps are checked to 5e-2.
# The gradient norm reacts more to those flips than the losses do (a flipped
# pixel changes its gradient's direction): on one CPU model the step-3 norm
# read 4.43 vs 4.03 while every loss agreed to 5e-2; later steps allow 15%
# on the non-loss numbers.
LATER_TOLERANCE = 5e-2
LATER_OTHER_REL = 0.15


@pytest.mark.slow
@pytest.mark.parametrize('method', ['dssn', 'unimatch_v2'])
def test_two_hosts_match_one_host_and_resume_on_one(tmp_path, method):
  a, b, c = tmp_path / 'a_1x4', tmp_path / 'b_2x2', tmp_path / 'c_resume_1x4'
  args = ARGS + (UNIMATCH_V2 if method == 'unimatch_v2' else [])

  result = _single_process(a, tmp_path, args)
  assert 'loss groups 4 x 2 (per-GPU means)' in result.stdout
  want = _train_lines(a)
  assert sorted(want) == [1, 2, 3, 4]
  assert want[1]['lr'] == pytest.approx(0.006)  # digits lr 0.003 x 8 / 4
  if method == 'dssn':
    assert 'loss_s1' not in want[1]  # the supervised warm-up step (train.warmup_terms)
    assert all(want[s]['loss_s1'] > 0 and want[s]['loss_fp1'] > 0 for s in (2, 3, 4))
  else:
    assert all(want[s]['loss_s1'] > 0 and want[s]['loss_s2'] > 0 for s in (1, 2, 3, 4))

  result = subprocess.run(
    [
      'bash',
      str(ROOT / 'launch' / 'local_multihost.sh'),
      '2',
      '2',
      '--',
      *args,
      '--workdir',
      str(b),
    ],
    cwd=ROOT,
    env=_env(tmp_path, cache=False),
    capture_output=True,
    text=True,
    timeout=900,
  )
  _check(result, '2-process run')
  out = result.stdout.splitlines()
  assert any(line.startswith('[0] ') and '4 devices, 2 processes' in line for line in out)
  # Only process 0 prints the log.
  assert not any(
    line.startswith('[1] ') and 'devices' in line and 'processes' in line for line in out
  )
  _assert_same_losses(_train_lines(b), want, [1, 2], '2x2 vs 1x4')
  _assert_same_losses(_train_lines(b), want, [3, 4], '2x2 vs 1x4', LATER_TOLERANCE, LATER_OTHER_REL)
  # Both processes wrote their part of each checkpoint (one iterator file each).
  data_files = sorted(p.name for p in (b / 'checkpoints' / '2').glob('data_*/*.json'))
  assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']

  shutil.copytree(b, c, ignore=shutil.ignore_patterns('events.*'))
  shutil.rmtree(c / 'checkpoints' / '4')
  result = _single_process(c, tmp_path, args)
  assert 'resumed from' in result.stdout and 'at step 2' in result.stdout
  got = _train_lines(c)
  assert sorted(got) == [1, 2, 3, 4]  # steps 1-2 from B, 3-4 written by C
  _assert_same_losses(
    got, want, [3, 4], 'resumed 1x4 from 2x2 vs 1x4', LATER_TOLERANCE, LATER_OTHER_REL
  )


# Host sharding of the training stream, without a distributed runtime.


def _digits_config():
  c = load_config('digits')
  c.data.crop_size, c.data.digits.image_size = 32, 48
  c.data.digits.num_unlabeled, c.data.digits.num_val = 64, 4
  return c


def test_hosts_read_their_slice_of_the_one_host_batches():
  """Host p's batch is rows [p*B/n, (p+1)*B/n) of the 1-host global batch:
  same records, same augmentations, same order, for 1, 2 and 4 hosts; and an
  iterator position saved by one host count resumes another."""
  c = _digits_config()
  one = train_data(c, seed=0, process_index=0, process_count=1)
  want = [one.local_batch() for _ in range(3)]
  for n in (2, 4):
    hosts = [train_data(c, seed=0, process_index=p, process_count=n) for p in range(n)]
    for step in range(2):
      got = [h.local_batch() for h in hosts]
      for key in want[step]:
        np.testing.assert_array_equal(
          np.concatenate([g[key] for g in got]),
          want[step][key],
          err_msg=f'{n} hosts, step {step}, {key}',
        )
    states = [h.get_state() for h in hosts]
    assert all(state == states[0] for state in states)
    resumed = train_data(c, seed=0, process_index=0, process_count=1)
    resumed.set_state(states[0])
    batch = resumed.local_batch()
    for key in want[2]:
      np.testing.assert_array_equal(batch[key], want[2][key], err_msg=f'resumed, {key}')


# The lr/batch rule (config.train.scale_lr_with_batch), as launch/README.md
# documents it: the global batch sets the rate, not the device count.


def _schedule(batch, scale, epochs=None, steps=None):
  c = config_lib.base_config()
  c.data.batch_size = batch
  c.train.scale_lr_with_batch = scale
  c.train.epochs, c.train.steps = epochs, steps
  return config_lib.resolve(c).schedule(num_unlabeled=10_582)


# The schedule tests below: float64 arithmetic on the config's numbers.


def test_reference_batch_keeps_the_reference_lr():
  for scale in (False, True):
    s = _schedule(8, scale, steps=100)
    assert (s.lr, s.head_lr) == pytest.approx((0.002, 0.02))


@pytest.mark.parametrize('batch', [4, 16, 64])
def test_lr_scales_linearly_with_the_global_batch(batch):
  s = _schedule(batch, True, steps=100)
  assert s.lr == pytest.approx(0.002 * batch / 8)
  assert s.head_lr == pytest.approx(0.02 * batch / 8)
  assert _schedule(batch, False, steps=100).lr == pytest.approx(0.002)


def test_epochs_keep_the_images_seen_when_the_batch_grows():
  small, large = _schedule(8, True, epochs=10), _schedule(32, True, epochs=10)
  assert small.total_steps * 8 == pytest.approx(large.total_steps * 32, rel=1e-2)
  # The summed step sizes over the run (lr x steps) stay the same too.
  assert large.lr * large.total_steps == pytest.approx(small.lr * small.total_steps, rel=1e-2)


def test_reference_batch_size_is_the_denominator():
  c = config_lib.base_config()
  c.train.steps, c.data.batch_size = 10, 16
  c.train.scale_lr_with_batch, c.train.reference_batch_size = True, 16
  assert config_lib.resolve(c).schedule(100).lr == pytest.approx(0.002)
