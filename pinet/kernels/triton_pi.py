"""The ``"triton"`` backend: the π-product forward and backward as fused Triton kernels (CUDA).

Flash-Decoding pattern: the M rows are split over ``P`` program instances, each streaming its
contiguous range of row blocks once and keeping a (b, r_out) partial sum (forward) or a (b, r)
partial of ``∂L/∂ḡ`` (backward) in registers; the ``P`` partials are summed afterwards. There is
no softmax, so the partials need no rescaling. The ``J`` chain is fused: per block of rows the
kernel computes the cosines ``q = B_blk ḡᵀ``, ``arccos(-q)``, ``J(q)`` and ``J'(q)`` in
registers and never writes a (b, M) tensor, so a forward reads ``A`` and ``B`` once and a
backward reads them once more (the cosines are recomputed; nothing of size b × M is kept).

Storage rows ``A``, ``B`` may be float32, bfloat16 or float16; they are up-converted in registers
and every product and sum runs in float32 (``tl.dot`` with ``input_precision="ieee"``: no TF32).
``ḡ`` must be float32. Triton has no arccos, so ``arccos`` is the Abramowitz-Stegun 4.4.46
polynomial (absolute error ≤ 2e-8, below float32 rounding of values up to π).

Tested for correctness on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``, set before
this module is imported) against the float64 formula; its speed on a GPU has not been measured
(no GPU has been available to the project), so it is opt-in: ``pinet.kernels.set_backend("triton")``.
Tiles hold whole rows (``r`` and ``r_out`` padded to powers of two ≥ 16), which is meant for
r ≲ 1024; wider rows will spill registers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_ops

__all__ = ["TritonPiProduct", "pi_product"]

_INV_TWO_PI = 1.0 / (2.0 * math.pi)
_STORAGE = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _acos_neg(q):
    # arccos(-q) for q in [-1, 1]: A&S 4.4.46 gives arccos(a) = sqrt(1 - a) p(a) on a in [0, 1];
    # arccos(-q) = arccos(|q|) for q <= 0 and π - arccos(|q|) for q > 0.
    a = tl.abs(q)
    p = -0.0012624911
    p = p * a + 0.0066700901
    p = p * a - 0.0170881256
    p = p * a + 0.0308918810
    p = p * a - 0.0501743046
    p = p * a + 0.0889789874
    p = p * a - 0.2145988016
    p = p * a + 1.5707963050
    r = tl.sqrt(tl.maximum(1.0 - a, 0.0)) * p
    return tl.where(q > 0, 3.141592653589793 - r, r)


@triton.jit
def _fwd_kernel(
    g_ptr, A_ptr, B_ptr, c_ptr, part_ptr,
    M, b, r, r_out, stride_a, stride_b, blocks_per_prog, inv_two_pi,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, R_PAD: tl.constexpr, RO_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    ob = tl.arange(0, BLOCK_B)
    orr = tl.arange(0, R_PAD)
    oo = tl.arange(0, RO_PAD)
    # ḡᵀ (R_PAD, BLOCK_B), zero outside (r, b): padded batch columns then give w = J(0) c, which
    # only reaches rows of the partial that are never stored.
    gT = tl.load(g_ptr + ob[None, :] * r + orr[:, None], mask=(orr[:, None] < r) & (ob[None, :] < b), other=0.0)
    acc = tl.zeros((BLOCK_B, RO_PAD), dtype=tl.float32)
    first = pid * blocks_per_prog
    for i in range(blocks_per_prog):
        rows = (first + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = rows < M
        Bt = tl.load(B_ptr + rows[:, None] * stride_b + orr[None, :], mask=rm[:, None] & (orr[None, :] < r), other=0.0)
        q = tl.dot(Bt.to(tl.float32), gT, input_precision="ieee")  # (BLOCK_M, BLOCK_B) cosines
        q = tl.minimum(tl.maximum(q, -1.0), 1.0)
        j = tl.sqrt(tl.maximum(1.0 - q * q, 0.0)) + _acos_neg(q) * q  # 2π J(q)
        cb = tl.load(c_ptr + rows, mask=rm, other=0.0) * inv_two_pi  # rows past M: c = 0
        w = j * cb[:, None]
        At = tl.load(A_ptr + rows[:, None] * stride_a + oo[None, :], mask=rm[:, None] & (oo[None, :] < r_out), other=0.0)
        acc += tl.dot(tl.trans(w), At.to(tl.float32), input_precision="ieee")
    tl.store(part_ptr + pid * b * r_out + ob[:, None] * r_out + oo[None, :], acc,
             mask=(ob[:, None] < b) & (oo[None, :] < r_out))  # fmt: skip


@triton.jit
def _bwd_kernel(
    g_ptr, d_ptr, A_ptr, B_ptr, c_ptr, gA_ptr, gB_ptr, gc_ptr, part_ptr,
    M, b, r, r_out, stride_a, stride_b, blocks_per_prog, inv_two_pi,
    NEED_G: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr, NEED_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, R_PAD: tl.constexpr, RO_PAD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    ob = tl.arange(0, BLOCK_B)
    orr = tl.arange(0, R_PAD)
    oo = tl.arange(0, RO_PAD)
    gmask = (orr[:, None] < r) & (ob[None, :] < b)
    gT = tl.load(g_ptr + ob[None, :] * r + orr[:, None], mask=gmask, other=0.0)  # (R_PAD, BLOCK_B)
    # δ (b, r_out) is zero on padded batch rows, so every padded column below is zero.
    dmask = (oo[:, None] < r_out) & (ob[None, :] < b)
    dT = tl.load(d_ptr + ob[None, :] * r_out + oo[:, None], mask=dmask, other=0.0)  # (RO_PAD, BLOCK_B)
    acc = tl.zeros((BLOCK_B, R_PAD), dtype=tl.float32)
    first = pid * blocks_per_prog
    for i in range(blocks_per_prog):
        rows = (first + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = rows < M
        bmask = rm[:, None] & (orr[None, :] < r)
        amask = rm[:, None] & (oo[None, :] < r_out)
        Bt = tl.load(B_ptr + rows[:, None] * stride_b + orr[None, :], mask=bmask, other=0.0).to(tl.float32)
        At = tl.load(A_ptr + rows[:, None] * stride_a + oo[None, :], mask=amask, other=0.0).to(tl.float32)
        q = tl.dot(Bt, gT, input_precision="ieee")
        q = tl.minimum(tl.maximum(q, -1.0), 1.0)
        ac = _acos_neg(q)  # 2π J'(q)
        cb = tl.load(c_ptr + rows, mask=rm, other=0.0) * inv_two_pi
        gw = tl.dot(At, dT, input_precision="ieee")  # (BLOCK_M, BLOCK_B) = ∂L/∂(J(q) c)
        if NEED_A or NEED_C:
            j = tl.sqrt(tl.maximum(1.0 - q * q, 0.0)) + ac * q  # 2π J(q)
            if NEED_A:
                gA = tl.dot(j * cb[:, None], tl.trans(dT), input_precision="ieee")  # (J c) δ
                tl.store(gA_ptr + rows[:, None] * r_out + oo[None, :], gA, mask=amask)
            if NEED_C:
                tl.store(gc_ptr + rows, tl.sum(gw * j, axis=1) * inv_two_pi, mask=rm)
        gq = gw * ac * cb[:, None]  # (BLOCK_M, BLOCK_B) = ∂L/∂q
        if NEED_B:
            gB = tl.dot(gq, tl.trans(gT), input_precision="ieee")  # ∂L/∂q ḡ
            tl.store(gB_ptr + rows[:, None] * r + orr[None, :], gB, mask=bmask)
        if NEED_G:
            acc += tl.dot(tl.trans(gq), Bt, input_precision="ieee")
    if NEED_G:
        tl.store(part_ptr + pid * b * r + ob[:, None] * r + orr[None, :], acc,
                 mask=(ob[:, None] < b) & (orr[None, :] < r))  # fmt: skip


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every tile side ≥ 16


def _launch_shape(M: int, r: int, r_out: int, device: torch.device, programs: int | None) -> tuple[int, int, int]:
    """(BLOCK_M, programs, blocks per program). Row blocks shrink as rows widen so that a tile
    of whole rows stays near 16k floats (8 warps: 64 per thread); on CUDA about 4 programs per SM
    split the rows. Untuned: no GPU has been available to measure other choices."""
    width = max(_pow2(r), _pow2(r_out))
    block_m = max(16, min(64, 16384 // width))
    nblocks = triton.cdiv(M, block_m)
    if programs is None:
        if device.type == "cuda":
            programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        else:  # interpreter: a few programs, so the split and the partial sums are exercised
            programs = 3
    programs = max(1, min(programs, nblocks))
    per = triton.cdiv(nblocks, programs)
    return block_m, triton.cdiv(nblocks, per), per


def _check(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor) -> None:
    from . import triton_interpreted

    if gbar.dtype != torch.float32:
        raise ValueError(f"pinet.kernels backend 'triton': g must be float32 (it computes in float32), "
                         f"got {gbar.dtype}; use the torch backend for {gbar.dtype}")  # fmt: skip
    if A.dtype != B.dtype or A.dtype not in _STORAGE:
        raise ValueError(f"pinet.kernels backend 'triton': A and B must share a storage dtype in "
                         f"{[str(d) for d in _STORAGE]}, got {A.dtype} and {B.dtype}")  # fmt: skip
    devices = {t.device for t in (gbar, A, B, c)}
    if len(devices) != 1:
        raise ValueError(f"pinet.kernels backend 'triton': g, A, B, c must be on one device, got {devices}")
    if gbar.device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"pinet.kernels backend 'triton' runs on CUDA tensors, got tensors on {gbar.device} "
                         "(only Triton's interpreter, TRITON_INTERPRET=1, runs it on CPU tensors, for tests)")  # fmt: skip


def _rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, programs: int | None = None) -> Tensor:
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out) float32 by the fused forward kernel (no autograd)."""
    _check(gbar, A, B, c)
    b, r = gbar.shape
    M, r_out = A.shape
    if M == 0 or b == 0:
        return gbar.new_zeros(b, r_out)
    A, B, g, cf = _rows(A), _rows(B), gbar.contiguous(), c.to(torch.float32).contiguous()
    block_m, P, per = _launch_shape(M, r, r_out, gbar.device, programs)
    part = torch.empty(P, b, r_out, dtype=torch.float32, device=gbar.device)
    _fwd_kernel[(P,)](g, A, B, cf, part, M, b, r, r_out, A.stride(0), B.stride(0), per, _INV_TWO_PI,
                      BLOCK_M=block_m, BLOCK_B=_pow2(b), R_PAD=_pow2(r), RO_PAD=_pow2(r_out), num_warps=8)  # fmt: skip
    return part.sum(0)


def backward(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, grad_u: Tensor, needs, programs: int | None = None):
    """Gradients ``(∂ḡ, ∂A, ∂B, ∂c)`` of ``⟨grad_u, u⟩`` (``None`` where ``needs`` is false), in
    the inputs' dtypes, by the fused backward kernel."""
    need_g, need_A, need_B, need_c = (bool(n) for n in needs)
    b, r = gbar.shape
    M, r_out = A.shape
    dev = gbar.device
    f32 = torch.float32
    g_g = torch.zeros(b, r, dtype=f32, device=dev) if need_g else None
    g_A = torch.empty(M, r_out, dtype=f32, device=dev) if need_A else None
    g_B = torch.empty(M, r, dtype=f32, device=dev) if need_B else None
    g_c = torch.empty(M, dtype=f32, device=dev) if need_c else None
    if M and b:
        A, B, g, cf = _rows(A), _rows(B), gbar.contiguous(), c.to(f32).contiguous()
        d = grad_u.to(f32).contiguous()
        block_m, P, per = _launch_shape(M, r, r_out, dev, programs)
        part = torch.empty(P, b, r, dtype=f32, device=dev) if need_g else g
        dummy = part  # pointer for outputs not written (their stores are compiled out)
        _bwd_kernel[(P,)](
            g, d, A, B, cf,
            dummy if g_A is None else g_A, dummy if g_B is None else g_B, dummy if g_c is None else g_c, part,
            M, b, r, r_out, A.stride(0), B.stride(0), per, _INV_TWO_PI,
            NEED_G=need_g, NEED_A=need_A, NEED_B=need_B, NEED_C=need_c,
            BLOCK_M=block_m, BLOCK_B=_pow2(b), R_PAD=_pow2(r), RO_PAD=_pow2(r_out), num_warps=8,
        )  # fmt: skip
        if need_g:
            g_g = part.sum(0)
    elif need_A or need_B or need_c:  # an empty batch contributes nothing
        for t in (g_A, g_B, g_c):
            if t is not None:
                t.zero_()
    return (
        g_g,
        None if g_A is None else g_A.to(A.dtype),
        None if g_B is None else g_B.to(B.dtype),
        None if g_c is None else g_c.to(c.dtype),
    )


class TritonPiProduct(torch.autograd.Function):
    """``apply(ḡ (b, r), A (M, r_out), B (M, r), c (M,)) -> u (b, r_out)`` on the fused kernels.
    Saves only its inputs; the backward recomputes the cosines. Double backward
    (``create_graph=True``) goes through the differentiable plain formula."""

    @staticmethod
    def forward(ctx, gbar, A, B, c):  # type: ignore[override]
        ctx.save_for_backward(gbar, A, B, c)
        return forward(gbar, A, B, c)

    @staticmethod
    def backward(ctx, grad_u):  # type: ignore[override]
        gbar, A, B, c = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            return torch_ops.differentiable_backward(gbar, A, B, c, grad_u, needs)
        return backward(gbar, A, B, c, grad_u, needs)


def pi_product(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor) -> Tensor:
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out) float32 on the Triton kernels, differentiable in all
    four inputs. Shapes: ḡ (b, r) float32, A (M, r_out), B (M, r) in one storage dtype, c (M,)."""
    _check(gbar, A, B, c)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (gbar, A, B, c)):
        return TritonPiProduct.apply(gbar, A, B, c)
    return forward(gbar, A, B, c)
