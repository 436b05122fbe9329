"""Gradient accumulation over micro-batches."""

from __future__ import annotations

from ..rows import PiRows
from .base import GradHook, Grads, HookContext

__all__ = ["Accumulate"]


class Accumulate(GradHook):
    """Only every ``steps``-th ``step()`` updates; earlier calls stash their gradients.

    Ordinary gradients are summed and π-rows concatenated, so the update is that of the summed
    loss. The wrapper clears the consumed gradients after a stashing call, so a loop that calls
    ``zero_grad()`` every iteration and one that does not give the same result. Place it before
    clipping to clip the accumulated gradient (the usual choice).
    """

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Accumulate: steps must be a positive int, got {steps!r}")
        self.steps = steps

    def init(self, ctx: HookContext):
        return {"count": 0, "grads": {}}

    def update(self, grads: Grads, state, ctx: HookContext):
        acc = dict(state["grads"])
        for k, g in grads.items():
            prev = acc.get(k)
            if prev is None:
                acc[k] = g if isinstance(g, PiRows) else g.clone()
            else:
                acc[k] = prev.cat(g) if isinstance(g, PiRows) else prev + g
        count = state["count"] + 1
        if count < self.steps:
            return None, {"count": count, "grads": acc}
        return acc, self.init(ctx)

    def state_to_dict(self, state):
        grads = {k: {"A": g.A, "B": g.B, "coef": g.coef, "_pi_rows": True} if isinstance(g, PiRows) else g for k, g in state["grads"].items()}
        return {"count": state["count"], "grads": grads}

    def state_from_dict(self, data, ctx: HookContext):
        grads = {}
        for k, g in data["grads"].items():
            grads[k] = PiRows(g["A"], g["B"], g["coef"]) if isinstance(g, dict) else g
        return {"count": int(data["count"]), "grads": grads}
