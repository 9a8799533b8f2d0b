"""benchmarks/fault_injection.py: SIGKILL at random moments, resume, compare.

The comparison is tested on its own (it must catch a differing line); the
kill loop runs for real, short in the default suite and longer under `slow`.
"""

import pytest

from benchmarks import fault_injection as fault


def test_mismatches_catch_a_differing_value_and_a_missing_line():
  reference = [
    {'split': 'train', 'step': 1, 'loss': 1.0, 'images_per_sec': 5.0},
    {'split': 'eval', 'step': 1, 'miou': 20.0, 'iou_per_class': [1.0, 2.0]},
  ]
  same = [dict(r) for r in reference]
  same[0].update(images_per_sec=9.0, input_wait_s=0.3, input_wait_frac=0.1)  # wall clock
  assert fault.mismatches(reference, same, 1e-6) == []
  changed = [dict(r) for r in reference]
  changed[1]['iou_per_class'] = [1.0, 2.1]
  assert fault.mismatches(reference, changed, 1e-6) == [
    'eval step 1 iou_per_class: [1.0, 2.1] vs [1.0, 2.0]'
  ]
  extra = [*reference, {'split': 'train', 'step': 2, 'loss': 1.0}]
  assert fault.mismatches(reference, extra, 1e-6) == ['train step 2: not in the uninterrupted run']


def _run(tmp_path, kills, steps):
  args = fault.parse_args(
    ['--kills', str(kills), '--steps', str(steps), '--workdir', str(tmp_path), '--seed', '1']
  )
  return fault.run(args)


def _assert_survived(summary, kills):
  assert summary['kills'] == kills, summary
  assert summary['resumes_matched'] == summary['resumes'] == kills, summary
  assert summary['checkpoints_lost'] == 0, summary
  assert summary['damaged_checkpoint_recovered'] and summary['final_metrics_match'], summary


@pytest.mark.slow
def test_one_kill_during_a_checkpoint_write(tmp_path):
  """A kill while orbax writes step 2's checkpoint; resume; then a damaged newest."""
  summary = fault.run(
    fault.parse_args(['--kills', '1', '--steps', '6', '--workdir', str(tmp_path), '--seed', '1'])
  )
  _assert_survived(summary, 1)


@pytest.mark.slow
def test_six_kills_at_steps_evaluations_and_checkpoint_writes(tmp_path):
  summary = _run(tmp_path, 6, 12)
  assert summary['kills_by_phase'] == {'step': 2, 'eval': 2, 'checkpoint': 2}
  _assert_survived(summary, 6)
