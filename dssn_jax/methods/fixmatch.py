"""FixMatch: one cutmixed strong view, labels from the student's own weak view.

UniMatch's iteration (`methods.unimatch`) with one strong view and no
feature-perturbed branch: total `(L_x + L_s) / 2`, fixed threshold 0.95.
"""

from __future__ import annotations

import dataclasses

from dssn_jax.methods import base, dssn, unimatch
from dssn_jax.methods.base import knob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(dssn.Settings):
  """DSSN's knobs with FixMatch's presets: one strong view, no fp branch."""

  sup: float = knob('loss.sup', 0.5)
  strong: float = knob('loss.strong', 0.5)
  fp: float = knob('loss.fp', 0.0)
  align_image: float = knob('loss.align_image', 0.0)
  align_feature: float = knob('loss.align_feature', 0.0)
  fp_branches: int = knob('model.fp_branches', 0)
  strong_views: int = 1
  pseudo_label: str = knob('loss.pseudo_label', 'fixed', choices=('class_aware', 'fixed'))


base.register(base.Method('fixmatch', Settings, unimatch.prepare, unimatch.loss))
