"""The errors a user can fix, and the one check every choice goes through.

At the bottom of the package: every other module may raise these, and this
module imports nothing of dssn_jax but `cli`'s `UserError` (the command
lines print a `UserError` as one line and exit with status 2).
"""

from __future__ import annotations

from dssn_jax.cli import UserError


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names key, value and range."""


class ConversionError(UserError, ValueError):
  """A state dict does not match the model; the message lists every bad key."""


def one_of(key: str, value, options):
  """`value` if it is one of `options`, else a `ConfigError` naming `config.<key>`."""
  options = tuple(options)
  if value not in options:
    raise ConfigError(f'config.{key}={value!r} must be one of {", ".join(map(str, options))}')
  return value
