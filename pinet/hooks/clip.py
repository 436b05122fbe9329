"""Gradient clipping with ``torch.nn.utils.clip_grad_norm_`` semantics, π-rows included."""

from __future__ import annotations

import torch

from .base import GradHook, Grads, HookContext
from .norm import grad_sqnorms, total_norm

__all__ = ["ClipGradNorm"]


class ClipGradNorm(GradHook):
    """Scale gradients so their norm is at most ``max_norm``.

    Global (default): ``total = sqrt(Σ norms²)``, ``coef = max_norm / (total + 1e-6)``; if
    ``coef < 1`` every gradient (π-rows through their coefficient gradient) is multiplied by it.
    ``per_param=True``: each parameter, and each π-layer by its own ``‖Δ‖``, is clipped alone.
    A non-finite norm raises ``FloatingPointError`` (``error_if_nonfinite``).
    """

    def __init__(self, max_norm: float, per_param: bool = False, error_if_nonfinite: bool = True) -> None:
        max_norm = float(max_norm)
        if not max_norm > 0:
            raise ValueError(f"ClipGradNorm: max_norm must be > 0, got {max_norm!r}")
        self.max_norm = max_norm
        self.per_param = bool(per_param)
        self.error_if_nonfinite = bool(error_if_nonfinite)

    def update(self, grads: Grads, state, ctx: HookContext):
        sq = grad_sqnorms(grads, ctx)
        groups = [[k] for k in grads] if self.per_param else [list(grads)]
        out = dict(grads)
        for names in groups:
            total = total_norm({k: sq[k] for k in names})
            if self.error_if_nonfinite and not torch.isfinite(total):
                raise FloatingPointError(f"ClipGradNorm: non-finite gradient norm in {names}")
            coef = self.max_norm / (float(total) + 1e-6)
            if coef < 1.0:
                for k in names:
                    g = out[k]
                    out[k] = g.scale(coef) if hasattr(g, "scale") else g * coef
        return out, state
