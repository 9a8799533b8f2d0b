"""One helper sets the default XLA:CPU flags, for main.py and the benchmarks alike."""

import os
import subprocess
import sys
import textwrap

import pytest

from dssn_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_helper_appends_and_respects_the_users_setting(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
  xla_flags.set_default_cpu_flags()
  assert os.environ['XLA_FLAGS'] == f'--xla_dump_to=/tmp/x {xla_flags.CPU_XLA_FLAGS}'
  own = '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'
  monkeypatch.setenv('XLA_FLAGS', own)
  xla_flags.set_default_cpu_flags()
  assert os.environ['XLA_FLAGS'] == own


def test_helper_warns_once_a_backend_runs(monkeypatch):
  import jax

  jax.devices()  # this test process has a backend by now
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  with pytest.warns(UserWarning, match='after JAX started a backend'):
    xla_flags.set_default_cpu_flags()


def test_benchmarks_apply_the_flags_when_loaded():
  """Loading a benchmark script (what running it does first) sets the flags."""
  script = textwrap.dedent("""
      import importlib, os
      for name in ('step_speed', 'data_throughput', 'eval_compile', 'accelerator_check'):
        os.environ.pop('XLA_FLAGS', None)
        importlib.import_module('benchmarks.' + name)
        print(name, os.environ.get('XLA_FLAGS', ''))
  """)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = subprocess.run(
    [sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 4
  for line in lines:
    assert line.split(' ', 1)[1] == xla_flags.CPU_XLA_FLAGS, line
