"""MAML over any pinet network, infinite or finite, first or second order (``pinet.meta``).

A task is ``(x_support, y_support, x_query, y_query)``. The inner loop takes ``num_steps`` gradient
steps of size ``step_size`` on the support loss, on the *adapted set* of the network, without
touching the stored net:

* an infinite π-layer (:class:`pinet.InfPiLayer`) in the adapted set takes the π-update as extra
  rows held as ordinary autograd tensors: ``A = s ⊙ δ_S``, ``B = ḡ_S``, coefficient ``-ε``
  (spec, "MAML at infinite width"); forward hooks add ``alpha · (s J(ḡ Bᵀ) ⊙ coef) A`` to the
  layer's output, so the stored :class:`~pinet.state.PiState` never changes;
* every ordinary tensor in the adapted set (input weights, biases, all weights of a finite net)
  takes an SGD step, evaluated with :func:`torch.func.functional_call`; with
  ``project_inner=True`` the gradients of finite layers that own a :class:`~pinet.state.FinPiState`
  are projected onto the span of their ``Ω`` first (``--Gproj-inner``).

The meta-gradient is the ordinary ``backward`` of the query loss of the adapted net. With
``first_order=False`` the inner steps are part of the graph (``create_graph=True``) and pinet's
row capture delivers the exact meta-gradient rows of every infinite layer: one set for the query
forward and one for each support forward (their outputs receive gradient through ``δ_S``, ``s`` and
``ḡ_S``). The inner ``autograd.grad`` runs under :class:`pinet.layers.capture_rows` ``(False)``
so inner gradients never become rows. The meta-update is then an ordinary
:class:`pinet.optim.PiOptimizerWrapper` step (any linear optimizer, clipping, lr multipliers).

Second order at infinite width is exact whenever no inner gradient passes backward through a
stored π-product (the readout adapted alone, the paper's setting, any ``num_steps``). When it does
(e.g. the hidden layers or the input layer adapted), the exact meta-gradient also differentiates
the π-product's *backward* with respect to its rows, which is not a set of J-rows (it is the
derivative of a row along its ``B`` direction, a ``J'``-kernel term), so pinet cannot store it;
:meth:`MAML.adapt` then raises instead of silently dropping it (first order is fine there, and
finite nets are exact in every case). See docs/meta.md.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.func import functional_call

from .functional import normalize_rows
from .layers import InfPiLayer, InfPiModule, capture_rows
from .optim.groups import layer_roles
from .state import FinPiState, PiState

__all__ = ["ADAPT", "MAML", "Adapted", "Task", "adapted_forward", "task_accuracy"]

#: Adapted sets: ``"readout"`` (readout layers and their biases: the paper's
#: ``--adapt-readout-only``), ``"all"`` (every layer), ``"no-readout"`` (every layer except the
#: readouts: the reference's ``--no-adapt-readout``).
ADAPT = ("readout", "all", "no-readout")

Task = tuple  # (x_support (s, d), y_support (s,), x_query (q, d), y_query (q,))

_TWO_PI = 2.0 * math.pi
# Below this 1 - c², J'' = 1 / (2π sqrt(1 - c²)) is replaced by 0. It is only reached by a sample
# meeting its own row (c = 1 identically, e.g. the support set at the rows of an earlier inner
# step), where the cosine's derivative is exactly 0 and the true product is 0, not inf * 0 = NaN.
# Elsewhere it changes J' by at most sqrt(2e-14) / 2π ≈ 2e-8 inside a cone no distinct sample reaches.
_DIAGONAL = 1e-14


class _Jp(torch.autograd.Function):
    # J'(c) = arccos(-c) / 2π with a finite derivative at |c| = 1 (see _DIAGONAL).
    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(c)
        return torch.arccos(-c.clamp(-1.0, 1.0)) / _TWO_PI

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (c,) = ctx.saved_tensors
        gap = 1.0 - c.clamp(-1.0, 1.0) ** 2
        jpp = torch.where(gap > _DIAGONAL, 1.0 / (_TWO_PI * gap.clamp_min(_DIAGONAL).sqrt()), torch.zeros_like(c))
        return grad * jpp


class _J(torch.autograd.Function):
    # J(c) whose derivative is J'(c) (as pinet.functional.J) and whose second derivative is
    # finite at |c| = 1, so double backward through an inner step never meets inf * 0.
    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(c)
        c = c.clamp(-1.0, 1.0)
        return (torch.sqrt(1.0 - c * c) + torch.arccos(-c) * c) / _TWO_PI

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (c,) = ctx.saved_tensors
        return grad * _Jp.apply(c)


@dataclass
class _Rows:
    # Extra rows of one infinite layer as autograd tensors: A (k, r_out), B (k, r_in), coef (k,).
    A: Tensor
    B: Tensor
    coef: Tensor

    def cat(self, other: "_Rows") -> "_Rows":
        return _Rows(torch.cat([self.A, other.A]), torch.cat([self.B, other.B]), torch.cat([self.coef, other.coef]))


def _rows_product(g: Tensor, rows: _Rows, layernorm: bool) -> Tensor:
    """``(s J(ḡ Bᵀ) ⊙ coef) A`` of extra rows, differentiable in everything: (b, r_in) -> (b, r_out)."""
    s, gbar = normalize_rows(g)
    u = (_J.apply(gbar @ rows.B.T) * rows.coef) @ rows.A
    return u if layernorm else s * u


@dataclass
class Adapted:
    """An adapted net for one task: ordinary tensors ``params`` (name -> tensor, the adapted values
    of the adapted set) and extra ``rows`` per infinite layer (name -> rows). ``support_losses``:
    the support loss before each inner step. Holds the task's autograd graph until dropped."""

    params: dict[str, Tensor]
    rows: dict = field(default_factory=dict)
    support_losses: list[float] = field(default_factory=list)

    def row_counts(self) -> dict[str, int]:
        """Extra rows per infinite layer."""
        return {k: int(v.A.shape[0]) for k, v in self.rows.items()}


@contextmanager
def _layer_hooks(model: nn.Module, layers: dict[str, InfPiLayer], rows: dict, taps: list | None):
    # Forward hooks adding the extra rows to each infinite layer's output and recording
    # (name, input g, output) of the adapted layers for the inner gradient.
    handles = []
    for name, layer in layers.items():

        def hook(mod, args, out, name=name):
            g = args[0].to(out.dtype)
            extra = rows.get(name)
            if extra is not None:
                out = out + mod.alpha * _rows_product(g, extra, mod.layernorm)
            if taps is not None:
                taps.append((name, g, out))
            return out

        handles.append(layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def adapted_forward(model: nn.Module, x: Tensor, params: dict[str, Tensor] | None = None, rows: dict | None = None):
    """Evaluate ``model`` at ``x`` with ordinary tensors replaced by ``params`` (name -> tensor)
    and extra rows ``rows`` (InfPiLayer name -> rows, as in :class:`Adapted`) added to its
    infinite layers; the stored net is not changed. Differentiable in ``params`` and the rows."""
    rows = rows or {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, InfPiLayer) and n in rows}
    with _layer_hooks(model, layers, rows, None):
        return functional_call(model, params or {}, (x,), strict=False)


class _GradSnapshot:
    """Every parameter's ``.grad`` and every π-state's captured rows, to put back after a failed
    meta-gradient. Gradients that exist are copied (backward adds into them in place); a
    coefficient gradient is only referenced: its identity and version are what keep the captured
    rows valid, and row capture never writes into an existing one."""

    def __init__(self, model: nn.Module) -> None:
        self.states = [(st, list(st.pending), st._pending_token, st.c.grad) for st in model.modules() if isinstance(st, PiState)]
        coefs = {id(st.c) for st, *_ in self.states}
        self.grads = [
            (p, p.grad, None if p.grad is None else p.grad.detach().clone())
            for p in model.parameters() if id(p) not in coefs
        ]  # fmt: skip

    @torch.no_grad()
    def restore(self) -> None:
        for p, ref, copy in self.grads:
            if ref is not None:
                ref.copy_(copy)
            p.grad = ref
        for st, pending, token, grad in self.states:
            st.c.grad = grad
            st.pending[:] = pending
            st._pending_token = token


def task_accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of rows of ``logits`` (b, k) whose argmax is ``y`` (b,)."""
    return float((logits.argmax(dim=1) == y).double().mean())


class MAML:
    """Model-agnostic meta-learning over a pinet network ``model`` (infinite or finite).

    Args:
        model: any network built from pinet's layers (:class:`pinet.InfPiMLP`, a sample from
            :func:`pinet.sample`, a custom net). Infinite layers in the adapted set must be
            :class:`pinet.InfPiLayer` s (their output formula is known).
        step_size: inner step size ``ε``.
        num_steps: inner steps ``K >= 1``.
        adapt: the adapted set, one of :data:`ADAPT`.
        first_order: drop the derivatives through the inner steps.
        project_inner: project the inner gradients of finite layers onto their ``Ω`` span
            (``--Gproj-inner``; infinite layers' π-updates are projected by construction).
        loss_fn: ``loss_fn(logits, y) -> scalar``; default cross-entropy.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        step_size: float = 0.1,
        num_steps: int = 1,
        adapt: str = "readout",
        first_order: bool = False,
        project_inner: bool = True,
        loss_fn=None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAML: model must be an nn.Module, got {type(model).__name__}")
        if (
            isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size)
            or step_size < 0
        ):  # fmt: skip
            # A negative inner step ascends the support loss: a sign slip, not a setting.
            raise ValueError(f"MAML: step_size must be a finite number >= 0, got {step_size!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"MAML: num_steps must be an int >= 1, got {num_steps!r}")
        if adapt not in ADAPT:
            raise ValueError(f"MAML: adapt must be one of {ADAPT}, got {adapt!r}")
        for name, v in (("first_order", first_order), ("project_inner", project_inner)):
            if not isinstance(v, bool):
                raise TypeError(f"MAML: {name} must be a bool, got {v!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"MAML: loss_fn must be a callable (logits, y) -> loss or None, got {type(loss_fn).__name__}")
        self.model = model
        self.step_size = float(step_size)
        self.num_steps = int(num_steps)  # numpy integers pass the check
        self.adapt_set = adapt
        self.first_order = first_order
        self.project_inner = project_inner
        self.loss_fn = loss_fn or TF.cross_entropy
        self._discover()

    # ------------------------------------------------------------------ structure
    def _discover(self) -> None:
        model = self.model
        roles = layer_roles(model)
        if not roles:
            raise ValueError(f"MAML: {type(model).__name__} contains no pinet layer")
        prefixes = sorted(roles, key=lambda n: -len(n))

        def owner_role(name: str) -> str | None:
            owner = next((p for p in prefixes if p == "" or name == p or name.startswith(p + ".")), None)
            return roles[owner] if owner is not None else None

        def adapted(role: str | None) -> bool:
            if self.adapt_set == "all":
                return True
            if self.adapt_set == "readout":
                return role == "readout"
            return role != "readout"

        coef_ids = {id(m.c) for m in model.modules() if isinstance(m, PiState)}
        self.params = {n: p for n, p in model.named_parameters() if id(p) not in coef_ids and adapted(owner_role(n))}
        self.layers: dict[str, InfPiLayer] = {}
        for name, m in model.named_modules():
            if isinstance(m, PiState):
                owner = name.rsplit(".", 1)[0] if "." in name else ""
                layer = model.get_submodule(owner) if owner else model
                if not adapted(owner_role(name)):
                    continue
                if not isinstance(layer, InfPiLayer):
                    raise TypeError(
                        f"MAML: the π-state {name!r} belongs to a {type(layer).__name__}, not an InfPiLayer; its "
                        "adapted rows cannot be added to its output. Leave it out of the adapted set (adapt=...)"
                    )
                self.layers[owner] = layer
        self.infinite = any(isinstance(m, InfPiModule) for m in model.modules())
        # Finite projectors of adapted parameters (name -> FinPiState).
        self.projectors: dict[str, FinPiState] = {}
        for name, m in model.named_modules():
            proj = next((c for c in m.children() if isinstance(c, FinPiState)), None)
            if proj is None:
                continue
            declared = getattr(m, "projected_parameters", None)
            pairs = declared() if callable(declared) else m.named_parameters()
            for pname, _ in pairs:
                full = f"{name}.{pname}" if name else pname
                if full in self.params:
                    self.projectors[full] = proj
        if not self.params and not self.layers:
            raise ValueError(f"MAML: adapt={self.adapt_set!r} selects nothing in {type(model).__name__}")

    # ------------------------------------------------------------------ inner loop
    def adapt(self, x: Tensor, y: Tensor, *, create_graph: bool | None = None) -> Adapted:
        """Run the inner loop on the support set ``x`` (s, d), ``y`` (s,). ``create_graph``
        defaults to ``not first_order``; with ``False`` the adapted values are the base ones plus
        constants (first order: the meta-gradient is the query gradient at the adapted net).

        Raises ``NotImplementedError`` for second order at infinite width when an inner gradient
        passes backward through a stored π-product (module docstring)."""
        second = (not self.first_order) if create_graph is None else bool(create_graph)
        params = dict(self.params)
        rows: dict[str, _Rows] = {}
        losses = []
        eps = self.step_size
        for _ in range(self.num_steps):
            taps: list = []
            with capture_rows(False) as cap:
                with _layer_hooks(self.model, self.layers, rows, taps):
                    out = functional_call(self.model, params, (x,), strict=False)
                loss = self.loss_fn(out, y)
                names = list(params)
                inputs = [params[n] for n in names] + [t[2] for t in taps]
                grads = torch.autograd.grad(loss, inputs, create_graph=second, allow_unused=True)
            if second and self.infinite and cap.suppressed:
                raise NotImplementedError(
                    f"MAML: second order with adapt={self.adapt_set!r} on an infinite net differentiates "
                    "stored π-products' backward with respect to their rows, whose meta-gradient is not a set "
                    "of π-rows (docs/meta.md); use adapt='readout' (the paper's --adapt-readout-only), "
                    "first_order=True, or a finite π-net"
                )
            losses.append(float(loss.detach()))
            new = {}
            for n, g in zip(names, grads[: len(names)]):
                p = params[n]
                if g is None:
                    new[n] = p
                    continue
                if self.project_inner and n in self.projectors:
                    g = self.projectors[n].project(g)
                new[n] = p - eps * (g if second else g.detach())
            params = new
            for (name, g_in, _), d in zip(taps, grads[len(names) :]):
                if d is None:
                    continue
                layer = self.layers[name]
                s, gbar = normalize_rows(g_in)
                delta = layer.alpha * d  # ∂loss/∂(value before alpha): what pinet's capture records
                A = delta if layer.layernorm else s * delta
                step = _Rows(A, gbar, torch.full((A.shape[0],), -eps, dtype=A.dtype, device=A.device))
                if not second:
                    step = _Rows(step.A.detach(), step.B.detach(), step.coef)
                rows[name] = step if name not in rows else rows[name].cat(step)
        return Adapted(params, rows, losses)

    def forward(self, adapted: Adapted, x: Tensor) -> Tensor:
        """The adapted net's output at ``x`` (q, d) -> (q, k); row capture on (meta-gradient)."""
        with _layer_hooks(self.model, self.layers, adapted.rows, None):
            return functional_call(self.model, adapted.params, (x,), strict=False)

    # ------------------------------------------------------------------ outer loop
    def meta_backward(self, tasks, *, scale: float | None = None) -> dict:
        """Accumulate the meta-gradient of the mean query loss over ``tasks`` (a list of
        :data:`Task`) into ``.grad`` and the π-states' captured rows, one task at a time (each
        task's graph and adapted rows are freed after its backward). ``scale`` multiplies each
        task's loss (default ``1 / len(tasks)``: the mean, as the reference; a finite number
        >= 0). Returns the mean outer loss and query accuracy after adaptation.

        All or nothing: if a task fails (a loss that raises, mismatched shapes) every ``.grad`` and
        every π-state's captured rows are as before the call, so a following ``step()`` cannot
        apply the meta-gradient of only the tasks before it."""
        tasks = self._check_tasks("MAML.meta_backward", tasks)
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0
        ):  # fmt: skip
            # A negative scale ascends the query loss; NaN would only fail at the next step().
            raise ValueError(f"MAML.meta_backward: scale must be a finite number >= 0 or None, got {scale!r}")
        scale = 1.0 / len(tasks) if scale is None else float(scale)
        saved = _GradSnapshot(self.model)
        total, acc = 0.0, 0.0
        try:
            for xs, ys, xq, yq in tasks:
                adapted = self.adapt(xs, ys)
                out = self.forward(adapted, xq)
                loss = self.loss_fn(out, yq)
                (loss * scale).backward()
                total += float(loss.detach())
                acc += task_accuracy(out.detach(), yq)
                del adapted, out, loss
        except BaseException:
            saved.restore()
            raise
        return {"outer_loss": total / len(tasks), "accuracy": acc / len(tasks)}

    def meta_step(self, tasks, optimizer) -> dict:
        """One meta-update: ``optimizer.zero_grad()``, :meth:`meta_backward`, ``optimizer.step()``
        (a :class:`pinet.optim.PiOptimizerWrapper`, or any torch optimizer for a finite net). If
        the meta-gradient or the step fails, the gradients and captured rows are put back as they
        were before ``zero_grad()`` (the wrapper's step itself is all or nothing)."""
        tasks = self._check_tasks("MAML.meta_step", tasks)
        saved = _GradSnapshot(self.model)
        try:
            optimizer.zero_grad()
            stats = self.meta_backward(tasks)
            optimizer.step()
        except BaseException:
            saved.restore()
            raise
        return stats

    @staticmethod
    def _check_tasks(where: str, tasks) -> list:
        # Before any backward: a mismatch found at the third task would otherwise surface as
        # torch's "Expected input batch_size (5) to match target batch_size (4)".
        if isinstance(tasks, (Tensor, str, bytes)) or not hasattr(tasks, "__iter__"):
            raise TypeError(f"{where}: tasks must be a list of (x_support, y_support, x_query, y_query), got {type(tasks).__name__}")
        tasks = list(tasks)
        if not tasks:
            raise ValueError(f"{where}: tasks is empty")
        for i, task in enumerate(tasks):
            if not isinstance(task, (tuple, list)) or len(task) != 4 or not all(isinstance(t, Tensor) for t in task):
                raise TypeError(f"{where}: task {i} must be a tuple of 4 tensors (x_support, y_support, x_query, y_query)")
            xs, ys, xq, yq = task
            for part, x, y in (("support", xs, ys), ("query", xq, yq)):
                if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
                    raise ValueError(
                        f"{where}: task {i} has {tuple(x.shape)[:1]} {part} inputs but {tuple(y.shape)[:1]} {part} "
                        "labels; they must have the same number of rows"
                    )
        return tasks

    def evaluate(self, tasks) -> dict:
        """Mean query loss and accuracy after adaptation over ``tasks`` (no meta-gradient; the
        net is not changed)."""
        tasks = list(tasks)
        if not tasks:
            raise ValueError("MAML.evaluate: tasks is empty")
        total, acc = 0.0, 0.0
        for xs, ys, xq, yq in tasks:
            with torch.enable_grad():
                adapted = self.adapt(xs, ys, create_graph=False)
            with torch.no_grad():
                out = self.forward(adapted, xq)
                total += float(self.loss_fn(out, yq))
                acc += task_accuracy(out, yq)
            del adapted
        return {"outer_loss": total / len(tasks), "accuracy": acc / len(tasks)}
