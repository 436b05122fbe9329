"""The π-product as torch custom operators, for :func:`torch.compile`.

Dynamo cannot trace the block-wise autograd functions of the backends (they loop over row
blocks of a size that changes every step and write into buffers in place), and tracing them
would specialise the graph on ``M``. Under :func:`torch.compile`, :func:`pinet.kernels.pi_layer`
therefore calls ``torch.ops.pinet.pi_product`` (and its backward ``pinet::pi_product_backward``):
opaque to the compiler, with shape-only fake implementations, so a compiled training step keeps
one graph while ``M`` grows (``M`` is a symbolic size) and each call still runs the selected
backend's kernels. The forward keeps nothing of size ``b × M``; the backward recomputes the
cosines (as with ``chunk_size``). Double backward (``create_graph=True``) is not supported
through the compiled path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_ops

__all__ = ["pi_product"]


def _run_forward(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None, backend: str) -> Tensor:
    if backend == "triton":
        from . import triton_pi

        return triton_pi.forward(gbar, A, B, c)
    if backend == "fused":
        from . import fused

        return fused.forward(gbar, A, B, c, chunk_size)
    reduce = torch_ops.native_reduce if backend == "native" else torch_ops.torch_reduce
    return torch_ops._forward(gbar, A, B, c, chunk_size, keep=False, reduce=reduce)[0]


@torch.library.custom_op("pinet::pi_product", mutates_args=())
def _pi_product(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None, backend: str) -> Tensor:
    with torch.no_grad():
        return _run_forward(gbar, A, B, c, chunk_size, backend)


@_pi_product.register_fake
def _(gbar, A, B, c, chunk_size, backend):
    return gbar.new_empty(gbar.shape[0], A.shape[1])


@torch.library.custom_op("pinet::pi_product_backward", mutates_args=())
def _pi_product_backward(
    gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, grad_u: Tensor, chunk_size: int | None, backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    with torch.no_grad():
        if backend == "triton":
            from . import triton_pi

            grads = triton_pi.backward(gbar, A, B, c, grad_u, needs)
        elif backend == "fused":
            from . import fused

            grads = fused.backward(gbar, A, B, c, grad_u, chunk_size, needs)
        else:
            reduce = torch_ops.native_reduce if backend == "native" else torch_ops.torch_reduce
            grads = torch_ops.backward(gbar, A, B, c, None, grad_u, chunk_size, reduce, needs)
    # A custom op returns tensors: an empty one stands for a gradient that is not needed.
    return tuple(t.new_empty(0) if g is None else g for g, t in zip(grads, (gbar, A, B, c)))


@_pi_product_backward.register_fake
def _(gbar, A, B, c, grad_u, chunk_size, backend, needs):
    return tuple(t.new_empty(t.shape) if n else t.new_empty(0) for t, n in zip((gbar, A, B, c), needs))


def _setup_context(ctx, inputs, output):
    gbar, A, B, c, chunk_size, backend = inputs
    ctx.save_for_backward(gbar, A, B, c)
    ctx.chunk_size, ctx.backend = chunk_size, backend


def _backward(ctx, grad_u):
    gbar, A, B, c = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = torch.ops.pinet.pi_product_backward(gbar, A, B, c, grad_u, ctx.chunk_size, ctx.backend, needs)
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None, None)


_pi_product.register_autograd(_backward, setup_context=_setup_context)


def pi_product(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, chunk_size: int | None, backend: str) -> Tensor:
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out) through the ``pinet::pi_product`` custom operator on
    ``backend`` (``"torch"``, ``"native"``, ``"fused"`` or ``"triton"``); differentiable in all four inputs."""
    return torch.ops.pinet.pi_product(gbar, A, B, c, chunk_size, backend)
