"""Loads a script from `benchmarks/` (not a package) as a module, for its tests."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str):
  """`benchmarks/<name>.py` executed as module `name`."""
  spec = importlib.util.spec_from_file_location(
    name, os.path.join(ROOT, 'benchmarks', f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
