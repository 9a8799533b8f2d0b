r"""Kills a short DigitScenes run at random moments and checks every resume.

    python benchmarks/fault_injection.py                  # 6 kills, supervised
    python benchmarks/fault_injection.py --kills 12 --method dssn --seed 3

Runs `main.py` on a tiny DigitScenes config (`--steps` steps, evaluation
every `--eval-every`, a checkpoint every `--checkpoint-every`) once without
interruption, then again in a second workdir where it SIGKILLs the process
`--kills` times, cycling through three moments picked at a random step:

- `step`: right after the train line of a step that is neither evaluated
  nor checkpointed (the process is inside the next step);
- `eval`: after the train line of an evaluation step, before its eval
  line (the process is evaluating);
- `checkpoint`: as soon as orbax's temporary directory of a save appears
  (the process is writing the checkpoint).

After each kill it restarts the same command, which resumes by itself. A
resume *matches* when every line of `metrics.jsonl` (train and eval, all
but the wall-clock figures, `dssn_jax.train.WALL_CLOCK_METRICS`) equals the
uninterrupted run's line of that step; a checkpoint is *lost* when the
resume starts before the newest checkpoint that was complete at the kill. Last, it cuts a data file of the newest
checkpoint in half and resumes once more: the run must move it to
`checkpoints_damaged/`, resume from the one before and still match.

Prints one line per kill and a summary; exits 1 if any resume did not
match or a checkpoint was lost. Each process start pays Python and JAX
imports; compilations are shared through a persistent cache in the
workdir. This is a script rather than a test because a useful number of
kills takes minutes (`tests/test_fault_injection.py` runs a short one).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from dssn_jax.train import WALL_CLOCK_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ('checkpoint', 'eval', 'step')


def overrides(args) -> list[str]:
  """The tiny DigitScenes run (a few seconds a step on a 2-core CPU)."""
  return [
    f'--config={os.path.join(ROOT, "configs", "digits.py")}:method={args.method}',
    f'--config.train.steps={args.steps}',
    f'--config.train.eval_every={args.eval_every}',
    f'--config.train.checkpoint_every={args.checkpoint_every}',
    '--config.train.log_every=1',
    '--config.train.warmup_steps=0',
    '--config.train.keep_checkpoints=2',
    '--config.model.width_multiplier=0.5',
    '--config.data.crop_size=32',
    '--config.data.batch_size=2',
    '--config.data.workers=0',
    '--config.data.digits.image_size=48',
    '--config.data.digits.num_labeled=8',
    '--config.data.digits.num_unlabeled=32',
    '--config.data.digits.num_val=8',
  ]


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        pass  # a line being written
  return out


def complete_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints (orbax renames a save when complete)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def saving(workdir: str, since: float) -> bool:
  """Whether a save begun after `since` is being written (a killed one leaves its tmp dir)."""
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*')):
    try:
      if os.path.getmtime(path) >= since:
        return True
    except FileNotFoundError:
      pass  # renamed: the save just completed
  return False


def fresh_metrics(workdir: str, since: float) -> list[dict]:
  """metrics.jsonl once the process started at `since` has rewritten it (rewound)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  try:
    if os.path.getmtime(path) < since:
      return []
  except FileNotFoundError:
    return []
  return read_metrics(workdir)


def start(args, workdir: str, log) -> subprocess.Popen:
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    JAX_COMPILATION_CACHE_DIR=args.cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
  )
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), f'--workdir={workdir}', *overrides(args)]
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_for(proc: subprocess.Popen, workdir: str, phase: str, step: int, args) -> bool:
  """Polls until the process is at `phase` around `step`; False if it exited."""
  since = time.time()
  while proc.poll() is None:
    if phase == 'checkpoint':
      if saving(workdir, since) and max(complete_steps(workdir), default=0) < args.steps:
        return True
    else:
      lines = fresh_metrics(workdir, since)
      trained = {r['step'] for r in lines if r['split'] == 'train'}
      evaluated = {r['step'] for r in lines if r['split'] == 'eval'}
      if phase == 'eval':
        due = [s for s in trained if s % args.eval_every == 0 and s >= step]
        if any(s not in evaluated for s in due):
          return True
      elif any(s >= step for s in trained):
        return True
    time.sleep(0.002)
  return False


def pick_step(phase: str, args, rng: random.Random, done: int) -> int:
  """A step after `done` for `phase` (a step-kill avoids eval/checkpoint steps)."""
  later = list(range(done + 1, args.steps))
  if phase == 'eval':
    later = [s for s in later if s % args.eval_every == 0] or later
  elif phase == 'step':
    quiet = [s for s in later if s % args.eval_every and s % args.checkpoint_every]
    later = quiet or later
  return rng.choice(later) if later else args.steps


def resumed_from(log_path: str) -> int | None:
  with open(log_path) as f:
    text = f.read()
  marks = [line for line in text.splitlines() if 'resumed from' in line]
  return int(marks[-1].rsplit(' ', 1)[1]) if marks else None


def mismatches(reference: list[dict], lines: list[dict], tol: float) -> list[str]:
  """Lines of `lines` that differ from `reference`'s line of the same step and split.

  Same program on the same machine from the same state: equal up to `tol`
  (relative), which only absorbs the JSON round trip of float32 values.
  """
  ref = {(r['split'], r['step']): r for r in reference}
  out = []
  for r in lines:
    want = ref.get((r['split'], r['step']))
    if want is None:
      out.append(f'{r["split"]} step {r["step"]}: not in the uninterrupted run')
      continue
    for key, value in r.items():
      if key not in WALL_CLOCK_METRICS and key != 'split' and not _close(value, want.get(key), tol):
        out.append(f'{r["split"]} step {r["step"]} {key}: {value} vs {want.get(key)}')
  return out


def _close(a, b, tol: float) -> bool:
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return abs(a - b) <= tol * max(abs(a), abs(b), 1e-12)
  return a == b


def truncate_newest(workdir: str) -> tuple[int, str]:
  step = complete_steps(workdir)[-1]
  pattern = os.path.join(workdir, 'checkpoints', str(step), 'state', '**', 'd', '*')
  biggest = max(glob.glob(pattern, recursive=True), key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  return step, biggest


def run(args) -> dict:
  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix='dssn-fault-')
  os.makedirs(root, exist_ok=True)
  args.cache = os.path.join(root, 'xla-cache')
  straight, faulty = os.path.join(root, 'straight'), os.path.join(root, 'faulty')
  for d in (straight, faulty):
    shutil.rmtree(d, ignore_errors=True)

  t0 = time.perf_counter()
  with open(os.path.join(root, 'straight.log'), 'w') as log:
    rc = start(args, straight, log).wait()
  if rc != 0:
    raise SystemExit(f'the uninterrupted run failed (status {rc}); see {root}/straight.log')
  reference = read_metrics(straight)
  print(
    f'uninterrupted run: {len(reference)} lines in {time.perf_counter() - t0:.0f} s', flush=True
  )

  kills = {p: 0 for p in PHASES}
  matched = resumes = lost = 0
  problems = []
  attempt, finished, expected_start = 0, False, 0
  while not finished:
    log_path = os.path.join(faulty, f'run{attempt}.log')
    os.makedirs(faulty, exist_ok=True)
    with open(log_path, 'w') as log:
      proc = start(args, faulty, log)
      killed_at = None
      if sum(kills.values()) < args.kills:
        phase = PHASES[sum(kills.values()) % len(PHASES)]
        done = max((r['step'] for r in read_metrics(faulty) if r['split'] == 'train'), default=0)
        step = pick_step(phase, args, rng, done)
        if wait_for(proc, faulty, phase, step, args):
          os.kill(proc.pid, signal.SIGKILL)
          kills[phase] += 1
          killed_at = (phase, complete_steps(faulty))
      rc = proc.wait()
    if attempt > 0:
      resumes += 1
      start_step = resumed_from(log_path)
      if start_step is None and killed_at is None:
        start_step = 0  # finished without resuming: nothing was restored
      # A run killed before it restored says nothing; the next one is judged.
      if start_step is not None and start_step < expected_start:
        lost += 1
        problems.append(f'run {attempt} resumed from {start_step}, expected {expected_start}')
      bad = mismatches(reference, read_metrics(faulty), args.tol)
      matched += not bad
      problems += bad[:5]
    if killed_at is None:
      finished = rc == 0
      if rc != 0:
        problems.append(f'run {attempt} exited with status {rc} (see {log_path})')
        break
    else:
      phase, steps = killed_at
      expected_start = max(steps, default=0)
      print(
        f'kill {sum(kills.values())}: SIGKILL while at {phase}; complete checkpoints {steps}',
        flush=True,
      )
    attempt += 1

  # The newest checkpoint damaged: moved aside, resume from the one before.
  damaged_step, damaged_file = truncate_newest(faulty)
  before = complete_steps(faulty)
  shutil.rmtree(os.path.join(faulty, 'checkpoints_damaged'), ignore_errors=True)
  log_path = os.path.join(faulty, 'damaged.log')
  with open(log_path, 'w') as log:
    rc = start(args, faulty, log).wait()
  moved = os.path.isdir(os.path.join(faulty, 'checkpoints_damaged', str(damaged_step)))
  start_step = resumed_from(log_path)
  bad = mismatches(reference, read_metrics(faulty), args.tol)
  damaged_ok = rc == 0 and moved and start_step == before[-2] and not bad
  if not damaged_ok:
    problems.append(
      f'damaged checkpoint {damaged_step}: status {rc}, moved aside {moved}, '
      f'resumed from {start_step} (expected {before[-2]}), {len(bad)} mismatches'
    )
  final_ok = not mismatches(reference, read_metrics(faulty), args.tol) and (
    {(r['split'], r['step']) for r in read_metrics(faulty)}
    == {(r['split'], r['step']) for r in reference}
  )
  summary = {
    'kills': sum(kills.values()),
    'kills_by_phase': kills,
    'resumes': resumes,
    'resumes_matched': matched,
    'checkpoints_lost': lost,
    'damaged_checkpoint_recovered': damaged_ok,
    'final_metrics_match': final_ok,
    'wall_s': round(time.perf_counter() - t0),
    'problems': problems,
  }
  print(json.dumps(summary, indent=1), flush=True)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return summary


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=6)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--method', default='supervised', help='dssn | unimatch | fixmatch | supervised'
  )
  parser.add_argument('--steps', type=int, default=12)
  parser.add_argument('--eval-every', type=int, default=4)
  parser.add_argument('--checkpoint-every', type=int, default=2)
  parser.add_argument('--tol', type=float, default=1e-6, help='relative tolerance of a match')
  parser.add_argument('--workdir', default=None, help='keep runs and logs here (default: temp)')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  summary = run(parse_args(argv))
  ok = (
    summary['resumes_matched'] == summary['resumes']
    and summary['checkpoints_lost'] == 0
    and summary['damaged_checkpoint_recovered']
    and summary['final_metrics_match']
  )
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
