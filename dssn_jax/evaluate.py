"""Evaluation: mIoU of student and teacher from a confusion matrix.

The protocol is the reference's (UniMatch/DSSN `evaluate` +
`intersectionAndUnion`): per-class intersection and union are summed over the
whole validation set (every host's share), IoU = intersection / (union +
1e-10), and mIoU is the mean over all classes, in percent. Never the mean of
per-image or per-batch scores.

Three modes, as the reference runs them:

  original        whole image, no resize (VOC, COCO); with
                  `config.data.eval_resize_multiple=m > 0` (UniMatch V2's
                  ViTs: 14) each image is resized (bilinear, align corners)
                  to `int(side / m + 0.5) * m` per side and the logits back.
  center_crop     the central `eval_crop_size` crop (the data pipeline cuts
                  it; records larger than the crop are cut here the same way).
  sliding_window  windows of `eval_crop_size` at row/column starts
                  0, s, 2s, ... < H (or W) with s = int(2/3 * window); a window
                  running past the border is truncated, not shifted, so an
                  image smaller than the window still gets a window at every
                  start below its size. Softmax probabilities are summed over
                  windows, then argmax (Cityscapes). With
                  `config.data.eval_window_edges='shift'` (UniMatch V2) the
                  last window of a row or column ends at the border instead.

The forward is compiled once per input shape, one program serving both
student and teacher. VOC's validation images come in hundreds of shapes, so
compilation would dominate the first evaluation; `Evaluator.precompile`
compiles every shape of the set ahead of time in a background thread (the
training loop starts it, so the compiler runs on host CPUs while the
accelerator trains), and the persistent compilation cache
(`dssn_jax.compilation`) lets later processes load the programs from disk.
Neither changes a number. `config.data.eval_pad_to = N` pads every image at
the bottom and right to a multiple of N with zeros and the labels with
ignore, which bounds the number of programs (VOC at N=64: at most 64
shapes) but changes the predictions near the padding: docs/performance.md
gives the measured mIoU difference. The default, -1, is 0 (exact shapes,
the reference protocol) on a CPU and 64 on GPUs and TPUs (`resolve_pad_to`);
`eval_pad_to=0` restores the exact protocol there. Each host evaluates its own records on its local
devices, one image per device (images of equal shape are grouped so all
local devices work); confusion matrices accumulate on device and are summed
over hosts once at the end.

`python -m dssn_jax.evaluate --workdir DIR [--checkpoint best|latest|STEP]
[--mode MODE]` prints the eval record as JSON; `--weights FILE --config
configs/X.py` evaluates converted reference weights (`.pth`) or our `.npz`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dssn_jax import cli, compilation, distributed, loading, models
from dssn_jax.data import datasets, pipeline
from dssn_jax.models import layers
from dssn_jax.normalize import normalize

MODES = ('original', 'center_crop', 'sliding_window')
MODEL_NAMES = ('student', 'teacher')
# Result keys per model: the student's are the plain names (also used for a
# single converted checkpoint), the teacher's carry a suffix.
_SUFFIX = {'student': '', 'teacher': '_teacher'}
# Device accumulators are int32; they are moved to host int64 before the
# pixels counted since the last move could overflow them.
_INT32_SAFE_PIXELS = 2**31 - 1


# ----------------------------------------------------------------------------
# Confusion matrix and IoU.


def confusion_matrix(
  pred: jax.Array, label: jax.Array, num_classes: int, ignore_index: int = 255
) -> jax.Array:
  """Counts of (ground truth, prediction) pairs over non-ignored pixels.

  Args:
    pred: int predictions, any shape.
    label: int labels, same shape; `ignore_index` (and any value outside
      [0, num_classes)) is not counted.
    num_classes: C.
    ignore_index: the label of pixels that never count.
  Returns:
    int32 `(C, C)`: entry [t, p] is the number of pixels labelled t and
    predicted p (rows: ground truth, columns: prediction).
  """
  c = int(num_classes)
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
  label = jnp.asarray(label).astype(jnp.int32).reshape(-1)
  valid = (label != ignore_index) & (label >= 0) & (label < c) & (pred >= 0) & (pred < c)
  index = jnp.where(valid, label * c + pred, c * c)  # c*c: the discard bin
  counts = jnp.bincount(index, length=c * c + 1)[: c * c]
  return counts.reshape(c, c).astype(jnp.int32)


def iou_from_confusion(cm) -> tuple[float, np.ndarray]:
  """mIoU and per-class IoU (percent) from a summed confusion matrix.

  Same numbers as the reference: intersection = diagonal, union = predicted
  + labelled - intersection, IoU = intersection / (union + 1e-10), mIoU = the
  mean over all C classes (a class absent from labels and predictions counts
  as 0, as in the reference).

  Args:
    cm: `(C, C)` counts, rows ground truth, columns prediction.
  Returns:
    `(miou, iou_per_class)`: a float and a float64 `(C,)` array, in percent.
  """
  cm = np.asarray(cm, dtype=np.int64)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f'confusion matrix must be square (C, C), got shape {cm.shape}')
  intersection = np.diag(cm).astype(np.float64)
  union = cm.sum(axis=0) + cm.sum(axis=1) - np.diag(cm)
  iou = intersection / (union.astype(np.float64) + 1e-10)
  return float(np.mean(iou) * 100.0), iou * 100.0


# ----------------------------------------------------------------------------
# Forward passes.


def sliding_window_stride(window: int) -> int:
  """The reference's stride: `int(window * 2 / 3)`."""
  stride = int(window * 2 / 3)
  if stride < 1:
    raise ValueError(f'sliding window size {window} is too small (stride would be {stride})')
  return stride


def window_starts(size: int, stride: int, window: int | None = None, shift: bool = False):
  """Window starts along one axis.

  `shift=False` (UniMatch V1 / DSSN): 0, stride, 2*stride, ... below `size`,
  the last windows truncated at the border. `shift=True` (UniMatch V2): the
  same, but the last start is `size - window`, so every window is whole (a
  ViT needs its sides to stay multiples of 14); one window when `size <= window`.
  """
  if not shift:
    return list(range(0, size, stride))
  if size <= window:
    return [0]
  starts = [0]
  while starts[-1] != size - window:
    starts.append(min(starts[-1] + stride, size - window))
  return starts


def sliding_window_probs(
  logits_fn: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  window: int,
  stride: int | None = None,
  shift: bool = False,
) -> jax.Array:
  """Softmax probabilities summed over the reference's sliding windows.

  Windows start at every multiple of `stride` below H (rows) and W (columns)
  and span `window` pixels, truncated at the bottom/right border. All windows
  of one shape go through `logits_fn` as one batch; the sums are added in
  row-major window order, as the reference loop does.

  Args:
    logits_fn: maps `(N, h, w, ...)` images to `(N, h, w, C)` logits.
    images: `(B, H, W, ...)`, passed to `logits_fn` as sliced.
    window: window side (the crop size).
    stride: default `int(window * 2 / 3)`.
    shift: the last windows end at the border instead of being truncated
      (`window_starts`; UniMatch V2).
  Returns:
    float32 `(B, H, W, C)`.
  """
  stride = sliding_window_stride(window) if stride is None else int(stride)
  b, h, w = images.shape[:3]
  rows, cols = window_starts(h, stride, window, shift), window_starts(w, stride, window, shift)
  positions = [(r, c) for r in rows for c in cols]
  groups: dict[tuple[int, int], list[tuple[int, int]]] = collections.defaultdict(list)
  for r, c in positions:
    groups[(min(h, r + window) - r, min(w, c + window) - c)].append((r, c))

  probs = {}
  for (wh, ww), group in groups.items():
    crops = jnp.stack([images[:, r : r + wh, c : c + ww] for r, c in group], axis=1)
    logits = logits_fn(crops.reshape((b * len(group), wh, ww) + images.shape[3:]))
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p = p.reshape((b, len(group)) + p.shape[1:])
    for i, pos in enumerate(group):
      probs[pos] = p[:, i]

  num_classes = next(iter(probs.values())).shape[-1]
  total = jnp.zeros((b, h, w, num_classes), jnp.float32)
  for r, c in positions:
    p = probs[(r, c)]
    region = lax.dynamic_slice(total, (0, r, c, 0), p.shape)
    total = lax.dynamic_update_slice(total, region + p, (0, r, c, 0))
  return total


def resized_size(h: int, w: int, multiple: int) -> tuple[int, int]:
  """UniMatch V2's input size: each side to its nearest multiple, `int(s / m + 0.5) * m`."""
  size = (int(h / multiple + 0.5) * multiple, int(w / multiple + 0.5) * multiple)
  if min(size) < multiple:
    raise ValueError(f'image {h}x{w} is too small to resize to a multiple of {multiple}')
  return size


def model_logits_fn(model, variables, resize_multiple: int = 0) -> Callable[[jax.Array], jax.Array]:
  """uint8 `(N, H, W, 3)` images -> float32 logits `(N, H, W, C)` in eval mode.

  `resize_multiple > 0` (UniMatch V2's `original` mode, 14 for its ViTs): the
  normalized image is resized (bilinear, align corners) to the nearest
  multiple of it per side (`resized_size`), and the logits back to `(H, W)`.
  """

  def fn(images):
    x = normalize(images)
    h, w = x.shape[1:3]
    if resize_multiple:
      x = layers.resize_bilinear(x, resized_size(h, w, resize_multiple))
    logits, _ = model.apply(variables, x, train=False)
    logits = logits.astype(jnp.float32)
    if resize_multiple:
      logits = layers.resize_bilinear(logits, (h, w))
    return logits

  return fn


def predict_labels(
  model,
  variables,
  images: jax.Array,
  *,
  sliding: bool,
  window: int | None = None,
  resize_multiple: int = 0,
  shift_windows: bool = False,
) -> jax.Array:
  """Argmax labels of uint8 `(B, H, W, 3)` images -> int32 `(B, H, W)`.

  `sliding=False`: one whole-image forward (resized to a multiple of
  `resize_multiple` and back when it is > 0); `sliding=True`: the
  reference's sliding windows of side `window`. Traceable (use inside `jit`).
  """
  if sliding and resize_multiple:
    raise ValueError(
      'config.data.eval_resize_multiple applies to the original mode, not sliding_window'
    )
  logits_fn = model_logits_fn(model, variables, resize_multiple)
  if sliding:
    if window is None:
      raise ValueError('sliding-window prediction needs a window size')
    scores = sliding_window_probs(logits_fn, images, window, shift=shift_windows)
  else:
    scores = logits_fn(images)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# `config.data.eval_pad_to=-1` (the default): exact shapes on a CPU, buckets
# of this many pixels on an accelerator (VOC: at most 64 shapes, 13 of them
# in its validation set, for 12% more pixels; docs/performance.md).
ACCELERATOR_PAD_TO = 64


def resolve_pad_to(pad_to: int, platform: str | None = None) -> int:
  """`config.data.eval_pad_to` as a bucket size: -1 (auto) is 0 (exact
  shapes, the reference protocol) on a CPU backend and `ACCELERATOR_PAD_TO`
  on GPUs and TPUs, where compiling a program per image shape costs more
  than evaluating; N >= 0 as given."""
  pad_to = int(pad_to)
  if pad_to < -1:
    raise ValueError(f'config.data.eval_pad_to={pad_to} must be -1 (auto), 0 (exact shapes) or N')
  if pad_to == -1:
    return 0 if (platform or jax.default_backend()) == 'cpu' else ACCELERATOR_PAD_TO
  return pad_to


def pad_to_multiple(image: np.ndarray, label: np.ndarray, multiple: int, ignore_index: int):
  """Pads `image` (zeros) and `label` (`ignore_index`) at the bottom and right
  so that both sides are multiples of `multiple` (the shape buckets)."""
  h, w = image.shape[:2]
  ph, pw = -h % multiple, -w % multiple
  if not ph and not pw:
    return image, label
  image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
  label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
  return image, label


def center_crop(image: np.ndarray, label: np.ndarray, size: int):
  """The reference's center crop of every side longer than `size`."""
  h, w = image.shape[:2]
  top = (h - size) // 2 if h > size else 0
  left = (w - size) // 2 if w > size else 0
  return (
    image[top : top + min(h, size), left : left + min(w, size)],
    label[top : top + min(h, size), left : left + min(w, size)],
  )


# ----------------------------------------------------------------------------
# The evaluator.


def _eval_step(
  variables,
  cm,
  images,
  labels,
  *,
  model,
  sliding,
  window,
  resize_multiple,
  shift_windows,
  num_classes,
  ignore_index,
):
  """Adds one model's confusion matrix of one batch to `cm`.

  One model per call: the variables are an argument, so student and teacher
  share one compiled program per input shape.
  """
  pred = predict_labels(
    model,
    variables,
    images,
    sliding=sliding,
    window=window,
    resize_multiple=resize_multiple,
    shift_windows=shift_windows,
  )
  return cm + confusion_matrix(pred, labels, num_classes, ignore_index)


def _local_devices(mesh: Mesh | None) -> list[jax.Device]:
  if mesh is None:
    return list(jax.local_devices())
  me = jax.process_index()
  devices = [d for d in mesh.devices.flat if d.process_index == me]
  if not devices:
    raise ValueError(f'the mesh {mesh} has no device of process {me}')
  return devices


def _sum_over_hosts(cms: np.ndarray) -> np.ndarray:
  """Sums int64 counts over processes (int32 halves, since x64 is off)."""
  cms = np.asarray(cms, np.int64)
  hi = (cms >> 31).astype(np.int32)
  lo = (cms & (2**31 - 1)).astype(np.int32)
  both = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.int64)
  return (both[:, 0] << 31).sum(axis=0) + both[:, 1].sum(axis=0)


class Evaluator:
  """Evaluates student and/or teacher in one pass over the validation set.

  Args:
    model: a flax module; `model.apply(variables, images, train=False)`
      returns `(logits, aux)` with logits `(N, H, W, C)` at input size.
    config: the experiment config (`config.data.num_classes`, `ignore_index`,
      `eval_mode`, `eval_crop_size`, `crop_size`).
    mesh: the training mesh; this host's devices of it run the evaluation
      (default: all local devices).
    mode: overrides `config.data.eval_mode`.
    pad_to: overrides `config.data.eval_pad_to` (-1: auto, `resolve_pad_to`;
      0: exact shapes; N: pad every image to multiples of N).
    records: validation records `{'image': uint8 (H, W, 3), 'label': int
      (H, W), 'id': str}` of this host: a sequence, or a callable returning
      a fresh iterable per evaluation. Default:
      `dssn_jax.data.pipeline.eval_records(config, mode)`.
    class_names: default `dssn_jax.data.datasets.class_names(config)`.
  """

  def __init__(
    self,
    model,
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    *,
    mode: str | None = None,
    records: Sequence[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]] | None = None,
    class_names: Sequence[str] | None = None,
    pad_to: int | None = None,
  ):
    self.model = model
    self.config = config
    self.mode = mode or config.data.eval_mode
    if self.mode not in MODES:
      raise ValueError(
        f'evaluation mode {self.mode!r} (config.data.eval_mode or --mode) is not one of '
        f'{", ".join(MODES)}'
      )
    self.num_classes = int(config.data.num_classes)
    self.ignore_index = int(config.data.ignore_index)
    self.window = int(config.data.eval_crop_size or config.data.crop_size)
    self.resize_multiple = int(config.data.eval_resize_multiple) if self.mode == 'original' else 0
    if config.data.eval_window_edges not in ('truncate', 'shift'):
      raise ValueError(
        f'config.data.eval_window_edges={config.data.eval_window_edges!r} must be truncate or shift'
      )
    if self.window < 2:
      raise ValueError(f'evaluation crop size {self.window} must be at least 2')
    self.pad_to = resolve_pad_to(config.data.eval_pad_to if pad_to is None else pad_to)
    self._records = records
    self._compiled: dict[tuple[int, int], Any] = {}  # (H, W) -> AOT-compiled step
    self._precompile_thread: threading.Thread | None = None
    self._precompile_stop = threading.Event()
    self.precompile_error: BaseException | None = None
    self._class_names = list(class_names) if class_names is not None else None

    devices = _local_devices(mesh)
    self.batch_size = len(devices)  # one image per local device
    self._mesh = Mesh(np.asarray(devices), ('data',))
    self._batch_sharding = NamedSharding(self._mesh, P('data'))
    self._replicated = NamedSharding(self._mesh, P())
    self._flush_pixels = _INT32_SAFE_PIXELS
    # The forward of every evaluation (and of `predict`'s class maps).
    forward = dict(
      sliding=self.mode == 'sliding_window',
      window=self.window,
      resize_multiple=self.resize_multiple,
      shift_windows=config.data.eval_window_edges == 'shift',
    )
    step = lambda v, cm, x, y: _eval_step(
      v,
      cm,
      x,
      y,
      model=model,
      **forward,
      num_classes=self.num_classes,
      ignore_index=self.ignore_index,
    )
    self._step = jax.jit(step, donate_argnums=(1,), out_shardings=self._replicated)
    self._predict = jax.jit(
      lambda v, x: predict_labels(model, v, x, **forward), out_shardings=self._replicated
    )

  @property
  def class_names(self) -> list[str]:
    if self._class_names is None:
      self._class_names = list(datasets.class_names(self.config))
    if len(self._class_names) != self.num_classes:
      raise ValueError(
        f'{len(self._class_names)} class names for config.data.num_classes={self.num_classes}'
      )
    return self._class_names

  def _iter_records(self) -> Iterable[dict[str, Any]]:
    if self._records is None:
      # Decode a few images ahead in threads while the devices compute;
      # a small buffer, since whole validation images can be large.
      return pipeline.eval_records(self.config, mode=self.mode).to_iter_dataset(
        grain.ReadOptions(num_threads=4, prefetch_buffer_size=4 * self.batch_size)
      )
    if callable(self._records):
      return self._records()
    return self._records

  def _prepare(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(record['image'])
    label = np.asarray(record['label'])
    rid = record.get('id', '?')
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(
        f'eval record {rid!r}: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}'
      )
    if label.shape != image.shape[:2]:
      raise ValueError(
        f'eval record {rid!r}: label shape {label.shape} != image shape {image.shape[:2]}'
      )
    label = label.astype(np.int32)
    if self.mode == 'center_crop':
      image, label = center_crop(image, label, self.window)
    if self.pad_to:
      image, label = pad_to_multiple(image, label, self.pad_to, self.ignore_index)
    return image, label

  # --------------------------------------------------------------------------
  # Ahead-of-time compilation.

  def _abstract_args(self, variables: Any, shape: tuple[int, int]):
    """Abstract arguments of the step for one model and one (H, W)."""
    b, (h, w), c = self.batch_size, shape, self.num_classes
    spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._replicated)
    return (
      jax.tree.map(spec, variables),
      jax.ShapeDtypeStruct((c, c), jnp.int32, sharding=self._replicated),
      jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=self._batch_sharding),
      jax.ShapeDtypeStruct((b, h, w), jnp.int32, sharding=self._batch_sharding),
    )

  def record_shapes(self) -> list[tuple[int, int]]:
    """The distinct (H, W) the step sees on this host's records, in order.

    Reads (decodes) every record once."""
    seen = {}
    for record in self._iter_records():
      seen.setdefault(self._prepare(record)[0].shape[:2], None)
    return list(seen)

  def compile_shape(self, variables: Any, shape: tuple[int, int]) -> None:
    """Compiles the step for one (H, W) now (once; later calls return).

    Args:
      variables: one model's `{'params', 'batch_stats'}`, arrays or
        `jax.ShapeDtypeStruct`s (only shapes and dtypes are read).
      shape: the image (H, W) after mode crop and padding.
    """
    shape = (int(shape[0]), int(shape[1]))
    if shape not in self._compiled:
      compiled = self._step.lower(*self._abstract_args(variables, shape)).compile()
      self._compiled[shape] = compiled

  def precompile(
    self,
    variables: Any,
    shapes: Iterable[tuple[int, int]] | None = None,
    *,
    background: bool = True,
    threads: int = 1,
  ) -> None:
    """Compiles the step for every shape of the validation set ahead of time.

    With `background=True` this returns at once; a daemon thread reads the
    records (for their shapes) and hands each new shape to `threads`
    compiler threads (XLA compiles outside the GIL, so they run in
    parallel). `confusion_matrices` waits for them before it starts and
    uses the compiled programs. On a GPU or TPU the compiler runs on host
    CPUs, beside the training. A compile error is kept in
    `precompile_error`; the evaluation then compiles what is missing.

    Args:
      variables: one model's variables (arrays or `ShapeDtypeStruct`s);
        student and teacher share the programs.
      shapes: the (H, W) to compile; default: every shape of the records.
      background: run in a thread (True) or here.
      threads: compiler threads.
    """
    variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), variables)

    def compile_one(shape):
      if not self._precompile_stop.is_set():
        self.compile_shape(variables, shape)

    def work():
      try:
        if shapes is not None:
          todo = shapes
        else:
          todo = (self._prepare(r)[0].shape[:2] for r in self._iter_records())
        with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
          seen, futures = set(), []
          for shape in todo:
            if self._precompile_stop.is_set():
              break
            if shape not in seen:
              seen.add(shape)
              futures.append(pool.submit(compile_one, shape))
          for f in futures:
            f.result()
      except Exception as e:  # pylint: disable=broad-except
        self.precompile_error = e

    if not background:
      work()
      if self.precompile_error is not None:
        raise self.precompile_error
      return
    self.wait_precompiled()
    self._precompile_stop.clear()
    self._precompile_thread = threading.Thread(target=work, name='eval-precompile', daemon=True)
    self._precompile_thread.start()

  def wait_precompiled(self) -> None:
    """Blocks until a background `precompile` has finished."""
    if self._precompile_thread is not None:
      self._precompile_thread.join()
      self._precompile_thread = None

  @property
  def num_compiled(self) -> int:
    """How many shapes have an ahead-of-time compiled program."""
    return len(self._compiled)

  def close(self) -> None:
    """Stops a background `precompile` after the shape it is compiling."""
    self._precompile_stop.set()
    self.wait_precompiled()

  def _to_local(self, variables: Any) -> Any:
    """Places one model's variables replicated on this host's devices."""

    def leaf(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
          raise ValueError(f'cannot evaluate with a variable sharded across hosts ({x.sharding})')
        x = x.addressable_data(0)
      return x

    return jax.device_put(jax.tree.map(leaf, variables), self._replicated)

  def confusion_matrices(self, variables: dict[str, Any]) -> dict[str, np.ndarray]:
    """One pass over the data: `{name: int64 (C, C)}` summed over all hosts.

    Args:
      variables: `{'student': {'params', 'batch_stats'}, 'teacher': ...}`
        (either or both).
    """
    unknown = sorted(set(variables) - set(MODEL_NAMES))
    if unknown or not variables:
      raise ValueError(
        f'evaluate expects models named {" and/or ".join(MODEL_NAMES)}, got {sorted(variables)}'
      )
    names = sorted(variables)
    self.wait_precompiled()
    local = {k: self._to_local(variables[k]) for k in names}
    c = self.num_classes
    zeros = lambda: jax.device_put({k: np.zeros((c, c), np.int32) for k in names}, self._replicated)
    cms = zeros()
    totals = np.zeros((len(names), c, c), np.int64)
    pending = 0  # pixels accumulated on device since the last move to host

    def to_host(cms):
      nonlocal totals
      host = jax.device_get(cms)
      totals = totals + np.stack([np.asarray(host[k], np.int64) for k in names])

    def run(batch, cms):
      nonlocal pending
      while len(batch) < self.batch_size:  # pad: all-ignore labels count nothing
        image, label = batch[0]
        batch = batch + [(np.zeros_like(image), np.full_like(label, self.ignore_index))]
      images = np.stack([b[0] for b in batch])
      labels = np.stack([b[1] for b in batch])
      if pending + labels.size > self._flush_pixels:
        to_host(cms)
        cms, pending = zeros(), 0
      pending += labels.size
      step = self._compiled.get(images.shape[1:3], self._step)
      images = jax.device_put(images, self._batch_sharding)
      labels = jax.device_put(labels, self._batch_sharding)
      return {k: step(local[k], cms[k], images, labels) for k in names}

    buckets: dict[tuple[int, int], list] = collections.defaultdict(list)
    for record in self._iter_records():
      image, label = self._prepare(record)
      bucket = buckets[image.shape[:2]]
      bucket.append((image, label))
      if len(bucket) == self.batch_size:
        cms = run(bucket, cms)
        del buckets[image.shape[:2]]
    for bucket in buckets.values():
      cms = run(bucket, cms)
    to_host(cms)
    totals = _sum_over_hosts(totals)
    return {k: totals[i] for i, k in enumerate(names)}

  def predict(
    self, variables: dict[str, Any], count: int
  ) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Class maps of this host's first `count` validation records.

    The records as evaluated (center-cropped, padded) and the same forward
    as `evaluate`, one image at a time; this host's devices only, so one
    process may call it alone.

    Args:
      variables: `{'student': ..., 'teacher': ...}` (either or both).
      count: how many records (fewer if the host holds fewer).
    Returns:
      `(images, labels, {name: class maps})`: uint8 `(H, W, 3)`, int32
      `(H, W)` and int32 `(H, W)` arrays per record, models in the order given.
    """
    images, labels = [], []
    if count > 0:
      for record in self._iter_records():
        image, label = self._prepare(record)
        images.append(image)
        labels.append(label)
        if len(images) == count:
          break
    local = {k: self._to_local(v) for k, v in variables.items()}
    preds: dict[str, list[np.ndarray]] = {k: [] for k in variables}
    for image in images:
      x = jax.device_put(image[None], self._replicated)
      for k, v in local.items():
        preds[k].append(np.asarray(jax.device_get(self._predict(v, x)))[0])
    return images, labels, preds

  def evaluate(self, variables: dict[str, Any]) -> dict[str, Any]:
    """mIoU and per-class IoU (percent) of each given model.

    Returns:
      `miou`, `iou_per_class` ({class name: IoU}) for the student and
      `miou_teacher`, `iou_per_class_teacher` for the teacher, for the
      models present in `variables`.
    """
    result = {}
    for name, cm in self.confusion_matrices(variables).items():
      miou, per_class = iou_from_confusion(cm)
      result['miou' + _SUFFIX[name]] = miou
      result['iou_per_class' + _SUFFIX[name]] = {
        n: float(v) for n, v in zip(self.class_names, per_class)
      }
    return result


def eval_record(step: int | None, result: dict[str, Any], **extra) -> dict[str, Any]:
  """The metrics.jsonl eval line: step, split, mIoU of both models, per class."""
  record = {
    'step': step,
    'split': 'eval',
    'miou': result.get('miou'),
    'miou_teacher': result.get('miou_teacher'),
    'iou_per_class': result.get('iou_per_class', result.get('iou_per_class_teacher')),
    'iou_per_class_teacher': result.get('iou_per_class_teacher'),
  }
  record.update(extra)
  return record


# ----------------------------------------------------------------------------
# The command line (the flags it shares with predict: `cli.define_model_flags`).


def run(
  *,
  workdir: str | None = None,
  checkpoint: str | int = 'best',
  mode: str | None = None,
  weights: str | None = None,
  config: ml_collections.ConfigDict | None = None,
  mesh: Mesh | None = None,
  records=None,
) -> dict[str, Any]:
  """Loads a checkpoint (or weights), evaluates it and returns the eval record."""
  config, variables, step = loading.load_for_eval(
    workdir=workdir, checkpoint=checkpoint, weights=weights, config=config
  )
  compilation.enable_persistent_cache(config.train.compilation_cache_dir)
  evaluator = Evaluator(models.model_from_config(config), config, mesh, mode=mode, records=records)
  return eval_record(step, evaluator.evaluate(variables), mode=evaluator.mode)


def _define_flags():
  cli.define_model_flags()
  flags.adopt_module_key_flags(cli)  # --helpshort lists them
  flags.DEFINE_enum('mode', None, list(MODES), 'Evaluation mode (default: the config\'s).')


def main(argv):
  cli.start_command(argv)
  distributed.initialize()  # pod slices, SLURM, Open MPI: every process evaluates its share
  f = flags.FLAGS
  record = run(
    workdir=f.workdir, checkpoint=f.checkpoint, mode=f.mode, weights=f.weights, config=f.config
  )
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  cli.run_command(main, _define_flags)
