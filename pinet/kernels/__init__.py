"""Kernel dispatch for the π-product: which implementation computes ``(J(ḡ Bᵀ) ⊙ c) A``.

:func:`pi_layer` is the π-layer every infinite layer calls; the math it must equal is
:func:`pinet.functional.pi_product`. Backends (:data:`BACKENDS`):

* ``"torch"``: block-wise forward and backward from torch ops (:mod:`pinet.kernels.torch_ops`),
  any device and dtype. The default on CUDA, and on CPUs where ``"fused"`` cannot be built.
* ``"native"``: the same with pinet's AVX2 kernel for the two row-reduce products of float32 CPU
  tensors (:mod:`pinet.kernels.native`, compiled with g++ on first use); other tensors use torch's
  products. Opt-in (it needs a C++ compiler at run time, and its gain depends on the CPU's BLAS):
  20-27% faster steps measured on AMD EPYC Zen 1 and Zen 4 CPUs (``docs/kernels.md``).
* ``"fused"``: one C++ kernel (AVX-512 or AVX2/FMA, OpenMP) per forward and ``∂ḡ`` backward that computes
  the cosines, ``J``, ``J'`` and both products per cache-sized block of rows
  (:mod:`pinet.kernels.fused`); float32 CPU computation with float32, bfloat16 or float16 rows,
  others use torch's products. The default on CPUs where it can be
  built (x86-64 with AVX2 and g++): 2.0-2.8x faster float32 steps than ``"torch"`` on the
  benchmark network, 3.5-3.8x with bfloat16 rows (``docs/kernels.md``).
* ``"triton"``: fused Triton kernels for CUDA tensors (:mod:`pinet.kernels.triton_pi`), float32
  compute with float32/bfloat16/float16 storage. Opt-in: tested for correctness under Triton's
  interpreter only; its speed on a GPU has not been measured (no GPU was available).
* ``"auto"`` (the initial setting): the default for each device, see :func:`backend`; a
  ``"fused"`` default that cannot be built falls back to ``"torch"``, visibly:
  ``backend()`` then returns ``"torch"`` and ``unavailable_reason("fused")`` says why.

Choose with :func:`set_backend` or, for a block of code, :func:`use_backend`; forcing a backend
that cannot run here raises :class:`BackendUnavailable` saying why (nothing is changed then).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..functional import normalize_rows, pi_rows_sqnorm
from . import native, torch_ops
from ._base import BackendUnavailable
from .native import NativeUnavailable

__all__ = [
    "BACKENDS",
    "COMPILE_CONFIG",
    "BackendUnavailable",
    "NativeUnavailable",
    "available_backends",
    "backend",
    "compile_step",
    "pi_layer",
    "rows_sqnorm",
    "thin_matmul",
    "THIN_ROWS",
    "set_backend",
    "setting",
    "unavailable_reason",
    "use_backend",
]

BACKENDS = ("auto", "torch", "native", "fused", "triton")

# What "auto" picks per device type: the first that can run here. On CPUs the fused kernel,
# proven equal to the float64 formula to float32 rounding and measured 2.0-2.8x faster than
# torch's products on the benchmark network (docs/kernels.md); torch's products where it cannot be built
# (no x86-64 with AVX2, no g++). On CUDA torch's products: the Triton kernel is tested only
# under the interpreter and its speed is unmeasured.
_AUTO = {"cpu": ("fused", "torch"), "cuda": ("torch",)}
_auto_choice: dict[str, str] = {}

_setting = "auto"


def _check_name(name: str) -> None:
    if not isinstance(name, str):  # a tensor or list would give a confusing `in` comparison
        raise TypeError(f"pinet.kernels: backend must be a str, one of {BACKENDS}, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"pinet.kernels: backend must be one of {BACKENDS}, got {name!r}")


def triton_interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter in this process (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or ``None`` if it can (``"native"`` is built now)."""
    _check_name(name)
    if name in ("auto", "torch"):
        return None
    if name in ("native", "fused"):
        try:
            native.load() if name == "native" else native.load_fused()
        except NativeUnavailable as e:
            return str(e)
        return None
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton ships with torch's CUDA/CPU wheels
        return f"pinet.kernels: backend 'triton' needs the triton package ({e})"
    if not torch.cuda.is_available() and not triton_interpreted():
        return ("pinet.kernels: backend 'triton' runs on CUDA devices and no CUDA device is available "
                "(torch.cuda.is_available() is False; TRITON_INTERPRET=1 runs it on the CPU for tests)")  # fmt: skip
    return None


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (``"auto"`` and ``"torch"`` always)."""
    return [n for n in BACKENDS if unavailable_reason(n) is None]


def setting() -> str:
    """The current setting: ``"auto"`` or the forced backend's name."""
    return _setting


def set_backend(name: str) -> None:
    """Select the π-product backend: one of :data:`BACKENDS`. ``"torch"`` forces torch's
    products; ``"auto"`` restores the per-device default. A backend that cannot run here raises
    :class:`BackendUnavailable` (:class:`NativeUnavailable` for the C++ backends) naming it and
    saying why, and the setting is left as it was."""
    global _setting
    why = unavailable_reason(name)
    if why is not None:
        raise (NativeUnavailable if name in ("native", "fused") else BackendUnavailable)(why)
    _setting = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with pinet.kernels.use_backend("torch"): ...`` selects ``name`` inside the block and
    restores the previous setting after it (also when the block raises)."""
    before = _setting
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def backend(device: torch.device | str = "cpu") -> str:
    """The backend :func:`pi_layer` uses for tensors on ``device`` under the current setting,
    e.g. ``"fused"`` on an x86-64 CPU with AVX2 and g++. With a forced backend that is its name.
    ``"native"`` and ``"fused"`` compute float32 CPU tensors only, anything else with torch's
    products; ``"triton"`` refuses CPU tensors outside the interpreter."""
    if not isinstance(device, torch.device):  # pi_layer passes a torch.device: nothing to parse then
        # Parsed under every setting, so a bad device fails alike whether or not a backend is forced.
        if not isinstance(device, str):
            raise TypeError(f"pinet.kernels.backend: device must be a torch.device or str, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"pinet.kernels.backend: device must name a torch device, got {device!r} ({e})") from None
    if _setting != "auto":
        return _setting
    kind = device.type
    if kind not in _auto_choice:  # decided once per process (the fused kernel is built now)
        _auto_choice[kind] = next(n for n in (*_AUTO.get(kind, ()), "torch") if unavailable_reason(n) is None)
    return _auto_choice[kind]


def pi_layer(
    g: Tensor,
    A: Tensor,
    B: Tensor,
    c: Tensor,
    *,
    layernorm: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Infinite π-layer without bias: ``out = (s · J(ḡ Bᵀ) ⊙ c) A``, on the selected backend.

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
            the backward (temporaries ``O(b × M)``). Results equal up to summation order. The
            triton backend never keeps anything of size ``b × M``, with or without it.

    Returns:
        ``(out, s, ḡ)``: out (b, r_out) in ``g``'s dtype, the scale ``s`` (b, 1) the layer used
        (ones with layernorm) and ``ḡ`` (b, r). ``s`` and ``ḡ`` are what the π-update appends.

    Storage rows are read in their own dtype and converted block by block, so half-precision
    storage halves the memory traffic while every product and sum runs in ``g``'s dtype. Autograd
    gradients with respect to ``g``, ``A``, ``B`` and ``c`` are exact (double backward included,
    except inside :func:`torch.compile`, where the product is the custom operator of
    :mod:`pinet.kernels.ops`).
    """
    if not isinstance(layernorm, bool):
        # A truthy string ("no") or None would silently pick a branch, differently per backend.
        raise TypeError(f"pinet.kernels.pi_layer: layernorm must be a bool, got {layernorm!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"pinet.kernels.pi_layer: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not torch.compiler.is_compiling():  # traced shapes are checked by the custom operator
        _check_tensors(g, A, B, c)
    name = backend(g.device)
    if name == "fused" and not torch.compiler.is_compiling():
        from . import fused

        if fused.serves_layer(g, A, B, c):
            # Normalisation, product and scale in one C++ call each way (the same math as below).
            return fused.whole_layer(g, A, B, c, layernorm, chunk_size)
    s, gbar = normalize_rows(g)
    if layernorm:
        s = torch.ones_like(s)
    if torch.compiler.is_compiling():
        # One opaque custom operator per call, so the compiled graph does not depend on M.
        from . import ops

        return s * ops.pi_product(gbar, A, B, c, chunk_size, name), s, gbar
    # s multiplies the (b, r_out) result instead of the (b, M) weights: one pass less over a b × M
    # tensor, and the product's backward then never needs s (its gradient is δ · u).
    if name == "triton":
        from . import triton_pi  # imported on first use: Triton's import is slow

        u = triton_pi.pi_product(gbar, A, B, c)
    elif name == "native":
        u = torch_ops.pi_product(gbar, A, B, c, chunk_size, torch_ops.native_reduce)
    elif name == "fused":
        from . import fused

        u = fused.pi_product(gbar, A, B, c, chunk_size)
    else:
        u = torch_ops.pi_product(gbar, A, B, c, chunk_size)
    return s * u, s, gbar


#: Most rows of ``x`` for which :func:`thin_matmul` uses the fused library (training batches).
THIN_ROWS = 32


def thin_matmul(x: Tensor, W: Tensor) -> Tensor:
    """``x @ W`` for a batch ``x`` (b, d) and a weight ``W`` (d, r) -> (b, r), differentiable: what
    the finite input layer of a π-net computes. On the ``"fused"`` backend, for float32 CPU
    tensors, a contiguous ``W`` and ``b ≤`` :data:`THIN_ROWS`, the product and its weight gradient
    ``xᵀ δ`` run in the fused library (at 3072 × 400, 0.26 and 0.39 ms against MKL's 0.61 and 0.68
    after a 64 MB read); otherwise torch's ``@``. Results agree to float32 rounding.

    ``x`` and ``W`` must be real floating-point tensors of one dtype on one device (what torch's
    ``@`` requires); anything else raises a ``TypeError`` or ``ValueError`` naming the argument,
    on every backend."""
    _check_thin(x, W)
    if (
        x.dtype == torch.float32 and W.dtype == torch.float32 and x.dim() == 2 and W.dim() == 2
        and 0 < x.shape[0] <= THIN_ROWS and x.shape[1] == W.shape[0] and W.is_contiguous()
        and x.device.type == "cpu" and W.device.type == "cpu"
        and not torch.compiler.is_compiling() and backend("cpu") == "fused"
    ):  # fmt: skip
        from . import fused

        return fused.thin_matmul(x, W)
    return x @ W


def rows_sqnorm(A: Tensor, B: Tensor, coef: Tensor | None = None) -> Tensor:
    """``‖Δ‖² = Σ_ij coef_i coef_j (A_i · A_j) J(B_i · B_j)`` of the π-rows ``A`` (k, r_out), ``B``
    (k, r), ``coef`` (k,) or ``None`` (unit coefficients) -> a 0-dim tensor: what
    :func:`pinet.functional.pi_rows_sqnorm` computes, in one fused call (summed in double) on the
    ``"fused"`` backend for float32 CPU rows that need no gradient, by that function's torch ops
    otherwise. The optimizer's norms and clipping read it for every π-layer every step.

    The result is in ``coef``'s dtype (``A``'s without ``coef``), except that float16 and bfloat16
    are computed and returned in float32 (as :func:`pinet.hooks.grad_sqnorms` does for tensors: a
    half sum of k² terms loses most digits and overflows at 65504), on every backend. ``A``, ``B``
    and ``coef`` must be real floating-point tensors on one device with one row count ``k``.
    """
    _check_rows(A, B, coef)
    f32 = torch.float32
    if (
        A.dtype == f32 and B.dtype == f32 and (coef is None or coef.dtype == f32)
        and A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[0]
        and (coef is None or tuple(coef.shape) == (A.shape[0],))
        and A.device.type == "cpu" and B.device.type == "cpu" and (coef is None or coef.device.type == "cpu")
        and not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or (coef is not None and coef.requires_grad)))
        and backend("cpu") == "fused"
    ):  # fmt: skip
        # Checked here, so the fused library's raw-pointer entry is called without its own checks.
        c = None if coef is None else coef.contiguous()
        return native.rows_sqnorm_unchecked(A.contiguous(), B.contiguous(), c)
    if coef is not None and coef.dtype in _HALF:
        coef = coef.to(f32)  # pi_rows_sqnorm computes in coef's dtype; A and B follow it
    elif coef is None and A.dtype in _HALF:
        A = A.to(f32)  # ... or in A's without coef
    return pi_rows_sqnorm(A, B, coef)


_HALF = (torch.float16, torch.bfloat16)


def _check_real(where: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():  # integers, bool and complex (is_floating_point is False for them)
        raise TypeError(f"{where}: {name} must be a real floating-point tensor, got {t.dtype}")


def _check_rows(A, B, coef) -> None:
    # Cheap metadata checks (the optimizer calls this every step): no pass over the rows.
    where = "pinet.kernels.rows_sqnorm"
    _check_real(where, "A", A)
    _check_real(where, "B", B)
    if coef is not None:
        _check_real(where, "coef", coef)
    k = A.shape[0] if A.dim() == 2 else None
    # A coef of shape (1,) would broadcast over the k rows and give a wrong norm, silently.
    if k is None or B.dim() != 2 or B.shape[0] != k or (coef is not None and tuple(coef.shape) != (k,)):
        raise ValueError(
            f"{where}: expected A (k, r_out), B (k, r) and coef (k,) or None with one k, got "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}, coef {None if coef is None else tuple(coef.shape)}"
        )
    devices = {A.device, B.device} | ({coef.device} if coef is not None else set())
    if len(devices) > 1:
        raise ValueError(
            f"{where}: A, B and coef must be on one device, got {A.device}, {B.device}"
            + ("" if coef is None else f", {coef.device}")
        )


def _check_thin(x, W) -> None:
    where = "pinet.kernels.thin_matmul"
    _check_real(where, "x", x)
    _check_real(where, "W", W)
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[0]:
        raise ValueError(f"{where}: expected x (b, d) and W (d, r) with one d, got x {tuple(x.shape)}, W {tuple(W.shape)}")
    if x.dtype != W.dtype:
        raise TypeError(f"{where}: x and W must have one dtype, got {x.dtype} and {W.dtype}")
    if x.device != W.device:
        raise ValueError(f"{where}: x and W must be on one device, got {x.device} and {W.device}")


def _check_tensors(g, A, B, c) -> None:
    # A wrong argument raises here, naming it, on every backend alike (not deep inside one).
    where = "pinet.kernels.pi_layer"
    for name, t, dim in (("g", g, 2), ("A", A, 2), ("B", B, 2), ("c", c, 1)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be a real floating-point tensor, got {t.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{where}: {name} must be {dim}-d, got shape {tuple(t.shape)}")
    M, r = B.shape
    if g.shape[1] != r or A.shape[0] != M or c.shape[0] != M:
        raise ValueError(
            f"{where}: expected g (b, r), A (M, r_out), B (M, r) and c (M,) with one r and one M, got "
            f"g {tuple(g.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, c {tuple(c.shape)}"
        )
    if A.dtype != B.dtype:
        raise TypeError(f"{where}: A and B must have one storage dtype, got {A.dtype} and {B.dtype}")
    if len({g.device, A.device, B.device, c.device}) > 1:
        raise ValueError(
            f"{where}: g, A, B and c must be on one device, got {g.device}, {A.device}, {B.device}, {c.device}"
        )


# Dynamo settings under which a compiled step does not recompile as M grows: a PiState keeps its
# row count as a Python int attribute (static by default: one graph per M) and its coefficients
# ``c`` as a Parameter whose length is M (parameters have static shapes by default).
COMPILE_CONFIG = {"allow_unspec_int_on_nn_module": True, "force_parameter_static_shapes": False}


def compile_step(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn, dynamic=True, **kwargs)``, called under :data:`COMPILE_CONFIG`, so that
    a function running an infinite net (forward, loss, and ``backward()`` if it calls it) keeps
    its compiled graphs while the π-layers' M grows: after the first growth (one recompile,
    when Dynamo makes M symbolic) steps reuse them. The π-product inside is one custom
    operator per layer (:mod:`pinet.kernels.ops`) on the selected backend. The optimizer
    wrapper's ``step()`` stays eager. Keyword arguments go to :func:`torch.compile`
    (e.g. ``backend="aot_eager"``)."""
    if not callable(fn):
        raise TypeError(f"pinet.kernels.compile_step: fn must be a callable, got {type(fn).__name__}")
    kwargs.setdefault("dynamic", True)
    compiled = torch.compile(fn, **kwargs)

    @functools.wraps(fn)
    def run(*args, **kw):
        with torch._dynamo.config.patch(**COMPILE_CONFIG):
            return compiled(*args, **kw)

    return run
