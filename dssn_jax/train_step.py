"""The train state and one pure, data-parallel training iteration.

`train_step(state, batch, rng, ...)` runs the iteration of the configured
method (`settings.method`, `config_lib.resolve`), whose terms live in its
own module of `dssn_jax.methods`
(docs/method.md gives each method's equations and where each term lives):

1. `methods.value_and_grad` (the shared gradient code): the method's `prepare` (teacher targets,
   cutmix composition, random masks, global loss denominators; no gradient)
   once over the global batch, then its `loss` and gradient over
   `config.train.grad_accum` micro-batches, summed;
2. the optimizer step;
3. the teacher's EMA, keep rate from `methods.ema_keep` (DSSN: 0 during the
   warm-up, `ema_decay` after; UniMatch V2: `min(1 - 1/(step + 1),
   ema_decay)`; methods without an EMA teacher: 0, the teacher tracks the
   student), on params and BatchNorm statistics.

Teacher BatchNorm (`config.train.teacher_bn`, DSSN): with `batch`, the teacher's
forwards use batch statistics and so update its running statistics, in the
order m_w then u_w, before the EMA blends in the student's; `running` uses
the running statistics (which then change only through the EMA). The
reference does both: its teacher runs in train mode until the first
end-of-epoch evaluation calls `model_tea.eval()`, which its loop never
undoes. `reference` (the default) reproduces that: batch statistics while
`step < schedule.steps_per_epoch`, running statistics after.

With `sup_type='ohem'`, `L_x` picks its hard pixels per image (`min_kept`
each), as the reference's Cityscapes R-101 runs did with one image per GPU;
this keeps the step independent of the device count.

Data parallelism: `make_train_step` jits the step over a 1-D `data` mesh with
the batch sharded and the state replicated; BatchNorm statistics and every
loss reduction are then global, so the step computes the same numbers on 1
device or many (to float32 rounding). It traces the step under
`parallel.tracing_mesh`, so each BatchNorm gathers its per-device
statistics in one collective (`models.layers.BatchNorm`).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dssn_jax import methods, optim, parallel
from dssn_jax.config_lib import Schedule, Settings
from dssn_jax.methods import common

SEMI_KEYS, VIEW_KEYS = common.SEMI_KEYS, common.VIEW_KEYS
LossAux = common.LossAux
_forward = common.forward


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


def _ema(keep, teacher, student):
  return jax.tree.map(lambda t, s: keep * t + (1.0 - keep) * s, teacher, student)


def objective(
  params,
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  model,
  settings: Settings,
  schedule: Schedule,
) -> tuple[jax.Array, LossAux]:
  """The whole batch's total loss as a function of the student's `params`.

  The method's `prepare` and `loss` on one micro-batch (the whole batch).
  The teacher (or eval-mode student) forwards read `state`, not `params`, so
  no gradient reaches them.

  Returns:
    `(total, LossAux)`; the metrics hold each computed term unweighted
    (strong terms also while the warm-up leaves them out of the total) and,
    for semi-supervised methods, `mask_ratio`.
  """
  return methods.objective(
    params, state, batch, rng, model=model, settings=settings.method, schedule=schedule
  )


# The batch's label maps (`y`, `u_ignore`, `m_ignore`): uint8 from the input
# pipeline, widened to int32 in the step.
LABEL_KEYS = ('y', 'u_ignore', 'm_ignore')


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  *,
  model,
  tx: optax.GradientTransformation,
  settings: Settings,
  schedule: Schedule,
  ema_decay: float = 0.996,
  poly_power: float = 0.9,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One iteration of the method; pure, so it jits and shards.

  Args:
    state: the train state.
    batch: the train batch of docs/design.md (uint8 images, uint8 or int32
      labels and ignore maps, bool cutmix boxes; `supervised` needs only x, y).
    rng: this step's key (the loop passes `fold_in(base, step)`); dropout
      keys derive from it.
    model: the segmentation model.
    tx: the optimizer that built `state.opt_state`.
    settings: `config_lib.resolve(config)`; `settings.method` may be a
      phase's settings (`Settings.for_step`).
    schedule: `settings.schedule(num_unlabeled)` (warm-up length, lr).
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
  # Label maps travel as uint8 (a quarter of int32's bytes from host to
  # device); the methods index and compare them as int32.
  batch = {k: v.astype(jnp.int32) if k in LABEL_KEYS else v for k, v in batch.items()}
  (total, aux), grads = methods.value_and_grad(
    state,
    batch,
    rng,
    model=model,
    settings=settings.method,
    schedule=schedule,
    grad_accum=settings.grad_accum,
  )
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # EMA teacher: the method's keep rate (0 for methods without an EMA teacher,
  # which then track the student).
  keep = methods.ema_keep(settings.ema_schedule, schedule, state.step, ema_decay)
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
  # A select per leaf, not a `lax.cond` over the whole state: XLA writes each
  # selected leaf into the donated buffer instead of keeping a second copy
  # of the state for the cond's result (benchmarks/census.py's memory line).
  keep_new = lambda new, old: jnp.where(finite, new, old)
  new_state = jax.tree.map(keep_new, updated, state).replace(step=state.step + 1)
  lr = optim.poly_schedule(schedule.lr, schedule.total_steps, poly_power)(state.step)
  metrics = {'loss': total, **aux.metrics, 'lr': lr, 'grad_norm': grad_norm}
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  metrics['nonfinite'] = jnp.where(finite, 0.0, 1.0).astype(jnp.float32)
  return new_state, metrics


def make_train_step(
  model,
  tx: optax.GradientTransformation,
  settings: Settings,
  schedule: Schedule,
  mesh,
  *,
  ema_decay: float = 0.996,
  poly_power: float = 0.9,
):
  """`train_step` compiled over `mesh`: batch sharded on `data`, state
  replicated and donated, metrics replicated.

  A method may change its program during a run (`Settings.for_step`; DSSN:
  with `train.teacher_bn='reference'` the teacher's BatchNorm mode changes
  after the first epoch, and with `train.warmup_terms='supervised'` the
  warm-up steps run the supervised iteration: their total is `sup * L_x` in
  either program; that one forwards only `x`). Rather than a `lax.cond` in
  the program, one program per phase is compiled (each when it is first
  needed) and the step number picks one, so each step runs exactly the
  computation of its phase.

  Returns:
    `fn(state, batch, rng, step=None) -> (state, metrics)`, with
    `fn.lower(state, batch, rng, step=None)` and
    `fn.precompile(state, batch, rng, step)` (compiles `step`'s program in
    the background); `step` is the host-side step
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

    def step_on_mesh(state, batch, rng):
      with parallel.tracing_mesh(mesh):  # layers see the mesh (BatchNorm's one collective)
        return step(state, batch, rng)

    return jax.jit(
      step_on_mesh, in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=(0,)
    )

  return _PhasedStep(settings, schedule, compile_for)


class _PhasedStep:
  """Dispatches to the compiled step of each step's phase (the method's
  settings for that step, `Settings.for_step`)."""

  def __init__(self, settings: Settings, schedule: Schedule, compile_for):
    self._settings, self._schedule = settings, schedule
    self._compile_for = compile_for
    self._jitted = {}  # phase -> jitted step
    self._compiled = {}  # phase -> what a call runs: the jitted step, or a `Compiled`
    self._pending = {}  # phase -> (thread, result) of a background compile

  def _phase(self, state, step):
    method = self._settings.method
    if step is None and method.phased:
      step = int(jax.device_get(state.step))
    return method.for_step(step, self._schedule)

  def _jitted_for(self, phase):
    if phase not in self._jitted:
      self._jitted[phase] = self._compile_for(dataclasses.replace(self._settings, method=phase))
    return self._jitted[phase]

  def _for_step(self, state, step):
    phase = self._phase(state, step)
    if phase in self._pending:  # compiling in the background: wait for it
      thread, result = self._pending.pop(phase)
      thread.join()
      if 'error' in result:
        raise result['error']
      self._compiled[phase] = result['compiled']
    if phase not in self._compiled:
      self._compiled[phase] = self._jitted_for(phase)
    return self._compiled[phase]

  def compiles(self, state, step: int | None = None) -> bool:
    """Whether the call for `step` compiles a program first, or waits for one
    compiling in the background (for timing)."""
    return self._phase(state, step) not in self._compiled

  def batch_keys(self, step: int) -> tuple[str, ...] | None:
    """The batch keys step `step` reads, or None for all (the loop transfers
    only these)."""
    phase = self._settings.method.for_step(step, self._schedule)
    if phase.method != self._settings.method.method and not methods.get(phase.method).unlabeled:
      return ('x', 'y')
    return None

  def precompile(self, state, batch, rng, step: int) -> None:
    """Starts compiling the program of `step`'s phase in a background thread
    and returns at once; the first call in that phase waits for it and runs
    the compiled executable (no second compile); a compile error is raised
    there. For the full step while a supervised warm-up runs: XLA compiles
    on one core, which the small warm-up step leaves partly idle.

    Args:
      state, batch, rng: arrays or `jax.ShapeDtypeStruct`s (with shardings)
        like that step's arguments.
      step: a step of the phase to compile.
    """
    phase = self._phase(state, step)
    if phase in self._compiled or phase in self._pending:
      return
    jitted = self._jitted_for(phase)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    args = jax.tree.map(spec, (state, batch, rng))
    result = {}

    def work():
      try:
        result['compiled'] = jitted.lower(*args).compile()
      except Exception as e:  # pylint: disable=broad-except
        result['error'] = e

    # Not a daemon: the interpreter waits for it at exit (a process that exits
    # while XLA compiles in one of its threads aborts), whatever ends the run.
    thread = threading.Thread(target=work, name='train-step-precompile')
    thread.start()
    self._pending[phase] = (thread, result)

  def __call__(self, state, batch, rng, step: int | None = None):
    return self._for_step(state, step)(state, batch, rng)

  def lower(self, state, batch, rng, step: int | None = None):
    return self._jitted_for(self._phase(state, step)).lower(state, batch, rng)
