"""Loading a model's variables to evaluate or predict with.

Two sources, as the `python -m dssn_jax.evaluate` and `python -m
dssn_jax.predict` command lines take them:

  a workdir        `--workdir DIR [--checkpoint best|latest|STEP]`: the
                   student and the teacher of one checkpoint, with the
                   workdir's `config.json` (`checkpoint.restore_for_eval`).
  a weights file   `--weights FILE --config configs/X.py`: our `.npz`
                   (`dssn_jax.convert` output) or a reference `.pth`
                   converted on load (`load_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from dssn_jax import checkpoint as ckpt_lib
from dssn_jax import state_dicts
from dssn_jax.models import pretrained


def choose_model(variables: Mapping[str, Any], which_model: str) -> Any:
  """`variables[which_model]` (`teacher` or `student`); converted weights
  holding one model give it whichever is asked."""
  if which_model in variables:
    return variables[which_model]
  if len(variables) == 1:
    return next(iter(variables.values()))
  raise ValueError(f'--model {which_model!r} must be one of {", ".join(sorted(variables))}')


def load_weights(path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`{model name: {'params', 'batch_stats'}}` from `.npz` or a reference `.pth`.

  An `.npz` (`dssn_jax.convert` output) is one model, reported as `student`.
  A `.pth` may be a bare state dict or a reference checkpoint dict holding it
  under `model` (DSSN's `best.pth` / `t_best.pth`, UniMatch V2's `best.pth`)
  or `state_dict`; it is converted with `dssn_jax.models.pretrained.from_torch`, whose
  layout (`model`, `unimatch_v2`) is detected from the keys. A UniMatch V2
  checkpoint also holds its EMA model (`model_ema`), which the authors
  evaluate beside `model`: it is reported as `teacher`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'weights file {path} does not exist')
  ext = os.path.splitext(path)[1].lower()
  if ext == '.npz':
    return {'student': state_dicts.load_npz(path)}
  if ext not in ('.pth', '.pt'):
    raise ValueError(f'weights file {path}: expected a .pth/.pt reference checkpoint or an .npz')
  checkpoint = state_dicts.read_file(path)  # names the file and the extra if torch is missing
  names = {'student': False}
  if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get('model_ema'), Mapping):
    names['teacher'] = True
  return {
    name: pretrained.from_torch(
      checkpoint,
      backbone=config.model.backbone,
      num_classes=int(config.data.num_classes),
      layout=None,
      ema=ema,
    )
    for name, ema in names.items()
  }


def load_for_eval(
  *,
  workdir: str | None = None,
  checkpoint: str | int = 'best',
  weights: str | None = None,
  config: ml_collections.ConfigDict | None = None,
):
  """What the command lines evaluate: `(config, {name: variables}, step)`.

  Either a workdir checkpoint (student and teacher; `config`, if given,
  replaces the workdir's `config.json`, e.g. for another data root), or
  `weights` with `config` (`load_weights`: the student, and the teacher when
  the file holds an EMA model; step None).
  """
  if weights:
    if config is None:
      raise ValueError('--weights needs --config (the model and dataset of the weights)')
    return config, load_weights(weights, config), None
  if not workdir:
    raise ValueError('give --workdir DIR, or --weights FILE with --config')
  saved_config, variables, step = ckpt_lib.restore_for_eval(workdir, checkpoint)
  return (config if config is not None else saved_config), variables, step
