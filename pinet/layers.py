"""π-layers: infinite layers built on :class:`~pinet.state.PiState` and their finite counterparts.

Infinite layers map coordinates ``g`` (b, r) to coordinates; the ReLU lives *inside* the next
π-layer (it sees ``s · J(ḡ Bᵀ)``), so each layer returns a pre-activation. Finite layers mirror
that: :class:`FinPiLayer` applies ReLU (optionally of ``h / ‖h‖``) to its input.

Multipliers (``alpha`` on the layer's output, ``bias_alpha`` on its bias) and ``layernorm`` are part
of each layer's saved state (``get_extra_state``). ``bias_alpha == 0`` means no bias parameter.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from . import kernels
from .state import FinPiState, PiState

__all__ = ["InfPiInput", "InfPiLayer", "FinPiInput", "FinPiLayer"]


def _check_dim(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check_mult(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


class _Multipliers(nn.Module):
    """Shared plumbing: multipliers and layernorm saved as extra state, optional bias."""

    def _init_multipliers(self, alpha, bias_alpha, layernorm, bias_size, device, dtype) -> None:
        self.alpha = _check_mult("alpha", alpha)
        self.bias_alpha = _check_mult("bias_alpha", bias_alpha)
        if not isinstance(layernorm, bool):
            raise ValueError(f"layernorm must be a bool, got {layernorm!r}")
        self.layernorm = layernorm
        if self.bias_alpha != 0.0:
            self.bias = nn.Parameter(torch.zeros(bias_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _add_bias(self, out: Tensor) -> Tensor:
        if self.bias is None:
            return out
        return out + self.bias_alpha * self.bias.to(out.dtype)

    def get_extra_state(self) -> dict:
        return {"alpha": self.alpha, "bias_alpha": self.bias_alpha, "layernorm": self.layernorm}

    def set_extra_state(self, state: dict) -> None:
        bias_alpha = _check_mult("bias_alpha", state["bias_alpha"])
        if (bias_alpha == 0.0) != (self.bias is None):
            raise ValueError(
                f"{type(self).__name__}: saved bias_alpha={bias_alpha} but this layer was built "
                f"{'without' if self.bias is None else 'with'} a bias; rebuild it with a matching "
                "bias_alpha"
            )
        self.alpha = _check_mult("alpha", state["alpha"])
        self.bias_alpha = bias_alpha
        self.layernorm = bool(state["layernorm"])

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, bias_alpha={self.bias_alpha}, layernorm={self.layernorm}"


class InfPiInput(_Multipliers):
    """Infinite input layer: ``g = alpha (x A + bias_alpha b)``.

    Parameters: ``A`` (d_in, r), ``bias`` (r,) or ``None``. Input (b, d_in) -> output (b, r).
    Initialised with ``A ~ N(0, 1)``, each column scaled to unit norm, and a zero bias.
    """

    def __init__(
        self,
        d_in: int,
        r: int,
        *,
        alpha: float = 1.0,
        bias_alpha: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.d_in, self.r = _check_dim("d_in", d_in), _check_dim("r", r)
        self.A = nn.Parameter(torch.empty(d_in, r, device=device, dtype=dtype))
        self._init_multipliers(alpha, bias_alpha, False, r, device, dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``A ~ N(0, 1)`` with unit-norm columns; bias zero."""
        A = torch.randn(self.A.shape, generator=generator, dtype=torch.float64, device=self.A.device)
        self.A.copy_(A / A.norm(dim=0, keepdim=True))
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """(b, d_in) -> (b, r)."""
        return self.alpha * self._add_bias(x.to(self.A.dtype) @ self.A)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, r={self.r}, " + super().extra_repr()


class InfPiLayer(_Multipliers):
    """Infinite π-layer (hidden or output): ``alpha ((s J(ḡ Bᵀ) ⊙ c) A + bias_alpha b)``.

    The rows ``A`` (M, r_out), ``B`` (M, r_in) and coefficients ``c`` (M,) live in
    ``self.state`` (:class:`PiState`); ``bias`` (r_out,) is an ordinary parameter. Input (b, r_in)
    coordinates -> output (b, r_out) coordinates.

    During ``backward`` the layer captures its π-gradient rows ``(s ⊙ δ, ḡ)`` into ``self.state``,
    ``δ`` (b, r_out) being the gradient of the loss with respect to ``(s J ⊙ c) A + bias_alpha b``,
    the value before ``alpha`` (so ``δ`` carries ``alpha``). The coefficients are used
    detached in the forward: their gradient is the indicator of the appended rows, which the
    optimizer wrapper supplies (coefficient space, see the spec).

    Args:
        readout: initialise ``A = 0`` (output layer) instead of ``N(0, 1/r_out)``.
        chunk_size: evaluate at most this many rows of M at once (bounds ``b × M`` temporaries).
        growth: capacity growth factor of the state's stores.
    """

    def __init__(
        self,
        r_in: int,
        r_out: int,
        *,
        alpha: float = 1.0,
        bias_alpha: float = 1.0,
        layernorm: bool = False,
        readout: bool = False,
        chunk_size: int | None = None,
        device=None,
        dtype=None,
        coef_dtype=None,
    ) -> None:
        super().__init__()
        self.r_in, self.r_out = _check_dim("r_in", r_in), _check_dim("r_out", r_out)
        if chunk_size is not None:
            _check_dim("chunk_size", chunk_size)
        self.readout = bool(readout)
        self.chunk_size = chunk_size
        self.state = PiState(r_in, r_out, device=device, dtype=dtype, coef_dtype=coef_dtype)
        compute = self.state.c.dtype
        self._init_multipliers(alpha, bias_alpha, layernorm, r_out, device, compute)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Reset to ``M = r_in`` initial rows: ``B ~ N(0,1)`` unit rows, ``c = 1``,
        ``A ~ N(0, 1/r_out)`` (zeros if ``readout``); bias zero."""
        st = self.state
        dev = st.device
        B = torch.randn(self.r_in, self.r_in, generator=generator, dtype=torch.float64, device=dev)
        B = B / B.norm(dim=1, keepdim=True)
        if self.readout:
            A = torch.zeros(self.r_in, self.r_out, dtype=torch.float64, device=dev)
        else:
            A = torch.randn(self.r_in, self.r_out, generator=generator, dtype=torch.float64, device=dev)
            A = A / math.sqrt(self.r_out)
        st.truncate(0)
        st.append(A, B, torch.ones(self.r_in, dtype=torch.float64, device=dev))
        st.c.grad = None
        st.clear_pending()
        if self.bias is not None:
            self.bias.zero_()

    @property
    def A(self) -> Tensor:
        """(M, r_out) rows (view of ``state.A``)."""
        return self.state.A

    @property
    def B(self) -> Tensor:
        """(M, r_in) rows (view of ``state.B``)."""
        return self.state.B

    @property
    def c(self) -> nn.Parameter:
        """(M,) coefficients (``state.c``)."""
        return self.state.c

    def forward(self, g: Tensor) -> Tensor:
        """(b, r_in) -> (b, r_out)."""
        st = self.state
        c = st.c
        g = g.to(c.dtype)
        out, s, gbar = kernels.pi_layer(g, st.A, st.B, c.detach(), layernorm=self.layernorm, chunk_size=self.chunk_size)
        out = self._add_bias(out)
        if torch.is_grad_enabled() and c.requires_grad:
            if not out.requires_grad:
                # Nothing upstream is trainable; the layer's own rows still are.
                out.requires_grad_()
            out.register_hook(partial(_capture_hook, st, s.detach(), gbar.detach()))
        return self.alpha * out

    def extra_repr(self) -> str:
        return f"r_in={self.r_in}, r_out={self.r_out}, readout={self.readout}, " + super().extra_repr()


def _capture_hook(state: PiState, s: Tensor, gbar: Tensor, delta: Tensor) -> None:
    state.capture(s, gbar, delta)


class FinPiInput(_Multipliers):
    """Finite input layer: ``h = alpha (x Wᵀ + bias_alpha b)``.

    Parameters ``weight`` (n, d_in), ``bias`` (n,); ``self.proj`` (:class:`FinPiState`) holds this
    layer's ``Ω`` (n, r) onto whose span both gradients are projected. (b, d_in) -> (b, n).
    """

    def __init__(
        self, d_in: int, omega: Tensor, *, alpha: float = 1.0, bias_alpha: float = 1.0, dtype=None
    ) -> None:
        super().__init__()
        n = omega.shape[0]
        self.d_in, self.width = _check_dim("d_in", d_in), n
        dtype = dtype or omega.dtype
        self.weight = nn.Parameter(torch.zeros(n, d_in, device=omega.device, dtype=dtype))
        self._init_multipliers(alpha, bias_alpha, False, n, omega.device, dtype)
        self.proj = FinPiState(omega)

    def forward(self, x: Tensor) -> Tensor:
        """(b, d_in) -> (b, n)."""
        return self.alpha * self._add_bias(x.to(self.weight.dtype) @ self.weight.T)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, width={self.width}, " + super().extra_repr()


class FinPiLayer(_Multipliers):
    """Finite π-layer: ``alpha (relu(h) Wᵀ + bias_alpha b)``, or ``relu(h / ‖h‖)`` with layernorm.

    Parameters ``weight`` (n_out, n_in), ``bias`` (n_out,). Hidden layers carry ``self.proj``
    (:class:`FinPiState` with their own ``Ω`` (n_out, r)); the output layer has none and its
    gradients are not projected. (b, n_in) -> (b, n_out).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        omega: Tensor | None = None,
        alpha: float = 1.0,
        bias_alpha: float = 1.0,
        layernorm: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.n_in, self.n_out = _check_dim("n_in", n_in), _check_dim("n_out", n_out)
        if omega is not None:
            if omega.shape[0] != n_out:
                raise ValueError(f"omega must have n_out={n_out} rows, got {tuple(omega.shape)}")
            device = omega.device
            dtype = dtype or omega.dtype
        self.weight = nn.Parameter(torch.zeros(n_out, n_in, device=device, dtype=dtype))
        self._init_multipliers(alpha, bias_alpha, layernorm, n_out, device, dtype)
        if omega is not None:
            self.proj = FinPiState(omega)
        else:
            self.proj = None

    def forward(self, h: Tensor) -> Tensor:
        """(b, n_in) -> (b, n_out)."""
        h = h.to(self.weight.dtype)
        if self.layernorm:
            h = h / h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        return self.alpha * self._add_bias(torch.relu(h) @ self.weight.T)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, " + super().extra_repr()
