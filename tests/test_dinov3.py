"""DINOv3 encoders and their DPT segmenter: sizes, the patch-16 contract, the
masked key bias, the training-mode RoPE rescale, the `--summary` CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax.models import __main__ as models_cli
from dssn_jax.models import create_model, dinov3, pretrained, registry

# Meta's published parameter counts (DINOv3 model card, millions).
PUBLISHED = {
  'dinov3_small': 21,
  'dinov3_small_plus': 29,
  'dinov3_base': 86,
  'dinov3_large': 300,
  'dinov3_huge_plus': 840,
  'dinov3_7b': 6716,
}


def encoder_params(name: str) -> int:
  shapes = registry.variable_shapes(create_model(name, 21), name)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']['backbone']))


@pytest.mark.parametrize(
  'name',
  [
    n if n == 'dinov3_small_plus' else pytest.param(n, marks=pytest.mark.slow)
    for n in sorted(PUBLISHED)
  ],
)
def test_parameter_counts_match_the_published_sizes(name):
  """Shapes only (`eval_shape`: the 7B builds without its 27 GB of float32);
  S+ (SwiGLU) in the default suite, the 7B's count in the conversion test below."""
  assert encoder_params(name) / 1e6 == pytest.approx(PUBLISHED[name], rel=0.03)


def test_ffn_hidden_widths():
  """Meta's `SwiGLUFFN`: `d = int(int(dim * ratio) * 2/3)` rounded up to 8 (64 for the 7B)."""
  width = {n: dinov3.ffn_hidden(s.dim, s.ffn, s.ffn_ratio) for n, s in dinov3.ENCODERS.items()}
  assert width['dinov3_small'] == 1536 and width['dinov3_base'] == 3072
  assert width['dinov3_small_plus'] == 1536 and width['dinov3_huge_plus'] == 5120
  assert width['dinov3_large_plus'] == 4096 and width['dinov3_7b'] == 8192
  assert dinov3.ffn_hidden(100, 'swiglu', 6) == 400 and dinov3.ffn_hidden(100, 'swiglu64', 6) == 448


def test_rope_periods_and_grid():
  np.testing.assert_allclose(dinov3.rope_periods(16), [1.0, 100**0.25, 100**0.5, 100**0.75])
  sin, cos = dinov3.rope_sincos(2, 3, 16)
  # First patch centre (row 0 of 2, column 0 of 3): (-0.5, -2/3) in [-1, 1].
  angles = 2 * np.pi * np.array([-0.5, -2 / 3])[:, None] / dinov3.rope_periods(16)[None]
  want = np.tile(angles.reshape(-1), 2)
  np.testing.assert_allclose(np.asarray(sin[0]), np.sin(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(cos[0]), np.cos(want), rtol=1e-6, atol=1e-6)


def random_variables(model, x, seed=0):
  """Random variables of `model`'s shapes (LayerNorm scales near 1, the rest
  N(0, 0.02)) without an init program to compile."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def leaf(path, s):
    noise = 0.02 * rng.standard_normal(s.shape)
    return jnp.asarray(noise + (path[-1].key == 'scale'), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope='module')
def tiny():
  """dinov3_tiny's encoder with rescale 2, its LayerScale at 1 (not the 1e-5
  init) and its qkv kernels scaled up, so that attention (and so RoPE) shapes
  the output; apply compiled (train static)."""
  encoder = dinov3.create_encoder('dinov3_tiny', rope_rescale=2.0)
  x = jax.random.normal(jax.random.key(1), (4, 32, 48, 3))
  variables = random_variables(encoder, x[:1])
  for i in range(4):
    block = variables['params'][f'blocks_{i}']
    block['attn']['qkv']['kernel'] = block['attn']['qkv']['kernel'] * 30.0
    block['ls1']['gamma'] = block['ls2']['gamma'] = jnp.ones(32)
  apply = jax.jit(
    lambda v, x, train, rngs: encoder.apply(v, x, train, rngs=rngs)[-1], static_argnums=2
  )
  return encoder, apply, variables, x


def test_segmenter_sides_logits_and_the_masked_key_bias():
  """Logits at the input size; sides not multiples of 16 get a clear error;
  the key third of the qkv bias changes nothing (Meta's `mask_k_bias`)."""
  model = create_model('dinov3_tiny', 3)
  x = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
  variables = random_variables(model, x[:1])
  apply = jax.jit(model.apply)
  logits, aux = apply(variables, x)
  assert logits.shape == (2, 32, 48, 3)
  assert [f.shape for f in aux['features']] == [(2, 2, 3, 32)] * 4
  qkv = variables['params']['backbone']['blocks_0']['attn']['qkv']
  qkv['bias'] = qkv['bias'].at[32:64].set(5.0)  # the key third
  np.testing.assert_array_equal(np.asarray(apply(variables, x)[0]), np.asarray(logits))
  with pytest.raises(ValueError, match='multiples of 16; got images \\(1, 28, 32, 3\\).*32x32'):
    model.apply(variables, jnp.zeros((1, 28, 32, 3)))


def test_rope_rescale_draws_once_per_call_from_the_rope_rng(tiny):
  """Training mode rescales the RoPE coordinates by one draw per call: the
  same key gives the same draw whatever the batch split; evaluation never
  rescales; without a 'rope' rng the error names the fix."""
  encoder, apply, variables, x = tiny
  plain = np.asarray(apply(variables, x, False, {}))
  key = {'rope': jax.random.key(7)}
  trained = np.asarray(apply(variables, x, True, key))
  scale = float(np.max(np.abs(plain)))
  assert np.max(np.abs(trained - plain)) > 1e-2 * scale
  halves = [apply(variables, part, True, key) for part in (x[:2], x[2:])]
  np.testing.assert_allclose(np.concatenate(halves), trained, rtol=1e-5, atol=1e-5 * scale)
  other = np.asarray(apply(variables, x, True, {'rope': jax.random.key(8)}))
  assert np.max(np.abs(other - trained)) > 1e-2 * scale
  off = dinov3.create_encoder('dinov3_tiny')  # rope_rescale 0: training mode needs no rng
  off_train = jax.jit(lambda v, x: off.apply(v, x, True)[-1])(variables, x)
  np.testing.assert_allclose(off_train, plain, rtol=1e-6, atol=1e-6 * scale)
  with pytest.raises(ValueError, match="rngs=\\{'rope': key\\}.*rope_rescale=0"):
    encoder.apply(variables, x[:1, :16, :16], True)


def test_rope_rescale_scale_range():
  """`exp(U(-log 2, log 2))`: within [1/2, 2], spread over it."""
  encoder = dinov3.create_encoder('dinov3_tiny', rope_rescale=2.0)
  scales = [
    float(
      encoder.apply(
        {}, True, rngs={'rope': jax.random.key(s)}, method=lambda m, t: m._rope_scale(t)
      )
    )
    for s in range(20)
  ]
  assert all(0.5 <= s <= 2.0 for s in scales) and max(scales) > 1.2 and min(scales) < 0.8


def test_summary_cli(capsys):
  assert models_cli.main(['--summary', 'dinov3_base', '--num-classes', '21']) == 0
  out = capsys.readouterr().out
  assert 'DINOv3 + DPT dinov3_base, 21 classes' in out
  assert 'Encoder 85.7M + head 10.9M = 96.6M params' in out


def test_7b_hub_state_dict_converts_by_shape():
  """A state dict with the 7B's hub keys and shapes (`dinov3_vit7b16`: no qkv
  bias, hence no `bias_mask`; SwiGLU64; `local_cls_norm`), as zero-stride
  arrays that hold no memory: its layout and size are detected and every
  key lands on a parameter of the right shape."""
  dim, hidden = 4096, 8192
  zeros = lambda *shape: np.broadcast_to(np.float32(0), shape)
  state = {
    'cls_token': zeros(1, 1, dim),
    'storage_tokens': zeros(1, 4, dim),
    'mask_token': zeros(1, dim),
    'patch_embed.proj.weight': zeros(dim, 3, 16, 16),
    'patch_embed.proj.bias': zeros(dim),
    'rope_embed.periods': dinov3.rope_periods(128),
    'norm.weight': zeros(dim),
    'norm.bias': zeros(dim),
    'local_cls_norm.weight': zeros(dim),
    'local_cls_norm.bias': zeros(dim),
  }
  for i in range(40):
    b = f'blocks.{i}.'
    state[b + 'attn.qkv.weight'] = zeros(3 * dim, dim)
    state[b + 'attn.proj.weight'], state[b + 'attn.proj.bias'] = zeros(dim, dim), zeros(dim)
    for name, shape in (('w1', (hidden, dim)), ('w2', (hidden, dim)), ('w3', (dim, hidden))):
      state[b + f'mlp.{name}.weight'] = zeros(*shape)
      state[b + f'mlp.{name}.bias'] = zeros(shape[0])
    for norm in ('norm1', 'norm2'):
      state[b + f'{norm}.weight'], state[b + f'{norm}.bias'] = zeros(dim), zeros(dim)
    state[b + 'ls1.gamma'], state[b + 'ls2.gamma'] = zeros(dim), zeros(dim)
  assert registry.detect_layout(state) == 'dinov3'
  converted = pretrained.from_torch(state)['params']  # shapes checked against the model's
  assert converted['blocks_39']['mlp']['w3']['kernel'].shape == (hidden, dim)
  assert 'bias' not in converted['blocks_0']['attn']['qkv']
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(converted))
  assert count / 1e6 == pytest.approx(PUBLISHED['dinov3_7b'], rel=0.01)
