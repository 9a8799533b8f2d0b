r"""Command line: a trained model -> the authors' PyTorch layout or StableHLO.

    python -m dssn_jax.export --workdir DIR --to torch --out model.pth \
        [--model teacher|student] [--checkpoint best|latest|STEP] [--layout L]
    python -m dssn_jax.export --workdir DIR --to stablehlo --out model.shlo \
        [--sizes 512x512,...] [--platforms cpu,cuda,tpu] [--licence TEXT]

`--weights FILE --config configs/X.py` exports converted weights instead
of a workdir checkpoint. The checkpoint is restored whole on this host's
first device, whatever wrote it (one CPU is enough). docs/export.md
describes the layouts and the file.
"""

from __future__ import annotations

import os

from absl import flags

from dssn_jax import cli, evaluate, loading
from dssn_jax.errors import ConfigError
from dssn_jax.export import stablehlo, torch_state


def _define_flags():
  cli.define_model_flags()
  flags.adopt_module_key_flags(cli)
  flags.DEFINE_enum('to', None, ['torch', 'stablehlo'], 'What to write.')
  flags.DEFINE_string(
    'out', None, 'The file to write (.pth, .safetensors; hf_dinov2: else a model folder).'
  )
  flags.DEFINE_enum('model', 'teacher', list(evaluate.MODEL_NAMES), 'Which network.')
  flags.DEFINE_string(
    'layout',
    None,
    '--to torch: ResNet models: model (default), dssn (backbone); DINOv2 models:'
    ' unimatch_v2 (default), dinov2 (hub encoder), hf_dinov2 (Hugging Face encoder).',
  )
  flags.DEFINE_string(
    'sizes', None, '--to stablehlo: HxW[,HxW...] image sizes (default: the eval crop).'
  )
  flags.DEFINE_list('platforms', list(stablehlo.PLATFORMS), '--to stablehlo: target platforms.')
  flags.DEFINE_string(
    'licence', None, "--to stablehlo: the pretrained weights' terms (default: from the config)."
  )
  flags.DEFINE_bool(
    'allow_test_models',
    False,
    "Tests only: write test networks (resnet_tiny, ...) the authors' code cannot build.",
  )
  flags.mark_flags_as_required(['to', 'out'])


def run(
  *,
  to: str,
  out: str,
  workdir: str | None = None,
  checkpoint: str | int = 'best',
  which_model: str = 'teacher',
  weights: str | None = None,
  config=None,
  layout: str | None = None,
  sizes: str | None = None,
  platforms=stablehlo.PLATFORMS,
  licence: str | None = None,
  allow_test_models: bool = False,
) -> str:
  """Loads a checkpoint (or weights) and writes the export; returns its path."""
  config, variables, step = loading.load_for_eval(
    workdir=workdir, checkpoint=checkpoint, weights=weights, config=config
  )
  if to == 'torch':
    obj = torch_state.export_state(
      config,
      variables,
      which_model=which_model,
      layout=layout,
      step=int(step or 0),
      allow_test_models=allow_test_models,
    )
    hf = config.model.backbone if layout == 'hf_dinov2' else None
    return torch_state.save(obj, out, hf_backbone=hf)
  if layout is not None:
    raise ConfigError('--layout is for --to torch')
  crop = int(config.data.eval_crop_size or config.data.crop_size)
  about = {'which': which_model, 'step': step, 'source': os.path.abspath(workdir or weights)}
  return stablehlo.export_program(
    config,
    loading.choose_model(variables, which_model),
    out,
    sizes=stablehlo.parse_sizes(sizes, crop),
    platforms=tuple(platforms),
    about=about,
    licence=licence,
  )


def main(argv):
  cli.start_command(argv)
  f = flags.FLAGS
  path = run(
    to=f.to,
    out=f.out,
    workdir=f.workdir,
    checkpoint=f.checkpoint,
    which_model=f.model,
    weights=f.weights,
    config=f.config,
    layout=f.layout,
    sizes=f.sizes,
    platforms=f.platforms,
    licence=f.licence,
    allow_test_models=f.allow_test_models,
  )
  files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in os.listdir(path)]
  size = sum(os.path.getsize(f) for f in files)
  print(f'wrote {path} ({size / 1e6:.1f} MB)', flush=True)


if __name__ == '__main__':
  cli.run_command(main, _define_flags)
