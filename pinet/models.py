"""π-MLPs: the infinite-width :class:`InfPiMLP` and its finite-width sample :class:`FinPiMLP`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .checkpoint import StateDictError
from .checkpoint import load_state_dict as _load_state_dict
from .layers import InfPiInput, InfPiLayer, _check_dim, _check_mult, _Multipliers
from .sampling import finite_layers, sample, trace
from .state import _HALF, _check_dtype

__all__ = ["InfPiMLP", "FinPiMLP"]

_FORMAT = 1


def _check_input(x: Tensor, d_in: int, owner: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}.forward: x must be a tensor, got {type(x).__name__}")
    if x.is_complex():
        # Casting to the net's real dtype would silently drop the imaginary part.
        raise TypeError(f"{owner}.forward: x must be real (floating point or integer), got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"{owner}.forward: x must have shape (batch, {d_in}), got {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        # A NaN here would be captured as π-rows and poison every later output of the net.
        raise ValueError(f"{owner}.forward: x contains NaN or inf")


def _a(name: str) -> str:
    return ("an " if name[0] in "AEIOU" else "a ") + name


def _check_multipliers(first, last, bias, last_bias, hidden_bias, layernorm) -> tuple[float, float]:
    # Named after the constructor arguments (a layer's own message would only say "alpha").
    _check_mult("first_layer_alpha", first)
    _check_mult("last_layer_alpha", last)
    _check_mult("bias_alpha", bias)
    last_bias = bias if last_bias is None else _check_mult("last_bias_alpha", last_bias)
    hidden_bias = bias if hidden_bias is None else _check_mult("hidden_bias_alpha", hidden_bias)
    if not isinstance(layernorm, bool):
        raise ValueError(f"layernorm must be a bool, got {layernorm!r}")
    return last_bias, hidden_bias


def _saved_config(state_dict, owner: str) -> tuple[dict, dict, str]:
    """Structure, constructor keywords and the key whose dtype is the net's, read from a saved
    π-MLP state dict; a :class:`StateDictError` naming the key if they are missing or malformed."""

    def fail(msg: str):
        raise StateDictError(f"{owner}.from_state_dict: {msg}")

    if not isinstance(state_dict, Mapping):
        fail(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    s = state_dict.get("_extra_state")
    if not isinstance(s, dict) or "depth" not in s:
        fail("no '_extra_state' with the structure: not a pinet π-MLP state dict")
    finite = owner == "FinPiMLP"
    if ("width" in s) != finite:
        other = "FinPiMLP" if "width" in s else "InfPiMLP"
        fail(f"this is {_a(other)} state dict ('_extra_state' {'has' if 'width' in s else 'has no'} a width); "
             f"use pinet.{other}.from_state_dict")  # fmt: skip
    names = ("d_in", "d_out", "r", "depth") + (("width",) if finite else ())
    for k in names:
        v = s.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "depth" else 1):
            fail(f"'_extra_state' entry {k!r} must be a {'non-negative' if k == 'depth' else 'positive'} int, got {v!r}")
    depth = s["depth"]
    parsed = {}
    for i in sorted({0, min(1, depth + 1), depth + 1}):
        key = f"layers.{i}._extra_state"
        if key not in state_dict:
            fail(f"missing key {key!r}")
        try:
            parsed[i] = _Multipliers._parse_extra_state(state_dict[key], key)
        except ValueError as e:
            fail(str(e))
    first, last = parsed[0], parsed[depth + 1]
    kw = dict(
        first_layer_alpha=first["alpha"], last_layer_alpha=last["alpha"], bias_alpha=first["bias_alpha"],
        last_bias_alpha=last["bias_alpha"], layernorm=last["layernorm"],
        hidden_bias_alpha=parsed[1]["bias_alpha"] if depth > 0 else None,
    )  # fmt: skip
    dtype_key = "layers.0.weight" if finite else f"layers.{depth + 1}.state.A"
    if not isinstance(state_dict.get(dtype_key), Tensor):
        fail(f"missing key {dtype_key!r} (or it is not a tensor)")
    return s, kw, dtype_key


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
    def hidden_bias_alpha(self) -> float:
        """Bias multiplier of the hidden layers (that of the first one; ``bias_alpha`` if none)."""
        return self.layers[1].bias_alpha if self.depth > 0 else self.bias_alpha

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
            bias_alpha=self.bias_alpha, last_bias_alpha=self.last_bias_alpha,
            hidden_bias_alpha=self.hidden_bias_alpha, layernorm=self.layernorm,
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        """(b, d_in) -> (b, d_out)."""
        _check_input(x, self.d_in, type(self).__name__)
        for layer in self.layers:
            x = layer(x)
        return x

    def get_extra_state(self) -> dict:
        return {"format": _FORMAT, **self._structure()}

    # pinet.checkpoint: this module checks its own "_extra_state" (the structure) in the dry run.
    _pinet_checked_keys = ("_extra_state",)

    def _pinet_check_load(self, state_dict, prefix: str) -> list[str]:
        """Problems with the saved structure ``prefix + "_extra_state"``; writes nothing."""
        key = prefix + "_extra_state"
        if key not in state_dict:
            return []
        state, mine, name = state_dict[key], self._structure(), type(self).__name__
        if not isinstance(state, dict):
            return [f"{key}: expected the {name} structure (a dict), got {type(state).__name__}"]
        if ("width" in state) != ("width" in mine):
            kind = "FinPiMLP" if "width" in state else "InfPiMLP"
            return [f"{key}: this is {_a(kind)} state dict and the model is {_a(name)}; build the model with "
                    f"pinet.{kind}.from_state_dict"]  # fmt: skip
        saved = {k: state.get(k) for k in mine}
        if saved != mine:
            diff = ", ".join(f"{k}: saved {saved[k]!r} vs this {mine[k]!r}" for k in mine if saved[k] != mine[k])
            return [f"{key}: structure differs ({diff})"]
        extra = sorted(set(state) - set(self.get_extra_state()))
        if extra:
            return [f"{key}: unexpected entries {extra} for a {name}"]
        return []

    def set_extra_state(self, state: dict) -> None:
        problems = self._pinet_check_load({"_extra_state": state}, "")
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {problems[0]}")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load all or nothing (:func:`pinet.load_state_dict`): the whole state dict is checked
        first; on any problem a :class:`pinet.checkpoint.StateDictError` names every bad key and the
        net is exactly as before. ``assign=True`` is not supported."""
        if assign is not False:
            raise ValueError(f"{type(self).__name__}.load_state_dict: assign must be False (π-rows are copied "
                             f"into the net's own stores), got {assign!r}")  # fmt: skip
        return _load_state_dict(self, state_dict, strict=strict)


class InfPiMLP(_MLPConfig):
    """Infinite-width π-MLP: input layer, ``depth`` hidden π-layers, output π-layer.

    ``forward``: (b, d_in) -> (b, d_out). ``depth`` is the reference library's ``L`` (number of
    hidden π-layers). ``dtype`` is the storage dtype of the π-state; coefficients, biases, the
    input layer and the computation use at least float32. ``bias_alpha == 0`` builds no biases;
    ``hidden_bias_alpha`` (default ``bias_alpha``) and ``last_bias_alpha`` set the hidden and output
    layers' own (the reference library keeps unscaled hidden biases under a zero ``bias_alpha``).
    Multipliers and ``layernorm`` are saved with the state dict and restored on load;
    ``load_state_dict`` checks the whole state dict before writing (:func:`pinet.load_state_dict`).
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
        hidden_bias_alpha: float | None = None,
        layernorm: bool = False,
        chunk_size: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._set_structure(d_in, d_out, r, depth)
        last_bias_alpha, hidden_bias_alpha = _check_multipliers(
            first_layer_alpha, last_layer_alpha, bias_alpha, last_bias_alpha, hidden_bias_alpha, layernorm
        )
        _check_dtype("InfPiMLP", dtype)
        dtype = dtype or torch.get_default_dtype()
        compute = torch.float32 if dtype in _HALF else dtype
        kw = dict(device=device, dtype=dtype, chunk_size=chunk_size, layernorm=layernorm)
        layers = [InfPiInput(d_in, r, alpha=first_layer_alpha, bias_alpha=bias_alpha, device=device, dtype=compute)]
        layers += [InfPiLayer(r, r, bias_alpha=hidden_bias_alpha, **kw) for _ in range(depth)]
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
        """Build a net with the structure, multipliers and layernorm saved in ``state_dict`` (an
        ``InfPiMLP.state_dict()``) and load it. ``dtype`` defaults to the saved π-state's.

        Raises :class:`pinet.checkpoint.StateDictError` naming the key if ``state_dict`` is not an
        ``InfPiMLP`` state (a ``FinPiMLP`` state is named as such) or does not load."""
        s, kw, dtype_key = _saved_config(state_dict, "InfPiMLP")
        if dtype is None:
            dtype = state_dict[dtype_key].dtype
        net = cls(*(s[k] for k in ("d_in", "d_out", "r", "depth")), **kw, chunk_size=chunk_size, device=device, dtype=dtype)
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
        return sample(self, width, generator=generator, dtype=dtype)

    def _assemble_finite(self, layers: dict, width: int) -> "FinPiMLP":
        # pinet.sample's hook: the finite layers go into a FinPiMLP (not a copy of this class).
        ordered = [layers[f"layers.{i}"] for i in range(len(self.layers))]
        # Multipliers and layernorm live in the layers themselves.
        return FinPiMLP(self.d_in, self.d_out, self.r, self.depth, width, _layers=ordered)


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
        hidden_bias_alpha: float | None = None,
        layernorm: bool = False,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
        _layers: list[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self._set_structure(d_in, d_out, r, depth)
        self.width = _check_dim("width", width)
        if width < r:
            raise ValueError(f"width must be at least r={r} (the projection needs ΩᵀΩ invertible), got {width}")
        if _layers is not None:  # built by pinet.sample (InfPiMLP._assemble_finite)
            self.layers = nn.ModuleList(_layers)
            return
        last_bias_alpha, hidden_bias_alpha = _check_multipliers(
            first_layer_alpha, last_layer_alpha, bias_alpha, last_bias_alpha, hidden_bias_alpha, layernorm
        )
        _check_dtype("FinPiMLP", dtype)
        dtype = dtype or torch.get_default_dtype()
        if generator is not None:
            device = generator.device
        omegas = [
            torch.randn(width, r, generator=generator, device=device, dtype=torch.float64).to(dtype)
            for _ in range(depth + 1)
        ]
        # The finite π-net's initialisation is a sample of a fresh InfPiMLP (Ω drawn first, as always).
        source = InfPiMLP(
            d_in, d_out, r, depth, first_layer_alpha=first_layer_alpha,
            last_layer_alpha=last_layer_alpha, bias_alpha=bias_alpha, last_bias_alpha=last_bias_alpha,
            hidden_bias_alpha=hidden_bias_alpha, layernorm=layernorm, device=device, dtype=dtype,
        )  # fmt: skip
        flow = trace(source)
        layers = finite_layers(flow, dict(zip(flow.spaces, omegas)), dtype)
        self.layers = nn.ModuleList([layers[f"layers.{i}"] for i in range(depth + 2)])

    def _structure(self) -> dict:
        return {"d_in": self.d_in, "d_out": self.d_out, "r": self.r, "depth": self.depth, "width": self.width}

    @classmethod
    def from_state_dict(cls, state_dict: dict, *, device=None, dtype=None) -> "FinPiMLP":
        """Build a net with the structure, multipliers and layernorm saved in ``state_dict`` (a
        ``FinPiMLP.state_dict()``, ``Ω`` included) and load it. ``dtype`` defaults to the saved one.

        Raises :class:`pinet.checkpoint.StateDictError` naming the key if ``state_dict`` is not a
        ``FinPiMLP`` state (an ``InfPiMLP`` state is named as such) or does not load."""
        s, kw, dtype_key = _saved_config(state_dict, "FinPiMLP")
        if dtype is None:
            dtype = state_dict[dtype_key].dtype
        net = cls(*(s[k] for k in ("d_in", "d_out", "r", "depth", "width")), **kw, device=device, dtype=dtype)
        net.load_state_dict(state_dict)
        return net

    @property
    def omegas(self) -> list[Tensor]:
        """``Ω_l`` (n, r) of the non-output layers."""
        return [layer.proj.omega for layer in self.layers[:-1]]
