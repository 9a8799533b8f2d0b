"""metrics.jsonl: appended locally, rewritten only at flush for object stores,
readable after a crash."""

import json

from dssn_jax import train


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_local_writer_appends_without_rewriting(tmp_path, monkeypatch):
  rewrites = []
  real = train._write_lines
  monkeypatch.setattr(train, '_write_lines', lambda p, lines: (rewrites.append(1), real(p, lines)))
  previous = [json.dumps({'step': 1, 'split': 'train', 'loss': 1.0})]
  writer = train.MetricWriter(str(tmp_path), previous)
  assert len(rewrites) == 1  # the kept lines, once
  for step in range(2, 6):
    writer.write({'step': step, 'split': 'train', 'loss': 1.0 / step})
    # Each line is on disk as soon as it is written (a crash loses nothing).
    assert [r['step'] for r in _read(tmp_path / 'metrics.jsonl')] == list(range(1, step + 1))
  writer.flush()
  writer.close()
  assert len(rewrites) == 1


def test_object_store_writer_rewrites_only_at_flush(tmp_path, monkeypatch):
  rewrites = []
  real = train._write_lines
  monkeypatch.setattr(train, '_write_lines', lambda p, lines: (rewrites.append(1), real(p, lines)))
  writer = train.MetricWriter(str(tmp_path), [])
  writer._object_store, writer._file = True, None  # what a gs:// workdir gets
  for step in range(1, 11):
    writer.write({'step': step, 'split': 'train', 'loss': 0.5})
  assert _read(tmp_path / 'metrics.jsonl') == [] and len(rewrites) == 1
  writer.flush()  # the loop's checkpoint
  assert [r['step'] for r in _read(tmp_path / 'metrics.jsonl')] == list(range(1, 11))
  writer.flush()  # nothing new: no rewrite
  writer.write({'step': 11, 'split': 'eval', 'miou': 1.0})
  writer.close()
  assert len(rewrites) == 3
  assert _read(tmp_path / 'metrics.jsonl')[-1]['step'] == 11


def test_rewind_skips_a_line_cut_short_by_a_crash(tmp_path):
  lines = [
    json.dumps({'step': 10, 'split': 'train', 'loss': 1.0}),
    json.dumps({'step': 10, 'split': 'eval', 'miou': 3.0}),
    json.dumps({'step': 20, 'split': 'train', 'loss': 0.5}),
  ]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 30, "spl')
  kept, evals = train._rewind_metrics(str(tmp_path), 20)
  assert kept == lines and [e['miou'] for e in evals] == [3.0]
  kept, _ = train._rewind_metrics(str(tmp_path), 10)
  assert kept == lines[:2]
