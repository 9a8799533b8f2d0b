"""What every command line of dssn_jax shares: user errors, quiet logs, flags.

A `UserError` (a bad config value, a missing or damaged file, a run that
stopped on a non-finite loss) is something the user can fix: the command
lines print its message in a line or two, without a traceback, and exit
with status 2. Any other exception is a bug and keeps its traceback.

    python main.py ... --config.loss.strong=-1
    error: config.loss.strong=-1.0 must be >= 0 (a loss weight)
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dssn_jax import xla_flags

USER_ERROR_STATUS = 2


class UserError(Exception):
  """An error the user can fix; command lines print it without a traceback."""


def quiet_library_logs() -> None:
  """Keeps library INFO logs (orbax prints its internals) off the console.

  `--verbosity`/`-v` given on the command line still wins for absl logs.
  Also silences the multiprocessing resource tracker's "leaked
  shared_memory objects" warning at exit: the segments it names are the
  batches grain's workers had prefetched when the pool shut down, and the
  tracker unlinks them right after the warning, so nothing is left behind.
  """
  if 'verbosity' not in flags.FLAGS or not flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
    # orbax also warns about its own timing ("Waiting for previous save...").
    logging.getLogger('absl').addFilter(_below_error_from_orbax)
  logging.getLogger('orbax').setLevel(logging.WARNING)
  # The tracker is a child process started with the parent's -W options.
  option = 'ignore::UserWarning:multiprocessing.resource_tracker'
  if option not in sys.warnoptions:
    sys.warnoptions.append(option)
  warnings.filterwarnings('ignore', category=UserWarning, module='multiprocessing.resource_tracker')


def _below_error_from_orbax(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.ERROR or '/orbax/' not in record.pathname.replace('\\', '/')


def report(error: BaseException) -> int:
  """Prints a user error as `error: <message>` on stderr; returns status 2."""
  print(f'error: {error}', file=sys.stderr, flush=True)
  return USER_ERROR_STATUS


def user_errors() -> tuple[type[BaseException], ...]:
  """Exception types printed without a traceback.

  `UserError` and its subclasses, plus the standard library's file errors
  (a missing or unreadable file the user named).
  """
  return (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """Wraps an absl `main(argv)`: user errors -> one message, exit status 2."""

  def wrapper(argv):
    try:
      return main(argv)
    except user_errors() as e:
      sys.exit(report(e))

  return wrapper


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag value exiting with status 2.

  Pass as `app.run(main, flags_parser=cli.parse_flags)`.
  """
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    cause = _user_error_in(e)
    if cause is not None:  # raised by a config file's get_config: its message, no traceback
      head = str(e).split('\n', 1)[0].removesuffix('Error whilst parsing config file:')
      sys.exit(report(f'{head if head.startswith("flag --") else ""}{cause}'))
    print(f'error: {e}', file=sys.stderr)
    print('Pass --helpshort or --helpfull to see help on flags.', file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)
  except (AttributeError, KeyError) as e:
    message = _unknown_override(e, argv)
    if message is None:
      raise
    sys.exit(report(message))
  try:
    _check_config_files(flags.FLAGS)
  except UserError as e:
    sys.exit(report(e))
  return argv


def _user_error_in(error: BaseException) -> UserError | None:
  """The innermost `UserError` an exception was raised from (absl and
  ml_collections re-raise a config file's errors as new exceptions), or None."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    if isinstance(error, UserError):
      found = error  # the innermost: the re-raised copies carry a traceback in their text
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return found


def _unknown_override(error: BaseException, argv: list[str]) -> str | None:
  """`--config.a.stepz=3`: ml_collections raises a KeyError inside an
  AttributeError from the flag parser; its message and the flag, or None
  when the error did not come from a config override."""
  import traceback  # pylint: disable=g-import-not-at-top

  if 'ml_collections' not in ''.join(traceback.format_tb(error.__traceback__)):
    return None
  chain, node = [], error
  while node is not None and node not in chain:
    chain.append(node)
    node = node.__context__
  key = next((str(c.args[0]) for c in reversed(chain) if isinstance(c, KeyError) and c.args), '')
  hint = next(
    (
      c.args[0]
      for c in chain
      if c.args and isinstance(c.args[0], str) and 'Did you mean' in c.args[0]
    ),
    '',
  )
  flag = next((a for a in argv[1:] if a.startswith('--') and f'.{key}' in a.split('=')[0]), None)
  if not key or flag is None:
    return None
  said = '; ' + hint.split('\n', 1)[1] if '\n' in hint else ''
  return f'{flag.split("=")[0]}: the config has no key {key!r}{said}'


def _check_config_files(flag_values) -> None:
  """A config file flag naming a file that does not exist is a `UserError`.

  ml_collections defers that error until the config is first read, then
  raises it with a traceback; this names the file and what its folder holds.
  """
  import os  # pylint: disable=g-import-not-at-top

  for name in list(flag_values):
    flag = flag_values[name]
    if not flag.present:
      continue
    try:
      path = config_flags.get_config_filename(flag)
    except TypeError:  # not a config flag
      continue
    if not isinstance(path, str):  # a config given inline, not a file
      continue
    path = path.split(':', 1)[0]  # without its ARG
    if os.path.isfile(path):
      continue
    what = 'is a folder' if os.path.isdir(path) else 'does not exist'
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    held = (
      sorted(f for f in os.listdir(folder) if f.endswith('.py')) if os.path.isdir(folder) else []
    )
    listing = f'; {folder}/ holds {", ".join(held)}' if held else ''
    raise UserError(f'--{name}: config file {path} {what}{listing}')


def define_model_flags() -> None:
  """The flags naming the model that `evaluate` and `predict` load.

  `--workdir` and `--checkpoint` (a training checkpoint), or `--weights`
  with `--config` (converted weights); `--config` with `--workdir` replaces
  the workdir's `config.json` (`dssn_jax.loading.load_for_eval`).
  """

  config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file (with --weights; with --workdir it replaces config.json).',
    lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'Training workdir holding the checkpoints.')
  flags.DEFINE_string('checkpoint', 'best', 'best | latest | a step number.')
  flags.DEFINE_string('weights', None, 'A reference .pth or our .npz (needs --config).')


def start_command(argv: list[str]) -> None:
  """What a `python -m dssn_jax.*` command does first, in its `main(argv)`.

  Refuses positional arguments, applies the default XLA:CPU flags (before
  the first JAX computation) and keeps library logs quiet.
  """

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}', exitcode=2)
  xla_flags.set_default_cpu_flags()
  quiet_library_logs()


def run_command(main: Callable[[list[str]], object], define_flags: Callable[[], None]) -> None:
  """Defines a command's flags and runs its absl `main`: a user error or a
  bad flag value prints one line and exits with status 2."""

  define_flags()
  app.run(guarded(main), flags_parser=parse_flags)
