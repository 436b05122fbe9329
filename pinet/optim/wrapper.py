"""PiOptimizerWrapper: train infinite and finite π-nets with any linear torch optimizer."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..hooks import GradHook, HookContext, chain, check_grads, default_hooks, grad_sqnorms, total_norm
from ..rows import PiRows

__all__ = ["PiOptimizerWrapper", "StepStats", "LINEAR_OPTIMIZERS", "is_linear_optimizer"]

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


@dataclass(frozen=True)
class StepStats:
    """What the last :meth:`PiOptimizerWrapper.step` did (``wrapper.stats``).

    Attributes:
        applied: whether the inner optimizer stepped (``False`` when :class:`~pinet.hooks.Accumulate`
            stashed a micro-batch).
        grad_norm: total norm of the gradient that was applied, before clipping: what the first
            :class:`~pinet.hooks.ClipGradNorm` saw (after accumulation, when ``Accumulate`` comes
            first), or the applied gradient's norm without clipping. ``None`` when not applied.
        clipped_grad_norm: total norm of the gradient the inner optimizer received (after every
            hook). ``None`` when not applied.
        micro_batch_grad_norm: norm of this call's own gradients (before accumulation/clipping).
        rows_appended: rows appended to each :class:`~pinet.state.PiState`, by name.
    """

    applied: bool = False
    grad_norm: float | None = None
    clipped_grad_norm: float | None = None
    micro_batch_grad_norm: float | None = None
    rows_appended: dict = field(default_factory=dict)


class PiOptimizerWrapper(torch.optim.Optimizer):
    """Wrap a built ``torch.optim`` optimizer over ``model.parameters()`` for π-nets.

    ``step()`` runs the gradient hooks as one :func:`~pinet.hooks.chain` (the defaults
    ``Concatenate``, ``ProjectToR``, ``GradNorm``, then ``hooks``), checks what it returned
    (names, shapes, dtypes, finiteness), commits the result (appends π-rows to each
    :class:`~pinet.state.PiState`, sets ``c.grad`` to the indicator of the new rows, grows the
    inner optimizer's per-parameter state with zeros) and steps the inner optimizer. The step is
    all-or-nothing: if a hook, a check or the inner optimizer raises, every row count, parameter,
    gradient, optimizer state and hook state is as before the call. ``stats`` (:class:`StepStats`)
    says what the last step did.

    ``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers accept the
    wrapper and change the inner learning rates; ``state_dict()`` holds the inner state plus the
    hooks' settings and state.

    Args:
        optimizer: the inner optimizer. Must be linear in the gradient (see
            :func:`is_linear_optimizer`) if it holds coefficients of infinite layers.
        model: the module whose parameters ``optimizer`` holds.
        hooks: a list of extra :class:`~pinet.hooks.GradHook` s, run after the defaults in this order.
        atomic: copy the parameters being stepped and their optimizer state before the inner
            ``step()`` so that an inner optimizer that raises half-way is undone too (default). With
            ``False`` a failed inner step still restores rows, gradients, state shapes and hook
            states, but not values the inner optimizer already wrote (saves one copy of the stepped
            parameters per step; worth it for very wide finite nets).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, hooks: Iterable[GradHook] = (), *, atomic: bool = True
    ) -> None:
        if not isinstance(atomic, bool):
            raise TypeError(f"PiOptimizerWrapper: atomic must be a bool, got {atomic!r}")
        self.atomic = atomic
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"PiOptimizerWrapper: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, PiOptimizerWrapper):
            raise TypeError("PiOptimizerWrapper: optimizer is already wrapped")
        if not isinstance(model, nn.Module):
            raise TypeError(f"PiOptimizerWrapper: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(hooks, GradHook):
            raise TypeError(
                f"PiOptimizerWrapper: hooks must be a list of GradHook, got a single {type(hooks).__name__}; "
                f"pass hooks=[{type(hooks).__name__}(...)]"
            )
        if isinstance(hooks, (str, bytes, dict)) or not isinstance(hooks, Iterable):
            raise TypeError(f"PiOptimizerWrapper: hooks must be a list of GradHook, got {type(hooks).__name__}")
        hooks = list(hooks)
        for h in hooks:
            if not isinstance(h, GradHook):
                raise TypeError(f"PiOptimizerWrapper: hooks must be GradHook instances, got {type(h).__name__}")
        self.optimizer = optimizer
        self.model = model
        self.hooks: list[GradHook] = default_hooks() + hooks
        self.ctx = HookContext.from_model(model)
        self._check_coefficients()
        _check_hyperparameters(optimizer.param_groups)
        # Optimizer.__init__ installs the step pre/post hook machinery; the groups and state are
        # then replaced by the inner optimizer's own objects so that both always agree.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self.hook_states = [h.init(self.ctx) for h in self.hooks]
        self.stats = StepStats()
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

    def _check_captured(self) -> None:
        # A coefficient gradient that did not come from row capture means the layer computed with
        # `state.c` itself (not through pinet.layers.pi_product): SGD on it is not the π-update.
        for name, st in self.ctx.pi_states.items():
            g = st.c.grad
            if st.shard is not None:
                for key, v in self.optimizer.state.get(st.c, {}).items():
                    if isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] != st.rows:
                        # Per-row state of the whole layer (the optimizer stepped before shard()):
                        # cutting it to this process's rows would pair momentum with other rows.
                        raise RuntimeError(
                            f"PiOptimizerWrapper.step: the optimizer state {key!r} of {_join(name, 'c')!r} has "
                            f"{v.shape[0]} rows but this process holds {st.rows} rows of the sharded layer; build "
                            "the optimizer (and the wrapper) after pinet.distributed.shard(model). The step was "
                            "not applied"
                        )
            if g is not None and g.shape != st.c.shape:
                raise RuntimeError(
                    f"PiOptimizerWrapper.step: the coefficients {_join(name, 'c')!r} have a gradient of "
                    f"{g.shape[0]} rows but the state holds {st.rows} (it was truncated, appended to or loaded "
                    "after backward()); call zero_grad() and backward() again. The step was not applied"
                )
            if g is not None and not st._pending_valid() and bool(g.any()):
                raise RuntimeError(
                    f"PiOptimizerWrapper.step: the coefficients {_join(name, 'c')!r} have a gradient but no "
                    "captured π-rows. Either the layer that owns this PiState computes with state.c directly "
                    "(compute through pinet.layers.pi_product(state, g), or subclass pinet.InfPiLayer: it "
                    "uses c detached and captures the rows), or step() is called again without a new "
                    "backward() (rows are consumed by the step that applies them). The step was not applied"
                )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Run the hooks, commit π-rows and gradients, then step the inner optimizer.

        Returns the closure's loss (if any); a non-finite loss raises ``FloatingPointError`` before
        anything is applied. A ``step()`` consumed by :class:`~pinet.hooks.Accumulate` stashes the
        gradients, clears them and returns without updating. If anything raises, the model, the
        inner optimizer and the hooks are exactly as before the call.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, Tensor) and loss.is_floating_point() and not bool(torch.isfinite(loss).all()):
                raise FloatingPointError(f"PiOptimizerWrapper.step: the closure returned a non-finite loss ({loss}); the step was not applied")
            if isinstance(loss, float) and not math.isfinite(loss):
                raise FloatingPointError(f"PiOptimizerWrapper.step: the closure returned a non-finite loss ({loss}); the step was not applied")
        _check_hyperparameters(self.optimizer.param_groups)
        self._check_captured()
        ctx = self.ctx
        ctx.stats = {}
        ctx.cache = {}
        grads = {name: p.grad for name, p in ctx.params.items() if p.grad is not None}
        try:
            grads, states = chain(*self.hooks).update(grads, tuple(self.hook_states), ctx)
            micro = ctx.stats.get("grad_norm")
            if grads is None:
                self.hook_states = list(states)
                self._consume_grads()
                self.stats = StepStats(applied=False, micro_batch_grad_norm=micro)
                return loss
            total = total_norm(grad_sqnorms(grads, ctx))
            if not torch.isfinite(total):
                sq = grad_sqnorms(grads, ctx)
                bad = [k for k, v in sq.items() if not torch.isfinite(v)]
                raise FloatingPointError(
                    f"PiOptimizerWrapper.step: the hooks returned non-finite gradients for {bad}; the step "
                    "was not applied and nothing changed"
                )
            before_clip = ctx.stats.get("grad_norm_before_clip", float(total))
        finally:
            ctx.cache = {}  # memoised values hold gradients; do not keep them past the hooks
        snapshot = _Snapshot(self, grads) if self.atomic else _Snapshot(self, {})
        try:
            appended = self._commit(grads)
            self.optimizer.step()
        except BaseException:
            snapshot.restore()
            raise
        self.hook_states = list(states)
        for st in ctx.pi_states.values():
            st.clear_pending()
        self.stats = StepStats(
            applied=True, grad_norm=before_clip, clipped_grad_norm=float(total),
            micro_batch_grad_norm=micro, rows_appended=appended,
        )  # fmt: skip
        return loss

    def _consume_grads(self) -> None:
        for p in self.ctx.params.values():
            p.grad = None
        for st in self.ctx.pi_states.values():
            st.clear_pending()

    def _commit(self, grads) -> dict[str, int]:
        ctx = self.ctx
        appended = {}
        for name, g in grads.items():
            if isinstance(g, PiRows):
                continue
            ctx.params[name].grad = g
        for name, rows in grads.items():
            if not isinstance(rows, PiRows):
                continue
            st = ctx.pi_states[name]
            old = st.rows
            c_old_grad = grads.get(_join(name, "c"))
            # A sharded state (pinet.distributed) keeps its share of the replicated new rows.
            try:
                keep = st.append(rows.A, rows.B, check_finite=False)  # finite: step() checked their norm
            except ValueError as e:
                # Finite rows beyond a half-precision store's range: like a non-finite gradient, a
                # floating-point failure of training (a diverging run, a large loss scale), and
                # reported as one (the training CLIs turn it into "training diverged ...").
                raise FloatingPointError(
                    f"PiOptimizerWrapper.step: the π-rows of {name!r} cannot be stored: {e} (lower the learning "
                    "rate or the loss scale, clip, or store the rows in float32); the step was not applied"
                ) from e
            appended[name] = rows.rows
            g = torch.zeros_like(st.c)
            if c_old_grad is not None:
                g[:old] = c_old_grad
            g[old:] = rows.coef[keep].to(g.dtype)
            st.c.grad = g
            self._grow_state(st.c, old)
        return appended

    def _grow_state(self, param: Tensor, old: int) -> None:
        """Zero-pad the inner optimizer's per-parameter tensors of ``param`` from ``old`` to M rows.

        Per-row state of another length (the state was truncated with ``PiState.truncate``, or
        rows were appended outside the wrapper, since the last step) is first cut or zero-padded
        to ``old``: a removed row takes its momentum with it, a row appended by hand has none."""
        new = param.shape[0]
        st = self.optimizer.state.get(param)
        if not st:
            return
        for key, v in list(st.items()):
            if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] == new:
                continue
            if v.shape[0] > old:
                v = v[:old]
            elif v.shape[0] < old:
                v = torch.cat([v, v.new_zeros(old - v.shape[0])])
            st[key] = _grow_1d(v, new) if new != old else v

    # ------------------------------------------------------------------ torch API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the inner optimizer's gradients and drop captured π-rows."""
        if not isinstance(set_to_none, bool):
            raise TypeError(f"PiOptimizerWrapper.zero_grad: set_to_none must be a bool, got {set_to_none!r}")
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for st in self.ctx.pi_states.values():
            st.clear_pending()

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the inner optimizer (shared ``param_groups``); a group that fails the
        checks (a tensor that is not a model parameter, a non-finite hyperparameter) is not added."""
        if not getattr(self, "_wrapped", False):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        try:
            ctx = HookContext.from_model(self.model)
            self._check_coefficients()
            _check_hyperparameters(self.optimizer.param_groups[-1:])
        except BaseException:
            added = self.optimizer.param_groups.pop()
            for p in added["params"]:
                self.optimizer.state.pop(p, None)
            raise
        self.ctx = ctx

    def state_dict(self) -> dict:
        """``{"optimizer": inner state dict, "hooks": [{"type", "config", "state"}]}`` (views compacted)."""
        inner = self.optimizer.state_dict()
        inner["state"] = {
            k: {n: _compact(v) if isinstance(v, Tensor) else v for n, v in s.items()}
            for k, s in inner["state"].items()
        }
        hooks = [
            {"type": type(h).__name__, "config": h.config(), "state": h.state_to_dict(s)}
            for h, s in zip(self.hooks, self.hook_states)
        ]
        return {"optimizer": inner, "hooks": hooks}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned, after checking it against the model and the hooks.

        Load the model's state first: per-row optimizer state (momentum buffers of π-coefficients)
        must have the model's current row counts, and the hooks' types and settings must match this
        wrapper's. A mismatch raises ``ValueError`` (saying what to load first) and changes nothing.
        """
        where = "PiOptimizerWrapper.load_state_dict"
        if not isinstance(state_dict, dict) or "optimizer" not in state_dict or "hooks" not in state_dict:
            raise ValueError(f"{where}: expected a dict with keys 'optimizer' and 'hooks'")
        hooks = state_dict["hooks"]
        if not isinstance(hooks, list) or not all(isinstance(h, dict) and {"type", "state"} <= set(h) for h in hooks):
            raise ValueError(
                f"{where}: 'hooks' must be a list of dicts with keys 'type', 'config' and 'state' (what "
                "state_dict() returns)"
            )
        types = [h.get("type") for h in hooks]
        mine = [type(h).__name__ for h in self.hooks]
        if types != mine:
            raise ValueError(f"{where}: saved hooks {types} differ from this wrapper's {mine}")
        for h, saved in zip(self.hooks, hooks):
            if "config" in saved and saved["config"] != h.config():
                diff = {k: (saved["config"].get(k), v) for k, v in h.config().items() if saved["config"].get(k) != v}
                raise ValueError(
                    f"{where}: hook {type(h).__name__} was saved with other settings "
                    + ", ".join(f"{k}: saved {a!r} vs this {b!r}" for k, (a, b) in diff.items())
                    + "; build the wrapper with the hooks of the checkpoint"
                )
        inner = state_dict["optimizer"]
        self._check_inner_state(inner, where)
        hook_states = [h.state_from_dict(s["state"], self.ctx) for h, s in zip(self.hooks, hooks)]
        for h, st in zip(self.hooks, hook_states):
            stash = st.get("grads") if isinstance(st, dict) else None
            if stash:
                check_grads(stash, self.ctx, where=f"{where}: {type(h).__name__} state")
                for name, g in stash.items():
                    if isinstance(g, Tensor) and g.shape != self.ctx.params[name].shape:
                        raise ValueError(f"{where}: stashed gradient of {name!r} does not match the model")
        self.optimizer.load_state_dict(inner)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.hook_states = hook_states

    def _check_inner_state(self, inner: dict, where: str) -> None:
        if not isinstance(inner, dict) or "state" not in inner or "param_groups" not in inner:
            raise ValueError(f"{where}: 'optimizer' must be an optimizer state dict (keys 'state', 'param_groups')")
        groups = self.optimizer.param_groups
        saved_groups = inner["param_groups"]
        if len(saved_groups) != len(groups) or any(
            len(sg.get("params", ())) != len(g["params"]) for sg, g in zip(saved_groups, groups)
        ):
            raise ValueError(
                f"{where}: the saved optimizer has {[len(g.get('params', ())) for g in saved_groups]} parameters "
                f"per group, this one {[len(g['params']) for g in groups]}"
            )
        _check_hyperparameters(saved_groups, where=where)
        for i, (sg, g) in enumerate(zip(saved_groups, groups)):
            _check_saved_group(sg, g, f"{where}: saved group {i}")
        names = {id(p): n for n, p in self.ctx.params.items()}
        index = {}
        for sg, g in zip(saved_groups, groups):
            index.update(zip(sg["params"], g["params"]))
        if len(index) != sum(len(g["params"]) for g in groups):
            raise ValueError(f"{where}: the saved groups list a parameter index more than once")
        for idx, st in inner["state"].items():
            p = index.get(idx)
            if p is None:
                raise ValueError(f"{where}: optimizer state for unknown parameter index {idx!r}")
            name = names.get(id(p), f"#{idx}")
            if not isinstance(st, dict):
                raise ValueError(f"{where}: optimizer state of {name!r} must be a dict, got {type(st).__name__}")
            for key, v in st.items():
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ValueError(
                        f"{where}: state {key!r} of {name!r} has shape {tuple(v.shape)} but the parameter has "
                        f"{tuple(p.shape)} (π-coefficients: rows of another step); load the model's "
                        "state_dict from the same checkpoint first, then the optimizer's"
                    )
                _check_saved_state_value(key, v, p, f"{where}: state {key!r} of {name!r}")

    def __repr__(self) -> str:
        hooks = ", ".join(repr(h) for h in self.hooks)
        return f"PiOptimizerWrapper(\n  optimizer={self.optimizer!r},\n  hooks=[{hooks}]\n)"


class _Snapshot:
    """What a step may change, taken before it is committed, so a failure can undo it: row counts,
    ``.grad`` references, and copies of the parameters that have a gradient and of their optimizer
    state (the inner ``step`` writes both in place). O(parameters), never the π-rows themselves:
    rows are only appended, so truncating undoes them."""

    def __init__(self, wrapper: PiOptimizerWrapper, grads: dict) -> None:
        # `grads`: what is about to be committed; only those parameters can be stepped.
        self.wrapper = wrapper
        ctx = wrapper.ctx
        self.rows = {name: (st.rows, st.global_rows) for name, st in ctx.pi_states.items()}
        self.grads = {name: p.grad for name, p in ctx.params.items()}
        state = wrapper.optimizer.state
        self.had_state = set(state.keys())
        self.values = {}
        self.opt_state = {}
        for key, g in grads.items():
            name = _join(key, "c") if isinstance(g, PiRows) else key
            p = ctx.params[name]
            self.values[name] = p.detach().clone()
            if p in state:
                self.opt_state[p] = {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in state[p].items()}
        # Without copies (atomic=False) a failed inner step still gets its rows, gradients and
        # per-row state shapes back (the tensors the state held before the step).
        self.shapes = {p: dict(st) for p, st in state.items() if p not in self.opt_state}

    @torch.no_grad()
    def restore(self) -> None:
        w = self.wrapper
        ctx = w.ctx
        for name, st in ctx.pi_states.items():
            st.truncate(*self.rows[name])
        for name, p in ctx.params.items():
            saved = self.values.get(name)
            if saved is not None:
                p.copy_(saved)
            p.grad = self.grads[name]
        state = w.optimizer.state
        for p in list(state.keys()):
            if p not in self.had_state:
                del state[p]
        for p, st in self.opt_state.items():
            state[p] = st
        for p, st in self.shapes.items():
            if p in state:
                state[p].clear()
                state[p].update(st)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_hyperparameters(groups, where: str = "PiOptimizerWrapper") -> None:
    # A NaN or inf learning rate, momentum or decay turns the whole net into NaN in one step.
    for i, g in enumerate(groups):
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            v = g.get(key)
            if v is None:
                continue
            val = float(v) if isinstance(v, Tensor) and v.numel() == 1 else v
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                name = g.get("name")
                label = f"group {i}" + (f" ({name!r})" if name else "")
                raise ValueError(f"{where}: {label} has {key}={v!r}; expected a finite number")


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (isinstance(v, Tensor) and v.numel() == 1)


def _check_saved_group(saved: dict, current: dict, where: str) -> None:
    # torch's Optimizer.load_state_dict takes the saved group dicts as they are: a missing key
    # is a KeyError at the next step(), a None momentum a TypeError there, a negative lr ascends.
    for key, cur in current.items():
        if key in ("params", "param_names"):
            continue
        if key not in saved:
            raise ValueError(f"{where} has no {key!r} (this optimizer's groups have {sorted(current)})")
        v = saved[key]
        if isinstance(cur, bool) and not isinstance(v, bool):
            raise ValueError(f"{where} has {key}={v!r}; expected a bool")
        if _is_number(cur) and not _is_number(v):
            raise ValueError(f"{where} has {key}={v!r}; expected a finite number")
        if key in ("lr", "momentum", "weight_decay") and _is_number(v) and float(v) < 0:
            raise ValueError(f"{where} has {key}={v!r}; expected a non-negative number")


def _check_saved_state_value(key: str, v, p: Tensor, where: str) -> None:
    # Per-parameter optimizer state as it will be used: a NaN momentum buffer would silently turn
    # the parameters into NaN at the next step, a list or 0-dim one fail there with torch's error.
    if key == "momentum_buffer" and v is not None and not isinstance(v, Tensor):
        raise ValueError(f"{where} must be a tensor or None, got {type(v).__name__}")
    if not isinstance(v, Tensor):
        return
    if v.is_meta:
        raise ValueError(f"{where} is on the meta device (it has no values)")
    if key == "momentum_buffer" and (not v.is_floating_point() or v.shape != p.shape):
        raise ValueError(f"{where} must be a real floating-point tensor of the parameter's shape {tuple(p.shape)}, "
                         f"got {v.dtype} {tuple(v.shape)}")  # fmt: skip
    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
        raise ValueError(f"{where} is not finite (NaN or inf)")


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
