"""`python -m dssn_jax.models --summary BACKBONE --num-classes 21`.

Prints the parameter count of a DeepLabV3+ (the reference logs 59.5M for
ResNet-101 with 21 classes, 40.5M for ResNet-50), computed from shapes
only, so nothing is compiled or run.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dssn_jax.models import BACKBONES, create_model


def variable_shapes(model, image_size: int = 65):
  """Abstract `{'params', 'batch_stats'}` of `model` (no compute)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def summary(backbone: str, num_classes: int, **options) -> dict[str, int]:
  """Parameter counts (`params` only, as torch's `parameters()`) by part."""
  shapes = variable_shapes(create_model(backbone, num_classes, **options))
  params = shapes['params']
  out = {name: count(sub) for name, sub in params.items()}
  out['total'] = count(params)
  out['batch_stats'] = count(shapes['batch_stats'])
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
    choices=sorted(BACKBONES),
    help='backbone to summarize',
  )
  parser.add_argument('--num-classes', type=int, default=21)
  parser.add_argument('--output-stride', type=int, default=16, choices=(8, 16))
  parser.add_argument(
    '--torchvision-stem', action='store_true', help='7x7 stem instead of the deep stem'
  )
  args = parser.parse_args(argv)
  from dssn_jax import xla_flags  # pylint: disable=g-import-not-at-top

  xla_flags.set_default_cpu_flags()
  counts = summary(
    args.summary,
    args.num_classes,
    output_stride=args.output_stride,
    deep_stem=not args.torchvision_stem,
  )
  print(
    f'DeepLabV3+ {args.summary}, {args.num_classes} classes, output stride {args.output_stride}'
  )
  for name, n in counts.items():
    if name not in ('total', 'batch_stats'):
      print(f'  {name:<12s} {n:>12,d}')
  print(
    f'Total params: {counts["total"] / 1e6:.1f}M ({counts["total"]:,d}); '
    f'BN running statistics: {counts["batch_stats"]:,d}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
