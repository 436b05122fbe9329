"""The ``"fused"`` backend: the π-product forward and its ``∂ḡ`` backward in one C++ kernel each.

Per block of 64 rows (in L2) and per thread (OpenMP, ``torch.get_num_threads()``), the forward
computes the cosines ``B_blk ḡᵀ``, ``arccos(-q)``, ``J(q)``, ``w = J(q) c`` and adds ``wᵀ A_blk``
to the thread's partial ``u`` while the block is in cache; the backward computes ``A_blk δᵀ``,
``∂L/∂q`` and adds ``∂qᵀ B_blk`` to a partial ``∂ḡ`` (the cosines' ``arccos`` comes from the forward,
or is recomputed from the block of ``B`` with ``chunk_size``, which the reduce then reads from
cache). Each phase prefetches into L2 what the next one reads, so the state streams from memory
while the products run. AVX-512 intrinsics on CPUs with AVX-512 F and VL, AVX2/FMA otherwise
(:func:`pinet.kernels.native.fused_isa`; built by g++ on first use). The rarely needed gradients
for ``A``, ``B``, ``c`` (the rows and coefficients are constants in training) come from the torch
backend's block-wise backward.

Serves float32 CPU computation with float32, bfloat16 or float16 rows
(:func:`pinet.kernels.native.fused_storage`; 16-bit rows are converted to float32 as they load,
all sums in float32); other dtypes and devices use the torch backend's products (as the
``"native"`` backend does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import normalize_rows
from . import native, torch_ops

__all__ = ["FusedPiLayer", "FusedPiProduct", "FusedThinMatmul", "pi_product"]


def _serves(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor) -> bool:
    # float32 ḡ and c on the CPU; rows A, B in a storage dtype the loaded build converts natively.
    if not all(t.device.type == "cpu" for t in (gbar, A, B, c)):
        return False
    if gbar.dtype != torch.float32 or c.dtype != torch.float32 or A.dtype != B.dtype:
        return False
    return A.dtype == torch.float32 or A.dtype in native.fused_storage()


def _rows(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


class FusedPiProduct(torch.autograd.Function):
    """``apply(ḡ (b, r), A (M, r_out), B (M, r), c (M,), chunk_size) -> u (b, r_out)``, float32 CPU."""

    @staticmethod
    def forward(ctx, gbar, A, B, c, chunk_size):  # type: ignore[override]
        gbar, A, B, c = (_rows(t) for t in (gbar, A, B, c))
        u, acos = native.fused_forward(gbar, A, B, c, keep=chunk_size is None)
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(gbar, A, B, c, acos)
        return u

    @staticmethod
    def backward(ctx, grad_u):  # type: ignore[override]
        gbar, A, B, c, acos = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            return torch_ops.differentiable_backward(gbar, A, B, c, grad_u, needs) + (None,)
        grad_u = _rows(grad_u.to(torch.float32))
        g_g = native.fused_backward_g(gbar, A, B, c, acos, grad_u) if needs[0] else None
        rest = (None, None, None)
        if any(needs[1:]):
            rest = torch_ops.backward(gbar, A, B, c, None, grad_u, ctx.chunk_size, torch_ops.torch_reduce,
                                      (False, *needs[1:]))[1:]  # fmt: skip
        return (g_g, *rest, None)


def forward(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None) -> Tensor:
    """No-autograd forward (custom-operator path): fused for float32 CPU, else torch's products."""
    if _serves(gbar, A, B, c):
        return native.fused_forward(*(_rows(t) for t in (gbar, A, B, c)), keep=False)[0]
    return torch_ops._forward(gbar, A, B, c, chunk_size, keep=False, reduce=torch_ops.torch_reduce)[0]


def backward(gbar, A, B, c, grad_u, chunk_size, needs) -> tuple:
    """No-autograd backward (custom-operator path), cosines recomputed."""
    if not _serves(gbar, A, B, c):
        return torch_ops.backward(gbar, A, B, c, None, grad_u, chunk_size, torch_ops.torch_reduce, needs)
    gbar, A, B, c = (_rows(t) for t in (gbar, A, B, c))
    grad_u = _rows(grad_u.to(torch.float32))
    g_g = native.fused_backward_g(gbar, A, B, c, None, grad_u) if needs[0] else None
    rest = (None, None, None)
    if any(needs[1:]):
        rest = torch_ops.backward(gbar, A, B, c, None, grad_u, chunk_size, torch_ops.torch_reduce, (False, *needs[1:]))[1:]
    return (g_g, *rest)


def pi_product(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None) -> Tensor:
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out), differentiable in all four inputs: the fused kernels
    for float32 CPU tensors, the torch backend otherwise."""
    if not _serves(gbar, A, B, c):
        return torch_ops.pi_product(gbar, A, B, c, chunk_size)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gbar, A, B, c)):
        return FusedPiProduct.apply(gbar, A, B, c, chunk_size)
    return forward(gbar, A, B, c, chunk_size)


def serves_layer(g: Tensor, A: Tensor, B: Tensor, c: Tensor) -> bool:
    """Whether :func:`pi_layer` runs the whole layer fused: what :func:`pi_product` serves, with
    constant rows and coefficients (as in training, where the layers pass ``c`` detached)."""
    return _serves(g, A, B, c) and not (A.requires_grad or B.requires_grad or c.requires_grad)


class FusedPiLayer(torch.autograd.Function):
    """``apply(g (b, r), A, B, c, layernorm, chunk_size) -> (out (b, r_out), s (b, 1), ḡ (b, r))``:
    :func:`pinet.kernels.pi_layer`'s normalisation, product and scale in one C++ call each way,
    float32 CPU, constant ``A``, ``B``, ``c``. Double backward recomputes the layer through the
    composite (:func:`_composite_grad`)."""

    @staticmethod
    def forward(ctx, g, A, B, c, layernorm, chunk_size):  # type: ignore[override]
        # pi_layer has checked the arguments (_check_tensors, serves_layer) and loaded the kernels.
        A, B, c = (_rows(t) for t in (A, B, c))
        out, u, n, gbar, acos = native.layer_forward_unchecked(_rows(g), A, B, c, layernorm, chunk_size is None)
        s = torch.ones_like(n) if layernorm else n
        ctx.set_materialize_grads(False)  # s and ḡ usually get no gradient: no zero tensors for them
        ctx.layernorm, ctx.chunk_size = layernorm, chunk_size
        ctx.save_for_backward(g, A, B, c, gbar, u, n, acos)
        if layernorm:
            ctx.mark_non_differentiable(s)
        return out, s, gbar

    @staticmethod
    def backward(ctx, grad_out, grad_s, grad_gbar):  # type: ignore[override]
        g, A, B, c, gbar, u, n, acos = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            grad_g = _composite_grad(g, A, B, c, ctx.layernorm, ctx.chunk_size, grad_out, grad_s, grad_gbar)
            return grad_g, None, None, None, None, None
        if grad_out is None and grad_s is None and grad_gbar is None:
            return None, None, None, None, None, None
        grad_out, grad_s, grad_gbar = (None if t is None else _rows(t.to(torch.float32)) for t in (grad_out, grad_s, grad_gbar))
        grad_g = native.layer_backward_unchecked(gbar, n, u, grad_out, grad_s, grad_gbar, A, B, c, acos, ctx.layernorm)
        return grad_g, None, None, None, None, None


def _composite_grad(g, A, B, c, layernorm, chunk_size, grad_out, grad_s, grad_gbar) -> Tensor:
    # The layer rebuilt from its parts (normalize_rows, the differentiable product, the scale) and
    # differentiated with create_graph: exact second derivatives at the cost of one more forward.
    with torch.enable_grad():
        s, gbar = normalize_rows(g)
        if layernorm:
            s = torch.ones_like(s)
        out = s * pi_product(gbar, A, B, c, chunk_size)
        pairs = [(o, d) for o, d in ((out, grad_out), (s, grad_s), (gbar, grad_gbar)) if d is not None and o.requires_grad]
        if not pairs:
            return torch.zeros_like(g)
        grad = torch.autograd.grad([o for o, _ in pairs], g, [d for _, d in pairs], create_graph=True, allow_unused=True)[0]
    return torch.zeros_like(g) if grad is None else grad


def whole_layer(g: Tensor, A: Tensor, B: Tensor, c: Tensor, layernorm: bool, chunk_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, s, ḡ)`` of :func:`pinet.kernels.pi_layer` by :class:`FusedPiLayer` (or, without
    autograd, its forward alone). Only for arguments ``pi_layer`` has checked and
    :func:`serves_layer` accepts: the kernels read them through raw pointers."""
    if torch.is_grad_enabled() and g.requires_grad:
        return FusedPiLayer.apply(g, A, B, c, layernorm, chunk_size)
    out, _, n, gbar, _ = native.layer_forward_unchecked(_rows(g), *(_rows(t) for t in (A, B, c)), layernorm, False)
    return out, torch.ones_like(n) if layernorm else n, gbar


class FusedThinMatmul(torch.autograd.Function):
    """``apply(x (b, d), W (d, r)) -> x W (b, r)`` for a few rows ``b`` of float32 CPU data and a
    contiguous weight: the finite input layer's product by the fused library's row reduce, and
    its weight gradient ``xᵀ δ`` written once, row by row (:func:`pinet.kernels.thin_matmul`)."""

    @staticmethod
    def forward(ctx, x, W):  # type: ignore[override]
        xT = x.T.contiguous()  # (d, b): the reduce's weights, row by row of W
        ctx.save_for_backward(x, W, xT)
        return native.thin_xw_unchecked(xT, W)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, W, xT = ctx.saved_tensors
        need_x, need_W = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable torch products
            return (grad @ W.T if need_x else None), (x.T @ grad if need_W else None)
        grad_W = native.thin_outer_unchecked(xT, _rows(grad.to(torch.float32))) if need_W else None
        return (grad @ W.T if need_x else None), grad_W


def thin_matmul(x: Tensor, W: Tensor) -> Tensor:
    """``x W`` by :class:`FusedThinMatmul` (or, without autograd, its forward alone), for the
    arguments :func:`pinet.kernels.thin_matmul` has checked."""
    if torch.is_grad_enabled() and (x.requires_grad or W.requires_grad):
        return FusedThinMatmul.apply(x, W)
    return native.thin_xw_unchecked(x.T.contiguous(), W)
