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

from . import native, torch_ops

__all__ = ["FusedPiProduct", "pi_product"]


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
