"""Pure functions of the π-limit: the ReLU dual ``J``, the π-layer forward, the π-gradient norm and
the finite-width projection.

Everything here is stateless math, differentiable by autograd, and imports no kernel: the fast
π-product and its backends live in :mod:`pinet.kernels` (tested against :func:`pi_product`
here), and :mod:`pinet.state`, :mod:`pinet.layers`, :mod:`pinet.models` are thin owners of
tensors around these functions.
Shapes: ``b`` batch, ``M`` rows of a π-layer, ``r`` rank, ``r_out`` output rank, ``n`` width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "J",
    "J_prime",
    "normalize_rows",
    "pi_product",
    "pi_rows_sqnorm",
    "project",
    "relu_kernel",
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


def pi_product(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor) -> Tensor:
    """The π-product by its formula, ``u = (J(ḡ Bᵀ) ⊙ c) A``, through plain autograd.

    Shapes: ḡ (b, r) unit rows, A (M, r_out), B (M, r) unit rows, c (M,) -> u (b, r_out) in
    ``ḡ``'s dtype (storage rows are converted to it). This is the one source of truth the fast
    kernels in :mod:`pinet.kernels` are tested against, and their double-backward path; it keeps
    every (b, M) intermediate, so layers call :func:`pinet.kernels.pi_layer` instead.
    """
    dt = gbar.dtype
    return (J(gbar @ B.to(dt).T) * c.to(dt)) @ A.to(dt)


def __getattr__(name: str):
    # pi_layer moved with the kernel dispatch (this module is math only); say where it went.
    if name == "pi_layer":
        raise AttributeError(
            "pinet.functional.pi_layer moved to pinet.kernels.pi_layer (same arguments); "
            "pinet.functional.pi_product is the plain formula"
        )
    raise AttributeError(f"module 'pinet.functional' has no attribute {name!r}")


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
