r"""Validates a dataset before training.

    python -m dssn_jax.data check --config configs/pascal.py:split=92 \
        --config.data.root=/data/VOC2012 --config.data.splits_dir=/data/splits/pascal

Reads every record of the labeled, unlabeled and validation splits (the
unlabeled split is skipped for `supervised`) with the same code the
training pipeline uses, and prints the record counts, the range of image
sizes and the class pixel histogram of the labeled and validation masks.
Every problem (missing or unreadable files, image/mask size mismatches,
mask values outside `[0, num_classes)` and 255, empty or malformed split
files) is listed with the file and split line it came from; the exit status
is 1 if there was any.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dssn_jax import cli, config_lib, methods, xla_flags
from dssn_jax.data import datasets, sources

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Experiment config file (configs/NAME.py[:ARG]).', lock_config=True
)
flags.DEFINE_integer('max_errors', 20, 'Errors listed in full (all are counted).')
flags.DEFINE_integer('threads', min(8, os.cpu_count() or 1), 'Decoding threads.')


@dataclasses.dataclass
class SplitReport:
  """What reading one split found."""

  name: str
  count: int = 0
  min_hw: tuple[int, int] | None = None
  max_hw: tuple[int, int] | None = None
  pixels: np.ndarray | None = None  # (256,) pixel count per mask value
  images_with: np.ndarray | None = None  # (256,) images containing each value
  errors: list[str] = dataclasses.field(default_factory=list)

  def add(self, record: dict) -> None:
    h, w = record['image'].shape[:2]
    self.count += 1
    self.min_hw = (
      (h, w) if self.min_hw is None else (min(self.min_hw[0], h), min(self.min_hw[1], w))
    )
    self.max_hw = (
      (h, w) if self.max_hw is None else (max(self.max_hw[0], h), max(self.max_hw[1], w))
    )
    if 'mask' in record:
      counts = np.bincount(record['mask'].ravel(), minlength=256)
      if self.pixels is None:
        self.pixels, self.images_with = np.zeros(256, np.int64), np.zeros(256, np.int64)
      self.pixels += counts
      self.images_with += counts > 0


def _read(source, index: int):
  try:
    return source[index], None
  except sources.DatasetError as e:
    return None, str(e)


def check_split(config: ml_collections.ConfigDict, split: str, threads: int = 4) -> SplitReport:
  """Reads every record of `split`; errors are collected, not raised."""
  report = SplitReport(split)
  try:
    source = datasets.get_source(config, split)
  except (sources.DatasetError, FileNotFoundError, ValueError) as e:
    report.errors.append(f'{split}: {e}')
    return report
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    for record, error in pool.map(lambda i: _read(source, i), range(len(source))):
      if error is not None:
        report.errors.append(error)
      else:
        report.add(record)
  return report


def _histogram_lines(reports: list[SplitReport], names: tuple[str, ...]) -> list[str]:
  labeled = [r for r in reports if r.pixels is not None]
  if not labeled:
    return []
  header = f'  {"id":>3}  {"class":<20}' + ''.join(
    f'  {r.name + " px%":>14}  {"images":>7}' for r in labeled
  )
  lines = ['class pixel histogram:', header]
  ids = list(range(len(names))) + [sources.IGNORE]
  for i in ids:
    name = names[i] if i < len(names) else 'ignore (255)'
    row = f'  {i:>3}  {name[:20]:<20}'
    for r in labeled:
      total = max(1, int(r.pixels.sum()))
      row += f'  {100.0 * r.pixels[i] / total:>14.3f}  {int(r.images_with[i]):>7}'
    lines.append(row)
  for r in labeled:
    absent = [names[i] for i in range(len(names)) if r.pixels[i] == 0]
    if absent:
      lines.append(f'  note: no {r.name} pixels of {", ".join(absent)}')
  return lines


def check_dataset(
  config: ml_collections.ConfigDict,
  *,
  threads: int = 4,
  max_errors: int = 20,
  out: Callable[[str], None] = print,
) -> bool:
  """Validates every split of `config`'s dataset; prints a report.

  Returns:
    True when no record had a problem.
  """
  data = config.data
  unlabeled = methods.get(config.method).unlabeled
  splits = datasets.SPLITS if unlabeled else ('labeled', 'val')
  where = datasets.get(data.name).where(config)
  out(f'dataset {data.name}' + (f' ({where})' if where else '') + f', {data.num_classes} classes')
  reports = [check_split(config, split, threads) for split in splits]
  for r in reports:
    sizes = (
      f'sizes (HxW) {r.min_hw[0]}x{r.min_hw[1]} .. {r.max_hw[0]}x{r.max_hw[1]}'
      if r.count
      else 'no readable records'
    )
    out(
      f'  {r.name:<10} {r.count:>7} records  {sizes}'
      + (f'  ({len(r.errors)} errors)' if r.errors else '')
    )
  try:
    names = datasets.class_names(config)
  except ValueError as e:
    names = tuple(f'class_{i}' for i in range(data.num_classes))
    reports[0].errors.append(str(e))
  for line in _histogram_lines(reports, names):
    out(line)
  errors = [e for r in reports for e in r.errors]
  if errors:
    out(f'{len(errors)} errors:')
    for e in errors[:max_errors]:
      out(f'  {e}')
    if len(errors) > max_errors:
      out(f'  ... and {len(errors) - max_errors} more')
    return False
  out('OK')
  return True


def main(argv):
  if len(argv) != 2 or argv[1] != 'check':
    raise app.UsageError(
      'usage: python -m dssn_jax.data check --config configs/X.py [--config.data.root=...]',
      exitcode=2,
    )
  if FLAGS.config is None:
    raise app.UsageError('--config is required', exitcode=2)
  xla_flags.set_default_cpu_flags()
  cli.quiet_library_logs()
  config_lib.resolve(FLAGS.config)
  ok = check_dataset(FLAGS.config, threads=FLAGS.threads, max_errors=FLAGS.max_errors)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(cli.guarded(main), flags_parser=cli.parse_flags)
