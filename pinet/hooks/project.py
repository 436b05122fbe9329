"""Project-to-r: the finite π-net's gradient projection onto the span of ``Ω``."""

from __future__ import annotations

from torch import Tensor

from .base import GradHook, Grads, HookContext

__all__ = ["ProjectToR"]


class ProjectToR(GradHook):
    """Replace the gradient of every parameter owned by a finite layer with a
    :class:`~pinet.state.FinPiState` by ``Ω (ΩᵀΩ)⁻¹ Ωᵀ ∇`` (factored, never the n × n projector).

    Applies to weights (n, n_in) and biases (n,) of non-output finite layers; the output layer
    has no projector and is left alone.
    """

    def update(self, grads: Grads, state, ctx: HookContext):
        out = dict(grads)
        for proj, owned in ctx.projectors.values():
            for name in owned:
                g = out.get(name)
                if isinstance(g, Tensor):
                    out[name] = proj.project(g)
        return out, state
