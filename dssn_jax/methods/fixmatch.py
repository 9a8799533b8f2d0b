"""FixMatch: one cutmixed strong view, labels from the student's own weak view.

UniMatch's iteration (`methods.unimatch`) with one strong view and no
feature-perturbed branch: total `(L_x + L_s) / 2`, fixed threshold 0.95.
"""

from __future__ import annotations

from dssn_jax.methods import unimatch

PRESET = dict(
  sup=0.5,
  strong=0.5,
  fp=0.0,
  align_image=0.0,
  align_feature=0.0,
  fp_branches=0,
  strong_views=1,
  pseudo_label='fixed',
  threshold=0.95,
  teacher='student',
  mix_partner='same',
  ema_schedule='student',
  comp_drop=False,
  fp_masks='independent',
)

prepare = unimatch.prepare
loss = unimatch.loss
