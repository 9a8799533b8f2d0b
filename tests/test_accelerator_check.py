"""benchmarks/accelerator_check.py: the report's pieces, and a whole run at a tiny size."""

import json
import math
import os

import pytest

from benchmarks import accelerator_check as check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_table_and_override():
  assert check.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16', {}) == 989.4
  assert check.peak_tflops('NVIDIA H100 PCIe', 'float32', {}) == 378.0
  assert check.peak_tflops('TPU v5 lite', 'bfloat16', {}) == 197.0
  assert check.peak_tflops('cpu', 'bfloat16', {}) is None
  peaks = check.parse_peak('bfloat16=100,float32=50')
  assert check.peak_tflops('NVIDIA H100 80GB HBM3', 'float32', peaks) == 50.0
  assert check.parse_peak('7') == {'bfloat16': 7.0, 'float32': 7.0}
  with pytest.raises(ValueError, match='float16'):
    check.parse_peak('float16=3')


def test_budget_skips_what_does_not_fit():
  budget = check.Budget(10.0)
  assert budget.fits(5.0) and not budget.fits(60.0)
  assert budget.skip_reason(60.0).startswith('skipped: needs about 60 s')


def _synthetic_report(train_status='ok'):
  row = dict(
    backbone='resnet101',
    crop=513,
    dtype='bfloat16',
    batch=2,
    status='ok',
    compile_s=50.0,
    median_s=0.2,
    images_per_s=20.0,
    images_per_s_per_device=20.0,
    tflops_per_s=300.0,
    mfu=0.3,
    xla_gib=20.0,
    process_peak_gib=None,
  )
  skipped = dict(row, batch=4, status='skipped: needs about 90 s, 10 s of the budget left')
  return dict(
    args=dict(batches=[2, 4], steps=10, warmup=2),
    budget_s=480.0,
    elapsed_s=470.0,
    environment=dict(
      date='2026-12-01 15:00 UTC',
      devices=1,
      device_kind='NVIDIA H100 80GB HBM3',
      platform='gpu',
      processes=1,
      host_cores=26,
      versions={'jax': '0.10.2'},
      xla_flags='',
    ),
    train_step=[row, skipped],
    dinov2=dict(status='skipped: no dinov2 backbone'),
    evaluation=dict(status='skipped: needs about 60 s, 10 s of the budget left'),
    input=dict(status='skipped: No module named grain'),
    training=dict(status=train_status),
  )


def test_markdown_names_every_skip():
  text = check.markdown(_synthetic_report(train_status='skipped: --train-steps 0'))
  assert '| resnet101 | 513 | bfloat16 | 2 | 50.0 | 0.200 | 20.0 | 20.0 | 300.0 | 30.0% |' in text
  assert 'skipped: needs about 90 s, 10 s of the budget left' in text
  for line in ('skipped: no dinov2 backbone', 'No module named grain', '--train-steps 0'):
    assert line in text


def test_dinov2_backbones_come_from_the_model_registry():
  assert check.dinov2_backbones() == ['dinov2_small', 'dinov2_base', 'dinov2_large', 'dinov2_giant']
  assert check.parse_args(['--out', 'x']).dinov2_backbones == check.dinov2_backbones()
  assert check.parse_args(['--out', 'x', '--dinov2-backbones', 'none']).dinov2_backbones == []
  tiny = check.parse_args(['--out', 'x', '--dinov2-backbones', 'dinov2_tiny'])
  assert tiny.dinov2_backbones == ['dinov2_tiny']
  v3 = check.parse_args(['--out', 'x', '--dinov2-backbones', 'dinov3_small,dinov3_base'])
  assert v3.dinov2_backbones == ['dinov3_small', 'dinov3_base']  # DINOv3 by name
  assert v3.dinov2_crops == {'dinov3_small': 512, 'dinov3_base': 512}  # 518 to patch 16
  assert check.parse_args(['--out', 'x']).dinov2_crops['dinov2_base'] == 518
  for bad in ('resnet50', 'dinov2_huge'):
    with pytest.raises(SystemExit):
      check.parse_args(['--out', 'x', '--dinov2-backbones', bad])


def test_step_arguments_are_what_step_speed_builds():
  """The check times `step_speed`'s own program: every argument it reads is set."""
  step_speed = check._load_benchmark('step_speed')
  ns = check.step_arguments(step_speed, 'dinov2_tiny', 42, 2, 'bfloat16')
  want = step_speed.parse_args(
    '--backbone dinov2_tiny --crop 42 --batch 2 --dtype bfloat16 --method dssn'.split()
  )
  assert vars(ns) == vars(want)
  config = step_speed.make_config(ns, remat=False)
  assert (config.model.backbone, config.method, config.model.dtype) == (
    'dinov2_tiny',
    'dssn',
    'bfloat16',
  )


@pytest.mark.slow
def test_check_measures_a_tiny_step_evaluation_and_input(tmp_path):
  """The default suite's run of the check: one float32 DSSN step of
  `resnet_tiny`, an evaluation and the input section (no training run, no
  DINOv2: the slow test below has both)."""
  out = tmp_path / 'check'
  check.main(
    [
      '--out', str(out), '--backbone', 'resnet_tiny', '--crop', '33', '--batches', '2',
      '--dtypes', 'float32', '--steps', '1', '--warmup', '0', '--eval-sizes', '20x30',
      '--eval-images', '1', '--input-images', '2', '--input-seconds', '0.1',
      '--train-steps', '0', '--dinov2-backbones', 'none', '--budget-s', '900',
    ]
  )  # fmt: skip
  saved = json.loads((out / 'accelerator_check.json').read_text())
  (row,) = saved['train_step']
  assert (row['backbone'], row['dtype'], row['status']) == ('resnet_tiny', 'float32', 'ok'), row
  assert row['finite'] and row['median_s'] > 0 and row['gflop_per_device'] > 0
  assert saved['evaluation']['status'] == 'ok' and saved['evaluation']['compiles_during_eval'] == 0
  assert saved['input']['status'] == 'ok' and saved['input']['cores_needed'] > 0
  assert saved['training']['status'] == 'skipped: --train-steps 0'
  assert saved['dinov2']['status'] == 'skipped: --dinov2-backbones none'


@pytest.mark.slow
def test_whole_check_at_a_tiny_size(tmp_path):
  """Every section on this CPU: tiny model, one timed step, a 3-step main.py run."""
  out = tmp_path / 'check'
  report = check.main(
    [
      '--out', str(out), '--backbone', 'resnet_tiny', '--crop', '33', '--batches', '2',
      '--steps', '1', '--warmup', '0', '--eval-sizes', '20x30,30x20', '--eval-images', '2',
      '--input-images', '4', '--input-seconds', '0.3', '--train-steps', '3',
      '--train-backbone', 'resnet_tiny', '--train-val', '4', '--train-devices', '1',
      '--budget-s', '1500', '--dinov2-backbones', 'dinov2_tiny', '--dinov2-crop', '42',
      '--train-timeout-s', '900',
    ]
  )  # fmt: skip
  saved = json.loads((out / 'accelerator_check.json').read_text())
  assert saved['environment']['platform'] == 'cpu'
  rows = saved['train_step']
  assert [(r['dtype'], r['status']) for r in rows] == [('bfloat16', 'ok'), ('float32', 'ok')]
  assert all(r['finite'] and r['gflop_per_device'] > 0 for r in rows)
  assert saved['training']['status'] == 'ok', saved['training']
  assert saved['training']['steps'] == 3 and all(
    math.isfinite(x) for x in saved['training']['losses']
  )
  ev = saved['evaluation']
  assert ev['status'] == 'ok' and ev['programs'] >= 2 and ev['compiles_during_eval'] == 0
  assert saved['input']['status'] == 'ok' and saved['input']['cores_needed'] > 0
  (dino,) = saved['dinov2']
  assert (dino['backbone'], dino['crop'], dino['status']) == ('dinov2_tiny', 42, 'ok')
  assert dino['finite'] and dino['gflop_per_device'] > 0
  md = (out / 'accelerator_check.md').read_text()
  assert '## Train step' in md and '## Training run' in md and report['elapsed_s'] > 0
  assert os.path.exists(out / 'train_run' / 'metrics.jsonl')


def test_needs_no_tensorflow_datasets_or_torch():
  """The check (and the training/eval code it runs) imports neither TF, TFDS nor torch."""
  import subprocess
  import sys

  code = (
    'import sys; from benchmarks import accelerator_check, step_speed, data_throughput; '
    'import dssn_jax.train, dssn_jax.evaluate, dssn_jax.data.sources; '
    'print([m for m in ("tensorflow", "tensorflow_datasets", "torch") if m in sys.modules])'
  )
  out = subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT),
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == '[]'
