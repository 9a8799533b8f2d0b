r"""Throughput of the data pipelines vs a PIL implementation of the reference's.

    python benchmarks/data_throughput.py                 # generated VOC-like images
    python benchmarks/data_throughput.py --crops 513 --workers 0,2 --seconds 5
    python benchmarks/data_throughput.py --root /data/VOC2012 \
        --splits_dir /data/splits/pascal --split 92     # a real VOC tree
    python benchmarks/data_throughput.py --recipes voc,cityscapes --step-s 0.1,0.3 \
        --devices 1,8                                   # CPU cost of a training step

`--recipes`: the input work of one training step. For each recipe (`voc`:
VOC-sized JPEGs, crop 513; `cityscapes`: 1024x2048 PNGs, crop 801; both
with the reference's rescale range 0.5-2.0, generated images) it measures
samples per CPU-second of the three streams a DSSN step reads, each in
this process (no workers, one reading thread, so CPU time is the work
itself): labeled views, unlabeled views (weak, two strong, cutmix boxes) and
the mix partner's views, and reports the CPU-seconds per step for `--batch`
labeled + `--batch` unlabeled images per device (default 8 + 8), and, for
each `--step-s` and `--devices` (per host), the cores the host needs to keep
up: devices x CPU-seconds per step / step time. `main.py` sizes its worker
count from these per-sample costs (`dssn_jax.data.pipeline.auto_workers`).

Measures samples per second of

- `ours labeled`: the labeled stream of `dssn_jax.data.pipeline` (decode,
  rescale, crop, flip: `x`, `y`);
- `ours unlabeled`: the unlabeled stream (decode, weak view, two strong
  views, ignore map, two cutmix boxes);
- `PIL unlabeled`: the reference's unlabeled `__getitem__` (DSSN
  `voc/dataset/semi.py`, mode `train_u`) rewritten here with PIL and numpy as
  torchvision runs it on PIL images, minus the final `ToTensor`/`Normalize`
  (our pipeline normalizes on the device, so neither side pays for it);

each through the same grain harness (shuffle, `random_map`, batch,
`mp_prefetch`) with 0, 1 and 2 worker processes and one reading thread per
process. Besides wall-clock samples/s it reports samples per CPU-second of
the whole process tree (main process and workers, via psutil): the per-core
figure, which is what the comparison target (ours >= 1.5x the PIL baseline)
is about and which other load on the machine disturbs least.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dssn_jax import xla_flags  # noqa: E402  pylint: disable=wrong-import-position

xla_flags.set_default_cpu_flags()  # as main.py (this script computes nothing in XLA)

# VOC's typical image sizes (H, W).
VOC_SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (281, 500), (500, 354))


# ----------------------------------------------------------------------------
# The reference's unlabeled transform, in PIL (what torchvision does on PIL).


def _ref_resize(img, mask, ratio_range, rnd):
  w, h = img.size
  long_side = rnd.randint(int(max(h, w) * ratio_range[0]), int(max(h, w) * ratio_range[1]))
  if h > w:
    oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
  else:
    ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
  return img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


def _ref_crop(img, mask, size, ignore_value, rnd):
  w, h = img.size
  padw, padh = max(size - w, 0), max(size - h, 0)
  img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
  mask = ImageOps.expand(mask, border=(0, 0, padw, padh), fill=ignore_value)
  w, h = img.size
  x, y = rnd.randint(0, w - size), rnd.randint(0, h - size)
  return img.crop((x, y, x + size, y + size)), mask.crop((x, y, x + size, y + size))


def _ref_hflip(img, mask, rnd):
  if rnd.random() < 0.5:
    return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
  return img, mask


def _pil_hue(img, factor):
  h, s, v = img.convert('HSV').split()
  np_h = np.array(h, dtype=np.uint8)
  np_h += np.uint8(int(factor * 255) % 256)
  return Image.merge('HSV', (Image.fromarray(np_h, 'L'), s, v)).convert('RGB')


def _ref_color_jitter(img, rnd):
  """torchvision ColorJitter(0.5, 0.5, 0.5, 0.25) on a PIL image."""
  order = list(range(4))
  rnd.shuffle(order)
  b, c, s = (rnd.uniform(0.5, 1.5) for _ in range(3))
  h = rnd.uniform(-0.25, 0.25)
  for i in order:
    if i == 0:
      img = ImageEnhance.Brightness(img).enhance(b)
    elif i == 1:
      img = ImageEnhance.Contrast(img).enhance(c)
    elif i == 2:
      img = ImageEnhance.Color(img).enhance(s)
    else:
      img = _pil_hue(img, h)
  return img


def _ref_ops(img, rnd, n):
  """DSSN's strong_img_aug(n, random count) with its 11 PIL ops."""

  def factor():
    return 0.95 - 0.9 * rnd.random()

  for _ in range(rnd.randint(1, n)):
    op = rnd.randrange(11)
    if op == 1:
      img = ImageOps.autocontrast(img)
    elif op == 2:
      img = ImageOps.equalize(img)
    elif op == 3:
      img = img.filter(ImageFilter.GaussianBlur(radius=rnd.uniform(0.1, 2.0)))
    elif op == 4:
      img = ImageEnhance.Contrast(img).enhance(factor())
    elif op == 5:
      img = ImageEnhance.Brightness(img).enhance(factor())
    elif op == 6:
      img = ImageEnhance.Color(img).enhance(factor())
    elif op == 7:
      img = ImageEnhance.Sharpness(img).enhance(factor())
    elif op == 8:
      img = ImageOps.posterize(img, 8 - max(1, math.ceil(4 * rnd.random())))
    elif op == 9:
      img = ImageOps.solarize(img, 256 - max(1, math.ceil(255 * rnd.random())))
    elif op == 10:
      v = 0.5 * rnd.random()
      img = _pil_hue(img, -v if rnd.random() < 0.5 else v)
  return img


def _ref_cutmix_box(size, rnd, p=0.5):
  mask = np.zeros((size, size), np.float32)
  if rnd.random() > p:
    return mask
  area = rnd.uniform(0.02, 0.4) * size * size
  while True:
    ratio = rnd.uniform(0.3, 1 / 0.3)
    w, h = int(np.sqrt(area / ratio)), int(np.sqrt(area * ratio))
    x, y = rnd.randint(0, size - 1), rnd.randint(0, size - 1)
    if x + w <= size and y + h <= size:
      break
  mask[y : y + h, x : x + w] = 1
  return mask


class ReferenceUnlabeled:
  """grain `random_map`: an `Entry` -> the reference's unlabeled views (numpy)."""

  def __init__(self, crop_size: int, max_ops: int = 3):
    self.crop_size, self.max_ops = crop_size, max_ops

  def __call__(self, entry, rng: np.random.Generator):
    rnd = random.Random(int(rng.integers(2**63)))
    img = Image.open(entry.image).convert('RGB')
    # The reference reads the mask of an unlabeled image for its size.
    if entry.mask is not None:
      mask = Image.fromarray(np.array(Image.open(entry.mask)))
    else:
      mask = Image.new('L', img.size, 0)
    img, mask = _ref_resize(img, mask, (0.5, 2.0), rnd)
    img, mask = _ref_crop(img, mask, self.crop_size, 254, rnd)
    img, mask = _ref_hflip(img, mask, rnd)
    out = {'u_w': np.asarray(img)}
    for k in ('1', '2'):
      s = img.copy()
      if rnd.random() < 0.8:
        s = _ref_color_jitter(s, rnd)
      if rnd.random() < 0.2:
        s = s.convert('L').convert('RGB')
      if rnd.random() < 0.5:
        s = s.filter(ImageFilter.GaussianBlur(radius=rnd.uniform(0.1, 2.0)))
      s = _ref_ops(s, rnd, self.max_ops)
      out['u_s' + k] = np.asarray(s)
      out['box' + k] = _ref_cutmix_box(self.crop_size, rnd)
    ignore = np.zeros((self.crop_size, self.crop_size), np.uint8)
    ignore[np.array(mask) == 254] = 255
    out['u_ignore'] = ignore
    return out


class EntryList:
  """The split's entries as a grain source (the PIL baseline reads the files)."""

  def __init__(self, entries):
    self.entries = list(entries)

  def __len__(self):
    return len(self.entries)

  def __getitem__(self, i):
    return self.entries[i]

  def __repr__(self):
    return f'EntryList({len(self.entries)})'


# ----------------------------------------------------------------------------
# Harness.


def _tree_cpu_seconds() -> float:
  import psutil  # pylint: disable=g-import-not-at-top

  me = psutil.Process()
  total = 0.0
  for p in [me] + me.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def measure(dataset, batch_size: int, workers: int, seconds: float) -> tuple[float, float]:
  """(samples per second, samples per CPU-second) of a batched MapDataset."""
  import grain  # pylint: disable=g-import-not-at-top

  from dssn_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if workers:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
      worker_init_fn=pipeline._worker_init,
    )  # pylint: disable=protected-access
  it = iter(ds)
  try:
    for _ in range(max(2, 2 * workers)):  # start-up and warm-up
      next(it)
    cpu0, t0, n = _tree_cpu_seconds(), time.perf_counter(), 0
    while True:
      next(it)
      n += batch_size
      elapsed = time.perf_counter() - t0
      if elapsed >= seconds and n >= 2 * batch_size:
        break
    cpu = _tree_cpu_seconds() - cpu0
  finally:
    if hasattr(it, 'close'):
      it.close()
  return n / elapsed, n / max(cpu, 1e-9)


def make_tree(base: str, n: int) -> tuple[str, str]:
  from dssn_jax.testing import fake_datasets  # pylint: disable=g-import-not-at-top

  return fake_datasets.make_pascal(base, n_labeled=n, n_unlabeled=n, n_val=1, sizes=VOC_SIZES)


RECIPES = {
  # name: (image sizes (H, W), crop, dataset layout)
  'voc': (VOC_SIZES, 513, 'pascal'),
  'cityscapes': (((1024, 2048),), 801, 'cityscapes'),
}


def step_cost(args) -> dict:
  """CPU-seconds of input work per training step, per recipe (see docstring)."""
  import cv2  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from dssn_jax.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  from dssn_jax.testing import fake_datasets  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()
  cv2.setNumThreads(1)
  out = {}
  for name in args.recipes:
    sizes, crop, layout = RECIPES[name]
    with tempfile.TemporaryDirectory() as tmp:
      n = args.images
      if layout == 'pascal':
        root, splits = fake_datasets.make_pascal(
          tmp, n_labeled=n, n_unlabeled=n, n_val=1, sizes=sizes
        )
      else:
        root, splits = fake_datasets.make_cityscapes(
          tmp, n_labeled=n, n_unlabeled=n, n_val=1, sizes=sizes, raw_ids_for=()
        )
      config = fake_datasets.config_for(layout, root, splits)
      labeled = datasets.get_source(config, 'labeled')
      unlabeled = datasets.get_source(config, 'unlabeled')
      geometry = dict(crop_size=crop, scale_range=(0.5, 2.0))
      strong = dict(max_ops=3, cutmix_p=0.5)
      streams = {
        'labeled': (labeled, pipeline.LabeledViews(**geometry)),
        'unlabeled': (unlabeled, pipeline.UnlabeledViews('u', **geometry, **strong)),
        'partner': (unlabeled, pipeline.UnlabeledViews('m', **geometry, **strong)),
      }
      rates = {}
      for stream, (source, fn) in streams.items():
        ds = (
          grain.MapDataset.source(source)
          .shuffle(seed=0)
          .repeat(None)
          .random_map(fn, seed=1)
          .batch(args.batch_size, drop_remainder=True)
        )
        rates[stream] = measure(ds, args.batch_size, 0, args.seconds)[1]
        print(f'  {name} {stream:<9}: {rates[stream]:6.1f} samples per CPU-second', flush=True)
    b = args.batch
    cpu_s = b / rates['labeled'] + b / rates['unlabeled'] + b / rates['partner']
    out[name] = dict(crop=crop, rates=rates, batch=b, cpu_s_per_step=cpu_s)
  print(f'\n{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}; generated images')
  print(
    '| recipe | crop | labeled / unlabeled / partner samples per CPU-s | CPU-s per step '
    '(per device) | '
    + ' | '.join(
      f'cores, {d} device{"s" if d > 1 else ""}, {s:g} s step'
      for d in args.devices
      for s in args.step_s
    )
    + ' |'
  )
  print('|' + '---|' * (4 + len(args.devices) * len(args.step_s)))
  for name, r in out.items():
    rates = ' / '.join(f'{r["rates"][k]:.0f}' for k in ('labeled', 'unlabeled', 'partner'))
    cores = ' | '.join(
      f'{d * r["cpu_s_per_step"] / s:.1f}' for d in args.devices for s in args.step_s
    )
    print(
      f'| {name} | {r["crop"]} | {rates} | {r["cpu_s_per_step"]:.3f} '
      f'({r["batch"]} + {r["batch"]}) | {cores} |'
    )
  return out


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--crops', default='321,513')
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--seconds', type=float, default=2.5, help='timed window per row')
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--images', type=int, default=24, help='generated images per split')
  parser.add_argument('--root', default='', help='a VOC root (default: generated)')
  parser.add_argument('--splits_dir', default='')
  parser.add_argument('--split', default='92')
  parser.add_argument('--recipes', default='', help='voc,cityscapes: CPU-seconds per step')
  parser.add_argument('--batch', type=int, default=8, help='per-device labeled batch (recipes)')
  parser.add_argument('--step-s', default='0.1,0.3', help='step times to feed (recipes)')
  parser.add_argument('--devices', default='1,8', help='devices per host (recipes)')
  args = parser.parse_args(argv)
  if args.recipes:
    args.recipes = args.recipes.split(',')
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
      parser.error(f'--recipes: unknown {unknown}; known: {", ".join(RECIPES)}')
    args.step_s = [float(s) for s in args.step_s.split(',')]
    args.devices = [int(d) for d in args.devices.split(',')]
  return args


def main():
  args = parse_args()
  if args.recipes:
    step_cost(args)
    return

  import cv2  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from dssn_jax import config_lib  # pylint: disable=g-import-not-at-top
  from dssn_jax.data import datasets, pipeline, sources  # pylint: disable=g-import-not-at-top

  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  cv2.setNumThreads(1)  # one core per process, as in the workers

  tmp = None
  if args.root:
    root, splits_dir = args.root, args.splits_dir
  else:
    tmp = tempfile.TemporaryDirectory()
    root, splits_dir = make_tree(tmp.name, args.images)
  config = config_lib.base_config()
  config.data.root, config.data.splits_dir, config.data.split = root, splits_dir, args.split
  labeled = datasets.get_source(config, 'labeled')
  unlabeled = datasets.get_source(config, 'unlabeled')
  try:  # the masks the reference reads along with unlabeled images
    ref_entries = sources.read_split_file(
      os.path.join(splits_dir, args.split, 'unlabeled.txt'), root, with_mask=True
    )
  except sources.DatasetError:
    ref_entries = unlabeled.entries
  crops = [int(c) for c in args.crops.split(',')]
  worker_counts = [int(w) for w in args.workers.split(',')]
  bs = args.batch_size

  def batched(source, fn):
    return (
      grain.MapDataset.source(source)
      .shuffle(seed=0)
      .repeat(None)
      .random_map(fn, seed=1)
      .batch(bs, drop_remainder=True)
    )

  results = {}
  for crop in crops:
    geometry = dict(crop_size=crop, scale_range=(0.5, 2.0))
    rows = {
      'ours labeled': batched(labeled, pipeline.LabeledViews(**geometry)),
      'ours unlabeled': batched(
        unlabeled, pipeline.UnlabeledViews('u', **geometry, max_ops=3, cutmix_p=0.5)
      ),
      'PIL unlabeled': batched(EntryList(ref_entries), ReferenceUnlabeled(crop, 3)),
    }
    for name, ds in rows.items():
      for w in worker_counts:
        results[crop, name, w] = measure(ds, bs, w, args.seconds)
        print(
          f'  crop {crop} {name:<15} workers {w}: {results[crop, name, w][0]:7.1f} '
          f'samples/s, {results[crop, name, w][1]:6.1f} per CPU-s',
          flush=True,
        )

  print(
    f'\n{os.cpu_count()} CPU cores; batch {bs}; one reading thread per process; '
    f'{"generated VOC-sized images" if tmp else root}'
  )
  head = '| crop | pipeline | ' + ' | '.join(f'{w} workers' for w in worker_counts)
  print(head + ' | per CPU-second | ours / PIL per core |')
  print('|' + '---|' * (len(worker_counts) + 4))
  for crop in crops:
    pil = np.median([results[crop, 'PIL unlabeled', w][1] for w in worker_counts])
    for name in ('ours labeled', 'ours unlabeled', 'PIL unlabeled'):
      walls = ' | '.join(f'{results[crop, name, w][0]:.1f}' for w in worker_counts)
      per_core = np.median([results[crop, name, w][1] for w in worker_counts])
      ratio = f'{per_core / pil:.2f}x' if name == 'ours unlabeled' else ''
      print(f'| {crop} | {name} | {walls} | {per_core:.1f} | {ratio} |')
  print('(samples/s by worker count; per CPU-second: median over the worker counts)')
  if tmp is not None:
    tmp.cleanup()


if __name__ == '__main__':
  main()
