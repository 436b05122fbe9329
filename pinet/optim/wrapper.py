"""PiOptimizerWrapper: train infinite and finite π-nets with any linear torch optimizer."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..hooks import GradHook, HookContext, default_hooks
from ..state import PiRows, PiState

__all__ = ["PiOptimizerWrapper", "LINEAR_OPTIMIZERS", "is_linear_optimizer"]

#: Optimizers whose update is a fixed linear function of the gradient history and the parameters,
#: so that running them on π-coefficients with the indicator gradient is the infinite-width update
#: (spec, "Coefficient space"). A custom optimizer declares itself linear with a class attribute
#: ``linear_in_grad = True``. Adam, AdamW, RMSprop, Adagrad, ... normalise per coordinate and are
#: refused for infinite layers.
LINEAR_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.SGD,)


def is_linear_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` may train π-coefficients (listed in :data:`LINEAR_OPTIMIZERS` or
    declaring ``linear_in_grad = True``)."""
    declared = getattr(type(optimizer), "linear_in_grad", None)
    if declared is not None:
        return bool(declared)
    return type(optimizer) in LINEAR_OPTIMIZERS


class PiOptimizerWrapper(torch.optim.Optimizer):
    """Wrap a built ``torch.optim`` optimizer over ``model.parameters()`` for π-nets.

    ``step()`` runs the gradient hooks in order (the defaults ``Concatenate``, ``ProjectToR``,
    ``GradNorm``, then ``hooks``), commits the result (appends π-rows to each
    :class:`~pinet.state.PiState`, sets ``c.grad`` to the indicator of the new rows, grows the
    inner optimizer's per-parameter state with zeros) and then steps the inner optimizer. If a hook
    raises (e.g. a non-finite gradient norm) nothing is changed.

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers accept the
    wrapper and change the inner learning rates; ``state_dict()`` holds the inner state plus the
    hooks' state.

    Args:
        optimizer: the inner optimizer. Must be linear in the gradient (see
            :func:`is_linear_optimizer`) if it holds coefficients of infinite layers.
        model: the module whose parameters ``optimizer`` holds.
        hooks: extra :class:`~pinet.hooks.GradHook` s, run after the defaults in this order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, hooks: Iterable[GradHook] = ()) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"PiOptimizerWrapper: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, PiOptimizerWrapper):
            raise TypeError("PiOptimizerWrapper: optimizer is already wrapped")
        if not isinstance(model, nn.Module):
            raise TypeError(f"PiOptimizerWrapper: model must be an nn.Module, got {type(model).__name__}")
        hooks = list(hooks)
        for h in hooks:
            if not isinstance(h, GradHook):
                raise TypeError(f"PiOptimizerWrapper: hooks must be GradHook instances, got {type(h).__name__}")
        self.optimizer = optimizer
        self.model = model
        self.hooks: list[GradHook] = default_hooks() + hooks
        self.ctx = HookContext.from_model(model)
        self._check_coefficients()
        # Optimizer.__init__ installs the step pre/post hook machinery; the groups and state are
        # then replaced by the inner optimizer's own objects so that both always agree.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.hook_states = [h.init(self.ctx) for h in self.hooks]
        self._wrapped = True

    # ------------------------------------------------------------------ checks
    def _check_coefficients(self) -> None:
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        model_params = {id(p) for p in self.model.parameters()}
        foreign = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in model_params]
        if foreign:
            raise ValueError(f"PiOptimizerWrapper: the optimizer holds {len(foreign)} tensor(s) that are not parameters of model")
        trained = [name for name, st in self.ctx.pi_states.items() if st.c.requires_grad]
        missing = [name for name in trained if id(self.ctx.pi_states[name].c) not in held]
        if missing:
            raise ValueError(
                f"PiOptimizerWrapper: the coefficients {[m + '.c' for m in missing]} of infinite layers are "
                "not in the optimizer; build it over model.parameters() (or freeze them with "
                "c.requires_grad_(False))"
            )
        if trained and not is_linear_optimizer(self.optimizer):
            raise TypeError(
                f"PiOptimizerWrapper: {type(self.optimizer).__name__} is not linear in the gradient, so it "
                "has no π-limit: infinite layers train in coefficient space, where only optimizers whose "
                "update is a fixed linear function of the gradients and parameters (SGD with momentum, "
                "dampening, Nesterov, weight decay, maximize) reproduce the infinite-width update. Use "
                "torch.optim.SGD, or set `linear_in_grad = True` on a custom optimizer class that is linear."
            )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Run the hooks, commit π-rows and gradients, then step the inner optimizer.

        Returns the closure's loss (if any). A ``step()`` consumed by :class:`~pinet.hooks.Accumulate`
        stashes the gradients, clears them and returns without updating.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ctx = self.ctx
        ctx.stats = {}
        ctx.cache = {}
        grads = {name: p.grad for name, p in ctx.params.items() if p.grad is not None}
        states = list(self.hook_states)
        try:
            for i, hook in enumerate(self.hooks):
                grads, states[i] = hook.update(grads, states[i], ctx)
                if grads is None:
                    break
        finally:
            ctx.cache = {}  # memoised values hold gradients; do not keep them past the hooks
        self.hook_states = states
        if grads is None:
            self._consume_grads()
            return loss
        grown = self._commit(grads)
        try:
            self.optimizer.step()
        except BaseException:
            for st, rows in grown:
                st.truncate(rows)
            raise
        for st in ctx.pi_states.values():
            st.clear_pending()
        return loss

    def _consume_grads(self) -> None:
        for p in self.ctx.params.values():
            p.grad = None
        for st in self.ctx.pi_states.values():
            st.clear_pending()

    def _commit(self, grads) -> list[tuple[PiState, int]]:
        ctx = self.ctx
        grown = []
        for name, g in grads.items():
            if isinstance(g, PiRows):
                continue
            ctx.params[name].grad = g
        for name, rows in grads.items():
            if not isinstance(rows, PiRows):
                continue
            st = ctx.pi_states[name]
            old = st.rows
            c_old_grad = grads.get(name + ".c") if name else grads.get("c")
            st.append(rows.A, rows.B)
            grown.append((st, old))
            g = torch.zeros_like(st.c)
            if c_old_grad is not None:
                g[:old] = c_old_grad
            g[old:] = rows.coef.to(g.dtype)
            st.c.grad = g
            self._grow_state(st.c, old)
        return grown

    def _grow_state(self, param: Tensor, old: int) -> None:
        """Zero-pad the inner optimizer's per-parameter tensors of ``param`` from ``old`` to M rows."""
        new = param.shape[0]
        st = self.optimizer.state.get(param)
        if not st:
            return
        for key, v in list(st.items()):
            if isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] == old and new != old:
                st[key] = _grow_1d(v, new)

    # ------------------------------------------------------------------ torch API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients and drop captured π-rows."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for st in self.ctx.pi_states.values():
            st.clear_pending()

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the inner optimizer (shared ``param_groups``)."""
        if not getattr(self, "_wrapped", False):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        self.ctx = HookContext.from_model(self.model)
        self._check_coefficients()

    def state_dict(self) -> dict:
        """``{"optimizer": inner state dict, "hooks": [hook states]}`` (views compacted)."""
        inner = self.optimizer.state_dict()
        inner["state"] = {
            k: {n: _compact(v) if isinstance(v, Tensor) else v for n, v in s.items()}
            for k, s in inner["state"].items()
        }
        hooks = [
            {"type": type(h).__name__, "state": h.state_to_dict(s)} for h, s in zip(self.hooks, self.hook_states)
        ]
        return {"optimizer": inner, "hooks": hooks}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned. Load the model's state first (π-rows)."""
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict or "hooks" not in state_dict:
            raise ValueError("PiOptimizerWrapper.load_state_dict: expected a dict with keys 'optimizer' and 'hooks'")
        hooks = state_dict["hooks"]
        types = [h["type"] for h in hooks]
        mine = [type(h).__name__ for h in self.hooks]
        if types != mine:
            raise ValueError(f"PiOptimizerWrapper.load_state_dict: saved hooks {types} differ from this wrapper's {mine}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.hook_states = [h.state_from_dict(s["state"], self.ctx) for h, s in zip(self.hooks, hooks)]

    def __repr__(self) -> str:
        hooks = ", ".join(repr(h) for h in self.hooks)
        return f"PiOptimizerWrapper(\n  optimizer={self.optimizer!r},\n  hooks=[{hooks}]\n)"


def _compact(t: Tensor) -> Tensor:
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _grow_1d(v: Tensor, new: int) -> Tensor:
    # Capacity-backed growth: reuse the spare room of the storage behind `v` when there is some,
    # else reallocate 1.5x, so growing optimizer state is amortised O(rows appended).
    old = v.shape[0]
    base = v._base
    if (
        base is not None
        and base.dim() == 1
        and v.storage_offset() == base.storage_offset()
        and v.stride() == (1,)
        and base.shape[0] >= new
    ):
        out = base[:new]
        out[old:].zero_()
        return out
    store = v.new_zeros(max(new, math.ceil(new * 1.5)))
    store[:old] = v
    return store[:new]
