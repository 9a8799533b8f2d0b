"""A plain-PyTorch deep-stem ResNet + DeepLabV3+, the parity target.

Written from the method specification (NCHW, torch layers, align_corners
bilinear resizes), with the reference's attribute names so its state dict
has the reference's keys (`backbone.conv1.0.weight`, `head.b4.gap.1.weight`,
`fuse.3.weight`, ...). Widths and depths are arguments so tests can build
small networks; the defaults are the full ResNet-50 DeepLabV3+.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
  """v1.5 bottleneck: the stride sits on the 3x3 conv."""

  def __init__(self, cin, planes, stride, dilation, downsample):
    super().__init__()
    cout = planes * 4
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(
      planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(cout)
    self.downsample = None
    if downsample:
      self.downsample = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(y + shortcut)


class ResNet(nn.Module):
  """Deep-stem (or torchvision 7x7-stem) ResNet; `dilate` replaces the
  strides of layer2..4. `forward` returns `(c1, c4)`."""

  def __init__(
    self,
    blocks=(3, 4, 6, 3),
    widths=(64, 128, 256, 512),
    stem=64,
    dilate=(False, False, True),
    deep_stem=True,
  ):
    super().__init__()
    if deep_stem:
      self.conv1 = nn.Sequential(
        nn.Conv2d(3, stem, 3, 2, 1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(),
        nn.Conv2d(stem, stem, 3, 1, 1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(),
        nn.Conv2d(stem, 2 * stem, 3, 1, 1, bias=False),
      )
      cin = 2 * stem
    else:
      self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
      cin = stem
    self.bn1 = nn.BatchNorm2d(cin)
    dilation = 1
    for i, (n, planes) in enumerate(zip(blocks, widths)):
      stride = 1 if i == 0 else 2
      first_dilation = dilation
      if i > 0 and dilate[i - 1]:
        dilation, stride = dilation * stride, 1
      stage = []
      for j in range(n):
        if j == 0:
          stage.append(
            Bottleneck(cin, planes, stride, first_dilation, stride != 1 or cin != 4 * planes)
          )
        else:
          stage.append(Bottleneck(4 * planes, planes, 1, dilation, False))
        cin = 4 * planes
      setattr(self, f'layer{i + 1}', nn.Sequential(*stage))

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    c1 = self.layer1(x)
    c4 = self.layer4(self.layer3(self.layer2(c1)))
    return c1, c4


def conv_bn_relu(cin, cout, k=1, dilation=1):
  return nn.Sequential(
    nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=False),
    nn.BatchNorm2d(cout),
    nn.ReLU(),
  )


class Pooling(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.gap = nn.Sequential(
      nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )

  def forward(self, x):
    return F.interpolate(self.gap(x), x.shape[-2:], mode='bilinear', align_corners=True)


class ASPP(nn.Module):
  def __init__(self, cin, cout, rates=(6, 12, 18)):
    super().__init__()
    self.b0 = conv_bn_relu(cin, cout)
    self.b1 = conv_bn_relu(cin, cout, 3, rates[0])
    self.b2 = conv_bn_relu(cin, cout, 3, rates[1])
    self.b3 = conv_bn_relu(cin, cout, 3, rates[2])
    self.b4 = Pooling(cin, cout)
    self.project = conv_bn_relu(5 * cout, cout)

  def forward(self, x):
    return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class DeepLabV3Plus(nn.Module):
  def __init__(
    self,
    num_classes,
    blocks=(3, 4, 6, 3),
    widths=(64, 128, 256, 512),
    stem=64,
    aspp=256,
    low=48,
    decoder=256,
    dilate=(False, False, True),
    deep_stem=True,
  ):
    super().__init__()
    self.backbone = ResNet(blocks, widths, stem, dilate, deep_stem)
    self.head = ASPP(4 * widths[3], aspp)
    self.reduce = conv_bn_relu(4 * widths[0], low)
    self.fuse = nn.Sequential(
      *conv_bn_relu(aspp + low, decoder, 3), *conv_bn_relu(decoder, decoder, 3)
    )
    self.classifier = nn.Conv2d(decoder, num_classes, 1)

  def forward(self, x):
    c1, c4 = self.backbone(x)
    return self.decode(c1, c4, x.shape[-2:])

  def decode(self, c1, c4, size):
    """The head on backbone features (DSSN's fp branches call it on
    channel-dropped copies of `c1`, `c4`), logits resized to `size`."""
    a = F.interpolate(self.head(c4), c1.shape[-2:], mode='bilinear', align_corners=True)
    f = self.fuse(torch.cat([self.reduce(c1), a], 1))
    return F.interpolate(self.classifier(f), size, mode='bilinear', align_corners=True)


def randomize(model: nn.Module, image_size: int = 65, seed: int = 0) -> nn.Module:
  """Random weights and random BN statistics; returns the model in eval mode.

  Conv weights and BN affine parameters are drawn at random. The running
  statistics are set to the statistics of a random batch of 8 images (so
  activations stay O(1) whatever the depth), then jittered with the affine
  parameters compensating, so every mean, variance, scale and bias matters
  and a swapped or dropped one changes the output. Last, each residual
  branch's final BN is halved: at full branch scale a random BN-ResNet is
  chaotic, and float32 rounding alone grows to ~1e-3 on the logits of a
  ResNet-50 (torch float32 vs float64), which would swamp a 1e-4 parity
  check; damped it stays ~1e-5, as in trained networks.
  """
  g = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    for m in norms:
      m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
      m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      m.momentum = None  # cumulative average: one batch sets the statistics
      m.reset_running_stats()
    model.train()
    model(torch.randn((8, 3, image_size, image_size), generator=g))
    for m in norms:
      # Jitter the statistics and compensate in the affine parameters, so the
      # network computes the same function with more varied statistics.
      m.momentum = 0.1
      old_std = (m.running_var + m.eps).sqrt()
      shift = torch.randn(m.running_mean.shape, generator=g) * 0.5 * old_std
      m.running_mean.add_(shift)
      m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
      ratio = (m.running_var + m.eps).sqrt() / old_std
      m.bias.add_(m.weight * shift / old_std)
      m.weight.mul_(ratio)
    for m in model.modules():
      if isinstance(m, Bottleneck):  # damp the residual branches
        m.bn3.weight.mul_(0.5)
        m.bn3.bias.mul_(0.5)
  return model.eval()
