"""A plain-PyTorch DINOv2 + DPT (UniMatch V2's model), the parity target.

Written from the authors' description (NCHW, torch layers,
torch's own bicubic `F.interpolate` for the position grid), with the
authors' attribute names so that its state dict has their keys
(`backbone.blocks.0.attn.qkv.weight`, `head.scratch.refinenet1.out_conv.weight`,
`head.scratch.output_conv.2.bias`, ...). Sizes are arguments so tests can
build reduced-depth networks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, t, c = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((a @ v).transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    self.w12 = nn.Linear(dim, 2 * hidden)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    a, b = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(a) * b)


class Block(nn.Module):
  def __init__(self, dim, heads, swiglu):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.ls1 = LayerScale(dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = (SwiGLU if swiglu else Mlp)(dim, 4 * dim)
    self.ls2 = LayerScale(dim)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, 14, 14)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
  def __init__(self, dim, depth, heads, swiglu=False, grid=37):
    super().__init__()
    self.patch_embed = PatchEmbed(dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
    self.mask_token = nn.Parameter(torch.zeros(1, dim))
    self.blocks = nn.ModuleList(Block(dim, heads, swiglu) for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def pos_encoding(self, rows, cols):
    n = self.pos_embed.shape[1] - 1
    if rows * cols == n and rows == cols:
      return self.pos_embed
    g = math.sqrt(n)
    grid = self.pos_embed[:, 1:].reshape(1, int(g), int(g), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
      grid, scale_factor=((rows + 0.1) / g, (cols + 0.1) / g), mode='bicubic', antialias=False
    )
    assert grid.shape[-2:] == (rows, cols)
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat([self.pos_embed[:, :1], grid], dim=1)

  def get_intermediate_layers(self, x, taps):
    rows, cols = x.shape[2] // 14, x.shape[3] // 14
    t = self.patch_embed(x)
    t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
    t = t + self.pos_encoding(rows, cols)
    out = []
    for i, blk in enumerate(self.blocks):
      t = blk(t)
      if i in taps:
        out.append(self.norm(t)[:, 1:])
    return out


class RCU(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv1 = nn.Conv2d(c, c, 3, 1, 1)
    self.conv2 = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Fusion(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.out_conv = nn.Conv2d(c, c, 1)
    self.resConfUnit1 = RCU(c)
    self.resConfUnit2 = RCU(c)

  def forward(self, *xs, size=None):
    out = xs[0]
    if len(xs) == 2:
      out = out + self.resConfUnit1(xs[1])
    out = self.resConfUnit2(out)
    if size is None:
      out = F.interpolate(out, scale_factor=2, mode='bilinear', align_corners=True)
    else:
      out = F.interpolate(out, size=size, mode='bilinear', align_corners=True)
    return self.out_conv(out)


class DPTHead(nn.Module):
  def __init__(self, nclass, dim, features, out_channels):
    super().__init__()
    oc = out_channels
    self.projects = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in oc)
    self.resize_layers = nn.ModuleList(
      [
        nn.ConvTranspose2d(oc[0], oc[0], 4, 4),
        nn.ConvTranspose2d(oc[1], oc[1], 2, 2),
        nn.Identity(),
        nn.Conv2d(oc[3], oc[3], 3, 2, 1),
      ]
    )
    self.scratch = nn.Module()
    for i, c in enumerate(oc):
      setattr(self.scratch, f'layer{i + 1}_rn', nn.Conv2d(c, features, 3, 1, 1, bias=False))
    for i in range(1, 5):
      setattr(self.scratch, f'refinenet{i}', Fusion(features))
    self.scratch.output_conv = nn.Sequential(
      nn.Conv2d(features, features, 3, 1, 1), nn.ReLU(True), nn.Conv2d(features, nclass, 1)
    )

  def forward(self, feats, rows, cols):
    s = self.scratch
    ls = []
    for i, x in enumerate(feats):
      x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], rows, cols)
      x = self.resize_layers[i](self.projects[i](x))
      ls.append(getattr(s, f'layer{i + 1}_rn')(x))
    p = s.refinenet4(ls[3], size=ls[2].shape[2:])
    p = s.refinenet3(p, ls[2], size=ls[1].shape[2:])
    p = s.refinenet2(p, ls[1], size=ls[0].shape[2:])
    p = s.refinenet1(p, ls[0])
    return s.output_conv(p)


class DPT(nn.Module):
  """`forward(x)` -> logits `(N, C, 14h, 14w)`; `masks` `(N, dim)` multiply the taps."""

  def __init__(self, nclass, dim, depth, heads, taps, features, out_channels, swiglu=False):
    super().__init__()
    self.taps = taps
    self.backbone = DINOv2(dim, depth, heads, swiglu)
    self.head = DPTHead(nclass, dim, features, out_channels)

  def forward(self, x, masks=None):
    rows, cols = x.shape[-2] // 14, x.shape[-1] // 14
    feats = self.backbone.get_intermediate_layers(x, self.taps)
    if masks is not None:
      feats = [f * masks[:, None, :] for f in feats]
    out = self.head(feats, rows, cols)
    return F.interpolate(out, (rows * 14, cols * 14), mode='bilinear', align_corners=True)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights at a realistic scale: trunc-normal linears, LayerScale and
  LayerNorm affine away from their 1/0 init, so that every term matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(('ls1.gamma', 'ls2.gamma')):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif 'norm' in name and name.endswith('weight') and p.ndim == 1:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1 or name.endswith(('cls_token', 'mask_token')):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith('pos_embed'):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / fan_in) ** 0.5)
  return model.eval()
