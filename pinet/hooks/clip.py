"""Gradient clipping with ``torch.nn.utils.clip_grad_norm_`` semantics, π-rows included."""

from __future__ import annotations

import math
from numbers import Real


from .base import GradHook, Grads, HookContext
from .norm import grad_sqnorms, remember_sqnorm, sqnorm_vector

__all__ = ["ClipGradNorm"]


class ClipGradNorm(GradHook):
    """Scale gradients so their norm is at most ``max_norm``.

    Global (default): ``total = sqrt(Σ norms²)``, ``coef = max_norm / (total + 1e-6)``; if
    ``coef < 1`` every gradient (π-rows through their coefficient gradient) is multiplied by it.
    ``per_param=True``: each parameter, and each π-layer by its own ``‖Δ‖``, is clipped alone.
    A non-finite norm raises ``FloatingPointError`` (``error_if_nonfinite``).
    """

    def __init__(self, max_norm: float, per_param: bool = False, error_if_nonfinite: bool = True) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, Real) or not math.isfinite(max_norm) or not max_norm > 0:
            raise ValueError(f"ClipGradNorm: max_norm must be a finite number > 0, got {max_norm!r}")
        for name, v in (("per_param", per_param), ("error_if_nonfinite", error_if_nonfinite)):
            if not isinstance(v, bool):
                raise ValueError(f"ClipGradNorm: {name} must be a bool, got {v!r}")
        self.max_norm = float(max_norm)
        self.per_param = per_param
        self.error_if_nonfinite = error_if_nonfinite

    def update(self, grads: Grads, state, ctx: HookContext):
        sq = grad_sqnorms(grads, ctx)
        names = list(grads)
        # All squared norms in one float64 vector: one conversion and one read-back per step,
        # not one per parameter (per-parameter clipping of an 11-parameter net spent more time in
        # those small calls than in the norms themselves).
        vals = sqnorm_vector(sq)  # keyed and ordered like grads
        overall = float(vals.sum().sqrt())
        # What is actually clipped (after accumulation, if any): the wrapper reports it.
        ctx.stats.setdefault("grad_norm_before_clip", overall)
        if self.per_param:
            groups, totals = [[k] for k in names], vals.sqrt().tolist()
        else:
            groups, totals = [names], [overall]
        out = dict(grads)
        for group, total in zip(groups, totals):
            if self.error_if_nonfinite and not math.isfinite(total):
                raise FloatingPointError(f"ClipGradNorm: non-finite gradient norm in {group}")
            coef = self.max_norm / (total + 1e-6)
            if coef < 1.0:
                for k in group:
                    out[k] = out[k] * coef
                    remember_sqnorm(ctx, k, out[k], sq[k] * coef**2)
        return out, state
