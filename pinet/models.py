"""π-MLPs: the infinite-width :class:`InfPiMLP` and its finite-width sample :class:`FinPiMLP`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import FinPiInput, FinPiLayer, InfPiInput, InfPiLayer, _check_dim, _check_mult
from .state import _HALF

__all__ = ["InfPiMLP", "FinPiMLP"]

_FORMAT = 1


def _check_input(x: Tensor, d_in: int, owner: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}.forward: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"{owner}.forward: x must have shape (batch, {d_in}), got {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        # A NaN here would be captured as π-rows and poison every later output of the net.
        raise ValueError(f"{owner}.forward: x contains NaN or inf")


class _MLPConfig(nn.Module):
    """Structure and multipliers shared by both MLPs; multipliers are read from the layers, which
    save them (and ``layernorm``) in their own extra state."""

    layers: nn.ModuleList

    @property
    def first_layer_alpha(self) -> float:
        return self.layers[0].alpha

    @property
    def last_layer_alpha(self) -> float:
        return self.layers[-1].alpha

    @property
    def bias_alpha(self) -> float:
        return self.layers[0].bias_alpha

    @property
    def last_bias_alpha(self) -> float:
        return self.layers[-1].bias_alpha

    @property
    def layernorm(self) -> bool:
        return self.layers[-1].layernorm

    def _set_structure(self, d_in, d_out, r, depth) -> None:
        self.d_in, self.d_out, self.r = _check_dim("d_in", d_in), _check_dim("d_out", d_out), _check_dim("r", r)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int (number of hidden π-layers), got {depth!r}")
        self.depth = depth

    def _structure(self) -> dict:
        raise NotImplementedError

    def multipliers(self) -> dict:
        """Keyword arguments that rebuild this net's multipliers and ``layernorm``."""
        return dict(
            first_layer_alpha=self.first_layer_alpha, last_layer_alpha=self.last_layer_alpha,
            bias_alpha=self.bias_alpha, last_bias_alpha=self.last_bias_alpha, layernorm=self.layernorm,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """(b, d_in) -> (b, d_out)."""
        _check_input(x, self.d_in, type(self).__name__)
        for layer in self.layers:
            x = layer(x)
        return x

    def get_extra_state(self) -> dict:
        return {"format": _FORMAT, **self._structure()}

    def set_extra_state(self, state: dict) -> None:
        mine = self._structure()
        saved = {k: state.get(k) for k in mine}
        if saved != mine:
            diff = ", ".join(f"{k}: saved {saved[k]!r} vs this {mine[k]!r}" for k in mine if saved[k] != mine[k])
            raise ValueError(f"{type(self).__name__}.load_state_dict: structure differs ({diff})")


class InfPiMLP(_MLPConfig):
    """Infinite-width π-MLP: input layer, ``depth`` hidden π-layers, output π-layer.

    ``forward``: (b, d_in) -> (b, d_out). ``depth`` is the reference library's ``L`` (number of
    hidden π-layers). ``dtype`` is the storage dtype of the π-state; coefficients, biases, the
    input layer and the computation use at least float32. ``bias_alpha == 0`` builds no biases.
    Multipliers and ``layernorm`` are saved with the state dict and restored on load.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int,
        depth: int,
        *,
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        layernorm: bool = False,
        chunk_size: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._set_structure(d_in, d_out, r, depth)
        _check_mult("first_layer_alpha", first_layer_alpha)
        _check_mult("last_layer_alpha", last_layer_alpha)
        _check_mult("bias_alpha", bias_alpha)
        last_bias_alpha = bias_alpha if last_bias_alpha is None else _check_mult("last_bias_alpha", last_bias_alpha)
        dtype = dtype or torch.get_default_dtype()
        compute = torch.float32 if dtype in _HALF else dtype
        kw = dict(device=device, dtype=dtype, chunk_size=chunk_size, layernorm=layernorm)
        layers = [InfPiInput(d_in, r, alpha=first_layer_alpha, bias_alpha=bias_alpha, device=device, dtype=compute)]
        layers += [InfPiLayer(r, r, bias_alpha=bias_alpha, **kw) for _ in range(depth)]
        layers.append(
            InfPiLayer(r, d_out, alpha=last_layer_alpha, bias_alpha=last_bias_alpha, readout=True, **kw)
        )
        self.layers = nn.ModuleList(layers)

    def _structure(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "r": self.r, "depth": self.depth}

    @property
    def pi_layers(self) -> list[InfPiLayer]:
        """The hidden and output π-layers."""
        return list(self.layers[1:])

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every layer (spec initialisation)."""
        for layer in self.layers:
            layer.reset_parameters(generator)

    @classmethod
    def from_state_dict(cls, state_dict: dict, *, device=None, dtype=None, chunk_size=None) -> "InfPiMLP":
        """Build a net with the structure, multipliers and layernorm saved in ``state_dict`` and load it."""
        try:
            s = state_dict["_extra_state"]
            first = state_dict["layers.0._extra_state"]
            last = state_dict[f"layers.{s['depth'] + 1}._extra_state"]
        except KeyError as e:
            raise KeyError(f"InfPiMLP.from_state_dict: missing key {e.args[0]!r} (not a pinet InfPiMLP state dict?)") from None
        if dtype is None:
            dtype = state_dict[f"layers.{s['depth'] + 1}.state.A"].dtype
        net = cls(
            s["d_in"], s["d_out"], s["r"], s["depth"],
            first_layer_alpha=first["alpha"], last_layer_alpha=last["alpha"],
            bias_alpha=first["bias_alpha"], last_bias_alpha=last["bias_alpha"],
            layernorm=last["layernorm"], chunk_size=chunk_size, device=device, dtype=dtype,
        )  # fmt: skip
        net.load_state_dict(state_dict)
        return net

    @torch.no_grad()
    def sample(self, width: int, *, generator: torch.Generator | None = None, dtype=None) -> "FinPiMLP":
        """Sample the finite π-MLP of ``width`` n from this net (trained or not).

        Draws ``Ω_l ~ N(0, 1)`` (n, r) for every non-output layer and sets (spec, finite network)
        ``W₀ = n^-½ Ω₀ A₀ᵀ``, ``W_l = n^-1 Ω_l (c⊙A)ᵀ relu(Ω_{l-1} Bᵀ)ᵀ``,
        ``W_out = n^-½ (c⊙A)ᵀ relu(Ω_L Bᵀ)ᵀ``, biases ``n^-½ Ω b`` (output bias copied).
        ``dtype`` defaults to the compute dtype of this net.
        """
        _check_dim("width", width)
        dtype = dtype or self.layers[0].A.dtype
        fin = FinPiMLP(
            self.d_in, self.d_out, self.r, self.depth, width, **self.multipliers(),
            device=self.layers[0].A.device, dtype=dtype, generator=generator, _init=False,
        )  # fmt: skip
        fin._load_sample(self)
        return fin


class FinPiMLP(_MLPConfig):
    """Finite-width π-MLP of width ``n``: a ReLU MLP whose non-output layers own projectors.

    ``forward``: (b, d_in) -> (b, d_out). Built either by :meth:`InfPiMLP.sample` or directly, in
    which case it is initialised as a sample of a freshly initialised :class:`InfPiMLP` of the same
    configuration (that *is* the finite π-net's initialisation). ``generator`` drives ``Ω``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int,
        depth: int,
        width: int,
        *,
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        layernorm: bool = False,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
        _init: bool = True,
    ) -> None:
        super().__init__()
        self._set_structure(d_in, d_out, r, depth)
        self.width = _check_dim("width", width)
        if width < r:
            raise ValueError(f"width must be at least r={r} (the projection needs ΩᵀΩ invertible), got {width}")
        last_bias_alpha = bias_alpha if last_bias_alpha is None else last_bias_alpha
        dtype = dtype or torch.get_default_dtype()
        if generator is not None:
            device = generator.device
        omegas = [
            torch.randn(width, r, generator=generator, device=device, dtype=torch.float64).to(dtype)
            for _ in range(depth + 1)
        ]
        layers: list[nn.Module] = [FinPiInput(d_in, omegas[0], alpha=first_layer_alpha, bias_alpha=bias_alpha)]
        layers += [
            FinPiLayer(width, width, omega=omegas[l], bias_alpha=bias_alpha, layernorm=layernorm)
            for l in range(1, depth + 1)
        ]
        layers.append(
            FinPiLayer(
                width, d_out, alpha=last_layer_alpha, bias_alpha=last_bias_alpha,
                layernorm=layernorm, device=device, dtype=dtype,
            )
        )  # fmt: skip
        self.layers = nn.ModuleList(layers)
        if _init:
            source = InfPiMLP(
                d_in, d_out, r, depth, first_layer_alpha=first_layer_alpha,
                last_layer_alpha=last_layer_alpha, bias_alpha=bias_alpha,
                last_bias_alpha=last_bias_alpha, layernorm=layernorm, device=device, dtype=dtype,
            )  # fmt: skip
            self._load_sample(source)

    def _structure(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "r": self.r, "depth": self.depth, "width": self.width}

    @property
    def omegas(self) -> list[Tensor]:
        """``Ω_l`` (n, r) of the non-output layers."""
        return [layer.proj.omega for layer in self.layers[:-1]]

    @torch.no_grad()
    def _load_sample(self, inf: InfPiMLP) -> None:
        n = self.width
        dtype = self.layers[0].weight.dtype
        omegas = self.omegas
        first = inf.layers[0]
        self.layers[0].weight.copy_(omegas[0] @ first.A.to(dtype).T / math.sqrt(n))
        if first.bias is not None:
            self.layers[0].bias.copy_(omegas[0] @ first.bias.to(dtype) / math.sqrt(n))
        for l, (src, dst) in enumerate(zip(inf.layers[1:], self.layers[1:]), start=1):
            prev = omegas[l - 1]
            is_out = l == len(self.layers) - 1
            left = None if is_out else omegas[l]
            dst.weight.copy_(_sample_pi_weight(src.state, prev, left, dtype))
            if src.bias is not None:
                b = src.bias.to(dtype)
                dst.bias.copy_(b if is_out else left @ b / math.sqrt(n))


def _sample_pi_weight(state, omega_in: Tensor, omega_out: Tensor | None, dtype) -> Tensor:
    """``n^-1 Ω_out (c⊙A)ᵀ relu(Ω_in Bᵀ)ᵀ`` (n, n), or ``n^-½ (c⊙A)ᵀ relu(Ω_in Bᵀ)ᵀ`` (k, n)
    without ``Ω_out``; summed over chunks of M so temporaries stay near ``n × chunk``."""
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
    return W / (n if omega_out is not None else math.sqrt(n))
