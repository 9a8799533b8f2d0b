r"""Does the unlabeled data help? DSSN vs supervised on DigitScenes, same labels.

    python benchmarks/semi_vs_supervised.py                 # supervised vs dssn
    python benchmarks/semi_vs_supervised.py --ablate        # + each DSSN term off
    python benchmarks/semi_vs_supervised.py --labeled 40 --steps 2000
    python benchmarks/semi_vs_supervised.py --seeds 0,1,2   # mean +- std
    python benchmarks/semi_vs_supervised.py --seeds 0,1,2 --set model.output_stride=8 \
        --out runs/svs_os8                                   # a lever, for both methods

Both methods train `configs/digits.py` on the same labeled scenes, for the
same number of steps, from the same seed; `supervised` sees only the labeled
scenes. Prints a table (labeled count, method, best and last student and
teacher mIoU, wall time), writes a PNG of validation mIoU against steps
(`--out/miou.png`) and the first seed's validation scenes as predicted by
the final supervised and DSSN models side by side (`--out/predictions.png`),
the per-class IoU of both (mean over the seeds, each run at its best
evaluation), and ends with one machine-readable line:

    semi_vs_supervised: labeled=N supervised=X dssn=Y gain=Z paired=P paired_gain=Q

where X is supervised's best student mIoU, Y is DSSN's best teacher mIoU and
Z = Y - X, in points. P is the DSSN run's own live baseline
(`train.supervised_branch`, on in configs/digits.py): the supervised
iteration continued from the DSSN run's warm-up state on the same labeled
batches, in DIR/supervised; it is the row `supervised (paired)`, a column
of the per-class table and of the pictures, and Q = Y - P (a paired
difference: the two models share everything up to the warm-up's end).
With several `--seeds` every variant trains once per seed (the seed sets
initialization and augmentation; the scenes and the labeled subset stay
fixed by `data.digits.data_seed`), the table adds mean and sample std
rows, the plot shows the mean curve with the min-max band, and X, Y, Z, P,
Q are means over the seeds (`per-seed gains:` and `paired gains:` lines
precede). A DSSN run's wall time includes its branch.
Runs live in `--out/<name>` (one seed) or `--out/seed<S>/<name>`; a finished
run found there is reused if it trained the same config (else the benchmark
stops naming the keys that differ; pass --fresh to retrain).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import time

import numpy as np
from absl import logging

from dssn_jax import xla_flags
from dssn_jax.testing import configs

# name -> (method, config overrides): DSSN with one term switched off.
# (Without the supervised branch: it would repeat the `dssn` run's, the same
# warm-up state and labeled batches.)
_NO_BRANCH = {'train.supervised_branch': False}
ABLATIONS = {
  'dssn -strong': ('dssn', {'loss.strong': 0.0, **_NO_BRANCH}),
  'dssn -fp': ('dssn', {'loss.fp': 0.0, 'loss.align_feature': 0.0, **_NO_BRANCH}),
  'dssn -align_image': ('dssn', {'loss.align_image': 0.0, **_NO_BRANCH}),
  'dssn -align_feature': ('dssn', {'loss.align_feature': 0.0, **_NO_BRANCH}),
  'dssn fixed 0.95': (
    'dssn',
    {'loss.pseudo_label': 'fixed', 'loss.threshold': 0.95, **_NO_BRANCH},
  ),
}

# The row of a DSSN run's live baseline (`train.supervised_branch`): the
# supervised iteration from the run's warm-up state on its labeled batches.
PAIRED = 'supervised (paired)'


def load_digits_config(method: str, labeled: int):
  return configs.load_config(
    'digits', f'method={method}' if labeled is None else f'method={method},labeled={labeled}'
  )


def apply_overrides(config, overrides: dict) -> None:
  for key, value in overrides.items():
    *path, name = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[name] = value


def parse_set(items: list[str], config) -> dict:
  """`--set KEY=VALUE` items -> {key: value}, each value parsed as a Python
  literal (a bare word stays a string) and checked against the config."""
  out = {}
  for item in items:
    key, sep, text = item.partition('=')
    if not sep:
      raise ValueError(f'--set {item!r}: expected KEY=VALUE, e.g. model.output_stride=8')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *path, name = key.split('.')
    node = config
    for part in path:
      node = node.get(part) if hasattr(node, 'get') else None
    if node is None or not hasattr(node, 'get') or name not in node:
      raise ValueError(f'--set {item!r}: configs/digits.py has no key {key!r}')
    out[key] = value
  return out


def read_evals(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, filter(str.strip, f)) if r['split'] == 'eval']


def check_reused(workdir: str, config) -> None:
  """A finished run is reused only if it trained this very config
  (`baseline.*` aside: what a run is compared with, not what it trains)."""
  # JAX loads only after main() has set JAX_PLATFORMS and the XLA flags.
  from dssn_jax import config_lib  # pylint: disable=g-import-not-at-top

  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  refused, allowed = config_lib.resume_changes(saved, json.loads(config.to_json_best_effort()))
  allowed = [line for line in allowed if not line.startswith('config.baseline.')]
  if refused or allowed:
    sys.exit(
      f'{workdir} holds a finished run of another config (pass --fresh to retrain, '
      'or another --out):\n  ' + '\n  '.join(refused + allowed)
    )


def run(name: str, method: str, overrides: dict, seed: int, args) -> dict:
  """Trains one variant for one seed (or reuses a finished run); summarizes it."""
  # JAX loads only after main() has set JAX_PLATFORMS and the XLA flags.
  from dssn_jax import checkpoint, train  # pylint: disable=g-import-not-at-top

  config = load_digits_config(method, args.labeled)
  config.seed = seed
  if args.steps:
    config.train.steps = args.steps
    config.train.eval_every = max(1, args.steps // args.evals)
  apply_overrides(config, {**args.set, **overrides})
  out = args.out if len(args.seeds) == 1 else os.path.join(args.out, f'seed{seed}')
  workdir = os.path.join(out, name.replace(' ', '_'))
  timing = os.path.join(workdir, 'wall_seconds.txt')
  if args.fresh and os.path.exists(workdir):
    shutil.rmtree(workdir)
  if os.path.exists(timing):
    check_reused(workdir, config)
    with open(timing) as f:
      wall = float(f.read())
  else:
    print(f'--- {name}: training in {workdir}', flush=True)
    start = time.perf_counter()
    # One run per workdir, as main.py: another benchmark on the same --out
    # is refused (checkpoint.WorkdirInUse) rather than mixed into this run.
    try:
      with checkpoint.WorkdirLock(workdir):
        summary = train.train_and_evaluate(config, workdir)
    except checkpoint.WorkdirInUse as e:
      sys.exit(str(e))
    if summary['preempted']:
      sys.exit(f'{name} was stopped by SIGTERM; run again to resume')
    wall = time.perf_counter() - start
    with open(timing, 'w') as f:
      f.write(f'{wall:.1f}')
  evals = read_evals(workdir)
  summary = train.summarize(evals)
  return dict(
    name=name,
    method=method,
    labeled=args.labeled,
    seed=seed,
    wall=wall,
    evals=evals,
    workdir=workdir,
    **summary,
  )


def with_paired(rows: list[dict]) -> list[dict]:
  """`rows` with a `supervised (paired)` row after each `dssn` run that
  trained its supervised branch (`DIR/supervised/metrics.jsonl`): the same
  seed and labeled batches, its model's mIoU under the teacher keys (the
  branch's teacher is its student), its wall time the branch's."""
  from dssn_jax import train  # pylint: disable=g-import-not-at-top

  out = []
  for row in rows:
    out.append(row)
    branch = os.path.join(row['workdir'], train.BRANCH_DIR)
    evals = read_evals(branch)
    if row['name'] != 'dssn' or not evals:
      continue
    timing = os.path.join(row['workdir'], 'timing.json')
    wall = 0.0
    if os.path.exists(timing):
      with open(timing) as f:
        wall = json.load(f).get('branch_s', 0.0)
    summary = train.summarize(evals)
    out.append(dict(row, name=PAIRED, method='supervised', wall=wall, evals=evals, workdir=branch))
    out[-1].update(summary, miou=None, best=None)
  return out


def model_key(row: dict) -> str:
  """The eval key of a row's model: supervised's student, DSSN's (an
  ablation's, the paired branch's) teacher."""
  return 'miou' if row['name'] == 'supervised' else 'miou_teacher'


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, var**0.5


def aggregate(rows: list[dict]) -> list[dict]:
  """One row per variant: mean and std over its seeds of each summary number."""
  names = list(dict.fromkeys(r['name'] for r in rows))
  out = []
  for name in names:
    group = [r for r in rows if r['name'] == name]
    agg = dict(
      name=name,
      method=group[0]['method'],
      labeled=group[0]['labeled'],
      seeds=[r['seed'] for r in group],
    )
    for key in ('best', 'miou', 'best_teacher', 'miou_teacher', 'wall'):
      values = [r[key] for r in group if r[key] is not None]
      agg[key], agg[key + '_std'] = mean_std(values) if values else (None, None)
    out.append(agg)
  return out


def fmt(x) -> str:
  return '   -  ' if x is None else f'{x:6.2f}'


def fmt_pm(x, std) -> str:
  return '      -      ' if x is None else f'{x:6.2f} +-{std:5.2f}'


def print_table(rows: list[dict], aggregated: list[dict] | None = None) -> None:
  print(
    f'{"labeled":>7} {"seed":>4}  {"method":<22} {"student best":>12} {"last":>6} '
    f'{"teacher best":>12} {"last":>6} {"wall s":>7}'
  )
  for r in rows:
    print(
      f'{r["labeled"]:>7} {r["seed"]:>4}  {r["name"]:<22} {fmt(r["best"]):>12} '
      f'{fmt(r["miou"])} {fmt(r["best_teacher"]):>12} {fmt(r["miou_teacher"])} '
      f'{r["wall"]:7.0f}'
    )
  if not aggregated:
    return
  print()
  print(
    f'{"labeled":>7} {"seeds":>5}  {"method":<22} {"student best":>13} '
    f'{"last":>13} {"teacher best":>13} {"last":>13}   (mean +- std)'
  )
  for r in aggregated:
    print(
      f'{r["labeled"]:>7} {len(r["seeds"]):>5}  {r["name"]:<22} '
      f'{fmt_pm(r["best"], r["best_std"])} {fmt_pm(r["miou"], r["miou_std"])} '
      f'{fmt_pm(r["best_teacher"], r["best_teacher_std"])} '
      f'{fmt_pm(r["miou_teacher"], r["miou_teacher_std"])}'
    )


def plot(rows: list[dict], path: str) -> None:
  # Optional: only the plot needs matplotlib.
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  seeds = list(dict.fromkeys(r['seed'] for r in rows))
  for name in dict.fromkeys(r['name'] for r in rows):
    group = [r for r in rows if r['name'] == name]
    key = model_key(group[0])
    label = name if name == PAIRED else name + (' (student)' if key == 'miou' else ' (teacher)')
    # Steps every seed evaluated at; the curve is their mean.
    steps = sorted(set.intersection(*({e['step'] for e in r['evals']} for r in group)))
    curves = [[{e['step']: e[key] for e in r['evals']}[t] for t in steps] for r in group]
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(steps))]
    (line,) = ax.plot(steps, mean, marker='o', label=label)
    if len(group) > 1:
      ax.fill_between(
        steps,
        [min(c[i] for c in curves) for i in range(len(steps))],
        [max(c[i] for c in curves) for i in range(len(steps))],
        color=line.get_color(),
        alpha=0.15,
      )
  ax.set_xlabel('step')
  ax.set_ylabel('validation mIoU (%)' + (f', mean of {len(seeds)} seeds' if len(seeds) > 1 else ''))
  ax.set_title(f'DigitScenes, {rows[0]["labeled"]} labeled scenes')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  print(f'plot: {path}')


def best_per_class(row: dict) -> dict[str, float]:
  """Per-class IoU of a run at its best evaluation, of its model
  (`model_key`), as the summary's mIoU."""
  key = model_key(row)
  evals = [e for e in row['evals'] if e.get(key) is not None]
  best = max(evals, key=lambda e: e[key])
  return best.get('iou_per_class' if key == 'miou' else 'iou_per_class_teacher') or {}


def per_class_table(rows: list[dict]) -> str:
  """Per-class IoU, mean over the seeds, supervised (and the paired
  supervised branch, if every seed has one) beside DSSN (which digits the
  unlabeled scenes helped), and the supervised means as the tuple
  `configs/digits.py` stores for its report (`baseline.iou_per_class`)."""
  mean = {}
  for name in ('supervised', PAIRED, 'dssn'):
    runs = [best_per_class(r) for r in rows if r['name'] == name]
    classes = list(runs[0]) if runs and runs[0] else []
    mean[name] = {c: sum(run[c] for run in runs) / len(runs) for c in classes}
  if not mean['supervised'] or not mean['dssn']:
    return ''
  paired = sum(r['name'] == PAIRED for r in rows) == sum(r['name'] == 'dssn' for r in rows)
  head = f'{"class":<12} {"supervised":>10} {"dssn":>6} {"gain":>6}'
  if paired:
    head += f' {"paired":>6} {"gain":>6}'
  lines = [head + '   (IoU %, mean over seeds; paired: the supervised branch)']
  for c, sup in mean['supervised'].items():
    dssn = mean['dssn'].get(c)
    gain = '' if dssn is None else f'{dssn - sup:+6.1f}'
    line = f'{c:<12} {sup:10.1f} {"" if dssn is None else f"{dssn:6.1f}"} {gain}'
    if paired and dssn is not None and c in mean[PAIRED]:
      line += f' {mean[PAIRED][c]:6.1f} {dssn - mean[PAIRED][c]:+6.1f}'
    lines.append(line)
  values = ', '.join(f'{v:.1f}' for v in mean['supervised'].values())
  lines.append(f'semi_vs_supervised_per_class: supervised=({values})')
  return '\n'.join(lines)


def predictions_from_checkpoint(workdir: str) -> None:
  """`workdir/predictions.npz` from its newest checkpoint, as the training
  loop writes it at the end of a run (`Evaluator.predict` on the first
  `train.prediction_grid` validation scenes)."""
  # pylint: disable-next=g-import-not-at-top
  from dssn_jax import checkpoint, evaluate, models, visualize

  config, variables, _ = checkpoint.restore_for_eval(workdir, 'latest')
  evaluator = evaluate.Evaluator(models.model_from_config(config), config)
  predictions = evaluator.predict(variables, int(config.train.prediction_grid))
  with open(os.path.join(workdir, 'predictions.npz'), 'wb') as f:
    f.write(visualize.predictions_npz(*predictions))


def compare_predictions(rows: list[dict], path: str) -> None:
  """`path`: the first seed's validation scenes as image | ground truth |
  supervised | [supervised (paired) |] DSSN teacher, from each run's
  `predictions.npz` (written by the training loop with `predictions.png`;
  the paired branch's column is in the DSSN run's), drawn by
  `dssn_jax.visualize`."""
  from dssn_jax import visualize  # pylint: disable=g-import-not-at-top
  from dssn_jax.data import datasets  # pylint: disable=g-import-not-at-top

  seed = rows[0]['seed']
  by = {r['name']: r for r in rows if r['seed'] == seed and r['name'] != PAIRED}
  files = {name: os.path.join(by[name]['workdir'], 'predictions.npz') for name in by}
  for name, f in files.items():  # runs from before the loop wrote the file
    if not os.path.exists(f) and os.path.isdir(os.path.join(by[name]['workdir'], 'checkpoints')):
      predictions_from_checkpoint(by[name]['workdir'])
  missing = [f for f in files.values() if not os.path.exists(f)]
  if missing:
    print(f'predictions: not drawn, no {", ".join(missing)} (config.train.prediction_grid=0?)')
    return
  arrays = {name: np.load(f) for name, f in files.items()}
  sup, dssn = arrays['supervised'], arrays['dssn']
  columns = {'supervised': list(sup['student'])}
  if 'supervised' in dssn.files:
    columns[PAIRED] = list(dssn['supervised'])
  columns['dssn (teacher)'] = list(dssn['teacher'])
  for name in by:  # ablations, if any
    if name not in ('supervised', 'dssn'):
      columns[f'{name} (teacher)'] = list(arrays[name]['teacher'])
  config = load_digits_config('dssn', rows[0]['labeled'])
  grid = visualize.prediction_grid(
    list(dssn['images']),
    list(dssn['labels']),
    columns,
    datasets.palette(config),
    datasets.class_names(config),
    ignore_index=int(config.data.ignore_index),
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(visualize.png_bytes(grid))
  print(f'predictions: {path} (seed {seed}, final models)')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--labeled', type=int, default=None, help='labeled scenes (default: configs/digits.py, 100)'
  )
  parser.add_argument(
    '--steps', type=int, default=0, help='train steps per run (default: configs/digits.py)'
  )
  parser.add_argument(
    '--evals', type=int, default=6, help='evaluations per run when --steps is given'
  )
  parser.add_argument('--seeds', default='0', help='comma-separated seeds, e.g. 0,1,2 (default 0)')
  parser.add_argument('--ablate', action='store_true', help='add DSSN ablations')
  parser.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='a config override for every variant, e.g. model.output_stride=8 (repeatable)',
  )
  parser.add_argument('--out', default='runs/semi_vs_supervised')
  parser.add_argument('--plot', default=None, help='PNG path (default OUT/miou.png)')
  parser.add_argument('--fresh', action='store_true', help='retrain finished runs')
  args = parser.parse_args(argv)
  try:
    args.seeds = [int(s) for s in args.seeds.split(',')]
  except ValueError:
    parser.error(f'--seeds: expected comma-separated integers, got {args.seeds!r}')
  if len(set(args.seeds)) != len(args.seeds):
    parser.error(f'--seeds: {args.seeds} repeats a seed')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  xla_flags.set_default_cpu_flags()  # as main.py
  if args.labeled is None:
    args.labeled = int(load_digits_config('dssn', None).data.digits.num_labeled)
  try:
    args.set = parse_set(args.set, load_digits_config('dssn', args.labeled))
  except ValueError as e:
    parser.error(str(e))
  logging.set_verbosity(logging.WARNING)

  variants = [('supervised', 'supervised', {}), ('dssn', 'dssn', {})]
  if args.ablate:
    variants += [(name, method, ov) for name, (method, ov) in ABLATIONS.items()]
  rows = [run(name, method, ov, seed, args) for seed in args.seeds for name, method, ov in variants]
  rows = with_paired(rows)
  aggregated = aggregate(rows) if len(args.seeds) > 1 else None
  print()
  print_table(rows, aggregated)
  plot(rows, args.plot or os.path.join(args.out, 'miou.png'))
  compare_predictions(rows, os.path.join(args.out, 'predictions.png'))
  table = per_class_table(rows)
  if table:
    print(table)
  by = {(r['name'], r['seed']): r for r in rows}
  gains = [by['dssn', s]['best_teacher'] - by['supervised', s]['best'] for s in args.seeds]
  sup = mean_std([by['supervised', s]['best'] for s in args.seeds])[0]
  dssn = mean_std([by['dssn', s]['best_teacher'] for s in args.seeds])[0]
  paired = None
  if all((PAIRED, s) in by for s in args.seeds):
    paired = [by[PAIRED, s]['best_teacher'] for s in args.seeds]
  if len(args.seeds) > 1:
    print(gains_line('per-seed gains', args.seeds, gains))
    if paired:
      print(
        gains_line(
          'paired gains',
          args.seeds,
          [by['dssn', s]['best_teacher'] - p for s, p in zip(args.seeds, paired)],
        )
      )
  line = (
    f'semi_vs_supervised: labeled={args.labeled} supervised={sup:.2f} '
    f'dssn={dssn:.2f} gain={dssn - sup:.2f}'
  )
  if paired:
    mean_paired = mean_std(paired)[0]
    line += f' paired={mean_paired:.2f} paired_gain={dssn - mean_paired:.2f}'
  print(line)


def gains_line(what: str, seeds: list[int], gains: list[float]) -> str:
  """`what: seed0=G ... (mean M +- S, min G)`."""
  mean, std = mean_std(gains)
  return (
    f'{what}: '
    + ' '.join(f'seed{s}={g:.2f}' for s, g in zip(seeds, gains))
    + f' (mean {mean:.2f} +- {std:.2f}, min {min(gains):.2f})'
  )


if __name__ == '__main__':
  main()
