"""Import hygiene: the package and the training command run without the
optional dependencies (an accelerator image may lack them).

Each check runs in a fresh interpreter where TensorFlow Datasets, TensorFlow,
PyTorch and matplotlib look uninstalled (every import finder reports them
absent), so a hidden import anywhere on the path fails the run instead of
passing where they happen to be installed.
"""

import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import dssn_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ('tensorflow_datasets', 'tensorflow', 'torch', 'matplotlib')

_BLOCK = textwrap.dedent(f"""
    import sys

    class _Hide:  # every finder reports the optional packages as absent
      def __init__(self, finder):
        self.finder = finder

      def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in {OPTIONAL!r}:
          return None
        find = getattr(self.finder, 'find_spec', None)
        return find(name, path, target) if find else None

      def __getattr__(self, attr):
        return getattr(self.finder, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
""")


def run_blocked(code: str, timeout: float) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', _BLOCK + textwrap.dedent(code)],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )


def package_modules() -> list[str]:
  """Every module of dssn_jax except `dssn_jax.testing` (test support)."""
  return sorted(
    m.name
    for m in pkgutil.walk_packages(dssn_jax.__path__, 'dssn_jax.')
    if not m.name.startswith('dssn_jax.testing')
  )


def test_every_module_imports_without_optional_dependencies():
  modules = package_modules()
  assert 'dssn_jax.train' in modules and 'dssn_jax.data.sources' in modules
  proc = run_blocked(
    f"""
    import importlib
    for name in {modules!r}:
      importlib.import_module(name)
    print('loaded', sorted(m for m in sys.modules if m.partition('.')[0] in {OPTIONAL!r}))
    """,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == 'loaded []'


@pytest.mark.slow
def test_training_command_runs_without_optional_dependencies(tmp_path):
  """`python main.py --config configs/digits.py`, shrunk to one tiny step."""
  argv = [
    'main.py',
    '--config=configs/digits.py',
    f'--workdir={tmp_path}',
    '--config.train.steps=1',
    '--config.model.backbone=resnet_tiny',
    '--config.data.crop_size=33',
    '--config.data.eval_crop_size=33',
    '--config.data.batch_size=2',
    '--config.data.digits.num_unlabeled=8',
    '--config.data.digits.num_val=2',
  ]
  proc = run_blocked(
    f"""
    import runpy
    sys.argv = {argv!r}
    try:
      runpy.run_path('main.py', run_name='__main__')
    except SystemExit as e:
      assert not e.code, e.code
    print('loaded', sorted(m for m in sys.modules if m.partition('.')[0] in {OPTIONAL!r}))
    """,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == 'loaded []', proc.stdout[-2000:]
  assert os.path.exists(tmp_path / 'metrics.jsonl')


def test_a_missing_optional_dependency_names_the_extra():
  proc = run_blocked(
    """
    from dssn_jax.data import sources
    try:
      sources.TfdsSource('x', 'train', '', start=0, stop=1, image_key='image',
                         mask_key=None, label_map=None, num_classes=2)
    except ImportError as e:
      print(e)
    from dssn_jax import state_dicts
    try:
      state_dicts.read_state_dict('main.py')  # any existing file
    except ImportError as e:
      print(e)
    """,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "pip install 'dssn-jax[tfds]'" in proc.stdout
  assert "pip install 'dssn-jax[convert]'" in proc.stdout


def test_the_event_writer_does_not_import_torch():
  """tensorboardX imports PyTorch where it is installed; the run's writer
  hides it during that import, and torch still imports normally after."""
  pytest.importorskip('torch')
  pytest.importorskip('tensorboardX')
  proc = subprocess.run(
    [
      sys.executable,
      '-c',
      'import sys, tempfile\n'
      'from dssn_jax import train\n'
      'writer = train._summary_writer_class()(tempfile.mkdtemp())\n'
      'writer.add_scalar("train/loss", 1.0, 1)\n'
      'print("torch" in sys.modules)\n'
      'import torch\n'
      'print(torch.zeros(1).shape)',
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ['False', 'torch.Size([1])']
