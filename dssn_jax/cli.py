"""What every command line of dssn_jax shares: user errors and quiet logs.

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

from absl import flags
from absl import logging as absl_logging

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
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
    print('Pass --helpshort or --helpfull to see help on flags.', file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)
