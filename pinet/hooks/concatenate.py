"""Concatenate: turn the rows each infinite layer captured during backward into its π-gradient."""

from __future__ import annotations

from .base import GradHook, Grads, HookContext

__all__ = ["Concatenate"]


class Concatenate(GradHook):
    """Gather each :class:`~pinet.state.PiState`'s captured rows (one block per backward pass,
    concatenated, as ``.grad`` sums) into ``grads[state_name]`` as :class:`~pinet.state.PiRows`
    with unit coefficient gradient.

    The wrapper then appends those rows to the state (coefficient 0) and gives ``c`` the indicator
    gradient of the new rows, so the inner optimizer performs the π-update in coefficient space.
    """

    def update(self, grads: Grads, state, ctx: HookContext):
        out = dict(grads)
        for name, pi_state in ctx.pi_states.items():
            rows = pi_state.pending_rows()
            if rows is None:
                continue
            prev = out.get(name)
            out[name] = rows if prev is None else prev.cat(rows)
        return out, state
