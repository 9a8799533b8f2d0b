"""XLA compilation: the persistent cache, and counting what gets compiled.

`enable_persistent_cache(path)` points JAX's persistent compilation cache at
`path` (`config.train.compilation_cache_dir`; '' leaves JAX's own setting),
so a restarted or second process loads its programs (the train step, every
evaluation shape) from disk instead of compiling them again. A directory
already set (`JAX_COMPILATION_CACHE_DIR`, or `jax_compilation_cache_dir` in
`jax.config`) wins.

`CompileCounter` counts the executables JAX had to produce while it is
active (compiled, or loaded from the persistent cache) and the seconds spent
on them, from JAX's monitoring events: what a test asserts ("this evaluation
compiled nothing") and what `benchmarks/eval_compile.py` reports.
"""

from __future__ import annotations

import os
import threading

import jax
from jax import monitoring

# Recorded around every backend compile request (a persistent-cache hit too).
_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def enable_persistent_cache(path: str) -> str | None:
  """Turns on JAX's persistent compilation cache at `path` (`~` expanded).

  Returns the directory in use, or None when `path` is '' and nothing else
  sets one. A directory already set (`JAX_COMPILATION_CACHE_DIR` in the
  environment, which JAX reads at import, or `jax.config`) wins over
  `path`. Programs that compile in under a second are not cached (JAX's
  default threshold); the ones that matter (train step, evaluation at image
  size) take far longer.
  """
  current = jax.config.jax_compilation_cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if current or not path:
    return current or None
  if '://' not in path:
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  return path


class CompileCounter:
  """Counts backend compilations (and persistent-cache hits) while active.

      with CompileCounter() as counter:
        evaluator.evaluate(variables)
      assert counter.compiles == 0

  Attributes:
    compiles: executables produced (compiled or loaded from the cache).
    seconds: wall seconds spent producing them (summed over threads).
    cache_hits: how many of them came from the persistent cache.
  Counts every thread's compilations, background ones included.
  """

  _lock = threading.Lock()
  _active: list[CompileCounter] = []
  _registered = False

  def __init__(self):
    self.compiles = 0
    self.seconds = 0.0
    self.cache_hits = 0

  @classmethod
  def _register(cls) -> None:
    with cls._lock:
      if cls._registered:
        return
      cls._registered = True
    monitoring.register_event_duration_secs_listener(cls._on_duration)
    monitoring.register_event_listener(cls._on_event)

  @classmethod
  def _on_duration(cls, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == _BACKEND_COMPILE_EVENT:
      with cls._lock:
        for counter in cls._active:
          counter.compiles += 1
          counter.seconds += duration

  @classmethod
  def _on_event(cls, event: str, **kwargs) -> None:
    del kwargs
    if event == _CACHE_HIT_EVENT:
      with cls._lock:
        for counter in cls._active:
          counter.cache_hits += 1

  def __enter__(self) -> CompileCounter:
    self._register()
    with self._lock:
      self._active.append(self)
    return self

  def __exit__(self, *exc) -> None:
    with self._lock:
      self._active.remove(self)
