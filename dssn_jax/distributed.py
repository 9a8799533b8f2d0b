"""Starting JAX's multi-host runtime, once, before any computation.

Cloud TPU pod slices, SLURM and Open MPI jobs are detected from their
environment and `jax.distributed.initialize()` finds its own arguments there.
Anywhere else (a hand-started cluster, the local rehearsal of
`launch/local_multihost.sh`) pass the coordinator address, the process count
and this process's id. On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax


def cluster_detected(environ=os.environ) -> str | None:
  """Names the multi-process environment we are in, or None."""
  if int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'slurm'
  if int(environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'openmpi'
  if ',' in environ.get('TPU_WORKER_HOSTNAMES', ''):
    return 'tpu'
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               force: bool | None = None) -> bool:
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
    ValueError: explicit arguments given only in part.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
    raise ValueError(
        '--coordinator_address, --num_processes and --process_id go together; got '
        f'coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, '
        f'process_id={process_id!r}')
  if force is False:
    return False
  if 'cpu' in os.environ.get('JAX_PLATFORMS', '').split(','):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address is not None:
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, {num_processes})')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  if force or cluster_detected():
    jax.distributed.initialize()
    return True
  return False
