r"""One command that measures a new machine (GPU, TPU, or CPU at a reduced size).

    python benchmarks/accelerator_check.py --out runs/check            # full size, ~8 min
    python benchmarks/accelerator_check.py --out runs/check_cpu --backbone resnet_tiny \
        --crop 65 --batches 1 --steps 2 --warmup 1 --train-steps 4 --budget-s 300

Writes `DIR/accelerator_check.json` and `DIR/accelerator_check.md` with:

1. environment: device kind and count, processes, host cores, JAX / jaxlib /
   flax / optax / orbax versions, XLA_FLAGS;
2. the full DSSN train step (`benchmarks/step_speed.py`'s program) at
   `--backbone` (ResNet-101), crop `--crop` (513), bfloat16 and float32,
   per-device batch `--batches` (2, 4, 8 labeled, as many unlabeled):
   compile time, median step time, images/s, FLOPs from XLA's cost
   analysis, MFU against the device's peak (`PEAK_TFLOPS`, or
   `--peak-tflops`), XLA's memory estimate and the process's peak device
   memory so far (GPU/TPU); out-of-memory is reported as such;
3. the same for the ViT backbones (`--dinov2-backbones`: by default every
   one of the model registry's DINOv2 family, small to giant; any DINOv3
   backbone by name, e.g. `dinov3_small,dinov3_base`), at crop
   `--dinov2-crop` (518) rounded to a multiple of each backbone's patch
   (DINOv3: 512), in the first of `--dtypes`;
4. evaluation images/s at VOC sizes (`--eval-sizes`), with the compile time
   per shape (`dssn_jax.evaluate.Evaluator`, exact protocol, one model);
5. the input pipeline's CPU cost per step on this host (generated VOC-like
   images, `benchmarks/data_throughput.py --recipes voc`) against the
   measured step: cores needed vs cores available;
6. a real training run: `python main.py --config configs/digits.py` (a
   generated dataset, nothing downloaded) with `--train-backbone`, bfloat16,
   `--train-steps` (100) steps and an evaluation; every logged loss must be
   finite.

Everything runs within `--budget-s` (480): a part whose estimated time (from
what was measured before it) does not fit is skipped and the report says
so; the training run gets at most `--train-timeout-s`. The order: the
training run first (a child process, before this one holds the devices),
then environment, bfloat16 steps, evaluation, input, float32 steps, DINOv2.
The process enables the persistent compilation cache
(`config.train.compilation_cache_dir`), so a second run compiles little.

Needs JAX, flax, optax, orbax-checkpoint, ml_collections, numpy, absl and
etils (the training path); grain, opencv-python-headless, Pillow and psutil
for the input section (skipped if missing) and the training run; tqdm and
(optionally) tensorboardX for `main.py`. Not TensorFlow, TensorFlow
Datasets or PyTorch.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from dssn_jax import xla_flags

xla_flags.set_default_cpu_flags()  # the program main.py runs

import jax
import numpy as np

# pylint: enable=g-import-not-at-top,wrong-import-position

# Dense peak TFLOP/s of one device: (bfloat16, float32). float32 matmuls and
# convolutions run as TF32 on NVIDIA GPUs by default in XLA, so its peak is
# TF32's. Matched against `device_kind` in order (first substring wins).
PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
  ('H100 PCIe', 756.0, 378.0),
  ('H100', 989.4, 494.7),  # SXM
  ('H200', 989.4, 494.7),
  ('A100', 312.0, 156.0),
  ('L4', 121.0, 60.0),
  ('TPU v4', 275.0, None),
  ('TPU v5 lite', 197.0, None),
  ('TPU v5e', 197.0, None),
  ('TPU v5p', 459.0, None),
  ('TPU v5', 459.0, None),
  ('TPU v6 lite', 918.0, None),
  ('TPU v6e', 918.0, None),
)


def peak_tflops(device_kind: str, dtype: str, override: dict[str, float]) -> float | None:
  """Peak TFLOP/s of one device for `dtype`: `override`, else `PEAK_TFLOPS`."""
  if dtype in override:
    return override[dtype]
  for name, bf16, f32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else f32
  return None


def parse_peak(text: str) -> dict[str, float]:
  """`--peak-tflops`: 'X' (both dtypes) or 'bfloat16=X,float32=Y'."""
  if not text:
    return {}
  if '=' not in text:
    return {'bfloat16': float(text), 'float32': float(text)}
  out = {}
  for part in text.split(','):
    key, value = part.split('=', 1)
    if key not in ('bfloat16', 'float32'):
      raise ValueError(f'--peak-tflops: {key!r} is not bfloat16 or float32')
    out[key] = float(value)
  return out


def dinov2_backbones() -> list[str]:
  """The DINOv2 family's backbones in `dssn_jax.models.registry` (the test-only
  ones left out), smallest first."""
  from dssn_jax.models import registry  # pylint: disable=g-import-not-at-top

  family = registry.FAMILIES.get('dinov2')
  return [b for b in family.backbones if b not in family.test_backbones]


class Budget:
  """Wall-clock budget: `fits(estimate)` says whether a part may start."""

  def __init__(self, seconds: float):
    self.seconds = float(seconds)
    self.start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.seconds - self.elapsed()

  def fits(self, estimate: float) -> bool:
    return estimate <= self.left()

  def skip_reason(self, estimate: float) -> str:
    return (
      f'skipped: needs about {estimate:.0f} s, {max(0.0, self.left()):.0f} s of the budget left'
    )


def _load_benchmark(name: str):
  """A sibling script (`benchmarks/<name>.py`) as a module."""
  if HERE not in sys.path:
    sys.path.insert(0, HERE)
  return __import__(name)


def _is_oom(e: BaseException) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


# ----------------------------------------------------------------------------
# Sections.


def environment() -> dict[str, Any]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top

  from dssn_jax.data.pipeline import available_cores  # pylint: disable=g-import-not-at-top

  def version(pkg):
    try:
      return md.version(pkg)
    except md.PackageNotFoundError:
      return None

  d = jax.devices()[0]
  return dict(
    status='ok',
    date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    platform=d.platform,
    device_kind=d.device_kind,
    devices=jax.device_count(),
    local_devices=jax.local_device_count(),
    processes=jax.process_count(),
    host_cores=available_cores(),
    python=platform.python_version(),
    versions={
      p: version(p) for p in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain')
    },
    xla_flags=os.environ.get('XLA_FLAGS', ''),
  )


def step_arguments(step_speed, backbone: str, crop: int, batch: int, dtype: str):
  """`step_speed`'s arguments for the DSSN step (its parser: its defaults for the rest)."""
  return step_speed.parse_args(
    ['--backbone', backbone, '--crop', str(crop), '--batch', str(batch), '--dtype', dtype]
    + ['--method', 'dssn', '--num-classes', '21']
  )


def train_steps(args, backbone: str, crop: int, dtypes, budget: Budget, peaks) -> list[dict]:
  """The DSSN step at each dtype and per-device batch (ascending)."""
  step_speed = _load_benchmark('step_speed')
  rows = []
  estimate = 0.0  # from the previous configuration
  kind = jax.devices()[0].device_kind
  for dtype in dtypes:
    for batch in args.batches:
      row = dict(backbone=backbone, crop=crop, dtype=dtype, batch=batch)
      if not budget.fits(estimate):
        rows.append(dict(row, status=budget.skip_reason(estimate)))
        continue
      ns = step_arguments(step_speed, backbone, crop, batch, dtype)
      start = time.perf_counter()
      try:
        step = step_speed.prepare_jax(ns, remat=False)
        (measured,) = step_speed.time_steps([step], args.warmup, args.steps)
        del step
      except Exception as e:  # pylint: disable=broad-except
        reason = 'out of device memory' if _is_oom(e) else f'{type(e).__name__}: {e}'
        rows.append(dict(row, status=f'error: {reason}'[:500]))
        gc.collect()
        continue
      finally:
        gc.collect()
      peak = peak_tflops(kind, dtype, peaks)
      mfu = None
      if measured['flops_per_s'] and peak:
        mfu = measured['flops_per_s'] / (peak * 1e12)
      rows.append(
        dict(
          row,
          status='ok',
          devices=measured['devices'],
          compile_s=measured['compile_s'],
          median_s=measured['median_s'],
          min_s=measured['min_s'],
          images_per_s=measured['images_per_s'],
          images_per_s_per_device=measured['images_per_s'] / measured['devices'],
          gflop_per_device=measured['flops'] / 1e9 if measured['flops'] else None,
          tflops_per_s=measured['flops_per_s'] / 1e12 if measured['flops_per_s'] else None,
          peak_tflops=peak,
          mfu=mfu,
          xla_gib=measured['xla_bytes'] / 2**30 if measured['xla_bytes'] else None,
          process_peak_gib=measured['peak_bytes'] / 2**30 if measured['peak_bytes'] else None,
          loss=measured['loss'],
          finite=bool(np.isfinite(measured['loss'])),
        )
      )
      took = time.perf_counter() - start
      # The next batch is larger: about its compile again plus longer steps.
      estimate = 1.2 * took
  return rows


def evaluation(args, dtype: str) -> dict[str, Any]:
  """Evaluation images/s at VOC sizes, with the compile time per shape."""
  from dssn_jax import config_lib, evaluate, models  # pylint: disable=g-import-not-at-top
  from dssn_jax.compilation import CompileCounter  # pylint: disable=g-import-not-at-top
  from dssn_jax.train import initial_variables  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config()
  config.model.backbone = args.backbone
  config.model.dtype = dtype
  config.data.num_classes = 21
  model = models.model_from_config(config)
  variables = initial_variables(config, model, jax.random.key(0), 65)
  rng = np.random.default_rng(0)
  n_dev = jax.local_device_count()
  records = []
  for i in range(args.eval_images * n_dev):
    h, w = args.eval_sizes[i % len(args.eval_sizes)]
    records.append(
      {
        'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        'label': rng.integers(0, 21, (h, w)).astype(np.int32),
        'id': str(i),
      }
    )
  ev = evaluate.Evaluator(model, config, records=records, class_names=[str(i) for i in range(21)])
  with CompileCounter() as counter:
    start = time.perf_counter()
    ev.precompile(variables, background=False, threads=len(args.eval_sizes))
    compile_wall = time.perf_counter() - start
  with CompileCounter() as during:
    start = time.perf_counter()
    ev.confusion_matrices({'teacher': variables})
    wall = time.perf_counter() - start
  return dict(
    status='ok',
    backbone=args.backbone,
    dtype=dtype,
    sizes=[f'{h}x{w}' for h, w in args.eval_sizes],
    images=len(records),
    programs=counter.compiles,
    compile_wall_s=compile_wall,
    compile_s_per_shape=counter.seconds / max(1, counter.compiles),
    compiles_during_eval=during.compiles,
    images_per_s=len(records) / wall,
    images_per_s_per_device=len(records) / wall / n_dev,
  )


def input_pipeline(args, step_s: float | None, per_device_batch: int) -> dict[str, Any]:
  """CPU-seconds of input work per step on this host vs the measured step."""
  try:
    import cv2  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import grain  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import psutil  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return dict(status=f'skipped: {e} (pip install grain opencv-python-headless psutil)')
  from dssn_jax.data.pipeline import available_cores  # pylint: disable=g-import-not-at-top

  data_throughput = _load_benchmark('data_throughput')
  ns = data_throughput.parse_args(
    ['--recipes', 'voc', '--images', str(args.input_images), '--seconds', str(args.input_seconds)]
    + ['--batch', str(per_device_batch), '--step-s', str(step_s or 0.1)]
    + ['--devices', str(jax.local_device_count())]
  )
  cost = data_throughput.step_cost(ns)['voc']
  cores = available_cores()
  host_cpu_s = cost['cpu_s_per_step'] * jax.local_device_count()
  out = dict(
    status='ok',
    recipe='voc, crop 513',
    samples_per_cpu_s=cost['rates'],
    per_device_batch=per_device_batch,
    cpu_s_per_step_per_device=cost['cpu_s_per_step'],
    host_cores=cores,
    measured_step_s=step_s,
  )
  if step_s:
    need = host_cpu_s / step_s
    out.update(cores_needed=need, keeps_up=need <= cores - 1)
  return out


def training_run(args, out_dir: str, dtype: str, timeout_s: float) -> dict[str, Any]:
  """`python main.py --config configs/digits.py` for `--train-steps` steps.

  Runs before this process starts a backend: a GPU process preallocates most
  of the device's memory, and a TPU admits one process at a time. The
  global batch is 8 per device of the child (`n_dev` is read without
  starting a backend: `--train-devices`).
  """
  workdir = os.path.join(out_dir, 'train_run')
  n_dev = args.train_devices
  cmd = [
    sys.executable,
    'main.py',  # run in ROOT
    '--config',
    'configs/digits.py',
    '--workdir',
    workdir,
    f'--config.train.steps={args.train_steps}',
    f'--config.model.backbone={args.train_backbone}',
    f'--config.model.dtype={dtype}',
    f'--config.data.batch_size={8 * n_dev}',
    f'--config.data.digits.num_unlabeled={max(1000, 8 * n_dev * args.train_steps)}',
    f'--config.train.log_every={max(1, min(10, args.train_steps))}',
    f'--config.train.eval_every={args.train_steps}',
    f'--config.data.digits.num_val={args.train_val}',
  ]
  if args.train_backbone != 'resnet_tiny':
    cmd.append('--config.model.width_multiplier=1.0')
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      cmd, capture_output=True, text=True, cwd=ROOT, check=False, timeout=timeout_s
    )
    returncode, stderr = proc.returncode, proc.stderr
  except subprocess.TimeoutExpired as e:
    returncode = None
    stderr = (e.stderr or b'').decode(errors='replace') if isinstance(e.stderr, bytes) else ''
  wall = time.perf_counter() - start
  out = dict(command=' '.join(cmd[1:]), wall_s=wall, returncode=returncode)
  path = os.path.join(workdir, 'metrics.jsonl')
  lines = []
  if os.path.exists(path):
    with open(path) as f:
      lines = [json.loads(line) for line in f if line.strip()]
  train = [r for r in lines if r.get('split') == 'train']
  evals = [r for r in lines if r.get('split') == 'eval']
  losses = [r['loss'] for r in train]
  finite = bool(losses) and all(math.isfinite(x) for x in losses)
  out.update(
    steps=train[-1]['step'] if train else 0,
    losses=losses,
    finite=finite,
    images_per_s_last=train[-1]['images_per_sec'] if train else None,
    input_wait_frac_last=train[-1].get('input_wait_frac') if train else None,
    miou_teacher=evals[-1]['miou_teacher'] if evals else None,
  )
  ok = returncode == 0 and finite and out['steps'] == args.train_steps and bool(evals)
  out['status'] = 'ok' if ok else ('failed' if returncode is not None else 'timed out')
  if not ok:
    out['stderr_tail'] = stderr[-3000:]
  return out


# ----------------------------------------------------------------------------
# Report.


def _f(value, digits=2, scale=1.0, suffix=''):
  if value is None:
    return 'n/a'
  return f'{value / scale:.{digits}f}{suffix}'


def _step_table(rows: list[dict]) -> list[str]:
  lines = [
    '| backbone | crop | dtype | batch/device | compile s | step s | images/s | '
    'images/s/device | TFLOP/s/device | MFU | XLA mem GiB | process peak GiB | status |',
    '|' + '---|' * 13,
  ]
  for r in rows:
    ok = r['status'] == 'ok'
    lines.append(
      f'| {r["backbone"]} | {r["crop"]} | {r["dtype"]} | {r["batch"]} | '
      + (
        f'{_f(r["compile_s"], 1)} | {_f(r["median_s"], 3)} | {_f(r["images_per_s"], 1)} | '
        f'{_f(r["images_per_s_per_device"], 1)} | {_f(r["tflops_per_s"], 1)} | '
        f'{_f(r["mfu"] and 100 * r["mfu"], 1, suffix="%")} | {_f(r["xla_gib"])} | '
        f'{_f(r["process_peak_gib"])} | ok |'
        if ok
        else '| | | | | | | | ' + r['status'] + ' |'
      )
    )
  return lines


def markdown(report: dict[str, Any]) -> str:
  env = report['environment']
  out = [
    '# accelerator_check',
    '',
    f'{env["date"]}; {env["devices"]} x {env["device_kind"]} ({env["platform"]}), '
    f'{env["processes"]} process(es), {env["host_cores"]} host cores; '
    + ', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)
    + f'; XLA_FLAGS={env["xla_flags"]!r}; budget {report["budget_s"]:.0f} s, '
    f'took {report["elapsed_s"]:.0f} s.',
    '',
    '## Train step (DSSN, full iteration)',
    '',
    f'Per-device batch {", ".join(map(str, report["args"]["batches"]))} labeled + as many '
    'unlabeled; '
    f'{report["args"]["steps"]} timed steps after {report["args"]["warmup"]}. MFU: FLOPs from '
    "XLA's cost analysis / step time / the device's peak (float32 against TF32 on NVIDIA); "
    'process peak: device memory high-water mark of the process so far.',
    '',
    *_step_table(report['train_step']),
    '',
    '## DINOv2',
    '',
  ]
  dino = report['dinov2']
  out += _step_table(dino) if isinstance(dino, list) else [dino['status']]
  ev = report['evaluation']
  out += ['', '## Evaluation (exact protocol, one model)', '']
  if ev['status'] == 'ok':
    out.append(
      f'{ev["backbone"]} {ev["dtype"]}, {ev["images"]} images at {", ".join(ev["sizes"])}: '
      f'{ev["images_per_s"]:.2f} images/s ({ev["images_per_s_per_device"]:.2f} per device); '
      f'{ev["programs"]} programs compiled ahead in {ev["compile_wall_s"]:.1f} s '
      f'({ev["compile_s_per_shape"]:.1f} s each), {ev["compiles_during_eval"]} during the '
      'evaluation.'
    )
  else:
    out.append(ev['status'])
  inp = report['input']
  out += ['', '## Input pipeline (this host)', '']
  if inp['status'] == 'ok':
    rates = inp['samples_per_cpu_s']
    out.append(
      f'{inp["recipe"]}: {rates["labeled"]:.0f} labeled / {rates["unlabeled"]:.0f} unlabeled / '
      f'{rates["partner"]:.0f} partner samples per CPU-second; '
      f'{inp["cpu_s_per_step_per_device"]:.3f} CPU-s per step per device '
      f'({inp["per_device_batch"]} + {inp["per_device_batch"]}).'
      + (
        f' At the measured {inp["measured_step_s"]:.3f} s step the host needs '
        f'{inp["cores_needed"]:.1f} cores of {inp["host_cores"]}: '
        + ('keeps up.' if inp['keeps_up'] else '**input-bound**.')
        if inp.get('cores_needed') is not None
        else ''
      )
    )
  else:
    out.append(inp['status'])
  tr = report['training']
  out += ['', '## Training run (`main.py`, generated data)', '']
  if tr['status'] in ('ok', 'failed'):
    out.append(
      f'`python {tr["command"]}`: {tr["status"]}, {tr["steps"]} steps in {tr["wall_s"]:.0f} s '
      f'(compile and evaluation included), losses finite: {tr["finite"]}, first / last loss '
      f'{_f(tr["losses"][0] if tr["losses"] else None, 3)} / '
      f'{_f(tr["losses"][-1] if tr["losses"] else None, 3)}, '
      f'last interval {_f(tr["images_per_s_last"], 1)} images/s, input wait '
      f'{_f(tr["input_wait_frac_last"] and 100 * tr["input_wait_frac_last"], 0, suffix="%")}, '
      f'teacher mIoU {_f(tr["miou_teacher"])}.'
    )
  else:
    out.append(tr['status'])
  return '\n'.join(out) + '\n'


def _sizes(text: str) -> list[tuple[int, int]]:
  out = []
  for part in text.split(','):
    h, w = part.lower().split('x')
    out.append((int(h), int(w)))
  return out


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', required=True, help='directory for the JSON and Markdown report')
  p.add_argument('--budget-s', type=float, default=480.0)
  from dssn_jax.models import registry  # pylint: disable=g-import-not-at-top

  p.add_argument('--backbone', default='resnet101', choices=registry.backbone_names())
  p.add_argument('--crop', type=int, default=513)
  p.add_argument('--batches', default='2,4,8', help='per-device labeled batches')
  p.add_argument('--dtypes', default='bfloat16,float32')
  p.add_argument('--steps', type=int, default=10, help='timed steps per configuration')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--peak-tflops', default='', help="X, or 'bfloat16=X,float32=Y'")
  p.add_argument('--dinov2-crop', type=int, default=518)
  p.add_argument(
    '--dinov2-backbones',
    default='',
    help="comma-separated dinov2_* / dinov3_* backbones ('': every DINOv2 one; 'none': skip)",
  )
  p.add_argument('--eval-sizes', default='375x500,500x375,500x500')
  p.add_argument('--eval-images', type=int, default=6, help='per device')
  p.add_argument('--input-images', type=int, default=16)
  p.add_argument('--input-seconds', type=float, default=3.0)
  p.add_argument('--train-steps', type=int, default=100)
  p.add_argument('--train-backbone', default='resnet101', choices=registry.backbone_names())
  p.add_argument('--train-val', type=int, default=100, help='validation scenes of the run')
  p.add_argument('--train-timeout-s', type=float, default=240.0)
  p.add_argument(
    '--train-devices', type=int, default=0, help='devices the run sees (default: from jax)'
  )
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(',')]
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  for d in args.dtypes:
    if d not in ('bfloat16', 'float32'):
      p.error(f'--dtypes: {d!r} is not bfloat16 or float32')
  args.eval_sizes = _sizes(args.eval_sizes)
  if args.dinov2_backbones == 'none':
    args.dinov2_backbones = []
  elif not args.dinov2_backbones:
    args.dinov2_backbones = dinov2_backbones()
  else:
    args.dinov2_backbones = args.dinov2_backbones.split(',')
    for name in args.dinov2_backbones:
      if name not in registry.backbone_names() or registry.family_of(name).patch is None:
        p.error(f'--dinov2-backbones: {name!r} is not a ViT backbone of dssn_jax.models')
  # --dinov2-crop rounded to each backbone's patch, as the recipes do (DINOv3: 518 -> 512).
  patches = {name: registry.family_of(name).patch for name in args.dinov2_backbones}
  args.dinov2_crops = {n: p * max(1, round(args.dinov2_crop / p)) for n, p in patches.items()}
  args.peaks = parse_peak(args.peak_tflops)
  return args


def _device_count_in_child() -> int:
  """jax.device_count() from a short child process (this one keeps no backend)."""
  out = subprocess.run(
    [sys.executable, '-c', 'import jax; print(jax.device_count())'],
    capture_output=True,
    text=True,
    check=True,
  )
  return int(out.stdout.strip().splitlines()[-1])


def _section(fn, *a) -> dict[str, Any]:
  try:
    return fn(*a)
  except Exception as e:  # pylint: disable=broad-except
    return dict(status=f'error: {type(e).__name__}: {e}'[:800], traceback=traceback.format_exc())


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  budget = Budget(args.budget_s)
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  report: dict[str, Any] = dict(
    args={k: v for k, v in vars(args).items() if k != 'peaks'}, budget_s=args.budget_s
  )
  first = args.dtypes[0]
  rest = args.dtypes[1:]
  if args.train_steps > 0:  # first: a child process needs the devices to itself
    if not args.train_devices:
      args.train_devices = _device_count_in_child()
    timeout = min(args.train_timeout_s, budget.left())
    report['training'] = _section(training_run, args, args.out, first, timeout)
  else:
    report['training'] = dict(status='skipped: --train-steps 0')
  print(f'# training: {report["training"]["status"]}', flush=True)

  from dssn_jax import compilation, config_lib  # pylint: disable=g-import-not-at-top

  compilation.enable_persistent_cache(config_lib.base_config().train.compilation_cache_dir)
  report['environment'] = environment()
  print(f'# {report["environment"]}', flush=True)

  steps = train_steps(args, args.backbone, args.crop, [first], budget, args.peaks)
  print(f'# train step {first}: {steps}', flush=True)
  ok = [r for r in steps if r['status'] == 'ok']

  estimate = (ok[0]['compile_s'] / 2 * len(args.eval_sizes) + 10.0) if ok else 60.0
  if budget.fits(estimate):
    report['evaluation'] = _section(evaluation, args, first)
  else:
    report['evaluation'] = dict(status=budget.skip_reason(estimate))
  print(f'# evaluation: {report["evaluation"]["status"]}', flush=True)

  estimate = 3 * args.input_seconds + 20.0
  best = max(ok, key=lambda r: r['images_per_s']) if ok else None
  if budget.fits(estimate):
    report['input'] = _section(
      input_pipeline,
      args,
      best['median_s'] if best else None,
      best['batch'] if best else args.batches[-1],
    )
  else:
    report['input'] = dict(status=budget.skip_reason(estimate))
  print(f'# input: {report["input"]["status"]}', flush=True)

  if rest:
    steps += train_steps(args, args.backbone, args.crop, rest, budget, args.peaks)
  report['train_step'] = steps

  names = args.dinov2_backbones
  if not names:
    report['dinov2'] = dict(status='skipped: --dinov2-backbones none')
  else:
    report['dinov2'] = []
    for name in names:
      crop = args.dinov2_crops[name]
      report['dinov2'] += train_steps(args, name, crop, [first], budget, args.peaks)
  report['elapsed_s'] = budget.elapsed()

  with open(os.path.join(args.out, 'accelerator_check.json'), 'w') as f:
    json.dump(report, f, indent=1, default=str)
  text = markdown(report)
  with open(os.path.join(args.out, 'accelerator_check.md'), 'w') as f:
    f.write(text)
  print(text, flush=True)
  return report


if __name__ == '__main__':
  main()
