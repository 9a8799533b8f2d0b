"""End to end: every config trains, stop-and-resume is exact, the CLI checks input."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from dssn_jax import config_lib, train, visualize
from dssn_jax.testing import fake_datasets
from dssn_jax.testing.configs import REPO, load_config, read_metrics, tiny

CONFIGS = sorted(
  f[:-3]
  for f in os.listdir(os.path.join(REPO, 'configs'))
  if f.endswith('.py') and not f.startswith('_')
)


def test_configs_are_listed():
  assert {'digits', 'pascal', 'cityscapes', 'coco'} <= set(CONFIGS)


# Each ViT step compiles for most of a minute on a 2-core CPU: ade20k's own
# config (unimatch_v2 on DINOv2, whole-image evaluation) runs above, and one
# variant here, DSSN on DINOv3 (sliding-window evaluation, patch 16); DSSN
# on DINOv2 runs the same DPT code with the other encoder. The others are slow.
_DEFAULT_VITS = {('cityscapes', 'dinov3_small', 'dssn')}
VIT_ARGS = [
  (name, f'backbone={backbone},method={method}')
  for backbone in ('dinov2_small', 'dinov3_small')
  for name in ('pascal', 'cityscapes', 'ade20k', 'coco')
  for method in ('unimatch_v2', 'dssn')
]
VIT_VARIANTS = [
  pytest.param(
    name,
    arg,
    marks=()
    if (name, arg.split(',')[0].split('=')[1], arg.split('method=')[1]) in _DEFAULT_VITS
    else pytest.mark.slow,
  )
  for name, arg in VIT_ARGS
] + [  # ADE20K's ResNet recipe (UniMatch V1's); its data path runs above
  pytest.param('ade20k', 'backbone=resnet101,method=dssn', marks=pytest.mark.slow)
]


@pytest.mark.parametrize('name,arg', [(n, None) for n in CONFIGS] + VIT_ARGS, ids=lambda v: str(v))
def test_every_config_passes_validation_as_shipped(name, arg):
  """What `main.py` checks before compiling accepts every config as written
  (auto worker count, method-default mix partner, DINOv2 and DINOv3 backbones and crops)."""
  config_lib.validate(load_config(name, arg))


@pytest.mark.parametrize(
  'name,arg', [(n, None) for n in CONFIGS] + VIT_VARIANTS, ids=lambda v: str(v)
)
def test_every_config_trains_two_steps(name, arg, tmp_path, capsys):
  """Two steps, an evaluation, the prediction grid and the final report of
  every config (tiny override)."""
  config = tiny(load_config(name, arg))
  warm = config.train.warmup_terms == 'supervised'
  if warm:  # one warm-up step, then the full step (compiled in the background meanwhile)
    config.train.warmup_steps = 1
  makers = {
    'pascal': fake_datasets.make_pascal,
    'cityscapes': fake_datasets.make_cityscapes,
    'coco': fake_datasets.make_coco,
    'ade20k': fake_datasets.make_ade20k,
  }
  if name in makers:
    # One validation image: one evaluation program to compile.
    root, splits = makers[name](str(tmp_path / 'data'), split=config.data.split, n_val=1)
    config.data.root, config.data.splits_dir = root, splits
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['step'] == 2 and summary['miou_teacher'] is not None
  lines = read_metrics(workdir)
  train_lines = [r for r in lines if r['split'] == 'train']
  assert [r['step'] for r in train_lines] == [1, 2]
  if warm:
    assert 'loss_s1' not in train_lines[0] and 'loss_s1' in train_lines[1]
  for key in ('loss', 'loss_x', 'lr', 'images_per_sec', 'input_wait_s', 'input_wait_frac'):
    assert all(key in r for r in train_lines), key
  evals = [r for r in lines if r['split'] == 'eval']
  assert evals[-1]['step'] == 2 and len(evals[-1]['iou_per_class']) == config.data.num_classes
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert any(f.startswith('events.') for f in os.listdir(workdir))
  with open(os.path.join(workdir, 'timing.json')) as f:
    timing = json.load(f)
  phases = [f'{k}_s' for k in train.RunClock.PHASES]
  assert timing['steps'] == 2 and all(timing[k] >= 0 for k in phases)
  assert sum(timing[k] for k in phases) == pytest.approx(timing['total_s'], rel=0.05)
  assert summary['time'] == timing
  check_predictions_and_report(config, workdir, capsys.readouterr().out.splitlines())
  if config.train.supervised_branch:
    check_supervised_branch(workdir, train_lines, branch_from=1)
    assert summary['supervised'] is not None


def check_supervised_branch(workdir, run_train, branch_from):
  """DIR/supervised: labeled-only steps after `branch_from` whose first
  one starts from the run's state on the run's labeled batch (the same
  `loss_x` as the run's step), and the run's evaluations up to the branch
  point, then its own."""
  branch = read_metrics(os.path.join(workdir, train.BRANCH_DIR))
  steps = [r['step'] for r in run_train]
  b_train = [r for r in branch if r['split'] == 'train']
  assert [r['step'] for r in b_train] == [s for s in steps if s > branch_from]
  assert not any('loss_s1' in r for r in b_train)
  first = next(r for r in run_train if r['step'] == branch_from + 1)
  assert b_train[0]['loss_x'] == pytest.approx(first['loss_x'], rel=1e-6)
  run_evals = [r for r in read_metrics(workdir) if r['split'] == 'eval']
  b_evals = [r for r in branch if r['split'] == 'eval']
  shared = [r for r in run_evals if r['step'] <= branch_from]
  assert b_evals[: len(shared)] == shared
  assert b_evals[-1]['step'] == steps[-1]


def check_predictions_and_report(config, workdir, lines):
  """DIR/predictions.png (image | ground truth | [supervised |] teacher |
  student, one row per validation scene), the same class maps in
  DIR/predictions.npz, and the per-class IoU lines after `final:`; with a
  supervised branch (digits) its column, its per-class line and the live
  `compare:` line before the stored baseline's."""
  rows = min(config.train.prediction_grid, 4 if config.data.name == 'digits' else 1)
  branch = bool(config.train.supervised_branch)
  with Image.open(os.path.join(workdir, 'predictions.png')) as im:
    width, height = im.size
    assert im.mode == 'RGB'
  cell, pad = 96, visualize._PAD
  assert width == pad + (5 if branch else 4) * (cell + pad)
  assert rows * (cell + pad) < height < rows * (cell + pad) + 300  # titles, legend lines
  with np.load(os.path.join(workdir, 'predictions.npz')) as arrays:
    assert arrays['images'].dtype == np.uint8 and len(arrays['images']) == rows
    assert arrays['teacher'].shape == arrays['student'].shape == arrays['labels'].shape
    assert ('supervised' in arrays) == branch
  final = next(i for i, line in enumerate(lines) if line.startswith('final: '))
  # (Over 20 classes the header names the lowest and highest few.)
  assert lines[final + 1].startswith('iou teacher (step 2, best teacher')
  assert lines[final + 2].startswith('iou student (step 2, best teacher')
  if config.data.name == 'digits':
    assert 'background=' in lines[final + 1] and 'digit_9=' in lines[final + 1]
    # The branch's per-class line, the stored baseline's (configs/digits.py),
    # then `compare:` with each.
    assert lines[final + 3].startswith('iou supervised (step ')
    assert lines[final + 4].startswith('iou supervised (baseline, mean of ')
    assert lines[final + 5].startswith('compare: ') and '(live: ' in lines[final + 5]
    assert lines[final + 6].startswith('compare: ') and 'mean of 6 seeds' in lines[final + 6]
    assert os.path.exists(os.path.join(workdir, 'supervised', 'metrics.jsonl'))


def _sigterm_when(workdir, step):
  """Sends SIGTERM to this process once metrics.jsonl reaches `step`."""

  def watch():
    path = os.path.join(workdir, 'metrics.jsonl')
    while True:
      if os.path.exists(path):
        with open(path) as f:
          if any(json.loads(line)['step'] >= step for line in f if line.strip()):
            os.kill(os.getpid(), signal.SIGTERM)
            return
      time.sleep(0.01)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


@pytest.mark.slow
def test_stop_and_resume_matches_uninterrupted_run(tmp_path):
  steps = 6
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(tiny(load_config('digits'), steps), straight)

  resumed = str(tmp_path / 'resumed')
  _sigterm_when(resumed, 2)
  first = train.train_and_evaluate(tiny(load_config('digits'), steps), resumed)
  assert first['preempted'] and 2 <= first['step'] < steps
  second = train.train_and_evaluate(tiny(load_config('digits'), steps), resumed)
  assert not second['preempted'] and second['step'] == steps

  a = [r for r in read_metrics(straight) if r['split'] == 'train']
  b = [r for r in read_metrics(resumed) if r['split'] == 'train']
  assert [r['step'] for r in b] == list(range(1, steps + 1))
  # The same compiled step on bitwise-restored state: equal; the tolerance is
  # a few float32 eps, and the final mIoU comes from the same integer counts.
  for ra, rb in zip(a, b):
    for key in ra:
      if key not in (*train.WALL_CLOCK_METRICS, 'split'):
        assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra['step'], key)
  ea = [r for r in read_metrics(straight) if r['split'] == 'eval']
  eb = [r for r in read_metrics(resumed) if r['split'] == 'eval']
  assert ea[-1]['miou_teacher'] == pytest.approx(eb[-1]['miou_teacher'], abs=1e-6)


@pytest.mark.slow
def test_stop_in_the_supervised_branch_and_resume(tmp_path):
  """SIGTERM while the supervised branch trains: the rerun finds the run's
  steps done and finishes the branch from its checkpoint, as if unbroken."""
  steps, branch_from = 8, 2

  def config():
    c = tiny(load_config('digits'), steps)
    c.train.warmup_steps = branch_from
    return c

  straight = str(tmp_path / 'straight')
  a = train.train_and_evaluate(config(), straight)
  resumed = str(tmp_path / 'resumed')
  _sigterm_when(os.path.join(resumed, train.BRANCH_DIR), branch_from + 1)
  first = train.train_and_evaluate(config(), resumed)
  assert first['preempted'] and first['step'] == steps
  second = train.train_and_evaluate(config(), resumed)
  assert not second['preempted'] and second['supervised'] == pytest.approx(a['supervised'])

  run_train = [r for r in read_metrics(resumed) if r['split'] == 'train']
  assert [r['step'] for r in run_train] == list(range(1, steps + 1))
  check_supervised_branch(resumed, run_train, branch_from)
  ra = read_metrics(os.path.join(straight, train.BRANCH_DIR))
  rb = read_metrics(os.path.join(resumed, train.BRANCH_DIR))
  assert [r['step'] for r in ra] == [r['step'] for r in rb]
  for x, y in zip(ra, rb):
    for key in ('loss', 'loss_x', 'miou_teacher'):
      if key in x:
        assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x['step'], key)


@pytest.mark.parametrize(
  'override,message',
  [
    ('--config.train.stepz=3', 'stepz'),
    ('--config.train.lr=fast', 'lr'),
  ],
)
def test_bad_override_is_rejected_with_the_config_message(override, message, tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, 'main.py'),
      '--config',
      os.path.join(REPO, 'configs', 'digits.py'),
      '--workdir',
      str(tmp_path),
      override,
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode != 0
  assert message in proc.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_baseline_line_names_the_baseline_and_its_schedule():
  config = load_config('digits', None)
  config.baseline.miou, config.baseline.std, config.baseline.seeds = 20.0, 1.5, 3
  config.baseline.steps, config.baseline.what = int(config.train.steps), 'supervised'
  config.baseline.command = 'python benchmarks/semi_vs_supervised.py --seeds 0,1,2'
  line = train.baseline_line(config, {'best_teacher': 27.125})
  assert line.startswith(
    'compare: best_teacher=27.12 with supervised 20.00 +- 1.50: +7.12 points (mean of 3'
  )
  assert 'not this run' not in line and line.endswith('--seeds 0,1,2)')
  config.train.steps = 7
  assert "not this run's 7" in train.baseline_line(config, {'best_teacher': 27.0})
  assert train.baseline_line(config, {'best_teacher': None}) == ''
  config.baseline.miou = None
  assert train.baseline_line(config, {'best_teacher': 27.0}) == ''
