r"""Does the unlabeled data help? DSSN vs supervised on DigitScenes, same labels.

    python benchmarks/semi_vs_supervised.py                 # supervised vs dssn
    python benchmarks/semi_vs_supervised.py --ablate        # + each DSSN term off
    python benchmarks/semi_vs_supervised.py --labeled 40 --steps 2000

Both methods train `configs/digits.py` on the same labeled scenes, for the
same number of steps, from the same seed; `supervised` sees only the labeled
scenes. Prints a table (labeled count, method, best and last student and
teacher mIoU, wall time), writes a PNG of validation mIoU against steps, and
ends with one machine-readable line:

    semi_vs_supervised: labeled=N supervised=X dssn=Y gain=Z

where X is supervised's best student mIoU, Y is DSSN's best teacher mIoU and
Z = Y - X, in points. Runs live in `--out/<name>`; a finished run found there
is reused (pass --fresh to retrain).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time

from dssn_jax import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (method, config overrides): DSSN with one term switched off.
ABLATIONS = {
    'dssn -strong': ('dssn', {'loss.strong': 0.0}),
    'dssn -fp': ('dssn', {'loss.fp': 0.0, 'loss.align_feature': 0.0}),
    'dssn -align_image': ('dssn', {'loss.align_image': 0.0}),
    'dssn -align_feature': ('dssn', {'loss.align_feature': 0.0}),
    'dssn fixed 0.95': ('dssn', {'loss.pseudo_label': 'fixed', 'loss.threshold': 0.95}),
}


def load_digits_config(method: str, labeled: int):
  spec = importlib.util.spec_from_file_location(
      'digits_config', os.path.join(REPO, 'configs', 'digits.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(
      f'method={method}' if labeled is None else f'method={method},labeled={labeled}')


def apply_overrides(config, overrides: dict) -> None:
  for key, value in overrides.items():
    *path, name = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[name] = value


def read_evals(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in map(json.loads, filter(str.strip, f)) if r['split'] == 'eval']


def run(name: str, method: str, overrides: dict, args) -> dict:
  """Trains one variant (or reuses a finished run) and summarizes it."""
  from dssn_jax import train  # pylint: disable=g-import-not-at-top
  config = load_digits_config(method, args.labeled)
  config.seed = args.seed
  if args.steps:
    config.train.steps = args.steps
    config.train.eval_every = max(1, args.steps // args.evals)
  apply_overrides(config, overrides)
  workdir = os.path.join(args.out, name.replace(' ', '_'))
  timing = os.path.join(workdir, 'wall_seconds.txt')
  if args.fresh and os.path.exists(workdir):
    shutil.rmtree(workdir)
  if os.path.exists(timing):
    with open(timing) as f:
      wall = float(f.read())
  else:
    print(f'--- {name}: training in {workdir}', flush=True)
    start = time.perf_counter()
    summary = train.train_and_evaluate(config, workdir)
    if summary['preempted']:
      sys.exit(f'{name} was stopped by SIGTERM; run again to resume')
    wall = time.perf_counter() - start
    with open(timing, 'w') as f:
      f.write(f'{wall:.1f}')
  evals = read_evals(workdir)
  summary = train.summarize(evals)
  return dict(name=name, method=method, labeled=args.labeled, wall=wall,
              evals=evals, **summary)


def fmt(x) -> str:
  return '   -  ' if x is None else f'{x:6.2f}'


def print_table(rows: list[dict]) -> None:
  print(f'{"labeled":>7}  {"method":<22} {"student best":>12} {"last":>6} '
        f'{"teacher best":>12} {"last":>6} {"wall s":>7}')
  for r in rows:
    print(f'{r["labeled"]:>7}  {r["name"]:<22} {fmt(r["best"]):>12} {fmt(r["miou"])} '
          f'{fmt(r["best_teacher"]):>12} {fmt(r["miou_teacher"])} {r["wall"]:7.0f}')


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    steps = [e['step'] for e in r['evals']]
    key = 'miou' if r['method'] == 'supervised' else 'miou_teacher'
    label = r['name'] + (' (student)' if key == 'miou' else ' (teacher)')
    ax.plot(steps, [e[key] for e in r['evals']], marker='o', label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('validation mIoU (%)')
  ax.set_title(f'DigitScenes, {rows[0]["labeled"]} labeled scenes')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  print(f'plot: {path}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--labeled', type=int, default=None,
                      help='labeled scenes (default: configs/digits.py, 100)')
  parser.add_argument('--steps', type=int, default=0,
                      help='train steps per run (default: configs/digits.py)')
  parser.add_argument('--evals', type=int, default=6,
                      help='evaluations per run when --steps is given')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--ablate', action='store_true', help='add DSSN ablations')
  parser.add_argument('--out', default='runs/semi_vs_supervised')
  parser.add_argument('--plot', default=None, help='PNG path (default OUT/miou.png)')
  parser.add_argument('--fresh', action='store_true', help='retrain finished runs')
  args = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  xla_flags.set_default_cpu_flags()  # as main.py
  if args.labeled is None:
    args.labeled = int(load_digits_config('dssn', None).data.digits.num_labeled)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)

  variants = [('supervised', 'supervised', {}), ('dssn', 'dssn', {})]
  if args.ablate:
    variants += [(name, method, ov) for name, (method, ov) in ABLATIONS.items()]
  rows = [run(name, method, ov, args) for name, method, ov in variants]
  print()
  print_table(rows)
  plot(rows, args.plot or os.path.join(args.out, 'miou.png'))
  sup, dssn = rows[0]['best'], rows[1]['best_teacher']
  print(f'semi_vs_supervised: labeled={args.labeled} supervised={sup:.2f} '
        f'dssn={dssn:.2f} gain={dssn - sup:.2f}')


if __name__ == '__main__':
  main()
