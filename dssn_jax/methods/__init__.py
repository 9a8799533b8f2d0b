"""The training methods, registered by name.

Each method is one module (`dssn`, `unimatch`, `fixmatch`, `supervised`,
`unimatch_v2`) with its own `Settings` (knobs and presets), `prepare` and
`loss`, registering itself in `base.METHODS` (see `base`); the shared
gradient code is `gradients`, the shared pieces of the iterations `common`.
The CLI, the config checks and the benchmarks read `names()`.
"""

from __future__ import annotations

from dssn_jax.methods.base import METHODS, Method, Settings, get, knob, names, register
from dssn_jax.methods.gradients import ema_keep, objective, value_and_grad

__all__ = [
  'METHODS',
  'Method',
  'Settings',
  'get',
  'knob',
  'names',
  'register',
  'ema_keep',
  'objective',
  'value_and_grad',
]
