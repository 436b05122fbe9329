"""Feature kernels of π-nets (transfer learning; spec, "Feature kernel").

A trained net's *feature kernel* is the kernel of the features that enter its readout: with ``g(x)``
(r,) the coordinates entering an infinite readout π-layer,

    K(x, x') = E[relu(h(x)) relu(h(x'))] = ‖g(x)‖ ‖g(x')‖ J(ḡ(x) · ḡ(x'))     (norms 1 with layernorm)

and for a finite π-net, whose readout sees ``h`` (n,), the plain dot product ``relu(h)·relu(h')``
(``relu(h/‖h‖)`` with layernorm). There is no ``1/n``: in this parametrisation ``h ≈ n^-½ Ω g``,
so the sum over the n units is already an average, and the finite kernel converges to the
infinite one at rate ``n^-½`` (sampled from the same net). Kernel ridge regression on it
(:func:`pinet.baselines.kernel_ridge`) scores how well the features transfer to another task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .functional import J, normalize_rows
from .layers import FinPiLayer, InfPiLayer, _positive_index
from .models import FinPiMLP, InfPiMLP

__all__ = ["feature_kernel", "features", "kernel_from_features", "readout_layer"]


class _Captured(Exception):
    """Raised by the pre-hook once the feature is captured: nothing after it needs to run."""


def readout_layer(net: nn.Module) -> InfPiLayer | FinPiLayer:
    """The layer whose *input* is the feature of :func:`feature_kernel` by default.

    :class:`~pinet.InfPiMLP` / :class:`~pinet.FinPiMLP`: ``net.layers[-1]``. Any other module: its
    unique :class:`~pinet.InfPiLayer` with ``readout=True``, or its unique :class:`~pinet.FinPiLayer`
    without a projector (``proj is None``: the finite readout). Zero or several candidates are an
    error asking for ``layer=``.
    """
    if isinstance(net, (InfPiMLP, FinPiMLP)):
        return net.layers[-1]
    if isinstance(net, (InfPiLayer, FinPiLayer)):
        raise TypeError(
            "feature_kernel: net is a single π-layer; pass the network that contains it "
            "(and layer=that_layer)"
        )
    cands = [
        (name, m)
        for name, m in net.named_modules()
        if (isinstance(m, InfPiLayer) and m.readout) or (isinstance(m, FinPiLayer) and m.proj is None)
    ]
    if len(cands) != 1:
        found = ", ".join(name for name, _ in cands) or "none"
        raise ValueError(
            f"feature_kernel: cannot tell which layer's input is the feature: {type(net).__name__} has "
            f"{len(cands)} readout π-layers (InfPiLayer(readout=True) or FinPiLayer without Ω; found: {found}); "
            "pass layer=<the module whose input is the feature>"
        )
    return cands[0][1]


def _device(net: nn.Module) -> torch.device | None:
    for t in net.parameters():
        return t.device
    for t in net.buffers():
        return t.device
    return None


def _check_x(name: str, x, like: Tensor | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise TypeError(
            f"feature_kernel: {name} must be a tensor with the samples along dim 0, "
            f"got {getattr(x, 'shape', type(x).__name__)}"
        )
    if x.is_meta:  # no data to run the net on (torch would fail later with "Cannot copy out of meta tensor")
        raise ValueError(f"feature_kernel: {name} is on the meta device (it holds no data); pass a tensor with data")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"feature_kernel: {name} must have per-sample shape {tuple(like.shape[1:])} "
            f"like x1, got {tuple(x.shape)}"
        )
    return x


def _check_block(block_size) -> int:
    return _positive_index("feature_kernel", "block_size", block_size)


def _check_net_device(net: nn.Module) -> torch.device | None:
    if not isinstance(net, nn.Module):
        raise TypeError(f"feature_kernel: net must be an nn.Module, got {type(net).__name__}")
    dev = _device(net)
    if dev is not None and dev.type == "meta":
        raise ValueError("feature_kernel: net's parameters are on the meta device (they hold no data); "
                         "load or materialise them first")  # fmt: skip
    return dev


def _check_out(out, n1: int, n2: int) -> None:
    # Before any feature or block is computed: at 60,000 samples the features alone take minutes.
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(
            f"feature_kernel: out must be a ({n1}, {n2}) tensor or None, got {type(out).__name__}"
            + (" (wrap a numpy array with torch.from_numpy)" if hasattr(out, "__array__") else "")
        )
    if tuple(out.shape) != (n1, n2):
        raise ValueError(f"feature_kernel: out must be a ({n1}, {n2}) tensor, got shape {tuple(out.shape)}")
    # Blocks are moved to out's device (a CPU memmap for a net on a GPU is the intended use), but
    # a meta tensor holds no data: the kernel would be silently lost.
    if out.is_meta:
        raise ValueError("feature_kernel: out is on the meta device (it holds no data); pass a tensor with data")
    if out.requires_grad:
        raise ValueError("feature_kernel: out must not require grad (the blocks are written into it in place)")


def _check_progress(progress) -> None:
    # Checked before any block is computed: a bad callback must not fail half-way through `out`.
    if progress is not None and not callable(progress):
        raise TypeError(f"feature_kernel: progress must be a callable (done, total) or None, got {type(progress).__name__}")


def _check_kernel_args(dtype, out, progress) -> None:
    _check_progress(progress)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"feature_kernel: dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    if out is not None and isinstance(out, Tensor) and not out.is_floating_point():
        raise TypeError(f"feature_kernel: out must be a floating-point tensor, got {out.dtype}")


@torch.no_grad()
def features(
    net: nn.Module,
    x: Tensor,
    *,
    layer: nn.Module | None = None,
    block_size: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, Tensor, Tensor | None]:
    """The readout features of ``x`` (N, ...), computed ``block_size`` samples at a time.

    Returns ``(kind, F, s)``:

    - ``kind == "infinite"`` (``layer`` an :class:`~pinet.InfPiLayer`): ``F = ḡ`` (N, r) the unit
      directions of the coordinates entering the layer and ``s`` (N, 1) their norms (ones with the
      layer's layernorm), so that ``K = s sᵀ ⊙ J(F Fᵀ)``;
    - ``kind == "finite"`` (a :class:`~pinet.FinPiLayer`): ``F = relu(h)`` (N, n) (``relu(h/‖h‖)``
      with layernorm), ``s = None``, ``K = F Fᵀ``.

    The net runs in eval mode under ``torch.no_grad()`` (no π-rows are captured, nothing in the net
    changes) and stops as soon as the layer's input is known; training flags are restored after.
    ``progress(done, total)`` is called with the number of samples done after every block.
    """
    dev = _check_net_device(net)
    layer = readout_layer(net) if layer is None else layer
    if not isinstance(layer, (InfPiLayer, FinPiLayer)):
        raise TypeError(
            f"feature_kernel: layer must be an InfPiLayer or FinPiLayer of net, got {type(layer).__name__}"
        )
    if not any(m is layer for m in net.modules()):
        raise ValueError("feature_kernel: layer is not a submodule of net")
    x = _check_x("x", x)
    block_size = _check_block(block_size)
    _check_progress(progress)
    box: list[Tensor] = []

    def hook(module, args):
        box.append(args[0])
        raise _Captured

    modes = [(m, m.training) for m in net.modules()]
    handle = layer.register_forward_pre_hook(hook)
    parts_f, parts_s = [], []
    try:
        net.eval()
        for i in range(0, x.shape[0], block_size):
            xb = x[i : i + block_size]
            if dev is not None:
                xb = xb.to(dev)
            box.clear()
            try:
                net(xb)
            except _Captured:
                pass
            if not box:
                raise RuntimeError("feature_kernel: the layer was not called by net's forward")
            h = box[0]
            if isinstance(layer, InfPiLayer):
                h = h.to(layer.state.c.dtype)  # the dtype the layer itself computes in
                s, gbar = normalize_rows(h)
                if layer.layernorm:
                    s = torch.ones_like(s)
                parts_f.append(gbar)
                parts_s.append(s)
            else:
                h = h.to(layer.weight.dtype)
                if layer.layernorm:
                    h = h / h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
                parts_f.append(torch.relu(h))
            if progress is not None:
                progress(min(i + block_size, x.shape[0]), x.shape[0])
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    kind = "infinite" if isinstance(layer, InfPiLayer) else "finite"
    if not parts_f:  # zero samples
        width = layer.r_in if kind == "infinite" else layer.n_in
        dtype = layer.state.c.dtype if kind == "infinite" else layer.weight.dtype
        F = torch.zeros(0, width, dtype=dtype, device=dev)
        return kind, F, (torch.zeros(0, 1, dtype=dtype, device=dev) if kind == "infinite" else None)
    F = torch.cat(parts_f)
    return kind, F, (torch.cat(parts_s) if kind == "infinite" else None)


def _check_features(name: str, f) -> tuple:
    # What features() returns: (kind, F (N, w), s (N, 1) or None); a wrong one would fail in a product.
    if not isinstance(f, tuple) or len(f) != 3:
        raise TypeError(f"kernel_from_features: {name} must be the (kind, F, s) tuple of features(), got {type(f).__name__}")
    kind, F, _ = f  # s is checked by _check_norms, after the kinds of f1 and f2 are compared
    if kind not in ("infinite", "finite"):
        raise ValueError(f"kernel_from_features: {name}'s kind must be 'infinite' or 'finite', got {kind!r}")
    if not isinstance(F, Tensor) or F.dim() != 2 or not F.is_floating_point():
        raise TypeError(f"kernel_from_features: {name}'s F must be a 2-d floating-point tensor (N, w), "
                        f"got {getattr(F, 'shape', type(F).__name__)}")  # fmt: skip
    if F.is_meta:
        raise ValueError(f"kernel_from_features: {name}'s F is on the meta device (it holds no data)")
    return f


def _check_norms(name: str, f) -> None:
    # Infinite features carry their norms s (N, 1); finite ones have none (s is not read).
    kind, F, s = f
    if kind == "infinite" and not (isinstance(s, Tensor) and tuple(s.shape) == (F.shape[0], 1) and s.device == F.device):
        raise ValueError(f"kernel_from_features: {name}'s s must be a ({F.shape[0]}, 1) tensor on {F.device} "
                         f"for infinite features, got {getattr(s, 'shape', type(s).__name__)}")  # fmt: skip


def _block(kind: str, F1: Tensor, s1, F2: Tensor, s2) -> Tensor:
    if kind == "infinite":
        # J clamps the cosine to [-1, 1] (rounding of unit vectors).
        return (s1 * s2.T) * J(F1 @ F2.T)
    return F1 @ F2.T


def feature_kernel(
    net: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    layer: nn.Module | None = None,
    block_size: int = 512,
    dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Feature kernel of ``net`` between ``x1`` (n1, ...) and ``x2`` (n2, ...): (n1, n2).

    Infinite readout input ``g`` (b, r): ``K = ‖g‖‖g'‖ J(ḡ·ḡ')`` (norms 1 with layernorm); finite
    readout input ``h`` (b, n): ``K = relu(h)·relu(h')`` (of ``h/‖h‖`` with layernorm), no ``1/n``.
    ``x2=None``: the symmetric ``K(x1, x1)`` (only the upper block triangle is computed and mirrored,
    so it is exactly symmetric; it is positive semi-definite up to rounding).

    Args:
        net: an :class:`~pinet.InfPiMLP`, :class:`~pinet.FinPiMLP` or any module containing π-layers
            (the net is not modified; its training flags are restored).
        layer: the module whose *input* is the feature (default: :func:`readout_layer`).
        block_size: samples per forward block and rows/columns per kernel block; memory is
            ``O(block_size × M)`` for the forward (the π-layers' ``chunk_size`` bounds it further),
            the features (N, r) or (N, n), and ``block_size²`` per kernel block, besides the output.
        dtype: dtype of the kernel (default: the features' dtype, i.e. the net's compute dtype); the
            features are converted to it before the products. Use float64 for kernel regression.
        out: optional preallocated (n1, n2) floating-point tensor the blocks are written into
            (e.g. a ``torch.from_numpy`` view of a ``numpy.memmap`` for 60,000 × 60,000, also for
            a net on a GPU: each block is moved to ``out``'s device); returned. Its type, shape and
            device (not ``meta``) are checked before any feature is computed.
        progress: called as ``progress(done, total)`` after every kernel block.

    To form several kernels of the same inputs (train/train and test/train), compute
    :func:`features` once per input set and call :func:`kernel_from_features`.
    """
    x1 = _check_x("x1", x1)
    if x2 is not None:
        x2 = _check_x("x2", x2, like=x1)
    block_size = _check_block(block_size)
    _check_kernel_args(dtype, out, progress)  # before the features are computed
    _check_out(out, x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0])
    _check_net_device(net)
    layer = readout_layer(net) if layer is None else layer
    f1 = features(net, x1, layer=layer, block_size=block_size)
    f2 = None if x2 is None else features(net, x2, layer=layer, block_size=block_size)
    return kernel_from_features(f1, f2, block_size=block_size, dtype=dtype, out=out, progress=progress)


def kernel_from_features(
    f1: tuple,
    f2: tuple | None = None,
    *,
    block_size: int = 512,
    dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """The feature kernel (n1, n2) from :func:`features` outputs ``f1`` (of n1 samples) and ``f2``
    (``None``: the symmetric ``K(f1, f1)``); arguments as in :func:`feature_kernel`."""
    kind, F1, s1 = _check_features("f1", f1)
    if f2 is None:
        F2, s2 = F1, s1
    else:
        kind2, F2, s2 = _check_features("f2", f2)
        if kind2 != kind or F2.shape[1] != F1.shape[1]:
            raise ValueError(
                f"kernel_from_features: f1 and f2 must be features of the same layer, got {kind} "
                f"{tuple(F1.shape)} and {kind2} {tuple(F2.shape)}"
            )
        if F2.device != F1.device:
            raise ValueError(f"kernel_from_features: f1 and f2 must be on one device, got {F1.device} and {F2.device}")
        _check_norms("f2", f2)
    _check_norms("f1", f1)
    block_size = _check_block(block_size)
    _check_kernel_args(dtype, out, progress)
    _check_out(out, F1.shape[0], F2.shape[0])
    dtype = dtype or F1.dtype
    F1, F2 = F1.to(dtype), F2.to(dtype)
    s1 = s1.to(dtype) if kind == "infinite" else None  # finite features have no norms
    s2 = s2.to(dtype) if kind == "infinite" else None
    n1, n2 = F1.shape[0], F2.shape[0]
    if out is None:
        out = torch.empty(n1, n2, dtype=dtype, device=F1.device)
    sym = f2 is None
    starts1 = list(range(0, n1, block_size))
    starts2 = list(range(0, n2, block_size))
    total = len(starts1) * (len(starts1) + 1) // 2 if sym else len(starts1) * len(starts2)
    done = 0
    sl = lambda t, i: None if t is None else t[i : i + block_size]
    for bi, i in enumerate(starts1):
        for j in starts2[bi:] if sym else starts2:
            K = _block(kind, F1[i : i + block_size], sl(s1, i), F2[j : j + block_size], sl(s2, j))
            if sym and i == j:
                K = 0.5 * (K + K.T)  # exact symmetry on the diagonal blocks
            out[i : i + K.shape[0], j : j + K.shape[1]] = K.to(out.device, out.dtype)
            if sym and i != j:
                out[j : j + K.shape[1], i : i + K.shape[0]] = K.T.to(out.device, out.dtype)
            done += 1
            if progress is not None:
                progress(done, total)
    return out
