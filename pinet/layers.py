"""π-layers: infinite layers built on :class:`~pinet.state.PiState` and their finite counterparts.

Infinite layers map coordinates ``g`` (b, r) to coordinates; the ReLU lives *inside* the next
π-layer (it sees ``s · J(ḡ Bᵀ)``), so each layer returns a pre-activation. Finite layers mirror
that: :class:`FinPiLayer` applies ReLU (optionally of ``h / ‖h‖``) to its input.

Multipliers (``alpha`` on the layer's output, ``bias_alpha`` on its bias) and ``layernorm`` are part
of each layer's saved state (``get_extra_state``). ``bias_alpha == 0`` means no bias parameter.
"""

from __future__ import annotations

import math
import numbers
import operator
from functools import partial

import torch
from torch import Tensor, nn

from . import distributed, kernels
from .state import FinPiState, PiState, _check_dtype, owned_parameters

__all__ = [
    "ROLES",
    "InfPiModule",
    "FinPiModule",
    "pi_product",
    "capture_rows",
    "init_pi_rows",
    "sample_pi_weight",
    "InfPiInput",
    "InfPiLayer",
    "FinPiInput",
    "FinPiLayer",
]

#: Layer roles, as :func:`pinet.optim.param_groups` and :func:`pinet.sample` see them: an
#: ``"input"`` layer reads data and writes a coordinate space, a ``"hidden"`` layer reads and
#: writes coordinate spaces, a ``"readout"`` reads a coordinate space and returns plain outputs.
ROLES = ("input", "hidden", "readout")


def _check_dim(name: str, v) -> int:
    # numpy integers count (a width from np.arange or a config array), bool does not.
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _positive_index(where: str, name: str, v) -> int:
    """``v`` as a Python int >= 1: integer-likes (numpy integers) pass through ``operator.index``,
    bool does not (TypeError for a wrong type, ValueError below 1, both naming ``where`` and ``name``)."""
    try:
        n = None if isinstance(v, bool) else operator.index(v)
    except TypeError:
        n = None
    if n is None:
        raise TypeError(f"{where}: {name} must be a positive int, got {v!r}")
    if n < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    return n


def _check_mult(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _real(x, where: str) -> Tensor:
    # `.to(float)` of a complex tensor silently drops the imaginary part.
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: input must be a tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{where}: input must be real (floating point or integer), got {x.dtype}")
    return x


class InfPiModule(nn.Module):
    """Base class of infinite π-layers: the layer-extension protocol.

    A subclass is one layer of an infinite π-network: it reads data (``pi_role == "input"``) or the
    coordinates ``g`` (b, r_in) written by one other infinite layer, and writes coordinates of its
    own space (``"hidden"``) or plain outputs (``"readout"``). To be trained and sampled it

    * keeps every growing row set in a :class:`~pinet.state.PiState` submodule and computes with it
      through :func:`pi_product` (row capture, detached coefficients; the optimizer wrapper and all
      hooks then work, and the state is saved, loaded and moved like any submodule);
    * sets ``pi_role`` (an attribute or property, one of :data:`ROLES`);
    * implements :meth:`finite`, its finite counterpart given the ``Ω`` of its input and output
      spaces (used by :func:`pinet.sample`).

    Ordinary tensors (input weights, biases) are plain ``nn.Parameter`` s; a parameter whose name
    ends in ``bias`` gets the bias role in :func:`pinet.optim.param_groups`.
    """

    pi_role: str = "hidden"

    def finite(self, omega_in: Tensor | None, omega_out: Tensor | None, *, dtype: torch.dtype) -> nn.Module:
        """The finite layer of width ``n`` sampled from this one (trained or not).

        ``omega_in`` (n, r_in) is the ``Ω`` of the input space (``None`` for an input layer),
        ``omega_out`` (n, r_out) the ``Ω`` of this layer's own space (``None`` for a readout).
        Returns a module (usually a :class:`FinPiModule`) mapping ``(b, n)`` (or data) to
        ``(b, n)`` (or ``(b, r_out)`` for a readout); a non-readout finite layer owns a
        :class:`~pinet.state.FinPiState` with ``omega_out`` so its gradients are projected.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement InfPiModule.finite(omega_in, omega_out, dtype=...), "
            "so it has no finite counterpart"
        )


class FinPiModule(nn.Module):
    """Base class of finite π-layers: declares which parameters its projector acts on.

    A finite non-readout layer owns a :class:`~pinet.state.FinPiState` (``Ω`` of its output
    space); :class:`pinet.hooks.ProjectToR` replaces the gradients of the parameters returned by
    :meth:`projected_parameters` with their projections onto the span of ``Ω`` (left
    multiplication, so each of them must have ``n`` rows).
    """

    pi_role: str = "hidden"

    def projected_parameters(self):
        """``(name, parameter)`` pairs, names relative to this module, whose gradients are projected.

        Default: every parameter of this module and its submodules, except those under a submodule
        that owns a :class:`~pinet.state.FinPiState` of its own (it projects them itself).
        """
        yield from owned_parameters(self)


def pi_product(state: PiState, g: Tensor, *, layernorm: bool = False, chunk_size: int | None = None) -> Tensor:
    """The π-product of ``state`` with row capture: ``(s J(ḡ Bᵀ) ⊙ c) A``, (b, r_in) -> (b, r_out).

    This is the one call a custom infinite layer needs for each of its :class:`PiState` s. It
    uses the coefficients detached (their gradient is the indicator of the appended rows, which the
    optimizer wrapper supplies) and, when gradients are enabled and ``state.c`` is trainable,
    registers a hook on the result that captures the π-gradient rows ``(s ⊙ δ, ḡ)`` into
    ``state`` during ``backward``, ``δ`` (b, r_out) being the gradient of the loss with respect to
    the returned value. ``layernorm``: the layer sees ``ḡ`` only (``s = 1``).
    """
    if not isinstance(state, PiState):
        raise TypeError(f"pi_product: state must be a PiState, got {type(state).__name__}")
    if not isinstance(g, Tensor) or g.dim() != 2 or g.shape[1] != state.r_in:
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(f"pi_product: g must have shape (batch, {state.r_in}), got {shape}")
    c = state.c
    g = _real(g, "pi_product").to(c.dtype)
    shard = state.shard
    if shard is not None:
        # Rows sharded over processes (pinet.distributed): the tensor-parallel pair, so that the
        # output, its gradient δ and hence the captured rows are the same on every rank.
        g = distributed.copy_to_shards(g, shard.group)
    u, s, gbar = kernels.pi_layer(g, state.A, state.B, c.detach(), layernorm=layernorm, chunk_size=chunk_size)
    if shard is not None:
        u = distributed.reduce_from_shards(u, shard.group)
    if torch.is_grad_enabled() and c.requires_grad:
        if not u.requires_grad:
            # Nothing upstream is trainable; the layer's own rows still are.
            u.requires_grad_()
        u.register_hook(partial(_capture_hook, state, s.detach(), gbar.detach()))
    return u


class _Multipliers(nn.Module):
    """Shared plumbing: multipliers and layernorm saved as extra state, optional bias."""

    def _init_multipliers(self, alpha, bias_alpha, layernorm, bias_size, device, dtype) -> None:
        _check_dtype(type(self).__name__, dtype)
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

    @staticmethod
    def _parse_extra_state(state, key: str = "_extra_state") -> dict:
        """Check a saved extra state ``{"alpha", "bias_alpha", "layernorm"}`` (``key`` names it in
        messages): finite numbers and a real bool (a string ``"false"`` is refused, not truthy).
        Returns the three values as ``float, float, bool``; raises ``ValueError``."""
        if not isinstance(state, dict):
            raise ValueError(f"{key}: expected a dict with alpha, bias_alpha and layernorm, got {type(state).__name__}")
        missing = [k for k in ("alpha", "bias_alpha", "layernorm") if k not in state]
        if missing:
            raise ValueError(f"{key}: missing {', '.join(missing)}")
        out = {}
        for k in ("alpha", "bias_alpha"):
            v = state[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{key}: {k} must be a finite number, got {v!r}")
            out[k] = float(v)
        if not isinstance(state["layernorm"], bool):
            raise ValueError(f"{key}: layernorm must be a bool, got {state['layernorm']!r}")
        out["layernorm"] = state["layernorm"]
        return out

    def _pinet_check_load(self, state_dict, prefix: str) -> list[str]:
        """Problems with ``prefix + "_extra_state"`` in ``state_dict`` (see :mod:`pinet.checkpoint`);
        writes nothing. The ordinary tensors (weights, bias) get torch's own shape checks."""
        key = prefix + "_extra_state"
        if key not in state_dict:
            return []
        state = state_dict[key]
        try:
            parsed = self._parse_extra_state(state, key)
        except ValueError as e:
            return [str(e)]
        # Keys a subclass adds to get_extra_state are its own business; unknown ones are refused.
        extra = sorted(set(state) - set(self.get_extra_state()))
        if extra:
            return [f"{key}: unexpected entries {extra} for a {type(self).__name__}"]
        bias_alpha = parsed["bias_alpha"]
        if (bias_alpha == 0.0) != (self.bias is None):
            return [
                f"{key}: saved bias_alpha={bias_alpha} but this layer was built "
                f"{'without' if self.bias is None else 'with'} a bias; rebuild it with a matching "
                "bias_alpha"
            ]
        return []

    _pinet_checked_keys = ("_extra_state",)

    def set_extra_state(self, state: dict) -> None:
        problems = self._pinet_check_load({"_extra_state": state}, "")
        if problems:
            raise ValueError(f"{type(self).__name__}: {problems[0]}")
        parsed = self._parse_extra_state(state)
        self.alpha, self.bias_alpha, self.layernorm = parsed["alpha"], parsed["bias_alpha"], parsed["layernorm"]

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, bias_alpha={self.bias_alpha}, layernorm={self.layernorm}"


class InfPiInput(_Multipliers, InfPiModule):
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
        _check_dtype("InfPiInput", dtype)
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

    pi_role = "input"

    def forward(self, x: Tensor) -> Tensor:
        """(b, d_in) -> (b, r)."""
        return self.alpha * self._add_bias(kernels.thin_matmul(_real(x, "InfPiInput").to(self.A.dtype), self.A))

    @torch.no_grad()
    def finite(self, omega_in: Tensor | None, omega_out: Tensor | None, *, dtype: torch.dtype) -> "FinPiInput":
        """``W₀ = n^-½ Ω A₀ᵀ`` (n, d_in), bias ``n^-½ Ω b₀``, with ``Ω = omega_out`` (n, r)."""
        if omega_in is not None or omega_out is None:
            raise ValueError("InfPiInput.finite: an input layer reads data (omega_in=None) and writes a space (omega_out)")
        n = omega_out.shape[0]
        fin = FinPiInput(self.d_in, omega_out, alpha=self.alpha, bias_alpha=self.bias_alpha, dtype=dtype)
        fin.weight.copy_(omega_out @ self.A.to(dtype).T / math.sqrt(n))
        if self.bias is not None:
            fin.bias.copy_(omega_out @ self.bias.to(dtype) / math.sqrt(n))
        return fin

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, r={self.r}, " + super().extra_repr()


class InfPiLayer(_Multipliers, InfPiModule):
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
        init_pi_rows(self.state, readout=self.readout, generator=generator)
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

    @property
    def pi_role(self) -> str:
        """``"readout"`` if built with ``readout=True``, else ``"hidden"``."""
        return "readout" if self.readout else "hidden"

    def forward(self, g: Tensor) -> Tensor:
        """(b, r_in) -> (b, r_out)."""
        u = pi_product(self.state, g, layernorm=self.layernorm, chunk_size=self.chunk_size)
        return self.alpha * self._add_bias(u)

    @torch.no_grad()
    def finite(self, omega_in: Tensor | None, omega_out: Tensor | None, *, dtype: torch.dtype) -> "FinPiLayer":
        """Hidden: ``W = n^-1 Ω_out (c⊙A)ᵀ relu(Ω_in Bᵀ)ᵀ`` (n, n), bias ``n^-½ Ω_out b``;
        readout (``omega_out=None``): ``W = n^-½ (c⊙A)ᵀ relu(Ω_in Bᵀ)ᵀ`` (r_out, n), bias copied."""
        if omega_in is None:
            raise ValueError("InfPiLayer.finite: a π-layer reads a coordinate space; omega_in is required")
        n = omega_in.shape[0]
        n_out = self.r_out if omega_out is None else omega_out.shape[0]
        fin = FinPiLayer(
            n, n_out, omega=omega_out, alpha=self.alpha, bias_alpha=self.bias_alpha, layernorm=self.layernorm,
            device=omega_in.device, dtype=dtype,
        )  # fmt: skip
        fin.weight.copy_(sample_pi_weight(self.state, omega_in, omega_out, dtype=dtype))
        if self.bias is not None:
            b = self.bias.to(dtype)
            fin.bias.copy_(b if omega_out is None else omega_out @ b / math.sqrt(n))
        return fin

    def extra_repr(self) -> str:
        return f"r_in={self.r_in}, r_out={self.r_out}, readout={self.readout}, " + super().extra_repr()


def _capture_hook(state: PiState, s: Tensor, gbar: Tensor, delta: Tensor) -> None:
    if not _CAPTURE["enabled"]:
        # A gradient that is not a training gradient (e.g. MAML's inner-loop autograd.grad):
        # counted, so a caller can tell that a π-product was differentiated through.
        _CAPTURE["suppressed"] += 1
        return
    state.capture(s, gbar, delta)


# Row capture switch (see capture_rows); a module-level flag read when a capture hook fires.
_CAPTURE = {"enabled": True, "suppressed": 0}


class capture_rows:
    """Context manager: ``with pinet.layers.capture_rows(False): ...`` makes every π-product's
    capture hook that fires inside the block record nothing (``True`` re-enables it).

    For gradients that must not become π-rows, such as an inner-loop ``torch.autograd.grad``
    (MAML, :mod:`pinet.meta`). The hooks registered by a forward inside the block still capture
    in a later ``backward`` outside it. ``suppressed`` counts the hooks that fired while disabled
    (π-products whose output received a gradient in the block)."""

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"capture_rows: enabled must be a bool, got {enabled!r}")
        self.enabled = enabled
        self.suppressed = 0

    def __enter__(self) -> "capture_rows":
        self._saved = dict(_CAPTURE)
        _CAPTURE["enabled"] = self.enabled
        _CAPTURE["suppressed"] = 0
        return self

    def __exit__(self, *exc) -> None:
        self.suppressed = _CAPTURE["suppressed"]
        _CAPTURE["enabled"] = self._saved["enabled"]
        _CAPTURE["suppressed"] = self._saved["suppressed"] + self.suppressed


@torch.no_grad()
def init_pi_rows(state: PiState, *, readout: bool = False, generator: torch.Generator | None = None) -> None:
    """Reset ``state`` to the spec's initialisation: ``M = r_in`` rows, ``B ~ N(0, 1)`` scaled to
    unit rows (r_in, r_in), ``c = 1``, ``A ~ N(0, 1/r_out)`` (r_in, r_out), zeros if ``readout``.
    Drawn in float64 from ``generator``; captured rows and ``c.grad`` are dropped."""
    dev = state.device
    r_in, r_out = state.r_in, state.r_out
    B = torch.randn(r_in, r_in, generator=generator, dtype=torch.float64, device=dev)
    B = B / B.norm(dim=1, keepdim=True)
    if readout:
        A = torch.zeros(r_in, r_out, dtype=torch.float64, device=dev)
    else:
        A = torch.randn(r_in, r_out, generator=generator, dtype=torch.float64, device=dev) / math.sqrt(r_out)
    state.truncate(0)
    state.append(A, B, torch.ones(r_in, dtype=torch.float64, device=dev))
    state.c.grad = None
    state.clear_pending()


@torch.no_grad()
def sample_pi_weight(state: PiState, omega_in: Tensor, omega_out: Tensor | None, *, dtype: torch.dtype) -> Tensor:
    """The finite weight of a π-product: ``n^-1 Ω_out (c⊙A)ᵀ relu(Ω_in Bᵀ)ᵀ`` (n_out, n) for a
    hidden layer, ``n^-½ (c⊙A)ᵀ relu(Ω_in Bᵀ)ᵀ`` (r_out, n) for a readout (``omega_out=None``).

    ``omega_in`` (n, r_in) is the input space's ``Ω``, ``omega_out`` (n_out, r_out) this layer's.
    The finite layer computes ``relu(h) Wᵀ`` (``relu(h / ‖h‖)`` where the infinite one uses
    layernorm). Summed over chunks of M so temporaries stay near ``n × chunk``.

    A sharded state (:func:`pinet.distributed.shard`) sums its local rows and all-reduces ``W``
    over its process group, so every rank gets the whole layer's weight: a collective call, made
    by every rank with the same ``Ω``."""
    n = omega_in.shape[0]
    M = state.rows
    chunk = max(1, 2**24 // max(n, 1))
    rows_out = n if omega_out is not None else state.r_out
    W = torch.zeros(rows_out, n, dtype=dtype, device=omega_in.device)
    for start in range(0, M, chunk):
        stop = min(start + chunk, M)
        cA = state.A[start:stop].to(dtype) * state.c[start:stop].detach().to(dtype)[:, None]  # (m, r_out)
        R = torch.relu(omega_in @ state.B[start:stop].to(dtype).T)  # (n, m)
        left = cA.T if omega_out is None else omega_out @ cA.T  # (rows_out, m)
        W += left @ R.T
    if state.shard is not None:
        distributed._all_reduce(W, state.shard.group, "sample_pi_weight")  # the rows are a sum
    return W / (n if omega_out is not None else math.sqrt(n))


class FinPiInput(_Multipliers, FinPiModule):
    """Finite input layer: ``h = alpha (x Wᵀ + bias_alpha b)``.

    Parameters ``weight`` (n, d_in), ``bias`` (n,); ``self.proj`` (:class:`FinPiState`) holds this
    layer's ``Ω`` (n, r) onto whose span both gradients are projected. (b, d_in) -> (b, n).
    """

    def __init__(
        self, d_in: int, omega: Tensor, *, alpha: float = 1.0, bias_alpha: float = 1.0, dtype=None
    ) -> None:
        super().__init__()
        if not isinstance(omega, Tensor) or omega.dim() != 2:
            got = tuple(omega.shape) if isinstance(omega, Tensor) else type(omega).__name__
            raise ValueError(f"FinPiInput: omega must be a tensor (n, r), got {got}")
        _check_dtype("FinPiInput", dtype)
        n = omega.shape[0]
        self.d_in, self.width = _check_dim("d_in", d_in), n
        dtype = dtype or omega.dtype
        self.weight = nn.Parameter(torch.zeros(n, d_in, device=omega.device, dtype=dtype))
        self._init_multipliers(alpha, bias_alpha, False, n, omega.device, dtype)
        self.proj = FinPiState(omega)

    pi_role = "input"

    def forward(self, x: Tensor) -> Tensor:
        """(b, d_in) -> (b, n)."""
        return self.alpha * self._add_bias(_real(x, "FinPiInput").to(self.weight.dtype) @ self.weight.T)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, width={self.width}, " + super().extra_repr()


class FinPiLayer(_Multipliers, FinPiModule):
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
        _check_dtype("FinPiLayer", dtype)
        if omega is not None:
            if not isinstance(omega, Tensor) or omega.dim() != 2:
                got = tuple(omega.shape) if isinstance(omega, Tensor) else type(omega).__name__
                raise ValueError(f"FinPiLayer: omega must be a tensor (n_out, r) or None, got {got}")
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

    @property
    def pi_role(self) -> str:
        """``"hidden"`` with a projector, ``"readout"`` without."""
        return "readout" if self.proj is None else "hidden"

    def forward(self, h: Tensor) -> Tensor:
        """(b, n_in) -> (b, n_out)."""
        h = _real(h, "FinPiLayer").to(self.weight.dtype)
        if self.layernorm:
            h = h / h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
        return self.alpha * self._add_bias(torch.relu(h) @ self.weight.T)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, " + super().extra_repr()
