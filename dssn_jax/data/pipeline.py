"""grain pipelines: the training streams and the evaluation records.

Training (`TrainData`) zips three record streams, each an infinite, per-epoch
reshuffled grain `MapDataset`:

- labeled: the labeled list repeated (and cut) to the length of the
  unlabeled list, so one epoch is one pass over the unlabeled list, as in
  the reference; views `x`, `y`.
- unlabeled: views `u_w`, `u_s1`, `u_s2`, `u_ignore`, `box1`, `box2`.
- mix partner: views `m_w`, `m_s1`, `m_s2`, `m_ignore` of the unlabeled
  list. `config.data.mix_partner='same'` (the default of dssn, unimatch and
  fixmatch) reproduces the reference: its loader iterates the unlabeled
  sampler twice, so the partner is the same image with other random views;
  `'shuffled'` reads the list in an independent order; `'reversed'`
  (unimatch_v2) has no partner stream: the step pairs the batch reversed.

Augmentations use grain's per-record `random_map` rng, drawn from the
record's position in the global stream, so a seed fixes every batch whatever
the number of workers and of hosts. The zipped stream is cut into chunks of
this host's share of the global batch, and host `p` of `n` reads chunks
`p, p + n, p + 2n, ...`: global batch `k` is chunks `k*n .. k*n + n - 1`,
records `k*B .. k*B + B - 1` in order, so any number of hosts assembles the
same global batches, in the same order, as one host (and an iterator's
position, the number of batches it gave, means the same on any number of
hosts). Chunks are read with `config.data.workers` worker processes
(`mp_prefetch`; 0 = in-process) and assembled into global `jax.Array`s with
`parallel.shard_batch`. For
`config.method == 'supervised'` only the labeled stream exists and an epoch
is a pass over the labeled list. During a supervised warm-up
(`train.warmup_terms='supervised'`, whose steps read `x`, `y` only) the
records of those steps hold the labeled views alone: the unlabeled and
partner views are not rendered, and every later record is the same as
without the skip (each record depends only on its position).

Batches (design.md "Train batch"): uint8 images, uint8 `y`/`*_ignore`, bool
boxes, leading axis sharded on `data`. `TrainData.local_batch()` gives the
host-local numpy batch with the record ids (`x_id`, `u_id`, `m_id`) too.

Evaluation (`eval_records`) gives this host's share of the validation set in
one of the evaluation modes, padded with all-ignore records so every host
has as many.
"""

from __future__ import annotations

import math
import os
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np
from absl import flags

from dssn_jax.data import datasets, sources, transforms

EVAL_MODES = ('original', 'center_crop', 'sliding_window')
MIX_PARTNER = ('same', 'shuffled', 'reversed')

# Seed derivation tags: one independent seed per (stream, purpose).
_ORDER, _AUGMENT = 0, 1
_STREAMS = {'labeled': 1, 'unlabeled': 2, 'mix': 3}


def derive_seed(seed: int, stream: str, purpose: int) -> int:
  """A uint32 seed for one stream's order or augmentations."""
  state = np.random.SeedSequence([int(seed) % 2**63, _STREAMS[stream], purpose])
  return int(state.generate_state(1)[0])


class LabeledViews:
  """grain `random_map`: labeled record -> `x`, `y`, `x_id`."""

  def __init__(self, crop_size: int, scale_range, hflip: bool = True):
    self.crop_size, self.scale_range = int(crop_size), tuple(scale_range)
    self.hflip = bool(hflip)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    views = transforms.labeled_views(
      record, rng, crop_size=self.crop_size, scale_range=self.scale_range, hflip=self.hflip
    )
    views['x_id'] = record['id']
    return views


class UnlabeledViews:
  """grain `random_map`: unlabeled record -> `<p>_w`, `<p>_s1`, `<p>_s2`, ...

  `prefix` 'u' also gives the cutmix boxes `box1`, `box2`; the mix partner
  ('m') needs none.
  """

  def __init__(
    self,
    prefix: str,
    crop_size: int,
    scale_range,
    max_ops: int,
    cutmix_p: float,
    hflip: bool = True,
  ):
    self.prefix = prefix
    self.crop_size, self.scale_range = int(crop_size), tuple(scale_range)
    self.hflip = bool(hflip)
    self.max_ops, self.cutmix_p = int(max_ops), float(cutmix_p)

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    views = transforms.unlabeled_views(
      record,
      rng,
      crop_size=self.crop_size,
      scale_range=self.scale_range,
      max_ops=self.max_ops,
      cutmix_p=self.cutmix_p,
      boxes=self.prefix == 'u',
      hflip=self.hflip,
    )
    p = self.prefix
    out = {
      f'{p}_w': views['w'],
      f'{p}_s1': views['s1'],
      f'{p}_s2': views['s2'],
      f'{p}_ignore': views['ignore'],
      f'{p}_id': record['id'],
    }
    if 'box1' in views:
      out['box1'], out['box2'] = views['box1'], views['box2']
    return out


class _ZipFrom(grain.MapDataset):
  """Zips streams of equal length into tuples, but before record `full_from`
  the tuple holds the first (labeled) stream's record alone."""

  def __init__(self, parents, full_from: int):
    super().__init__(parents)
    self._full_from = int(full_from)

  def __len__(self) -> int:
    return len(self._parents[0])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    parents = self._parents if index >= self._full_from else self._parents[:1]
    return tuple(p[index] for p in parents)

  def __str__(self) -> str:
    return f'_ZipFrom(full_from={self._full_from})'


def _merge(elements: tuple[dict[str, Any], ...]) -> dict[str, Any]:
  out = {}
  for element in elements:
    out.update(element)
  return out


_LABEL_KEYS = ('y', 'u_ignore', 'm_ignore')  # uint8 label maps (the step widens them)


def _batch_dtype(key: str, value) -> np.dtype:
  return np.dtype(np.uint8) if key in _LABEL_KEYS else np.asarray(value).dtype


def available_cores() -> int:
  """CPU cores this process may use: its affinity mask, capped by a cgroup v2
  CPU quota (`/sys/fs/cgroup/cpu.max`, what containers on rented machines set)."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  try:
    with open('/sys/fs/cgroup/cpu.max') as f:
      quota, period = f.read().split()[:2]
    if quota != 'max':
      cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
  except (OSError, ValueError):
    pass
  return cores


# CPU-seconds of input work per sample, by input profile (`Dataset.input_profile`),
# from `benchmarks/data_throughput.py --recipes voc,cityscapes` (generated
# images, scale range 0.5-2.0; docs/performance.md): labeled views, unlabeled
# views (weak, two strong, cutmix boxes), mix-partner views. VOC at crop 513;
# Cityscapes (1024x2048 PNG) at crop 801. They are 10-25% above the costs in
# docs/performance.md, so auto workers err on the side of more.
SAMPLE_CPU_S = {
  'voc': dict(crop=513, labeled=1 / 74.1, unlabeled=1 / 32.4, partner=1 / 31.6),
  'cityscapes': dict(crop=801, labeled=1 / 9.5, unlabeled=1 / 8.2, partner=1 / 8.2),
}


def input_cpu_s_per_step(
  config: ml_collections.ConfigDict, local_batch: int, unlabeled: bool = True
) -> float:
  """Estimated CPU-seconds of input work for one step of this host.

  From `SAMPLE_CPU_S` (the dataset's `input_profile`), scaled by the crop
  area; without `unlabeled` (a supervised method) a step reads labeled views
  only.
  """
  cost = SAMPLE_CPU_S[datasets.get(config.data.name).input_profile]
  per_sample = cost['labeled']
  if unlabeled:
    per_sample += cost['unlabeled'] + cost['partner']
  return local_batch * per_sample * (int(config.data.crop_size) / cost['crop']) ** 2


def auto_workers(
  config: ml_collections.ConfigDict,
  local_batch: int,
  cores: int,
  unlabeled: bool = True,
  step_s: float | None = None,
) -> int:
  """Worker processes for `config.data.workers = -1`: enough to feed a step of
  `step_s` seconds (default `config.data.workers_step_s`: the guess a run
  starts with, until it has measured its step), at most `cores - 1` (the
  main process needs one), at least 1. A run that still waits for input
  shows it in metrics.jsonl (`input_wait_frac`)."""
  cost = input_cpu_s_per_step(config, local_batch, unlabeled)
  step_s = float(config.data.workers_step_s if step_s is None else step_s)
  need = math.ceil(cost / max(step_s, 1e-3))
  return max(1, min(cores - 1, need))


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Each worker process is one core: no OpenCV thread pool inside it."""
  del worker_index, worker_count
  cv2.setNumThreads(1)


def _stream(
  source, *, length: int, seed: int, order: str, augment: str, transform
) -> grain.MapDataset:
  """An infinite, per-epoch shuffled, augmented record stream (all hosts').

  `length` is the epoch length; a shorter source is repeated (and cut) to it.
  `order` and `augment` name the streams (`_STREAMS`) whose seeds, derived
  from `seed`, fix the record order and the augmentations.
  Lazy: a host computes only the records it reads. The augmentation rng of a
  record depends on its global position, not on which host reads it.
  """
  ds = grain.MapDataset.source(source)
  n = len(ds)
  if length != n:
    ds = ds.repeat(math.ceil(length / n))[:length]
  ds = ds.shuffle(seed=derive_seed(seed, order, _ORDER)).repeat(None)
  return ds.random_map(transform, seed=derive_seed(seed, augment, _AUGMENT))


def _unlabeled_streams(
  unlabeled, config, *, epoch: int, seed: int, geometry: dict, mix_partner: str
) -> list[grain.MapDataset]:
  """The unlabeled stream (`u_*`) and, unless the partner is the batch
  reversed, the mix-partner stream (`m_*`)."""
  strong = dict(max_ops=config.data.strong_ops, cutmix_p=config.data.cutmix_p)
  streams = [
    _stream(
      unlabeled,
      length=epoch,
      seed=seed,
      order='unlabeled',
      augment='unlabeled',
      transform=UnlabeledViews('u', **geometry, **strong),
    )
  ]
  if mix_partner != 'reversed':  # 'reversed': the step pairs the batch with itself
    mix_order = 'unlabeled' if mix_partner == 'same' else 'mix'
    streams.append(
      _stream(
        unlabeled,
        length=epoch,
        seed=seed,
        order=mix_order,
        augment='mix',
        transform=UnlabeledViews('m', **geometry, **strong),
      )
    )
  return streams


def _batch_sizes(config: ml_collections.ConfigDict, process_count: int) -> int:
  global_batch = int(config.data.batch_size)
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
      f'config.data.batch_size={global_batch} must be a positive multiple of the '
      f'number of processes ({process_count})'
    )
  return global_batch // process_count


def _check_train_config(config: ml_collections.ConfigDict) -> None:
  data = config.data
  if int(data.crop_size) <= 0:
    raise ValueError(f'config.data.crop_size={data.crop_size} must be positive')
  lo, hi = tuple(data.scale_range)
  if not 0 < lo <= hi:
    raise ValueError(f'config.data.scale_range={tuple(data.scale_range)} must be 0 < lo <= hi')
  if not 0 <= float(data.cutmix_p) <= 1:
    raise ValueError(f'config.data.cutmix_p={data.cutmix_p} must be in [0, 1]')
  if int(data.strong_ops) < 0:
    raise ValueError(f'config.data.strong_ops={data.strong_ops} must be >= 0')
  if int(data.workers) < -1:
    raise ValueError(f'config.data.workers={data.workers} must be >= 0, or -1 (auto)')
  if float(data.workers_step_s) <= 0:
    raise ValueError(f'config.data.workers_step_s={data.workers_step_s} must be positive')


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; parse defaults if no app did."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainData:
  """The training batches of one host, resumable.

  Args:
    config: the experiment config (`config.data.*`).
    mesh: the data mesh; needed by `next()` (global arrays), not by
      `local_batch()`.
    seed: fixes record order and every augmentation.
    process_index, process_count: this host's shard (default: jax's).
    num_threads: threads reading batches in each process (grain
      `ReadOptions`); default 1 with worker processes, 2 without.
    settings: the resolved config (`config_lib.resolve`): whether the
      method reads the unlabeled stream, its mix partner, its labeled-only
      first steps.
    labeled_only_steps: the first steps whose batches hold `x`, `y` (and
      `x_id`) alone; None: those of `settings` (a supervised warm-up).

  Attributes:
    num_labeled, num_unlabeled: sizes of the lists (num_unlabeled is 0 for
      `supervised`, which never reads the unlabeled split).
    local_batch_size: samples per stream this host produces per step.
    labeled_only_steps: as the argument, resolved.
    workers: worker processes in use (`config.data.workers`, or
      `auto_workers` for -1).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    mesh=None,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    settings,
    num_threads: int | None = None,
    labeled_only_steps: int | None = 0,
  ):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top  # not at import: workers stay jax-free

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    _check_train_config(config)
    self.mesh = mesh
    self.supervised = not settings.unlabeled  # labeled stream only
    self.local_batch_size = _batch_sizes(config, process_count)
    # Global batch k holds records k*B .. k*B + B - 1 (B: the global batch).
    self._global_batch = self.local_batch_size * process_count
    streams, epoch = self._streams(config, seed, settings.mix_partner)
    if labeled_only_steps is None:
      labeled_only_steps = settings.labeled_only_steps(epoch)
    self.labeled_only_steps = int(labeled_only_steps)
    full_from = self.labeled_only_steps * self._global_batch if len(streams) > 1 else 0
    ds = self._records = _ZipFrom(streams, full_from).map(_merge)
    # Host p of n takes chunks p, p + n, ...: its slice of every global batch.
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    ds = ds[process_index::process_count]
    self._batches, self._config, self._num_threads = ds, config, num_threads
    self._workers = int(config.data.workers)  # -1: auto (`_read_ahead`)
    self._iterator = PositionedIterator(self._from_position)

  def _streams(self, config, seed: int, mix_partner: str) -> tuple[list, int]:
    """The record streams (labeled views, then the unlabeled ones unless
    supervised), each an epoch long, and the epoch's length."""
    data = config.data
    labeled = datasets.get_source(config, 'labeled')
    self.num_labeled = len(labeled)
    if self.num_labeled == 0:
      raise ValueError(f'the labeled split of {labeled!r} is empty')
    geometry = dict(
      crop_size=data.crop_size,
      scale_range=tuple(data.scale_range),
      hflip=bool(data.hflip),
    )
    if self.supervised:
      self.num_unlabeled = 0
      epoch = self.num_labeled
    else:
      unlabeled = datasets.get_source(config, 'unlabeled')
      self.num_unlabeled = epoch = len(unlabeled)
      if epoch == 0:
        raise ValueError(f'the unlabeled split of {unlabeled!r} is empty')
    if epoch < self._global_batch:
      raise ValueError(
        f'an epoch has {epoch} records, fewer than one global batch '
        f'(config.data.batch_size={data.batch_size})'
      )
    streams = [
      _stream(
        labeled,
        length=epoch,
        seed=seed,
        order='labeled',
        augment='labeled',
        transform=LabeledViews(**geometry),
      )
    ]
    if not self.supervised:
      streams += _unlabeled_streams(
        unlabeled, config, epoch=epoch, seed=seed, geometry=geometry, mix_partner=mix_partner
      )
    return streams, epoch

  def _from_position(self, position: int):
    """An iterator over this host's batches from batch `position` on."""
    return iter(self._read_ahead(self._batches[position:], self._config, self._num_threads))

  def workers_for_step(self, step_s: float) -> int | None:
    """The worker count `data.workers=-1` gives a step of `step_s` seconds
    (`auto_workers`); None when the config sets the count itself."""
    if int(self._config.data.workers) != -1:
      return None
    return auto_workers(
      self._config,
      self.local_batch_size,
      available_cores(),
      unlabeled=not self.supervised,
      step_s=step_s,
    )

  def resize_workers(self, workers: int) -> None:
    """Continues from the current batch with `workers` worker processes
    (the same batches: each depends only on its position)."""
    self._workers = int(workers)
    self._iterator.restart()

  def _read_ahead(self, ds, config, num_threads: int | None):
    """`ds` read ahead by threads, and by worker processes (`self.workers`)."""
    data = config.data
    workers = self._workers
    if workers == -1:
      workers = auto_workers(
        config, self.local_batch_size, available_cores(), unlabeled=not self.supervised
      )
    self.workers = workers
    threads = num_threads if num_threads is not None else (1 if workers else 2)
    prefetch = max(1, int(data.prefetch))
    it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
    )
    if workers:
      _ensure_absl_flags_parsed()
      it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch),
        worker_init_fn=_worker_init,
      )
    return it_ds

  def __iter__(self) -> TrainData:
    return self

  def local_batch(self) -> dict[str, np.ndarray]:
    """This host's next batch as numpy arrays, with the record ids."""
    batch = next(self._iterator)
    for key in _LABEL_KEYS:  # uint8 already (class ids < 255, ignore 255)
      if key in batch and batch[key].dtype != np.uint8:
        batch[key] = batch[key].astype(np.uint8)
    return batch

  def __next__(self):
    """The next global batch: `jax.Array`s sharded on the mesh's `data` axis."""
    return self.to_device(self.local_batch())

  def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A `local_batch()` as the global batch, sharded on the mesh's `data` axis."""
    if self.mesh is None:
      raise ValueError('TrainData was built without a mesh; use local_batch()')
    from dssn_jax import parallel  # pylint: disable=g-import-not-at-top  # imports jax

    return parallel.shard_batch(
      {k: v for k, v in batch.items() if not k.endswith('_id')}, self.mesh
    )

  def batch_spec(self) -> dict[str, Any]:
    """The global batch of a step that reads every stream (one past
    `labeled_only_steps`), as `jax.ShapeDtypeStruct`s sharded on the mesh's
    `data` axis: for compiling that step's program before such a batch
    exists. Renders one record."""
    import jax  # pylint: disable=g-import-not-at-top  # not at import: workers stay jax-free

    from dssn_jax import parallel  # pylint: disable=g-import-not-at-top  # imports jax

    if self.mesh is None:
      raise ValueError('TrainData was built without a mesh')
    record = self._records[self.labeled_only_steps * self._global_batch]
    sharding = parallel.data_sharding(self.mesh)
    return {
      k: jax.ShapeDtypeStruct(
        (self._global_batch, *np.shape(v)), _batch_dtype(k, v), sharding=sharding
      )
      for k, v in record.items()
      if not k.endswith('_id')
    }

  def checkpoint_items(self) -> dict[str, grain.DatasetIterator]:
    """Iterators for orbax (`grain.checkpoint.CheckpointSave/Restore`)."""
    return {'train': self._iterator}

  def get_state(self) -> dict[str, Any]:
    """JSON-able position of the stream (resume with `set_state`)."""
    return {'train': self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state['train'])

  def close(self) -> None:
    """Stops the worker processes."""
    self._iterator.close()


class PositionedIterator(grain.DatasetIterator):
  """A host's batch stream whose checkpointed state is its position (batches
  taken so far), not grain's per-worker state: every batch is a function of
  its position, so a run resumes with any number of input workers, and the
  count can change within a run (`restart`).

  Args:
    build: `position -> iterator` over the batches from `position` on.
  """

  def __init__(self, build):
    super().__init__()
    self._build = build
    self._position = 0
    self._inner = build(0)

  def __next__(self):
    batch = next(self._inner)
    if self._position is not None:
      self._position += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    if self._position is None:  # restored from grain's own state (below)
      return self._inner.get_state()
    return {'position': self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    if 'position' not in state:
      # A checkpoint of an earlier dssn_jax: grain's state, which restores
      # only with the worker count that wrote it.
      self._inner.set_state(state)
      self._position = None
      return
    self._position = int(state['position'])
    self.restart()

  def restart(self) -> None:
    """Rebuilds the pipeline at the current position (new workers)."""
    if self._position is None:
      raise ValueError('the input position of this run is grain state: it cannot restart')
    self._close_inner()
    self._inner = self._build(self._position)

  def _close_inner(self) -> None:
    close = getattr(self._inner, 'close', None)
    if close is not None:
      close()

  def close(self) -> None:
    self._close_inner()


# ----------------------------------------------------------------------------
# Evaluation.


class EvalView:
  """Index -> eval record `{'image', 'label' int32, 'id'}`; past the end, padding."""

  def __init__(self, source, mode: str, crop_size: int):
    self.source, self.mode, self.crop_size = source, mode, int(crop_size)

  def __call__(self, index: int) -> dict[str, Any]:
    if index >= len(self.source):
      s = self.crop_size
      return {
        'image': np.zeros((s, s, 3), np.uint8),
        'label': np.full((s, s), sources.IGNORE, np.int32),
        'id': '',
      }
    record = self.source[index]
    image, mask = record['image'], record['mask']
    if self.mode == 'center_crop':
      image, mask = transforms.center_crop(image, mask, self.crop_size)
    return {'image': image, 'label': mask.astype(np.int32), 'id': record['id']}


def eval_records(
  config: ml_collections.ConfigDict,
  mode: str | None = None,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.MapDataset:
  """This host's share of the validation records for `mode`.

  Args:
    config: the experiment config.
    mode: `original` and `sliding_window` give whole images (no resize);
      `center_crop` a center crop of `config.data.eval_crop_size or crop_size`
      (label 255 where the image is smaller). Default
      `config.data.eval_mode`.
    process_index, process_count: this host's shard (default: jax's).
  Returns:
    A grain `MapDataset` (len, indexing, iteration; `.to_iter_dataset()` to
    read ahead in threads) of `{'image': uint8 (H, W, 3), 'label': int32
    (H, W), 'id': str}`: records `index::count` of the split, then padding
    records (all-255 labels, id '') so every host has `ceil(n / count)`.
  """
  mode = mode or config.data.eval_mode
  if mode not in EVAL_MODES:
    raise ValueError(
      f'eval mode {mode!r} (config.data.eval_mode) is not one of {", ".join(EVAL_MODES)}'
    )
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # not at import: workers stay jax-free

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  source = datasets.get_source(config, 'val')
  per_host = math.ceil(len(source) / process_count)
  crop = config.data.eval_crop_size or config.data.crop_size
  indices = grain.MapDataset.range(per_host * process_count)[process_index::process_count]
  return indices.map(EvalView(source, mode, crop))
