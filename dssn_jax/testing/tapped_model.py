"""A tiny BatchNorm-free segmenter with the tapped-feature contract of the
DINOv2/DPT family, and its PyTorch rendering (same weights), for the method
tests.

Contract (what `dssn_jax.methods` relies on):

    model.feature_dim -> D, the channels of the tapped features
    model.apply({'params': p}, images_nhwc, train=..., perturb=k,
                feature_masks=None | (N, D), perturb_masks=None | (k, N, D),
                rngs={'dropout': key}) -> (logits, aux)

`feature_masks` multiply the tapped features of the main forward (broadcast
over positions); `aux['perturbed']` holds k logit maps of the features
multiplied by `perturb_masks[i]` (drawn Dropout2d-style, p = 0.5, when None).
Here the "encoder" is one 3x3 conv (`backbone`) whose output is the tapped
feature, and the "head" a 3x3 conv, ReLU and a 1x1 classifier, all at input
resolution.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TinyTapped(nn.Module):
  num_classes: int
  feature_dim: int = 8

  @nn.compact
  def __call__(self, x, train=False, perturb=0, feature_masks=None, perturb_masks=None):
    del train
    # Random biases: with zero ones a sample whose channels are all dropped
    # would give class-constant logits (a zero std in DSSN's alignment).
    bias = nn.initializers.normal(0.5)
    f = nn.relu(nn.Conv(self.feature_dim, (3, 3), padding=1, bias_init=bias, name='backbone')(x))
    head = nn.Conv(self.feature_dim, (3, 3), padding=1, bias_init=bias, name='head')
    classifier = nn.Conv(self.num_classes, (1, 1), bias_init=bias, name='classifier')

    def decode(feat):
      return classifier(nn.relu(head(feat)))

    main = f if feature_masks is None else f * feature_masks[:, None, None, :]
    perturbed = []
    for k in range(perturb):
      if perturb_masks is None:
        keep = jax.random.bernoulli(self.make_rng('dropout'), 0.5, (f.shape[0], f.shape[-1]))
        m = keep.astype(f.dtype) * 2.0
      else:
        m = perturb_masks[k]
      perturbed.append(decode(f * m[:, None, None, :]))
    return decode(main), {'perturbed': tuple(perturbed), 'features': f}


def torch_module(params):
  """The same network in PyTorch (NCHW), weights copied from flax `params`."""
  import torch  # pylint: disable=g-import-not-at-top

  def conv(p, padding):
    kernel = np.asarray(p['kernel'], np.float32)  # HWIO
    layer = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], padding=padding)
    with torch.no_grad():
      layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
      layer.bias.copy_(torch.from_numpy(np.array(p['bias'], np.float32)))
    return layer

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = conv(params['backbone'], 1)
      self.head = conv(params['head'], 1)
      self.classifier = conv(params['classifier'], 0)

    def forward(self, x, feature_masks=None):
      f = torch.relu(self.backbone(x))
      if feature_masks is not None:
        f = f * feature_masks[:, :, None, None]
      return self.classifier(torch.relu(self.head(f)))

  return Net()


def init(model, size=8, seed=0):
  return model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))['params']
