r"""What the compiled training step moves between devices: a census of its HLO.

    python -m benchmarks.census                       # 8 simulated CPU devices, every method
    python -m benchmarks.census --devices 4 --methods supervised --crop 33
    python -m benchmarks.census --methods dssn --hlo-dir /tmp/hlo   # also write the HLO
    python -m benchmarks.census --processes 2        # two hosts x 4 devices (jax.distributed)

Compiles each method's full training step (`train_step.make_train_step`,
the program `main.py` runs; DSSN's first-epoch program) over `--devices`
devices with `--batch` labeled (+ `--batch` unlabeled) images per device,
from abstract arrays (nothing is initialized or run), and reads the compiled
per-device program (`compiled.as_text()`):

- collectives by kind (`all-reduce`, `all-gather`, `all-to-all`,
  `collective-permute`, `reduce-scatter`): instructions, arrays (a tuple
  collective moves several), and operand MiB per device. An operand array
  is *sample-carrying* (activation-sized) when, ignoring size-1 axes and
  axis order, it has at least two axes and is not shaped like a state leaf
  (a parameter, gradient or BatchNorm statistic), nor a state leaf stacked
  on a short leading axis (<= 8: several statistics in one collective).
  Data parallelism needs none: only gradients, statistics and scalars
  should cross devices. Each one is listed with its shape, the op that made
  it and its source line;
- `scatter`, `gather`, `sort`, `copy`, `transpose` instructions, counted in
  every computation (fusion bodies included). `select-and-scatter` (the
  max-pool gradient: one native op on GPU and TPU, which XLA:CPU expands
  into a scatter) is counted apart from `scatter`;
- XLA's memory estimate of one device: arguments + temporaries + outputs -
  donated (aliased) outputs.

The devices are simulated CPU devices (`--xla_force_host_platform_device_count`,
set here before JAX starts a backend), so the program is XLA:CPU's; the
SPMD partitioning that decides which collectives exist is the same on GPU
and TPU, though each backend's later passes may combine or split them.

`--processes N` rehearses N hosts on this machine, as
`launch/local_multihost.sh` does for training: N processes of
`--devices / N` simulated devices each, joined by `jax.distributed` on
127.0.0.1 (gloo), each compiling the step over the global mesh; process 0
reports (its program is every process's: SPMD).

The last line of each method is machine-readable (`census: method=...`);
`--json` prints one `census_json: {...}` line per method instead of the
tables (for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from typing import Any

import numpy as np

COLLECTIVES = ('all-reduce', 'all-gather', 'all-to-all', 'collective-permute', 'reduce-scatter')
OTHER_OPS = ('scatter', 'select-and-scatter', 'gather', 'sort', 'copy', 'transpose')
# method -> (backbone, crop) of its census (tiny models: the collectives'
# kinds and counts depend on the program's structure, not its width).
DEFAULTS = {
  'dssn': ('resnet_tiny', 65),
  'supervised': ('resnet_tiny', 65),
  'unimatch_v2': ('dinov2_tiny', 56),
}
JSON_PREFIX = 'census_json: '
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4}
_BYTES.update({'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16})
_ARRAY = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = ')


@dataclasses.dataclass
class Instr:
  """One HLO instruction: its name, result shape text, opcode, operand
  names, `op_name` metadata and source location (`file:line`, or '')."""

  name: str
  shape: str
  opcode: str
  operands: list[str]
  op_name: str
  where: str


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """`(dtype, dims)` of every array in an HLO shape text (tuples flattened;
  tokens and other non-array types left out)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES:
      out.append((dtype, tuple(int(d) for d in dims.split(',') if d)))
  return out


def nbytes(array: tuple[str, tuple[int, ...]]) -> int:
  dtype, dims = array
  return _BYTES[dtype] * int(np.prod(dims, dtype=np.int64))


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group opening at `text[start]`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def _locations(text: str) -> dict[int, str]:
  """stack_frame_id -> 'file:line' from the module's FileNames, FileLocations
  and StackFrames tables (absent in older jaxlibs: then empty)."""
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = tables.setdefault(line, {})
    elif current is not None and (m := re.match(r'^(\d+) (.*)$', line)):
      current[int(m.group(1))] = m.group(2)
    elif current is not None and line.strip() == '':
      current = None
    elif line.startswith(('HloModule', '%', 'ENTRY')):
      current = None
  files, locs, frames = (tables.get(k, {}) for k in ('FileNames', 'FileLocations', 'StackFrames'))
  out = {}
  for frame, body in frames.items():
    loc = re.search(r'file_location_id=(\d+)', body)
    where = locs.get(int(loc.group(1)), '') if loc else ''
    f, ln = re.search(r'file_name_id=(\d+)', where), re.search(r'\bline=(\d+)', where)
    if f and ln:
      path = files.get(int(f.group(1)), '').strip('"')
      out[frame] = f'{_short(path)}:{ln.group(1)}'
  return out


def _short(path: str) -> str:
  """A source path from the package or benchmark root on (`dssn_jax/...`)."""
  for root in ('dssn_jax/', 'benchmarks/'):
    if root in path:
      return root + path.split(root, 1)[1]
  return os.path.basename(path)


def parse_hlo(text: str) -> list[Instr]:
  """Every instruction of an HLO module's text, in every computation."""
  frames = _locations(text)
  out = []
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    rest = line[m.end() :]
    end = _balanced(rest, 0) if rest.startswith('(') else rest.find(' ')
    shape, after = rest[:end], rest[end:].lstrip()
    op = re.match(r'([\w\-]+)\(', after)
    if not op:
      continue
    args_end = _balanced(after, op.end() - 1)
    operands = re.findall(r'%([\w.\-]+)', after[op.end() : args_end])
    op_name = re.search(r'op_name="([^"]*)"', after)
    frame = re.search(r'stack_frame_id=(\d+)', after)
    source = re.search(r'source_file="([^"]*)" source_line=(\d+)', after)
    where = frames.get(int(frame.group(1)), '') if frame else ''
    if source and not where:
      where = f'{_short(source.group(1))}:{source.group(2)}'
    out.append(
      Instr(m.group(1), shape, op.group(1), operands, op_name.group(1) if op_name else '', where)
    )
  return out


def _key(dims: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(sorted(d for d in dims if d != 1))


def state_keys(state: Any) -> set[tuple[int, ...]]:
  """The shape keys (size-1 axes dropped, axes sorted) of every leaf of `state`."""
  import jax  # pylint: disable=g-import-not-at-top

  return {_key(tuple(leaf.shape)) for leaf in jax.tree.leaves(state) if hasattr(leaf, 'shape')}


def sample_carrying(dims: tuple[int, ...], keys: set[tuple[int, ...]]) -> bool:
  """Whether an operand array of shape `dims` is activation-sized: two or
  more non-unit axes and not a state leaf's shape, nor one stacked on an
  axis of at most 8 (module docstring)."""
  key = _key(dims)
  if len(key) < 2 or key in keys:
    return False
  for i, d in enumerate(key):
    if d <= 8 and key[:i] + key[i + 1 :] in keys:
      return False
  return True


def census(text: str, keys: set[tuple[int, ...]]) -> dict[str, Any]:
  """Counts of a compiled program's collectives and other ops of interest.

  Args:
    text: `compiled.as_text()` of the per-device program.
    keys: `state_keys(state)`.
  Returns:
    dict: `collectives` {kind: {count, arrays, mib, sample_count,
    sample_mib}}, `ops` {opcode: count}, `sample` (one dict per
    sample-carrying collective: kind, shapes, op_name, where).
  """
  instrs = parse_hlo(text)
  shapes = {i.name: i.shape for i in instrs}
  coll = {k: dict(count=0, arrays=0, mib=0.0, sample_count=0, sample_mib=0.0) for k in COLLECTIVES}
  ops, sample = Counter(), []
  for ins in instrs:
    if ins.opcode == 'scatter' and ins.op_name.endswith('select_and_scatter'):
      ops['select-and-scatter'] += 1  # max-pool gradient, expanded to a scatter by XLA:CPU
    elif ins.opcode in OTHER_OPS:
      ops[ins.opcode] += 1
    kind = ins.opcode.removesuffix('-start')
    if kind not in COLLECTIVES:
      continue
    operand = [a for name in ins.operands for a in arrays(shapes.get(name, ''))]
    if not operand:  # operands outside the text: fall back to the result
      operand = arrays(ins.shape)
    if ins.opcode == 'collective-permute-start':
      operand = operand[:1]
    c = coll[kind]
    c['count'] += 1
    c['arrays'] += len(operand)
    c['mib'] += sum(map(nbytes, operand)) / 2**20
    moving = [a for a in operand if sample_carrying(a[1], keys)]
    if moving:
      c['sample_count'] += 1
      c['sample_mib'] += sum(map(nbytes, moving)) / 2**20
      sample.append(
        dict(
          kind=kind,
          shapes=[f'{d}[{",".join(map(str, s))}]' for d, s in moving],
          op_name=ins.op_name,
          where=ins.where,
        )
      )
  return dict(collectives=coll, ops={k: ops[k] for k in OTHER_OPS}, sample=sample)


def memory(compiled) -> dict[str, int] | None:
  """XLA's memory estimate of one device (bytes): arguments, outputs,
  aliased (donated) outputs, temporaries and their `total`."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  out = dict(
    argument=mem.argument_size_in_bytes,
    output=mem.output_size_in_bytes,
    alias=mem.alias_size_in_bytes,
    temp=mem.temp_size_in_bytes,
  )
  out['total'] = out['argument'] + out['temp'] + out['output'] - out['alias']
  return out


def compile_step(
  method: str, backbone: str, crop: int, batch: int, num_classes: int, loss_groups: int = 1
):
  """The compiled training step of `method` over every device (abstract
  inputs) and its abstract state.

  Returns:
    `(compiled, state)`.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from dssn_jax import config_lib, models, optim, parallel  # pylint: disable=g-import-not-at-top
  from dssn_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from dssn_jax.models import registry  # pylint: disable=g-import-not-at-top
  from dssn_jax.testing import batches  # pylint: disable=g-import-not-at-top

  config = config_lib.base_config()
  config.method = method
  if method == 'unimatch_v2':
    config_lib.apply_unimatch_v2_recipe(config)
  config.model.backbone = backbone
  config.data.num_classes = num_classes
  config.data.crop_size = crop
  global_batch = batch * jax.device_count()
  config.data.batch_size = global_batch
  # 0: one group per device (UniMatch V2's pairing then stays on its device).
  config.train.loss_groups = loss_groups or jax.device_count()
  config.train.steps = 100_000
  settings = config_lib.resolve(config)
  schedule = settings.schedule(1000 * global_batch)
  model = models.model_from_config(config)
  tx = optim.make_optimizer(schedule, config)
  mesh = parallel.make_mesh()
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  size = registry.family_of(backbone).init_size
  state = jax.eval_shape(lambda: ts.create_train_state(model, tx, jax.random.key(0), size))
  spec = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  state = jax.tree.map(lambda x: spec(x, rep), state)
  local = batches.synthetic_batch(
    global_batch, crop, num_classes, supervised=method == 'supervised'
  )
  batch_spec = {k: spec(v, data) for k, v in local.items()}
  rng = spec(jax.eval_shape(lambda: jax.random.key(1)), rep)
  step = ts.make_train_step(model, tx, settings, schedule, mesh, ema_decay=config.train.ema_decay)
  return step.lower(state, batch_spec, rng, step=0).compile(), state


def format_report(name: str, result: dict[str, Any]) -> str:
  """One method's census as text: collectives table, other ops, memory and
  the sample-carrying collectives grouped by source line."""
  lines = [f'# {name}']
  head = ('collective', 'count', 'arrays', 'MiB/dev', 'sample-carrying', 'sample MiB/dev')
  rows = [head]
  for kind, c in result['collectives'].items():
    rows.append(
      (
        kind,
        c['count'],
        c['arrays'],
        f'{c["mib"]:.3f}',
        c['sample_count'],
        f'{c["sample_mib"]:.3f}',
      )
    )
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
  lines += ['  '.join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows]
  lines.append('ops: ' + ', '.join(f'{k} {v}' for k, v in result['ops'].items()))
  mem = result['memory']
  if mem:
    lines.append(
      'xla memory per device (MiB): ' + ', '.join(f'{k} {v / 2**20:.2f}' for k, v in mem.items())
    )
  groups = Counter(
    (s['kind'], ' '.join(s['shapes']), s['where'], s['op_name']) for s in result['sample']
  )
  if groups:
    lines.append('sample-carrying collectives (count x kind shapes  source  op):')
  for (kind, shapes, where, op), n in sorted(groups.items(), key=lambda g: (g[0][2], g[0][0])):
    lines.append(f'  {n:3d} x {kind} {shapes}  {where or "?"}  {op}')
  return '\n'.join(lines)


def machine_line(method: str, result: dict[str, Any]) -> str:
  coll = result['collectives']
  parts = [f'census: method={method} devices={result["devices"]}']
  parts += [f'{k}={c["count"]}' for k, c in coll.items()]
  parts.append(f'sample_carrying={sum(c["sample_count"] for c in coll.values())}')
  parts += [f'{k}={v}' for k, v in result['ops'].items()]
  if result['memory']:
    parts.append(f'xla_mem_mib={result["memory"]["total"] / 2**20:.2f}')
  return ' '.join(parts)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  p.add_argument('--methods', default='dssn,unimatch_v2,supervised', help='comma-separated')
  p.add_argument('--crop', type=int, default=None, help='square crop (default: per method)')
  p.add_argument('--batch', type=int, default=1, help='labeled (and unlabeled) images per device')
  p.add_argument('--num-classes', type=int, default=21)
  p.add_argument(
    '--loss-groups',
    type=int,
    default=1,
    help='config.train.loss_groups (0: one per device); 1 pairs UniMatch V2 across the batch',
  )
  p.add_argument('--hlo-dir', default=None, help='also write each compiled program here')
  p.add_argument(
    '--processes', type=int, default=1, help='rehearsed hosts (jax.distributed on 127.0.0.1)'
  )
  # Set by the parent of a --processes run, per child.
  p.add_argument('--process-id', type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument('--coordinator', default=None, help=argparse.SUPPRESS)
  p.add_argument('--json', action='store_true', help='one census_json line per method')
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(',') if m]
  unknown = [m for m in args.methods if m not in DEFAULTS]
  if unknown:
    p.error(f'--methods: no census for {unknown}; known: {", ".join(DEFAULTS)}')
  if args.devices < 1 or args.batch < 1:
    p.error('--devices and --batch must be positive')
  if args.processes < 1 or args.devices % args.processes:
    p.error(f'--processes={args.processes} must be positive and divide --devices={args.devices}')
  return args


def run_processes(args: argparse.Namespace, argv: list[str]) -> None:
  """Starts `args.processes` children of this command on 127.0.0.1, each
  with its process id, and prints process 0's output (the others' on error)."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top

  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  children = [
    subprocess.Popen(
      [sys.executable, '-m', 'benchmarks.census', *argv]
      + ['--process-id', str(i), '--coordinator', f'127.0.0.1:{port}'],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(args.processes)
  ]
  outputs = [child.communicate()[0] for child in children]
  failed = [i for i, child in enumerate(children) if child.returncode]
  print(outputs[0], end='', flush=True)
  if failed:
    for i in failed[failed[0] == 0 :]:
      print(f'--- process {i}:\n{outputs[i]}', file=sys.stderr)
    raise SystemExit(f'census: process {failed[0]} of {args.processes} failed')


def simulate_devices(count: int) -> None:
  """Asks XLA:CPU for `count` devices (before JAX starts a backend), and
  applies `main.py`'s default CPU flags."""
  from dssn_jax import xla_flags  # pylint: disable=g-import-not-at-top

  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  xla_flags.set_default_cpu_flags()


def main(argv=None) -> dict[str, dict[str, Any]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.processes > 1 and args.process_id is None:
    run_processes(args, argv)
    return {}
  simulate_devices(args.devices // args.processes)
  import jax  # pylint: disable=g-import-not-at-top

  if args.processes > 1:
    from dssn_jax import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize(args.coordinator, args.processes, args.process_id)
  report = jax.process_index() == 0
  if jax.device_count() != args.devices:
    raise SystemExit(
      f'census: JAX already runs {jax.device_count()} devices; run it in a fresh process'
    )
  results = {}
  for method in args.methods:
    backbone, crop = DEFAULTS[method]
    crop = args.crop or crop
    compiled, state = compile_step(
      method, backbone, crop, args.batch, args.num_classes, args.loss_groups
    )
    text = compiled.as_text()
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f'{method}.hlo'), 'w') as f:
        f.write(text)
    result = census(text, state_keys({'params': state.params, 'stats': state.batch_stats}))
    result.update(devices=args.devices, memory=memory(compiled), backbone=backbone, crop=crop)
    results[method] = result
    result.update(processes=args.processes)
    if not report:
      continue
    if args.json:
      print(JSON_PREFIX + json.dumps(dict(result, method=method)), flush=True)
      continue
    n = args.batch * args.devices
    title = (
      f'{method} on {backbone}, crop {crop}, {n}'
      + ('' if method == 'supervised' else f'+{n}')
      + f' images on {args.devices} devices'
      + (f' of {args.processes} processes' if args.processes > 1 else '')
      + f' (jax {jax.__version__})'
    )
    print(format_report(title, result))
    print(machine_line(method, result), flush=True)
  return results


if __name__ == '__main__':
  main(sys.argv[1:])
