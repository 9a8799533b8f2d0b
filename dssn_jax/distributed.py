"""Starting JAX's multi-host runtime, once, before any computation.

Cloud TPU pod slices, SLURM and Open MPI jobs are detected from their
environment and `jax.distributed.initialize()` finds its own arguments there.
Anywhere else (a hand-started cluster, the local rehearsal of
`launch/local_multihost.sh`) pass the coordinator address, the process count
and this process's id. On CPU, cross-process collectives use gloo.

SLURM with one process per node (`launch/gpu.sh`): JAX's auto-detection
would restrict each process to GPU `$SLURM_LOCALID`, i.e. one GPU per node.
`slurm_local_device_ids` keeps every GPU of the node instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax


def cluster_detected(environ: Mapping[str, str] = os.environ) -> str | None:
  """Names the multi-process environment we are in, or None."""
  if int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'slurm'
  if int(environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'openmpi'
  if ',' in environ.get('TPU_WORKER_HOSTNAMES', ''):
    return 'tpu'
  return None


def slurm_local_device_ids(environ: Mapping[str, str] = os.environ) -> list[int] | None:
  """All visible GPUs when a SLURM step runs one process per node, else None.

  None leaves the choice to JAX: `JAX_LOCAL_DEVICE_IDS` if set, else one GPU
  per process (`$SLURM_LOCALID`), right for one process per GPU.
  """
  if environ.get('JAX_LOCAL_DEVICE_IDS'):
    return None
  tasks = environ.get('SLURM_STEP_NUM_TASKS') or environ.get('SLURM_NTASKS')
  nodes = environ.get('SLURM_STEP_NUM_NODES') or environ.get('SLURM_NNODES')
  if not tasks or not nodes or int(tasks) != int(nodes):
    return None
  visible = [d for d in environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if len(visible) < 2:
    return None
  return list(range(len(visible)))


def _check_coordinator_address(address: str) -> None:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'--coordinator_address={address!r} must be host:port (e.g. 10.0.0.2:1234)')


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  force: bool | None = None,
) -> bool:
  """Initializes `jax.distributed` when this is a multi-process run.

  Args:
    coordinator_address: `host:port` of process 0 (explicit mode).
    num_processes: total number of processes (explicit mode).
    process_id: this process's index (explicit mode).
    force: True always initializes (auto-detection); False never does;
      None initializes when explicit arguments or a cluster are present.
  Returns:
    Whether the distributed runtime was started.
  Raises:
    ValueError: explicit arguments given only in part, out of range, or
      together with `force=False`.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError(
      '--coordinator_address, --num_processes and --process_id go together; got '
      f'coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, '
      f'process_id={process_id!r}'
    )
  if coordinator_address is not None:
    _check_coordinator_address(coordinator_address)
    if num_processes < 1:
      raise ValueError(f'--num_processes={num_processes} must be at least 1')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, {num_processes})')
    if force is False:
      raise ValueError(
        '--nodistributed contradicts --coordinator_address/--num_processes/--process_id'
      )
  if force is False:
    return False
  if 'cpu' in os.environ.get('JAX_PLATFORMS', '').split(','):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address is not None:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True
  cluster = cluster_detected()
  if force or cluster:
    local_ids = slurm_local_device_ids() if cluster == 'slurm' else None
    jax.distributed.initialize(local_device_ids=local_ids)
    return True
  return False
