"""Pure functions of the π-limit: the ReLU dual ``J``, the π-layer forward, the π-gradient norm and
the finite-width projection.

Everything here is stateless and differentiable by autograd; the modules in :mod:`pinet.state`,
:mod:`pinet.layers` and :mod:`pinet.models` are thin owners of tensors around these functions.
Shapes: ``b`` batch, ``M`` rows of a π-layer, ``r`` rank, ``r_out`` output rank, ``n`` width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "J",
    "J_prime",
    "relu_kernel",
    "normalize_rows",
    "pi_layer",
    "pi_rows_sqnorm",
    "project",
]

_TWO_PI = 2.0 * math.pi


def J_prime(c: Tensor) -> Tensor:
    """``J'(c) = E[relu'(u) relu'(v)] = arccos(-c) / (2π)`` for correlation ``c`` (any shape).

    Values outside ``[-1, 1]`` (rounding of unit-vector cosines) are clamped.
    """
    return torch.arccos(-c.clamp(-1.0, 1.0)) / _TWO_PI


class _JFunction(torch.autograd.Function):
    # J(c) = (sqrt(1 - c^2) + arccos(-c) c) / 2π. Autograd through that formula produces
    # -c/sqrt(1-c^2) + c/sqrt(1-c^2) = inf - inf = NaN at |c| = 1, although the true derivative
    # J'(c) is finite everywhere; this function returns J'(c) directly. Cosines of unit vectors can
    # round to 1 + 1e-16, so the input is clamped and the gradient passes straight through the clamp
    # (J is extended by its tangent, not by a constant that would kill the gradient).

    @staticmethod
    def forward(ctx, c: Tensor) -> Tensor:  # type: ignore[override]
        # Save the raw input: clamping again in backward keeps double backward connected to it.
        ctx.save_for_backward(c)
        c = c.clamp(-1.0, 1.0)
        return (torch.sqrt(1.0 - c * c) + torch.arccos(-c) * c) / _TWO_PI

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (c,) = ctx.saved_tensors
        # Written with differentiable ops so that double backward works away from |c| = 1.
        return grad * J_prime(c)


def J(c: Tensor) -> Tensor:
    """``J(c) = E[relu(u) relu(v)]`` for unit-variance Gaussians of correlation ``c`` (any shape).

    ``J(c) = (sqrt(1 - c²) + (π - arccos c) c) / (2π)``; its autograd derivative is exactly
    ``J'(c)`` (finite at ``c = ±1``).
    """
    return _JFunction.apply(c)


def relu_kernel(x: Tensor, y: Tensor | None = None) -> Tensor:
    """``E[relu(u) relu(v)]`` for Gaussians with covariance given by rows: ``(p, r), (q, r) -> (p, q)``.

    ``u = x_i · z``, ``v = y_j · z`` with ``z ~ N(0, I)``, i.e. ``‖x_i‖ ‖y_j‖ J(cos(x_i, y_j))``.
    """
    y = x if y is None else y
    nx = x.norm(dim=1, keepdim=True)
    ny = y.norm(dim=1, keepdim=True)
    cos = (x / _safe(nx)) @ (y / _safe(ny)).T
    return nx * ny.T * J(cos)


def _safe(norm: Tensor) -> Tensor:
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


def normalize_rows(g: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``g`` (b, r) into scale ``s = ‖g‖`` (b, 1) and direction ``ḡ = g / s`` (b, r).

    A zero row gets ``ḡ = 0`` (it is multiplied by ``s = 0`` everywhere it matters).
    """
    s = g.norm(dim=1, keepdim=True)
    return s, g / _safe(s)


def pi_layer(
    g: Tensor,
    A: Tensor,
    B: Tensor,
    c: Tensor,
    *,
    layernorm: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Infinite π-layer without bias: ``out = (s · J(ḡ Bᵀ) ⊙ c) A``.

    Args:
        g: (b, r) input coordinates, in the compute dtype.
        A: (M, r_out) rows, any storage dtype.
        B: (M, r) unit rows, same storage dtype as ``A``.
        c: (M,) coefficients.
        layernorm: the layer sees ``ḡ`` only (``s = 1``).
        chunk_size: evaluate the ``b × M`` intermediates ``chunk_size`` rows of ``M`` at a time
            (bounds temporary memory; results equal up to summation order).

    Returns:
        ``(out, s, ḡ)``: out (b, r_out) in ``g``'s dtype, the scale ``s`` (b, 1) the layer used
        (ones with layernorm) and ``ḡ`` (b, r). ``s`` and ``ḡ`` are what the π-update appends.
    """
    s, gbar = normalize_rows(g)
    if layernorm:
        s = torch.ones_like(s)
    M = B.shape[0]
    if chunk_size is None or chunk_size >= M:
        out = _pi_block(gbar, s, A, B, c)
    else:
        out = None
        for start in range(0, M, chunk_size):
            stop = min(start + chunk_size, M)
            part = _pi_block(gbar, s, A[start:stop], B[start:stop], c[start:stop])
            out = part if out is None else out + part
        if out is None:  # M == 0
            out = g.new_zeros(g.shape[0], A.shape[1])
    return out, s, gbar


def _pi_block(gbar: Tensor, s: Tensor, A: Tensor, B: Tensor, c: Tensor) -> Tensor:
    # Orientation matters on CPU: with M >> r, (B @ ḡᵀ)ᵀ streams B once with a small right-hand
    # side and measured ~2.6x faster than ḡ @ Bᵀ; autograd then uses the same orientation for
    # the backward products.
    store = B.dtype
    q = (B @ gbar.to(store).T).T.to(gbar.dtype)  # (b, M) cosines
    w = J(q) * c.to(gbar.dtype) * s  # (b, M)
    return (A.T @ w.to(store).T).T.to(gbar.dtype)  # (b, r_out)


def pi_rows_sqnorm(A: Tensor, B: Tensor, coef: Tensor | None = None) -> Tensor:
    """Squared norm of the π-update made of rows ``(A, B)`` with coefficients ``coef``.

    ``‖Δ‖² = Σ_ij coef_i coef_j (A_i · A_j) J(B_i · B_j)`` which is ``tr(Aᵀ K A)`` for unit
    coefficients, ``K_ij = J(B_i · B_j)``. Shapes: A (k, r_out), B (k, r), coef (k,); returns a
    0-dim tensor in ``coef``'s (or ``A``'s) dtype. This is the Frobenius norm the finite layer's
    projected gradient converges to.
    """
    dtype = coef.dtype if coef is not None else A.dtype
    A = A.to(dtype)
    B = B.to(dtype)
    if coef is not None:
        A = A * coef[:, None]
    K = J(B @ B.T)
    return ((A @ A.T) * K).sum()


def project(X: Tensor, omega: Tensor, gram_inv: Tensor) -> Tensor:
    """Project ``X`` onto the column span of ``Ω``: ``Ω ((ΩᵀΩ)⁻¹ (Ωᵀ X))``.

    Shapes: X (n, ...) (weight gradients (n, m) or bias gradients (n,)), Ω (n, r),
    ``gram_inv`` (r, r). Never forms the ``n × n`` projector.
    """
    flat = X.reshape(X.shape[0], -1)
    out = omega @ (gram_inv @ (omega.T @ flat))
    return out.reshape(X.shape)
