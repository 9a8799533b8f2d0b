"""Shared pieces of the methods' iterations: forwards, teacher targets,
cutmix composition, random feature masks, loss terms, micro-batching.

Every method splits its iteration in two (see `dssn_jax.methods`):

- `prepare(state, batch, rng, ctx) -> (prepared, teacher_batch_stats)`: what
  needs no gradient, computed once over the whole global batch: teacher
  targets, cutmix-composed images, every random mask, and the global
  denominators of the loss terms;
- `loss(params, state, micro, rng, ctx) -> (total, LossAux)`: the student's
  forwards and the weighted loss terms on one micro-batch (the whole batch
  when `grad_accum` is 1).

A term is `numerator / denominator` with the denominator counted in
`prepare` over the global batch (`prepared['den_*']`), so the micro-batches'
totals, gradients and metrics add up to the full batch's exactly (for models
without BatchNorm; BatchNorm models run one micro-batch).

Loss groups (`config.train.loss_groups` = G, the reproduced recipe's GPU
count): the authors' loop normalizes each term on each GPU by that GPU's own
count and DDP averages the GPUs' gradients. With G > 1 a denominator is a
per-sample array holding the count of the sample's group (G consecutive
blocks of B / G samples), a term is `sum_g num_g / den_g / G`, cutmix
partners reversed within a group, complementary dropout's undropped pairs
drawn per group and OHEM selects per group. Per-sample denominators split
with the samples, so any micro-batching and any device layout give the same
update. G = 1: one objective over the global batch (scalar denominators).

Random masks come from the sample's global position (`fold_in(key, index)`),
so the number of micro-batches changes none of them. `prepare` may return
global metrics under `prepared['metrics']`: they are reported once, not
summed over micro-batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dssn_jax import losses, pseudo_labels
from dssn_jax.normalize import normalize

SEMI_KEYS = ('x', 'y', 'u_w', 'u_ignore', 'm_w', 'm_ignore')
VIEW_KEYS = (('u_s1', 'm_s1', 'box1'), ('u_s2', 'm_s2', 'box2'))


class LossAux(flax.struct.PyTreeNode):
  """What a method's loss returns beside the total.

  Attributes:
    batch_stats: the student's BatchNorm statistics after its forwards.
    teacher_batch_stats: the teacher's after its own forwards (before EMA).
    metrics: float32 scalars, each computed term and `mask_ratio`.
  """

  batch_stats: Any
  teacher_batch_stats: Any
  metrics: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Context:
  """The static arguments every method function gets.

  Attributes:
    model: the segmentation model.
    settings: the method's own `Settings`.
    schedule: `config_lib.Schedule` (warm-up length, steps per epoch).
    global_batch: samples in the global batch (the loss denominators' span);
      0: the batch a method function sees is the whole batch.
    micro_batches: how many micro-batches `loss` runs on (owned by
      `methods.gradients`; methods read it only through `map_micro`).
  """

  model: Any
  settings: Any
  schedule: Any
  global_batch: int = 0
  micro_batches: int = 1

  def map_micro(self, fn, tree):
    """`fn` (no gradient) over the micro-batches of `tree`, re-joined on axis 0:
    for forwards that would not fit over the whole batch at once."""
    return map_micro(fn, tree, self.micro_batches)


def rope_key(rng):
  """The `'rope'` rng of a step's training-mode forwards (DINOv3's RoPE
  coordinate rescale, `config.model.rope_rescale`): one per step, derived
  from the step key every micro-batch and device gets, so all of them draw
  the same scale and gradient accumulation stays exact."""
  return jax.random.fold_in(rng, 0x726F7065)  # 'rope'


def forward(
  model,
  params,
  batch_stats,
  images,
  *,
  train: bool,
  perturb: int = 0,
  rng=None,
  feature_masks=None,
  perturb_masks=None,
  rope_rng=None,
):
  """One model call -> (logits, aux, batch_stats after the call).

  `feature_masks` `(N, D)` / `perturb_masks` `(k, N, D)` are passed only when
  given (models without `feature_dim` do not take them). `rope_rng`
  (`rope_key`) is the `'rope'` stream of a training-mode call; models
  without a training-mode rescale ignore it.
  """
  rngs = {'dropout': rng} if perturb and rng is not None else {}
  if train and rope_rng is not None:
    rngs['rope'] = rope_rng
  kwargs = {}
  if feature_masks is not None:
    kwargs['feature_masks'] = feature_masks
  if perturb_masks is not None:
    kwargs['perturb_masks'] = perturb_masks
  variables = {'params': params, 'batch_stats': batch_stats}
  if train:
    (logits, aux), updates = model.apply(
      variables, images, train=True, perturb=perturb, rngs=rngs, mutable=['batch_stats'], **kwargs
    )
    return logits, aux, updates.get('batch_stats', batch_stats)
  logits, aux = model.apply(variables, images, train=False, perturb=perturb, rngs=rngs, **kwargs)
  return logits, aux, batch_stats


def feature_dim(model) -> int | None:
  """Channels `D` of the model's tapped features, or None when the model
  draws its own perturbation masks (DeepLabV3+) and takes no masks."""
  return getattr(model, 'feature_dim', None)


def check_keys(batch: dict[str, Any], need, method: str) -> None:
  missing = [k for k in need if k not in batch]
  if missing:
    raise ValueError(
      f'train batch for method {method!r} lacks {", ".join(missing)}'
      f' (has {", ".join(sorted(batch))})'
    )


def suffixes(n: int) -> list[str]:
  """Metric name suffixes: '' for a single term, '1', '2', ... otherwise."""
  return [''] if n == 1 else [str(i + 1) for i in range(n)]


# ----------------------------------------------------------------------------
# Random feature masks, drawn from global batch positions.


def _per_sample(key, n: int, fn):
  """`fn(fold_in(key, i))` for i in 0..n-1, stacked: one draw per global index."""
  return jax.vmap(lambda i: fn(jax.random.fold_in(key, i)))(jnp.arange(n))


def channel_dropout_masks(key, n: int, dim: int, rate: float = 0.5) -> jax.Array:
  """Dropout2d masks `(n, dim)`: 0 with prob `rate`, else `1/(1-rate)`."""
  keep = _per_sample(key, n, lambda k: jax.random.bernoulli(k, 1.0 - rate, (dim,)))
  return keep.astype(jnp.float32) / (1.0 - rate)


def complementary_masks(key, n: int, dim: int, kept_fraction: float = 0.5, groups: int = 1):
  """UniMatch V2's complementary dropout for `n` pairs -> (m, 2 - m), each `(n, dim)`.

  `m = 2 * Bernoulli(0.5)` per (pair, channel); in each of `groups` blocks
  of `n / groups` consecutive pairs (one GPU's batch in the authors' loop),
  `int(n / groups * kept_fraction)` pairs, chosen by a random permutation of
  the block, keep all channels (both masks 1).
  """
  m = 2.0 * _per_sample(
    jax.random.fold_in(key, 0), n, lambda k: jax.random.bernoulli(k, 0.5, (dim,))
  )
  m = m.astype(jnp.float32)
  size = n // groups
  num_kept = int(size * kept_fraction)

  def kept_in(k):  # order[:num_kept], as each position's rank (no scatter)
    return jnp.argsort(jax.random.permutation(k, size)) < num_kept

  key = jax.random.fold_in(key, 1)
  if groups == 1:
    kept = kept_in(key)
  else:
    kept = jax.vmap(lambda g: kept_in(jax.random.fold_in(key, g)))(jnp.arange(groups))
  kept = kept.reshape(n)
  m = jnp.where(kept[:, None], 1.0, m)
  return m, jnp.where(kept[:, None], 1.0, 2.0 - m)


# ----------------------------------------------------------------------------
# Loss terms with global or per-group denominators.


def count(mask) -> jax.Array:
  return jnp.sum(jnp.asarray(mask).astype(jnp.float32))


def _per_sample_sums(values) -> jax.Array:
  values = jnp.asarray(values).astype(jnp.float32)
  return jnp.sum(values.reshape(values.shape[0], -1), axis=1)


def denominator(mask, groups: int) -> jax.Array:
  """The count of `mask` (`(B, ...)` bool) a term divides by.

  `groups == 1`: the global count, a scalar. Otherwise per-sample `(B,)`:
  each sample holds the count of its group (B / groups consecutive samples).
  """
  if groups == 1:
    return count(mask)
  per_group = _per_sample_sums(mask).reshape(groups, -1).sum(axis=1)
  return jnp.repeat(per_group, mask.shape[0] // groups)


def reduce(values, den, groups: int) -> jax.Array:
  """`sum(values) / den` with a scalar `den`; with per-sample `den` (`denominator`),
  `sum_i sum(values_i) / den_i / groups`: each group's mean, the groups
  averaged (what DDP's gradient average of per-GPU means computes)."""
  if jnp.ndim(den) == 0:
    return count(values) / jnp.maximum(den, 1.0)
  return jnp.sum(_per_sample_sums(values) / jnp.maximum(den, 1.0)) / groups


def ce_term(logits, labels, den, ignore_index: int, groups: int = 1) -> jax.Array:
  """`sum(CE over labels != ignore) / den` (L_x with CE), per group with `groups`."""
  valid = (labels != ignore_index).astype(jnp.float32)
  return reduce(losses.cross_entropy_map(logits, labels) * valid, den, groups)


def sup_term(logits, labels, den, settings, micro_batches: int = 1) -> jax.Array:
  """L_x: CE over the labeled pixels, or OHEM CE.

  OHEM with `loss_groups == 1` selects per image (`ohem_min_kept` each) and
  averages over every kept pixel of the batch; with groups it selects over
  each group's pixels (`ohem_min_kept` per group, the authors' per-GPU
  value) and averages the groups' means. The micro-batch then holds
  `loss_groups / micro_batches` whole groups (`gradients` lines them up).
  """
  groups = settings.loss_groups
  if settings.sup_type != 'ohem':
    return ce_term(logits, labels, den, settings.ignore_index, groups)
  kwargs = dict(ignore_index=settings.ignore_index)
  if groups == 1:
    kwargs['per_image'] = True
  else:
    kwargs['groups'] = groups // micro_batches
  out = losses.ohem_ce(logits, labels, settings.ohem_thresh, settings.ohem_min_kept, **kwargs)
  return out / micro_batches if groups > 1 else out


def pseudo_term(logits, labels, mask, valid, den, groups: int = 1) -> jax.Array:
  """`sum(CE * (mask & valid)) / den` with `den` the count of valid pixels
  (global, or per group)."""
  ce = losses.cross_entropy_map(logits, labels)
  return reduce(ce * (mask & valid).astype(jnp.float32), den, groups)


def align_term(a, b, den) -> jax.Array:
  """Dual-level alignment: `sum((z(a) - z(b))^2) / den`, den = global element
  count (groups of equal size: the mean of the groups' means)."""
  d = losses.standardize(a) - losses.standardize(b)
  return jnp.sum(jnp.square(d)) / den


def mask_of(logits, settings):
  """The pseudo-label selection rule of `settings` (CPLG or fixed threshold)."""
  return pseudo_labels.confidence_mask(
    logits,
    settings.pseudo_label,
    threshold=settings.threshold,
    high=settings.class_aware_high,
    scale=settings.class_aware_scale,
  )


def compose(box, partner, base):
  """Cutmix composition: `partner` inside `box`, `base` outside."""
  return pseudo_labels.compose_cutmix(box, partner, base)


def reversed_within(x, groups: int = 1):
  """`x` reversed along the batch within each group of `B / groups`
  consecutive samples (UniMatch V2's `flip(0)` of each GPU's batch)."""
  if groups == 1:
    return x[::-1]
  shape = x.shape
  return x.reshape((groups, shape[0] // groups) + shape[1:])[:, ::-1].reshape(shape)


def interleave(*arrays):
  """`k` arrays `(B, ...)` -> one `(B * k, ...)`, sample-major (`a[0], b[0],
  a[1], b[1], ...`): with the batch sharded on `data`, every row stays on its
  device (a concatenation along the batch would move rows between devices)."""
  return jnp.stack(arrays, 1).reshape((-1,) + arrays[0].shape[1:])


def deinterleave(x, k: int) -> list:
  """The inverse of `interleave`: `(B * k, ...)` -> `k` arrays `(B, ...)`."""
  x = x.reshape((-1, k) + x.shape[1:])
  return [x[:, i] for i in range(k)]


def mixed_strong_images(batch, views: int, partner: str = 'batch', groups: int = 1):
  """The cutmixed strong views, uint8 `(B, views, H, W, 3)`.

  `partner='batch'`: the mix-partner batch's strong view (`m_sk`, DSSN /
  UniMatch); `'reversed'`: the same view of the batch reversed within each
  group (UniMatch V2).
  """
  out = []
  for u_s, m_s, box in VIEW_KEYS[:views]:
    other = batch[m_s] if partner == 'batch' else reversed_within(batch[u_s], groups)
    out.append(compose(batch[box], other, batch[u_s]))
  return jnp.stack(out, 1)


def valid_pixels(batch, ignore_index: int, views: int):
  """Valid maps of the weak view and of each strong view cutmixed with the
  mix-partner batch."""
  valid_w = batch['u_ignore'] != ignore_index
  valid = []
  for _, _, box in VIEW_KEYS[:views]:
    valid.append(compose(batch[box], batch['m_ignore'], batch['u_ignore']) != ignore_index)
  return valid_w, valid


def normalized(images):
  return normalize(images)


# ----------------------------------------------------------------------------
# Micro-batching.


def split_micro(tree, k: int, block: int = 1):
  """Leading axis `B` -> `(k, B/k)` on every leaf (scalars are broadcast).

  Micro-batch j holds blocks j, j + k, j + 2k, ... of `block` consecutive
  samples: strided (`block=1`: samples j, j + k, ...), so that with the
  batch sharded on `data` each micro-batch still spans every device;
  `block` = a loss group's size keeps each group whole (OHEM per group).
  """

  def one(x):
    x = jnp.asarray(x)
    if x.ndim == 0:
      return jnp.broadcast_to(x, (k,))
    if x.shape[0] % (k * block):
      raise ValueError(
        f'config.train.grad_accum={k} does not divide the batch axis of size {x.shape[0]}'
        + (f' into blocks of {block}' if block > 1 else '')
      )
    rest = x.shape[1:]
    x = x.reshape((x.shape[0] // (k * block), k, block) + rest)
    return jnp.swapaxes(x, 0, 1).reshape((k, -1) + rest)

  return jax.tree.map(one, tree)


def map_micro(fn, tree, k: int):
  """`fn` over k micro-batches of `tree` (no gradient), outputs re-joined on axis 0."""
  if k == 1:
    return fn(tree)
  out = jax.lax.map(fn, split_micro(tree, k))
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), out)
