"""dssn_jax.distributed: argument validation, cluster detection, and what is
passed to `jax.distributed.initialize` (recorded, never started here)."""

import jax
import pytest

from dssn_jax import distributed


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize and config updates instead of running them."""
  record = {'initialize': [], 'config': []}
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: record['initialize'].append(kw))
  monkeypatch.setattr(
    jax.config, 'update', lambda name, value: record['config'].append((name, value))
  )
  for var in (
    'SLURM_NTASKS',
    'OMPI_COMM_WORLD_SIZE',
    'TPU_WORKER_HOSTNAMES',
    'SLURM_STEP_NUM_TASKS',
    'SLURM_STEP_NUM_NODES',
    'SLURM_NNODES',
    'JAX_LOCAL_DEVICE_IDS',
    'CUDA_VISIBLE_DEVICES',
  ):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  return record


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(coordinator_address='127.0.0.1:1234'),
    dict(num_processes=2, process_id=0),
    dict(coordinator_address='127.0.0.1:1234', num_processes=2),
  ],
)
def test_partial_explicit_arguments_are_rejected(calls, kwargs):
  with pytest.raises(ValueError, match='go together'):
    distributed.initialize(**kwargs)
  assert not calls['initialize']


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (
      dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=2),
      r'--process_id=2 must be in \[0, 2\)',
    ),
    (
      dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=-1),
      r'--process_id=-1',
    ),
    (
      dict(coordinator_address='127.0.0.1:1234', num_processes=0, process_id=0),
      '--num_processes=0 must be at least 1',
    ),
    (dict(coordinator_address='127.0.0.1', num_processes=2, process_id=0), 'must be host:port'),
    (
      dict(coordinator_address='127.0.0.1:http', num_processes=2, process_id=0),
      'must be host:port',
    ),
    (dict(coordinator_address=':1234', num_processes=2, process_id=0), 'must be host:port'),
    (dict(coordinator_address='h:70000', num_processes=2, process_id=0), 'must be host:port'),
    (
      dict(coordinator_address='h:1234', num_processes=2, process_id=0, force=False),
      '--nodistributed contradicts',
    ),
  ],
)
def test_bad_explicit_arguments_are_rejected(calls, kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)
  assert not calls['initialize']


def test_explicit_arguments_start_the_runtime_with_gloo_on_cpu(calls):
  assert distributed.initialize('127.0.0.1:1234', 2, 1)
  assert calls['initialize'] == [
    dict(coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1)
  ]
  assert ('jax_cpu_collectives_implementation', 'gloo') in calls['config']


def test_no_gloo_off_cpu(calls, monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert distributed.initialize('[::1]:1234', 2, 0)
  assert calls['config'] == []


def test_single_process_without_cluster_does_nothing(calls):
  assert not distributed.initialize()
  assert not distributed.initialize(force=False)
  assert calls['initialize'] == []


def test_force_uses_auto_detection(calls):
  assert distributed.initialize(force=True)
  assert calls['initialize'] == [dict(local_device_ids=None)]


@pytest.mark.parametrize(
  'environ, expected',
  [
    ({}, None),
    ({'SLURM_NTASKS': '1'}, None),
    ({'SLURM_NTASKS': '8'}, 'slurm'),
    ({'OMPI_COMM_WORLD_SIZE': '4'}, 'openmpi'),
    ({'TPU_WORKER_HOSTNAMES': 'w0'}, None),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu'),
  ],
)
def test_cluster_detected(environ, expected):
  assert distributed.cluster_detected(environ) == expected


@pytest.mark.parametrize(
  'environ, expected',
  [
    # One process per node, 4 GPUs: keep all of them.
    (
      {'SLURM_STEP_NUM_TASKS': '2', 'SLURM_STEP_NUM_NODES': '2', 'CUDA_VISIBLE_DEVICES': '0,1,2,3'},
      [0, 1, 2, 3],
    ),
    ({'SLURM_NTASKS': '3', 'SLURM_NNODES': '3', 'CUDA_VISIBLE_DEVICES': '4,5'}, [0, 1]),
    # One process per GPU: JAX's own choice (GPU $SLURM_LOCALID) is right.
    (
      {'SLURM_STEP_NUM_TASKS': '8', 'SLURM_STEP_NUM_NODES': '2', 'CUDA_VISIBLE_DEVICES': '0,1,2,3'},
      None,
    ),
    # The user said which devices.
    (
      {
        'SLURM_STEP_NUM_TASKS': '2',
        'SLURM_STEP_NUM_NODES': '2',
        'CUDA_VISIBLE_DEVICES': '0,1,2,3',
        'JAX_LOCAL_DEVICE_IDS': '0,1',
      },
      None,
    ),
    # Unknown or single GPU: nothing to widen.
    ({'SLURM_STEP_NUM_TASKS': '2', 'SLURM_STEP_NUM_NODES': '2'}, None),
    ({'SLURM_STEP_NUM_TASKS': '2', 'SLURM_STEP_NUM_NODES': '2', 'CUDA_VISIBLE_DEVICES': '0'}, None),
  ],
)
def test_slurm_local_device_ids(environ, expected):
  assert distributed.slurm_local_device_ids(environ) == expected


def test_slurm_one_process_per_node_keeps_every_gpu(calls, monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  monkeypatch.setenv('SLURM_NTASKS', '2')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '2')
  monkeypatch.setenv('SLURM_STEP_NUM_NODES', '2')
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3')
  assert distributed.initialize()
  assert calls['initialize'] == [dict(local_device_ids=[0, 1, 2, 3])]
