"""Orbax checkpoints of the whole run: train state, rng and data iterators.

Layout of a workdir:

    DIR/config.json          the experiment config (written once, process 0)
    DIR/checkpoints/<step>/  one orbax checkpoint per saved step, items:
        state                {'train_state': TrainState, 'rng': key data}
        data_<name>          one grain iterator state per stream (per process)

Saves are atomic (orbax writes to a temporary directory and renames it when
the write is complete), so a crash mid-save leaves the previous checkpoint
intact and the run resumes from it. The last `keep` checkpoints are kept,
and so is the one with the best teacher mIoU (`miou_teacher` in the metrics
given to `save`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from dssn_jax import config_lib
from dssn_jax.cli import UserError

STATE = 'state'
BEST_METRIC = 'miou_teacher'
DAMAGED = 'checkpoints_damaged'  # beside `checkpoints/`: checkpoints that failed to restore


class CheckpointError(UserError):
  """A checkpoint could not be written, or none in a workdir restores."""


class WorkdirInUse(UserError):
  """Another live run holds the workdir's lock."""


def _grain_checkpoint():
  return grain.checkpoint


def _absolute(path) -> str:
  """Local paths made absolute; URLs (`gs://...`) as they are."""
  path = str(path)
  return path if '://' in path else os.path.abspath(path)


def _best_metric(metrics) -> float:
  """Ranks checkpoints; those saved without an evaluation rank last."""
  return float(metrics.get(BEST_METRIC, float('-inf')))


class Checkpointer:
  """Saves and restores `(train_state, rng, data iterators)` under `directory`.

  Args:
    directory: where the step folders go (`DIR/checkpoints`).
    keep: how many of the most recent checkpoints to keep (the best by
      teacher mIoU is kept in addition).
    data_items: name -> grain `DatasetIterator`, saved and restored in place.
  """

  def __init__(self, directory: str, *, keep: int = 2, data_items: dict[str, Any] | None = None):
    self.directory = _absolute(directory)
    self.data_items = dict(data_items or {})
    handlers = {STATE: ocp.StandardCheckpointHandler()}
    if self.data_items:
      gc = _grain_checkpoint()
      for name in self.data_items:
        handlers[f'data_{name}'] = gc.CheckpointHandler()
    policy = ocm.AnyPreservationPolicy(
      [
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
      ]
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=_best_metric,
        best_mode='max',
        create=True,
        enable_async_checkpointing=True,
      ),
      item_names=tuple(handlers),
      item_handlers=handlers,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest teacher mIoU among saved checkpoints."""
    best, best_value = None, None
    for step in self.manager.all_steps():
      metrics = self.manager.metrics(step)
      if metrics and BEST_METRIC in metrics:
        value = float(metrics[BEST_METRIC])
        if best_value is None or value > best_value:
          best, best_value = step, value
    return best

  def save(
    self, step: int, state: Any, rng: jax.Array, metrics: dict[str, float] | None = None
  ) -> None:
    """Writes a checkpoint of `state`, `rng` and every data iterator."""
    items = {
      STATE: ocp.args.StandardSave(
        {'train_state': state, 'rng': np.asarray(jax.random.key_data(rng))}
      )
    }
    if self.data_items:
      gc = _grain_checkpoint()
      for name, it in self.data_items.items():
        items[f'data_{name}'] = gc.CheckpointSave(it)
    # Every save carries metrics (maybe empty) so orbax persists them. The
    # write is asynchronous: its errors surface here at the next save, or in
    # `wait`/`close`.
    try:
      self.manager.save(
        step, args=ocp.args.Composite(**items), metrics=dict(metrics or {}), force=True
      )
    except Exception as e:  # noqa: BLE001 (any failure of the file system)
      raise self._save_error(e) from e

  def _save_error(self, error: BaseException) -> CheckpointError:
    root = epath.Path(self.directory)
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
    kept = f'the checkpoints at steps {steps} are intact' if steps else 'no checkpoint was written'
    return CheckpointError(
      f'writing a checkpoint to {self.directory} failed ({type(error).__name__}: {error}); '
      f'{kept}. Free space or fix permissions, then run again to resume.'
    )

  def restore_newest(self, abstract_state: Any) -> tuple[Any, jax.Array, int] | None:
    """Restores the newest checkpoint that restores; None if there is none.

    A newer checkpoint that fails to restore (a truncated file, say) is
    moved to `DIR/checkpoints_damaged/<step>` with a warning once an older
    one has restored. If none restores, nothing is moved and the error lists
    each checkpoint and why.

    Returns:
      `(train_state, rng, step)` or None when the directory holds none.
    Raises:
      CheckpointError: no checkpoint restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state, rng = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 (tensorstore raises plain Exception)
        reason = str(e).splitlines()[0].split(' See full TensorStore details')[0]
        failures.append((step, f'{type(e).__name__}: {reason[:300]}'))
        continue
      for bad, why in failures:
        moved = self._move_aside(bad)
        print(
          f'warning: checkpoint step {bad} does not restore ({why}); moved to {moved}; '
          f'resuming from step {step}',
          file=sys.stderr,
          flush=True,
        )
      if failures:
        self.manager.reload()
      return state, rng, step
    if failures:
      lines = '\n'.join(f'  step {step}: {why}' for step, why in failures)
      raise CheckpointError(f'no checkpoint in {self.directory} restores:\n{lines}')
    return None

  def _move_aside(self, step: int) -> str:
    """Moves a step folder to `../checkpoints_damaged/` (process 0); returns where."""
    source = epath.Path(self.directory) / str(step)
    target_dir = epath.Path(self.directory).parent / DAMAGED
    target = target_dir / str(step)
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      n = 1
      while target.exists():
        target, n = target_dir / f'{step}.{n}', n + 1
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'dssn_jax_move_aside_{step}')
    return str(target)

  def restore(
    self, step: int, abstract_state: Any, restore_data: bool = True
  ) -> tuple[Any, jax.Array]:
    """Restores the state onto the shardings of `abstract_state`.

    Args:
      step: which checkpoint.
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with `sharding`
        set, shaped like the saved train state (e.g. from `jax.eval_shape`).
      restore_data: also restore the data iterators in place.
    Returns:
      `(train_state, rng)`.
    """
    target = {'train_state': abstract_state, 'rng': np.zeros((2,), np.uint32)}
    restored = self.manager.restore(
      step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
    )
    if restore_data:
      for name, it in self.data_items.items():
        it.set_state(read_iterator_state(epath.Path(self.directory) / str(step) / f'data_{name}'))
    tree = restored[STATE]
    return tree['train_state'], jax.random.wrap_key_data(tree['rng'])

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def read_iterator_state(item_dir) -> Any:
  """The grain iterator state this process resumes from, any process count.

  grain writes one `process_<i>-of-<n>.json` per process. The pipeline's
  state is the number of global batches read, the same on every host
  (`data/pipeline.py`), so a run with another process count resumes from
  the files of the run that wrote them, once checked to agree.
  """
  item_dir = epath.Path(item_dir)
  own = item_dir / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  if own.exists():
    return json.loads(own.read_text())
  files = sorted(item_dir.glob('process_*-of-*.json'))
  if not files:
    raise FileNotFoundError(f'no data iterator state in {item_dir}')
  states = [json.loads(f.read_text()) for f in files]
  if any(state != states[0] for state in states[1:]):
    raise ValueError(
      f'{item_dir}: the data iterator states of the {len(files)} processes that '
      f'wrote this checkpoint differ, so it cannot resume with '
      f'{jax.process_count()} processes'
    )
  return states[0]


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """Refuses to resume a workdir with a config that changes state or data.

  Only when `DIR/checkpoints/` holds a checkpoint and `DIR/config.json`
  exists (a run killed before its first checkpoint starts afresh).

  Returns:
    The allowed changes, `config.key: saved -> new` each, for the log.
  Raises:
    config_lib.ConfigError: listing each refused key with both values.
  """
  path = epath.Path(workdir) / 'config.json'
  ckpts = epath.Path(workdir) / 'checkpoints'
  has_ckpt = ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
  if not (has_ckpt and path.exists()):
    return []
  saved = _with_defaults(json.loads(path.read_text()))  # keys added since: their defaults
  new = json.loads(config.to_json_best_effort())
  refused, allowed = config_lib.resume_changes(saved, new)
  if refused:
    raise config_lib.ConfigError(
      f'{workdir} holds checkpoints of another config; these keys change the train state '
      'or the data (use a new --workdir, or the saved values):\n  ' + '\n  '.join(refused)
    )
  return allowed


class WorkdirLock:
  """One run per workdir: `DIR/lock` holds the owner's pid, host and start time.

  `acquire` creates it atomically; a lock whose process is gone (same host,
  no such pid, or the pid now belongs to a process started later) is taken
  over, a live one refused with `WorkdirInUse` naming the process. Object
  store workdirs (`gs://...`) are not locked (no atomic create). Only
  process 0 of a multi-process run takes the lock.
  """

  def __init__(self, workdir: str):
    self.path = None if '://' in str(workdir) else os.path.join(_absolute(workdir), 'lock')
    self.held = False

  @staticmethod
  def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), else None."""
    try:
      with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
      return None

  def _owner_alive(self, owner: dict[str, Any]) -> bool:
    if owner.get('host') != socket.gethostname():
      return True  # cannot tell: assume alive
    pid = int(owner.get('pid', -1))
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
    started = owner.get('start_time')
    return started is None or self._start_time(pid) in (None, started)

  def acquire(self) -> str | None:
    """Takes the lock; returns a note when a stale lock was taken over."""
    if self.path is None or jax.process_index() != 0:
      return None
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'start_time': self._start_time(os.getpid()),
      'argv': ' '.join(sys.argv),
    }
    note = None
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        try:
          with open(self.path) as f:
            owner = json.load(f)
        except (OSError, ValueError):
          owner = {}
        if owner and self._owner_alive(owner):
          raise WorkdirInUse(
            f'{os.path.dirname(self.path)} is in use by process {owner.get("pid")} on '
            f'{owner.get("host")} ({owner.get("argv", "?")}); wait for it or stop it, or '
            f'delete {self.path} if that process is gone'
          ) from None
        note = (
          f'took over the lock of process {owner.get("pid", "?")} on '
          f'{owner.get("host", "?")}, which is gone'
        )
        os.remove(self.path)
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return note
    raise WorkdirInUse(f'could not take {self.path}: another run took it first')

  def release(self) -> None:
    if self.held:
      self.held = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    note = self.acquire()
    if note:
      print(f'warning: {note}', file=sys.stderr, flush=True)
    return self

  def __exit__(self, *exc):
    self.release()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `DIR/config.json` (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / 'config.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / 'config.json.tmp'
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads `DIR/config.json` back into a ConfigDict (tuples become lists).

  Keys `base_config` defines that the file lacks (a workdir written before
  they existed) get their defaults, so readers never need `config.get`.
  """
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: is {workdir!r} a dssn_jax workdir?')
  return ml_collections.ConfigDict(_with_defaults(json.loads(path.read_text())))


def _with_defaults(saved: dict) -> dict:
  """A saved config (JSON) with the `base_config` keys it lacks at their defaults."""

  def fill(into, defaults):
    for key, value in defaults.items():
      if key not in into:
        into[key] = value
      elif isinstance(value, dict) and isinstance(into[key], dict):
        fill(into[key], value)

  fill(saved, json.loads(config_lib.base_config().to_json_best_effort()))
  return saved


def resolve_step(checkpointer: Checkpointer, which: str | int) -> int:
  """Maps `best | latest | <step>` to a saved step, with a clear error."""
  steps = list(checkpointer.manager.all_steps())
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}')
  if which == 'latest':
    return checkpointer.latest_step()
  if which == 'best':
    best = checkpointer.best_step()
    return best if best is not None else checkpointer.latest_step()
  try:
    step = int(which)
  except ValueError:
    raise ValueError(f'checkpoint {which!r} must be best, latest or a step number') from None
  if step not in steps:
    raise ValueError(f'no checkpoint at step {step} in {checkpointer.directory}; saved: {steps}')
  return step


def restore_for_eval(workdir: str, which: str | int = 'best'):
  """Loads student and teacher variables of a workdir for evaluation.

  Every array is restored whole onto this process's first device, whatever
  the devices and hosts that wrote the checkpoint (a pod's checkpoint
  evaluates, predicts and exports on one CPU host).

  Returns:
    `(config, {'student': {'params', 'batch_stats'}, 'teacher': {...}}, step)`
    with arrays on the default device.
  """
  config = load_config(workdir)
  manager = ocp.CheckpointManager(
    _absolute(epath.Path(workdir) / 'checkpoints'),
    options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
    item_names=(STATE,),
    item_handlers={STATE: ocp.StandardCheckpointHandler()},
  )
  ckpt = Checkpointer.__new__(Checkpointer)
  ckpt.manager, ckpt.directory, ckpt.data_items = manager, manager.directory, {}
  step = resolve_step(ckpt, which)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
    manager.item_metadata(step)[STATE],
  )
  restored = manager.restore(
    step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target)})
  )
  ts = restored[STATE]['train_state']
  variables = {
    'student': {'params': ts['params'], 'batch_stats': ts['batch_stats']},
    'teacher': {'params': ts['teacher_params'], 'batch_stats': ts['teacher_batch_stats']},
  }
  manager.close()
  return config, variables, step
