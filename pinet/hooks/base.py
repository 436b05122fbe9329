"""Gradient-transform hooks: the contract shared by every hook of :class:`PiOptimizerWrapper`.

Modelled on optax's ``GradientTransformation``: a hook has explicit state created by
:meth:`GradHook.init` and a pure :meth:`GradHook.update` that maps gradients to gradients. The
wrapper threads the state, commits it only when the whole chain succeeded, and writes the final
gradients back. Gradients are a :data:`Grads` mapping from names to

* ``Tensor``: the gradient of the ordinary parameter of that name (``model.named_parameters()``);
* :class:`~pinet.state.PiRows`: the π-gradient of the :class:`~pinet.state.PiState` of that
  name (``model.named_modules()``), i.e. rows to append with their coefficient gradient.

Hooks must not modify tensors in place: a step that raises must leave everything as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from torch import Tensor, nn

from ..state import FinPiState, PiRows, PiState

__all__ = ["Grads", "HookContext", "GradHook"]

Grads = dict[str, Union[Tensor, PiRows]]


@dataclass
class HookContext:
    """What hooks see of the model, discovered once through its state modules.

    Attributes:
        params: ordinary parameters by name (π-coefficients ``*.c`` included).
        pi_states: :class:`PiState` modules by name.
        projectors: :class:`FinPiState` modules by name, each with the names of the parameters
            (its owner's own ``weight``/``bias``) whose gradients it projects.
        stats: per-step values a hook wants to report (e.g. ``"grad_norm"``); reset every step.
        cache: per-step memo shared by hooks (e.g. gradient norms); reset every step.
    """

    params: dict[str, nn.Parameter]
    pi_states: dict[str, PiState]
    projectors: dict[str, tuple[FinPiState, list[str]]]
    stats: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> "HookContext":
        """Walk ``model`` once: parameters, π-states, and finite projectors with their owners."""
        params = dict(model.named_parameters())
        pi_states: dict[str, PiState] = {}
        projectors: dict[str, tuple[FinPiState, list[str]]] = {}
        for name, module in model.named_modules():
            if isinstance(module, PiState):
                pi_states[name] = module
            for child_name, child in module.named_children():
                if isinstance(child, FinPiState):
                    owned = [_join(name, p) for p, _ in module.named_parameters(recurse=False)]
                    projectors[_join(name, child_name)] = (child, owned)
        return cls(params, pi_states, projectors)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class GradHook:
    """One gradient transform. Subclasses implement :meth:`update` (and :meth:`init` if stateful).

    ``update(grads, state, ctx)`` returns ``(new_grads, new_state)``; returning ``None`` as
    ``new_grads`` ends the chain and skips the optimizer update for this ``step()`` (used by
    :class:`~pinet.hooks.Accumulate`).
    """

    def init(self, ctx: HookContext) -> Any:
        """Initial state (default: ``None``)."""
        return None

    def update(self, grads: Grads, state: Any, ctx: HookContext) -> tuple[Grads | None, Any]:
        raise NotImplementedError

    def state_to_dict(self, state: Any) -> Any:
        """Serialisable form of ``state`` for ``state_dict`` (tensors, numbers, dicts, lists)."""
        return state

    def state_from_dict(self, data: Any, ctx: HookContext) -> Any:
        """Inverse of :meth:`state_to_dict`."""
        return data

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
