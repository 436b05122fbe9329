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

from ..rows import PiRows
from ..state import FinPiState, PiState, _check_unit_rows, owned_parameters

__all__ = ["Grads", "HookContext", "GradHook", "Chain", "chain"]

Grads = dict[str, Union[Tensor, PiRows]]


@dataclass
class HookContext:
    """What hooks see of the model, discovered once through its state modules.

    Attributes:
        params: ordinary parameters by name (π-coefficients ``*.c`` included).
        pi_states: :class:`PiState` modules by name.
        projectors: :class:`FinPiState` modules by name, each with the names of the parameters
            whose gradients it projects: those its owner declares through
            ``projected_parameters()`` (:class:`pinet.FinPiModule`), else all of the owner's
            parameters except those under a nested projector owner.
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
                    declared = getattr(module, "projected_parameters", None)
                    pairs = declared() if callable(declared) else owned_parameters(module)
                    by_id = {id(p): n for n, p in params.items()}
                    owned = []
                    for pname, p in pairs:
                        if id(p) not in by_id:
                            raise ValueError(
                                f"{type(module).__name__} '{name}': projected_parameters() names {pname!r}, "
                                "which is not a parameter of the model"
                            )
                        owned.append(by_id[id(p)])
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

    def config(self) -> dict:
        """The hook's settings, saved with the wrapper's state and compared on load (default: its
        attributes that are numbers, strings, bools or ``None``)."""
        return {k: v for k, v in vars(self).items() if v is None or isinstance(v, (bool, int, float, str))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Chain(GradHook):
    """Run hooks in order, threading each one's state (optax's ``chain``).

    ``init`` returns a tuple with one state per hook; ``update`` returns the last hook's gradients
    and the tuple of new states, or ``(None, states)`` as soon as a hook ends the step (e.g.
    :class:`~pinet.hooks.Accumulate` stashing a micro-batch; later hooks are then not run and keep
    their states). It is pure: a hook that raises leaves the caller's states untouched. Every
    hook's output is checked (see :func:`check_grads`) so that a misbehaving hook is named.
    """

    def __init__(self, *hooks: GradHook) -> None:
        flat: list[GradHook] = []
        for h in hooks:
            if isinstance(h, Chain):
                flat.extend(h.hooks)
            elif isinstance(h, GradHook):
                flat.append(h)
            else:
                raise TypeError(f"chain: every hook must be a GradHook, got {type(h).__name__}")
        self.hooks: tuple[GradHook, ...] = tuple(flat)

    def init(self, ctx: HookContext) -> tuple:
        return tuple(h.init(ctx) for h in self.hooks)

    def update(self, grads: Grads, state: tuple, ctx: HookContext):
        if len(state) != len(self.hooks):
            raise ValueError(f"Chain.update: got {len(state)} states for {len(self.hooks)} hooks")
        states = list(state)
        checked: dict = {}  # the last output that passed check_grads
        for i, hook in enumerate(self.hooks):
            result = hook.update(grads, states[i], ctx)
            if not isinstance(result, tuple) or len(result) != 2:
                raise TypeError(
                    f"{type(hook).__name__}.update must return (grads, state), got "
                    f"{type(result).__name__}{'' if not isinstance(result, tuple) else f' of length {len(result)}'}"
                )
            given = grads
            grads, states[i] = result
            if grads is None:
                break
            check_grads(grads, ctx, where=type(hook).__name__, checked=checked)
            if isinstance(given, dict):
                dropped = [k for k in given if k not in grads]
                if dropped:
                    # The wrapper commits only the gradients the chain returns: a dropped one would be
                    # stepped with its raw, unhooked .grad (a clipping hook written so is bypassed).
                    raise ValueError(
                        f"{type(hook).__name__}: dropped the gradients of {dropped}; a hook returns every "
                        "gradient it was given (to leave a parameter alone, set requires_grad=False on it)"
                    )
            checked = grads
        return grads, tuple(states)

    def state_to_dict(self, state: tuple) -> list:
        return [h.state_to_dict(s) for h, s in zip(self.hooks, state)]

    def state_from_dict(self, data: list, ctx: HookContext) -> tuple:
        return tuple(h.state_from_dict(d, ctx) for h, d in zip(self.hooks, data))

    def config(self) -> dict:
        return {"hooks": [{"type": type(h).__name__, **h.config()} for h in self.hooks]}

    def __repr__(self) -> str:
        return f"Chain({', '.join(repr(h) for h in self.hooks)})"


def chain(*hooks: GradHook) -> Chain:
    """Compose hooks into one :class:`Chain` (nested chains are flattened)."""
    return Chain(*hooks)


def check_grads(grads: Grads, ctx: HookContext, where: str = "hook", checked: Grads | None = None) -> None:
    """Check what a hook returned before anything is written: every key names a parameter or a
    π-state of the model, tensors have their parameter's shape and a floating dtype, π-rows have
    the state's ``(r_in, r_out)``. Raises naming ``where`` and the key. (Finiteness is checked once,
    on the chain's final output, through its norm: see ``PiOptimizerWrapper.step``.)

    ``checked``: gradients that already passed this check; an entry of ``grads`` that is the very
    same object under the same name is not checked again (hooks pass most entries through
    unchanged, and a chain checks after every hook)."""
    if not isinstance(grads, dict):
        raise TypeError(f"{where}: gradients must be a dict of name -> Tensor | PiRows, got {type(grads).__name__}")
    for name, g in grads.items():
        if checked and checked.get(name) is g:
            continue  # the same tensor keeps its shape and dtype (short of resize_ or set_); PiRows are frozen
        if isinstance(g, PiRows):
            st = ctx.pi_states.get(name)
            if st is None:
                raise ValueError(f"{where}: returned π-rows for {name!r}, which is not a PiState of the model")
            if (g.r_in, g.r_out) != (st.r_in, st.r_out):
                raise ValueError(
                    f"{where}: π-rows for {name!r} have (r_in, r_out) = ({g.r_in}, {g.r_out}), the state "
                    f"has ({st.r_in}, {st.r_out})"
                )
            parts = {"A": g.A, "B": g.B, "coef": g.coef}
            target = st.c
            before = checked.get(name) if checked else None
            if isinstance(before, PiRows) and g.B is not before.B and g.B.device == st.c.device:
                # A hook made new B rows (capture's are unit by construction, and scaling keeps B):
                # the wrapper stores them unchecked, and J would silently clamp other norms.
                _check_unit_rows(f"{where}: π-rows for {name!r}: B", g.B.detach())
        elif isinstance(g, Tensor):
            p = ctx.params.get(name)
            if p is None:
                raise ValueError(f"{where}: returned a gradient for {name!r}, which is not a parameter of the model")
            if g.shape != p.shape:
                raise ValueError(
                    f"{where}: gradient of {name!r} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}"
                )
            parts = {"grad": g}
            target = p
        else:
            raise TypeError(f"{where}: gradient of {name!r} must be a Tensor or PiRows, got {type(g).__name__}")
        for part, t in parts.items():
            if not t.is_floating_point():
                raise TypeError(f"{where}: {name!r} ({part}) has dtype {t.dtype}; gradients must be floating point")
            if t.device != target.device:
                raise ValueError(f"{where}: {name!r} ({part}) is on {t.device}, the parameter on {target.device}")
        if isinstance(g, Tensor) and g.dtype != target.dtype:
            # torch refuses to assign it ("attempting to assign a gradient with dtype ...").
            raise TypeError(f"{where}: gradient of {name!r} has dtype {g.dtype}, the parameter {target.dtype}")
