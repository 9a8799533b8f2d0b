"""What every method shares: its registration and its settings.

A method is one module that defines

- `Settings`: a frozen dataclass of its knobs, each read from one config key
  (`knob('loss.strong', 0.125)`); a knob with a default is a config
  placeholder (None in `config_lib.base_config`) that the method fills with
  its own value, its preset; a knob without one always takes the config's
  value. Constants of the method are plain fields.
- `prepare(state, batch, rng, ctx) -> (prepared, teacher_batch_stats)` and
  `loss(params, state, micro_batch, rng, ctx) -> (total, LossAux)` (see
  `methods.common` for the split and `methods.gradients` for how they run);

and registers itself: `METHODS.register(Method('name', Settings, prepare,
loss, ...))` at its bottom. `config_lib.resolve` builds the method's
`Settings` from a config once (`Settings.from_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from dssn_jax.errors import ConfigError, one_of
from dssn_jax.registry import Registry

_CONVERT = {'float': float, 'int': int, 'bool': bool, 'str': str}


def knob(key: str, default: Any = dataclasses.MISSING, *, choices: tuple[str, ...] = ()):
  """A setting read from `config.<key>`; `default` fills a None placeholder."""
  return dataclasses.field(
    default=None if default is dataclasses.MISSING else default,
    metadata={'key': key, 'preset': default is not dataclasses.MISSING, 'choices': choices},
  )


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """The knobs every method reads: the supervised term `L_x`.

  Frozen and hashable: the train step is compiled for one value of it.
  """

  method: str = ''  # the registered name (set by `from_config`)
  sup: float = knob('loss.sup', 1.0)
  sup_type: str = knob('loss.sup_type', choices=('ce', 'ohem'))
  ohem_thresh: float = knob('loss.ohem_thresh')
  ohem_min_kept: int = knob('loss.ohem_min_kept')
  ignore_index: int = knob('data.ignore_index')
  # The reproduced recipe's GPU count: per-GPU reductions per group
  # (`methods.common`); 1: over the global batch.
  loss_groups: int = knob('train.loss_groups')

  @classmethod
  def from_config(cls, config, method: str):
    """Every knob from `config`, placeholders filled with this class's defaults.

    Raises:
      ConfigError: a value outside its choices, naming the key.
    """
    values = {}
    for f in dataclasses.fields(cls):
      key = f.metadata.get('key')
      if key is None:
        continue
      value = _get(config, key)
      if value is None:
        if not f.metadata['preset']:
          raise ConfigError(f'config.{key} is unset; method {method!r} needs a value')
        value = f.default
      if f.metadata['choices']:
        one_of(key, value, f.metadata['choices'])
      kind = _CONVERT.get(str(f.type))
      values[f.name] = kind(value) if kind is not None else value
    return cls(method=method, **values).finalized()

  def finalized(self):
    """Values implied by others (a subclass may switch terms off); `self` here."""
    return self

  def for_step(self, step: int, schedule) -> Settings:
    """The settings step `step` runs with: `self`, unless the method has phases
    (DSSN: the teacher's BatchNorm mode, the supervised warm-up)."""
    del step, schedule
    return self

  @property
  def phased(self) -> bool:
    """Whether `for_step` depends on the step."""
    return False

  def labeled_only_steps(self, schedule) -> int:
    """How many first steps read the labeled batch alone."""
    del schedule
    return 0

  @property
  def mix_partner(self) -> str:
    """The cutmix partner the pipeline prepares (methods without one: 'same')."""
    return 'same'


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method.

  Attributes:
    name: `config.method`.
    settings: its `Settings` class (knobs and presets).
    prepare, loss: the iteration (module docstring).
    ema_schedule: the teacher's keep rate (`methods.gradients.ema_keep`):
      'warmup' (DSSN), 'unimatch_v2', or 'student' (no EMA teacher).
    warmup: whether `config.train.warmup_*` applies (DSSN's warm-up).
    unlabeled: whether it reads the unlabeled stream.
  """

  name: str
  settings: type
  prepare: Callable
  loss: Callable
  ema_schedule: str = 'student'
  warmup: bool = False
  unlabeled: bool = True


METHODS: Registry[Method] = Registry(
  'method',
  'config.method',
  builtins={
    'dssn': 'dssn_jax.methods.dssn',
    'unimatch': 'dssn_jax.methods.unimatch',
    'fixmatch': 'dssn_jax.methods.fixmatch',
    'supervised': 'dssn_jax.methods.supervised',
    'unimatch_v2': 'dssn_jax.methods.unimatch_v2',
  },
)
register, get, names = METHODS.register, METHODS.get, METHODS.names
