"""Smoke tests of `benchmarks/step_speed.py` at a tiny size (no timing asserted).

The jitted run uses the supervised step (one forward and backward of
`resnet_tiny`: the cheapest compile that still goes through the whole
benchmark); the DSSN iteration itself is covered by test_train_step.py, and
here by the PyTorch step, which needs no compile.
"""

import math
import re

import numpy as np
import pytest

from benchmarks import step_speed
from dssn_jax.testing import batches

LINE = re.compile(
  r'^step_speed: backbone=(\S+) crop=(\d+) batch=(\d+) dtype=(\S+) '
  r'median_s=([0-9.]+) images_per_s=([0-9.]+)( .*)?$'
)
TINY = ['--backbone', 'resnet_tiny', '--crop', '33', '--batch', '2', '--num-classes', '4']


def test_synthetic_batch_matches_design():
  batch = batches.synthetic_batch(3, 33, 4, supervised=False)
  images = ('x', 'u_w', 'u_s1', 'u_s2', 'm_w', 'm_s1', 'm_s2')
  assert set(batch) == set(images) | {'y', 'u_ignore', 'm_ignore', 'box1', 'box2'}
  for k in images:
    assert batch[k].dtype == np.uint8 and batch[k].shape == (3, 33, 33, 3), k
  for k in ('y', 'u_ignore', 'm_ignore'):
    assert batch[k].dtype == np.int32 and batch[k].shape == (3, 33, 33), k
  for k in ('box1', 'box2'):
    assert batch[k].dtype == bool and batch[k].shape == (3, 33, 33), k
    assert batch[k].any(axis=(1, 2)).all() and not batch[k].all(axis=(1, 2)).any()
  y = batch['y']
  assert set(np.unique(y)) <= {0, 1, 2, 3, 255} and (y == 255).any() and (y < 4).any()
  assert set(np.unique(batch['u_ignore'])) == {0, 255}
  supervised = batches.synthetic_batch(2, 17, 4, supervised=True)
  assert set(supervised) == {'x', 'y'}


@pytest.mark.slow
def test_jax_run_prints_table_and_machine_line(capsys):
  rows = step_speed.main(TINY + ['--method', 'supervised', '--steps', '2', '--warmup', '1'])
  out = capsys.readouterr().out.strip().splitlines()
  assert len(rows) == 1
  row = rows[0]
  match = LINE.match(out[-1])
  assert match, out[-1]
  backbone, crop, batch, dtype, median_s, images_per_s, rest = match.groups()
  assert (backbone, crop, batch, dtype) == ('resnet_tiny', '33', '2', 'float32')
  assert 'impl=jax' in rest and 'method=supervised' in rest and 'remat=0' in rest
  median_s, images_per_s = float(median_s), float(images_per_s)
  assert median_s > 0
  # Supervised: the labeled images of the global batch per step (the line
  # prints median_s rounded, hence 1e-2).
  assert images_per_s == pytest.approx(2 * row['devices'] / median_s, rel=1e-2)
  assert row['compile_s'] > 0 and math.isfinite(row['loss'])
  assert row['flops'] > 1e6  # XLA counted the convolutions
  assert row['xla_bytes'] > row['xla_temp_bytes'] > 0
  header = next(line for line in out if line.split()[:2] == ['impl', 'remat'])
  for column in ('compile_s', 'median_s', 'images/s', 'peak_mem', 'xla_mem', 'xla_temp', 'TFLOP/s'):
    assert column in header
  assert any(line.startswith('# load average') for line in out)


def test_torch_dssn_step_runs(capsys):
  pytest.importorskip('torch', reason='times the PyTorch rendering of the step')
  rows = step_speed.main(
    TINY + ['--torch-only', '--torch-threads', '1', '--steps', '1', '--warmup', '1']
  )
  out = capsys.readouterr().out.strip().splitlines()
  (row,) = rows
  assert row['impl'] == 'torch' and math.isfinite(row['loss']) and row['loss'] > 0
  match = LINE.match(out[-1])
  assert match and 'impl=torch' in out[-1] and 'method=dssn' in out[-1], out[-1]
  # DSSN: labeled + unlabeled images (float64 arithmetic on the same numbers).
  assert row['images_per_s'] == pytest.approx(4 / row['median_s'])


def test_torch_unimatch_v2_step_runs(capsys):
  pytest.importorskip('torch', reason='times the PyTorch rendering of the step')
  argv = ['--backbone', 'dinov2_tiny', '--crop', '28', '--batch', '2', '--num-classes', '4']
  argv += ['--method', 'unimatch_v2', '--torch-only', '--torch-threads', '1']
  rows = step_speed.main(argv + ['--steps', '2', '--warmup', '1'])
  out = capsys.readouterr().out.strip().splitlines()
  (row,) = rows
  assert row['impl'] == 'torch' and math.isfinite(row['loss']) and row['loss'] > 0
  assert 'impl=torch' in out[-1] and 'method=unimatch_v2' in out[-1], out[-1]
  assert row['images_per_s'] == pytest.approx(4 / row['median_s'])


def test_table_percent_of_peak_and_missing_values():
  row = dict(
    impl='jax',
    remat=True,
    dtype='bfloat16',
    batch=4,
    devices=2,
    compile_s=10.0,
    median_s=0.5,
    min_s=0.4,
    cpu_s=None,
    images_per_s=32.0,
    peak_bytes=None,
    xla_bytes=3 * 2**30,
    xla_temp_bytes=2**29,
    flops=5e11,
    flops_per_s=1e12,
  )
  table = step_speed.format_table([row], peak_tflops=4.0)
  cells = table.splitlines()[1].split()
  # impl, remat, frozen, dtype, attention, batch
  assert cells[:6] == ['jax', 'yes', 'no', 'bfloat16', 'xla', '4x2']
  assert cells[-1] == '25.0'  # 1 TFLOP/s of a 4 TFLOP/s peak
  assert 'n/a' in cells  # no device memory statistics
  assert '3.00' in cells and '0.50' in cells and '500.0' in cells  # GiB, GiB, GFLOP
  no_peak = step_speed.format_table([row], peak_tflops=None).splitlines()[1].split()
  assert no_peak[-1] == 'n/a'


@pytest.mark.parametrize(
  'argv',
  [
    ['--compare-remat', '--remat'],
    ['--batch', '0'],
    ['--torch', '--method', 'unimatch'],
    ['--torch', '--method', 'unimatch_v2'],  # on a ResNet
    ['--torch', '--backbone', 'dinov2_tiny', '--method', 'unimatch_v2', '--grad-accum', '2'],
    ['--backbone', 'resnet18'],
  ],
)
def test_bad_flags_are_rejected(argv, capsys):
  with pytest.raises(SystemExit):
    step_speed.parse_args(argv)
  assert 'error' in capsys.readouterr().err


def test_backbones_come_from_the_registry():
  from dssn_jax.models import registry

  for name in registry.backbone_names():
    assert step_speed.parse_args(['--backbone', name]).backbone == name
  with pytest.raises(SystemExit):
    step_speed.parse_args(['--backbone', 'dinov2_small', '--torch'])


def test_compile_only_reports_memory(capsys):
  """`--compile-only`: one compiled program, not run (the program of the run
  above, which the suite's compilation cache usually holds already)."""
  rows = step_speed.main(TINY + ['--method', 'supervised', '--compile-only'])
  out = capsys.readouterr().out
  (row,) = rows
  assert (row['dtype'], row['remat'], row['frozen']) == ('float32', False, False)
  assert row['xla_bytes'] > row['xla_temp_bytes'] > 0 and row['median_s'] is None
  assert out.count('step_speed_mem: backbone=resnet_tiny') == 1


def test_levers_build_each_setting(monkeypatch, capsys):
  """`--levers`: one program per lever, each with that lever's settings (the
  compile itself is the test above; here a stand-in records the settings)."""
  built = []

  def fake_prepare(args, remat):
    built.append((args.dtype, remat, args.freeze_backbone, args.attention))
    info = step_speed._base_info(args, 'jax', remat, 1, 'cpu:fake')
    info.update(compile_s=1.0, xla_bytes=2**30 * (1 + len(built)), xla_temp_bytes=2**29)
    return step_speed.Step(None, info)

  monkeypatch.setattr(step_speed, 'prepare_jax', fake_prepare)
  rows = step_speed.main(['--backbone', 'dinov2_tiny', '--method', 'supervised', '--levers'])
  out = capsys.readouterr().out
  expected = [
    ('float32', False, False, 'xla'),
    ('bfloat16', False, False, 'xla'),
    ('float32', True, False, 'xla'),
    ('float32', False, True, 'xla'),
    ('bfloat16', False, False, 'chunked'),
  ]
  assert built == expected
  assert [(r['dtype'], r['remat'], r['frozen'], r['attention']) for r in rows] == expected
  assert all(r['median_s'] is None for r in rows)
  assert out.count('step_speed_mem: backbone=dinov2_tiny') == 5
  assert 'xla_mem_gib=2.000' in out and 'xla_mem_gib=5.000' in out


def test_against_alternates_the_two_checkouts(monkeypatch, capsys, tmp_path):
  """`--against`: one child process per checkout and round, this checkout
  first, each row named by its checkout (the children are stubbed here)."""
  other = tmp_path / 'old'
  (other / 'benchmarks').mkdir(parents=True)
  (other / 'benchmarks' / 'step_speed.py').write_text('')
  calls = []

  def fake_child(args, remat, checkout=None):
    calls.append(checkout)
    info = step_speed._base_info(args, 'jax', remat, 1, 'cpu:fake')
    info.update(compile_s=1.0, median_s=0.5, min_s=0.4, cpu_s=0.5, images_per_s=8.0)
    return dict(info, flops_per_s=None, loss=1.0)

  monkeypatch.setattr(step_speed, '_child', fake_child)
  rows = step_speed.main(TINY + ['--against', str(other), '--rounds', '2'])
  assert calls == [None, str(other), None, str(other)]
  assert [r['impl'].split()[-1] for r in rows] == ['#1', '#1', '#2', '#2']
  assert rows[1]['impl'].startswith('jax old ')
  with pytest.raises(SystemExit):
    step_speed.main(TINY + ['--against', str(tmp_path / 'nowhere')])
  capsys.readouterr()
