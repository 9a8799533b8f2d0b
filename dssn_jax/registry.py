"""One registry mechanism for every extension point: datasets, methods and
backbone families.

A `Registry` maps names to entries. Each entry registers itself in its own
module (`REGISTRY.register(entry)` at the bottom of that module); the
registry knows the modules of the built-in entries (`builtins`, name ->
module) and imports one the first time its name is asked for, so that
reading a registry never imports more than it needs (data-loading worker
processes stay free of jax). Code outside dssn_jax registers the same way:
a config names the modules that register its entries in `config.imports`
(`import_modules`), so every process and host that builds the config sees
the same registry.

    METHODS = Registry('method', 'config.method', builtins={'dssn': 'dssn_jax.methods.dssn'})
    METHODS.register(Method('dssn', ...))     # in dssn_jax/methods/dssn.py
    METHODS.get('dssn')                        # imports dssn_jax.methods.dssn if needed
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

from dssn_jax.errors import ConfigError

T = TypeVar('T')


class Registry(Generic[T]):
  """Named entries of one kind (each has a `name` attribute).

  Args:
    kind: what an entry is, for messages ('method', 'dataset', ...).
    key: the config key that names an entry, for messages.
    builtins: name -> module that registers it, imported on first use.
  """

  def __init__(self, kind: str, key: str, builtins: Mapping[str, str] | None = None):
    self.kind, self.key = kind, key
    self._builtins = dict(builtins or {})
    self._entries: dict[str, T] = {}

  def register(self, entry: T) -> T:
    """Adds `entry` under `entry.name`; a name is registered once."""
    name = entry.name
    if name in self._entries:
      raise ValueError(f'{self.kind} {name!r} is registered twice')
    self._entries[name] = entry
    return entry

  def get(self, name: str) -> T:
    """The entry `name`, importing its built-in module if it is not registered yet.

    Raises:
      ConfigError: naming the config key, the value and the known names.
    """
    if name not in self._entries and name in self._builtins:
      importlib.import_module(self._builtins[name])
    if name not in self._entries:
      raise ConfigError(f'{self.key}={name!r} is not one of {", ".join(self.names())}')
    return self._entries[name]

  def registered(self) -> list[T]:
    """The entries registered so far (no module imported)."""
    return list(self._entries.values())

  def names(self) -> tuple[str, ...]:
    """Built-in names first (in their order), then those registered from elsewhere."""
    return tuple(self._builtins) + tuple(n for n in self._entries if n not in self._builtins)

  def entries(self) -> list[T]:
    """Every entry, built-in modules imported."""
    return [self.get(name) for name in self.names()]

  def __contains__(self, name: Any) -> bool:
    return name in self._entries or name in self._builtins


def import_modules(modules: Iterable[str], where: str = 'config.imports') -> None:
  """Imports the modules that register entries from outside dssn_jax.

  Raises:
    ConfigError: naming the module that does not import, and why.
  """
  for module in modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f'{where}: cannot import {module!r} ({e})') from None
