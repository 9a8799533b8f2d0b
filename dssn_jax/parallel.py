"""The 1-D data-parallel device mesh and how arrays are placed on it.

One mesh axis, `data`, spans every device of every host. Batches are sharded
along their leading axis on `data`; the train state is replicated. Under
`jax.jit` a plain BatchNorm then computes global batch statistics (sync-BN)
and gradients come out as the global mean, with no collective written by
hand. A program traced under `tracing_mesh(mesh)` also lets layers see the
mesh (`data_axis_size`): the train step's BatchNorm then gathers its
per-device statistics in one collective (`models.layers.BatchNorm`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: all devices, all hosts)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from this host's share of a batch.

  Args:
    local_batch: numpy arrays whose leading axis is this process's part of the
      global batch (global batch / process count).
    mesh: the data mesh.
  Returns:
    The same keys as global `jax.Array`s sharded on `data`.
  """
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:  # the local batch is the global one: one transfer call
    return jax.device_put({k: np.asarray(v) for k, v in local_batch.items()}, sharding)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host-identical pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


@contextlib.contextmanager
def tracing_mesh(mesh: Mesh):
  """Context in which a traced program sees `mesh` (as an abstract mesh):
  `data_axis_size()` and `jax.shard_map(mesh=None)` use it. Enter it inside
  the jitted function, so that it holds while JAX traces."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def data_axis_size() -> int:
  """Devices on the `data` axis of the mesh being traced under
  (`tracing_mesh`); 1 outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[AXIS])


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str) -> None:
  """Raises if `global_batch` cannot be split evenly over devices and hosts."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch % n_dev or global_batch % n_proc:
    raise ValueError(
      f'{what}={global_batch} must be divisible by the number of devices '
      f'({n_dev}) and of processes ({n_proc})'
    )
