"""Test setup: CPU only, fast compiles, one compilation cache per run.

Tests that build the same step (the stop-and-resume runs, say) reuse its
compiled executable from the persistent cache instead of compiling again.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# This process compiles without LLVM's optimization passes: the same HLO
# and the same float arithmetic (LLVM reassociates nothing without
# fast-math), compiled in about half the time; the suite times nothing. The
# flag is read when the backend starts, here; subprocesses that tests start
# see the environment the run began with (below). A caller's setting wins.
# Where XLA still has them (jaxlib 0.10; gone by 0.12), the classic CPU
# emitters compile the suite's programs about twice as fast as the MLIR
# fusion emitters; they emit the same HLO's arithmetic with their own loop
# code, which the tolerances (dssn_jax/testing/numerics.py) allow for. XLA aborts on an
# unknown flag, so a subprocess probes once (the result is inherited by
# xdist's workers through the environment).
_XLA_FLAGS = os.environ.get('XLA_FLAGS')
_CLASSIC_EMITTERS = '--xla_cpu_use_fusion_emitters=false'


def _classic_emitters_available() -> bool:
  key = 'DSSN_JAX_TEST_CLASSIC_EMITTERS'
  if key not in os.environ:
    probe = subprocess.run(
      [sys.executable, '-c', 'import jax; jax.devices()'],
      env={**os.environ, 'XLA_FLAGS': _CLASSIC_EMITTERS, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True,
      check=False,
    )
    os.environ[key] = '1' if probe.returncode == 0 else '0'
  return os.environ[key] == '1'


if 'xla_backend_optimization_level' not in (_XLA_FLAGS or ''):
  extra = '--xla_backend_optimization_level=0'
  if 'xla_cpu_use_fusion_emitters' not in (_XLA_FLAGS or '') and _classic_emitters_available():
    extra += ' ' + _CLASSIC_EMITTERS
  os.environ['XLA_FLAGS'] = f'{_XLA_FLAGS or ""} {extra}'.strip()
  jax.devices()
  if _XLA_FLAGS is None:
    del os.environ['XLA_FLAGS']
  else:
    os.environ['XLA_FLAGS'] = _XLA_FLAGS

# One cache for the whole run, xdist's workers included (they inherit the
# variable from the process that loads this first): a module fixture that
# two workers both build, or a program two tests share, compiles once.
_CACHE = os.environ.get('DSSN_JAX_TEST_XLA_CACHE')
if _CACHE is None:
  _CACHE = tempfile.mkdtemp(prefix='dssn-jax-test-xla-cache-')
  os.environ['DSSN_JAX_TEST_XLA_CACHE'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# Importing a benchmark script applies the default XLA:CPU flags to
# os.environ (what running it does first); subprocesses that tests start
# must see the environment the test run began with (`_XLA_FLAGS`).
@pytest.fixture(autouse=True)
def _original_xla_flags(monkeypatch):
  if _XLA_FLAGS is None:
    monkeypatch.delenv('XLA_FLAGS', raising=False)
  else:
    monkeypatch.setenv('XLA_FLAGS', _XLA_FLAGS)


# The files whose tests compile the largest programs (a minute each on a
# 2-core CPU) run first: pytest-xdist's workers then share the many short
# tests at the end instead of one worker finishing a long test alone.
_HEAVY_FIRST = (
  'test_main.py',
  'test_dinov3_train.py',
  'test_census.py',
  'test_mixed_precision.py',
  'test_dinov2_parity.py',
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
