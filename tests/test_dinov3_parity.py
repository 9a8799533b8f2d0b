"""DINOv3 + DPT: numerical parity with Hugging Face `transformers`' `DINOv3ViTModel`.

A randomly initialised `DINOv3ViTModel` (full width, 4 blocks, every block
tapped) is converted through the `hf_dinov3` layout; the normed patch
tokens of every tapped block and the logits of encoder + DPT head (the
head: `torch_dinov2_reference.DPTHead`, UniMatch V2's, on the transformers
features) must match ours within 1e-4 of their scale (max |value|): float32
rounding through different kernels is a few 1e-6, a wrong op (RoPE layout,
LayerNorm eps, a missing LayerScale) is off by 1e-2 or more
(`test_rope_matches_transformers_and_a_swapped_layout_does_not`). The same weights renamed to Meta's
hub keys (the names `dinov3/models/vision_transformer.py`,
`dinov3/layers/*.py` of facebookresearch/dinov3 give their modules,
buffers included) and to timm's (`timm/models/eva.py`'s
`checkpoint_filter_fn`) must convert to the same variables.

Sizes: 256x384 and 512x512, one image each, for the MLP size
`dinov3_small` and the SwiGLU size `dinov3_small_plus`.
"""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
transformers = pytest.importorskip('transformers', reason='the reference is DINOv3ViTModel')
from dssn_jax.models import create_model, dinov3, dinov3_weights, pretrained, registry  # noqa: E402
from dssn_jax.models.dinov2_weights import fill_params  # noqa: E402
from dssn_jax.state_dicts import ConversionError  # noqa: E402
from dssn_jax.testing import torch_dinov2_reference as ref  # noqa: E402  (imports torch)
from dssn_jax.testing import torch_dinov3_reference as ref3  # noqa: E402

REL_TOL = 1e-4
DEPTH, TAPS = 4, (0, 1, 2, 3)  # reduced depth, full width (dinov3_tiny: its own 4)


def hf_model(backbone: str, seed: int = 0):
  """A random `DINOv3ViTModel` of `backbone`'s width and FFN, `DEPTH` blocks
  (`dinov3_tiny`: its own 4)."""
  return ref3.randomize(ref3.encoder(backbone, DEPTH), seed).eval()


def hub_state(hf: dict, swiglu: bool, seed: int = 1) -> dict:
  """`hf`'s weights under Meta's hub keys, with its buffers (`rope_embed.periods`,
  `attn.qkv.bias_mask`) and a random key third in the qkv bias (masked)."""
  g = torch.Generator().manual_seed(seed)
  hf = {k.replace('model.layer.', 'layer.'): v for k, v in hf.items()}
  dim = hf['embeddings.cls_token'].shape[-1]
  out = {
    'cls_token': hf['embeddings.cls_token'],
    'storage_tokens': hf['embeddings.register_tokens'],
    'mask_token': hf['embeddings.mask_token'].reshape(1, dim),
    'patch_embed.proj.weight': hf['embeddings.patch_embeddings.weight'],
    'patch_embed.proj.bias': hf['embeddings.patch_embeddings.bias'],
    'norm.weight': hf['norm.weight'],
    'norm.bias': hf['norm.bias'],
  }
  mlp = {'w1': 'gate_proj', 'w2': 'up_proj', 'w3': 'down_proj'} if swiglu else {}
  mlp = mlp or {'fc1': 'up_proj', 'fc2': 'down_proj'}
  for i in range(DEPTH):
    h, b = f'layer.{i}.', f'blocks.{i}.'
    att = h + 'attention.'
    out[b + 'attn.qkv.weight'] = torch.cat([hf[att + f'{p}_proj.weight'] for p in 'qkv'])
    k_bias = torch.randn(dim, generator=g)  # masked out by bias_mask
    out[b + 'attn.qkv.bias'] = torch.cat([hf[att + 'q_proj.bias'], k_bias, hf[att + 'v_proj.bias']])
    out[b + 'attn.qkv.bias_mask'] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    for leaf in ('weight', 'bias'):
      out[b + f'attn.proj.{leaf}'] = hf[att + f'o_proj.{leaf}']
      for norm in ('norm1', 'norm2'):
        out[b + f'{norm}.{leaf}'] = hf[h + f'{norm}.{leaf}']
      for ours, theirs in mlp.items():
        out[b + f'mlp.{ours}.{leaf}'] = hf[h + f'mlp.{theirs}.{leaf}']
    out[b + 'ls1.gamma'] = hf[h + 'layer_scale1.lambda1']
    out[b + 'ls2.gamma'] = hf[h + 'layer_scale2.lambda1']
  return out


def timm_state(hub: dict, swiglu: bool) -> dict:
  """Meta's hub keys -> timm `Eva`'s (`vit_*_patch16_dinov3_qkvb`)."""
  out = {}
  for key, value in hub.items():
    if key.endswith(('.periods', '.bias_mask')) or key == 'mask_token':
      continue
    if key.endswith('attn.qkv.bias'):
      q, _, v = value.chunk(3)
      out[key.replace('qkv.bias', 'q_bias')] = q
      out[key.replace('qkv.bias', 'v_bias')] = v
      continue
    key = key.replace('ls1.gamma', 'gamma_1').replace('ls2.gamma', 'gamma_2')
    key = key.replace('storage_tokens', 'reg_token')
    if swiglu:
      key = key.replace('mlp.w1', 'mlp.fc1_g').replace('mlp.w2', 'mlp.fc1_x')
      key = key.replace('mlp.w3', 'mlp.fc2')
    out[key] = value
  return out


@functools.cache
def pair(backbone: str, num_classes: int = 5):
  """(transformers model, torch DPT head, our model, our variables)."""
  spec = dinov3.ENCODERS[backbone]
  size = dinov3.HEAD_SIZES[backbone]
  hf = hf_model(backbone)
  head = ref.randomize(ref.DPTHead(num_classes, spec.dim, size['features'], size['out_channels']))
  model = create_model(backbone, num_classes, depth=DEPTH, taps=TAPS)
  encoder = pretrained.from_torch(
    hf.state_dict(), backbone=backbone, layout='hf_dinov3', depth=DEPTH, taps=TAPS
  )
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  head_state = {f'head.{k}': v for k, v in head.state_dict().items()}
  params = fill_params(head_state, {'head': shapes['params']['head']}, 'head')['params']
  params['backbone'] = encoder['params']
  return hf, head, model, {'params': params}


@functools.cache
def jitted(model):
  return jax.jit(model.apply)


def torch_forward(hf, head, x):
  """Normed patch tokens of every block and the DPT logits `(N, H, W, C)`."""
  rows, cols = x.shape[2] // 16, x.shape[3] // 16
  with torch.no_grad():
    feats = ref3.tapped(hf, x, TAPS)
    # The blocks called one by one give DINOv3ViTModel's own forward (normed, last block).
    own = hf(x).last_hidden_state[:, ref3.PREFIX :]
    torch.testing.assert_close(feats[-1], own, rtol=0, atol=0)
    logits = head(feats, rows, cols)
    logits = torch.nn.functional.interpolate(
      logits, (rows * 16, cols * 16), mode='bilinear', align_corners=True
    )
  return [f.numpy() for f in feats], logits.permute(0, 2, 3, 1).numpy()


def errors(backbone, height, width, variables=None, seed=0):
  """Relative errors `(per tapped block..., logits)` against transformers."""
  hf, head, model, converted = pair(backbone)
  x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
  feats, want = torch_forward(hf, head, x)
  got, aux = jitted(model)(variables or converted, x.permute(0, 2, 3, 1).numpy())
  assert got.shape == want.shape, (got.shape, want.shape)
  rows, cols = height // 16, width // 16
  pairs = [(np.asarray(a).reshape(1, rows * cols, -1), b) for a, b in zip(aux['features'], feats)]
  pairs.append((np.asarray(got), want))
  return [float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in pairs]


@pytest.mark.parametrize('backbone', ['dinov3_small', 'dinov3_small_plus'])
def test_parity_with_transformers(backbone):
  """Non-square 256x384 (16 x 24 patches): about 10 s per size on a 2-core CPU."""
  errs = errors(backbone, 256, 384)
  assert max(errs) <= REL_TOL, errs


@pytest.mark.parametrize('backbone', ['dinov3_small', 'dinov3_small_plus'])
def test_parity_with_transformers_at_512(backbone):
  """UniMatch V2's DINOv3 crop, 512x512 (1024 patch tokens): about 20 s per size."""
  errs = errors(backbone, 512, 512)
  assert max(errs) <= REL_TOL, errs


def test_rope_matches_transformers_and_a_swapped_layout_does_not():
  """Our sin/cos of a 12 x 20 grid against `DINOv3ViTRopePositionEmbedding`'s;
  rows' and columns' angles swapped (a plausible layout slip) are far off."""
  hf, _, _, _ = pair('dinov3_small')
  x = torch.zeros(1, 3, 12 * 16, 20 * 16)
  with torch.no_grad():
    cos, sin = (t.numpy() for t in hf.rope_embeddings(x))
  ours_sin, ours_cos = (np.asarray(t) for t in dinov3.rope_sincos(12, 20, 64))
  np.testing.assert_allclose(ours_sin, sin, atol=1e-5)
  np.testing.assert_allclose(ours_cos, cos, atol=1e-5)
  q = 64 // 4
  swapped = ours_sin[:, np.r_[q : 2 * q, 0:q, 3 * q : 4 * q, 2 * q : 3 * q]]
  assert np.max(np.abs(swapped - sin)) > 0.1


@pytest.mark.parametrize('backbone', ['dinov3_small', 'dinov3_small_plus'])
def test_hub_and_timm_layouts_give_the_same_variables(backbone):
  hf, _, _, converted = pair(backbone)
  swiglu = dinov3.ENCODERS[backbone].ffn != 'mlp'
  hub = hub_state(hf.state_dict(), swiglu)
  hub['rope_embed.periods'] = torch.tensor(dinov3.rope_periods(64)).to(torch.bfloat16)
  for layout, state in (('dinov3', hub), ('timm_dinov3', timm_state(hub, swiglu))):
    assert dinov3_weights.detect(state) == layout
    assert registry.detect_layout(state) == layout
    got = pretrained.from_torch(state, backbone=backbone, layout=None, depth=DEPTH, taps=TAPS)
    want = dict(converted['params']['backbone'])
    if layout == 'timm_dinov3':  # timm has no mask_token: zeros, as Meta's init
      assert not np.any(got['params']['mask_token'])
      want['mask_token'] = got['params']['mask_token']
    jax.tree.map(np.testing.assert_array_equal, got['params'], want)


def test_hub_layout_checks_its_buffers():
  hf, _, _, _ = pair('dinov3_small')
  hub = hub_state(hf.state_dict(), False)
  hub['rope_embed.periods'] = torch.tensor(dinov3.rope_periods(64) * 1.05)
  hub['blocks.1.attn.qkv.bias_mask'] = torch.ones(3 * 384)
  hub['blocks.2.attn.qkv.bias_mask'] = torch.full((3 * 384,), float('nan'))  # unfilled: known mask
  del hub['blocks.3.ls2.gamma']
  with pytest.raises(ConversionError) as e:
    pretrained.from_torch(hub, backbone='dinov3_small', layout='dinov3', depth=DEPTH, taps=TAPS)
  text = str(e.value)
  assert 'rope_embed.periods' in text and 'blocks.1.attn.qkv.bias_mask' in text
  assert 'blocks.2' not in text
  hub['rope_embed.periods'] = torch.tensor(dinov3.rope_periods(64))
  hub['blocks.1.attn.qkv.bias_mask'] = hub['blocks.0.attn.qkv.bias_mask']
  with pytest.raises(ConversionError, match=r'1 missing key\(s\):\n    blocks.3.ls2.gamma'):
    pretrained.from_torch(hub, backbone='dinov3_small', layout='dinov3', depth=DEPTH, taps=TAPS)


def test_files_load_as_the_pretrained_encoder(tmp_path):
  """A `DINOv3ViTModel` saved as `model.safetensors` (read without torch) and
  the same weights as Meta's hub `.pth` both load with
  `pretrained_layout='auto'` into `dinov3_tiny` (`config.model.pretrained`)."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  hf = hf_model('dinov3_tiny')
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  save_file(state, str(tmp_path / 'model.safetensors'))
  hub = hub_state(state, swiglu=False)
  hub['rope_embed.periods'] = torch.tensor(dinov3.rope_periods(16))
  torch.save(hub, tmp_path / 'dinov3_tiny.pth')
  model = create_model('dinov3_tiny', 3)
  variables = registry.variable_shapes(model, 'dinov3_tiny')  # shapes suffice
  want = pretrained.from_torch(state, backbone='dinov3_tiny', layout='hf_dinov3')['params']
  for name in ('model.safetensors', 'dinov3_tiny.pth'):
    got = pretrained.load_pretrained(
      variables, str(tmp_path / name), layout='auto', backbone='dinov3_tiny'
    )
    jax.tree.map(np.testing.assert_array_equal, got['params']['backbone'], want)
    assert set(got['params']) == {'backbone', 'head'}


def test_hf_names_resolve_through_a_laid_out_cache(tmp_path, monkeypatch):
  """`hf:ORG/REPO` reads `model.safetensors` from huggingface_hub's cache
  (laid out here as the hub lays it out: refs/main -> snapshots/REV), offline;
  a name not in the cache is one line naming the repository and the cache."""
  hub = pytest.importorskip('huggingface_hub')
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
  repo = tmp_path / 'hub' / 'models--facebook--dinov3-tiny-test'
  rev = '0123456789abcdef0123456789abcdef01234567'
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(rev)
  (repo / 'snapshots' / rev).mkdir(parents=True)
  hf = hf_model('dinov3_tiny')
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  save_file(state, str(repo / 'snapshots' / rev / 'model.safetensors'))
  got = pretrained.from_torch('hf:facebook/dinov3-tiny-test')  # layout and size from the keys
  want = pretrained.from_torch(state, backbone='dinov3_tiny', layout='hf_dinov3')
  jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(FileNotFoundError, match='hf:facebook/absent: no model.safetensors of'):
    pretrained.from_torch('hf:facebook/absent')
  with pytest.raises(ValueError, match='hf:ORG/REPO'):
    pretrained.from_torch('hf:dinov2-base')


@pytest.mark.slow
def test_step_speed_times_the_pytorch_unimatch_v2_step_on_dinov3(capsys):
  """`benchmarks/step_speed.py --torch-only` on `dinov3_tiny`: the authors'
  loop body around transformers' DINOv3ViTModel + the DPT head runs (about
  30 s alone, most of it transformers' first model construction)."""
  from benchmarks import step_speed  # pylint: disable=g-import-not-at-top

  argv = ['--backbone', 'dinov3_tiny', '--crop', '32', '--batch', '2', '--num-classes', '4']
  argv += ['--method', 'unimatch_v2', '--torch-only', '--torch-threads', '1']
  (row,) = step_speed.main(argv + ['--steps', '2', '--warmup', '1'])
  assert row['impl'] == 'torch' and np.isfinite(row['loss']) and row['loss'] > 0
  assert 'backbone=dinov3_tiny' in capsys.readouterr().out.strip().splitlines()[-1]
