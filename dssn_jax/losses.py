"""The DSSN loss terms, on channels-last logits `(N, H, W, C)`.

- `supervised_ce`: `L_x`, mean cross-entropy over labeled pixels.
- `ohem_ce`: `L_x` of the Cityscapes recipe (TorchSemiSeg's
  ProbOhemCrossEntropy2d).
- `pseudo_label_ce`: the weak-to-strong and feature-perturbation terms, whose
  denominator counts every valid pixel, not only the selected ones.
- `alignment_loss`: the dual-level alignment (image level on the two strong
  views, feature level on the two perturbed branches).

Every reduction runs in float32 whatever the logits' dtype. The pseudo-label
masks live in `pseudo_labels` and are re-exported here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def _check(logits, labels, name: str) -> None:
  if logits.ndim != 4:
    raise ValueError(f'{name}: logits must be (N, H, W, C), got shape {logits.shape}')
  if labels.shape != logits.shape[:3]:
    raise ValueError(
      f'{name}: labels {labels.shape} do not match the (N, H, W) of logits {logits.shape}'
    )


def cross_entropy_map(logits: jax.Array, labels: jax.Array, pick: str = 'onehot') -> jax.Array:
  """Per-pixel cross-entropy, float32 `(N, H, W)`.

  Args:
    logits: `(N, H, W, C)`.
    labels: int `(N, H, W)`; values outside `[0, C)` (ignore) give a finite,
      meaningless value, so callers mask them out.
    pick: how the label's logit is read: 'onehot' (default) selects it
      with a one-hot mask and sums over classes, elementwise ops whose
      gradient is a select; 'gather' (the former form) gathers it, whose
      gradient is a scatter. Both give the same value (one logit plus exact
      zeros).
  """
  logits = logits.astype(jnp.float32)
  safe = jnp.clip(labels, 0, logits.shape[-1] - 1).astype(jnp.int32)
  if pick == 'gather':
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
  elif pick == 'onehot':
    hot = safe[..., None] == jnp.arange(logits.shape[-1], dtype=jnp.int32)
    picked = jnp.sum(jnp.where(hot, logits, 0.0), axis=-1)
  else:
    raise ValueError(f"cross_entropy_map pick {pick!r} must be 'onehot' or 'gather'")
  return jax.nn.logsumexp(logits, axis=-1) - picked


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` where `mask`; 0 when nothing is selected (torch: NaN)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def supervised_ce(
  logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
  """Mean CE over pixels whose label is not `ignore_index`.

  Args:
    logits: `(N, H, W, C)`.
    labels: int `(N, H, W)`.
  Returns:
    float32 scalar.
  """
  _check(logits, labels, 'supervised_ce')
  return _masked_mean(cross_entropy_map(logits, labels), labels != ignore_index)


def kth_smallest(x: jax.Array, k: int) -> jax.Array:
  """The `k`-th smallest value (1-based) of a non-negative float32 `(P,)`,
  exactly `jnp.sort(x)[k - 1]`, without a sort.

  Non-negative float32s order as their int32 bit patterns do, so a bisection
  over the 31 bits finds the smallest pattern `b` with `count(x <= b) >= k`:
  31 compare-and-count passes over `x`, no sort (slow on TPUs) and nothing
  of size `P` but the compares. `-0.0` counts as `0.0`, NaN as inf.
  """
  if not 1 <= k <= x.shape[0]:
    raise ValueError(f'kth_smallest: k={k} outside 1..{x.shape[0]}')
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  bits = jnp.clip(bits, 0, 0x7F800000)  # -0.0 as 0.0; NaN as inf (no int32 overflow)

  def halve(_, bounds):
    lo, hi = bounds  # count(bits <= lo) < k <= count(bits <= hi)
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid, dtype=jnp.int32) >= k
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  _, hi = jax.lax.fori_loop(0, 32, halve, (jnp.int32(-1), jnp.max(bits)))
  return jax.lax.bitcast_convert_type(hi, jnp.float32)


def _ohem_keep(true_prob: jax.Array, valid: jax.Array, thresh: float, min_kept: int) -> jax.Array:
  """ProbOhemCrossEntropy2d's pixel selection over one flat group `(P,)`.

  Pixels whose true-class probability is at most `thresh` are kept; if fewer
  than `min_kept` are, the threshold rises to the `min_kept`-th smallest
  probability. With fewer valid pixels than `min_kept` (or `min_kept <= 0`)
  every valid pixel is kept, as in the reference.
  """
  if min_kept <= 0:
    return valid
  # Invalid pixels count as certain (probability 1) so they come last.
  prob = jnp.where(valid, true_prob, 1.0)
  kth = kth_smallest(prob, min(prob.shape[0], min_kept))
  threshold = jnp.where(kth > thresh, kth, jnp.float32(thresh))
  hard = valid & (prob <= threshold)
  apply = jnp.sum(valid) >= min_kept
  return jnp.where(apply, hard, valid)


def ohem_ce(
  logits: jax.Array,
  labels: jax.Array,
  thresh: float = 0.7,
  min_kept: int = 100000,
  *,
  ignore_index: int = IGNORE_INDEX,
  per_image: bool = False,
  groups: int = 0,
) -> jax.Array:
  """Online hard example mining CE (TorchSemiSeg's ProbOhemCrossEntropy2d).

  Keeps the valid pixels whose softmax probability of the true class is
  `<= thresh`, and at least the `min_kept` hardest (lowest probability)
  ones: when fewer pass, the threshold becomes the `min_kept`-th smallest
  probability (ties at it are all kept). When there are fewer valid pixels
  than `min_kept`, OHEM is off and this is `supervised_ce`. The loss is the
  mean CE over the kept pixels. Static shapes throughout (the k-th value by
  bisection, `kth_smallest`; no sort, no boolean indexing), so it jits.

  Args:
    logits: `(N, H, W, C)`.
    labels: int `(N, H, W)`, `ignore_index` for unlabeled pixels.
    thresh: probability threshold.
    min_kept: the least number of pixels kept per group.
    ignore_index: the label of ignored pixels.
    per_image: select per image (each image keeps `min_kept`), the mean over
      every kept pixel of the batch; False selects over the batch.
    groups: > 0: `groups` blocks of `N / groups` consecutive images (one GPU's
      batch each), each selecting over its own pixels with its own mean;
      the result is the mean of the groups' means.
  Returns:
    float32 scalar.
  """
  _check(logits, labels, 'ohem_ce')
  n = logits.shape[0]
  valid = labels != ignore_index
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  true_prob = jnp.take_along_axis(probs, safe[..., None], axis=-1)[..., 0]
  ce = cross_entropy_map(logits, labels)
  if groups:
    if n % groups:
      raise ValueError(f'ohem_ce: groups={groups} does not divide the batch of {n}')
    flat = lambda x: x.reshape(groups, -1)
    keep = jax.vmap(lambda p, v: _ohem_keep(p, v, thresh, min_kept))(flat(true_prob), flat(valid))
    return jnp.mean(jax.vmap(_masked_mean)(flat(ce), keep))
  if per_image:
    keep = jax.vmap(lambda p, v: _ohem_keep(p, v, thresh, min_kept))(
      true_prob.reshape(n, -1), valid.reshape(n, -1)
    )
  else:
    keep = _ohem_keep(true_prob.reshape(-1), valid.reshape(-1), thresh, min_kept)
  return _masked_mean(ce, keep.reshape(labels.shape))


def pseudo_label_ce(
  logits: jax.Array, labels: jax.Array, mask: jax.Array, valid: jax.Array
) -> jax.Array:
  """Masked CE against pseudo labels, normalized by the valid pixel count.

  `sum(ce * (mask & valid)) / count(valid)`: unselected valid pixels still
  count in the denominator (the reference's normalization).

  Args:
    logits: student logits `(N, H, W, C)`.
    labels: int pseudo labels `(N, H, W)`.
    mask: bool `(N, H, W)`, the selection rule's output.
    valid: bool `(N, H, W)`, pixels that are not padding.
  Returns:
    float32 scalar (0 when no pixel is valid).
  """
  _check(logits, labels, 'pseudo_label_ce')
  if mask.shape != labels.shape or valid.shape != labels.shape:
    raise ValueError(
      f'pseudo_label_ce: mask {mask.shape} and valid {valid.shape} must be {labels.shape}'
    )
  ce = cross_entropy_map(logits, labels)
  selected = (mask & valid).astype(jnp.float32)
  count = jnp.sum(valid.astype(jnp.float32))
  return jnp.sum(ce * selected) / jnp.maximum(count, 1.0)


def standardize(logits: jax.Array) -> jax.Array:
  """Per-pixel z-score across classes with the unbiased (ddof=1) std.

  `(N, H, W, C)` -> float32 `(N, H, W, C)`.
  """
  if logits.shape[-1] < 2:
    raise ValueError(
      f'standardize: needs at least 2 classes for an unbiased std, got {logits.shape}'
    )
  x = logits.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  std = jnp.std(x, axis=-1, keepdims=True, ddof=1)
  return (x - mean) / std


def alignment_loss(a: jax.Array, b: jax.Array) -> jax.Array:
  """Dual-level alignment: MSE between the per-pixel standardized logits.

  Args:
    a, b: logits `(N, H, W, C)` of the two strong views (image level) or of
      the two perturbed branches (feature level). Both carry gradient.
  Returns:
    float32 scalar, mean over every element (no masking).
  """
  if a.shape != b.shape:
    raise ValueError(f'alignment_loss: shapes {a.shape} and {b.shape} differ')
  return jnp.mean(jnp.square(standardize(a) - standardize(b)))
