"""Extension is one module: a dataset, a backbone family and a method defined
here, in the test file, registered, then trained and evaluated for one step
through the normal config path, with no edit to the package."""

from __future__ import annotations

import dataclasses
import sys

import flax.linen as nn
import numpy as np
import pytest

from dssn_jax import config_lib, methods, train
from dssn_jax.data import datasets
from dssn_jax.errors import ConfigError
from dssn_jax.methods import common, supervised
from dssn_jax.methods.base import knob
from dssn_jax.models import registry

NUM_CLASSES = 3


# --- a dataset: bright squares of class 1 or 2 on a dark background ----------


class Squares:
  """A picklable random-access source (what grain's workers need)."""

  def __init__(self, n: int, size: int, seed: int):
    self.n, self.size, self.seed = n, size, seed

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    rng = np.random.default_rng((self.seed, index))
    image = np.zeros((self.size, self.size, 3), np.uint8)
    mask = np.zeros((self.size, self.size), np.uint8)
    cls = 1 + index % 2
    y, x = rng.integers(0, self.size // 2, 2)
    image[y : y + self.size // 2, x : x + self.size // 2] = 80 * cls
    mask[y : y + self.size // 2, x : x + self.size // 2] = cls
    return {'image': image, 'mask': mask, 'id': f'square_{index}'}

  def __repr__(self) -> str:
    return f'Squares(n={self.n})'


def squares_source(config, split: str):
  return Squares({'labeled': 4, 'unlabeled': 8, 'val': 2}[split], 40, seed=len(split))


datasets.register(
  datasets.Dataset(
    'test_squares',
    squares_source,
    NUM_CLASSES,
    lambda config: ('background', 'dim', 'bright'),
    lambda config: np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]], np.uint8),
  )
)


# --- a backbone family: two convolutions and a classifier ---------------------


class TinyNet(nn.Module):
  """Returns `(logits, aux)` at the input size, like every segmenter here."""

  num_classes: int
  features: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False, perturb: int = 0, **unused):
    del train, unused
    h = nn.relu(nn.Conv(self.features, (3, 3), name='backbone')(x))
    logits = nn.Conv(self.num_classes, (1, 1), name='classifier')(h)
    return logits, {'perturbed': [logits] * perturb}


registry.register(
  registry.Family(
    name='test_tiny',
    title='TinyNet',
    backbones=('test_tinynet',),
    test_backbones=('test_tinynet',),
    create=lambda backbone, num_classes, **options: TinyNet(int(num_classes)),
    from_config=lambda config: TinyNet(int(config.data.num_classes)),
    init_size=16,
    layouts=(),
    convert=lambda state, template, layout: {},
    detect_layout=lambda state: None,
    infer_backbone=lambda state, layout: 'test_tinynet',
    infer_num_classes=lambda state, layout: NUM_CLASSES,
  )
)


# --- a method: supervised cross-entropy with its own knob and preset ----------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoubledSettings(methods.Settings):
  """`L_x` at a preset weight of 2 (a config placeholder: loss.sup)."""

  sup: float = knob('loss.sup', 2.0)


def doubled_loss(params, state, mb, rng, ctx):
  del rng
  s = ctx.settings
  logits, _, bs = common.forward(
    ctx.model, params, state.batch_stats, common.normalized(mb['x']), train=True
  )
  term = common.ce_term(logits, mb['y'], mb['den_x'], s.ignore_index)
  return s.sup * term, common.LossAux(bs, state.teacher_batch_stats, {'loss_x': term})


methods.register(
  methods.Method('test_doubled', DoubledSettings, supervised.prepare, doubled_loss, unlabeled=False)
)


def _config():
  c = config_lib.base_config()
  c.method = 'test_doubled'
  c.model.backbone = 'test_tinynet'
  c.data.name = 'test_squares'
  c.data.num_classes = NUM_CLASSES
  c.data.crop_size = 32
  c.data.batch_size = 2
  c.data.workers = 0
  c.data.prefetch = 1
  c.train.steps = 1
  c.train.log_every = 1
  c.train.eval_every = 1
  c.train.checkpoint_every = 1
  c.train.eval_precompile = False
  c.train.compilation_cache_dir = ''
  return c


def test_registered_dataset_family_and_method_train_and_evaluate_one_step(tmp_path):
  config = _config()
  settings = config_lib.resolve(config)
  assert settings.method == DoubledSettings(method='test_doubled', **_base_values(config))
  assert settings.method.sup == 2.0  # the method's preset fills the placeholder
  assert not settings.unlabeled
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['step'] == 1 and summary['miou_teacher'] is not None
  assert 'test_doubled' in methods.names()
  assert 'test_tinynet' in registry.backbone_names()
  assert 'test_squares' in datasets.names()


def _base_values(config):
  return dict(
    sup_type=config.loss.sup_type,
    ohem_thresh=config.loss.ohem_thresh,
    ohem_min_kept=config.loss.ohem_min_kept,
    ignore_index=config.data.ignore_index,
    loss_groups=config.train.loss_groups,
  )


def test_config_imports_register_from_a_module_path(tmp_path, monkeypatch):
  module = 'dssn_ext_plugin_for_test'
  (tmp_path / f'{module}.py').write_text(
    'import numpy as np\n'
    'from dssn_jax.data import datasets\n'
    'datasets.register(datasets.Dataset("test_by_path", None, 3,\n'
    '  lambda c: ("a", "b", "c"), lambda c: np.zeros((3, 3), np.uint8)))\n'
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, module, raising=False)
  config = _config()
  config.imports = (module,)
  config.data.name = 'test_by_path'
  assert 'test_by_path' not in datasets.names()
  config_lib.resolve(config)
  assert datasets.get('test_by_path').num_classes == 3
  config.imports = ('no_such_module_anywhere',)
  with pytest.raises(ConfigError, match="config.imports: cannot import 'no_such_module_anywhere'"):
    config_lib.resolve(config)


def test_an_unknown_name_is_a_config_error_naming_the_key():
  config = _config()
  config.method = 'no_such_method'
  with pytest.raises(ConfigError, match="config.method='no_such_method' must be one of"):
    config_lib.resolve(config)
  with pytest.raises(ConfigError, match="config.data.name='nope' is not one of .*test_squares"):
    datasets.get('nope')
