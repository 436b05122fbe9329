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

from . import native

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
        g: (b, r) input coordinates, in the compute dtype (float32 or wider).
        A: (M, r_out) rows, any storage dtype (float32, float64, bfloat16, float16).
        B: (M, r) unit rows, same storage dtype as ``A``.
        c: (M,) coefficients (float32 or wider).
        layernorm: the layer sees ``ḡ`` only (``s = 1``).
        chunk_size: process at most ``chunk_size`` rows of ``M`` at a time in the forward *and*
            the backward and keep nothing of size ``b × M`` for the backward (it recomputes the
            cosines per chunk), so a training step's temporaries are ``O(b × chunk_size)``.
            ``None`` (default): storage in the compute dtype is processed in one block, half
            storage in blocks of up-converted rows, and one ``b × M`` float tensor is kept for
            the backward (temporaries ``O(b × M)``). Results equal up to summation order.

    Returns:
        ``(out, s, ḡ)``: out (b, r_out) in ``g``'s dtype, the scale ``s`` (b, 1) the layer used
        (ones with layernorm) and ``ḡ`` (b, r). ``s`` and ``ḡ`` are what the π-update appends.

    Storage rows are read in their own dtype and converted block by block, so half-precision
    storage halves the memory traffic while every product and sum runs in ``g``'s dtype. Autograd
    gradients with respect to ``g``, ``A``, ``B`` and ``c`` are exact (double backward included).
    With :func:`pinet.native.enable` in effect, float32 CPU products summed over the rows
    (``wᵀ A``, ``(∂L/∂q)ᵀ B``) run in pinet's AVX2 kernel instead of torch's BLAS.
    """
    s, gbar = normalize_rows(g)
    if layernorm:
        s = torch.ones_like(s)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"pi_layer: chunk_size must be a positive int or None, got {chunk_size!r}")
    # s multiplies the (b, r_out) result instead of the (b, M) weights: one pass less over a b × M
    # tensor, and the product's backward then never needs s (its gradient is δ · u).
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gbar, A, B, c)):
        u = _PiProduct.apply(gbar, A, B, c, chunk_size)
    else:
        u = _pi_product_forward(gbar, A, B, c, chunk_size, keep=False)[0]
    return s * u, s, gbar


# Rows per block in automatic mode when the storage dtype differs from the compute dtype: each
# block of A and B is up-converted to a temporary, so blocks bound those copies (a block of 8192
# float32 rows of r = 400 is 13 MB) while staying large enough that the per-block operator calls
# (about 15, ~5-10 µs each on CPU) cost little next to the block's products. On GPUs a call is
# cheap relative to the Python overhead of a block but many more rows are needed to fill the
# device, hence the larger value there.
_HALF_BLOCK_ROWS = {"cpu": 8192}
_HALF_BLOCK_ROWS_OTHER = 1 << 17


def _block_rows(M: int, chunk_size: int | None, converts: bool, device: torch.device) -> int:
    """Rows of M per block. An explicit ``chunk_size`` wins. Otherwise storage in the compute
    dtype is processed in one block: measured on a 2-core CPU at M = 20k-40k, b = 8, splitting into
    2048-16384-row blocks only added per-call overhead (5-20% slower; nothing is reused between the
    products of a block, since the forward's arccos is kept for the backward)."""
    if chunk_size is not None:
        rows = chunk_size
    elif converts:
        rows = _HALF_BLOCK_ROWS.get(device.type, _HALF_BLOCK_ROWS_OTHER)
    else:
        rows = M
    return max(1, min(M, rows))


def _j_parts(q: Tensor, acos_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """From cosines ``q`` (any shape; clamped in place) return ``(2π J(q), 2π J'(q))``.

    ``2π J = sqrt(1 - q²) + arccos(-q) q`` and ``2π J' = arccos(-q)``; the 1/2π is folded into
    the coefficients by the callers, saving a pass over the (block, b) tensors. ``acos_out``
    (q's shape) receives ``arccos(-q)`` in place of a new tensor.
    """
    q.clamp_(-1.0, 1.0)
    acos = torch.neg(q, out=acos_out) if acos_out is not None else torch.neg(q)
    acos.arccos_()
    j = torch.mul(q, q).neg_().add_(1.0).sqrt_().addcmul_(acos, q)
    return j, acos


def _add_reduce(out: Tensor, V: Tensor, X: Tensor) -> None:
    """``out += Vᵀ X``: out (n, K), V (m, n), X (m, K). The native kernel serves float32 CPU
    tensors when :func:`pinet.native.enable` is in effect; everything else is ``addmm_``."""
    if native.enabled() and out.dtype == torch.float32 and out.device.type == "cpu":
        native.reduce_into(out, V, X)
    else:
        out.addmm_(V.T, X)


def _pi_product_forward(
    gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None, keep: bool
) -> tuple[Tensor, Tensor | None]:
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out), evaluated block by block over the M rows.

    Orientation: every product is written with the state block as the *left* row-major operand
    (``B_blk @ ḡᵀ``, then ``w_blkᵀ @ A_blk``), which streams the M × r rows once with a thin
    right-hand side; on CPU ``ḡ @ Bᵀ`` measured 2.6× slower and ``Aᵀ @ wᵀ`` (transposed left
    operand) far slower still. With ``keep`` it also returns ``arccos(-q)`` (M, b), which is all
    the backward needs from the forward when only ``ḡ`` (or ``B``) requires a gradient.
    """
    dt = gbar.dtype
    b, M = gbar.shape[0], B.shape[0]
    u = gbar.new_zeros(b, A.shape[1])
    acos_all = gbar.new_empty(M, b) if keep else None
    gT = gbar.T  # (r, b)
    step = _block_rows(M, chunk_size, B.dtype != dt or A.dtype != dt, B.device)
    for start in range(0, M, step):
        stop = min(start + step, M)
        q = B[start:stop].to(dt) @ gT  # (m, b) cosines
        w, _ = _j_parts(q, None if acos_all is None else acos_all[start:stop])
        w.mul_(c[start:stop, None].to(dt) / _TWO_PI)  # (m, b) = J(q) c
        _add_reduce(u, w, A[start:stop].to(dt))
    return u, acos_all


class _PiProduct(torch.autograd.Function):
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` with a hand-written, block-wise backward.

    Autograd through the plain formula would keep every (b, M) intermediate and run two of its
    four products in the slow orientation (``Bᵀ @ grad`` streams B transposed). This backward
    uses, per block of rows, ``∂L/∂w = A_blk @ δᵀ`` and ``∂L/∂ḡ += (∂L/∂q)ᵀ B_blk``: A and B
    are each read once, in the fast orientation, and nothing larger than a block is allocated
    besides the (M, b) ``arccos(-q)`` an automatic-size forward keeps (a ``chunk_size`` forward
    keeps nothing and the backward recomputes the block's cosines, one extra product on a block
    that the next product then reads from cache).

    Shapes: ḡ (b, r), A (M, r_out), B (M, r), c (M,) -> u (b, r_out).
    """

    @staticmethod
    def forward(ctx, gbar, A, B, c, chunk_size):  # type: ignore[override]
        # A chunk_size bounds memory: keep nothing of size b × M, recompute cosines per block.
        keep = chunk_size is None
        u, acos = _pi_product_forward(gbar, A, B, c, chunk_size, keep=keep)
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(gbar, A, B, c, acos)
        return u

    @staticmethod
    def backward(ctx, grad_u):  # type: ignore[override]
        gbar, A, B, c, acos_all = ctx.saved_tensors
        need_g, need_A, need_B, need_c = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradient itself must be differentiable, so
            # recompute through the plain autograd formula (materialises b × M; rare path).
            return _differentiable_backward(gbar, A, B, c, grad_u, ctx.needs_input_grad[:4]) + (None,)
        dt = gbar.dtype
        M = B.shape[0]
        grad_u = grad_u.to(dt)
        guT = grad_u.T  # (r_out, b)
        g_gbar = torch.zeros_like(gbar) if need_g else None
        g_A = torch.empty(A.shape, dtype=dt, device=A.device) if need_A else None
        g_B = torch.empty(B.shape, dtype=dt, device=B.device) if need_B else None
        g_c = torch.empty(M, dtype=dt, device=c.device) if need_c else None
        # J(q) itself is needed only for the gradients of A and c; then recompute the cosines.
        recompute = acos_all is None or need_A or need_c
        step = _block_rows(M, ctx.chunk_size, B.dtype != dt or A.dtype != dt, B.device)
        for start in range(0, M, step):
            stop = min(start + step, M)
            Bb = B[start:stop].to(dt)
            gw = A[start:stop].to(dt) @ guT  # (m, b) = ∂L/∂(J(q) c)
            if recompute:
                j, acos = _j_parts(Bb @ gbar.T)
            else:
                j, acos = None, acos_all[start:stop]
            cb = c[start:stop, None].to(dt) / _TWO_PI  # per block: nothing of size M is allocated
            if need_A:
                g_A[start:stop] = torch.mm(j * cb, grad_u)  # (m, r_out) = (J c)ᵀ δ
            if need_c:
                g_c[start:stop] = (gw * j).sum(1) / _TWO_PI
            if need_g or need_B:
                gq = gw.mul_(acos).mul_(cb)  # (m, b) = ∂L/∂q; gw is not needed after this
                if need_g:
                    _add_reduce(g_gbar, gq, Bb)
                if need_B:
                    g_B[start:stop] = gq @ gbar
        return (
            g_gbar,
            None if g_A is None else g_A.to(A.dtype),
            None if g_B is None else g_B.to(B.dtype),
            None if g_c is None else g_c.to(c.dtype),
            None,
        )


def _pi_block(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor) -> Tensor:
    """Plain autograd formula ``(J(ḡ Bᵀ) ⊙ c) A`` in ``ḡ``'s dtype (b, r_out).

    The reference the fast path is tested against and the double-backward path; it materialises
    every (b, M) intermediate.
    """
    dt = gbar.dtype
    return (J(gbar @ B.to(dt).T) * c.to(dt)) @ A.to(dt)


def _differentiable_backward(gbar, A, B, c, grad_u, needs) -> tuple:
    inputs = [t for t, n in zip((gbar, A, B, c), needs) if n]
    with torch.enable_grad():
        u = _pi_block(gbar, A, B, c)
        grads = iter(torch.autograd.grad(u, inputs, grad_u, create_graph=True, allow_unused=True))
    return tuple(next(grads) if n else None for n in needs)


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
