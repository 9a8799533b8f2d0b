"""What a run survives: config errors, damaged or unwritable checkpoints, a
busy workdir, a resume with another config, a non-finite loss, and the
command lines' user errors (one line, status 2)."""

import builtins
import errno
import glob
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from dssn_jax import checkpoint as ckpt_lib
from dssn_jax import config_lib, train
from dssn_jax.data import sources
from dssn_jax.testing.configs import REPO, load_config, read_metrics, tiny

# --- config validation -------------------------------------------------------


def test_every_config_validates():
  for name in ('digits', 'pascal', 'cityscapes', 'coco'):
    config_lib.validate(load_config(name))


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('loss.strong', -1.0, 'config.loss.strong=-1.0 must be >= 0'),
    ('loss.threshold', 1.5, 'config.loss.threshold=1.5 must be in [0.0, 1.0]'),
    ('train.ema_decay', 1.0, 'config.train.ema_decay=1.0 must be in [0.0, 1.0)'),
    ('data.crop_size', 4, 'config.data.crop_size=4 must be an integer >= 8'),
    ('train.lr', float('nan'), 'config.train.lr=nan must be > 0'),
    ('train.nonfinite', 'ignore', "config.train.nonfinite='ignore' must be one of stop, skip"),
    ('model.backbone', 'resnet18', "config.model.backbone='resnet18' must be one of"),
  ],
)
def test_impossible_values_are_refused_before_anything_runs(key, value, message, tmp_path):
  config = load_config('digits')
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert message in str(e.value)
  assert not (tmp_path / 'run').exists()  # refused before the workdir was touched


# --- resume with another config ---------------------------------------------


def _workdir_with_checkpoint(tmp_path, config):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '10').mkdir(parents=True)
  ckpt_lib.save_config(str(workdir), config)
  return str(workdir)


def test_resume_with_a_state_changing_config_is_refused(tmp_path):
  workdir = _workdir_with_checkpoint(tmp_path, load_config('digits'))
  config = load_config('digits')
  config.data.batch_size = 4
  config.model.backbone = 'resnet50'
  with pytest.raises(config_lib.ConfigError) as e:
    ckpt_lib.check_resume_config(workdir, config)
  text = str(e.value)
  assert 'config.data.batch_size: 8 -> 4' in text
  assert "config.model.backbone: 'resnet_tiny' -> 'resnet50'" in text


def test_resume_with_changed_frequencies_is_allowed_and_noted(tmp_path):
  workdir = _workdir_with_checkpoint(tmp_path, load_config('digits'))
  config = load_config('digits')
  steps = config.train.steps
  config.train.log_every = 7
  config.train.steps = 2 * steps
  config.data.workers = 4
  notes = ckpt_lib.check_resume_config(workdir, config)
  assert notes == [
    'config.data.workers: 0 -> 4',
    'config.train.log_every: 50 -> 7',
    f'config.train.steps: {steps} -> {2 * steps}',
  ]
  # No checkpoint yet (killed before the first save): anything goes.
  os.rmdir(os.path.join(workdir, 'checkpoints', '10'))
  config.data.batch_size = 4
  assert ckpt_lib.check_resume_config(workdir, config) == []


def test_a_workdir_older_than_a_key_resumes_with_its_default_unnoted(tmp_path):
  """A config.json written before a key existed (here `imports`, added with
  the registries) resumes: the missing key reads as its default, which is
  no change; another value is one."""
  workdir = _workdir_with_checkpoint(tmp_path, load_config('digits'))
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  del saved['imports']
  with open(path, 'w') as f:
    json.dump(saved, f)
  assert ckpt_lib.check_resume_config(workdir, load_config('digits')) == []
  config = load_config('digits')
  config.imports = ('json',)
  assert ckpt_lib.check_resume_config(workdir, config) == ["config.imports: [] -> ['json']"]


# --- one run per workdir ----------------------------------------------------


def test_live_lock_is_refused_naming_the_process(tmp_path):
  other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    lock = ckpt_lib.WorkdirLock(str(tmp_path))
    lock.acquire()
    # Hand the lock to the other (live) process, as if it had taken it.
    with open(lock.path) as f:
      owner = json.load(f)
    owner.update(pid=other.pid, start_time=ckpt_lib.WorkdirLock._start_time(other.pid))
    with open(lock.path, 'w') as f:
      json.dump(owner, f)
    lock.held = False
    with pytest.raises(ckpt_lib.WorkdirInUse, match=f'in use by process {other.pid} on'):
      ckpt_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    other.kill()
    other.wait()


def test_stale_lock_is_taken_over_and_released(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  lock = ckpt_lib.WorkdirLock(str(tmp_path))
  with open(lock.path, 'w') as f:
    json.dump({'pid': dead.pid, 'host': os.uname().nodename, 'argv': 'main.py'}, f)
  note = lock.acquire()
  assert note and f'process {dead.pid}' in note and 'gone' in note
  with open(lock.path) as f:
    assert json.load(f)['pid'] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)


# --- checkpoint integrity ---------------------------------------------------


def _state(value):
  return {'w': jnp.full((20000,), value, jnp.float32), 'b': jnp.full((3,), value)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _saved(tmp_path, steps=(1, 2)):
  directory = str(tmp_path / 'run' / 'checkpoints')
  ckpt = ckpt_lib.Checkpointer(directory, keep=5)
  for step in steps:
    ckpt.save(step, _state(float(step)), jax.random.key(step))
  ckpt.wait()
  return ckpt, directory


def truncate_newest_data_file(step_dir):
  """Cuts the largest array data file of a checkpoint in half (a torn write)."""
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  return biggest


def test_damaged_newest_checkpoint_is_moved_aside(tmp_path, capsys):
  ckpt, directory = _saved(tmp_path)
  truncate_newest_data_file(os.path.join(directory, '2'))
  state, _, step = ckpt.restore_newest(_abstract(_state(0.0)))
  assert step == 1 and float(state['b'][0]) == 1.0
  damaged = tmp_path / 'run' / ckpt_lib.DAMAGED / '2'
  assert damaged.is_dir() and not os.path.exists(os.path.join(directory, '2'))
  err = capsys.readouterr().err
  assert 'checkpoint step 2 does not restore' in err and str(damaged) in err
  assert list(ckpt.manager.all_steps()) == [1]
  ckpt.close()


def test_no_checkpoint_restores_lists_each_and_moves_none(tmp_path):
  ckpt, directory = _saved(tmp_path)
  for step in (1, 2):
    truncate_newest_data_file(os.path.join(directory, str(step)))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt.restore_newest(_abstract(_state(0.0)))
  assert 'step 2:' in str(e.value) and 'step 1:' in str(e.value)
  assert sorted(os.listdir(directory)) == ['1', '2']
  ckpt.close()


def test_failed_save_is_reported_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
  ckpt, directory = _saved(tmp_path)
  real_open = builtins.open

  def disk_full(file, mode='r', *args, **kwargs):
    if str(file).startswith(directory) and any(c in mode for c in 'wax'):
      raise OSError(errno.ENOSPC, 'No space left on device', str(file))
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', disk_full)
  monkeypatch.setattr(io, 'open', disk_full)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpt.save(3, _state(3.0), jax.random.key(3))
    ckpt.wait()  # the write is asynchronous: its error may surface here
  monkeypatch.undo()
  assert 'No space left on device' in str(e.value) and '[1, 2] are intact' in str(e.value)
  fresh = ckpt_lib.Checkpointer(directory, keep=5)
  state, _, step = fresh.restore_newest(_abstract(_state(0.0)))
  assert step == 2 and float(state['b'][0]) == 2.0
  fresh.close()


# --- non-finite loss ---------------------------------------------------------


def _exploding(steps, **train):
  """AdamW at lr 1e30: step 1 is finite and throws the params to ~1e30, so
  step 2's forward overflows and its loss is NaN."""
  config = tiny(load_config('digits', 'method=supervised'), steps)
  config.train.lr = 1e30
  config.train.checkpoint_every = 1
  for key, value in train.items():
    config.train[key] = value
  return config


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(_exploding(6), workdir)
  assert 'step 2: non-finite grad_norm, loss, loss_x; update skipped' in str(
    e.value
  ) and '(step 1)' in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1']
  lines = [r for r in read_metrics(workdir) if r['split'] == 'train']
  assert [(r['step'], r['skipped']) for r in lines] == [(1, 0), (2, 1)]


@pytest.mark.slow
def test_nonfinite_skip_mode_skips_up_to_the_limit(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.NonFiniteError, match='3 non-finite steps in a row'):
    train.train_and_evaluate(_exploding(8, nonfinite='skip', nonfinite_max_skips=3), workdir)
  lines = [r for r in read_metrics(workdir) if r['split'] == 'train']
  assert [(r['step'], r['skipped']) for r in lines] == [(1, 0), (2, 1), (3, 1), (4, 1)]
  # Steps 2 and 3 were skipped and saved (the state is the step-1 one).
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert steps[-1] == 3


# --- command lines ------------------------------------------------------------


def _cli(*args, cwd=REPO):
  return subprocess.run(
    [sys.executable, *args],
    capture_output=True,
    text=True,
    timeout=180,
    cwd=cwd,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )


@pytest.mark.parametrize(
  'args,message',
  [
    (('main.py', '--config', 'configs/digits.py', '--config.loss.strong=-1'), 'config.loss.strong'),
    (('-m', 'dssn_jax.evaluate', '--workdir', '/nonexistent/run'), '/nonexistent/run'),
    (('-m', 'dssn_jax.predict', '--input', '/nonexistent/in', '--output', 'o'), '/nonexistent/in'),
    (
      ('-m', 'dssn_jax.data', 'check', '--config', 'configs/digits.py', '--config.data.cutmix_p=2'),
      'config.data.cutmix_p=2.0 must be in [0.0, 1.0]',
    ),
  ],
)
def test_cli_user_errors_are_one_line_and_status_2(args, message, tmp_path):
  if args[0] == 'main.py':
    args = (*args, '--workdir', str(tmp_path / 'run'))
  proc = _cli(*args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert len([line for line in proc.stderr.splitlines() if line.strip()]) <= 3, proc.stderr


@pytest.mark.parametrize(
  'mistake,message',
  [
    ('config', 'config file configs/nope.py does not exist; configs/ holds'),
    ('workdir', 'is a file; name a folder'),
    ('arg', "unknown config argument 'splt' in 'splt=92'; did you mean 'split'?"),
    ('override', "--config.train.stepz: the config has no key 'stepz'; Did you mean \"steps\""),
  ],
)
def test_a_newcomers_first_mistakes_are_one_line_and_status_2(mistake, message, tmp_path):
  """A config path that does not exist, a workdir that is a file, a misspelled
  ARG or override key: one `error:` line each, before anything is written."""
  config = {'config': 'configs/nope.py', 'arg': 'configs/pascal.py:splt=92'}
  workdir = tmp_path / 'run'
  if mistake == 'workdir':
    workdir.write_text('')
  extra = ['--config.train.stepz=3'] if mistake == 'override' else []
  proc = _cli(
    'main.py',
    '--config',
    config.get(mistake, 'configs/digits.py'),
    '--workdir',
    str(workdir),
    *extra,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr


# --- a training image deleted after the data check -----------------------------


@pytest.mark.slow  # three short trainings
def test_deleted_training_image_is_named_and_the_run_resumes_once_restored(tmp_path):
  from dssn_jax.testing import fake_datasets  # pylint: disable=g-import-not-at-top

  def config(steps):
    c = tiny(load_config('pascal'), steps)
    c.method = 'supervised'
    c.train.checkpoint_every = 1
    c.data.root, c.data.splits_dir = root, splits
    return c

  root, splits = fake_datasets.make_pascal(str(tmp_path / 'data'))
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config(2), workdir)
  image = os.path.join(root, 'JPEGImages', '2007_000001.jpg')
  os.rename(image, image + '.away')
  with pytest.raises(sources.DatasetError, match='2007_000001.jpg'):
    train.train_and_evaluate(config(4), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')))[-1] == '2'
  os.rename(image + '.away', image)
  summary = train.train_and_evaluate(config(4), workdir)
  assert summary['step'] == 4
  train_steps = [r['step'] for r in read_metrics(workdir) if r['split'] == 'train']
  assert train_steps == [1, 2, 3, 4]


def test_quiet_library_logs_drops_orbax_chatter_and_the_tracker_warning(monkeypatch):
  import logging  # pylint: disable=g-import-not-at-top

  from dssn_jax import cli  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(sys, 'warnoptions', [])
  absl_logger = logging.getLogger('absl')
  monkeypatch.setattr(absl_logger, 'filters', [])
  cli.quiet_library_logs()

  def record(level, path):
    return logging.LogRecord('absl', level, path, 1, 'msg', None, None)

  orbax_file = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not absl_logger.filter(record(logging.WARNING, orbax_file))
  assert absl_logger.filter(record(logging.ERROR, orbax_file))
  assert absl_logger.filter(record(logging.WARNING, '/site-packages/jax/_src/x.py'))
  # The resource tracker is a child process: it gets the option through -W.
  assert 'ignore::UserWarning:multiprocessing.resource_tracker' in sys.warnoptions
