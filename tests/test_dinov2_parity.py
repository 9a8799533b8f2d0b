"""DINOv2 + DPT: numerical parity with a PyTorch rendering of the authors' model.

`torch_dinov2_reference.DPT` (random weights at a realistic scale) is
converted with `pretrained.from_torch(layout='unimatch_v2')` and must give the
same logits as our model. Both sides compute in float32 with different
summation orders (XLA vs torch CPU kernels, through ~4 blocks and the
head): the errors are float32 rounding, a few 1e-7 relative per op, so
1e-4 relative to the logit scale (max |logit|) leaves a wide margin while a
wrong op (bicubic vs the torch one, a missing LayerScale, a transposed
kernel) is off by 1e-2 or more; `test_parity_detects_a_wrong_grid` shows
that the comparison catches the smallest such change.
"""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
from dssn_jax.models import create_model, pretrained  # noqa: E402
from dssn_jax.models.dinov2 import torch_bicubic_matrix  # noqa: E402
from dssn_jax.testing import torch_dinov2_reference as ref  # noqa: E402  (imports torch)

REL_TOL = 1e-4
DEPTH, TAPS = 4, (0, 1, 2, 3)  # reduced depth, full width
SIZES = {
  'dinov2_small': dict(dim=384, heads=6, features=64, out_channels=(48, 96, 192, 384)),
  'dinov2_giant': dict(dim=1536, heads=24, features=384, out_channels=(1536,) * 4),
}


@functools.cache
def pair(backbone: str, num_classes: int = 5):
  s = SIZES[backbone]
  tm = ref.DPT(
    num_classes,
    s['dim'],
    DEPTH,
    s['heads'],
    TAPS,
    s['features'],
    s['out_channels'],
    swiglu=backbone == 'dinov2_giant',
  )
  tm = ref.randomize(tm)
  model = create_model(backbone, num_classes, depth=DEPTH, taps=TAPS)
  variables = pretrained.from_torch(
    tm.state_dict(), backbone=backbone, layout='unimatch_v2', depth=DEPTH, taps=TAPS
  )
  return tm, model, variables


@functools.cache
def jitted(model):
  return jax.jit(model.apply)


def relative_error(backbone, height, width, variables=None, seed=0, batch=2):
  tm, model, converted = pair(backbone)
  x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
  with torch.no_grad():
    want = tm(x).permute(0, 2, 3, 1).numpy()
  got, _ = jitted(model)(variables or converted, x.permute(0, 2, 3, 1).numpy())
  assert got.shape == want.shape, (got.shape, want.shape)
  err = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
  return err if np.isfinite(err) else float('inf')


@pytest.mark.parametrize('height,width', [(518, 518), (266, 392)])
def test_small_parity(height, width):
  assert relative_error('dinov2_small', height, width) <= REL_TOL


@pytest.mark.parametrize(
  'height,width', [pytest.param(518, 518, marks=pytest.mark.slow), (266, 392)]
)
def test_giant_swiglu_parity(height, width):
  """Full width (1536, SwiGLU, DPT features 384), one image: 266x392 (about
  25 s on a 2-core CPU) in every run; 518x518 (about 70 s, the same code at
  the pretraining grid, which `test_small_parity` covers) with the slow tests."""
  assert relative_error('dinov2_giant', height, width, batch=1) <= REL_TOL


def test_jax_image_resize_is_not_the_torch_bicubic():
  """Why the grid has its own resize: `jax.image.resize` (a = -0.5, the size
  ratio) differs from torch's bicubic by far more than the tolerance."""
  grid = np.random.default_rng(0).normal(size=(37, 37, 4))
  want = np.einsum(
    'ip,jq,pqd->ijd', torch_bicubic_matrix(37, 19.1 / 37), torch_bicubic_matrix(37, 28.1 / 37), grid
  )
  other = np.asarray(jax.image.resize(grid, (19, 28, 4), 'bicubic'))
  assert np.max(np.abs(other - want)) > 1e-2 * np.max(np.abs(want))


def test_parity_detects_a_small_change():
  """The comparison is sharp: position embeddings off by 1% fail it."""
  _, _, variables = pair('dinov2_small')
  broken = jax.tree.map(lambda a: a, variables)
  broken['params']['backbone']['pos_embed'] = variables['params']['backbone']['pos_embed'] * 1.01
  assert relative_error('dinov2_small', 266, 392, variables=broken) > REL_TOL


def test_bicubic_matrix_matches_torch():
  """Our per-axis matrices reproduce `F.interpolate(..., 'bicubic')` with a
  scale factor (float64 on both sides: agreement to 1e-12)."""
  g = torch.randn(1, 3, 37, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
  for rows, cols in [(19, 28), (37, 20), (74, 5), (1, 1)]:
    sf = ((rows + 0.1) / 37, (cols + 0.1) / 37)
    want = torch.nn.functional.interpolate(g, scale_factor=sf, mode='bicubic').numpy()
    got = np.einsum(
      'ip,jq,cpq->cij',
      torch_bicubic_matrix(37, sf[0]),
      torch_bicubic_matrix(37, sf[1]),
      g[0].numpy(),
    )
    assert want.shape[-2:] == (rows, cols)
    np.testing.assert_allclose(got, want[0], atol=1e-12)
