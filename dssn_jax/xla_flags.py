"""XLA:CPU flags that every entry point applies before JAX starts a backend.

Convolutions through Eigen rather than YNNPACK: the ResNet-50 DSSN step (crop
161, 2+2) runs 1.5-2x faster (benchmarks/step_speed.py, docs/performance.md;
DigitScenes' step 2x, docs/digits.md). The flag touches the CPU backend only; a user's own
`XLA_FLAGS` setting of it wins.

`set_default_cpu_flags()` is the one helper: `main.py`, the `python -m
dssn_jax.*` commands and every script in `benchmarks/` call it first, so a
benchmark measures the program `main.py` runs. XLA reads `XLA_FLAGS` when
JAX initializes its first backend (the first computation or device query),
not at `import jax`; the helper warns if that has already happened. This
module imports nothing from JAX.
"""

import os
import sys
import warnings

CPU_XLA_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def _backend_started() -> bool:
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return bool(xla_bridge._backends)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False


def set_default_cpu_flags() -> None:
  """Appends `CPU_XLA_FLAGS` to `XLA_FLAGS` unless it already sets the option.

  Call before the first JAX computation; warns when a backend is already
  running (the flags then take effect only in child processes).
  """
  current = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' not in current:
    os.environ['XLA_FLAGS'] = f'{current} {CPU_XLA_FLAGS}'.strip()
    if _backend_started():
      warnings.warn(
        'dssn_jax.xla_flags.set_default_cpu_flags() called after JAX started a backend: '
        'the default XLA:CPU flags do not apply to this process',
        stacklevel=2,
      )
