"""Which unlabeled pixels teach, and how cutmix composes their targets.

Two selection rules turn logits into a boolean mask of trusted pixels:

- `class_aware_mask`: DSSN's class-aware pseudo-label generation (CPLG). For
  each image and class c, `M_c` is the largest softmax confidence of c over
  the image; the class threshold is `scale * M_c` when `M_c > high`, else
  `M_c` itself (which no pixel can exceed, so the class selects nothing). A
  pixel is kept when some class's confidence is strictly above its
  threshold. Live thresholds are above 0.5, so only the argmax can pass.
- `fixed_threshold_mask`: UniMatch/FixMatch's `max softmax >= threshold`
  (DSSN's Cityscapes recipe uses threshold 0: every pixel).

Cutmix pastes a box of the mix partner's strong view into each strong view;
its targets are composed the same way: teacher logits (before any mask is
computed, so CPLG sees the composed image), hard labels and ignore maps all
take the partner's value inside the box.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_logits(logits, name: str) -> None:
  if logits.ndim != 4:
    raise ValueError(f'{name}: logits must be channels-last (N, H, W, C), got shape {logits.shape}')


def class_aware_mask(logits: jax.Array, high: float = 0.92, scale: float = 0.96) -> jax.Array:
  """CPLG: per-image, per-class adaptive confidence thresholds.

  Args:
    logits: float `(N, H, W, C)` teacher logits.
    high: a class whose image-wide max confidence is at most `high` selects
      no pixel.
    scale: live classes keep pixels above `scale * max confidence`.
  Returns:
    bool `(N, H, W)`: pixels whose confidence for some class is strictly
    above that class's threshold.
  """
  _check_logits(logits, 'class_aware_mask')
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  peak = jnp.max(probs, axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
  thresh = jnp.where(peak > high, scale * peak, peak)
  return jnp.any(probs > thresh, axis=-1)


def fixed_threshold_mask(logits: jax.Array, threshold: float) -> jax.Array:
  """bool `(N, H, W)`: max softmax confidence `>= threshold` (logits `(N, H, W, C)`)."""
  _check_logits(logits, 'fixed_threshold_mask')
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.max(probs, axis=-1) >= threshold


def confidence_mask(
  logits: jax.Array, rule: str, *, threshold: float = 0.95, high: float = 0.92, scale: float = 0.96
) -> jax.Array:
  """The mask of `rule` ('class_aware' or 'fixed'), bool `(N, H, W)`."""
  if rule == 'class_aware':
    return class_aware_mask(logits, high=high, scale=scale)
  if rule == 'fixed':
    return fixed_threshold_mask(logits, threshold)
  raise ValueError(f'pseudo-label rule {rule!r} must be class_aware or fixed')


def compose_cutmix(box: jax.Array, mixed: jax.Array, base: jax.Array) -> jax.Array:
  """`mixed` inside the cutmix box, `base` outside.

  Args:
    box: bool (or 0/1) `(N, H, W)`.
    mixed: the mix partner's values, `(N, H, W, ...)` (logits, labels,
      ignore maps or images).
    base: the view's own values, same shape and dtype as `mixed`.
  Returns:
    `(N, H, W, ...)`, trailing axes broadcast from the box.
  """
  if mixed.shape != base.shape:
    raise ValueError(f'compose_cutmix: mixed {mixed.shape} and base {base.shape} differ')
  if box.shape != base.shape[:3]:
    raise ValueError(
      f'compose_cutmix: box {box.shape} does not match the (N, H, W) of {base.shape}'
    )
  box = box.astype(bool).reshape(box.shape + (1,) * (base.ndim - 3))
  return jnp.where(box, mixed, base)


def hard_labels(logits: jax.Array) -> jax.Array:
  """int32 `(N, H, W)` argmax of `(N, H, W, C)` logits."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
