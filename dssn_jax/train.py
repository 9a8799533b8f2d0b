"""The training loop: data, train step, evaluation, checkpoints and logs.

`train_and_evaluate(config, workdir)` is what `main.py` runs (under the
workdir's lock). It validates the config first, resumes by itself from the
newest checkpoint in `workdir` that restores, stops on a non-finite loss
(`config.train.nonfinite`), saves on SIGTERM (what a
Cloud TPU preemption sends) and exits cleanly, evaluates student and teacher
every `eval_every` steps, and writes

    DIR/metrics.jsonl   one JSON object per line (train and eval lines; train
                        lines carry `input_wait_s`, the seconds the loop
                        waited for input batches in the interval, and
                        `input_wait_frac`, that over the interval's time)
    DIR/events.*        TensorBoard scalars and the prediction grid
                        (tensorboardX, no TensorFlow)
    DIR/config.json     the config
    DIR/predictions.png the final teacher's and student's class maps of the
                        first `config.train.prediction_grid` validation
                        scenes (`dssn_jax.visualize`; also in TensorBoard
                        at every evaluation)
    DIR/predictions.npz the same scenes as arrays: `images` uint8 (N, H, W, 3),
                        `labels`, `teacher`, `student` int32 (N, H, W)
    DIR/checkpoints/    orbax checkpoints (a damaged one is moved to
                        DIR/checkpoints_damaged/ on resume)
    DIR/supervised/     with `train.supervised_branch`: the live baseline,
                        the supervised iteration on the run's own labeled
                        batches from where its labeled-only steps end (its
                        metrics.jsonl, events, checkpoints); trained after
                        the run, resumable like it

Only process 0 prints and writes logs; every process takes part in the
train step, evaluation and checkpointing.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from dssn_jax import checkpoint as ckpt_lib
from dssn_jax import compilation, config_lib, evaluate, models, optim, parallel, visualize
from dssn_jax import train_step as ts_lib
from dssn_jax.cli import UserError
from dssn_jax.data import datasets, pipeline
from dssn_jax.methods import supervised
from dssn_jax.models import pretrained


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, or None when it is not installed.

  tensorboardX imports PyTorch when it can (only to accept torch tensors);
  on an image with PyTorch that costs ~3 s and ~0.4 GB per run for nothing
  we use, so unless this process already imported it, torch is hidden for
  the duration of that import (`sys.modules['torch'] = None` makes `import
  torch` raise ImportError, which tensorboardX handles).
  """
  hidden = 'torch' not in sys.modules
  if hidden:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  finally:
    if hidden and sys.modules.get('torch', 0) is None:
      del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """metrics.jsonl + TensorBoard, written by process 0 only.

  The file starts as the lines `previous` (what `_rewind_metrics` kept),
  written once, atomically. Then:

  - local workdir: every record is appended and flushed (one `write` of a
    whole line), so the cost per line is constant; a crash can at worst cut
    the last line short, which `_rewind_metrics` skips.
  - object store (`gs://...`, any `scheme://`): objects cannot be appended
    to, so records are buffered and the whole file is rewritten atomically
    only at `flush()`, which the loop calls at every checkpoint and
    evaluation (and `close()`): a bounded number of rewrites per run
    instead of one per log line. After a crash the file is the last flushed
    one, which holds every line up to the last checkpoint, the point a
    resumed run rewinds to anyway.
  """

  def __init__(self, workdir: str, previous: list[str] = ()):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._path = epath.Path(workdir) / 'metrics.jsonl'
    self._lines = list(previous)
    self._object_store = '://' in str(workdir)
    self._file = None
    self._dirty = False
    if self.enabled:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      _write_lines(self._path, self._lines)
      if not self._object_store:
        self._file = open(str(self._path), 'a')  # noqa: SIM115  closed in close()
      writer_class = _summary_writer_class()
      self._tb = None if writer_class is None else writer_class(workdir)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps(record)
    if self._file is not None:
      self._file.write(line + '\n')
      self._file.flush()
    else:
      self._lines.append(line)
      self._dirty = True
    if self._tb is not None:
      split, step = record['split'], record['step']
      for key, value in record.items():
        if isinstance(value, (int, float)) and key != 'step':
          self._tb.add_scalar(f'{split}/{key}', value, step)
        elif isinstance(value, dict):
          for k, v in value.items():
            self._tb.add_scalar(f'{split}/{key}/{k}', v, step)
      self._tb.flush()

  @property
  def takes_images(self) -> bool:
    """Whether `image` writes anywhere (process 0 with TensorBoard)."""
    return self.enabled and self._tb is not None

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """A uint8 `(H, W, 3)` image to TensorBoard."""
    if self.takes_images:
      self._tb.add_image(tag, image, step, dataformats='HWC')
      self._tb.flush()

  def flush(self) -> None:
    """Makes the file hold every record so far (object stores: one rewrite)."""
    if self.enabled and self._dirty:
      _write_lines(self._path, self._lines)
      self._dirty = False

  def close(self) -> None:
    if self.enabled:
      self.flush()
      if self._file is not None:
        self._file.close()
        self._file = None
      if self._tb is not None:
        self._tb.close()


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class NonFiniteError(UserError):
  """Training met a non-finite loss or gradient and stopped."""


class _NonFiniteGuard:
  """Reads the step's `nonfinite` metric where the loop fetches metrics.

  The compiled step already left the variables unchanged on such a step;
  this decides whether the run goes on (`config.train.nonfinite`).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.mode = config.train.nonfinite
    self.max_skips = int(config.train.nonfinite_max_skips)
    self.consecutive = 0
    self.total = 0

  def any_in(self, pending: list[dict[str, jax.Array]]) -> bool:
    """Whether a not yet logged step was non-finite ('stop' mode only, else False)."""
    if self.mode != 'stop' or not pending:
      return False
    return bool(np.any(jax.device_get([m['nonfinite'] for m in pending])))

  def scan(self, fetched: list[dict[str, Any]], last_step: int) -> list[str]:
    """Counts the non-finite steps of a fetched window; one line per such step."""
    lines = []
    first = last_step - len(fetched) + 1
    for i, m in enumerate(fetched):
      if m['nonfinite'] > 0:
        self.consecutive += 1
        self.total += 1
        bad = [k for k, v in m.items() if k != 'nonfinite' and not np.isfinite(v)]
        lines.append(f'step {first + i}: non-finite {", ".join(bad)}; update skipped')
      else:
        self.consecutive = 0
    return lines

  def check(self, lines: list[str], checkpointer) -> None:
    """Raises NonFiniteError if the run must stop."""
    if not lines:
      return
    newest = checkpointer.latest_step()
    kept = (
      f'the newest checkpoint (step {newest}) holds the last good state'
      if newest is not None
      else 'no checkpoint was written'
    )
    if self.mode == 'stop':
      raise NonFiniteError(
        f'{lines[0]}; stopped ({kept}). Lower config.train.lr or check the data, or pass '
        '--config.train.nonfinite=skip to skip such steps'
      )
    if self.consecutive >= self.max_skips:
      raise NonFiniteError(
        f'{self.consecutive} non-finite steps in a row (config.train.nonfinite_max_skips='
        f'{self.max_skips}), the last {lines[-1]}; stopped ({kept})'
      )


class RunClock:
  """Wall seconds of a run by phase: the breakdown its last lines print.

  `setup` (data, model, restore, compiling nothing), `compile` (the first
  step of this process, compiled or loaded from the cache, run to
  completion), `input` (blocked in the input pipeline: with
  `data.workers=0` that is generating and augmenting the batch, while the
  previous step still runs on the XLA threads), `transfer` (host batch to
  device arrays), `steps` (the rest of the
  loop: dispatching and waiting for steps, fetching metrics, logging),
  `eval` and `checkpoint` (saving; orbax writes in the background and the
  next save or the end waits for it), `branch` (all of the supervised
  branch, `train.supervised_branch`). Written to `DIR/timing.json`.
  """

  PHASES = ('setup', 'compile', 'input', 'transfer', 'steps', 'eval', 'checkpoint', 'branch')

  def __init__(self):
    self.seconds = dict.fromkeys(self.PHASES, 0.0)
    self._start = self._mark = time.perf_counter()

  def lap(self, phase: str) -> float:
    """Charges the time since the last lap to `phase`; returns it."""
    now = time.perf_counter()
    dt, self._mark = now - self._mark, now
    self.seconds[phase] += dt
    return dt

  def summary(self, steps: int) -> dict[str, float]:
    total = time.perf_counter() - self._start
    loop = sum(self.seconds[k] for k in ('compile', 'input', 'transfer', 'steps'))
    return {
      'total_s': total,
      **{f'{k}_s': v for k, v in self.seconds.items()},
      'steps': steps,
      # Loop steps per second after the first (compiling) step.
      'steps_per_s': max(steps - 1, 0) / max(loop - self.seconds['compile'], 1e-9),
    }

  @staticmethod
  def line(t: dict[str, float]) -> str:
    branch = f' + supervised branch {t["branch_s"]:.0f}' if t.get('branch_s') else ''
    return (
      f'time: {t["total_s"]:.0f} s = setup {t["setup_s"]:.0f} + compile {t["compile_s"]:.0f} '
      f'+ input {t["input_s"]:.0f} + transfer {t["transfer_s"]:.0f} + steps {t["steps_s"]:.0f} + eval {t["eval_s"]:.0f} '
      f'+ checkpoints {t["checkpoint_s"]:.0f}{branch} ({t["steps"]} steps, {t["steps_per_s"]:.2f} '
      'steps/s after the first)'
    )


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def initial_variables(config: ml_collections.ConfigDict, model, rng: jax.Array, image_size: int):
  """Random init, with the backbone from `config.model.pretrained` if set.

  The init draws its numbers with the `rbg` generator seeded from `rng`:
  XLA compiles a network's worth of threefry draws about 2.5x slower (for
  `resnet_tiny`), and init runs once.
  """
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  seed = jax.random.randint(rng, (), 0, jnp.iinfo(jnp.int32).max)
  init_key = jax.random.key(seed, impl='rbg')
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(init_key)
  variables = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
  if config.model.pretrained:
    variables = pretrained.load_pretrained(
      variables,
      config.model.pretrained,
      layout=config.model.pretrained_layout,
      backbone=config.model.backbone,
    )
    _log(f'loaded pretrained backbone from {config.model.pretrained}')
  return variables


def _format_percent(x: float | None) -> str:
  return 'nan' if x is None else f'{x:.2f}'


@dataclasses.dataclass
class _Run:
  """What the training loop works with, built once by `_setup`."""

  config: ml_collections.ConfigDict
  settings: config_lib.Settings
  schedule: config_lib.Schedule
  data: Any
  state: Any
  train_rng: jax.Array
  checkpointer: Any
  step_fn: Any
  evaluator: Any
  writer: Any
  history: list
  start: int
  workdir: str
  model: Any
  tx: Any
  # The step whose state starts the supervised branch (`train.supervised_branch`).
  branch_from: int | None = None
  name: str = ''  # in the evaluation log lines: '' (the run) | 'supervised'
  # (step, (images, labels, class maps), grid) of the last evaluation's prediction grid
  grid: tuple[int, tuple, np.ndarray] | None = None


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Resolves the config once, builds data, model, state (fresh or restored),
  the compiled step and the evaluator, and logs the run's header line."""
  settings = config_lib.resolve(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  for change in ckpt_lib.check_resume_config(workdir, config):
    _log(f'resuming with a changed {change}')
  ckpt_lib.save_config(workdir, config)
  compilation.enable_persistent_cache(config.train.compilation_cache_dir)
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(config.data.batch_size, mesh, 'config.data.batch_size')

  # A supervised warm-up's batches hold x, y alone (labeled_only_steps).
  data = pipeline.TrainData(
    config, mesh, seed=config.seed, settings=settings, labeled_only_steps=None
  )
  schedule = settings.schedule(data.num_labeled if data.supervised else data.num_unlabeled)
  groups = settings.method.loss_groups
  _log(
    f'{settings.method.method}: {data.num_labeled} labeled, {data.num_unlabeled} unlabeled; '
    f'{schedule.total_steps} steps ({schedule.steps_per_epoch}/epoch), '
    f'lr {schedule.lr:g} (head {schedule.head_lr:g}), {jax.device_count()} devices, '
    f'{jax.process_count()} processes, {data.workers} input workers per host; '
    + (
      f'loss groups {groups} x {config.data.batch_size // groups} (per-GPU means)'
      if groups > 1
      else 'loss groups 1 (one objective over the global batch)'
    )
  )
  pad_to = evaluate.resolve_pad_to(config.data.eval_pad_to)
  if pad_to:
    _log(
      f'evaluation: images padded to multiples of {pad_to} (eval_pad_to={config.data.eval_pad_to};'
      ' --config.data.eval_pad_to=0 for the exact protocol)'
    )

  model = models.model_from_config(config)
  tx = optim.make_optimizer(schedule, config)
  state, train_rng, checkpointer = _initial_or_restored_state(
    config, model, tx, mesh, data, workdir
  )
  start = int(jax.device_get(state.step))
  step_fn = _make_step(config, model, tx, settings, schedule, mesh)
  if config.train.step_precompile and settings.method.phased:
    for step in later_phases(start, data.labeled_only_steps, schedule):
      step_fn.precompile(state, data.batch_spec(), jax.random.fold_in(train_rng, 0), step=step)
  evaluator = evaluate.Evaluator(model, config, mesh)
  if config.train.eval_precompile:
    evaluator.precompile(
      {'params': state.teacher_params, 'batch_stats': state.teacher_batch_stats},
      threads=_precompile_threads(config),
    )
  kept_lines, history = _rewind_metrics(workdir, start)
  writer = MetricWriter(workdir, kept_lines)
  return _Run(
    config=config,
    settings=settings,
    schedule=schedule,
    data=data,
    state=state,
    train_rng=train_rng,
    checkpointer=checkpointer,
    step_fn=step_fn,
    evaluator=evaluator,
    writer=writer,
    history=history,
    start=start,
    workdir=workdir,
    model=model,
    tx=tx,
    branch_from=_branch_from(config, data, schedule),
  )


def _make_step(config, model, tx, settings, schedule, mesh):
  """The run's compiled train step (`train_step.make_train_step`)."""
  return ts_lib.make_train_step(
    model,
    tx,
    settings,
    schedule,
    mesh,
    ema_decay=config.train.ema_decay,
    poly_power=config.train.poly_power,
  )


def _branch_from(config, data, schedule) -> int | None:
  """The step whose state starts the supervised branch: where the run's
  labeled-only steps end; None without `train.supervised_branch`, or when
  the whole run is labeled-only."""
  if not config.train.supervised_branch:
    return None
  step = data.labeled_only_steps
  if step >= schedule.total_steps:
    _log(
      f'no supervised branch: the first {step} steps are labeled-only, '
      f'the run has {schedule.total_steps}'
    )
    return None
  return step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Returns:
    A summary dict: last and best mIoU of student and teacher (percent),
    the final step, and whether the run stopped early on SIGTERM.
  """
  clock = RunClock()
  run = _setup(config, workdir)
  bar = tqdm(
    total=run.schedule.total_steps,
    initial=run.start,
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
    desc='train',
  )
  clock.lap('setup')
  step, preempted = _train_loop(run, bar, clock)
  clock.lap('steps')
  bar.close()
  branch = None
  if not preempted and run.branch_from is not None:
    branch, preempted = _train_branch(run)
    clock.lap('branch')
  if not preempted:
    _write_prediction_grid(run, workdir, step, branch)
    clock.lap('eval')
  run.evaluator.close()
  run.checkpointer.close()  # waits for the last save
  clock.lap('checkpoint')
  run.data.close()
  run.writer.close()
  return _report(
    config,
    workdir,
    run.history,
    clock,
    step,
    run.start,
    preempted,
    branch and branch.history,
    run.branch_from,
  )


def _run_eval(run: _Run, step: int) -> dict[str, Any]:
  """Evaluates teacher (and student), writes and logs the record."""
  record = _eval_record(run.evaluator, run.config, run.state, step)
  run.writer.write(record)
  run.history.append(record)
  if run.writer.takes_images and run.config.train.prediction_grid > 0:
    predictions = _predictions(run)
    run.grid = step, predictions, _prediction_grid(run, predictions)
    run.writer.image('eval/predictions', run.grid[2], step)
  if run.name:  # a model without a teacher of its own: the teacher holds it
    _log(f'{run.name} step {step}: mIoU {_format_percent(record["miou_teacher"])}')
  else:
    _log(
      f'step {step}: mIoU student {_format_percent(record["miou"])} '
      f'teacher {_format_percent(record["miou_teacher"])}'
    )
  return record


def _predictions(run: _Run) -> tuple[list, list, dict[str, list]]:
  """`(images, labels, {'teacher'|'student': class maps})` of the current
  models on the first `config.train.prediction_grid` validation scenes of
  this host."""
  images, labels, preds = run.evaluator.predict(
    _eval_models(run.config, run.state), int(run.config.train.prediction_grid)
  )
  return images, labels, {k: preds[k] for k in ('teacher', 'student') if k in preds}


def _prediction_grid(run: _Run, predictions) -> np.ndarray:
  """The grid of `_predictions(run)` (`visualize.prediction_grid`)."""
  config = run.config
  images, labels, preds = predictions
  return visualize.prediction_grid(
    images,
    labels,
    preds,
    datasets.palette(config),
    run.evaluator.class_names,
    ignore_index=int(config.data.ignore_index),
  )


def _write_prediction_grid(run: _Run, workdir: str, step: int, branch: _Run | None) -> None:
  """DIR/predictions.png of the final models (process 0; the grid of the
  last evaluation when it was of this step), with the supervised branch's
  final model in a column `supervised` before the teacher's when there is one."""
  if jax.process_index() != 0 or run.config.train.prediction_grid <= 0:
    return

  def final(r: _Run):  # the predictions of the last evaluation, if of this step
    return r.grid[1] if r.grid is not None and r.grid[0] == step else _predictions(r)

  predictions = final(run)
  if branch is not None:
    images, labels, preds = predictions
    predictions = (images, labels, {'supervised': final(branch)[2]['teacher'], **preds})
  if branch is None and run.grid is not None and run.grid[0] == step:
    grid = run.grid[2]
  else:
    grid = _prediction_grid(run, predictions)
  (epath.Path(workdir) / 'predictions.png').write_bytes(visualize.png_bytes(grid))
  (epath.Path(workdir) / 'predictions.npz').write_bytes(visualize.predictions_npz(*predictions))


def _train_loop(run: _Run, bar, clock: RunClock) -> tuple[int, bool]:
  """Steps until the schedule ends or SIGTERM; logs, evaluates and saves on
  their steps. Returns `(last step, preempted)`."""
  config, schedule, data, step_fn = run.config, run.schedule, run.data, run.step_fn
  labeled_only = data.supervised or data.labeled_only_steps >= schedule.total_steps
  window = _LogWindow(config.data.batch_size * (1 if labeled_only else 2))
  guard = _NonFiniteGuard(config)

  def shutdown():  # before an error leaves the loop: finish the checkpoint in flight
    bar.close()
    try:
      run.checkpointer.close()
    finally:
      data.close()
      run.writer.close()

  sizer = _WorkerSizer(data)
  compiled = False  # a compile in the current log window
  step = run.start
  with _Preemption() as preemption:
    while step < schedule.total_steps:
      if step == run.branch_from:
        clock.lap('steps')
        _save_branch_start(run, step)
        clock.lap('checkpoint')
      clock.lap('steps')
      local = data.local_batch()
      window.input_wait += clock.lap('input')
      keys = step_fn.batch_keys(step)  # a supervised warm-up reads only x, y
      batch = data.to_device(local if keys is None else {k: local[k] for k in keys})
      clock.lap('transfer')
      compiles = step_fn.compiles(run.state, step)
      rng = jax.random.fold_in(run.train_rng, step)
      run.state, metrics = step_fn(run.state, batch, rng, step=step)
      if compiles:  # the one sync outside log steps: compile time, for the breakdown
        jax.block_until_ready(metrics)
        clock.lap('compile')
        compiled = True
      step += 1
      window.pending.append(metrics)
      bar.update(1)
      eval_now = step % schedule.eval_every == 0 or step == schedule.total_steps
      save_now = eval_now or step % config.train.checkpoint_every == 0 or preemption.requested
      if (
        step % config.train.log_every == 0
        or step == schedule.total_steps
        or (save_now and guard.any_in(window.pending))  # never save past a non-finite step
      ):
        try:
          window.flush(run.writer, bar, guard, run.checkpointer, step)
        except NonFiniteError:
          shutdown()
          raise
        clock.lap('steps')
        sizer.observe(step, clock.seconds['steps'], compiled)
        compiled = False
      clock.lap('steps')
      eval_record = _run_eval(run, step) if eval_now else None
      clock.lap('eval')
      if save_now or preemption.requested:  # SIGTERM may arrive during the evaluation
        try:
          _save(run, step, eval_record)
        except ckpt_lib.CheckpointError:
          shutdown()
          raise
        clock.lap('checkpoint')
      if preemption.requested:
        _log(f'SIGTERM: saved step {step}, exiting')
        return step, True
  return step, False


def _branch_data(run: _Run, position: int):
  """The run's labeled batches alone, from batch `position` on: a stream of
  the run's data whose every step is labeled-only (the same `x`, `y`)."""
  data = pipeline.TrainData(
    run.config,
    run.data.mesh,
    seed=run.config.seed,
    settings=run.settings,
    labeled_only_steps=run.schedule.total_steps,
  )
  data.set_state({'train': {'position': position}})
  return data


def _branch_checkpointer(run: _Run, data):
  return ckpt_lib.Checkpointer(
    str(epath.Path(run.workdir) / BRANCH_DIR / 'checkpoints'),
    keep=run.config.train.keep_checkpoints,
    data_items=data.checkpoint_items(),
  )


def _save_branch_start(run: _Run, step: int) -> None:
  """The supervised branch's first checkpoint: the run's state at `step`
  (where its labeled-only steps end), unless the branch has one already."""
  data = _branch_data(run, step)
  try:
    checkpointer = _branch_checkpointer(run, data)
    try:
      if checkpointer.latest_step() is None:
        checkpointer.save(step, run.state, run.train_rng)
    finally:
      checkpointer.close()  # waits for the write: the next step donates the state
  finally:
    data.close()


def _train_branch(run: _Run) -> tuple[_Run | None, bool]:
  """Trains the supervised branch (`train.supervised_branch`) in
  DIR/supervised from its newest checkpoint to the run's last step: the
  supervised iteration with the run's optimizer, schedule and labeled
  batches, no EMA teacher (its teacher tracks the student, as the
  `supervised` method's does). Its history starts with the run's
  evaluations up to the branch point (the same model until then).

  Returns:
    `(the branch's _Run, preempted)`, or `(None, False)` when the branch
    has no checkpoint (the run passed the branch point without the flag).
  """
  config = run.config.copy_and_resolve_references()
  config.train.eval_student = False  # the teacher is the student
  workdir = str(epath.Path(run.workdir) / BRANCH_DIR)
  settings = dataclasses.replace(
    run.settings, method=supervised.of(run.settings.method), ema_schedule='student'
  )
  data = _branch_data(run, 0)  # the checkpoint holds the position
  checkpointer = _branch_checkpointer(run, data)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state
  )
  restored = checkpointer.restore_newest(abstract)
  if restored is None:
    _log(
      f'no supervised branch: {checkpointer.directory} holds no checkpoint (the run '
      f'passed step {run.branch_from} without train.supervised_branch)'
    )
    checkpointer.close()
    data.close()
    return None, False
  state, train_rng, start = restored
  kept_lines, history = _rewind_metrics(workdir, start)
  writer = MetricWriter(workdir, kept_lines)
  if not kept_lines:  # a new branch: the run's evaluations of the shared steps
    for record in run.history:
      if record['step'] <= run.branch_from:
        writer.write(record)
        history.append(record)
  step_fn = _make_step(config, run.model, run.tx, settings, run.schedule, run.data.mesh)
  branch = dataclasses.replace(
    run,
    config=config,
    settings=settings,
    data=data,
    state=state,
    train_rng=train_rng,
    checkpointer=checkpointer,
    step_fn=step_fn,
    writer=writer,
    history=history,
    start=start,
    workdir=workdir,
    branch_from=None,
    name='supervised',
    grid=None,
  )
  _log(f'supervised branch: steps {start}..{run.schedule.total_steps} in {workdir}')
  bar = tqdm(
    total=run.schedule.total_steps,
    initial=start,
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
    desc='supervised',
  )
  _, preempted = _train_loop(branch, bar, RunClock())
  bar.close()
  checkpointer.close()
  data.close()
  writer.close()
  return branch, preempted


def _save(run: _Run, step: int, eval_record: dict[str, Any] | None) -> None:
  """A checkpoint of `step` (best-teacher metric from its evaluation), then
  the metrics written so far."""
  metrics = None
  if eval_record is not None and eval_record['miou_teacher'] is not None:
    metrics = {ckpt_lib.BEST_METRIC: float(eval_record['miou_teacher'])}
  run.checkpointer.save(step, run.state, run.train_rng, metrics=metrics)
  run.writer.flush()


class _WorkerSizer:
  """`data.workers=-1`: the run starts with the workers for a step of
  `data.workers_step_s`; at the end of the first log window that runs the
  last phase's step without compiling, it sizes them for the measured step
  time (the loop's `steps` seconds per step: device time, not input waits)
  and, if the count differs, restarts the pipeline at its position with it
  (the same batches: `pipeline.PositionedIterator`). Once per process."""

  def __init__(self, data):
    self.data = data
    self.done = data.workers_for_step(1.0) is None  # a count set by the config
    self.mark: tuple[int, float] | None = None

  def observe(self, step: int, steps_seconds: float, compiled: bool) -> None:
    if self.done:
      return
    if compiled or step <= self.data.labeled_only_steps or self.mark is None:
      self.mark = (step, steps_seconds)
      return
    step_s = (steps_seconds - self.mark[1]) / max(step - self.mark[0], 1)
    self.done = True
    workers = self.data.workers_for_step(step_s)
    if workers != self.data.workers:
      _log(
        f'input workers per host: {self.data.workers} -> {workers} '
        f'for the measured {1000 * step_s:.0f} ms step'
      )
      self.data.resize_workers(workers)


class _LogWindow:
  """The metrics of the steps since the last log line, fetched on log steps."""

  def __init__(self, images_per_step: int):
    self.images_per_step = images_per_step
    self.pending: list[dict[str, jax.Array]] = []
    self.start = time.perf_counter()
    self.input_wait = 0.0  # seconds blocked on the input pipeline in this window

  def flush(self, writer, bar, guard, checkpointer, step: int) -> None:
    """Fetches the window (the loop's only host sync), writes its record and
    reports non-finite steps; raises `NonFiniteError` if the run must stop."""
    fetched = jax.device_get(self.pending)
    elapsed = time.perf_counter() - self.start
    bad_lines = guard.scan(fetched, step)
    record = _train_record(
      fetched, step, len(bad_lines), elapsed, self.images_per_step, self.input_wait
    )
    writer.write(record)
    bar.set_postfix(
      {k: f'{record[k]:.3f}' for k in ('loss', 'loss_x', 'mask_ratio') if k in record}
    )
    self.pending, self.start, self.input_wait = [], time.perf_counter(), 0.0
    for line in bad_lines:
      if jax.process_index() == 0:
        bar.write(line)
    guard.check(bad_lines, checkpointer)


def _report(
  config,
  workdir: str,
  history,
  clock: RunClock,
  step: int,
  start: int,
  preempted: bool,
  branch_history=None,
  branch_from: int | None = None,
):
  """The run's summary dict and its last lines: `final:` (mIoU), per-class
  IoU, `compare:` (the supervised branch, then the config's measured
  baseline) and `time:` (also DIR/timing.json). With a supervised branch
  the summary holds `supervised`, the branch's best mIoU."""
  timing = clock.summary(step - start)
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'timing.json').write_text(json.dumps(timing, indent=1) + '\n')
  summary = summarize(history)
  summary.update(step=step, preempted=preempted)
  if branch_history:
    summary['supervised'] = summarize(branch_history)['best_teacher']
  if not preempted:
    _log(
      'final: '
      + ' '.join(
        f'{k}={_format_percent(summary[k])}'
        for k in ('miou', 'best', 'miou_teacher', 'best_teacher')
      )
    )
    lines = per_class_lines(history)
    if branch_history:
      lines += per_class_lines(branch_history, models=(('supervised', 'iou_per_class_teacher'),))
    for line in lines + baseline_per_class_lines(config, history):
      _log(line)
    lines = (branch_line(summary, branch_history, branch_from), baseline_line(config, summary))
    for line in lines:
      if line:
        _log(line)
  _log(RunClock.line(timing))
  summary['time'] = timing
  return summary


# The supervised branch's directory inside the run's (`train.supervised_branch`).
BRANCH_DIR = 'supervised'

# More classes than this: the per-class lines name the lowest and highest few.
_PER_CLASS_ALL = 20
_PER_CLASS_ENDS = 5


def per_class_lines(
  history: list[dict[str, Any]],
  models=(('teacher', 'iou_per_class_teacher'), ('student', 'iou_per_class')),
) -> list[str]:
  """Per-class IoU (percent) of the teacher and the student at the evaluation
  with the best teacher mIoU (the first of equals), one line per model:
  `iou teacher (step N, best teacher): background=95.1 digit_0=40.2 ...`
  (spaces in names as `_`). Over 20 classes: the 5 lowest and 5 highest.
  `models`: `(name, record key)` of the lines (the supervised branch: its
  teacher, named `supervised`)."""
  evals = [r for r in history if r.get('miou_teacher') is not None]
  if not evals:
    return []
  best = max(evals, key=lambda r: r['miou_teacher'])
  lines = []
  for name, key in models:
    if key == 'iou_per_class' and best.get('miou') is None:
      continue  # student not evaluated (its key holds the teacher's)
    ious = best.get(key)
    if not ious:
      continue
    pairs = [(str(k).replace(' ', '_'), v) for k, v in ious.items()]
    head = f'iou {name} (step {best["step"]}, best {models[0][0]}'
    if len(pairs) > _PER_CLASS_ALL:
      ranked = sorted(pairs, key=lambda p: p[1])
      ends = _PER_CLASS_ENDS
      head += f'; {len(pairs)} classes, lowest {ends} .. highest {ends}'
      pairs = [*ranked[:ends], ('..', None), *ranked[-ends:]]
    text = ' '.join('..' if v is None else f'{k}={v:.1f}' for k, v in pairs)
    lines.append(f'{head}): {text}')
  return lines


def baseline_per_class_lines(config: ml_collections.ConfigDict, history) -> list[str]:
  """`config.baseline.iou_per_class` as one more per-class line, in the
  classes' order (the names of the run's evaluations), when it has one
  value per class: `iou supervised (baseline, mean of 3 seeds): ...`."""
  values = tuple(config.baseline.iou_per_class or ())
  names = next(
    (list(r['iou_per_class_teacher']) for r in history if r.get('iou_per_class_teacher')), []
  )
  if not values or len(values) != len(names) or len(names) > _PER_CLASS_ALL:
    return []
  b = config.baseline
  what = b.what.split(' on ')[0] if b.what else 'baseline'
  seeds = f', mean of {b.seeds} seeds' if b.seeds else ''
  text = ' '.join(f'{str(n).replace(" ", "_")}={v:.1f}' for n, v in zip(names, values))
  return [f'iou {what} (baseline{seeds}): {text}']


def branch_line(summary: dict[str, Any], branch_history, branch_from: int | None) -> str:
  """One line: the teacher's best mIoU next to the supervised branch's best
  (the live baseline), and how many points above (or below) it."""
  if not branch_history or summary.get('best_teacher') is None:
    return ''
  evals = [r for r in branch_history if r.get('miou_teacher') is not None]
  best = max(evals, key=lambda r: r['miou_teacher'])
  gain = summary['best_teacher'] - best['miou_teacher']
  return (
    f'compare: best_teacher={_format_percent(summary["best_teacher"])} with supervised on '
    f'the same labeled batches {_format_percent(best["miou_teacher"])}: {gain:+.2f} points '
    f'(live: the supervised iteration from the run\'s step-{branch_from} state, '
    f'its best at step {best["step"]}; DIR/{BRANCH_DIR})'
  )


def baseline_line(config: ml_collections.ConfigDict, summary: dict[str, Any]) -> str:
  """One line: the teacher's best mIoU next to `config.baseline`, if set,
  and how many points above (or below) it the teacher ended."""
  b = config.baseline
  if b.miou is None or summary.get('best_teacher') is None:
    return ''
  spread = f' +- {b.std:.2f}' if b.std is not None else ''
  where = f'mean of {b.seeds} seeds, {b.steps} steps' if b.seeds else f'{b.steps} steps'
  if int(config.train.steps or 0) != int(b.steps):
    where += f', not this run\'s {config.train.steps}'
  gain = summary['best_teacher'] - b.miou
  return (
    f'compare: best_teacher={_format_percent(summary["best_teacher"])} with {b.what} '
    f'{b.miou:.2f}{spread}: {gain:+.2f} points ({where}: {b.command})'
  )


def _initial_or_restored_state(config, model, tx, mesh, data, workdir: str):
  """(replicated TrainState, train rng, Checkpointer): the newest checkpoint
  of `workdir` that restores, else a fresh state from `config.seed`."""
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  variables = initial_variables(config, model, init_rng, config.data.crop_size)
  state = ts_lib.create_train_state(model, tx, init_rng, config.data.crop_size, variables=variables)
  state = parallel.replicate(state, mesh)
  del variables
  checkpointer = ckpt_lib.Checkpointer(
    str(epath.Path(workdir) / 'checkpoints'),
    keep=config.train.keep_checkpoints,
    data_items=data.checkpoint_items(),
  )
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  restored = checkpointer.restore_newest(abstract)
  if restored is not None:
    state, train_rng, start = restored
    _log(f'resumed from {checkpointer.directory} at step {start}')
  return state, train_rng, checkpointer


def _eval_models(config: ml_collections.ConfigDict, state) -> dict[str, Any]:
  """The variables of the teacher (and the student) to evaluate."""
  models_to_eval = {
    'teacher': {'params': state.teacher_params, 'batch_stats': state.teacher_batch_stats}
  }
  if config.train.eval_student:
    models_to_eval['student'] = {'params': state.params, 'batch_stats': state.batch_stats}
  return models_to_eval


def _eval_record(evaluator, config: ml_collections.ConfigDict, state, step: int) -> dict[str, Any]:
  """The metrics.jsonl line of an evaluation of the teacher (and student)."""
  return evaluate.eval_record(step, evaluator.evaluate(_eval_models(config, state)))


# Train-line keys that measure the machine, not the run: they differ between
# two runs of the same config (compare everything else).
WALL_CLOCK_METRICS = ('images_per_sec', 'input_wait_s', 'input_wait_frac')


def _train_record(
  fetched: list[dict[str, Any]],
  step: int,
  skipped: int,
  elapsed: float,
  images_per_step: int,
  input_wait: float,
) -> dict[str, Any]:
  """The metrics.jsonl line of a log window: the means of its finite steps."""
  good = [m for m in fetched if m['nonfinite'] == 0] or fetched
  mean = {k: float(np.mean([m[k] for m in good])) for k in fetched[0] if k != 'nonfinite'}
  return {
    'step': step,
    'split': 'train',
    **mean,
    'lr': float(fetched[-1]['lr']),
    'skipped': skipped,
    'images_per_sec': len(fetched) * images_per_step / max(elapsed, 1e-9),
    # Input-bound when this is a large fraction of the interval.
    'input_wait_s': input_wait,
    'input_wait_frac': input_wait / max(elapsed, 1e-9),
  }


def later_phases(start: int, labeled_only_steps: int, schedule) -> list[int]:
  """First steps of the phases after `start` whose programs compile in the
  background (`train.step_precompile`): the full step after a supervised
  warm-up, and the running-BN teacher after the first epoch (DSSN's
  `teacher_bn='reference'`; a phase that is not one is compiled once, as
  `make_train_step` dedups by program). Steps of labeled-only batches are
  left out: `batch_spec` is the full batch's."""
  bounds = {labeled_only_steps, schedule.steps_per_epoch}
  return sorted(b for b in bounds if start < b < schedule.total_steps and b >= labeled_only_steps)


def _precompile_threads(config: ml_collections.ConfigDict) -> int:
  """Compiler threads for the evaluation programs (`train.eval_precompile_threads`).

  Auto (0): one on a CPU backend, whose cores also train; elsewhere a
  quarter of the host's cores, at most 8 (the rest feed the input pipeline).
  """
  n = int(config.train.eval_precompile_threads)
  if n > 0:
    return n
  if jax.default_backend() == 'cpu':
    return 1
  return max(1, min(8, pipeline.available_cores() // 4))


def _write_lines(path: epath.Path, lines: list[str]) -> None:
  """Writes `lines` to `path` atomically (temporary file, then rename)."""
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(''.join(line + '\n' for line in lines))
  tmp.replace(path)


def _rewind_metrics(workdir: str, upto: int) -> tuple[list[str], list[dict[str, Any]]]:
  """metrics.jsonl lines up to step `upto`, and the eval records among them.

  A run resumed from the checkpoint at `upto` writes the later steps again,
  so lines a killed run wrote after its last checkpoint are dropped, and so
  is a last line a crash cut short (it does not parse).
  """
  path = epath.Path(workdir) / 'metrics.jsonl'
  kept, evals = [], []
  if path.exists():
    for line in path.read_text().splitlines():
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a crash

      if rec['step'] <= upto:
        kept.append(line)
        if rec.get('split') == 'eval':
          evals.append(rec)
  return kept, evals


def summarize(history: list[dict[str, Any]]) -> dict[str, float | None]:
  """Last and best mIoU of student and teacher over the eval records."""

  def series(key):
    return [r[key] for r in history if r.get(key) is not None]

  student, teacher = series('miou'), series('miou_teacher')
  return {
    'miou': student[-1] if student else None,
    'best': max(student) if student else None,
    'miou_teacher': teacher[-1] if teacher else None,
    'best_teacher': max(teacher) if teacher else None,
  }
