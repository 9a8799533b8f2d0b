"""Loss terms and pseudo-label rules against values worked out by hand.

Every comparison: a float32 loss of a few terms against the exact value in
float64, a handful of roundings (log, exp, a short mean): `numerics.FEW_OPS`
of the value unless a comment says otherwise.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax import losses, pseudo_labels
from dssn_jax.testing import numerics


def logits_from_probs(probs):
  """Logits whose softmax is `probs` (`(..., C)`, rows summing to 1)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


def test_supervised_ce_ignores_255():
  # One image, one row of 3 pixels, 2 classes.
  logits = jnp.array([[[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]]])
  labels = jnp.array([[[1, 0, 255]]])
  # log(2) for equal logits; -log(3/4) for p = 3/4; the third pixel is ignored.
  expected = (math.log(2.0) - math.log(0.75)) / 2
  np.testing.assert_allclose(losses.supervised_ce(logits, labels), expected, rtol=numerics.FEW_OPS)


def test_supervised_ce_all_ignored_is_zero():
  logits = jnp.zeros((1, 2, 2, 3))
  labels = jnp.full((1, 2, 2), 255)
  assert float(losses.supervised_ce(logits, labels)) == 0.0


def test_supervised_ce_rejects_bad_shapes():
  with pytest.raises(ValueError, match='supervised_ce'):
    losses.supervised_ce(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 3), jnp.int32))


def test_class_aware_mask_hand_values():
  # Image 0: class 0 peaks at 0.95 > 0.92 (threshold 0.912); class 1 peaks at
  # 0.90 <= 0.92, so it selects nothing, even its own peak pixel.
  # Image 1: class 1 peaks at 0.97 (threshold 0.9312): 0.94 passes, 0.92 not.
  probs = np.array(
    [
      [[[0.95, 0.03, 0.02], [0.93, 0.05, 0.02], [0.90, 0.05, 0.05], [0.05, 0.90, 0.05]]],
      [[[0.02, 0.97, 0.01], [0.03, 0.94, 0.03], [0.04, 0.92, 0.04], [0.40, 0.30, 0.30]]],
    ]
  )
  mask = pseudo_labels.class_aware_mask(logits_from_probs(probs))
  assert mask.shape == (2, 1, 4) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask, [[[True, True, False, False]], [[True, True, False, False]]])


def test_class_aware_mask_high_and_scale_are_parameters():
  probs = np.array([[[[0.90, 0.05, 0.05], [0.80, 0.10, 0.10]]]])
  logits = logits_from_probs(probs)
  # Default: 0.90 <= 0.92, nothing selected.
  np.testing.assert_array_equal(pseudo_labels.class_aware_mask(logits), [[[False, False]]])
  # high 0.85, scale 0.85: threshold 0.765, both pixels pass.
  np.testing.assert_array_equal(
    pseudo_labels.class_aware_mask(logits, high=0.85, scale=0.85), [[[True, True]]]
  )


def test_class_aware_mask_is_per_image():
  # The same pixel (0.93 for class 0) passes where the image's class peak is
  # 0.95 and fails where it is 0.99 (threshold 0.9504).
  probs = np.array(
    [
      [[[0.95, 0.03, 0.02], [0.93, 0.05, 0.02]]],
      [[[0.99, 0.005, 0.005], [0.93, 0.05, 0.02]]],
    ]
  )
  np.testing.assert_array_equal(
    pseudo_labels.class_aware_mask(logits_from_probs(probs)), [[[True, True]], [[True, False]]]
  )


def test_fixed_threshold_mask_is_greater_equal():
  # Equal logits give exactly 0.5.
  logits = jnp.array([[[[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]]])
  np.testing.assert_array_equal(
    pseudo_labels.fixed_threshold_mask(logits, 0.5), [[[True, True, True]]]
  )
  np.testing.assert_array_equal(
    pseudo_labels.fixed_threshold_mask(logits, 0.9), [[[False, False, True]]]
  )
  assert bool(jnp.all(pseudo_labels.fixed_threshold_mask(logits, 0.0)))


def test_confidence_mask_rejects_unknown_rule():
  with pytest.raises(ValueError, match='nope'):
    pseudo_labels.confidence_mask(jnp.zeros((1, 1, 1, 2)), 'nope')


def test_pseudo_label_ce_denominator_counts_valid_pixels():
  # Four pixels: CE log 2 everywhere (equal logits). Selected: pixels 0, 1, 3;
  # valid: pixels 0, 1, 2. Numerator: pixels 0 and 1; denominator: 3 valid.
  logits = jnp.zeros((1, 1, 4, 2))
  labels = jnp.array([[[0, 1, 0, 1]]])
  mask = jnp.array([[[True, True, False, True]]])
  valid = jnp.array([[[True, True, True, False]]])
  np.testing.assert_allclose(
    losses.pseudo_label_ce(logits, labels, mask, valid),
    2 * math.log(2.0) / 3,
    rtol=numerics.FEW_OPS,
  )


def test_pseudo_label_ce_weights_per_pixel_ce():
  logits = jnp.array([[[[math.log(3.0), 0.0], [0.0, 0.0]]]])
  labels = jnp.array([[[0, 1]]])
  mask = jnp.array([[[True, False]]])
  valid = jnp.ones((1, 1, 2), bool)
  np.testing.assert_allclose(
    losses.pseudo_label_ce(logits, labels, mask, valid), -math.log(0.75) / 2, rtol=numerics.FEW_OPS
  )


def test_alignment_loss_uses_unbiased_std():
  # a = (1, 2, 3): mean 2, unbiased std 1 -> z = (-1, 0, 1).
  # b = (0, 0, 3): mean 1, unbiased std sqrt(3) -> z = (-1, -1, 2) / sqrt(3).
  a = jnp.array([[[[1.0, 2.0, 3.0]]]])
  b = jnp.array([[[[0.0, 0.0, 3.0]]]])
  s = math.sqrt(3.0)
  expected = ((-1 + 1 / s) ** 2 + (1 / s) ** 2 + (1 - 2 / s) ** 2) / 3
  np.testing.assert_allclose(losses.alignment_loss(a, b), expected, rtol=numerics.FEW_OPS)
  # With the biased std (ddof=0) the value would be 1.5x this one.
  za = (np.array([1.0, 2.0, 3.0]) - 2) / np.std([1.0, 2.0, 3.0])
  zb = (np.array([0.0, 0.0, 3.0]) - 1) / np.std([0.0, 0.0, 3.0])
  assert abs(float(np.mean((za - zb) ** 2)) - expected) > 1e-2


def test_alignment_loss_means_over_every_element():
  a = jnp.array([[[[1.0, 2.0, 3.0], [5.0, 1.0, 0.0]]]])
  b = jnp.array([[[[1.0, 2.0, 3.0], [10.0, 2.0, 0.0]]]])
  # Identical pixels and a rescaled pixel both give 0 (scale invariance).
  # Exact: scaling by 2 commutes with float32 rounding.
  assert float(losses.alignment_loss(a, b)) == pytest.approx(0.0, abs=1e-12)
  c = jnp.array([[[[3.0, 2.0, 1.0], [5.0, 1.0, 0.0]]]])
  # Pixel 0 differs by z -> -z with z = (-1, 0, 1): squared error 4 + 0 + 4,
  # over 6 elements.
  np.testing.assert_allclose(losses.alignment_loss(a, c), 8.0 / 6.0, rtol=numerics.FEW_OPS)


# OHEM: 7 pixels, 2 classes, all labeled 0; true-class probabilities below,
# the last pixel ignored.
OHEM_PROBS = np.array([0.1, 0.3, 0.6, 0.8, 0.9, 0.95, 0.5])


def _ohem_inputs():
  p = OHEM_PROBS
  probs = np.stack([p, 1 - p], -1).reshape(1, 1, 7, 2)
  labels = np.zeros((1, 1, 7), np.int32)
  labels[0, 0, 6] = 255
  return logits_from_probs(probs), jnp.asarray(labels)


def _mean_nll(probs):
  return float(np.mean(-np.log(probs)))


@pytest.mark.parametrize(
  'min_kept, kept',
  [
    (2, [0.1, 0.3, 0.6]),  # enough pass 0.7: the threshold rules
    (5, [0.1, 0.3, 0.6, 0.8, 0.9]),  # too few pass: the 5 hardest are kept
    (6, [0.1, 0.3, 0.6, 0.8, 0.9, 0.95]),  # exactly num_valid
    (7, [0.1, 0.3, 0.6, 0.8, 0.9, 0.95]),  # more than num_valid: OHEM off
    (0, [0.1, 0.3, 0.6, 0.8, 0.9, 0.95]),  # min_kept 0: reference keeps all
  ],
)
def test_ohem_ce_min_kept(min_kept, kept):
  logits, labels = _ohem_inputs()
  got = losses.ohem_ce(logits, labels, thresh=0.7, min_kept=min_kept)
  # The logits are float32 logs of the probabilities: their rounding
  # (~eps |log p|) reaches ~1e-6 of a small mean NLL, so 1e-5.
  np.testing.assert_allclose(got, _mean_nll(kept), rtol=1e-5)


def test_ohem_ce_jits_and_per_image():
  logits, labels = _ohem_inputs()
  # Two images: the second is the first with the probabilities reversed.
  logits2 = jnp.concatenate([logits, logits[:, :, ::-1]], 0)
  labels2 = jnp.concatenate([labels, labels[:, :, ::-1]], 0)
  fn = jax.jit(lambda lg, y: losses.ohem_ce(lg, y, thresh=0.7, min_kept=4, per_image=True))
  # Per image, 3 pass 0.7 and min_kept 4 adds 0.8: 4 kept in each image
  # (rtol as in test_ohem_ce_min_kept).
  np.testing.assert_allclose(fn(logits2, labels2), _mean_nll([0.1, 0.3, 0.6, 0.8]), rtol=1e-5)
  # Over the batch 6 pass 0.7 >= 4: only those.
  np.testing.assert_allclose(
    losses.ohem_ce(logits2, labels2, thresh=0.7, min_kept=4), _mean_nll([0.1, 0.3, 0.6]), rtol=1e-5
  )


def test_compose_cutmix_logits_labels_ignore():
  box = jnp.array([[[True, False], [False, True]]])
  base = jnp.zeros((1, 2, 2, 3))
  mixed = jnp.ones((1, 2, 2, 3))
  out = pseudo_labels.compose_cutmix(box, mixed, base)
  np.testing.assert_array_equal(out[..., 0], box.astype(jnp.float32))
  assert bool(jnp.all(out[..., 2] == out[..., 0]))
  ignore = pseudo_labels.compose_cutmix(
    box, jnp.full((1, 2, 2), 255, jnp.int32), jnp.zeros((1, 2, 2), jnp.int32)
  )
  np.testing.assert_array_equal(ignore, [[[255, 0], [0, 255]]])
  with pytest.raises(ValueError, match='compose_cutmix'):
    pseudo_labels.compose_cutmix(box, mixed, jnp.zeros((1, 2, 2, 4)))


def test_class_aware_mask_sees_composed_logits():
  # The box brings a confident class-1 region from the partner; composed
  # before CPLG, class 1 is live in the composed image (peak 0.97).
  base = logits_from_probs(np.array([[[[0.6, 0.4], [0.7, 0.3]]]]))
  mixed = logits_from_probs(np.array([[[[0.03, 0.97], [0.5, 0.5]]]]))
  box = jnp.array([[[True, False]]])
  composed = pseudo_labels.compose_cutmix(box, mixed, base)
  np.testing.assert_array_equal(pseudo_labels.class_aware_mask(composed), [[[True, False]]])
  np.testing.assert_array_equal(pseudo_labels.hard_labels(composed), [[[1, 0]]])


def test_ohem_ce_per_group_is_the_mean_of_the_groups_means():
  """`groups`: each GPU batch selects over its own pixels and takes its own
  mean; the result averages the groups (DDP). Group 1 is image 1 alone;
  group 2 is image 2 with all but one pixel ignored, so a pixel-weighted
  mean over the batch would weight it 1/7."""
  logits, labels = _ohem_inputs()
  logits2 = jnp.concatenate([logits, logits], 0)
  labels2 = jnp.concatenate([labels, jnp.full_like(labels, 255).at[0, 0, 0].set(0)], 0)
  got = losses.ohem_ce(logits2, labels2, thresh=0.7, min_kept=2, groups=2)
  want = (_mean_nll([0.1, 0.3, 0.6]) + _mean_nll([0.1])) / 2
  np.testing.assert_allclose(got, want, rtol=1e-5)
  pooled = losses.ohem_ce(logits2, labels2, thresh=0.7, min_kept=2, per_image=True)
  np.testing.assert_allclose(pooled, _mean_nll([0.1, 0.3, 0.6, 0.1]), rtol=1e-5)
  with pytest.raises(ValueError, match='groups=3 does not divide the batch of 2'):
    losses.ohem_ce(logits2, labels2, groups=3)


def test_cross_entropy_one_hot_pick_equals_the_gather():
  """The default one-hot pick (no gather, so no scatter in the gradient)
  gives the gather's values and gradients, ignore labels included."""
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 3, 5, 4)).astype(np.float32) * 3)
  labels = jnp.asarray(rng.choice([0, 1, 2, 3, 255], size=(2, 3, 5)))
  for_pick = lambda pick: jax.value_and_grad(
    lambda z: jnp.sum(losses.cross_entropy_map(z, labels, pick) * jnp.arange(5.0))
  )(logits)
  want, got = for_pick('gather'), for_pick('onehot')
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  with pytest.raises(ValueError, match='pick'):
    losses.cross_entropy_map(logits, labels, 'take')


@pytest.mark.parametrize('size', [1, 7, 4096])
def test_kth_smallest_is_the_sorted_value_without_a_sort(size):
  """OHEM's k-th probability by bisection over the float bits: exactly the
  sort's value, with ties, -0.0, ones (invalid pixels) and k at both ends;
  the compiled program holds no sort."""
  rng = np.random.default_rng(size)
  for trial in range(3):
    x = rng.random(size).astype(np.float32)
    if trial == 1:
      x = np.round(x * 5) / 5  # ties
    if trial == 2:
      x[: size // 2] = 1.0
      x[0] = -0.0
    for k in sorted({1, size // 3 + 1, size}):
      got = float(losses.kth_smallest(jnp.asarray(x), k))
      assert got == float(np.sort(np.maximum(x, 0.0))[k - 1]), (trial, k)
  text = jax.jit(lambda v: losses.kth_smallest(v, 3)).lower(jnp.zeros(64)).as_text()
  assert 'sort' not in text
