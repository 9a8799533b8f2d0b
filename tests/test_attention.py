"""The ViT attention implementations (dssn_jax/models/attention.py) and the
`precision=` config argument that picks them with bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax import config_lib
from dssn_jax.models import attention, registry
from dssn_jax.testing import numerics
from dssn_jax.testing.configs import load_config

CONFIGS = ('pascal', 'cityscapes', 'coco', 'ade20k', 'digits')


def qkv(n=2, t=13, h=3, d=8, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, (n, t, h, d), jnp.float32).astype(dtype) for k in keys]


@pytest.mark.parametrize('chunk', [4, 5, 13, 64])
def test_chunked_attention_is_xla_attention_with_its_gradients(chunk):
  """Blocks of `chunk` queries (13 tokens: padded last block, one block,
  one block larger than T): the values and the gradients of q, k, v equal
  XLA's attention within float32 rounding."""
  q, k, v = qkv()
  w = jax.random.normal(jax.random.key(1), q.shape)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * w)

  xla = lambda q, k, v: attention.attend(q, k, v, 0.35, 'xla')
  chunked = lambda q, k, v: attention.chunked_attention(q, k, v, 0.35, chunk)
  np.testing.assert_allclose(chunked(q, k, v), xla(q, k, v), rtol=0, atol=numerics.FEW_OPS)
  want = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(lambda *a: loss(chunked, *a), argnums=(0, 1, 2)))(q, k, v)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=0, atol=numerics.FEW_OPS * float(jnp.max(jnp.abs(e))))


def test_chunked_attention_in_bfloat16_keeps_float32_softmax():
  q, k, v = qkv(dtype=jnp.bfloat16)
  out = attention.chunked_attention(q, k, v, 0.35, 4)
  assert out.dtype == jnp.bfloat16
  want = attention.attend(q, k, v, 0.35, 'xla')
  np.testing.assert_allclose(
    np.asarray(out, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=0
  )


def test_auto_picks_the_device_path():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention.resolve('auto', bf16, 'gpu') == 'cudnn'
  assert attention.resolve('auto', f32, 'gpu') == 'xla'  # cuDNN's flash attention: 16-bit only
  assert attention.resolve('auto', bf16, 'tpu') == 'chunked'
  assert attention.resolve('auto', bf16, 'cpu') == 'xla'
  assert attention.resolve('chunked', f32, 'cpu') == 'chunked'
  with pytest.raises(config_lib.ConfigError, match="model.attention.*'flash'"):
    attention.resolve('flash', f32)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_takes_the_bf16_preset(name):
  """`precision=bf16` on every config: bfloat16 compute, attention `auto`;
  the default stays the authors' float32 and XLA's attention."""
  default = load_config(name)
  assert (default.model.dtype, default.model.attention) == ('float32', 'xla')
  preset = load_config(name, 'precision=bf16')
  assert (preset.model.dtype, preset.model.attention) == ('bfloat16', 'auto')
  config_lib.validate(preset)
  with pytest.raises(config_lib.ConfigError, match="precision='fp16'"):
    load_config(name, 'precision=fp16')


def test_the_preset_builds_a_vit_with_the_resolved_attention():
  config = load_config('pascal', 'backbone=dinov3_base,method=unimatch_v2,precision=bf16')
  config.model.backbone = 'dinov3_tiny'
  model = registry.model_from_config(config)
  assert model.backbone.attention == attention.resolve('auto', jnp.bfloat16)
  assert model.backbone.dtype == jnp.bfloat16
