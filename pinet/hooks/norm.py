"""Gradient norms: Euclidean for ordinary tensors, ``tr(Aᵀ K A)`` for π-rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ..state import PiRows
from .base import GradHook, Grads, HookContext

__all__ = ["grad_sqnorms", "total_norm", "GradNorm"]


def grad_sqnorms(grads: Grads) -> dict[str, Tensor]:
    """Squared norm of each gradient: ``‖g‖²`` for tensors, ``‖Δ‖²`` (spec) for :class:`PiRows`.

    Returns 0-dim tensors (float32 or wider) keyed like ``grads``.
    """
    out = {}
    for name, g in grads.items():
        if isinstance(g, PiRows):
            out[name] = g.sqnorm()
        else:
            g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
            out[name] = g.square().sum()
    return out


def total_norm(sqnorms: dict[str, Tensor]) -> Tensor:
    """``sqrt(Σ norms²)`` as a float64 0-dim tensor (0 when empty)."""
    if not sqnorms:
        return torch.zeros((), dtype=torch.float64)
    vals = [v.to(torch.float64).cpu() for v in sqnorms.values()]
    return torch.stack(vals).sum().sqrt()


class GradNorm(GradHook):
    """Record the total gradient norm in ``ctx.stats["grad_norm"]`` and, by default, raise
    ``FloatingPointError`` when it is NaN or inf (the step is then abandoned untouched, like
    ``clip_grad_norm_(error_if_nonfinite=True)``)."""

    def __init__(self, error_if_nonfinite: bool = True) -> None:
        self.error_if_nonfinite = bool(error_if_nonfinite)

    def update(self, grads: Grads, state, ctx: HookContext):
        sq = grad_sqnorms(grads)
        total = total_norm(sq)
        ctx.stats["grad_norm"] = float(total)
        if self.error_if_nonfinite and not torch.isfinite(total):
            bad = [k for k, v in sq.items() if not torch.isfinite(v)]
            raise FloatingPointError(
                f"non-finite gradient norm ({float(total)}) in {bad}; the step was not applied "
                "and no rows were appended"
            )
        return grads, state
