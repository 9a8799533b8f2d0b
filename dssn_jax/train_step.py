"""The train state and one pure, data-parallel DSSN training iteration.

`train_step(state, batch, rng, ...)` follows the reference iteration (spec
"One training iteration"):

1. teacher forward on the mix partner's weak view `m_w` -> `T_m`;
2. cutmix of the strong views: `u_sk <- where(box_k, m_sk, u_sk)`;
3. student forward on concat(x, u_w) with `fp_branches` perturbed decoder
   copies -> `P_x, P_w, P_fp1, P_fp2` (`labeled_bn='separate'`: x alone,
   then u_w, so the labeled images are normalized by their own batch);
4. student forward on concat(u_s1, u_s2) -> `P_s1, P_s2` (the student's
   BatchNorm statistics are threaded through both forwards);
5. labels and CPLG mask of the fp branches from the detached `P_w`;
6. teacher forward on `u_w` -> `T_w`; per view `T_k = where(box_k, T_m, T_w)`,
   labels `argmax T_k`, mask CPLG(`T_k`), ignore `where(box_k, m_ignore, u_ignore)`;
7. the loss terms and their weighted sum (`settings` weights; strong-view
   terms, or with `warmup_terms='unlabeled'` every unlabeled term,
   multiplied by 0 while `step < warmup_steps`);
8. SGD step;
9. EMA of the teacher's params and BatchNorm statistics, keep rate 0 during
   the warm-up (the teacher becomes the student), `ema_decay` after.

Teacher BatchNorm (`settings.teacher_bn`): with `batch`, the teacher's
forwards use batch statistics and so update its running statistics, in the
order m_w then u_w, before the EMA blends in the student's; `running` uses
the running statistics (which then change only through the EMA). The
reference does both: its teacher runs in train mode until the first
end-of-epoch evaluation calls `model_tea.eval()`, which its loop never
undoes. `reference` (the default) reproduces that: batch statistics while
`step < schedule.steps_per_epoch`, running statistics after. With running
statistics BatchNorm is per sample, so steps 1 and 6 run as one teacher call
on concat(m_w, u_w): the same logits, one pass instead of two.

Methods with `settings.teacher == 'student'` (UniMatch, FixMatch) take the
mix partner's targets from a no-gradient student forward with running
statistics, and the weak view's from the detached clean branch `P_w`; their
`teacher_*` fields track the student (keep rate 0), so "teacher" evaluation
evaluates the student.

A loss weight of 0 removes its term from the program: the second student
forward runs only if `strong` or `align_image` is on, the teacher forwards
only if `strong` is on, the perturbed decoder copies only if `fp` or
`align_feature` is on.

With `sup_type='ohem'`, `L_x` picks its hard pixels per image (`min_kept`
each), as the reference's Cityscapes R-101 runs did with one image per GPU;
this keeps the step independent of the device count.

Data parallelism: `make_train_step` jits the step over a 1-D `data` mesh with
the batch sharded and the state replicated; BatchNorm statistics and every
loss reduction are then global, so the step computes the same numbers on 1
device or many.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dssn_jax import losses, optim, parallel, pseudo_labels
from dssn_jax.config_lib import MethodSettings, Schedule
from dssn_jax.data.normalize import normalize

SEMI_KEYS = ('x', 'y', 'u_w', 'u_ignore', 'm_w', 'm_ignore')
VIEW_KEYS = (('u_s1', 'm_s1', 'box1'), ('u_s2', 'm_s2', 'box2'))


class TrainState(flax.struct.PyTreeNode):
  """Everything a training step reads and writes (a pytree, checkpointed whole).

  Attributes:
    step: int32 scalar, iterations done.
    params, batch_stats: the student's variables.
    teacher_params, teacher_batch_stats: the EMA teacher's variables.
    opt_state: the optax state of the student's params.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  teacher_params: Any
  teacher_batch_stats: Any
  opt_state: Any


def create_train_state(
  model, tx: optax.GradientTransformation, rng: jax.Array, image_size: int, *, variables=None
) -> TrainState:
  """A fresh state; the teacher starts as a copy of the student.

  Args:
    model: the segmentation model (`models.create_model`).
    tx: the optimizer (`optim.make_optimizer`).
    rng: init key, used only when `variables` is None.
    image_size: side of the dummy input used to initialize.
    variables: `{'params', 'batch_stats'}` to start from (e.g. with a
      pretrained backbone); None initializes randomly.
  """
  if variables is None:
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
  if 'params' not in variables:
    raise ValueError(f'create_train_state: variables have no params (keys {list(variables)})')
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # distinct buffers for donation
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    teacher_params=copy(params),
    teacher_batch_stats=copy(batch_stats),
    opt_state=tx.init(params),
  )


def _forward(model, params, batch_stats, images, *, train: bool, perturb: int = 0, rng=None):
  """One model call -> (logits, aux, batch_stats after the call)."""
  rngs = {'dropout': rng} if perturb else {}
  variables = {'params': params, 'batch_stats': batch_stats}
  if train:
    (logits, aux), updates = model.apply(
      variables, images, train=True, perturb=perturb, rngs=rngs, mutable=['batch_stats']
    )
    return logits, aux, updates['batch_stats']
  logits, aux = model.apply(variables, images, train=False, perturb=perturb, rngs=rngs)
  return logits, aux, batch_stats


def _check(batch: dict[str, Any], settings: MethodSettings) -> None:
  if settings.method == 'supervised':
    need = ('x', 'y')
  else:
    need = SEMI_KEYS + sum(VIEW_KEYS[: settings.strong_views], ())
  missing = [k for k in need if k not in batch]
  if missing:
    raise ValueError(
      f'train batch for method {settings.method!r} lacks {", ".join(missing)}'
      f' (has {", ".join(sorted(batch))})'
    )
  if settings.align_image > 0 and settings.strong_views < 2:
    raise ValueError(
      f'loss.align_image={settings.align_image} needs two strong views; '
      f'method {settings.method!r} has {settings.strong_views}'
    )
  if settings.align_feature > 0 and settings.fp_branches < 2:
    raise ValueError(
      f'loss.align_feature={settings.align_feature} needs two fp branches; '
      f'fp_branches={settings.fp_branches}'
    )
  if settings.fp > 0 and settings.fp_branches < 1:
    raise ValueError(f'loss.fp={settings.fp} needs fp_branches >= 1')


def _suffixes(n: int) -> list[str]:
  """Metric name suffixes: '' for a single term, '1', '2', ... otherwise."""
  return [''] if n == 1 else [str(i + 1) for i in range(n)]


def _ema(keep, teacher, student):
  return jax.tree.map(lambda t, s: keep * t + (1.0 - keep) * s, teacher, student)


class LossAux(flax.struct.PyTreeNode):
  """What `objective` returns beside the total loss.

  Attributes:
    batch_stats: the student's BatchNorm statistics after its forwards.
    teacher_batch_stats: the teacher's after its own forwards (before EMA).
    metrics: float32 scalars, each computed term and `mask_ratio`.
  """

  batch_stats: Any
  teacher_batch_stats: Any
  metrics: dict[str, jax.Array]


def objective(
  params,
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  model,
  settings: MethodSettings,
  schedule: Schedule,
) -> tuple[jax.Array, LossAux]:
  """The iteration's total loss as a function of the student's `params`.

  Steps 1-7 of the module docstring. The teacher (or eval-mode student)
  forwards read `state`, not `params`, so no gradient reaches them.

  Args:
    params: the student's params (differentiated).
    state: the train state (BatchNorm statistics, teacher, step).
    batch, rng, model, settings, schedule: as in `train_step`.
  Returns:
    `(total, LossAux)`; the metrics hold each computed term unweighted
    (strong terms also while the warm-up leaves them out of the total) and,
    for semi-supervised methods, `mask_ratio`.
  """
  s = settings
  _check(batch, s)
  warm = state.step < schedule.warmup_steps
  ignore = s.ignore_index
  semi = s.method != 'supervised'
  views = s.strong_views if semi else 0
  strong_terms = semi and s.strong > 0 and views > 0
  strong_forward = semi and views > 0 and (s.strong > 0 or s.align_image > 0)
  perturb = s.fp_branches if semi and (s.fp > 0 or s.align_feature > 0) else 0
  dropout_rng = jax.random.fold_in(rng, 0)
  terms, weighted = {}, []

  def sup_loss(logits, labels):
    if s.sup_type == 'ohem':
      return losses.ohem_ce(
        logits, labels, s.ohem_thresh, s.ohem_min_kept, ignore_index=ignore, per_image=True
      )
    return losses.supervised_ce(logits, labels, ignore_index=ignore)

  def mask_of(logits):
    return pseudo_labels.confidence_mask(
      logits,
      s.pseudo_label,
      threshold=s.threshold,
      high=s.class_aware_high,
      scale=s.class_aware_scale,
    )

  x, y = normalize(batch['x']), batch['y']
  if not semi:
    logits_x, _, bs = _forward(model, params, state.batch_stats, x, train=True)
    if s.sup > 0:
      terms['loss_x'] = sup_loss(logits_x, y)
      weighted.append(s.sup * terms['loss_x'])
    total = sum(weighted, jnp.float32(0.0))
    return total, LossAux(bs, state.teacher_batch_stats, terms)

  u_w = normalize(batch['u_w'])
  # 1. Mix partner targets: EMA teacher, or the student in eval mode.
  teacher_bs = state.teacher_batch_stats

  def teacher_targets(stats):
    """EMA teacher on (m_w, u_w) -> (T_m, T_w, its batch_stats after).

    With batch-statistics BN the two calls run in turn, m_w first (each
    normalized by its own batch, the statistics threaded as in the
    reference). With running statistics BN is per sample, so one call on
    both views gives the same logits at half the kernel launches.
    """

    def sequential():
      t_m, _, new = _forward(model, state.teacher_params, stats, m_w, train=True)
      t_w, _, new = _forward(model, state.teacher_params, new, u_w, train=True)
      return t_m, t_w, new

    def batched():
      both, _, _ = _forward(
        model, state.teacher_params, stats, jnp.concatenate([m_w, u_w]), train=False
      )
      t_m, t_w = jnp.split(both, 2)
      return t_m, t_w, stats

    if s.teacher_bn == 'reference':
      return jax.lax.cond(state.step < schedule.steps_per_epoch, sequential, batched)
    return sequential() if s.teacher_bn == 'batch' else batched()

  if strong_terms:
    m_w = normalize(batch['m_w'])
    if s.teacher == 'ema':
      t_m, t_w, teacher_bs = teacher_targets(teacher_bs)
      t_w = jax.lax.stop_gradient(t_w)
    elif s.teacher == 'student':
      t_m, _, _ = _forward(model, state.params, state.batch_stats, m_w, train=False)
      t_w = None  # the student's own weak-view prediction, below
    else:
      raise ValueError(f'settings.teacher={s.teacher!r} must be ema or student')
    t_m = jax.lax.stop_gradient(t_m)

  # 2. Cutmix of the strong images (uint8, then normalized).
  if strong_forward:
    mixed = [
      pseudo_labels.compose_cutmix(batch[box], batch[m_s], batch[u_s])
      for u_s, m_s, box in VIEW_KEYS[:views]
    ]
    strong_images = normalize(jnp.concatenate(mixed))

  # 3. Student on concat(x, u_w), clean and perturbed decoder copies (or,
  # with `labeled_bn='separate'`, on x and then u_w, each its own BN batch).
  n_x = x.shape[0]
  if s.labeled_bn == 'separate':
    p_x, _, bs = _forward(model, params, state.batch_stats, x, train=True)
    p_w, aux, bs = _forward(model, params, bs, u_w, train=True, perturb=perturb, rng=dropout_rng)
    p_w = jax.lax.stop_gradient(p_w)
    p_fp = list(aux['perturbed'])
  else:
    logits, aux, bs = _forward(
      model,
      params,
      state.batch_stats,
      jnp.concatenate([x, u_w]),
      train=True,
      perturb=perturb,
      rng=dropout_rng,
    )
    p_x, p_w = logits[:n_x], jax.lax.stop_gradient(logits[n_x:])
    p_fp = [p[n_x:] for p in aux['perturbed']]

  # 4. Student on the strong views, its BatchNorm statistics threaded on
  # (or, with `strong_view_bn_stats=False`, left as the clean views set them).
  p_s = []
  if strong_forward:
    logits_s, _, bs_s = _forward(model, params, bs, strong_images, train=True)
    if s.strong_view_bn_stats:
      bs = bs_s
    p_s = jnp.split(logits_s, views)

  # 5. Targets of the fp branches: the detached clean weak-view prediction.
  valid_w = batch['u_ignore'] != ignore
  mask_w = mask_of(p_w)
  labels_w = pseudo_labels.hard_labels(p_w)
  terms['mask_ratio'] = jnp.sum(mask_w & valid_w).astype(jnp.float32) / jnp.maximum(
    jnp.sum(valid_w).astype(jnp.float32), 1.0
  )

  # 7. Loss terms (6., the weak-view teacher forward, just before its use).
  if s.sup > 0:
    terms['loss_x'] = sup_loss(p_x, y)
    weighted.append(s.sup * terms['loss_x'])

  if strong_terms:
    if t_w is None:
      t_w = p_w
    strong_weight = jnp.where(warm, 0.0, s.strong)
    for k, suffix in enumerate(_suffixes(views)):
      box = batch[VIEW_KEYS[k][2]]
      t_k = pseudo_labels.compose_cutmix(box, t_m, t_w)
      valid_k = pseudo_labels.compose_cutmix(box, batch['m_ignore'], batch['u_ignore']) != ignore
      term = losses.pseudo_label_ce(p_s[k], pseudo_labels.hard_labels(t_k), mask_of(t_k), valid_k)
      terms['loss_s' + suffix] = term
      weighted.append(strong_weight * term)

  # The other unlabeled terms: on from step 0 (reference), or gated like the
  # strong ones with `warmup_terms='unlabeled'`.
  def gated(weight):
    return jnp.where(warm, 0.0, weight) if s.warmup_terms == 'unlabeled' else weight

  if s.fp > 0:
    for p, suffix in zip(p_fp, _suffixes(len(p_fp))):
      term = losses.pseudo_label_ce(p, labels_w, mask_w, valid_w)
      terms['loss_fp' + suffix] = term
      weighted.append(gated(s.fp) * term)

  if s.align_image > 0:
    terms['loss_align_image'] = losses.alignment_loss(p_s[0], p_s[1])
    weighted.append(gated(s.align_image) * terms['loss_align_image'])
  if s.align_feature > 0:
    terms['loss_align_feature'] = losses.alignment_loss(p_fp[0], p_fp[1])
    weighted.append(gated(s.align_feature) * terms['loss_align_feature'])

  total = sum(weighted, jnp.float32(0.0))
  return total, LossAux(bs, teacher_bs, terms)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  model,
  tx: optax.GradientTransformation,
  settings: MethodSettings,
  schedule: Schedule,
  ema_decay: float = 0.996,
  poly_power: float = 0.9,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One iteration of `settings.method`; pure, so it jits and shards.

  Args:
    state: the train state.
    batch: the train batch of docs/design.md (uint8 images, int32 labels and
      ignore maps, bool cutmix boxes; `supervised` needs only x, y).
    rng: this step's key (the loop passes `fold_in(base, step)`); dropout
      keys derive from it.
    model: the segmentation model.
    tx: the optimizer that built `state.opt_state`.
    settings: `config_lib.resolve_method(config)`.
    schedule: `config_lib.resolve_steps(...)` (warm-up length, lr).
    ema_decay: the teacher's keep rate after the warm-up (`config.train.ema_decay`).
    poly_power: the schedule's power, for the `lr` metric only.
  Returns:
    `(new_state, metrics)`, metrics float32 scalars: `loss`, each computed
    term (`loss_x`, `loss_s1`/`loss_s2` or `loss_s`, `loss_fp1`/`loss_fp2` or
    `loss_fp`, `loss_align_image`, `loss_align_feature`; unweighted, strong
    terms reported also while the warm-up leaves them out), `mask_ratio`,
    `lr` (backbone), `grad_norm` and `nonfinite` (1.0 when the loss, a term
    or the gradient norm was not finite: the step then left the variables
    unchanged and only advanced `step`).
  """
  loss_fn = functools.partial(
    objective, state=state, batch=batch, rng=rng, model=model, settings=settings, schedule=schedule
  )
  (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # 9. EMA teacher; keep rate 0 during the warm-up. Methods without an EMA
  # teacher keep it equal to the student.
  if settings.teacher == 'ema':
    keep = jnp.where(state.step < schedule.warmup_steps, 0.0, jnp.float32(ema_decay))
  else:
    keep = jnp.float32(0.0)
  updated = state.replace(
    params=params,
    batch_stats=aux.batch_stats,
    teacher_params=_ema(keep, state.teacher_params, params),
    teacher_batch_stats=_ema(keep, aux.teacher_batch_stats, aux.batch_stats),
    opt_state=opt_state,
  )
  # Non-finite guard: a step whose loss, any term or the gradient norm is
  # not finite leaves every variable as it was (only `step` advances); the
  # loop reads `nonfinite` with the other metrics.
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  for value in aux.metrics.values():
    finite &= jnp.all(jnp.isfinite(value))
  new_state = jax.lax.cond(finite, lambda: updated, lambda: state).replace(step=state.step + 1)
  lr = optim.poly_schedule(schedule.lr, schedule.total_steps, poly_power)(state.step)
  metrics = {'loss': total, **aux.metrics, 'lr': lr, 'grad_norm': grad_norm}
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  metrics['nonfinite'] = jnp.where(finite, 0.0, 1.0).astype(jnp.float32)
  return new_state, metrics


def make_train_step(
  model,
  tx: optax.GradientTransformation,
  settings: MethodSettings,
  schedule: Schedule,
  mesh,
  *,
  ema_decay: float = 0.996,
  poly_power: float = 0.9,
):
  """`train_step` compiled over `mesh`: batch sharded on `data`, state
  replicated and donated, metrics replicated.

  With `settings.teacher_bn == 'reference'` the teacher's BatchNorm mode
  changes once, after the first epoch. Rather than a `lax.cond` in the
  program, two programs are compiled (the second when it is first needed)
  and the step number picks one, so each step runs exactly the computation
  of its mode.

  Returns:
    `fn(state, batch, rng, step=None) -> (state, metrics)`, with
    `fn.lower(state, batch, rng, step=None)`; `step` is the host-side step
    number (read from `state` when omitted). `state` must be replicated on
    `mesh` (`parallel.replicate`) and `batch` global arrays sharded on
    `data` (`parallel.shard_batch`).
  """
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)

  def compile_for(phase_settings):
    step = functools.partial(
      train_step,
      model=model,
      tx=tx,
      settings=phase_settings,
      schedule=schedule,
      ema_decay=float(ema_decay),
      poly_power=float(poly_power),
    )
    return jax.jit(
      step, in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=(0,)
    )

  return _PhasedStep(settings, schedule, compile_for)


class _PhasedStep:
  """Dispatches to the compiled step of the teacher-BN mode of each step."""

  def __init__(self, settings: MethodSettings, schedule: Schedule, compile_for):
    self._settings, self._schedule = settings, schedule
    self._compile_for = compile_for
    self._compiled = {}

  def _for_step(self, state, step):
    mode = self._settings.teacher_bn
    if mode == 'reference':
      if step is None:
        step = int(jax.device_get(state.step))
      mode = 'batch' if step < self._schedule.steps_per_epoch else 'running'
    if mode not in self._compiled:
      self._compiled[mode] = self._compile_for(dataclasses.replace(self._settings, teacher_bn=mode))
    return self._compiled[mode]

  def __call__(self, state, batch, rng, step: int | None = None):
    return self._for_step(state, step)(state, batch, rng)

  def lower(self, state, batch, rng, step: int | None = None):
    return self._for_step(state, step).lower(state, batch, rng)
