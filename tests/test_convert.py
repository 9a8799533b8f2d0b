"""PyTorch -> Flax weight import: numerical parity and error reporting.

A plain-PyTorch DeepLabV3+ (`dssn_jax.testing.torch_reference`) with random weights and
BN statistics is converted with `from_torch` and must give the same logits
as our model (max abs error <= 1e-4 of the logits' scale: JAX vs torch, two
programs that reassociate float32 sums differently, see `numerics.NETWORK`);
a deliberately broken conversion must fail the same comparison by far.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax import convert, state_dicts
from dssn_jax.models import create_model, pretrained
from dssn_jax.testing import numerics

torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
from dssn_jax.testing import torch_reference  # noqa: E402  (imports torch)

# max |error| / max |logit|: JAX vs torch through a ResNet (two programs).
TOL = numerics.NETWORK
TINY = dict(widths=(8, 16, 32, 64), stem=8, aspp=32, low=8, decoder=32)
# Reduced depth: two blocks in layer2 and layer4, so the non-first blocks of
# a dilated stage (dilation 2 at output stride 16) are exercised.
REDUCED_BLOCKS = (1, 2, 1, 2)


def to_nhwc(x: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


@functools.cache
def jitted_apply(model):
  return jax.jit(model.apply)


def max_error(model, variables, torch_model, images: torch.Tensor) -> float:
  """Max abs difference of our logits and the torch model's, relative to the
  logits' scale max |want| (NaN -> inf)."""
  with torch.no_grad():
    want = torch_model(images).permute(0, 2, 3, 1).numpy()
  got, _ = jitted_apply(model)(variables, to_nhwc(images))
  err = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
  return err if np.isfinite(err) else float('inf')


@pytest.fixture(scope='module')
def reduced():
  """A reduced-depth tiny network (torch model, our model, input)."""
  tm = torch_reference.randomize(
    torch_reference.DeepLabV3Plus(5, blocks=REDUCED_BLOCKS, **TINY), image_size=49
  )
  model = create_model('resnet_tiny', 5, stage_sizes=REDUCED_BLOCKS)
  images = torch.randn(2, 3, 49, 57, generator=torch.Generator().manual_seed(1))
  return tm, model, images


def test_parity_reduced_depth(reduced):
  tm, model, images = reduced
  variables = pretrained.from_torch(
    tm.state_dict(), backbone='resnet_tiny', layout='model', stage_sizes=REDUCED_BLOCKS
  )
  assert max_error(model, variables, tm, images) <= TOL


def test_parity_resnet50_layout():
  """The full ResNet-50 DeepLabV3+ (3/4/6/3 blocks, 256/48/256 head) at 65x65."""
  tm = torch_reference.randomize(torch_reference.DeepLabV3Plus(21), image_size=65)
  state = tm.state_dict()
  # Saved as the reference saves it: DDP prefix, inside a checkpoint dict.
  checkpoint = {'model': {f'module.{k}': v for k, v in state.items()}, 'epoch': 3}
  variables = pretrained.from_torch(checkpoint, layout='model')  # backbone, classes inferred
  images = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(2))
  err = max_error(create_model('resnet50', 21), variables, tm, images)
  assert err <= TOL, err


def _swap_mean_var(state):
  out = dict(state)
  for k in state:
    if k.endswith('running_mean'):
      v = k.replace('running_mean', 'running_var')
      out[k], out[v] = state[v], state[k]
  return out


def _flip_kernels(state):
  """Transposes every 3x3 kernel spatially: a wrong (kh, kw) order."""
  return {
    k: (v.transpose(2, 3) if v.ndim == 4 and v.shape[-1] == 3 else v) for k, v in state.items()
  }


def _swap_fuse_bns(state):
  """fuse.1 <-> fuse.4 scales: a wrong Sequential index rule (same shapes)."""
  out = dict(state)
  out['fuse.1.weight'], out['fuse.4.weight'] = state['fuse.4.weight'], state['fuse.1.weight']
  return out


@pytest.mark.parametrize(
  'corrupt',
  [_swap_mean_var, _flip_kernels, _swap_fuse_bns],
  ids=['mean_var_swapped', 'kernel_hw_transposed', 'fuse_bn_swapped'],
)
def test_broken_conversion_fails_parity(reduced, corrupt):
  """The parity comparison catches a single wrong conversion rule."""
  tm, model, images = reduced
  variables = pretrained.from_torch(
    corrupt(tm.state_dict()), backbone='resnet_tiny', layout='model', stage_sizes=REDUCED_BLOCKS
  )
  assert max_error(model, variables, tm, images) > 100 * TOL


def test_torchvision_stem_backbone_parity():
  """The 7x7-stem backbone converts from torchvision keys; `fc.*` is ignored."""
  tm = torch_reference.randomize(
    torch_reference.ResNet(blocks=(1, 1, 1, 1), widths=TINY['widths'], stem=8, deep_stem=False),
    image_size=49,
  )
  state = dict(tm.state_dict())
  state['fc.weight'] = torch.zeros(10, 256)
  state['fc.bias'] = torch.zeros(10)
  backbone_vars = pretrained.from_torch(state, backbone='resnet_tiny', layout='torchvision')
  assert 'conv1' in backbone_vars['params'] and 'stem_conv1' not in backbone_vars['params']
  model = create_model('resnet_tiny', 3, deep_stem=False)
  images = torch.randn(2, 3, 49, 49, generator=torch.Generator().manual_seed(3))
  c1, _, _, c4 = jax.jit(model.backbone.apply)(backbone_vars, to_nhwc(images))
  with torch.no_grad():
    want_c1, want_c4 = tm(images)
  numerics.assert_close(c1, to_nhwc(want_c1), TOL)  # JAX vs torch
  numerics.assert_close(c4, to_nhwc(want_c4), TOL)


@pytest.fixture(scope='module')
def tiny_torch():
  """A whole reference model of `resnet_tiny`'s exact shape (one block per stage)."""
  return torch_reference.randomize(
    torch_reference.DeepLabV3Plus(4, blocks=(1, 1, 1, 1), **TINY), image_size=33
  )


@pytest.mark.parametrize('layout', ['dssn', 'timm'])
def test_backbone_layouts_match_model_layout(tiny_torch, layout):
  """`resnet50.pth`-style backbone dicts give the same tree as `backbone.*`."""
  whole = pretrained.from_torch(tiny_torch.state_dict(), backbone='resnet_tiny', layout='model')
  state = dict(tiny_torch.backbone.state_dict())
  state['bn1.num_batches_tracked'] = torch.tensor(7)
  if layout == 'timm':
    state['fc.weight'], state['fc.bias'] = torch.zeros(1000, 256), torch.zeros(1000)
  backbone = pretrained.from_torch(state, backbone='resnet_tiny', layout=layout)
  for c in ('params', 'batch_stats'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, backbone[c], whole[c]['backbone'])


def test_errors_list_every_bad_key(tiny_torch):
  state = dict(tiny_torch.backbone.state_dict())
  del state['layer2.0.bn1.running_var']
  del state['conv1.6.weight']
  state['layer9.0.conv1.weight'] = torch.zeros(1)
  state['extra.bias'] = torch.zeros(3)
  state['layer1.0.conv2.weight'] = torch.zeros(8, 8, 5, 5)
  with pytest.raises(state_dicts.ConversionError) as info:
    pretrained.from_torch(state, backbone='resnet_tiny', layout='dssn')
  msg = str(info.value)
  for key in (
    'layer2.0.bn1.running_var',
    'conv1.6.weight',
    'layer9.0.conv1.weight',
    'extra.bias',
    'layer1.0.conv2.weight',
  ):
    assert key in msg, msg
  assert '2 missing' in msg and '2 unexpected' in msg and '1 mis-shaped' in msg


def test_stem_layout_mismatch_is_explained(tiny_torch):
  with pytest.raises(state_dicts.ConversionError, match='deep_stem=False'):
    pretrained.from_torch(
      tiny_torch.backbone.state_dict(), backbone='resnet_tiny', layout='torchvision', deep_stem=True
    )


def test_cli_and_load_pretrained(tiny_torch, tmp_path, capsys):
  """`.pth` -> `python -m dssn_jax.convert` -> `.npz` -> `load_pretrained`."""
  pth = tmp_path / 'resnet_tiny.pth'
  torch.save(tiny_torch.backbone.state_dict(), pth)
  out = tmp_path / 'tiny.npz'
  assert convert.main([str(pth), str(out), '--backbone', 'resnet_tiny']) == 0
  assert 'wrote' in capsys.readouterr().out
  expected = pretrained.from_torch(str(pth), backbone='resnet_tiny', layout='dssn')

  model = create_model('resnet_tiny', 4)
  # Stand-in for freshly initialized variables (compiling `init` is slow on CPU).
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  rng = np.random.default_rng(0)
  fresh = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
  for src, layout in ((str(out), 'dssn'), (str(pth), 'dssn')):
    merged = pretrained.load_pretrained(fresh, src, layout=layout, backbone='resnet_tiny')
    for c in ('params', 'batch_stats'):
      jax.tree_util.tree_map(np.testing.assert_array_equal, merged[c]['backbone'], expected[c])
      for name in fresh[c]:  # the head keeps its fresh initialization
        if name != 'backbone':
          jax.tree_util.tree_map(np.testing.assert_array_equal, merged[c][name], fresh[c][name])

  # A whole-model `.pth`, or its `.npz`, also provides a backbone.
  whole = tmp_path / 'model.pth'
  torch.save({'model': tiny_torch.state_dict()}, whole)
  whole_npz = tmp_path / 'model.npz'
  assert (
    convert.main([str(whole), str(whole_npz), '--layout', 'model', '--backbone', 'resnet_tiny'])
    == 0
  )
  assert 'params/classifier/kernel' in np.load(whole_npz).files
  for src, layout in ((str(whole), 'model'), (str(whole_npz), 'dssn')):
    merged = pretrained.load_pretrained(fresh, src, layout=layout)
    jax.tree_util.tree_map(
      np.testing.assert_array_equal, merged['params']['backbone'], expected['params']
    )

  # A backbone of another shape is refused, naming the offending keys.
  deeper = create_model('resnet_tiny', 4, stage_sizes=(1, 1, 2, 1))
  other = jax.eval_shape(deeper.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  with pytest.raises(state_dicts.ConversionError, match='layer3_1'):
    pretrained.load_pretrained(other, str(out))
  with pytest.raises(state_dicts.ConversionError, match='layer3.1.conv1.weight'):
    pretrained.load_pretrained(other, str(pth))


def test_cli_reports_bad_file(tmp_path, capsys):
  pth = tmp_path / 'bad.pth'
  torch.save({'conv1.weight': torch.zeros(1)}, pth)
  assert convert.main([str(pth), str(tmp_path / 'o.npz'), '--backbone', 'resnet_tiny']) == 2
  assert 'conv1.weight' in capsys.readouterr().err
