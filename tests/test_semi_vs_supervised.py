"""Tests of `benchmarks/semi_vs_supervised.py`'s reporting (training is stubbed).

The training itself is `train.train_and_evaluate` on `configs/digits.py`,
covered by test_main.py and test_digits.py; here `run` is replaced by a
stub that returns known evaluations (and, for DSSN, a supervised branch's
metrics), so what is asserted is the seed loop, the mean +- std
arithmetic, the per-seed and paired gains and the machine-readable line.
"""

import argparse
import json
import os
import re

import numpy as np
import pytest

from benchmarks import semi_vs_supervised as bench

LINE = re.compile(
  r'^semi_vs_supervised: labeled=(\d+) supervised=([0-9.]+) '
  r'dssn=([0-9.]+) gain=(-?[0-9.]+)(?: paired=([0-9.]+) paired_gain=(-?[0-9.]+))?$'
)

# (name, seed) -> best mIoU: supervised's student, DSSN's teacher.
BEST = {
  ('supervised', 0): 20.0,
  ('supervised', 1): 22.0,
  ('supervised', 2): 24.0,
  ('dssn', 0): 26.0,
  ('dssn', 1): 27.0,
  ('dssn', 2): 31.0,
}
# seed -> best mIoU of the DSSN run's supervised branch (DIR/supervised).
PAIRED_BEST = {0: 21.0, 1: 24.0, 2: 23.0}


def fake_predictions(workdir, seed, branch=False):
  """A `predictions.npz` as the training loop writes it: 2 scenes of 6x6
  (with the supervised branch's column if `branch`)."""
  rng = np.random.default_rng(seed)
  maps = lambda: rng.integers(0, 11, (2, 6, 6)).astype(np.int32)
  os.makedirs(workdir, exist_ok=True)
  images = rng.integers(0, 256, (2, 6, 6, 3)).astype(np.uint8)
  arrays = dict(images=images, labels=maps(), teacher=maps(), student=maps())
  if branch:
    arrays['supervised'] = maps()
  np.savez_compressed(os.path.join(workdir, 'predictions.npz'), **arrays)


def fake_branch(workdir, seed):
  """DIR/supervised/metrics.jsonl as the supervised branch writes it: its
  model under the teacher keys, no student."""
  os.makedirs(os.path.join(workdir, 'supervised'))
  best = PAIRED_BEST[seed]
  records = [
    dict(step=100, split='eval', miou_teacher=best - 3),
    dict(
      step=200,
      split='eval',
      miou_teacher=best,
      iou_per_class_teacher={'background': 89.0, 'digit_0': best},
    ),
  ]
  with open(os.path.join(workdir, 'supervised', 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)


def fake_run(name, method, overrides, seed, args):
  del overrides
  best = BEST[name, seed]
  workdir = os.path.join(getattr(args, 'out', ''), f'seed{seed}', name)
  if hasattr(args, 'out'):
    branch = name == 'dssn' and getattr(args, 'paired', False)
    fake_predictions(workdir, seed, branch=branch)
    if branch:
      fake_branch(workdir, seed)
  per_class = {'background': 90.0, 'digit_0': best}
  evals = [
    dict(step=100, miou=best - 5, miou_teacher=best - 4),
    dict(
      step=200,
      miou=best,
      miou_teacher=best,
      iou_per_class=per_class,
      iou_per_class_teacher=per_class,
    ),
  ]
  return dict(
    name=name,
    method=method,
    labeled=args.labeled,
    seed=seed,
    wall=1.0,
    evals=evals,
    workdir=workdir,
    best=best,
    miou=best,
    best_teacher=best,
    miou_teacher=best,
  )


# Means and stds below: float64 arithmetic on exact inputs (approx's default).


def test_mean_std():
  assert bench.mean_std([5.0]) == (5.0, 0.0)
  mean, std = bench.mean_std([20.0, 22.0, 24.0])
  assert mean == pytest.approx(22.0) and std == pytest.approx(2.0)


def test_aggregate_one_row_per_variant():
  args = type('A', (), {'labeled': 7})()
  rows = [fake_run(n, n, {}, s, args) for s in (0, 1, 2) for n in ('supervised', 'dssn')]
  agg = bench.aggregate(rows)
  assert [a['name'] for a in agg] == ['supervised', 'dssn']
  assert agg[1]['seeds'] == [0, 1, 2]
  assert agg[1]['best_teacher'] == pytest.approx(28.0)
  assert agg[1]['best_teacher_std'] == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)


@pytest.mark.parametrize('paired', [False, True], ids=['stored', 'paired'])
@pytest.mark.parametrize('seeds', ['0', '0,1,2'])
def test_main_reports_means_over_seeds(seeds, paired, tmp_path, monkeypatch, capsys):
  def run(name, method, overrides, seed, args):
    args.paired = paired
    return fake_run(name, method, overrides, seed, args)

  monkeypatch.setattr(bench, 'run', run)
  out = tmp_path / 'out'
  bench.main(['--labeled', '7', '--seeds', seeds, '--out', str(out)])
  lines = capsys.readouterr().out.strip().splitlines()
  labeled, sup, dssn, gain, paired_mean, paired_gain = LINE.match(lines[-1]).groups()
  ids = [int(s) for s in seeds.split(',')]
  want_sup = sum(BEST['supervised', s] for s in ids) / len(ids)
  want_dssn = sum(BEST['dssn', s] for s in ids) / len(ids)
  assert int(labeled) == 7
  assert float(sup) == pytest.approx(want_sup)
  assert float(dssn) == pytest.approx(want_dssn)
  assert float(gain) == pytest.approx(want_dssn - want_sup)
  assert (paired_mean is not None) == paired
  if paired:
    want_paired = sum(PAIRED_BEST[s] for s in ids) / len(ids)
    assert float(paired_mean) == pytest.approx(want_paired, abs=0.005)  # printed to 2 places
    assert float(paired_gain) == pytest.approx(want_dssn - want_paired, abs=0.005)
    # Its rows: one per seed, and with several seeds the mean +- std row.
    rows = [line for line in lines if line.split()[2:4] == ['supervised', '(paired)']]
    assert len(rows) == len(ids) + (len(ids) > 1)
  assert (out / 'miou.png').stat().st_size > 0
  # The first seed's scenes: image | ground truth | supervised | [paired |]
  # dssn (teacher).
  from PIL import Image

  grid = Image.open(out / 'predictions.png')
  columns = 5 if paired else 4
  assert grid.size[0] == 4 + columns * (96 + 4) and grid.size[1] > 2 * 96
  # Per-class IoU at each run's best evaluation, supervised beside DSSN.
  assert any(line.startswith('digit_0') and f'{want_sup:.1f}' in line for line in lines)
  per_class = next(ln for ln in lines if ln.startswith('semi_vs_supervised_per_class: '))
  assert per_class == f'semi_vs_supervised_per_class: supervised=(90.0, {want_sup:.1f})'
  if paired:  # the branch's per-class IoU and DSSN's gain over it
    assert any(
      line.startswith('digit_0')
      and line.endswith(f'{want_paired:6.1f} {want_dssn - want_paired:+6.1f}')
      for line in lines
    )
  if len(ids) > 1:
    assert lines[-2 - paired] == (
      'per-seed gains: seed0=6.00 seed1=5.00 seed2=7.00 (mean 6.00 +- 1.00, min 5.00)'
    )
  if len(ids) > 1 and paired:
    assert lines[-2] == (
      'paired gains: seed0=5.00 seed1=3.00 seed2=8.00 (mean 5.33 +- 2.52, min 3.00)'
    )
    assert any('+-' in line and 'dssn' in line for line in lines)


@pytest.mark.parametrize('bad', ['0,x', '1,1'])
def test_bad_seeds_name_the_flag(bad, tmp_path, capsys):
  with pytest.raises(SystemExit):
    bench.main(['--seeds', bad, '--out', str(tmp_path)])
  assert '--seeds' in capsys.readouterr().err


def test_a_finished_run_is_reused_only_for_the_same_config(tmp_path):
  config = bench.load_digits_config('dssn', None)
  (tmp_path / 'config.json').write_text(config.to_json_best_effort())
  bench.check_reused(str(tmp_path), config)  # same config: reused
  config.baseline.miou = 99.0
  bench.check_reused(str(tmp_path), config)  # another stored baseline: still reused
  config.model.output_stride = 16
  config.train.steps = 10
  with pytest.raises(SystemExit, match=r'--fresh[\s\S]*output_stride[\s\S]*train\.steps'):
    bench.check_reused(str(tmp_path), config)


def test_set_overrides_reach_every_variant(tmp_path, monkeypatch, capsys):
  seen = []

  def record(name, method, overrides, seed, args):
    seen.append(dict(args.set))
    return fake_run(name, method, overrides, seed, args)

  monkeypatch.setattr(bench, 'run', record)
  argv = ['--labeled', '7', '--out', str(tmp_path), '--set', 'model.output_stride=8']
  bench.main(argv + ['--set', 'data.mix_partner=same'])
  assert seen == [{'model.output_stride': 8, 'data.mix_partner': 'same'}] * 2
  config = bench.load_digits_config('dssn', None)
  bench.apply_overrides(config, seen[0])
  assert config.model.output_stride == 8
  with pytest.raises(SystemExit):
    bench.main(argv[:-1] + ['model.output_strid=8'])
  assert "no key 'model.output_strid'" in capsys.readouterr().err


def test_a_run_in_use_is_refused_not_mixed(tmp_path):
  """Another benchmark training the same run (its lock held by a live
  process): this one stops, naming it, before it trains or writes."""
  from dssn_jax import checkpoint

  args = argparse.Namespace(
    labeled=None, steps=0, evals=6, set={}, out=str(tmp_path), fresh=False, seeds=[0]
  )
  workdir = tmp_path / 'supervised'
  with checkpoint.WorkdirLock(str(workdir)):  # held by this (live) process
    with pytest.raises(SystemExit, match='is in use by process'):
      bench.run('supervised', 'supervised', {}, 0, args)
  assert sorted(os.listdir(workdir)) == []
