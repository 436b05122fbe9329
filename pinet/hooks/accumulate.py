"""Gradient accumulation over micro-batches."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

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
        if not grads:
            # A step() with no gradient at all (no backward() since the last step, or after
            # zero_grad) would count as a micro-batch and apply the update early, from fewer.
            raise RuntimeError(
                "Accumulate: step() got no gradients: call backward() before every step() (this call would "
                f"count as micro-batch {state['count'] + 1} of {self.steps} without adding anything); nothing changed"
            )
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
        where = "Accumulate.state_from_dict"
        if not isinstance(data, dict) or set(data) != {"count", "grads"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where}: expected a dict with keys 'count' and 'grads', got {got}")
        count = data["count"]
        # count micro-batches are stashed; the next step() is number count + 1 of `steps`.
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or not 0 <= count < self.steps:
            raise ValueError(f"{where}: count must be an int in [0, {self.steps}) for Accumulate({self.steps}), got {count!r}")
        if not isinstance(data["grads"], dict):
            raise ValueError(f"{where}: grads must be a dict of name -> gradient, got {type(data['grads']).__name__}")
        if bool(count) != bool(data["grads"]):
            raise ValueError(f"{where}: count={count} with {len(data['grads'])} stashed gradients (a stash is empty exactly when count is 0)")
        grads = {}
        for k, g in data["grads"].items():
            if isinstance(g, dict):
                if not {"A", "B", "coef"} <= set(g) or not all(isinstance(g[n], Tensor) for n in ("A", "B", "coef")):
                    raise ValueError(f"{where}: stashed π-rows {k!r} must be a dict of tensors 'A', 'B', 'coef'")
                try:
                    g = PiRows(g["A"], g["B"], g["coef"])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{where}: stashed π-rows {k!r}: {e}") from e
            elif not isinstance(g, Tensor):
                raise ValueError(f"{where}: stashed gradient {k!r} must be a tensor or π-rows, got {type(g).__name__}")
            parts = tuple(g) if isinstance(g, PiRows) else (g,)
            if any(t.is_meta for t in parts):
                raise ValueError(f"{where}: stashed gradient {k!r} is on the meta device (it has no values)")
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in parts):
                # A NaN stash would fail every later step() (the norm check) until the wrapper is rebuilt.
                raise ValueError(f"{where}: stashed gradient {k!r} is not finite")
            grads[k] = g
        return {"count": int(count), "grads": grads}
