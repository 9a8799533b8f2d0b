"""XLA:CPU flags that the entry points set before JAX is imported.

Convolutions through Eigen rather than YNNPACK: the ResNet-50 DSSN step (crop
161, 2+2) ran 1.6-2x faster on 2 cores (benchmarks/step_speed.py, README
"Performance"). The flag touches the CPU backend only; a user's own
`XLA_FLAGS` setting of it wins. This module imports nothing from JAX.
"""

import os

CPU_XLA_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'


def set_default_cpu_flags() -> None:
  """Appends `CPU_XLA_FLAGS` to `XLA_FLAGS` unless it already sets the option.
  Call before the first `import jax`."""
  current = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' not in current:
    os.environ['XLA_FLAGS'] = f'{current} {CPU_XLA_FLAGS}'.strip()
