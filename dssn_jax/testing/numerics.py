"""Tolerances for float32 comparisons, from the arithmetic rather than one XLA build.

Every comparison in the tests is one of:
- the same compiled program run twice: bitwise equal on one machine;
- two programs that compute the same function (batched vs plain forward,
  remat vs stored activations, 8 devices vs 1, JAX vs torch): XLA or the
  other library may fuse and reassociate float32 sums differently;
- float32 against a float64 (numpy) or exact value: rounding of a few ops.

Reassociating a float32 sum of n terms moves it by ~sqrt(n) * eps * the
terms' scale (eps = 1.2e-7), and such errors add up over a network's layers.
The error of an element is set by the scale of the values that produced it,
not by the element: a logit that cancels to ~0 still carries the error of
its inputs. So `assert_close` bounds max |got - want| by a fraction of the
scale, max |want|, instead of elementwise rtol.
"""

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)

# Two programs through a network (tens of layers, reductions over up to ~10^4
# terms): per layer up to ~sqrt(10^4) * eps = 1.2e-5 of the scale, adding up
# over the layers of a small ResNet and amplified by batch-norm divisions.
# Measured: the batched-vs-plain forward of test_models differs by 1.5e-5 on
# logits of scale 31 (5e-7 of the scale) on jax 0.10.2 and by 1.2e-5 on jax
# 0.12, where an elementwise atol of 1e-5 failed on near-zero logits.
NETWORK = 1e-4
# Two programs for one layer or a short chain of elementwise ops and one
# reduction of up to ~10^3 terms: sqrt(10^3) * eps = 4e-6, with margin.
LAYER = 2e-5
# float32 vs an exact or float64 value through a handful of ops (a loss of a
# few terms, a schedule value): a few eps, with margin.
FEW_OPS = 1e-6


def assert_close(got, want, rel, err_msg=''):
  """max |got - want| <= rel * max |want| (the values' scale), float64 arithmetic."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape, err_msg)
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  err = float(np.max(np.abs(got - want))) if want.size else 0.0
  assert err <= rel * scale, (
    f'{err_msg} max abs error {err:.3g} > {rel:g} x scale {scale:.3g} = {rel * scale:.3g}'
  )
