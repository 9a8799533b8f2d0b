r"""Speed of one training iteration: compile time, step time, memory, FLOP/s.

    python benchmarks/step_speed.py --backbone resnet50 --crop 161 --batch 2
    python benchmarks/step_speed.py --backbone resnet101 --crop 513 --batch 4 \
        --dtype bfloat16 --peak-tflops 989        # H100 SXM dense bf16 peak
    python benchmarks/step_speed.py --compare-remat     # with and without remat
    python benchmarks/step_speed.py --torch             # also the PyTorch step
    python benchmarks/step_speed.py --against ../old_checkout --rounds 2   # this code vs another
    python benchmarks/step_speed.py --backbone dinov2_small --crop 98 --method unimatch_v2 --torch
    python benchmarks/step_speed.py --backbone dinov2_small --crop 126 --method supervised
    python benchmarks/step_speed.py --backbone dinov3_small --crop 96 --method unimatch_v2 --torch
    python benchmarks/step_speed.py --backbone dinov2_base --crop 518 --batch 4 \
        --method unimatch --levers     # XLA memory of float32 / bf16 / remat / frozen

Builds the full `train_step` of `--method` (default DSSN: two teacher
forwards, the student forward with two perturbed decoder copies, the student
forward on the strong views, backward, SGD, EMA; the first epoch's program,
whose teacher uses batch statistics) for a random-init model,
compiles it over every visible device (global batch = `--batch` labeled +
`--batch` unlabeled images per device) and runs it on a synthetic batch in
the docs/design.md layout. It reports

- `compile_s`: lowering plus XLA compilation of the step;
- `median_s`, `min_s`: median and fastest wall time of `--steps` steps
  after `--warmup` steps, each step waited for;
- `cpu_s`: median CPU seconds this process spent per step (all threads;
  spin-waiting threads and busy sibling hyperthreads inflate it);
- `images/s`: labeled plus unlabeled images of the global batch per second;
- `peak_mem`: `device.memory_stats()['peak_bytes_in_use']` of device 0 where
  the backend keeps it (GPU, TPU); 'n/a' on CPU;
- `xla_mem`: XLA's own estimate for the compiled step on one device,
  arguments + temporaries + outputs - donated (aliased) outputs: what the
  step needs at its peak, available on every backend; `xla_temp`: the
  temporaries alone (activations kept for the backward pass live here, so
  this is what `--remat` shrinks);
- `GFLOP`, `TFLOP/s`, `%peak`: FLOPs of one step on one device from XLA's
  cost analysis of the compiled program, divided by `median_s`, and that
  rate's fraction of `--peak-tflops`.

The backbones are those of `dssn_jax.models.registry` (ResNet + DeepLabV3+,
DINOv2 + DPT, DINOv3 + DPT). `--freeze-backbone` sets `config.train.freeze_backbone`
(no gradient, no optimizer state for the encoder). `--levers` only compiles
(nothing runs: the sizes of interest do not run on a CPU) the step five
times, float32, bfloat16, float32 with remat, float32 with a frozen
backbone and bfloat16 with the query-chunked attention (`--attention
chunked`, the TPU side of `precision=bf16`), and prints XLA's memory
estimate of each; `--compile-only` does
that for the one configuration given.

`--compare-remat` runs the step without and with `config.train.remat`, each
in its own process so the device's peak memory belongs to one program. (On
XLA:CPU remat saves nothing: the CPU compiler drops the optimization
barriers and common-subexpression elimination merges the recomputation back
into the forward pass; compare on a GPU or TPU.)
`--against CHECKOUT` times the same step from another checkout of dssn_jax
(say a `git worktree` of the commit before a change): `--rounds` processes
per checkout, alternating this one and that one, so that both see the
machine's load of the same minutes; one table row per process.
`--torch` also times the same iteration written in plain PyTorch, float32
or bf16 autocast, on the CPU or the first CUDA device, one JAX step and one
PyTorch step in turn (so both see the same background load), and prints
the JAX / PyTorch ratio. Two iterations have a PyTorch rendering
(`TORCH_STEPS`): `dssn` on a ResNet (the deep-stem DeepLabV3+ of
`dssn_jax/testing/torch_reference.py`, the same loss terms,
`torch.optim.SGD`, EMA teacher) and `unimatch_v2` on a DINOv2 (the DPT of
`dssn_jax/testing/torch_dinov2_reference.py`, the authors' loop body,
AdamW, their EMA ramp) or on a DINOv3 (transformers' `DINOv3ViTModel`
under the same DPT head, `dssn_jax/testing/torch_dinov3_reference.py`).

The last line is machine-readable:

    step_speed: backbone=B crop=C batch=N dtype=D median_s=S images_per_s=I ...

The script applies `main.py`'s default XLA:CPU flags
(`dssn_jax.xla_flags`) so that it measures the program `main.py` runs; an
`XLA_FLAGS` of your own that sets the same option wins. The table header
prints the flags, the device and the load average (on a shared CPU, timings
move with the load).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

# pylint: disable=g-import-not-at-top,wrong-import-position
from dssn_jax import xla_flags

xla_flags.set_default_cpu_flags()  # the program main.py runs

import jax

from dssn_jax import config_lib, methods, models, optim, parallel
from dssn_jax import train_step as ts_lib
from dssn_jax.models import attention, registry
from dssn_jax.models.resnet import BACKBONES
from dssn_jax.normalize import IMAGENET_MEAN, IMAGENET_STD
from dssn_jax.testing import batches
from dssn_jax.train import initial_variables

# pylint: enable=g-import-not-at-top,wrong-import-position

METHODS = methods.names()  # the method registry
JSON_PREFIX = 'step_speed_json: '
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--backbone', default='resnet50', choices=registry.backbone_names())
  p.add_argument('--crop', type=int, default=161, help='square crop side')
  p.add_argument(
    '--batch',
    type=int,
    default=2,
    help='labeled images per device; the unlabeled batch is the same',
  )
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument(
    '--attention',
    default='xla',
    choices=attention.IMPLEMENTATIONS,
    help='ViT attention (config.model.attention; auto: the device\'s choice)',
  )
  p.add_argument('--method', default='dssn', choices=METHODS)
  p.add_argument(
    '--grad-accum',
    type=int,
    default=1,
    help='micro-batches per step (config.train.grad_accum; models without BatchNorm)',
  )
  p.add_argument('--num-classes', type=int, default=21)
  p.add_argument('--steps', type=int, default=10, help='timed steps')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  p.add_argument(
    '--peak-tflops',
    type=float,
    default=None,
    help='peak TFLOP/s of one device, for the %%peak column',
  )
  p.add_argument('--remat', action='store_true', help='config.train.remat=True')
  p.add_argument(
    '--compare-remat', action='store_true', help='run without and with remat (one process each)'
  )
  p.add_argument('--freeze-backbone', action='store_true', help='config.train.freeze_backbone=True')
  p.add_argument(
    '--compile-only', action='store_true', help='compile and report memory; run nothing'
  )
  p.add_argument(
    '--levers',
    action='store_true',
    help='compile only: float32, bfloat16, remat, frozen backbone, bf16 + chunked attention',
  )
  p.add_argument('--torch', action='store_true', help='also time the PyTorch step')
  p.add_argument('--torch-only', action='store_true', help='time only the PyTorch step')
  p.add_argument(
    '--torch-threads',
    type=int,
    default=0,
    help='torch CPU threads (0: every CPU this process may use)',
  )
  p.add_argument(
    '--against',
    default=None,
    metavar='CHECKOUT',
    help='also time the same step from another checkout of dssn_jax (a git worktree), '
    'alternating processes with this one',
  )
  p.add_argument('--rounds', type=int, default=2, help='--against: processes per checkout')
  p.add_argument('--json', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.against and not os.path.isfile(os.path.join(args.against, 'benchmarks', 'step_speed.py')):
    p.error(f'--against {args.against!r}: no benchmarks/step_speed.py there')
  if args.against and (args.compare_remat or args.torch or args.torch_only or args.rounds < 1):
    p.error('--against times one setting per checkout: leave out --compare-remat and --torch')
  for name in ('crop', 'batch', 'steps', 'num_classes'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")}={getattr(args, name)} must be positive')
  if args.warmup < 0:
    p.error(f'--warmup={args.warmup} must be >= 0')
  if args.compare_remat and args.remat:
    p.error('--compare-remat runs both settings; leave out --remat')
  if args.torch or args.torch_only:
    family = registry.family_of(args.backbone).name
    if (args.method, family) not in TORCH_STEPS:
      pairs = ', '.join(f'--method {m} with a {f} backbone' for m, f in TORCH_STEPS)
      p.error(
        f'no PyTorch step for --method {args.method} on {args.backbone} ({family}); '
        f'there is one for {pairs}'
      )
    if args.grad_accum != 1:
      p.error('the PyTorch step has no gradient accumulation; leave out --grad-accum')
  if args.levers and (args.remat or args.freeze_backbone or args.compare_remat):
    p.error('--levers builds every setting; leave out --remat, --freeze-backbone, --compare-remat')
  return args


def images_per_step(global_batch: int, method: str) -> int:
  """Labeled + unlabeled images one iteration consumes."""
  return global_batch * (1 if method == 'supervised' else 2)


def make_config(args: argparse.Namespace, remat: bool):
  """The experiment config of the measured step (base config + flags;
  `unimatch_v2`: with its authors' optimizer, AdamW)."""
  config = config_lib.base_config()
  config.method = args.method
  if args.method == 'unimatch_v2':
    config_lib.apply_unimatch_v2_recipe(config)
  config.model.backbone = args.backbone
  config.model.dtype = args.dtype
  config.model.attention = args.attention
  config.data.num_classes = args.num_classes
  config.data.crop_size = args.crop
  config.train.remat = bool(remat)
  config.train.freeze_backbone = bool(args.freeze_backbone)
  config.train.grad_accum = args.grad_accum
  config.train.steps = 100_000  # a long schedule: lr stays ~constant
  return config


class Step:
  """One prepared training step: `run()` executes and waits for it.

  Attributes:
    run: runs one step to completion (state carried inside).
    info: the row's fixed fields (impl, sizes, compile time, FLOPs, ...).
    loss: the latest step's loss (host float).
  """

  def __init__(self, run, info: dict[str, Any]):
    self.run = run
    self.info = info
    self.loss = None


def time_steps(steps: list[Step], warmup: int, count: int) -> list[dict[str, Any]]:
  """Times the prepared steps, interleaved: one step of each in turn.

  Interleaving puts the implementations under the same background load (on
  a shared CPU the load drifts over minutes). Returns one row per step:
  `info` plus median, min and process-CPU seconds per step and images/s.
  """
  for _ in range(warmup):
    for step in steps:
      step.run()
  wall = [[] for _ in steps]
  cpu = [[] for _ in steps]
  for _ in range(count):
    for i, step in enumerate(steps):
      start, start_cpu = time.perf_counter(), time.process_time()
      step.run()
      wall[i].append(time.perf_counter() - start)
      cpu[i].append(time.process_time() - start_cpu)
  rows = []
  for step, w, c in zip(steps, wall, cpu):
    info = dict(step.info)
    median_s = statistics.median(w)
    flops = info.get('flops')
    rows.append(
      dict(
        info,
        median_s=median_s,
        min_s=min(w),
        cpu_s=statistics.median(c),
        images_per_s=info['images'] / median_s,
        flops_per_s=flops / median_s if flops else None,
        loss=step.loss,
      )
    )
  return rows


def _base_info(
  args: argparse.Namespace, impl: str, remat: bool, devices: int, device: str
) -> dict[str, Any]:
  return dict(
    impl=impl,
    backbone=args.backbone,
    crop=args.crop,
    batch=args.batch,
    dtype=args.dtype,
    attention=args.attention,
    method=args.method,
    remat=bool(remat),
    frozen=bool(args.freeze_backbone),
    devices=devices,
    device=device,
    images=images_per_step(args.batch * devices, args.method),
    compile_s=None,
    peak_bytes=None,
    xla_bytes=None,
    xla_temp_bytes=None,
    flops=None,
  )


def prepare_jax(args: argparse.Namespace, remat: bool) -> Step:
  """Builds and compiles the jitted train step on every visible device."""
  config = make_config(args, remat)
  mesh = parallel.make_mesh()
  n_dev = jax.device_count()
  global_batch = args.batch * n_dev
  config.data.batch_size = global_batch
  settings = config_lib.resolve(config)
  schedule = settings.schedule(1000 * global_batch)
  model = models.model_from_config(config)
  tx = optim.make_optimizer(schedule, config)
  # Params do not depend on the image size: initialize on a small one.
  init_size = min(args.crop, registry.family_of(args.backbone).init_size)
  variables = initial_variables(config, model, jax.random.key(0), init_size)
  state = ts_lib.create_train_state(model, tx, jax.random.key(0), args.crop, variables=variables)
  state = parallel.replicate(state, mesh)
  local = batches.synthetic_batch(
    args.batch * jax.local_device_count(),
    args.crop,
    args.num_classes,
    supervised=args.method == 'supervised',
    seed=jax.process_index(),
  )
  batch = parallel.shard_batch(local, mesh)
  step_fn = ts_lib.make_train_step(
    model, tx, settings, schedule, mesh, ema_decay=config.train.ema_decay
  )
  rng = jax.random.key(1)

  start = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start

  device = jax.devices()[0]
  info = _base_info(args, 'jax', remat, n_dev, f'{device.platform}:{device.device_kind}')
  info['compile_s'] = compile_s
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if cost and cost.get('flops', 0) > 0:
    info['flops'] = float(cost['flops'])
  mem = compiled.memory_analysis()
  if mem is not None:
    info['xla_bytes'] = (
      mem.argument_size_in_bytes
      + mem.temp_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
    )
    info['xla_temp_bytes'] = mem.temp_size_in_bytes
  carry = {'state': state, 'step': 0}

  def run():
    key = jax.random.fold_in(rng, carry['step'])
    carry['state'], metrics = compiled(carry['state'], batch, key)
    jax.block_until_ready((carry['state'], metrics))
    carry['step'] += 1
    step.loss = float(metrics['loss'])
    # The process-wide peak since start (this process runs one jax step).
    stats = jax.local_devices()[0].memory_stats() or {}
    step.info['peak_bytes'] = stats.get('peak_bytes_in_use')

  step = Step(run, info)
  return step


# ----------------------------------------------------------------------------
# The same iteration in plain PyTorch (NCHW), for the CPU comparison.


def _torch_model(backbone: str, num_classes: int):
  """`dssn_jax.testing.torch_reference.DeepLabV3Plus` with our backbone's sizes."""
  from dssn_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top

  blocks, widths, stem = BACKBONES[backbone]
  head = models.HEAD_WIDTHS[backbone]
  return torch_reference.DeepLabV3Plus(
    num_classes,
    blocks=blocks,
    widths=widths,
    stem=stem,
    aspp=head['aspp_features'],
    low=head['low_level_features'],
    decoder=head['decoder_features'],
  )


def _torch_forward(net, x, perturb: int = 0, dropout: float = 0.5):
  """Logits of the clean copy and of `perturb` channel-dropped decoder copies."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  c1, c4 = net.backbone(x)
  if perturb:
    c1 = torch.cat([c1] + [F.dropout2d(c1, dropout, True) for _ in range(perturb)])
    c4 = torch.cat([c4] + [F.dropout2d(c4, dropout, True) for _ in range(perturb)])
  a = F.interpolate(net.head(c4), c1.shape[-2:], mode='bilinear', align_corners=True)
  f = net.fuse(torch.cat([net.reduce(c1), a], 1))
  out = F.interpolate(net.classifier(f), x.shape[-2:], mode='bilinear', align_corners=True).float()
  return out.chunk(1 + perturb)


def _torch_cplg(logits, high=0.92, scale=0.96):
  """Class-aware mask (spec CPLG) of `(N, C, H, W)` logits -> bool `(N, H, W)`."""
  import torch  # pylint: disable=g-import-not-at-top

  conf = logits.softmax(1)
  best = conf.flatten(2).amax(2)[:, :, None, None]
  thresh = torch.where(best > high, best * scale, best)
  return (conf > thresh).any(1)


def _torch_pl_ce(logits, labels, mask, valid):
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  ce = F.cross_entropy(logits, labels, reduction='none')
  return (ce * (mask & valid)).sum() / valid.sum().clamp(min=1)


def _torch_align(a, b):
  z = lambda p: (p - p.mean(1, keepdim=True)) / p.std(1, keepdim=True)
  return ((z(a) - z(b)) ** 2).mean()


class _TorchEnv:
  """What the PyTorch steps share: threads, device, the synthetic batch as
  tensors (NCHW images, long label maps), normalization, autocast, and the
  end of a step (sync, loss, peak memory)."""

  def __init__(self, args: argparse.Namespace):
    import torch  # pylint: disable=g-import-not-at-top

    self.threads = args.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(self.threads)
    self.device = device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    self.batch = {}
    for k, v in batches.synthetic_batch(
      args.batch, args.crop, args.num_classes, supervised=False
    ).items():
      t = torch.from_numpy(v).to(device)
      self.batch[k] = t.permute(0, 3, 1, 2).contiguous() if v.ndim == 4 else t
    for k in ('y', 'u_ignore', 'm_ignore'):
      self.batch[k] = self.batch[k].long()
    self.autocast = torch.autocast(
      device.type, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16'
    )

  def norm(self, u8):
    return (u8.float() / 255.0 - self._mean) / self._std

  def finish(self, step: Step, loss) -> None:
    import torch  # pylint: disable=g-import-not-at-top

    if self.device.type == 'cuda':
      torch.cuda.synchronize()
      step.info['peak_bytes'] = torch.cuda.max_memory_allocated()
    step.loss = float(loss.detach())

  def step(self, args: argparse.Namespace, run) -> Step:
    import torch  # pylint: disable=g-import-not-at-top

    cuda = self.device.type == 'cuda'
    name = torch.cuda.get_device_name() if cuda else f'{self.threads} threads'
    return Step(run, _base_info(args, 'torch', False, 1, f'{self.device.type}:{name}'))


def prepare_torch(args: argparse.Namespace) -> Step:
  """The DSSN iteration in PyTorch, on the first CUDA device or the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  env = _TorchEnv(args)
  device, b, norm = env.device, env.batch, env.norm
  student = _torch_model(args.backbone, args.num_classes).to(device).train()
  teacher = copy.deepcopy(student).train()
  for p in teacher.parameters():
    p.requires_grad_(False)
  head = [p for n, p in student.named_parameters() if not n.startswith('backbone.')]
  body = [p for n, p in student.named_parameters() if n.startswith('backbone.')]
  lr = 0.002
  opt = torch.optim.SGD(
    [{'params': body, 'lr': lr}, {'params': head, 'lr': lr * 10}],
    lr=lr,
    momentum=0.9,
    weight_decay=1e-4,
  )

  def run():
    with env.autocast:
      x, u_w = norm(b['x']), norm(b['u_w'])
      with torch.no_grad():
        t_m = _torch_forward(teacher, norm(b['m_w']))[0]
      u_s1 = norm(torch.where(b['box1'][:, None], b['m_s1'], b['u_s1']))
      u_s2 = norm(torch.where(b['box2'][:, None], b['m_s2'], b['u_s2']))
      n = x.shape[0]
      clean, fp1, fp2 = _torch_forward(student, torch.cat([x, u_w]), perturb=2)
      p_x, p_w = clean[:n], clean[n:].detach()
      fp1, fp2 = fp1[n:], fp2[n:]
      p_s1, p_s2 = _torch_forward(student, torch.cat([u_s1, u_s2]))[0].chunk(2)
      with torch.no_grad():
        t_w = _torch_forward(teacher, u_w)[0]
      valid_w = b['u_ignore'] != 255
      loss_x = F.cross_entropy(p_x, b['y'], ignore_index=255)
      labels_w, mask_w = p_w.argmax(1), _torch_cplg(p_w)
      strong = []
      for box, p_s in ((b['box1'], p_s1), (b['box2'], p_s2)):
        t_k = torch.where(box[:, None], t_m, t_w)
        valid_k = torch.where(box, b['m_ignore'], b['u_ignore']) != 255
        strong.append(_torch_pl_ce(p_s, t_k.argmax(1), _torch_cplg(t_k), valid_k))
      fps = [_torch_pl_ce(p, labels_w, mask_w, valid_w) for p in (fp1, fp2)]
      loss = 0.5 * (
        loss_x
        + 0.25 * (sum(strong) + sum(fps))
        + 0.01 * (_torch_align(p_s1, p_s2) + _torch_align(fp1, fp2))
      )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      keep = 0.996
      for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(keep).add_(s.detach(), alpha=1 - keep)
      for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
          t.mul_(keep).add_(s, alpha=1 - keep)
    env.finish(step, loss)

  step = env.step(args, run)
  return step


def _torch_dpt(backbone: str, num_classes: int):
  """`(module, tapped width)`: the PyTorch DPT of `backbone`'s family with
  random weights: DINOv2 `torch_dinov2_reference.DPT` (the authors' sizes),
  DINOv3 `torch_dinov3_reference.DPT` (transformers' `DINOv3ViTModel`, no
  RoPE rescale, as `config.model.rope_rescale`'s default)."""
  from dssn_jax.models import dinov2, dpt  # pylint: disable=g-import-not-at-top
  from dssn_jax.testing import torch_dinov2_reference  # pylint: disable=g-import-not-at-top

  if registry.family_of(backbone).name == 'dinov3':
    from dssn_jax.models import dinov3  # pylint: disable=g-import-not-at-top
    from dssn_jax.testing import torch_dinov3_reference  # pylint: disable=g-import-not-at-top

    student = torch_dinov3_reference.DPT(backbone, num_classes)
    torch_dinov3_reference.randomize(student.backbone)
    torch_dinov2_reference.randomize(student.head)
    return student, dinov3.ENCODERS[backbone].dim
  enc, head = dinov2.ENCODERS[backbone], dpt.HEAD_SIZES[backbone]
  student = torch_dinov2_reference.DPT(
    num_classes,
    enc.dim,
    enc.depth,
    enc.heads,
    enc.taps,
    head['features'],
    head['out_channels'],
    swiglu=enc.ffn == 'swiglu',
  )
  return torch_dinov2_reference.randomize(student), enc.dim


def prepare_torch_unimatch_v2(args: argparse.Namespace) -> Step:
  """UniMatch V2's iteration in PyTorch on the DINOv2 + DPT of
  `dssn_jax/testing/torch_dinov2_reference.py` or the DINOv3 + DPT of
  `dssn_jax/testing/torch_dinov3_reference.py` (the sizes of
  `--backbone`): EMA teacher on `u_w`, cutmix with the batch reversed,
  complementary dropout of the strong views' tapped features, threshold
  0.95, AdamW (encoder 5e-6, head x40, weight decay 0.01), EMA keep rate
  `min(1 - 1/(it + 1), 0.996)`. On the first CUDA device or the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  env = _TorchEnv(args)
  device, b, norm = env.device, env.batch, env.norm
  student, dim = _torch_dpt(args.backbone, args.num_classes)
  student = student.to(device).train()
  teacher = copy.deepcopy(student).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  config = make_config(args, False)
  lr = config.train.lr
  body = [p for n, p in student.named_parameters() if n.startswith('backbone.')]
  rest = [p for n, p in student.named_parameters() if not n.startswith('backbone.')]
  opt = torch.optim.AdamW(
    [{'params': body, 'lr': lr}, {'params': rest, 'lr': lr * config.train.lr_multi}],
    lr=lr,
    betas=(0.9, 0.999),
    weight_decay=config.train.weight_decay,
  )
  carry = {'it': 0}

  def comp_masks(n):  # the authors' pairs (m, 2 - m), half of the pairs undropped
    m1 = torch.bernoulli(torch.full((n, dim), 0.5, device=device)) * 2.0
    kept = torch.randperm(n, device=device)[: int(n * 0.5)]
    m1[kept] = 1.0
    return torch.cat([m1, 2.0 - m1])

  def run():
    with env.autocast:
      with torch.no_grad():
        pred_w = teacher(norm(b['u_w'])).float()
        conf_w, mask_w = pred_w.softmax(1).max(1)
      n = b['x'].shape[0]
      strong = []
      for box, view in ((b['box1'], b['u_s1']), (b['box2'], b['u_s2'])):
        strong.append(norm(torch.where(box[:, None], view.flip(0), view)))
      pred_x = student(norm(b['x'])).float()
      pred_s = student(torch.cat(strong), comp_masks(n)).float().chunk(2)
      loss_x = F.cross_entropy(pred_x, b['y'], ignore_index=255)
      losses = []
      for box, p_s in zip((b['box1'], b['box2']), pred_s):
        pick = lambda t, box=box: torch.where(box, t.flip(0), t)
        valid = pick(b['u_ignore']) != 255
        ce = F.cross_entropy(p_s, pick(mask_w), reduction='none')
        losses.append((ce * ((pick(conf_w) >= 0.95) & valid)).sum() / valid.sum().clamp(min=1))
      loss = (loss_x + (losses[0] + losses[1]) / 2.0) / 2.0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      keep = min(1.0 - 1.0 / (carry['it'] + 1), config.train.ema_decay)
      for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(keep).add_(s.detach(), alpha=1 - keep)
    carry['it'] += 1
    env.finish(step, loss)

  step = env.step(args, run)
  return step


# (method, backbone family) -> the PyTorch rendering of that iteration.
TORCH_STEPS = {
  ('dssn', 'resnet'): prepare_torch,
  ('unimatch_v2', 'dinov2'): prepare_torch_unimatch_v2,
  ('unimatch_v2', 'dinov3'): prepare_torch_unimatch_v2,
}


def prepare_torch_step(args: argparse.Namespace) -> Step:
  return TORCH_STEPS[(args.method, registry.family_of(args.backbone).name)](args)


# ----------------------------------------------------------------------------
# Output.


def _fmt(value, scale=1.0, digits=2, unit=''):
  if value is None:
    return 'n/a'
  return f'{value / scale:.{digits}f}{unit}'


def format_table(rows: list[dict[str, Any]], peak_tflops: float | None) -> str:
  """The rows as an aligned text table (one line per measured step)."""
  head = (
    'impl',
    'remat',
    'frozen',
    'dtype',
    'attention',
    'batch',
    'compile_s',
    'median_s',
    'min_s',
    'cpu_s',
    'images/s',
    'peak_mem',
    'xla_mem',
    'xla_temp',
    'GFLOP',
    'TFLOP/s',
    '%peak',
  )
  lines = [head]
  for r in rows:
    frac = None
    if r['flops_per_s'] and peak_tflops:
      frac = 100.0 * r['flops_per_s'] / (peak_tflops * 1e12)
    lines.append(
      (
        r['impl'],
        'yes' if r['remat'] else 'no',
        'yes' if r.get('frozen') else 'no',
        r['dtype'],
        r.get('attention', 'xla'),
        f'{r["batch"]}x{r["devices"]}',
        _fmt(r['compile_s'], digits=1),
        _fmt(r['median_s'], digits=3),
        _fmt(r['min_s'], digits=3),
        _fmt(r['cpu_s'], digits=2),
        _fmt(r['images_per_s'], digits=2),
        _fmt(r['peak_bytes'], 2**30, 2, ' GiB'),
        _fmt(r['xla_bytes'], 2**30, 2, ' GiB'),
        _fmt(r['xla_temp_bytes'], 2**30, 2, ' GiB'),
        _fmt(r['flops'], 1e9, 1),
        _fmt(r['flops_per_s'], 1e12, 3),
        _fmt(frac, digits=1),
      )
    )
  widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
  return '\n'.join('  '.join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines)


def machine_line(r: dict[str, Any]) -> str:
  return (
    f'step_speed: backbone={r["backbone"]} crop={r["crop"]} batch={r["batch"]} '
    f'dtype={r["dtype"]} median_s={r["median_s"]:.4f} '
    f'images_per_s={r["images_per_s"]:.3f} impl={r["impl"]} method={r["method"]} '
    f'remat={int(r["remat"])} devices={r["devices"]}'
  )


def _child(args: argparse.Namespace, remat: bool, checkout: str | None = None) -> dict[str, Any]:
  """Runs one jax measurement in a fresh process and returns its row;
  `checkout`: with that checkout's step_speed.py and dssn_jax."""
  script = os.path.abspath(__file__)
  env = None
  if checkout:
    script = os.path.join(os.path.abspath(checkout), 'benchmarks', 'step_speed.py')
    path = os.pathsep.join([os.path.abspath(checkout), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, PYTHONPATH=path.rstrip(os.pathsep))
  argv = (
    [
      sys.executable,
      script,
      '--json',
      '--backbone',
      args.backbone,
      '--crop',
      str(args.crop),
      '--batch',
      str(args.batch),
      '--dtype',
      args.dtype,
      '--method',
      args.method,
      '--num-classes',
      str(args.num_classes),
      '--steps',
      str(args.steps),
      '--warmup',
      str(args.warmup),
    ]
    + (['--remat'] if remat else [])
    + (['--freeze-backbone'] if args.freeze_backbone else [])
    + (['--attention', args.attention] if args.attention != 'xla' else [])
  )
  proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
  rows = [
    json.loads(line[len(JSON_PREFIX) :])
    for line in proc.stdout.splitlines()
    if line.startswith(JSON_PREFIX)
  ]
  if proc.returncode or not rows:
    raise RuntimeError(
      f'step_speed child (remat={remat}) failed with code {proc.returncode}:\n{proc.stderr[-4000:]}'
    )
  return rows[-1]


def memory_line(r: dict[str, Any]) -> str:
  return (
    f'step_speed_mem: backbone={r["backbone"]} crop={r["crop"]} batch={r["batch"]} '
    f'dtype={r["dtype"]} remat={int(r["remat"])} frozen={int(r["frozen"])} '
    f'method={r["method"]} xla_mem_gib={_fmt(r["xla_bytes"], 2**30, 3)} '
    f'xla_temp_gib={_fmt(r["xla_temp_bytes"], 2**30, 3)} compile_s={r["compile_s"]:.1f}'
  )


LEVERS = (
  ('float32', dict(dtype='float32', remat=False, freeze_backbone=False)),
  ('bfloat16', dict(dtype='bfloat16', remat=False, freeze_backbone=False)),
  ('remat', dict(dtype='float32', remat=True, freeze_backbone=False)),
  ('frozen', dict(dtype='float32', remat=False, freeze_backbone=True)),
  # The TPU side of `precision=bf16` (on a CPU `auto` is XLA's attention).
  ('bf16 chunked', dict(dtype='bfloat16', remat=False, freeze_backbone=False, attention='chunked')),
)


def compile_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Compile-only rows (`--levers`: one per lever; else the given setting)."""
  settings = LEVERS if args.levers else (('given', {}),)
  rows = []
  for _, change in settings:
    a = copy.copy(args)
    for k, v in change.items():
      setattr(a, k, v)
    info = prepare_jax(a, a.remat).info
    rows.append(
      dict(info, median_s=None, min_s=None, cpu_s=None, images_per_s=None, flops_per_s=None)
    )
    print(memory_line(rows[-1]), flush=True)  # as each compile ends
  return rows


def main(argv=None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  if args.levers or args.compile_only:
    load_before = os.getloadavg()
    rows = compile_rows(args)
    print(
      f'# {args.method} step compiled (not run): {args.backbone}, crop {args.crop}, '
      f'{args.batch} labeled + {0 if args.method == "supervised" else args.batch} unlabeled'
      f' per device; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}'
    )
    print(format_table(rows, args.peak_tflops))
    return rows
  if args.json:  # a --compare-remat child: one row as JSON
    rows = time_steps([prepare_jax(args, args.remat)], args.warmup, args.steps)
    print(JSON_PREFIX + json.dumps(rows[0]), flush=True)
    return rows
  load_before = os.getloadavg()
  rows, steps = [], []
  if args.against:  # one process per checkout and round, alternating
    for r in range(args.rounds):
      for checkout in (None, args.against):
        row = _child(args, args.remat, checkout)
        row['impl'] = f'jax {os.path.basename(os.path.abspath(checkout or _REPO))} #{r + 1}'
        rows.append(row)
  elif args.compare_remat and not args.torch_only:
    rows += [_child(args, False), _child(args, True)]
  elif not args.torch_only:
    steps.append(prepare_jax(args, args.remat))
  if args.torch or args.torch_only:
    steps.append(prepare_torch_step(args))
  rows += time_steps(steps, args.warmup, args.steps)
  load_after = os.getloadavg()

  print(
    f'# {args.method} step: {args.backbone}, crop {args.crop}, {args.batch} labeled + '
    f'{0 if args.method == "supervised" else args.batch} unlabeled per device, '
    f'{args.dtype}; {args.steps} timed steps after {args.warmup}'
    + (', implementations interleaved' if len(steps) > 1 else '')
  )
  devices = sorted({r['device'] for r in rows})
  print(f'# devices: {", ".join(devices)}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(
    f'# load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} '
    f'on {os.cpu_count()} CPUs'
  )
  print(format_table(rows, args.peak_tflops))
  by_impl = {r['impl']: r for r in rows if not r['remat']}
  if 'jax' in by_impl and 'torch' in by_impl:
    jx, pt = by_impl['jax'], by_impl['torch']
    print(
      f'# jax / torch step time: median {jx["median_s"] / pt["median_s"]:.2f}, '
      f'min {jx["min_s"] / pt["min_s"]:.2f}'
    )
  for r in rows:
    print(machine_line(r), flush=True)
  return rows


if __name__ == '__main__':
  main()
