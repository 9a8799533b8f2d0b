"""What the compiled step moves between devices (`benchmarks/census.py`).

The step compiled over simulated CPU devices (a subprocess: the device count
is fixed when JAX starts) must contain no scatter and no collective whose
operand carries samples (activation-sized); only gradients, statistics and
scalars cross devices. `CLEAN` lists the methods whose step already passes:
adding a method is one line. The synchronized BatchNorm does one
collective each way and matches the plain two-pass computation.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import census
from dssn_jax.testing import configs

# method -> its census flags (tiny sizes; the structure of the program, not
# its width, decides what crosses devices).
CLEAN = {
  'supervised': ['--crop', '33', '--batch', '1'],
  'dssn': ['--crop', '33', '--batch', '1'],
  # One loss group per device: UniMatch V2's flip(0) pairs stay on it (with
  # groups spanning devices the pairing itself must cross them).
  'unimatch_v2': ['--crop', '28', '--batch', '2', '--loss-groups', '0'],
}
DEVICES = 4


def _run(argv: list[str], devices: int = DEVICES, timeout: int = 600) -> str:
  """stdout of `python argv` on `devices` simulated CPU devices, compiling
  as fast as conftest.py's process does (same HLO, cheaper LLVM code)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  if os.environ.get('DSSN_JAX_TEST_CLASSIC_EMITTERS') == '1':  # probed by conftest.py
    flags += ' --xla_cpu_use_fusion_emitters=false'
  env['XLA_FLAGS'] = flags
  proc = subprocess.run(
    [sys.executable, *argv],
    env=env,
    cwd=configs.REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


HLO = textwrap.dedent("""\
  HloModule jit_step

  ENTRY %main (p0: f32[2,17,17,8], p1: f32[3,3,8,16]) -> f32[3,3,8,16] {
    %p0 = f32[2,17,17,8]{3,2,1,0} parameter(0)
    %p1 = f32[3,3,8,16]{3,2,1,0} parameter(1)
    %b = f32[16]{0} parameter(2)
    %c = f32[] parameter(3)
    %s = f32[1,3,16]{2,1,0} parameter(4)
    %all-reduce = (f32[3,3,8,16]{3,2,1,0}, f32[16]{0}, f32[]) all-reduce(%p1, %b, %c), channel_id=1
    %collective-permute.1 = f32[2,17,17,8]{3,2,1,0} collective-permute(%p0), channel_id=2, metadata={op_name="jit(f)/split" source_file="/x/dssn_jax/models/m.py" source_line=7}
    %all-gather.2 = f32[4,3,16]{2,1,0} all-gather(%s), dimensions={0}
    %scatter.3 = f32[5]{0} scatter(%a, %i, %u), to_apply=%add
    ROOT %copy = f32[3,3,8,16]{3,2,1,0} copy(%p1)
  }
  """)


def test_census_counts_and_flags_sample_carrying_operands():
  keys = {(3, 3, 8, 16), (16,)}
  keys = {census._key(k) for k in keys}  # pylint: disable=protected-access
  got = census.census(HLO, keys)
  coll = got['collectives']
  assert coll['all-reduce']['count'] == 1 and coll['all-reduce']['arrays'] == 3
  assert coll['all-reduce']['sample_count'] == 0  # a gradient, a statistic, a scalar
  assert coll['collective-permute']['sample_count'] == 1
  assert coll['collective-permute']['sample_mib'] == pytest.approx(2 * 17 * 17 * 8 * 4 / 2**20)
  # Three (C,) statistics stacked on a short axis are statistics, not samples.
  assert coll['all-gather']['count'] == 1 and coll['all-gather']['sample_count'] == 0
  assert got['ops'] == {
    'scatter': 1,
    'select-and-scatter': 0,
    'gather': 0,
    'sort': 0,
    'copy': 1,
    'transpose': 0,
  }
  (moving,) = got['sample']
  assert moving['shapes'] == ['f32[2,17,17,8]']
  assert moving['where'] == 'dssn_jax/models/m.py:7' and moving['op_name'] == 'jit(f)/split'


# The supervised step is DSSN's labeled branch (its census is a subset of
# DSSN's): with the slow tests.
@pytest.mark.parametrize(
  'method',
  [pytest.param(m, marks=pytest.mark.slow) if m == 'supervised' else m for m in sorted(CLEAN)],
)
def test_compiled_step_moves_only_gradients_and_statistics(method):
  """No scatter and no sample-carrying collective in `method`'s step on
  4 simulated devices."""
  argv = ['-m', 'benchmarks.census', '--devices', str(DEVICES), '--methods', method, '--json']
  out = _run(argv + CLEAN[method])
  (line,) = [ln for ln in out.splitlines() if ln.startswith(census.JSON_PREFIX)]
  result = json.loads(line[len(census.JSON_PREFIX) :])
  assert result['ops']['scatter'] == 0, result['ops']
  assert result['sample'] == [], json.dumps(result['sample'], indent=1)
  assert result['collectives']['all-reduce']['count'] > 0  # the gradients do cross


@pytest.mark.slow
@pytest.mark.parametrize('method', sorted(CLEAN))
def test_two_hosts_compile_the_same_clean_step(method):
  """The two-host rehearsal (`--processes 2`: 2 processes x 2 devices joined
  by jax.distributed): the same census, no scatter, nothing sample-carrying."""
  argv = ['-m', 'benchmarks.census', '--devices', str(DEVICES), '--processes', '2']
  out = _run(argv + ['--methods', method, '--json'] + CLEAN[method], timeout=900)
  (line,) = [ln for ln in out.splitlines() if ln.startswith(census.JSON_PREFIX)]
  result = json.loads(line[len(census.JSON_PREFIX) :])
  assert result['processes'] == 2 and result['devices'] == DEVICES
  assert result['ops']['scatter'] == 0, result['ops']
  assert result['sample'] == [], json.dumps(result['sample'], indent=1)


_BATCHNORM_SCRIPT = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp, numpy as np
  from benchmarks import census
  from dssn_jax import parallel
  from dssn_jax.models import layers
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(8, 5, 6, 3)) * [1.0, 3.0, 0.2] + [0.5, -2.0, 10.0]).astype(np.float32)
  w = rng.normal(size=x.shape).astype(np.float32)
  out = {}
  for every in (1, 2):
    bn = layers.BatchNorm(stats_every=every)
    v = {'params': {'scale': jnp.array([1.5, 0.5, 2.0]), 'bias': jnp.array([0.1, -0.2, 0.3])},
         'batch_stats': {'mean': jnp.zeros(3), 'var': jnp.ones(3)}}
    def loss(params, x, synced):
      def f():
        y, upd = bn.apply({**v, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * w), (y, upd)
      if not synced:
        return f()
      with parallel.tracing_mesh(mesh):
        return f()
    for synced in (False, True):
      fn = jax.jit(
          jax.value_and_grad(lambda p, x: loss(p, x, synced), (0, 1), has_aux=True),
          in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)))
      leaves = jax.tree.leaves(fn(v['params'], x))
      out[f'{every}_{synced}'] = [np.asarray(a, np.float64).tolist() for a in leaves]
      if synced:
        text = fn.lower(v['params'], x).compile().as_text()
        coll = census.census(text, set())['collectives']
        out[f'{every}_count'] = {k: c['count'] for k, c in coll.items() if c['count']}
  print(json.dumps(out))
""")


def test_synced_batchnorm_one_collective_each_way_and_matches_two_pass():
  """Under `parallel.tracing_mesh` a train-mode BatchNorm on a batch sharded
  over 4 devices gathers its statistics once (forward) and all-reduces
  once (backward), and its output, statistics and gradients match the
  plain global two-pass form to float32 rounding (`stats_every` 1 and 2)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from dssn_jax.testing import numerics  # pylint: disable=g-import-not-at-top

  out = json.loads(_run(['-c', _BATCHNORM_SCRIPT]).strip().splitlines()[-1])
  for every in (1, 2):
    assert out[f'{every}_count'] == {'all-reduce': 1, 'all-gather': 1}, out[f'{every}_count']
    plain, synced = out[f'{every}_False'], out[f'{every}_True']
    assert len(plain) == len(synced)
    for want, got in zip(plain, synced):  # loss, y, running stats, gradients
      numerics.assert_close(np.asarray(got), np.asarray(want), numerics.LAYER)
