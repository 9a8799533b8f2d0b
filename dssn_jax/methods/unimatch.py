"""UniMatch (CVPR 2023): the student labels its own views.

The iteration (docs/method.md "UniMatch"), DSSN's without the EMA teacher
and the alignment terms:

1. student in eval mode (running BN statistics, no gradient) on the mix
   partner's weak view `m_w` -> `T_m`;
2. student on concat(x, u_w) with one perturbed copy -> `P_x, P_w, P_fp`;
3. student on concat(u_s1, u_s2) (cutmixed with `m_s1`, `m_s2`) -> `P_s1, P_s2`;
4. per view k: `T_k = where(box_k, T_m, P_w)` (P_w detached), labels
   `argmax T_k`, mask `max softmax(T_k) >= 0.95`; the fp branch learns
   `argmax P_w` under the same rule on `P_w`;
5. total `(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`.

The loss and its shared forwards are DSSN's (`methods.dssn.loss`), which
this module reaches with `teacher='student'`: only the targets differ.
"""

from __future__ import annotations

import dataclasses

import jax

from dssn_jax.methods import base, common, dssn
from dssn_jax.methods.base import knob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(dssn.Settings):
  """DSSN's knobs with UniMatch's presets: one fp branch, no alignment, 0.95."""

  sup: float = knob('loss.sup', 0.5)
  strong: float = knob('loss.strong', 0.125)
  fp: float = knob('loss.fp', 0.25)
  align_image: float = knob('loss.align_image', 0.0)
  align_feature: float = knob('loss.align_feature', 0.0)
  fp_branches: int = knob('model.fp_branches', 1)
  pseudo_label: str = knob('loss.pseudo_label', 'fixed', choices=('class_aware', 'fixed'))


def prepare(state, batch, rng, ctx):
  """Step 1: `T_m` from the eval-mode student, plus DSSN's `prepare_views`."""
  s, model = ctx.settings, ctx.model
  out = dssn.prepare_views(state, batch, rng, ctx)
  if dssn.flags(s)['strong_terms']:

    def one(mb):
      t_m, _, _ = common.forward(
        model, state.params, state.batch_stats, common.normalized(mb['m_w']), train=False
      )
      return t_m

    t_m = ctx.map_micro(one, {'m_w': batch['m_w']})
    out['t_m'] = jax.lax.stop_gradient(t_m)
    for k in range(s.strong_views):
      out[f'box_s{k}'] = batch[common.VIEW_KEYS[k][2]]
  return out, state.teacher_batch_stats


loss = dssn.loss


base.register(base.Method('unimatch', Settings, prepare, loss))
