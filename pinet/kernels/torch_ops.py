"""The ``"torch"`` backend of the π-product: block-wise forward and backward built from torch ops.

``u = (J(ḡ Bᵀ) ⊙ c) A`` as one custom autograd function (:class:`PiProduct`) whose forward and
backward stream the state rows once each, in the orientation torch's BLAS runs fastest. The
``"native"`` backend is the same code with the two row-reduce products (``wᵀ A`` forward,
``(∂L/∂q)ᵀ B`` backward) computed by :func:`pinet.kernels.native.reduce_into` for float32 CPU
tensors. Shapes: ḡ (b, r), A (M, r_out), B (M, r), c (M,) -> u (b, r_out).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..functional import pi_product as _reference_product
from . import native

__all__ = ["PiProduct", "backward", "native_reduce", "pi_product", "torch_reduce"]

_TWO_PI = 2.0 * math.pi

# out += Vᵀ X: out (n, K), V (m, n), X (m, K).
Reduce = Callable[[Tensor, Tensor, Tensor], None]


def torch_reduce(out: Tensor, V: Tensor, X: Tensor) -> None:
    """``out += Vᵀ X`` with torch's BLAS (``addmm_``)."""
    out.addmm_(V.T, X)


def native_reduce(out: Tensor, V: Tensor, X: Tensor) -> None:
    """``out += Vᵀ X``: pinet's AVX2 kernel for float32 CPU tensors, ``addmm_`` otherwise.

    The kernel reads raw row-major pointers; a non-contiguous ``X`` (a block of a transposed
    ``A`` or ``B`` the caller passed) or ``out`` (the gradient of a transposed ``g`` keeps its
    strides) is made contiguous here, so the native backend accepts what the others do. A
    layer's state rows and the forward's outputs are contiguous: nothing is copied in training."""
    if out.dtype == torch.float32 and out.device.type == "cpu":
        if not X.is_contiguous():
            X = X.contiguous()
        if out.is_contiguous():
            native.reduce_into(out, V, X)
        else:
            out.copy_(native.reduce_into(out.contiguous(), V, X))
    else:
        out.addmm_(V.T, X)


def pi_product(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None,
               reduce: Reduce = torch_reduce) -> Tensor:  # fmt: skip
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out) in ``ḡ``'s dtype, differentiable in all four inputs.

    Uses :class:`PiProduct` when a gradient is needed and a no-grad block-wise forward otherwise.
    ``chunk_size`` as in :func:`pinet.kernels.pi_layer`; ``reduce`` computes the row reductions.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gbar, A, B, c)):
        return PiProduct.apply(gbar, A, B, c, chunk_size, reduce)
    return _forward(gbar, A, B, c, chunk_size, keep=False, reduce=reduce)[0]


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


def _forward(
    gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None, keep: bool, reduce: Reduce
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
        reduce(u, w, A[start:stop].to(dt))
    return u, acos_all


class PiProduct(torch.autograd.Function):
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` with a hand-written, block-wise backward.

    Autograd through the plain formula would keep every (b, M) intermediate and run two of its
    four products in the slow orientation (``Bᵀ @ grad`` streams B transposed). This backward
    uses, per block of rows, ``∂L/∂w = A_blk @ δᵀ`` and ``∂L/∂ḡ += (∂L/∂q)ᵀ B_blk``: A and B
    are each read once, in the fast orientation, and nothing larger than a block is allocated
    besides the (M, b) ``arccos(-q)`` an automatic-size forward keeps (a ``chunk_size`` forward
    keeps nothing and the backward recomputes the block's cosines, one extra product on a block
    that the next product then reads from cache).

    ``apply(ḡ (b, r), A (M, r_out), B (M, r), c (M,), chunk_size, reduce) -> u (b, r_out)``.
    """

    @staticmethod
    def forward(ctx, gbar, A, B, c, chunk_size, reduce):  # type: ignore[override]
        # A chunk_size bounds memory: keep nothing of size b × M, recompute cosines per block.
        keep = chunk_size is None
        u, acos = _forward(gbar, A, B, c, chunk_size, keep=keep, reduce=reduce)
        ctx.chunk_size = chunk_size
        ctx.reduce = reduce
        ctx.save_for_backward(gbar, A, B, c, acos)
        return u

    @staticmethod
    def backward(ctx, grad_u):  # type: ignore[override]
        gbar, A, B, c, acos_all = ctx.saved_tensors
        need_g, need_A, need_B, need_c = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            # backward(create_graph=True): the gradient itself must be differentiable, so
            # recompute through the plain autograd formula (materialises b × M; rare path).
            return differentiable_backward(gbar, A, B, c, grad_u, ctx.needs_input_grad[:4]) + (None, None)
        needs = (need_g, need_A, need_B, need_c)
        return backward(gbar, A, B, c, acos_all, grad_u, ctx.chunk_size, ctx.reduce, needs) + (None, None)


def backward(gbar, A, B, c, acos_all, grad_u, chunk_size, reduce, needs) -> tuple:
    """Block-wise gradients ``(∂ḡ, ∂A, ∂B, ∂c)`` of ``⟨grad_u, u⟩`` in the inputs' dtypes,
    ``None`` where ``needs`` is false. ``acos_all`` (M, b): ``arccos(-q)`` kept by the forward,
    or ``None`` to recompute the cosines per block."""
    need_g, need_A, need_B, need_c = needs
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
    step = _block_rows(M, chunk_size, B.dtype != dt or A.dtype != dt, B.device)
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
                reduce(g_gbar, gq, Bb)
            if need_B:
                g_B[start:stop] = gq @ gbar
    return (
        g_gbar,
        None if g_A is None else g_A.to(A.dtype),
        None if g_B is None else g_B.to(B.dtype),
        None if g_c is None else g_c.to(c.dtype),
    )


def differentiable_backward(gbar, A, B, c, grad_u, needs) -> tuple:
    """Gradients of ``⟨grad_u, u⟩`` for the inputs flagged in ``needs`` through the plain formula
    :func:`pinet.functional.pi_product` with ``create_graph=True`` (double backward; b × M)."""
    inputs = [t for t, n in zip((gbar, A, B, c), needs) if n]
    with torch.enable_grad():
        u = _reference_product(gbar, A, B, c)
        grads = iter(torch.autograd.grad(u, inputs, grad_u, create_graph=True, allow_unused=True))
    return tuple(next(grads) if n else None for n in needs)
