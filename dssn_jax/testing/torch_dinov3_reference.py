"""A PyTorch DINOv3 + DPT: Hugging Face `transformers`' `DINOv3ViTModel` under
UniMatch V2's DPT head (`torch_dinov2_reference.DPTHead`), with random weights.

The target of the DINOv3 parity tests (`tests/test_dinov3_parity.py`) and the
PyTorch side of `benchmarks/step_speed.py --method unimatch_v2 --torch` on a
`dinov3_*` backbone. Needs `torch` and `transformers` (the `test` extra).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from dssn_jax.models import dinov3
from dssn_jax.testing import torch_dinov2_reference

PREFIX = 1 + dinov3.STORAGE_TOKENS  # class + storage tokens


def encoder(backbone: str, depth: int | None = None, rope_rescale: float | None = None):
  """`DINOv3ViTModel` of `backbone`'s width, heads and FFN (`dinov3.ENCODERS`),
  `depth` blocks (None: the named depth), eager attention; `rope_rescale`
  is transformers' `pos_embed_rescale` (training mode only; None: off)."""
  spec = dinov3.ENCODERS[backbone]
  gated = spec.ffn != 'mlp'
  config = transformers.DINOv3ViTConfig(
    hidden_size=spec.dim,
    num_hidden_layers=depth or spec.depth,
    num_attention_heads=spec.heads,
    intermediate_size=dinov3.ffn_hidden(spec.dim, spec.ffn, spec.ffn_ratio),
    hidden_act='silu' if gated else 'gelu',
    use_gated_mlp=gated,
    num_register_tokens=dinov3.STORAGE_TOKENS,
    layer_norm_eps=dinov3.NORM_EPS,
    rope_theta=dinov3.ROPE_BASE,
    query_bias=spec.qkv_bias,
    value_bias=spec.qkv_bias,
    key_bias=False,
    patch_size=dinov3.PATCH,
    pos_embed_rescale=rope_rescale,
    attn_implementation='eager',
  )
  return transformers.DINOv3ViTModel(config)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights at a realistic scale (`DINOv3ViTModel` names): LayerScale
  in [0.5, 1.5] (not its 1e-5 init, so every block matters), LayerNorm
  weights near 1, small biases, tokens N(0, 0.5), linears N(0, 1/fan_in)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('lambda1'):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif 'norm' in name and name.endswith('weight'):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith(('cls_token', 'register_tokens', 'mask_token')):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
  return model


def tapped(model: nn.Module, x: torch.Tensor, taps) -> list[torch.Tensor]:
  """Meta's `get_intermediate_layers(x, n=taps, norm=True)` on a
  `DINOv3ViTModel`: the final norm of each tapped block's output, class and
  storage tokens dropped. The blocks are called one by one, as
  `DINOv3ViTModel.forward` calls them (`output_hidden_states=True` would
  give the same tensors through output-capturing hooks that double the
  step's CPU time)."""
  hidden = model.embeddings(x.to(model.embeddings.patch_embeddings.weight.dtype))
  position = model.rope_embeddings(x)
  out = []
  for i, layer in enumerate(model.model.layer[: max(taps) + 1]):
    hidden = layer(hidden, position_embeddings=position)
    if i in taps:
      out.append(model.norm(hidden)[:, PREFIX:])
  return out


class DPT(nn.Module):
  """`forward(x, masks=None)` -> logits `(N, C, 16h, 16w)`; `masks` `(N, dim)`
  multiply the tapped features (UniMatch V2's complementary dropout)."""

  def __init__(self, backbone: str, num_classes: int, depth=None, taps=None, rope_rescale=None):
    super().__init__()
    spec, size = dinov3.ENCODERS[backbone], dinov3.HEAD_SIZES[backbone]
    self.taps = tuple(taps or spec.taps)
    self.backbone = encoder(backbone, depth, rope_rescale)
    self.head = torch_dinov2_reference.DPTHead(
      num_classes, spec.dim, size['features'], size['out_channels']
    )

  def forward(self, x, masks=None):
    rows, cols = x.shape[-2] // dinov3.PATCH, x.shape[-1] // dinov3.PATCH
    feats = tapped(self.backbone, x, self.taps)
    if masks is not None:
      feats = [f * masks[:, None, :] for f in feats]
    out = self.head(feats, rows, cols)
    size = (rows * dinov3.PATCH, cols * dinov3.PATCH)
    return F.interpolate(out, size, mode='bilinear', align_corners=True)
