"""The launch scripts: what --dry-run prints, the loud failures on missing or
wrong arguments, and (with stand-ins for gcloud and main.py) what they run.
No cloud, GPU or SLURM is needed."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
MAIN = ['--config', 'configs/digits.py', '--workdir', '/tmp/run']


def run(script, *args, env=None, cwd=ROOT, timeout=60):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(
    ['bash', str(LAUNCH / script), *args],
    cwd=cwd,
    env=full_env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def lines(result):
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def fails(result, *messages):
  assert result.returncode == 2, (result.stdout, result.stderr)
  for message in messages:
    assert message in result.stderr
  assert result.stdout == ''


@pytest.mark.parametrize('script', ['local_multihost.sh', 'gpu.sh', 'tpu_pod.sh'])
def test_help(script):
  result = run(script, '--help')
  assert result.returncode == 0
  assert result.stdout.startswith('Usage: launch/' + script)
  assert '--dry-run' in result.stdout


@pytest.mark.parametrize('script', ['local_multihost.sh', 'gpu.sh', 'tpu_pod.sh'])
def test_unknown_option(script):
  fails(run(script, '--frobnicate'), 'unknown option --frobnicate')


# local_multihost.sh


def test_local_dry_run_prints_one_command_per_process():
  result = run(
    'local_multihost.sh',
    '--dry-run',
    '--python',
    sys.executable,
    '3',
    '2',
    '--',
    *MAIN,
    '--config.train.steps=4',
  )
  commands = lines(result)
  assert len(commands) == 3
  coordinators = set()
  for i, cmd in enumerate(commands):
    assert cmd[:4] == [
      'env',
      'JAX_PLATFORMS=cpu',
      'XLA_FLAGS=--xla_force_host_platform_device_count=2',
      'PYTHONUNBUFFERED=1',
    ]
    assert cmd[4:6] == [sys.executable, str(ROOT / 'main.py')]
    assert cmd[6:11] == [*MAIN, '--config.train.steps=4']
    assert cmd[11] == '--coordinator_address'
    assert cmd[12].startswith('127.0.0.1:')
    coordinators.add(cmd[12])
    assert cmd[13:] == ['--num_processes', '3', '--process_id', str(i)]
  assert len(coordinators) == 1


def test_local_dry_run_keeps_existing_xla_flags_and_port():
  result = run(
    'local_multihost.sh',
    '--dry-run',
    '--port',
    '4321',
    '1',
    '4',
    '--',
    *MAIN,
    env={'XLA_FLAGS': '--xla_cpu_use_xnnpack=true'},
  )
  (cmd,) = lines(result)
  assert ('XLA_FLAGS=--xla_cpu_use_xnnpack=true --xla_force_host_platform_device_count=4') in cmd
  assert cmd[cmd.index('--coordinator_address') + 1] == '127.0.0.1:4321'


@pytest.mark.parametrize(
  'args, message',
  [
    ([], 'expected N_PROCESSES DEVICES_PER_PROCESS'),
    (['2', '--', *MAIN], 'expected N_PROCESSES DEVICES_PER_PROCESS'),
    (['0', '2', '--', *MAIN], 'N_PROCESSES must be a positive integer'),
    (['2', 'two', '--', *MAIN], "DEVICES_PER_PROCESS must be a positive integer, got 'two'"),
    (['2', '2'], 'no --config'),
    (['2', '2', '--', '--workdir', '/tmp/x'], 'no --config'),
    (['2', '2', '--', '--config', 'configs/digits.py'], 'no --workdir'),
    (
      ['2', '2', '--', '--config', 'configs/nope.py', '--workdir', 'w'],
      "config file 'configs/nope.py' not found",
    ),
    (['2', '2', '--', *MAIN, '--process_id', '1'], '--process_id is set by this script'),
    (['2', '2', '--', *MAIN, '--num_processes=2'], '--num_processes is set by this script'),
    (['--python'], '--python needs a value'),
  ],
)
def test_local_missing_or_bad_arguments(args, message):
  fails(run('local_multihost.sh', '--dry-run', *args), message)


def test_config_with_argument_is_checked_without_it():
  result = run(
    'local_multihost.sh',
    '--dry-run',
    '1',
    '1',
    '--',
    '--config',
    'configs/digits.py:method=fixmatch',
    '--workdir',
    'w',
  )
  assert lines(result)[0][6:8] == ['--config', 'configs/digits.py:method=fixmatch']


FAKE_MAIN = r'''
import os, signal, sys, time
pid = int(sys.argv[sys.argv.index('--process_id') + 1])
print('process', pid, 'of', sys.argv[sys.argv.index('--num_processes') + 1],
      os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS'])
print('warning from', pid, file=sys.stderr)
mode = sys.argv[sys.argv.index('--mode') + 1]
if mode == 'fail' and pid == 1:
  time.sleep(0.5)
  sys.exit(3)
if mode == 'fail':
  if pid == 2:  # ignores SIGTERM: must be killed
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  time.sleep(60)
'''


@pytest.fixture
def fake_main(tmp_path):
  path = tmp_path / 'fake_main.py'
  path.write_text(FAKE_MAIN)
  (tmp_path / 'cfg.py').write_text('')
  return path


def run_fake_main(fake_main, *args, mode, timeout=60):
  """local_multihost.sh ARGS on `fake_main` (whose `--mode` says how it ends)."""
  return run(
    'local_multihost.sh',
    '--python',
    sys.executable,
    '--main',
    str(fake_main),
    *args,
    '--',
    '--config',
    'cfg.py',
    '--workdir',
    'w',
    '--mode',
    mode,
    cwd=fake_main.parent,
    timeout=timeout,
  )


def test_local_runs_every_process_with_prefixed_output(fake_main):
  result = run_fake_main(fake_main, '3', '2', mode='ok')
  assert result.returncode == 0, result.stderr
  out = result.stdout.splitlines()
  for i in range(3):
    assert f'[{i}] process {i} of 3 cpu --xla_force_host_platform_device_count=2' in out
    assert f'[{i}] warning from {i}' in out
  assert len(out) == 6


def test_local_failure_stops_the_others_and_propagates_the_status(fake_main):
  result = run_fake_main(fake_main, '--grace', '1', '3', '1', mode='fail', timeout=30)
  assert result.returncode == 3, (result.stdout, result.stderr)
  assert 'process 1 exited with status 3; stopping the others' in result.stderr
  # Nothing is left behind: the SIGTERM-ignoring process was killed.
  ps = subprocess.run(['ps', '-eo', 'args'], capture_output=True, text=True).stdout
  assert str(fake_main) not in ps


# gpu.sh


def test_gpu_single_node_dry_run():
  (cmd,) = lines(run('gpu.sh', '--dry-run', '--python', 'py', '--', *MAIN))
  assert cmd == ['py', str(ROOT / 'main.py'), *MAIN]
  (cmd,) = lines(run('gpu.sh', '--dry-run', '--gpus-per-node', '3', '--python', 'py', '--', *MAIN))
  assert cmd == ['env', 'CUDA_VISIBLE_DEVICES=0,1,2', 'py', str(ROOT / 'main.py'), *MAIN]


def test_gpu_slurm_dry_run():
  (cmd,) = lines(
    run(
      'gpu.sh',
      '--dry-run',
      '--nodes',
      '2',
      '--gpus-per-node=4',
      '--partition',
      'gpu',
      '--time',
      '48:00:00',
      '--account',
      'lab',
      '--cpus-per-task',
      '16',
      '--srun-arg=--exclusive',
      '--python',
      'py',
      '--',
      *MAIN,
      '--config.data.root=/shared/VOC 2012',
    )
  )
  srun_end = cmd.index('env')
  assert cmd[0] == 'srun'
  assert set(cmd[1:srun_end]) == {
    '--nodes=2',
    '--ntasks-per-node=1',
    '--gpus-per-node=4',
    '--partition=gpu',
    '--time=48:00:00',
    '--account=lab',
    '--cpus-per-task=16',
    '--job-name=dssn_jax',
    '--kill-on-bad-exit=1',
    '--label',
    '--exclusive',
  }
  assert cmd[srun_end:] == [
    'env',
    'JAX_LOCAL_DEVICE_IDS=0,1,2,3',
    'py',
    str(ROOT / 'main.py'),
    '--distributed',
    *MAIN,
    '--config.data.root=/shared/VOC 2012',
  ]


def test_gpu_slurm_one_node():
  (cmd,) = lines(run('gpu.sh', '--dry-run', '--slurm', '--gpus-per-node', '8', '--', *MAIN))
  assert cmd[0] == 'srun' and '--nodes=1' in cmd and '--distributed' not in cmd


@pytest.mark.parametrize(
  'args, message',
  [
    ([], 'no -- MAIN_ARGS'),
    (['--nodes', '2'], 'no -- MAIN_ARGS'),
    (['--nodes', '2', '--', *MAIN], '--gpus-per-node is required with SLURM'),
    (['--nodes', 'two', '--', *MAIN], "--nodes must be a positive integer, got 'two'"),
    (['--nodes'], '--nodes needs a value'),
    (['--gpus-per-node', '0', '--', *MAIN], '--gpus-per-node must be a positive integer'),
    (['--partition', 'gpu', '--', *MAIN], '--partition is a SLURM option'),
    (
      ['--time', '2 days', '--slurm', '--gpus-per-node', '1', '--', *MAIN],
      '--time must look like HH:MM:SS',
    ),
    (['--', '--config', 'configs/digits.py'], 'no --workdir'),
    (['--', '--workdir', 'w'], 'no --config'),
    (['--', *MAIN, '--coordinator_address=h:1'], '--coordinator_address is set by this script'),
  ],
)
def test_gpu_missing_or_bad_arguments(args, message):
  fails(run('gpu.sh', '--dry-run', *args), message)


def test_gpu_runs_main_with_the_arguments(tmp_path):
  recorder = tmp_path / 'python'
  recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$CUDA_VISIBLE_DEVICES" "$@" > "$RECORD"\n')
  recorder.chmod(0o755)
  record = tmp_path / 'argv'
  result = run(
    'gpu.sh',
    '--gpus-per-node',
    '2',
    '--python',
    str(recorder),
    '--',
    *MAIN,
    env={'RECORD': str(record)},
  )
  assert result.returncode == 0, result.stderr
  assert record.read_text().splitlines() == ['0,1', str(ROOT / 'main.py'), *MAIN]


# tpu_pod.sh

TPU = ['--tpu-name', 'dssn', '--zone', 'us-central2-b', '--project', 'proj']
GS_MAIN = ['--config', 'configs/pascal.py:split=92', '--workdir', 'gs://bucket/voc92']
WHERE = ['--zone=us-central2-b', '--project=proj']


def remote_command(cmd):
  return cmd[cmd.index('--command') + 1]


def test_tpu_dry_run_create_install_train():
  commands = lines(
    run(
      'tpu_pod.sh',
      '--dry-run',
      *TPU,
      '--create',
      '--accelerator-type',
      'v4-32',
      '--version',
      'tpu-ubuntu2204-base',
      '--spot',
      '--',
      *GS_MAIN,
      '--config.data.root=/mnt/VOC',
    )
  )
  create, ls_files, pack, copy, install, train = commands
  assert create == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'create',
    'dssn',
    *WHERE,
    '--accelerator-type=v4-32',
    '--version=tpu-ubuntu2204-base',
    '--spot',
  ]
  assert ls_files[:5] == ['git', '-C', str(ROOT), 'ls-files', '--cached']
  assert pack[:2] == ['tar', '-czf'] and pack[3:5] == ['-C', str(ROOT)]
  assert copy[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert copy[5] == pack[2] and copy[6] == 'dssn:dssn_jax-src.tar.gz'
  assert '--worker=all' in copy
  for cmd in (install, train):
    assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'dssn']
    assert '--worker=all' in cmd and set(WHERE) <= set(cmd)
  assert 'tar -xzf dssn_jax-src.tar.gz -C dssn_jax' in remote_command(install)
  assert 'pip install -q "jax[tpu]" gcsfs google-cloud-storage -e ./dssn_jax' in remote_command(
    install
  )
  assert shlex.split(remote_command(train)) == [
    'cd',
    'dssn_jax',
    '&&',
    '../dssn_jax_venv/bin/python',
    'main.py',
    '--distributed',
    *GS_MAIN,
    '--config.data.root=/mnt/VOC',
  ]


def test_tpu_dry_run_reuse_skip_install_background():
  describe, train = lines(
    run(
      'tpu_pod.sh',
      '--dry-run',
      *TPU,
      '--skip-install',
      '--background',
      '--remote-dir',
      'exp1',
      '--',
      *GS_MAIN,
      '--config.data.root=/mnt/my data',
    )
  )
  assert describe == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'describe',
    'dssn',
    *WHERE,
    '--format=value(state)',
  ]
  script = remote_command(train)
  assert script.startswith('cd exp1 && nohup ../exp1_venv/bin/python main.py --distributed ')
  assert "'--config.data.root=/mnt/my data'" in script
  assert '> train.log 2>&1 < /dev/null &' in script


def test_tpu_remote_scripts_are_valid_shell():
  commands = lines(
    run(
      'tpu_pod.sh',
      '--dry-run',
      *TPU,
      '--setup',
      'echo "set up"',
      '--background',
      '--',
      *GS_MAIN,
      "--config.data.root=/it's",
    )
  )
  scripts = [remote_command(c) for c in commands if '--command' in c]
  assert len(scripts) == 3
  for script in scripts:
    check = subprocess.run(['bash', '-n', '-c', script], capture_output=True, text=True)
    assert check.returncode == 0, (script, check.stderr)


@pytest.mark.parametrize(
  'args, message',
  [
    (['--zone', 'z', '--project', 'p', '--', *GS_MAIN], 'missing --tpu-name'),
    (['--tpu-name', 't', '--project', 'p', '--', *GS_MAIN], 'missing --zone'),
    (['--tpu-name', 't', '--zone', 'z', '--', *GS_MAIN], 'missing --project'),
    ([*TPU, '--create', '--version', 'v', '--', *GS_MAIN], '--create needs --accelerator-type'),
    ([*TPU, '--create', '--accelerator-type', 'v4-8', '--', *GS_MAIN], '--create needs --version'),
    ([*TPU, '--accelerator-type', 'v4-8', '--', *GS_MAIN], 'only apply with --create'),
    ([*TPU, '--spot', '--', *GS_MAIN], '--spot only applies with --create'),
    ([*TPU], 'no -- MAIN_ARGS'),
    ([*TPU, '--', '--config', 'configs/pascal.py'], 'no --workdir'),
    ([*TPU, '--', '--workdir', 'gs://b/x'], 'no --config'),
    (
      [*TPU, '--', '--config', 'configs/digits.py', '--workdir', '/tmp/x'],
      "--workdir '/tmp/x' is not a gs:// path",
    ),
    (
      [*TPU, '--', '--config', str(ROOT / 'configs/digits.py'), '--workdir', 'gs://b/x'],
      'must be relative to the repository root',
    ),
    (
      [*TPU, '--', '--config', 'configs/missing.py', '--workdir', 'gs://b/x'],
      "config file 'configs/missing.py' not found",
    ),
    ([*TPU, '--remote-dir', '../x', '--', *GS_MAIN], '--remote-dir must be a plain directory'),
    ([*TPU, '--', *GS_MAIN, '--process_id=0'], '--process_id is set by this script'),
  ],
)
def test_tpu_missing_or_bad_arguments(args, message):
  fails(run('tpu_pod.sh', '--dry-run', *args), message)


def test_tpu_local_workdir_on_request():
  *_, train = lines(
    run(
      'tpu_pod.sh',
      '--dry-run',
      *TPU,
      '--local-workdir',
      '--',
      '--config',
      'configs/digits.py',
      '--workdir',
      '/home/me/run',
    )
  )
  assert '--workdir /home/me/run' in remote_command(train)


FAKE_GCLOUD = r'''#!/bin/sh
# Logs its arguments as one JSON line; plays the TPU API.
"$PYTHON_FOR_FAKE" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$GCLOUD_LOG"
case "$3 $4" in
  "tpu-vm describe") echo "$FAKE_STATE"; [ "$FAKE_STATE" != missing ] ;;
  "tpu-vm scp") cp "$5" "$GCLOUD_COPY" ;;
esac
'''


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
  (bin_dir / 'gcloud').chmod(0o755)
  log, copy = tmp_path / 'gcloud.jsonl', tmp_path / 'copied.tar.gz'
  env = {
    'PATH': f'{bin_dir}:{os.environ["PATH"]}',
    'GCLOUD_LOG': str(log),
    'GCLOUD_COPY': str(copy),
    'PYTHON_FOR_FAKE': sys.executable,
    'FAKE_STATE': 'READY',
    'TMPDIR': str(tmp_path),
  }
  return env, log, copy


def test_tpu_runs_the_gcloud_steps_and_ships_the_checkout(fake_gcloud):
  if not (ROOT / '.git').exists():
    pytest.skip('tpu_pod.sh ships a git checkout; this tree is not one')
  env, log, copy = fake_gcloud
  result = run('tpu_pod.sh', *TPU, '--', *GS_MAIN, env=env)
  assert result.returncode == 0, result.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [c[3] for c in calls] == ['describe', 'scp', 'ssh', 'ssh']
  assert 'pip install' in remote_command(calls[2])
  assert 'main.py --distributed' in remote_command(calls[3])
  with tarfile.open(copy) as tar:
    names = set(tar.getnames())
  for expected in (
    'main.py',
    'pyproject.toml',
    'dssn_jax/distributed.py',
    'configs/pascal.py',
    'launch/tpu_pod.sh',
  ):
    assert expected in names
  assert not any(n == '.git' or n.startswith('.git/') for n in names)
  # The temporary tarball and file list are removed.
  assert not list(pathlib.Path(env['TMPDIR']).glob('dssn_jax-src-*'))


@pytest.mark.parametrize(
  'state, message',
  [
    ('CREATING', "TPU 'dssn' is in state 'CREATING', not READY"),
    ('missing', "cannot describe TPU 'dssn'"),
  ],
)
def test_tpu_refuses_a_slice_that_is_not_ready(fake_gcloud, state, message):
  env, log, _ = fake_gcloud
  result = run('tpu_pod.sh', *TPU, '--', *GS_MAIN, env=dict(env, FAKE_STATE=state))
  assert result.returncode == 2
  assert message in result.stderr
  assert [json.loads(line)[3] for line in log.read_text().splitlines()] == ['describe']


# launch/README.md


def _normalize(text):
  text = text.replace(str(ROOT), '/work/main')
  text = re.sub(r'127\.0\.0\.1:\d+', '127.0.0.1:PORT', text)
  return re.sub(r'dssn_jax-src-\d+', 'dssn_jax-src-PID', text)


def test_readme_shows_the_real_dry_run_output():
  """Every `$ launch/...` block of launch/README.md is what the script prints now."""
  readme = (LAUNCH / 'README.md').read_text()
  blocks = re.findall(r'```\n\$ (launch/\S+ --dry-run[^\n]*)\n(.*?)```', readme, re.S)
  assert {b[0].split()[0] for b in blocks} == {
    'launch/local_multihost.sh',
    'launch/gpu.sh',
    'launch/tpu_pod.sh',
  }
  for command, shown in blocks:
    result = subprocess.run(
      ['bash', '-c', command],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=dict(os.environ, PYTHON='python3', TMPDIR='/tmp'),
      timeout=60,
    )
    assert result.returncode == 0, (command, result.stderr)
    assert _normalize(result.stdout) == _normalize(shown), command
