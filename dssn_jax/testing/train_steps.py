"""Train steps of `resnet_tiny` on random batches, for the train-step tests
(in-process and in the 1-vs-8-device subprocess).

`run_steps` compiles the step once and runs a few steps from one fixed
random init per model (`initial_variables`), returning host copies of every
state and each step's metrics.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

from dssn_jax import config_lib, optim, parallel
from dssn_jax import train_step as ts
from dssn_jax.testing import batches

NUM_CLASSES = 4


def make_config(method='dssn', **loss):
  config = config_lib.base_config()
  config.method = method
  config.data.num_classes = NUM_CLASSES
  config.train.steps = 20
  for key, value in loss.items():
    config.loss[key] = value
  return config


def make_schedule(config, warmup_steps=1, steps_per_epoch=None):
  schedule = config_lib.resolve(config).schedule(100)
  schedule = dataclasses.replace(schedule, warmup_steps=warmup_steps)
  if steps_per_epoch is not None:
    schedule = dataclasses.replace(schedule, steps_per_epoch=steps_per_epoch)
  return schedule


def make_batch(size, batch=2, seed=0, supervised=False):
  """A random `(batch, size, size)` train batch of `NUM_CLASSES` classes
  (`batches.synthetic_batch`)."""
  return batches.synthetic_batch(batch, size, NUM_CLASSES, supervised=supervised, seed=seed)


def to_host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


_INIT = {}


def initial_state(model, size: int = 33):
  """One random init per model, shared (params do not depend on image size;
  `size`: an input side the model takes, e.g. a multiple of a ViT's patch)."""
  if (model, size) not in _INIT:
    # rbg draws compile several times faster than threefry's.
    _INIT[model, size] = ts.create_train_state(
      model, optax.sgd(0.1), jax.random.key(0, impl='rbg'), size
    )
  return _INIT[model, size]


def initial_variables(model, size: int = 33):
  """Host copies of `initial_state(model, size)`'s params and batch statistics."""
  state = initial_state(model, size)
  return to_host({'params': state.params, 'batch_stats': state.batch_stats})


def run_steps(model, mesh, config, batch, steps, warmup_steps=1, steps_per_epoch=None):
  """Compiles the step once and runs `steps` steps from a fixed init.

  Returns host copies of the states before each step and after the last,
  and each step's metrics.
  """
  settings = config_lib.resolve(config)
  schedule = make_schedule(config, warmup_steps, steps_per_epoch)
  tx = optim.make_optimizer(schedule, config)
  state = ts.create_train_state(
    model,
    tx,
    jax.random.key(0),
    batch['x'].shape[1],
    variables=initial_variables(model, batch['x'].shape[1]),
  )
  step_fn = ts.make_train_step(
    model, tx, settings, schedule, mesh, ema_decay=config.train.ema_decay
  )
  batch = parallel.shard_batch(batch, mesh)
  states, metrics = [to_host(state)], []
  state = parallel.replicate(state, mesh)
  for t in range(steps):
    state, m = step_fn(state, batch, jax.random.fold_in(jax.random.key(1), t))
    states.append(to_host(state))
    metrics.append({k: float(v) for k, v in m.items()})
  return dict(states=states, metrics=metrics, settings=settings, schedule=schedule)
