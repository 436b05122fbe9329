"""The naive baseline of the step benchmark: an infinite π-MLP as a first implementation writes it.

It computes the same function and the same training step as ``pinet.InfPiMLP`` trained by
``PiOptimizerWrapper(torch.optim.SGD(..., momentum=μ), hooks=[ClipGradNorm(max_norm,
per_param=True)])`` (``tests/test_performance.py`` checks both), but makes the two choices the
benchmark measures against:

* growth by concatenation: every step builds new ``A``, ``B``, ``c`` (and velocity) tensors with
  ``torch.cat``, copying the whole π-state (what ``pilimit_lib`` does);
* the textbook matmul orientation ``q = ḡ @ Bᵀ`` and ``out = w @ A``, differentiated by plain
  autograd, which keeps every ``b × M`` intermediate for the backward.

Storage in a half dtype is converted to float32 as a whole before use (``B.float()``), again what
a first implementation does. Nothing here is used by the library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["NaiveInfPiMLP", "NaiveTrainer"]

_TWO_PI = 2.0 * math.pi


class _NaiveJ(torch.autograd.Function):
    # J(c) = (sqrt(1 - c²) + arccos(-c) c) / 2π with derivative J'(c) = arccos(-c) / 2π. A first
    # implementation still needs this much care: autograd through sqrt gives NaN at |c| = 1.
    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:  # type: ignore[override]
        c = c.clamp(-1.0, 1.0)
        ctx.save_for_backward(c)
        return (torch.sqrt(1.0 - c * c) + torch.arccos(-c) * c) / _TWO_PI

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (c,) = ctx.saved_tensors
        return grad * torch.arccos(-c) / _TWO_PI


class _NaivePiLayer:
    """One infinite π-layer: rows ``A`` (M, r_out), ``B`` (M, r_in), coefficients ``c`` (M,),
    the coefficient velocity ``v`` (M,) of momentum SGD, and an ordinary ``bias`` (r_out,)."""

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, bias: Tensor | None, alpha: float, bias_alpha: float):
        self.A, self.B = A.detach().clone(), B.detach().clone()
        self.c = c.detach().clone()  # float32 or wider (pinet never stores coefficients in half)
        self.v: Tensor | None = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.alpha, self.bias_alpha = alpha, bias_alpha
        self.captured: tuple[Tensor, Tensor] | None = None  # (s, ḡ) of the last forward
        self.delta: Tensor | None = None  # ∂loss/∂(pre-alpha output) of the last backward

    def forward(self, g: Tensor) -> Tensor:
        """(b, r_in) -> (b, r_out): ``alpha ((s J(ḡ Bᵀ) ⊙ c) A + bias_alpha bias)``."""
        s = g.norm(dim=1, keepdim=True)
        gbar = g / s.clamp_min(torch.finfo(g.dtype).tiny)
        q = gbar @ self.B.to(g.dtype).T  # (b, M)
        w = s * _NaiveJ.apply(q) * self.c.to(g.dtype)  # (b, M)
        out = w @ self.A.to(g.dtype)  # (b, r_out)
        if self.bias is not None:
            out = out + self.bias_alpha * self.bias
        if torch.is_grad_enabled():
            self.captured = (s.detach(), gbar.detach())
            if not out.requires_grad:
                out.requires_grad_()
            out.register_hook(self._capture)
        return self.alpha * out

    def _capture(self, grad: Tensor) -> None:
        self.delta = grad.detach()


class NaiveInfPiMLP(nn.Module):
    """Infinite π-MLP (input layer, hidden π-layers, output π-layer) with concatenation growth.

    Build it from a ``pinet.InfPiMLP`` with :meth:`from_pinet` (same weights, same function).
    ``forward``: (b, d_in) -> (b, d_out).
    """

    def __init__(self, A0: Tensor, b0: Tensor | None, alpha_in: float, bias_alpha: float, pi: list[_NaivePiLayer]):
        super().__init__()
        self.A0 = nn.Parameter(A0.detach().clone())
        self.b0 = None if b0 is None else nn.Parameter(b0.detach().clone())
        self.alpha_in, self.bias_alpha = alpha_in, bias_alpha
        self.pi = pi
        for i, layer in enumerate(pi):
            if layer.bias is not None:
                self.register_parameter(f"bias{i}", layer.bias)

    @classmethod
    def from_pinet(cls, net) -> "NaiveInfPiMLP":
        """Copy the weights, rows and multipliers of a ``pinet.InfPiMLP``."""
        first = net.layers[0]
        pi = [
            _NaivePiLayer(l.state.A, l.state.B, l.state.c, l.bias, l.alpha, l.bias_alpha)
            for l in net.layers[1:]
        ]
        if any(l.layernorm for l in net.layers[1:]):
            raise ValueError("NaiveInfPiMLP: layernorm is not part of the baseline")
        return cls(first.A, first.bias, first.alpha, first.bias_alpha, pi)

    @property
    def rows(self) -> int:
        """M of the first π-layer."""
        return self.pi[0].A.shape[0]

    def state_bytes(self) -> int:
        """Bytes of ``A``, ``B`` and ``c`` over all π-layers."""
        return sum(t.numel() * t.element_size() for l in self.pi for t in (l.A, l.B, l.c))

    def forward(self, x: Tensor) -> Tensor:
        g = x.to(self.A0.dtype) @ self.A0
        if self.b0 is not None:
            g = g + self.bias_alpha * self.b0
        g = self.alpha_in * g
        for layer in self.pi:
            g = layer.forward(g)
        return g


def _rows_sqnorm(A: Tensor, B: Tensor) -> Tensor:
    # ‖Δ‖² = tr(Aᵀ K A), K_ij = J(B_i · B_j): the π-layer's gradient norm (spec).
    K = _NaiveJ.apply(B @ B.T)
    return ((A @ A.T) * K).sum()


class NaiveTrainer:
    """``step(x, y)``: forward, cross-entropy, backward, per-parameter clipping to ``max_norm``,
    momentum SGD (coefficient space for π-layers), growth by ``torch.cat``. Returns the loss."""

    def __init__(self, model: NaiveInfPiMLP, lr: float, momentum: float = 0.0, max_norm: float | None = None):
        self.model, self.lr, self.momentum, self.max_norm = model, lr, momentum, max_norm
        self.buf: dict[int, Tensor] = {}

    def _clip(self, sqnorm: Tensor) -> float:
        if self.max_norm is None:
            return 1.0
        coef = self.max_norm / (float(sqnorm.sqrt()) + 1e-6)
        return min(coef, 1.0)

    @torch.no_grad()
    def _sgd(self, p: Tensor, grad: Tensor) -> None:
        buf = self.buf.get(id(p))
        buf = grad.clone() if buf is None else buf.mul_(self.momentum).add_(grad)
        self.buf[id(p)] = buf
        p.sub_(self.lr * buf)

    def step(self, x: Tensor, y: Tensor) -> float:
        model = self.model
        for p in model.parameters():
            p.grad = None
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    self._sgd(p, p.grad * self._clip(p.grad.square().sum()))
            for layer in model.pi:
                s, gbar = layer.captured
                A_new = (s * layer.delta).to(layer.A.dtype)
                B_new = gbar.to(layer.B.dtype)
                coef = self._clip(_rows_sqnorm(s * layer.delta, gbar))
                k = A_new.shape[0]
                # The π-update: append the rows, then momentum SGD on c with gradient coef · e_new.
                layer.A = torch.cat([layer.A, A_new])
                layer.B = torch.cat([layer.B, B_new])
                layer.c = torch.cat([layer.c, layer.c.new_zeros(k)])
                grad = torch.cat([layer.c.new_zeros(layer.c.shape[0] - k), layer.c.new_full((k,), coef)])
                if layer.v is None:
                    layer.v = grad
                else:
                    layer.v = torch.cat([layer.v * self.momentum, layer.v.new_zeros(k)]) + grad
                layer.c = layer.c - self.lr * layer.v
                layer.captured = layer.delta = None
        return float(loss.detach())
