"""DINOv2 + DPT: the model contract, the weight layouts, and the memory levers.

All on `dinov2_tiny` (4 blocks of width 32, every block tapped) so that the
suite stays fast; numerical parity at full width is `test_dinov2_parity.py`.
"""

import functools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax import config_lib, convert, evaluate, loading, optim, state_dicts
from dssn_jax import train_step as ts
from dssn_jax.models import (
  create_model,
  dinov2_weights,
  layers,
  model_from_config,
  pretrained,
  registry,
)

try:  # the contract tests run without PyTorch; the layout and parity ones skip
  import torch

  from dssn_jax.testing import torch_dinov2_reference as ref
  from dssn_jax.testing import torch_reference
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason='compares with PyTorch')

C = 5
TINY = dict(dim=32, depth=4, heads=2, taps=(0, 1, 2, 3), features=16, out_channels=(8, 16, 32, 32))


def torch_tiny(swiglu=False, seed=0):
  t = TINY
  tm = ref.DPT(
    C, t['dim'], t['depth'], t['heads'], t['taps'], t['features'], t['out_channels'], swiglu
  )
  return ref.randomize(tm, seed)


@functools.cache
def tiny(swiglu=False):
  """(torch model, our model, our variables converted from it); without
  PyTorch (None, our model, our own initialisation)."""
  ffn = 'swiglu' if swiglu else None
  model = create_model('dinov2_tiny', C, ffn=ffn)
  if torch is None:
    return None, model, model.init(jax.random.PRNGKey(0), images(1, 28, 28), train=False)
  tm = torch_tiny(swiglu)
  return (
    tm,
    model,
    pretrained.from_torch(tm.state_dict(), 'dinov2_tiny', layout='unimatch_v2', ffn=ffn),
  )


@functools.cache
def jitted(model):
  """`model.apply`, compiled once per model and input shape (one XLA program
  instead of hundreds of op-by-op dispatches)."""
  return jax.jit(model.apply, static_argnames=('train', 'perturb'))


def images(n=2, h=42, w=56, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, h, w, 3)), jnp.float32)


def torch_logits(tm, x):
  with torch.no_grad():
    return tm(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# ---------------------------------------------------------------------------
# The model contract.


def test_forward_contract():
  _, model, variables = tiny()
  assert set(variables) == {'params'}  # no BatchNorm, no batch_stats
  logits, aux = jitted(model)(variables, images(), train=True)
  assert logits.shape == (2, 42, 56, C) and logits.dtype == jnp.float32
  assert aux['perturbed'] == ()
  assert [f.shape for f in aux['features']] == [(2, 3, 4, 32)] * 4


def test_rejects_sides_that_are_not_multiples_of_14():
  _, model, variables = tiny()
  with pytest.raises(ValueError, match=r'multiples of 14.*\(2, 43, 56, 3\)'):
    model.apply(variables, images(h=43))


@needs_torch
def test_tiny_matches_torch_at_a_non_square_size():
  """float32 both sides; see test_dinov2_parity for the tolerance."""
  tm, model, variables = tiny()
  x = images(h=70, w=42)
  assert rel_err(jitted(model)(variables, x)[0], torch_logits(tm, x)) < 1e-4


def test_perturb_masks_are_the_head_on_masked_features():
  """Copy j is the head on every tapped map times mask j (broadcast over
  positions), e.g. DSSN's complementary pair m and 2 - m. Same XLA ops on
  a larger batch: agreement to float32 rounding."""
  _, model, variables = tiny()
  x = images()
  m = 2.0 * jax.random.bernoulli(jax.random.key(1), 0.5, (2, 32)).astype(jnp.float32)
  masks = jnp.stack([m, 2.0 - m])
  logits, aux = jitted(model)(variables, x, perturb_masks=masks)
  plain, plain_aux = jitted(model)(variables, x)
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
  for j in range(2):
    masked = [f * masks[j][:, None, None, :] for f in plain_aux['features']]
    want = jax.jit(lambda v, f: model.apply(v, f, method=lambda mdl, g: mdl.head(g)))(
      variables, masked
    )
    want = layers.resize_bilinear(want, (42, 56))
    np.testing.assert_allclose(aux['perturbed'][j], want, rtol=1e-5, atol=1e-5)
  # Masks of ones give the clean prediction.
  _, ones = jitted(model)(variables, x, perturb_masks=jnp.ones((1, 2, 32)))
  np.testing.assert_allclose(ones['perturbed'][0], plain, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='perturb_masks must be'):
    model.apply(variables, x, perturb_masks=jnp.ones((1, 3, 32)))


def test_feature_masks_mask_the_main_forward():
  """`feature_masks` (N, dim) multiply the main forward's tapped maps (UniMatch
  V2's complementary dropout of the strong views); the perturbed copies start
  from the unmasked maps. Same XLA ops on the same batch: float32 rounding."""
  _, model, variables = tiny()
  x = images()
  m = 2.0 * jax.random.bernoulli(jax.random.key(2), 0.5, (2, 32)).astype(jnp.float32)
  assert model.feature_dim == 32
  logits, aux = jitted(model)(variables, x, feature_masks=m, perturb_masks=jnp.ones((1, 2, 32)))
  plain, plain_aux = jitted(model)(variables, x)
  masked = [f * m[:, None, None, :] for f in plain_aux['features']]
  want = model.apply(variables, masked, method=lambda mdl, f: mdl.head(f))
  want = layers.resize_bilinear(want, (42, 56))
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux['perturbed'][0], plain, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='feature_masks must be'):
    model.apply(variables, x, feature_masks=jnp.ones((3, 32)))


def test_perturb_is_channel_dropout_from_the_dropout_rng():
  _, model, variables = tiny()
  x = images()
  run = lambda key: jitted(model)(variables, x, perturb=2, rngs={'dropout': jax.random.key(key)})
  logits, aux = run(0)
  assert len(aux['perturbed']) == 2
  assert rel_err(aux['perturbed'][0], logits) > 1e-2
  assert rel_err(aux['perturbed'][0], aux['perturbed'][1]) > 1e-2
  np.testing.assert_array_equal(run(0)[1]['perturbed'][0], aux['perturbed'][0])
  assert rel_err(run(1)[1]['perturbed'][0], aux['perturbed'][0]) > 1e-2
  # dropout 0: every copy is the clean prediction.
  none = create_model('dinov2_tiny', C, dropout=0.0)
  clean, aux0 = jitted(none)(variables, x, perturb=1, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_allclose(aux0['perturbed'][0], clean, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute():
  """bf16 matmuls (8-bit mantissa, f32 accumulation, f32 softmax and LN
  statistics) through 4 blocks and the head: within a few percent."""
  _, _, variables = tiny()
  bf16 = create_model('dinov2_tiny', C, dtype='bfloat16')
  f32 = create_model('dinov2_tiny', C)
  lo, _ = jitted(bf16)(variables, images())
  hi, _ = jitted(f32)(variables, images())
  assert lo.dtype == jnp.float32
  assert rel_err(lo, hi) < 5e-2


def grads(model, variables, x):
  def loss(p):
    return jnp.mean(model.apply({'params': p}, x, train=True)[0] ** 2)

  return jax.jit(jax.grad(loss))(variables['params'])


def test_remat_gives_the_same_gradients():
  """Same arithmetic recomputed: float32 rounding only."""
  _, model, variables = tiny()
  a = grads(model, variables, images())
  b = grads(create_model('dinov2_tiny', C, remat=True), variables, images())
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7), a, b)


def test_freeze_backbone_no_gradient_no_optimizer_state():
  _, _, variables = tiny()
  frozen = create_model('dinov2_tiny', C, freeze_backbone=True)
  g = grads(frozen, variables, images())
  assert all(not np.any(leaf) for leaf in jax.tree.leaves(g['backbone']))
  assert any(np.any(leaf) for leaf in jax.tree.leaves(g['head']))
  config = config_lib.base_config()
  config.train.freeze_backbone = True
  config.train.optimizer = 'adamw'
  config.train.steps = 10
  schedule = config_lib.resolve(config).schedule(100)
  tx = optim.make_optimizer(schedule, config)
  state = tx.init(variables['params'])
  n_state = sum(x.size for x in jax.tree.leaves(state))
  n_head = sum(x.size for x in jax.tree.leaves(variables['params']['head']))
  assert n_state == 2 * n_head + 2  # Adam's mu and nu of the head, two counts
  updates, _ = tx.update(g, state, variables['params'])
  assert all(not np.any(u) for u in jax.tree.leaves(updates['backbone']))


@pytest.mark.slow
def test_supervised_train_step_runs():
  """The shared train step on a model without batch_stats."""
  config = config_lib.base_config()
  config.method = 'supervised'
  config.model.backbone = 'dinov2_tiny'
  config.data.num_classes = C
  config.data.crop_size = 28
  config.train.steps = 10
  model = model_from_config(config)
  schedule = config_lib.resolve(config).schedule(100)
  tx = optim.make_optimizer(schedule, config)
  state = ts.create_train_state(model, tx, jax.random.key(0), 28)
  assert state.batch_stats == {}
  rng = np.random.default_rng(0)
  batch = {
    'x': jnp.asarray(rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)),
    'y': jnp.asarray(rng.integers(0, C, (2, 28, 28), dtype=np.int32)),
  }
  step = jax.jit(
    functools.partial(
      ts.train_step,
      model=model,
      tx=tx,
      settings=config_lib.resolve(config),
      schedule=schedule,
    )
  )
  new, metrics = step(state, batch, jax.random.key(1))
  assert int(new.step) == 1 and np.isfinite(float(metrics['loss']))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new.params, state.params)
  assert max(jax.tree.leaves(moved)) > 0


def test_registry_lists_both_families():
  names = registry.backbone_names()
  for b in ('resnet50', 'resnet101', 'dinov2_small', 'dinov2_base', 'dinov2_large', 'dinov2_giant'):
    assert b in names
  assert registry.family_of('dinov2_base').title == 'DINOv2 + DPT'
  with pytest.raises(ValueError, match='unknown backbone'):
    create_model('vit_huge', C)


def test_real_sizes_and_summary():  # shapes only: ~2 s
  from dssn_jax.models import __main__ as cli

  counts = cli.summary('dinov2_base', 21)
  assert round(counts['encoder'] / 1e6, 1) == 86.6
  assert round(counts['decoder'] / 1e6, 1) == 10.9
  assert round(counts['total'] / 1e6, 1) == 97.5


# ---------------------------------------------------------------------------
# Weight layouts, each from its real key names (reduced depth and width).


def hub_state(tm):
  return {k[len('backbone.') :]: v for k, v in tm.state_dict().items() if k.startswith('backbone.')}


def hf_state(hub, swiglu=False):
  """The Hugging Face `Dinov2Model` spelling of a hub state dict (written
  out here from the HF module names, independently of the converter)."""
  out = {
    'embeddings.cls_token': hub['cls_token'],
    'embeddings.mask_token': hub['mask_token'],
    'embeddings.position_embeddings': hub['pos_embed'],
    'embeddings.patch_embeddings.projection.weight': hub['patch_embed.proj.weight'],
    'embeddings.patch_embeddings.projection.bias': hub['patch_embed.proj.bias'],
    'layernorm.weight': hub['norm.weight'],
    'layernorm.bias': hub['norm.bias'],
  }
  for i in range(TINY['depth']):
    b, e = f'blocks.{i}.', f'encoder.layer.{i}.'
    for leaf in ('weight', 'bias'):
      q, k, v = hub[f'{b}attn.qkv.{leaf}'].chunk(3)
      out[f'{e}attention.attention.query.{leaf}'] = q
      out[f'{e}attention.attention.key.{leaf}'] = k
      out[f'{e}attention.attention.value.{leaf}'] = v
      out[f'{e}attention.output.dense.{leaf}'] = hub[f'{b}attn.proj.{leaf}']
      out[f'{e}norm1.{leaf}'] = hub[f'{b}norm1.{leaf}']
      out[f'{e}norm2.{leaf}'] = hub[f'{b}norm2.{leaf}']
      if swiglu:
        out[f'{e}mlp.weights_in.{leaf}'] = hub[f'{b}mlp.w12.{leaf}']
        out[f'{e}mlp.weights_out.{leaf}'] = hub[f'{b}mlp.w3.{leaf}']
      else:
        out[f'{e}mlp.fc1.{leaf}'] = hub[f'{b}mlp.fc1.{leaf}']
        out[f'{e}mlp.fc2.{leaf}'] = hub[f'{b}mlp.fc2.{leaf}']
    out[f'{e}layer_scale1.lambda1'] = hub[f'{b}ls1.gamma']
    out[f'{e}layer_scale2.lambda1'] = hub[f'{b}ls2.gamma']
  return out


def timm_state(hub, swiglu=False):
  """timm's `vit_*_patch14_dinov2`: no mask_token; giant's packed SwiGLU is fc1/fc2."""
  out = {k: v for k, v in hub.items() if k != 'mask_token'}
  if swiglu:
    for k in list(out):
      out[k.replace('mlp.w12.', 'mlp.fc1.').replace('mlp.w3.', 'mlp.fc2.')] = out.pop(k)
  return out


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@needs_torch
@pytest.mark.parametrize('swiglu', [False, True])
@pytest.mark.parametrize('layout', ['dinov2', 'timm_dinov2', 'hf_dinov2'])
def test_encoder_layouts(layout, swiglu):
  tm, _, whole = tiny(swiglu)
  hub = hub_state(tm)
  state = {
    'dinov2': hub,
    'timm_dinov2': timm_state(hub, swiglu),
    'hf_dinov2': hf_state(hub, swiglu),
  }
  state = state[layout]
  assert registry.detect_layout(state) == layout
  ffn = 'swiglu' if swiglu else None
  got = pretrained.from_torch(state, 'dinov2_tiny', layout=layout, ffn=ffn)
  want = {'params': whole['params']['backbone']}
  if layout == 'timm_dinov2':  # no mask token in the file: torch's zero init
    want['params'] = dict(want['params'], mask_token=np.zeros((1, 32), np.float32))
  assert_same_tree(got, want)


@needs_torch
def test_pretrained_encoder_fills_the_backbone(tmp_path):
  tm, model, whole = tiny()
  path = tmp_path / 'dinov2_vits14_pretrain.pth'
  torch.save(hub_state(tm), path)
  fresh = jax.jit(lambda r: model.init(r, images(1, 28, 28)))(jax.random.key(3))
  loaded = pretrained.load_pretrained(fresh, str(path), layout='auto', backbone='dinov2_tiny')
  assert_same_tree(
    jax.tree.map(np.asarray, loaded['params']['backbone']), whole['params']['backbone']
  )
  assert_same_tree(loaded['params']['head'], fresh['params']['head'])
  with pytest.raises(state_dicts.ConversionError, match='pretrained_layout'):
    pretrained.load_pretrained(fresh, str(path), layout='dssn', backbone='dinov2_tiny')


@needs_torch
def test_whole_checkpoint_with_module_prefix_and_ema(tmp_path):
  """UniMatch V2's best.pth: `model` and `model_ema`, DDP's `module.` prefix."""
  tm, model, whole = tiny()
  ema = torch_tiny(seed=1)
  path = tmp_path / 'best.pth'
  prefixed = lambda m: {'module.' + k: v for k, v in m.state_dict().items()}
  torch.save({'model': prefixed(tm), 'model_ema': prefixed(ema), 'epoch': 3}, path)
  got = pretrained.from_torch(str(path), backbone='dinov2_tiny')  # layout and classes detected
  assert_same_tree(got, whole)
  got_ema = pretrained.from_torch(str(path), backbone='dinov2_tiny', ema=True)
  x = images()
  assert rel_err(jitted(model)(got_ema, x)[0], torch_logits(ema, x)) < 1e-4


@needs_torch
def test_evaluate_weights_reports_model_and_model_ema(tmp_path):
  """`python -m dssn_jax.evaluate --weights best.pth` on a UniMatch V2
  checkpoint evaluates `model` (student) and `model_ema` (teacher), as the
  authors' loop does."""
  tm, model, whole = tiny()
  ema = torch_tiny(seed=1)
  path = tmp_path / 'best.pth'
  prefixed = lambda m: {'module.' + k: v for k, v in m.state_dict().items()}
  torch.save({'model': prefixed(tm), 'model_ema': prefixed(ema), 'epoch': 3}, path)
  config = config_lib.base_config()
  config.model.backbone, config.model.pretrained = 'dinov2_tiny', ''
  config.data.name, config.data.num_classes, config.data.eval_mode = 'folder', C, 'original'
  config.data.eval_resize_multiple = 14
  rng = np.random.default_rng(0)
  records = [
    {
      'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
      'label': rng.integers(0, C, (h, w)).astype(np.int32),
      'id': f'r{i}',
    }
    for i, (h, w) in enumerate([(28, 42), (30, 25)])
  ]
  record = evaluate.run(weights=str(path), config=config, records=records)
  got = loading.load_weights(str(path), config)
  assert sorted(got) == ['student', 'teacher']
  assert_same_tree(got['student'], whole)
  want = evaluate.Evaluator(model, config, records=records).evaluate(got)
  # The same evaluation program on the same variables: equal counts.
  assert record['miou'] == pytest.approx(want['miou'])
  assert record['miou_teacher'] == pytest.approx(want['miou_teacher'])
  assert record['miou'] != record['miou_teacher']  # two different models


@needs_torch
def test_key_mismatches_are_reported_together():
  tm, _, _ = tiny()
  state = dict(tm.state_dict())
  del state['backbone.blocks.1.ls2.gamma']
  state['head.scratch.extra.weight'] = torch.zeros(3)
  state['head.projects.0.weight'] = torch.zeros(9, 32, 1, 1)
  with pytest.raises(state_dicts.ConversionError) as e:
    pretrained.from_torch(state, 'dinov2_tiny', layout='unimatch_v2')
  msg = str(e.value)
  assert '1 missing' in msg and 'backbone.blocks.1.ls2.gamma' in msg
  assert '1 unexpected' in msg and 'head.scratch.extra.weight' in msg
  assert '1 mis-shaped' in msg and 'head.projects.0.weight' in msg


def test_unknown_keys_name_the_layouts():
  with pytest.raises(state_dicts.ConversionError, match='pass --layout.*unimatch_v2'):
    registry.detect_layout({'foo.weight': np.zeros(2)})


@needs_torch
def test_convert_cli_detects_whole_checkpoints(tmp_path, capsys):
  """Issue 18, item 7: `python -m dssn_jax.convert best.pth out.npz` on a
  whole DSSN/UniMatch (DeepLabV3+) or UniMatch V2 checkpoint, no --layout."""
  tm, _, whole = tiny()
  v2 = tmp_path / 'v2.pth'
  torch.save({'model': {'module.' + k: v for k, v in tm.state_dict().items()}}, v2)
  assert convert.main([str(v2), str(tmp_path / 'v2.npz'), '--backbone', 'dinov2_tiny']) == 0
  assert 'layout unimatch_v2 (detected' in capsys.readouterr().out
  assert_same_tree(state_dicts.load_npz(str(tmp_path / 'v2.npz')), whole)

  dssn = torch_reference.DeepLabV3Plus(
    3, blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem=8, aspp=32, low=8, decoder=32
  )
  r = tmp_path / 'dssn_best.pth'
  torch.save({'model': {'module.' + k: v for k, v in dssn.state_dict().items()}}, r)
  assert convert.main([str(r), str(tmp_path / 'r.npz'), '--backbone', 'resnet_tiny']) == 0
  out = capsys.readouterr().out
  assert 'layout model (detected' in out and 'wrote' in out


def write_safetensors(path, arrays):
  """A float32 `.safetensors` file written from the format's description
  (8-byte header size, JSON header, raw little-endian data)."""
  header, offset, blobs = {}, 0, []
  for name, a in arrays.items():
    data = np.ascontiguousarray(a, '<f4').tobytes()
    header[name] = {
      'dtype': 'F32',
      'shape': list(a.shape),
      'data_offsets': [offset, offset + len(data)],
    }
    offset += len(data)
    blobs.append(data)
  text = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))


@needs_torch
def test_hf_safetensors_file(tmp_path):
  tm, _, whole = tiny()
  state = {k: v.numpy() for k, v in hf_state(hub_state(tm)).items()}
  path = tmp_path / 'model.safetensors'
  write_safetensors(path, state)
  try:
    import safetensors  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match='pip install safetensors'):
      pretrained.from_torch(str(path), 'dinov2_tiny')
    return
  got = pretrained.from_torch(str(path), 'dinov2_tiny')
  assert_same_tree(got, {'params': whole['params']['backbone']})


def test_torch_key_names():
  assert dinov2_weights.torch_key(('backbone', 'blocks_3', 'attn', 'qkv', 'kernel')) == (
    'backbone.blocks.3.attn.qkv.weight'
  )
  assert dinov2_weights.torch_key(('head', 'refinenet2', 'resConfUnit1', 'conv2', 'bias')) == (
    'head.scratch.refinenet2.resConfUnit1.conv2.bias'
  )
  assert dinov2_weights.torch_key(('head', 'output_conv2', 'kernel')) == (
    'head.scratch.output_conv.2.weight'
  )
  assert dinov2_weights.torch_key(('head', 'resize_layers_0', 'kernel')) == (
    'head.resize_layers.0.weight'
  )
