"""Export: the authors' PyTorch layouts and the serialized inference program.

A `resnet_tiny` DeepLabV3+ trained 2 steps (`trained`, once per module) is
exported to the reference's checkpoint layout, loaded strictly into the
project's PyTorch rendering of the authors' model
(`dssn_jax.testing.torch_reference`) with the same logits (`numerics.NETWORK`,
JAX vs torch), and converted back bit for bit; a DINOv2 + DPT does the same
in UniMatch V2's, the hub's and Hugging Face's layouts. The StableHLO export
is reloaded in a fresh process that never imports `dssn_jax.models` and
must give `predict`'s masks exactly.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax import checkpoint as ckpt_lib
from dssn_jax import config_lib, loading, models, parallel, predict
from dssn_jax.errors import ConversionError
from dssn_jax.export import __main__ as export_main
from dssn_jax.export import program, stablehlo, torch_state
from dssn_jax.models import create_model, pretrained, registry
from dssn_jax.normalize import IMAGENET_MEAN, IMAGENET_STD
from dssn_jax.state_dicts import read_file
from dssn_jax.testing import numerics, train_steps
from dssn_jax.testing.configs import REPO, load_config, tiny
from dssn_jax.testing.evaluation import random_like, run_module, write_workdir

try:
  import torch
except ImportError:  # the torch tests skip, as the parity tests do
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason='compares with PyTorch')

# The widths of `resnet_tiny` in the PyTorch rendering's arguments.
RESNET_TINY = dict(blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem=8, aspp=32, low=8, decoder=32)
# `dinov2_tiny` + its DPT head in the PyTorch rendering's arguments.
DINOV2_TINY = dict(
  dim=32, depth=4, heads=2, taps=(0, 1, 2, 3), features=16, out_channels=(8, 16, 32, 32)
)


def same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """`(config, workdir, {'student', 'teacher'})`: a `resnet_tiny` trained 2
  supervised steps on a random batch, saved as a training workdir."""
  config = tiny(load_config('digits', 'supervised'), 2)
  config.model.width_multiplier = 1.0  # the rendering's RESNET_TINY widths
  model = models.model_from_config(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = train_steps.make_batch(33, supervised=True)
  state = train_steps.run_steps(model, mesh, config, batch, 2)['states'][-1]
  workdir = str(tmp_path_factory.mktemp('trained'))
  variables = {
    'student': {'params': state.params, 'batch_stats': state.batch_stats},
    'teacher': {'params': state.teacher_params, 'batch_stats': state.teacher_batch_stats},
  }
  write_workdir(workdir, config, variables['student'], variables['teacher'], step=2)
  return config, workdir, variables


def random_variables(model, seed):
  """Random variables of `model` at a working scale, without compiling `init`."""
  image = jnp.zeros((1, 28, 28, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image, train=False))
  return jax.tree.map(np.asarray, random_like(shapes, seed))


@pytest.fixture(scope='module')
def dpt():
  """`(config, model, {'student', 'teacher'})` of a random `dinov2_tiny` DPT."""
  config = config_lib.base_config()
  config.model.backbone, config.data.num_classes = 'dinov2_tiny', 21
  config.data.crop_size = 28
  model = create_model('dinov2_tiny', 21)
  return (
    config,
    model,
    {'student': random_variables(model, 1), 'teacher': random_variables(model, 2)},
  )


# ---------------------------------------------------------------------------
# DeepLabV3+ -> the DSSN/UniMatch checkpoint layout.


@needs_torch
def test_resnet_export_loads_strictly_with_the_same_logits(trained, tmp_path):
  from dssn_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top

  config, workdir, variables = trained
  out = str(tmp_path / 'best.pth')
  obj = torch_state.export_state(config, variables, step=2, allow_test_models=True)
  torch_state.save(obj, out)
  checkpoint = torch.load(out, weights_only=True)
  assert set(checkpoint) == {'model'} and all(k.startswith('module.') for k in checkpoint['model'])
  assert checkpoint['model']['module.backbone.bn1.num_batches_tracked'].item() == 2
  dilate = (False, config.model.output_stride == 8, True)  # the digits config: stride 8
  tm = torch_reference.DeepLabV3Plus(11, **RESNET_TINY, dilate=dilate)
  ddp_keys = {'module.' + k for k in tm.state_dict()}
  assert set(checkpoint['model']) == ddp_keys  # num_batches_tracked included
  tm.load_state_dict({k[len('module.') :]: v for k, v in checkpoint['model'].items()}, strict=True)
  images = torch.randn(2, 3, 33, 41, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    want = tm.eval()(images).permute(0, 2, 3, 1).numpy()
  model = models.model_from_config(config)
  got, _ = jax.jit(model.apply)(
    variables['teacher'], jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  )
  numerics.assert_close(got, want, numerics.NETWORK)
  back = pretrained.from_torch(out, backbone='resnet_tiny', layout='model')
  same_tree(back, jax.device_get(variables['teacher']))


@needs_torch
def test_run_exports_the_student_of_a_workdir(trained, tmp_path):
  _, workdir, variables = trained
  out = export_main.run(
    to='torch',
    out=str(tmp_path / 'student.pth'),
    workdir=workdir,
    checkpoint='latest',
    which_model='student',
    allow_test_models=True,
  )
  back = pretrained.from_torch(out, backbone='resnet_tiny', layout='model')
  same_tree(back, jax.device_get(variables['student']))


def test_resnet_backbone_layout_round_trip(trained):
  config, _, variables = trained
  state = torch_state.export_state(config, variables, layout='dssn', allow_test_models=True)
  assert 'conv1.0.weight' in state and 'layer1.0.conv1.weight' in state
  back = pretrained.from_torch(state, backbone='resnet_tiny', layout='dssn')
  teacher = jax.device_get(variables['teacher'])
  same_tree(back, {c: teacher[c]['backbone'] for c in ('params', 'batch_stats')})


def test_models_the_authors_cannot_build_are_refused_in_one_line(trained):
  config, _, variables = trained
  with pytest.raises(ConversionError, match='resnet_tiny is a test network') as e:
    torch_state.export_state(config, variables)
  assert '\n' not in str(e.value)
  named = config_lib.base_config()
  named.model.backbone, named.data.num_classes = 'resnet50', 21
  shapes = registry.variable_shapes(create_model('resnet50', 21), 'resnet50')
  torch_state.check_authors_model(named, shapes)  # the authors' network: accepted
  wide = named.copy_and_resolve_references()
  wide.model.width_multiplier = 0.5
  narrow = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[:-1] + (1,), s.dtype), shapes)
  with pytest.raises(ConversionError, match=r'width_multiplier=0.5 \(the authors build') as e:
    torch_state.check_authors_model(wide, narrow)
  assert '\n' not in str(e.value)
  with pytest.raises(
    ConversionError,
    match=r'variables differ, e.g. batch_stats/backbone/bn1/mean \(1,\) vs \(128,\)',
  ):
    torch_state.check_authors_model(named, narrow)
  with pytest.raises(ConversionError, match='model exports to model, dssn'):
    torch_state.export_state(config, variables, layout='unimatch_v2', allow_test_models=True)


# ---------------------------------------------------------------------------
# DINOv2 + DPT -> UniMatch V2's checkpoint; the encoder -> hub, Hugging Face.


@needs_torch
def test_unimatch_v2_export_loads_strictly_with_the_same_logits(dpt, tmp_path):
  from dssn_jax.testing import torch_dinov2_reference as ref  # pylint: disable=g-import-not-at-top

  config, model, variables = dpt
  out = str(tmp_path / 'best.pth')
  torch_state.save(torch_state.export_state(config, variables, allow_test_models=True), out)
  checkpoint = torch.load(out, weights_only=True)
  assert set(checkpoint) == {'model', 'model_ema'}
  t = DINOV2_TINY
  tm = ref.DPT(21, t['dim'], t['depth'], t['heads'], t['taps'], t['features'], t['out_channels'])
  ema = {k[len('module.') :]: v for k, v in checkpoint['model_ema'].items()}
  tm.load_state_dict(ema, strict=True)
  images = torch.randn(1, 3, 28, 42, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    want = tm.eval()(images).permute(0, 2, 3, 1).numpy()
  got, _ = jax.jit(model.apply)(
    variables['teacher'], jnp.asarray(images.permute(0, 2, 3, 1).numpy())
  )
  numerics.assert_close(got, want, numerics.NETWORK)
  for which, ema in (('teacher', True), ('student', False)):
    back = pretrained.from_torch(out, backbone='dinov2_tiny', layout='unimatch_v2', ema=ema)
    same_tree(back, variables[which])


@needs_torch
def test_dinov2_hub_layout_loads_strictly(dpt):
  from dssn_jax.testing import torch_dinov2_reference as ref  # pylint: disable=g-import-not-at-top

  config, _, variables = dpt
  state = torch_state.export_state(config, variables, layout='dinov2', allow_test_models=True)
  t = DINOV2_TINY
  encoder = ref.DINOv2(t['dim'], t['depth'], t['heads'])
  encoder.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  back = pretrained.from_torch(state, backbone='dinov2_tiny', layout='dinov2')
  same_tree(back, {'params': variables['teacher']['params']['backbone']})


def test_dinov2_hugging_face_layout_round_trip(dpt, tmp_path):
  pytest.importorskip('safetensors', reason='writes .safetensors')
  config, _, variables = dpt
  state = torch_state.export_state(config, variables, layout='hf_dinov2', allow_test_models=True)
  encoder = variables['teacher']['params']['backbone']
  # Hugging Face Dinov2Model's names: q, k, v apart, (out, in) weights.
  qkv = encoder['blocks_0']['attn']['qkv']['kernel']  # (in, 3 * out)
  np.testing.assert_array_equal(
    state['encoder.layer.0.attention.attention.key.weight'], qkv[:, 32:64].T
  )
  np.testing.assert_array_equal(state['embeddings.position_embeddings'], encoder['pos_embed'])
  np.testing.assert_array_equal(
    state['encoder.layer.3.layer_scale2.lambda1'], encoder['blocks_3']['ls2']['gamma']
  )
  assert 'layernorm.weight' in state and 'embeddings.patch_embeddings.projection.bias' in state
  assert registry.detect_layout(state) == 'hf_dinov2'
  out = torch_state.save(state, str(tmp_path / 'model.safetensors'))  # no torch needed
  back = pretrained.from_torch(read_file(out), backbone='dinov2_tiny', layout='hf_dinov2')
  same_tree(back, {'params': encoder})
  # A model folder, as `Dinov2Model.from_pretrained` reads it.
  folder = torch_state.save(state, str(tmp_path / 'hf'), hf_backbone='dinov2_small')
  with open(os.path.join(folder, 'config.json')) as f:
    hf_config = json.load(f)
  assert hf_config['model_type'] == 'dinov2' and hf_config['num_attention_heads'] == 6
  assert (hf_config['hidden_size'], hf_config['num_hidden_layers']) == (384, 12)
  assert read_file(os.path.join(folder, 'model.safetensors')).keys() == state.keys()


# ---------------------------------------------------------------------------
# StableHLO.

LOAD_IN_FRESH_PROCESS = """
import sys
import numpy as np
from dssn_jax import export
segmenter = export.load(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], segmenter(images))
assert segmenter(images[0]).shape == images.shape[1:3]
assert 'dssn_jax.models' not in sys.modules, sorted(m for m in sys.modules if 'dssn_jax' in m)
print(len(segmenter.class_names), segmenter.sizes)
"""


def test_stablehlo_export_reloads_without_the_model_code(trained, tmp_path):
  config, _, variables = trained
  path = str(tmp_path / 'model.shlo')
  size = (20, 40)  # wider than the 33-pixel crop: predict's sliding windows (2 shapes)
  stablehlo.export_program(
    config, variables['teacher'], path, sizes=[size], about={'which': 'teacher'}
  )
  images = np.random.default_rng(0).integers(0, 256, (3, *size, 3), dtype=np.uint8)
  np.save(tmp_path / 'images.npy', images)
  xla_flags = os.environ.get('XLA_FLAGS', '')
  result = subprocess.run(
    [
      sys.executable,
      '-c',
      LOAD_IN_FRESH_PROCESS,
      path,
      str(tmp_path / 'images.npy'),
      str(tmp_path / 'masks.npy'),
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    # LLVM -O0 as this process compiles (conftest.py): the same arithmetic, faster.
    env=dict(
      os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'{xla_flags} --xla_backend_optimization_level=0'
    ),
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split()[0] == '11'
  predictor = predict.Predictor(
    models.model_from_config(config), variables['teacher'], **predict.options_from_config(config)
  )
  assert predictor.needs_sliding(*size)
  want = np.stack([predictor(image) for image in images])
  np.testing.assert_array_equal(np.load(tmp_path / 'masks.npy'), want)
  segmenter = program.load(path)
  assert segmenter.meta['platforms'] == ['cpu', 'cuda', 'tpu']
  assert segmenter.meta['sizes'] == [[20, 40, 'sliding']]
  assert segmenter.meta['pretrained']['licence'] == stablehlo.NO_PRETRAINED
  assert segmenter.class_names[:2] == ('background', 'digit 0')
  assert segmenter.palette.shape == (11, 3)
  with pytest.raises(ValueError, match=r'takes images of 20x40 \(height x width\), got 20x33'):
    segmenter(images[:, :, :33])
  with pytest.raises(ValueError, match='uint8 RGB in 0..255, got float32'):
    segmenter((images / 255.0).astype(np.float32))


def test_stablehlo_arguments_are_checked(tmp_path):
  assert stablehlo.parse_sizes('512x256, 64', 33) == [(512, 256), (64, 64)]
  assert stablehlo.parse_sizes(None, 33) == [(33, 33)]
  with pytest.raises(ValueError, match='HxW'):
    stablehlo.parse_sizes('512by512', 33)
  bad = tmp_path / 'bad.shlo'
  bad.write_text('not a zip')
  with pytest.raises(ValueError, match='not a dssn_jax StableHLO export'):
    program.load(str(bad))
  config = config_lib.base_config()
  config.model.pretrained, config.model.backbone = 'pretrained/dinov2_small.pth', 'dinov2_small'
  assert 'Apache-2.0' in stablehlo.pretrained_licence(config)
  assert json.loads(json.dumps(stablehlo.PRETRAINED_TERMS))  # plain strings, JSON-ready


def test_stablehlo_export_resizes_as_unimatch_v2_evaluates(dpt, tmp_path):
  """Whole images resized to a multiple of 14 and back (UniMatch V2's
  evaluation), not windows: the same masks as `predict`."""
  config, model, variables = dpt
  config = config.copy_and_resolve_references()
  config.data.eval_resize_multiple = 14
  path = stablehlo.export_program(
    config, variables['teacher'], str(tmp_path / 'dpt.shlo'), sizes=[(30, 45)], platforms=['cpu']
  )
  segmenter = program.load(path)
  assert segmenter.meta['sizes'] == [[30, 45, 'whole']]
  predictor = predict.Predictor(model, variables['teacher'], **predict.options_from_config(config))
  images = np.random.default_rng(1).integers(0, 256, (2, 30, 45, 3), dtype=np.uint8)
  np.testing.assert_array_equal(segmenter(images), np.stack([predictor(x) for x in images]))


@pytest.mark.slow
@needs_torch
def test_a_model_trained_by_main_py_leaves_by_the_command_line(tmp_path):
  """main.py trains the digits config 2 steps; the command line writes the
  teacher in the authors' layout and as StableHLO."""
  from dssn_jax.testing import torch_reference  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / 'run')
  overrides = [
    '--config.model.width_multiplier=1.0',
    '--config.train.steps=2',
    '--config.data.crop_size=33',
    '--config.data.eval_crop_size=33',
    '--config.data.batch_size=2',
    '--config.data.digits.num_unlabeled=16',
    '--config.data.digits.num_labeled=4',
    '--config.data.digits.num_val=4',
    '--config.train.prediction_grid=0',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  trained = subprocess.run(
    [sys.executable, 'main.py', '--config', 'configs/digits.py', '--workdir', workdir, *overrides],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=600,
  )
  assert trained.returncode == 0, trained.stderr
  for to, name in (('torch', 'model.pth'), ('stablehlo', 'model.shlo')):
    args = ['--workdir', workdir, '--to', to, '--out', str(tmp_path / name)]
    result = run_module('dssn_jax.export', *args, '--allow_test_models')
    assert result.returncode == 0, result.stderr
  refused = run_module('dssn_jax.export', '--workdir', workdir, '--to', 'torch', '--out', 'x.pth')
  assert refused.returncode == 2
  assert refused.stderr.strip() == (
    "error: resnet_tiny is a test network: the authors' DeepLabV3+ has no such model"
  )
  checkpoint = torch.load(tmp_path / 'model.pth', weights_only=True)
  tm = torch_reference.DeepLabV3Plus(11, **RESNET_TINY)
  tm.load_state_dict({k[len('module.') :]: v for k, v in checkpoint['model'].items()}, strict=True)
  _, variables, _ = loading.load_for_eval(workdir=workdir)
  images = np.random.default_rng(0).integers(0, 256, (2, 33, 33, 3), dtype=np.uint8)
  with torch.no_grad():
    mean, std = (torch.tensor(v).reshape(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    want = tm.eval()(x).argmax(1).numpy()
  masks = program.load(str(tmp_path / 'model.shlo'))(images)
  # torch's argmax of its logits vs the program's: equal up to float32 ties.
  assert (masks == want).mean() > 0.99
  same_tree(
    pretrained.from_torch(str(tmp_path / 'model.pth'), backbone='resnet_tiny', layout='model'),
    jax.device_get(variables['teacher']),
  )


WRITE_ON_TWO_DEVICES = """
import sys
import jax
import numpy as np
from dssn_jax import checkpoint, config_lib
mesh = jax.make_mesh((2,), ('data',))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
tree = {'conv': {'kernel': np.arange(8.0, dtype=np.float32)}}
state = {
  'step': np.int32(3),
  'params': jax.device_put(tree, replicated),
  'batch_stats': {},
  'teacher_params': jax.device_put(tree, split),
  'teacher_batch_stats': {},
}
checkpoint.save_config(sys.argv[1], config_lib.base_config())
saver = checkpoint.Checkpointer(sys.argv[1] + '/checkpoints')
saver.save(3, state, jax.random.key(0), metrics={'miou_teacher': 1.0})
saver.close()
"""


def test_a_checkpoint_written_on_two_devices_restores_on_one(tmp_path):
  """What a pod wrote (here: 2 CPU devices, one array replicated, one split)
  restores whole on this process's single device, as export reads it."""
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count=2'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags.strip())
  written = subprocess.run(
    [sys.executable, '-c', WRITE_ON_TWO_DEVICES, str(tmp_path)],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )
  assert written.returncode == 0, written.stderr
  assert len(jax.devices()) == 1
  _, variables, step = ckpt_lib.restore_for_eval(str(tmp_path), 'latest')
  assert step == 3
  for which in ('student', 'teacher'):
    kernel = variables[which]['params']['conv']['kernel']
    np.testing.assert_array_equal(kernel, np.arange(8.0))
    assert kernel.sharding.device_set == {jax.devices()[0]}
