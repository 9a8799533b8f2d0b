"""The DeepLabV3+ model and its torch-semantics layers.

Variables come from `jax.eval_shape(model.init)` filled with random numbers:
compiling `init` costs far more on this CPU than the forward passes tested.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssn_jax import config_lib
from dssn_jax.models import __main__ as models_cli
from dssn_jax.models import create_model, layers, model_from_config
from dssn_jax.testing import numerics

NUM_CLASSES = 5


def random_variables(model, shape, seed=0):
  """`{'params', 'batch_stats'}` of `model` with random values (He-scaled kernels)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, s = path[-1].key, leaf.shape
    if name == 'kernel':
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(s[:-1])), s)
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, s)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, s)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.cache
def jitted(model, train=False, perturb=0):
  def run(variables, x, key):
    return model.apply(
      variables,
      x,
      train=train,
      perturb=perturb,
      rngs={'dropout': key},
      mutable=['batch_stats'] if train else False,
    )

  return jax.jit(run)


@pytest.fixture(scope='module')
def tiny():
  model = create_model('resnet_tiny', NUM_CLASSES)
  return model, random_variables(model, (2, 33, 33, 3))


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize('backbone,millions', [('resnet101', 59.5), ('resnet50', 40.5)])
def test_parameter_count_matches_reference_log(backbone, millions):
  counts = models_cli.summary(backbone, 21)
  assert abs(counts['total'] / 1e6 - millions) < 0.1, counts  # the log's rounding to 0.1M


def test_summary_cli(capsys):
  assert models_cli.main(['--summary', 'resnet101', '--num-classes', '21']) == 0
  assert 'Total params: 59.5M' in capsys.readouterr().out


def test_variable_names_and_dtypes():
  """Named like the torch modules; float32 params and statistics under bfloat16."""
  model = create_model('resnet_tiny', NUM_CLASSES, dtype='bfloat16')
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  assert set(shapes['params']) == {'backbone', 'head', 'reduce', 'fuse', 'classifier'}
  backbone = shapes['params']['backbone']
  assert {
    'stem_conv1',
    'stem_bn1',
    'stem_conv2',
    'stem_bn2',
    'stem_conv3',
    'bn1',
    'layer1_0',
    'layer4_0',
  } <= set(backbone)
  assert backbone['stem_conv3']['kernel'].shape == (3, 3, 8, 16)
  assert set(backbone['layer2_0']) == {
    'conv1',
    'bn1',
    'conv2',
    'bn2',
    'conv3',
    'bn3',
    'downsample_conv',
    'downsample_bn',
  }
  assert set(shapes['params']['head']) == {'b0', 'b1', 'b2', 'b3', 'b4', 'project'}
  assert shapes['params']['classifier']['bias'].shape == (NUM_CLASSES,)
  for leaf in jax.tree_util.tree_leaves(shapes):
    assert leaf.dtype == jnp.float32
  seven = create_model('resnet_tiny', NUM_CLASSES, deep_stem=False)
  stem = jax.eval_shape(seven.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  assert stem['params']['backbone']['conv1']['kernel'].shape == (7, 7, 3, 8)


@pytest.mark.parametrize('output_stride,c4_size', [(16, (7, 9)), (8, (13, 17))])
def test_odd_input_gives_logits_at_input_size(tiny, output_stride, c4_size):
  _, variables = tiny  # the same variables fit every output stride
  model = create_model('resnet_tiny', NUM_CLASSES, output_stride=output_stride)
  x = images((1, 97, 131, 3))
  logits, aux = jitted(model)(variables, x, jax.random.key(0))
  assert logits.shape == (1, 97, 131, NUM_CLASSES) and logits.dtype == jnp.float32
  assert aux['c1'].shape == (1, 25, 33, 32)  # stride 4
  assert aux['c4'].shape == (1, *c4_size, 256)  # stride 16 or 8
  assert aux['features'].shape == (1, 25, 33, 32)
  assert aux['perturbed'] == ()
  assert np.all(np.isfinite(np.asarray(logits)))


def test_perturbed_forward(tiny):
  model, variables = tiny
  x = images((2, 33, 33, 3), seed=1)
  key = jax.random.key(3)
  (clean, aux), updates = jitted(model, train=True, perturb=2)(variables, x, key)
  fp1, fp2 = aux['perturbed']
  assert clean.shape == fp1.shape == fp2.shape == (2, 33, 33, NUM_CLASSES)
  assert fp1.dtype == fp2.dtype == jnp.float32
  diff = lambda a, b: float(jnp.max(jnp.abs(a - b)))
  assert diff(clean, fp1) > 1e-2 and diff(clean, fp2) > 1e-2 and diff(fp1, fp2) > 1e-2
  assert aux['features'].shape[0] == 2  # the clean copy only
  # Train mode: the decoder's BN statistics cover all three copies, so the
  # clean logits differ from those of the plain forward.
  (plain, _), _ = jitted(model, train=True)(variables, x, key)
  assert diff(clean, plain) > 1e-3
  assert jax.tree_util.tree_structure(updates['batch_stats']) == jax.tree_util.tree_structure(
    variables['batch_stats']
  )
  # Eval mode: running statistics, so the clean copy is the plain forward;
  # the dropout stays active.
  clean_eval, aux_eval = jitted(model, perturb=2)(variables, x, key)
  plain_eval, _ = jitted(model)(variables, x, key)
  # Two programs (batched with perturbed copies vs plain): reassociation.
  numerics.assert_close(clean_eval, plain_eval, numerics.NETWORK)
  assert diff(aux_eval['perturbed'][0], plain_eval) > 1e-2


def test_fp_bn_clean(tiny):
  """fp_bn='clean': the clean copy and the running statistics are those of
  the plain forward; the perturbed copies still differ."""
  _, variables = tiny
  model = create_model('resnet_tiny', NUM_CLASSES, fp_bn='clean')
  x = images((2, 33, 33, 3), seed=1)
  key = jax.random.key(3)
  (clean, aux), updates = jitted(model, train=True, perturb=2)(variables, x, key)
  (plain, _), plain_updates = jitted(model, train=True)(variables, x, key)
  # Two programs (batched with perturbed copies vs plain): reassociation.
  numerics.assert_close(clean, plain, numerics.NETWORK)
  jax.tree.map(
    lambda a, b: numerics.assert_close(a, b, numerics.NETWORK),
    updates['batch_stats'],
    plain_updates['batch_stats'],
  )
  assert float(jnp.max(jnp.abs(aux['perturbed'][0] - clean))) > 1e-2
  config = config_lib.base_config()
  config.model.fp_bn = 'mixed'
  with pytest.raises(ValueError, match='config.model.fp_bn'):
    model_from_config(config)
  with pytest.raises(ValueError, match='fp_bn'):
    create_model('resnet_tiny', NUM_CLASSES, fp_bn='mixed').apply(
      variables, x, train=True, perturb=2, rngs={'dropout': key}, mutable=['batch_stats']
    )


def test_dropout2d_drops_whole_channels():
  x = jnp.ones((4, 3, 5, 64))
  drop = layers.Dropout2d(0.5)
  y = drop.apply({}, x, rngs={'dropout': jax.random.key(0)})
  planes = np.asarray(y).transpose(0, 3, 1, 2).reshape(4 * 64, 15)
  assert np.all((planes == 0).all(1) | (planes == 2).all(1))  # whole planes, x2
  assert 0.35 < np.mean(planes[:, 0] == 0) < 0.65
  other = drop.apply({}, x, rngs={'dropout': jax.random.key(1)})
  assert not np.array_equal(np.asarray(other), np.asarray(y))
  assert drop.apply({}, x, deterministic=True) is x


def test_dropout2d_sample_major_copies_drop_what_the_concatenation_drops():
  """`(n, k, H, W, C)` copies (sample-major, DeepLabV3+'s perturbed copies)
  lose the same planes as their copy-major concatenation `(k * n, ...)`."""
  x = jax.random.normal(jax.random.key(2), (3, 4, 5, 16))
  drop, rngs = layers.Dropout2d(0.5), {'dropout': jax.random.key(3)}
  want = drop.apply({}, jnp.concatenate([x, x]), rngs=rngs)  # copy-major
  got = drop.apply({}, jnp.broadcast_to(x[:, None], (3, 2, 4, 5, 16)), rngs=rngs)
  np.testing.assert_array_equal(got.swapaxes(0, 1).reshape(want.shape), want)


def test_batchnorm_matches_torch_train_and_eval():
  """Normalization by the biased, running update by the unbiased variance."""
  torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 5, 6, 3)) * [1.0, 3.0, 0.2] + [0.5, -2.0, 10.0]).astype(np.float32)
  x2 = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
  tbn = torch.nn.BatchNorm2d(3)
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
    tbn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
  bn = layers.BatchNorm(use_running_average=False)
  variables = {
    'params': {'scale': jnp.array([1.5, 0.5, 2.0]), 'bias': jnp.array([0.1, -0.2, 0.3])},
    'batch_stats': {'mean': jnp.zeros(3), 'var': jnp.ones(3)},
  }
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)
  for batch in (x, x2):  # two updates of the running statistics
    tbn.train()
    want = tbn(nchw(batch)).detach().permute(0, 2, 3, 1).numpy()
    got, updates = bn.apply(variables, jnp.asarray(batch), mutable=['batch_stats'])
    variables = {**variables, **updates}
    # JAX vs torch, one layer. Channel 2 (mean 10, std 0.2) amplifies the
    # rounding of its mean (120 terms, ~sqrt(120) eps) by 10 / 0.2 = 50: ~7e-5.
    numerics.assert_close(got, want, 10 * numerics.LAYER)
    numerics.assert_close(variables['batch_stats']['mean'], tbn.running_mean, numerics.LAYER)
    numerics.assert_close(variables['batch_stats']['var'], tbn.running_var, numerics.LAYER)
  # The first update used the unbiased variance, not the biased one.
  n = x.shape[0] * x.shape[1] * x.shape[2]
  biased = x.reshape(-1, 3).var(0)
  first = bn.apply(
    {**variables, 'batch_stats': {'mean': jnp.zeros(3), 'var': jnp.ones(3)}},
    jnp.asarray(x),
    mutable=['batch_stats'],
  )[1]['batch_stats']['var']
  # float32 variance vs numpy's (float32 input, 120 terms): LAYER.
  numerics.assert_close(first, 0.9 + 0.1 * biased * n / (n - 1), numerics.LAYER)
  tbn.eval()
  want = tbn(nchw(x2)).detach().permute(0, 2, 3, 1).numpy()
  got = layers.BatchNorm(use_running_average=True).apply(variables, jnp.asarray(x2))
  numerics.assert_close(got, want, numerics.LAYER)  # JAX vs torch, elementwise ops


@pytest.mark.parametrize(
  'src,dst',
  [
    ((1, 1), (5, 7)),
    ((7, 9), (25, 33)),
    ((25, 33), (97, 131)),
    ((13, 17), (5, 6)),
    ((4, 6), (1, 1)),
    ((6, 6), (6, 6)),
  ],
)
def test_resize_matches_torch_align_corners(src, dst):
  torch = pytest.importorskip('torch', reason='the parity tests compare with PyTorch')
  F = torch.nn.functional
  x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
  want = (
    F.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode='bilinear', align_corners=True
    )
    .permute(0, 2, 3, 1)
    .numpy()
  )
  got = layers.resize_bilinear(jnp.asarray(x), dst)
  assert got.shape == (2, *dst, 3)
  # JAX vs torch: a 4-term weighted sum per output, a few eps of the scale.
  numerics.assert_close(got, want, numerics.LAYER)


def test_resize_matrix_form_equals_the_gather_form_to_rounding():
  """The default interpolation matrices and the former gathers (`method=
  'gather'`) agree to float32 rounding, values and gradients."""
  x = jax.random.normal(jax.random.key(5), (2, 7, 9, 3))
  w = jax.random.normal(jax.random.key(6), (2, 25, 33, 3))
  for_method = lambda method: jax.value_and_grad(
    lambda x: jnp.sum(layers.resize_bilinear(x, (25, 33), method) * w)
  )(x)
  (want, want_grad), (got, got_grad) = for_method('gather'), for_method('matrix')
  numerics.assert_close(got, want, numerics.FEW_OPS)
  numerics.assert_close(got_grad, want_grad, numerics.FEW_OPS)


def relative_rms(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


def test_bfloat16_forward_close_to_float32(tiny):
  """bf16 compute, float32 params/statistics/logits; ~1% off float32 (measured 1.0%)."""
  model, variables = tiny
  bf16 = create_model('resnet_tiny', NUM_CLASSES, dtype=jnp.bfloat16)
  x = images((2, 33, 33, 3), seed=2)
  want, want_aux = jitted(model)(variables, x, jax.random.key(0))
  got, aux = jitted(bf16)(variables, x, jax.random.key(0))
  assert got.dtype == jnp.float32 and aux['c4'].dtype == jnp.bfloat16
  # bfloat16 vs float32 (8-bit mantissa, eps 7.8e-3): a few eps of the scale.
  assert relative_rms(got, want) < 0.03
  assert relative_rms(aux['c4'], want_aux['c4']) < 0.03
  # Train mode: statistics stay float32. (Batch statistics of a 2-image
  # batch, e.g. the image-pooling BN over 2 values, amplify bf16 rounding,
  # so only the backbone's early features are compared.)
  (got, aux), updates = jitted(bf16, train=True)(variables, x, jax.random.key(0))
  (_, want_aux), want_updates = jitted(model, train=True)(variables, x, jax.random.key(0))
  assert got.dtype == jnp.float32
  assert relative_rms(aux['c1'], want_aux['c1']) < 0.03
  for a, b in zip(
    jax.tree_util.tree_leaves(updates['batch_stats']['backbone']['layer1_0']),
    jax.tree_util.tree_leaves(want_updates['batch_stats']['backbone']['layer1_0']),
  ):
    assert a.dtype == jnp.float32
    assert relative_rms(a, b) < 0.03
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(updates))


@pytest.mark.slow  # XLA:CPU drops remat; DINOv2's remat test stays in every run
def test_remat_gives_the_same_gradients(tiny):
  _, variables = tiny
  x = images((2, 33, 33, 3), seed=4)

  def grads(model):
    def loss(params):
      (logits, _), _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      return jnp.mean(logits**2)

    return jax.jit(jax.grad(loss))(variables['params'])

  plain = grads(create_model('resnet_tiny', NUM_CLASSES))
  remat = grads(create_model('resnet_tiny', NUM_CLASSES, remat=True))
  # Two programs (recomputed vs stored activations), per-leaf scale.
  jax.tree_util.tree_map(lambda a, b: numerics.assert_close(a, b, numerics.NETWORK), plain, remat)


def test_model_from_config():
  config = config_lib.base_config()
  config.model.backbone = 'resnet_tiny'
  config.model.dtype = 'bfloat16'
  config.model.output_stride = 8
  config.model.deep_stem = False
  config.model.dropout = 0.3
  config.train.remat = True
  config.data.num_classes = 7
  model = model_from_config(config)
  assert model.num_classes == 7 and model.dtype == jnp.bfloat16 and model.dropout == 0.3
  assert model.backbone.replace_stride_with_dilation == (False, True, True)
  assert model.backbone.remat and not model.backbone.deep_stem
  assert (model.aspp_features, model.low_level_features, model.decoder_features) == (32, 8, 32)
  full = create_model('resnet101', 21)
  assert (full.aspp_features, full.low_level_features, full.decoder_features) == (256, 48, 256)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(backbone='resnet18'), 'resnet18'),
    (dict(output_stride=4), 'output_stride=4'),
    (dict(dtype='float16'), 'float16'),
    (dict(num_classes=0), 'num_classes=0'),
  ],
)
def test_bad_options_are_named(kwargs, match):
  args = dict(backbone='resnet_tiny', num_classes=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    create_model(args.pop('backbone'), args.pop('num_classes'), **args)


def test_width_multiplier_scales_backbone_and_head():
  wide = create_model('resnet_tiny', NUM_CLASSES, width_multiplier=2.0)
  shapes = jax.eval_shape(wide.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))
  params = shapes['params']
  assert params['backbone']['stem_conv3']['kernel'].shape == (3, 3, 16, 32)
  assert params['backbone']['layer4_0']['conv3']['kernel'].shape[-1] == 128 * 4
  assert (wide.aspp_features, wide.low_level_features, wide.decoder_features) == (64, 16, 64)
  with pytest.raises(ValueError, match='width_multiplier=0'):
    create_model('resnet_tiny', NUM_CLASSES, width_multiplier=0)
