r"""What evaluation at the original image size costs in compilation, and the fixes.

    python benchmarks/eval_compile.py --backbone resnet50 --sample-shapes 3
    python benchmarks/eval_compile.py --buckets-workdir runs/digits --pad-to 16,32

VOC-like validation set. `--images` (1,449, VOC 2012 val) image shapes are
drawn with a fixed seed: the long side 500, landscape 70% of the time, the
short side one of VOC's common values 55% of the time and uniform in
[100, 500] otherwise, which gives a few hundred distinct shapes as VOC has.
Compiling one program per shape for every shape would take hours on a CPU,
so the script measures on `--sample-shapes` shapes drawn from that set (one
random image each, random-init `--backbone`, one model) and extrapolates:

- `exact, cold`: a fresh `Evaluator` (the reference protocol, one program
  per shape): compilations and seconds in XLA's compiler (JAX's monitoring
  events); `exact, warm`: the same evaluator again, everything compiled,
  which is the computing time. `overhead_s` of a row is its wall time
  beyond the warm one: tracing, lowering and compiling (or loading) on the
  evaluation's critical path;
- `exact, precompiled`: `Evaluator.precompile` in a background thread
  (what the training loop does), waited for, then the evaluation: the
  compilations left on its critical path;
- `exact, T compile threads first`: every shape compiled by
  `Evaluator.precompile` on `--threads` (2) compiler threads, then the pass
  (its wall time includes the compiling): whether compiling in parallel
  pays on this host (`config.train.eval_precompile_threads`);
- `exact, persistent cache`: the programs written to a fresh persistent
  compilation cache, the in-memory caches cleared (`jax.clear_caches`), a
  fresh `Evaluator`: what a restarted process pays (loading, not compiling);
- `pad_to=N` (opt-in buckets): how many programs the whole set needs and
  how many more pixels the network computes.

Then totals for the whole set: compile seconds (distinct shapes x the mean
per shape), compute seconds (megapixels x the measured rate), and the
compile seconds on the critical path of the first evaluation per strategy.

`--buckets-workdir DIR`: the mIoU difference of the shape buckets, measured
with a trained model. It loads DIR's best checkpoint (a DigitScenes run of
`main.py`, whose validation scenes are squares), cuts the first `--bucket-records`
validation scenes to random rectangles (long side the scene's, short side
uniform in [scene/3, scene] rounded down to a multiple of 8: up to 18
distinct shapes for 96-pixel scenes, to keep the exact runs affordable on a
CPU), and evaluates teacher and student exactly and with each `--pad-to`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dssn_jax import xla_flags  # noqa: E402  pylint: disable=wrong-import-position

xla_flags.set_default_cpu_flags()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dssn_jax import compilation, config_lib, evaluate, loading, models  # noqa: E402
from dssn_jax.data import datasets  # noqa: E402
from dssn_jax.train import initial_variables  # noqa: E402

# pylint: enable=g-import-not-at-top,wrong-import-position

# VOC's most frequent short sides (long side 500).
VOC_SHORT_SIDES = (375, 333, 500, 281, 366, 354, 332, 338, 400, 350)


def voc_like_shapes(n: int, seed: int = 0) -> list[tuple[int, int]]:
  """`n` image (H, W) shapes with VOC's spread of sizes (see the docstring)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    short = int(rng.choice(VOC_SHORT_SIDES)) if rng.random() < 0.55 else int(rng.integers(100, 501))
    out.append((short, 500) if rng.random() < 0.7 else (500, short))
  return out


def bucket(shape: tuple[int, int], multiple: int) -> tuple[int, int]:
  """The padded (H, W) of `shape` under `eval_pad_to=multiple`."""
  return tuple(-(-s // multiple) * multiple for s in shape)


def random_records(shapes, num_classes: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [
    {
      'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
      'label': rng.integers(0, num_classes, (h, w)).astype(np.int32),
      'id': f'img{i}',
    }
    for i, (h, w) in enumerate(shapes)
  ]


def _timed_eval(evaluator, variables) -> dict:
  start = time.perf_counter()
  with compilation.CompileCounter() as counter:
    evaluator.confusion_matrices(variables)
  wall = time.perf_counter() - start
  return dict(
    wall_s=wall,
    compiles=counter.compiles,
    compile_s=counter.seconds,
    cache_hits=counter.cache_hits,
    compute_s=wall - counter.seconds,
  )


def measure_compile(args) -> dict:
  shapes = voc_like_shapes(args.images, args.seed)
  distinct = sorted(set(shapes))
  rng = np.random.default_rng(args.seed + 1)
  sample = [distinct[i] for i in rng.choice(len(distinct), args.sample_shapes, replace=False)]
  config = config_lib.base_config()
  config.model.backbone = args.backbone
  config.model.dtype = args.dtype
  config.model.pretrained = ''
  config.data.num_classes = 21
  config.data.eval_mode = 'original'
  model = models.model_from_config(config)
  variables = {'teacher': initial_variables(config, model, jax.random.key(0), 65)}
  records = random_records(sample, 21)

  def fresh():
    return evaluate.Evaluator(
      model, config, records=records, class_names=[str(i) for i in range(21)]
    )

  print(f'# {len(sample)} sampled shapes: {sample}', flush=True)
  rows = _compile_rows(fresh, variables, args.threads)
  totals = _compile_totals(rows, shapes, sample, args)
  return dict(sample=sample, rows=rows, totals=totals)


def _compile_rows(fresh, variables, threads: int) -> dict:
  """The exact-shape rows: cold, warm, precompiled (background, then on
  `threads` compiler threads first), persistent cache written and read."""
  rows = {}
  ev = fresh()
  rows['exact, cold'] = _timed_eval(ev, variables)
  print('exact, cold', rows['exact, cold'], flush=True)
  rows['exact, warm'] = _timed_eval(ev, variables)  # everything compiled: compute only
  print('exact, warm', rows['exact, warm'], flush=True)

  ev = fresh()
  start = time.perf_counter()
  ev.precompile(variables['teacher'], background=True)
  ev.wait_precompiled()  # the training loop would be running meanwhile
  background_s = time.perf_counter() - start
  rows['exact, precompiled'] = dict(_timed_eval(ev, variables), background_s=background_s)
  print('exact, precompiled', rows['exact, precompiled'], flush=True)

  ev = fresh()  # every shape first, on `--threads` compiler threads
  start = time.perf_counter()
  ev.precompile(variables['teacher'], background=False, threads=threads)
  precompile_s = time.perf_counter() - start
  row = _timed_eval(ev, variables)
  row.update(threads=threads, precompile_s=precompile_s, wall_s=row['wall_s'] + precompile_s)
  rows[f'exact, {threads} compile threads first'] = row
  print(f'exact, {threads} compile threads first', row, flush=True)

  cache_dir = tempfile.mkdtemp(prefix='eval_compile_cache_')
  compilation.enable_persistent_cache(cache_dir)
  jax.clear_caches()
  rows['exact, cache write'] = _timed_eval(fresh(), variables)
  print('exact, cache write', rows['exact, cache write'], flush=True)
  jax.clear_caches()
  rows['exact, persistent cache'] = _timed_eval(fresh(), variables)
  print('exact, persistent cache', rows['exact, persistent cache'], flush=True)
  return rows


def _compile_totals(rows: dict, shapes, sample, args) -> dict:
  """Per-shape compile and per-megapixel compute, scaled to the whole set."""
  distinct = sorted(set(shapes))
  mpix = sum(h * w for h, w in sample) / 1e6
  warm = rows['exact, warm']['wall_s']
  for row in rows.values():  # on the critical path: the wall time beyond computing
    row['overhead_s'] = max(0.0, row['wall_s'] - warm)
  per_shape_compile = rows['exact, cold']['overhead_s'] / len(sample)
  per_mpix_compute = warm / mpix
  # A restart still traces and lowers each shape (the cache key needs the
  # program), then loads it: the cold row's time outside XLA plus the load.
  # (Wall-time differences this small drown in a loaded CPU's noise.)
  trace_lower = max(0.0, rows['exact, cold']['overhead_s'] - rows['exact, cold']['compile_s'])
  cache_load = (trace_lower + rows['exact, persistent cache']['compile_s']) / len(sample)
  total_mpix = sum(h * w for h, w in shapes) / 1e6
  totals = dict(
    images=len(shapes),
    distinct_shapes=len(distinct),
    megapixels=total_mpix,
    compile_s_per_shape=per_shape_compile,
    compute_s_per_megapixel=per_mpix_compute,
    cache_load_s_per_shape=cache_load,
    exact_compile_s=per_shape_compile * len(distinct),
    exact_compute_s=per_mpix_compute * total_mpix,
    critical_compile_s={
      'exact, cold': per_shape_compile * len(distinct),
      'exact, persistent cache (restart)': cache_load * len(distinct),
      'exact, precompiled in background': rows['exact, precompiled']['overhead_s']
      / len(sample)
      * len(distinct),
      f'exact, {args.threads} compile threads first': rows[
        f'exact, {args.threads} compile threads first'
      ]['overhead_s']
      / len(sample)
      * len(distinct),
    },
    buckets={},
  )
  for n in args.pad_to:
    padded = [bucket(s, n) for s in shapes]
    totals['buckets'][n] = dict(
      programs=len(set(padded)),
      pixel_overhead=sum(h * w for h, w in padded) / (total_mpix * 1e6) - 1,
    )
  return totals


def measure_buckets(args) -> dict:
  config, variables, step = loading.load_for_eval(workdir=args.buckets_workdir, checkpoint='best')
  source = datasets.get_source(config, 'val')
  rng = np.random.default_rng(args.seed)
  records = []
  for i in range(min(len(source), args.bucket_records)):
    r = source[i]
    s = r['image'].shape[0]
    short = int(rng.integers(s // 3, s + 1)) // 8 * 8  # a multiple of 8: fewer exact programs
    h, w = (short, s) if rng.random() < 0.7 else (s, short)
    top, left = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
    records.append(
      {
        'image': r['image'][top : top + h, left : left + w],
        'label': r['mask'][top : top + h, left : left + w].astype(np.int32),
        'id': r['id'],
      }
    )
  model = models.model_from_config(config)
  out = {'checkpoint_step': step, 'records': len(records)}
  for n in [0] + list(args.pad_to):
    ev = evaluate.Evaluator(model, config, records=records, pad_to=n)
    result = ev.evaluate(variables)
    out[f'pad_to={n}'] = dict(
      shapes=len(ev.record_shapes()),
      miou=result.get('miou'),
      miou_teacher=result.get('miou_teacher'),
    )
    print(f'pad_to={n}', out[f'pad_to={n}'], flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--backbone', default='resnet50')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--images', type=int, default=1449)
  p.add_argument('--sample-shapes', type=int, default=3)
  p.add_argument('--pad-to', default='32,64,128', help='bucket multiples to report')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument(
    '--threads',
    type=int,
    default=2,
    help='compiler threads of `Evaluator.precompile` in the "T compile threads first" row',
  )
  p.add_argument('--buckets-workdir', default='', help='measure bucket mIoU on this run instead')
  p.add_argument('--bucket-records', type=int, default=150, help='validation scenes used')
  p.add_argument('--json', default='', help='also write the results here')
  args = p.parse_args(argv)
  args.pad_to = [int(x) for x in args.pad_to.split(',') if x]
  load = os.getloadavg()[0]
  result = measure_buckets(args) if args.buckets_workdir else measure_compile(args)
  result.update(
    device=str(jax.devices()[0]),
    jax=jax.__version__,
    cpus=os.cpu_count(),
    load_before=load,
    load_after=os.getloadavg()[0],
    threads=threading.active_count(),
  )
  text = json.dumps(result, indent=1, default=str)
  print(text)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(text)
  return result


if __name__ == '__main__':
  main()
