"""`python -m dssn_jax.models --summary BACKBONE --num-classes 21`.

Prints the parameter counts of a backbone's segmenter: encoder (the
`backbone` subtree), head (everything else) and total, plus each top-level
module. The reference logs 59.5M for DeepLabV3+ ResNet-101 with 21 classes
(40.5M for ResNet-50); UniMatch V2's log has 86.6M + 10.9M = 97.5M for
DINOv2-B + DPT. Counts come from shapes only (`jax.eval_shape`), so nothing
is compiled or run. The backbones are those of `dssn_jax.models.registry`.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from dssn_jax import xla_flags
from dssn_jax.models import create_model, registry


def variable_shapes(model, backbone: str = 'resnet101'):
  """Abstract variables of `model` (no compute)."""
  return registry.variable_shapes(model, backbone)


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def summary(backbone: str, num_classes: int, **options) -> dict[str, int]:
  """Parameter counts (`params` only, as torch's `parameters()`) by part.

  Keys: each top-level module (`backbone`, `head`, ...), `encoder` (=
  `backbone`), `decoder` (everything else: the head that learns at
  `lr * lr_multi`), `total`, and `batch_stats` (BN running statistics; 0
  without BatchNorm).
  """
  shapes = variable_shapes(create_model(backbone, num_classes, **options), backbone)
  params = shapes['params']
  out = {name: count(sub) for name, sub in params.items()}
  out['encoder'] = count(params.get('backbone', {}))
  out['total'] = count(params)
  out['decoder'] = out['total'] - out['encoder']
  out['batch_stats'] = count(shapes.get('batch_stats', {}))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m dssn_jax.models',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    '--summary',
    metavar='BACKBONE',
    required=True,
    choices=registry.backbone_names(),
    help=f'backbone to summarize: {", ".join(registry.backbone_names())}',
  )
  parser.add_argument('--num-classes', type=int, default=21)
  parser.add_argument(
    '--output-stride', type=int, default=16, choices=(8, 16), help='ResNet backbones only'
  )
  parser.add_argument(
    '--torchvision-stem',
    action='store_true',
    help='7x7 stem instead of the deep stem (ResNet backbones only)',
  )
  args = parser.parse_args(argv)
  xla_flags.set_default_cpu_flags()

  family = registry.family_of(args.summary)
  options = {}
  title = f'{family.title} {args.summary}, {args.num_classes} classes'
  if family.name == 'resnet':
    options = dict(output_stride=args.output_stride, deep_stem=not args.torchvision_stem)
    title += f', output stride {args.output_stride}'
  counts = summary(args.summary, args.num_classes, **options)
  print(title)
  for name, n in counts.items():
    if name not in ('encoder', 'decoder', 'total', 'batch_stats'):
      print(f'  {name:<12s} {n:>12,d}')
  print(
    f'Encoder {counts["encoder"] / 1e6:.1f}M + head {counts["decoder"] / 1e6:.1f}M'
    f' = {counts["total"] / 1e6:.1f}M params'
  )
  print(
    f'Total params: {counts["total"] / 1e6:.1f}M ({counts["total"]:,d}); '
    f'BN running statistics: {counts["batch_stats"]:,d}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
