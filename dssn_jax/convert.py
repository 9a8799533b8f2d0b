"""Command line: PyTorch weights -> dssn_jax variables (.npz).

    python -m dssn_jax.convert resnet101.pth r101.npz --layout dssn
    python -m dssn_jax.convert best.pth model.npz     # layout detected from the keys

The layouts of every backbone family come from `dssn_jax.models.registry`
(ResNet: `models.resnet_weights`; DINOv2: `models.dinov2_weights`); without
`--layout` the layout is detected from the keys, and a file no family
recognises fails with the layouts listed. The conversion itself is
`dssn_jax.models.pretrained.from_torch`; the way back, a trained model to
these layouts, is `python -m dssn_jax.export --to torch`.
"""

from __future__ import annotations

import argparse
import sys

from dssn_jax import xla_flags
from dssn_jax.models import pretrained, registry
from dssn_jax.state_dicts import flatten, read_state_dict, save_npz


def main(argv=None) -> int:
  layouts = '; '.join(
    f'{lay.name}: {lay.description}' for f in registry.families() for lay in f.layouts
  )
  parser = argparse.ArgumentParser(
    prog='python -m dssn_jax.convert',
    description='Convert a PyTorch state dict (.pth) or Hugging Face .safetensors into'
    ' dssn_jax variables (.npz).',
  )
  parser.add_argument('src', help='the .pth / .safetensors file')
  parser.add_argument('out', help='output .npz path')
  parser.add_argument(
    '--layout',
    default=None,
    choices=registry.layout_names(),
    help=f'default: detected from the keys. {layouts}',
  )
  parser.add_argument(
    '--backbone',
    default=None,
    choices=registry.backbone_names(),
    help='default: inferred from the keys',
  )
  parser.add_argument(
    '--num-classes',
    type=int,
    default=None,
    help='classes of a whole model (default: from its last conv)',
  )
  parser.add_argument(
    '--ema', action='store_true', help="a UniMatch V2 checkpoint's model_ema instead of model"
  )
  args = parser.parse_args(argv)
  xla_flags.set_default_cpu_flags()
  try:
    state = read_state_dict(args.src, ema=args.ema)
    if args.layout is None:
      args.layout = registry.detect_layout(state)
      print(f'layout {args.layout} (detected from the keys)')
    variables = pretrained.from_torch(
      state, backbone=args.backbone, num_classes=args.num_classes, layout=args.layout
    )
  except (ValueError, FileNotFoundError, ImportError) as e:  # ConversionError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2  # a user error (cli.USER_ERROR_STATUS)
  path = save_npz(variables, args.out)
  n = sum(v.size for _, v in flatten(variables['params']))
  print(f'wrote {path}: {n / 1e6:.2f}M params ({args.layout} layout)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
