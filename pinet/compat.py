"""Load networks saved by the reference library (``pilimit_lib``)."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .models import InfPiMLP

__all__ = ["from_pilimit"]

_TOP = ("first_layer_alpha", "last_layer_alpha", "bias_alpha", "last_bias_alpha")
_PI = ("A", "B", "Amult", "bias", "bias_alpha", "layer_alpha")
# The spec lists only A and bias for the input layer; these two are accepted if present because
# some reference versions register the multipliers on every layer.
_INPUT_OPTIONAL = ("bias_alpha", "layer_alpha")


def _scalar(sd: dict, key: str) -> float:
    v = sd[key]
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"from_pilimit: {key!r} must be a scalar, got shape {tuple(v.shape)}")
        v = v.item()
    if not isinstance(v, (int, float)):
        raise ValueError(f"from_pilimit: {key!r} must be a number, got {type(v).__name__}")
    return float(v)


def from_pilimit(
    state_dict: dict,
    *,
    layernorm: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> InfPiMLP:
    """Build an :class:`InfPiMLP` from a ``pilimit_lib`` ``InfMLP`` state dict.

    Expected keys (spec, "Reference checkpoints"): ``first_layer_alpha``, ``last_layer_alpha``,
    ``bias_alpha``, ``last_bias_alpha``, ``layers.0.A`` (d, r), ``layers.0.bias`` (r,), and for each
    π-layer ``i >= 1``: ``layers.i.A`` (M, r_out), ``layers.i.B`` (M, r), ``layers.i.Amult`` (M,),
    ``layers.i.bias``, ``layers.i.bias_alpha``, ``layers.i.layer_alpha``. ``Amult`` becomes the
    coefficients ``c``. A layer's ``layer_alpha`` multiplies its output, so it is folded into that
    layer's ``alpha`` (times ``last_layer_alpha`` for the output layer).

    The reference does not save ``layernorm``: pass the value the network was trained with.
    ``dtype`` (storage of the π-state) defaults to that of ``layers.1.A``.

    Raises:
        KeyError: a required key is missing (named in the message).
        ValueError: an unknown key, a bad shape, or ``A``/``B``/``Amult`` row counts that disagree.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"from_pilimit: state_dict must be a dict, got {type(state_dict).__name__}")
    sd = dict(state_dict)
    for key in _TOP + ("layers.0.A",):
        if key not in sd:
            raise KeyError(f"from_pilimit: missing key {key!r}")
    indices = set()
    for key in sd:
        if key in _TOP:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", key)
        if m is None:
            raise ValueError(f"from_pilimit: unexpected key {key!r}")
        i, name = int(m.group(1)), m.group(2)
        allowed = ("A", "bias") + _INPUT_OPTIONAL if i == 0 else _PI
        if name not in allowed:
            raise ValueError(f"from_pilimit: unexpected key {key!r}")
        indices.add(i)
    n_pi = max(indices)
    if n_pi < 1 or indices != set(range(n_pi + 1)):
        raise ValueError(f"from_pilimit: π-layers must be numbered 1..L+1 without gaps, found layers {sorted(indices)}")
    depth = n_pi - 1

    A0 = sd["layers.0.A"]
    if A0.dim() != 2:
        raise ValueError(f"from_pilimit: 'layers.0.A' must be (d_in, r), got shape {tuple(A0.shape)}")
    d_in, r = A0.shape
    first_alpha = _scalar(sd, "first_layer_alpha")
    last_alpha = _scalar(sd, "last_layer_alpha")
    bias_alpha = _scalar(sd, "bias_alpha")
    last_bias_alpha = _scalar(sd, "last_bias_alpha")

    layers = []
    for i in range(1, n_pi + 1):
        p = f"layers.{i}."
        for name in ("A", "B", "Amult", "bias_alpha", "layer_alpha"):
            if p + name not in sd:
                raise KeyError(f"from_pilimit: missing key {p + name!r}")
        A, B, c = sd[p + "A"], sd[p + "B"], sd[p + "Amult"]
        if A.dim() != 2:
            raise ValueError(f"from_pilimit: {p + 'A'!r} must be (M, r_out), got shape {tuple(A.shape)}")
        M = A.shape[0]
        if B.dim() != 2 or B.shape[1] != r:
            raise ValueError(f"from_pilimit: {p + 'B'!r} must be (M, {r}), got shape {tuple(B.shape)}")
        if B.shape[0] != M:
            raise ValueError(f"from_pilimit: {p + 'B'!r} has {B.shape[0]} rows but {p + 'A'!r} has {M}")
        if c.reshape(-1).shape[0] != M:
            raise ValueError(f"from_pilimit: {p + 'Amult'!r} has {c.numel()} entries but {p + 'A'!r} has {M} rows")
        if i < n_pi and A.shape[1] != r:
            raise ValueError(f"from_pilimit: hidden layer {p + 'A'!r} must be (M, {r}), got shape {tuple(A.shape)}")
        layers.append((A, B, c.reshape(-1), _scalar(sd, p + "bias_alpha"), _scalar(sd, p + "layer_alpha")))
    d_out = layers[-1][0].shape[1]

    def check_bias(key: str, size: int, alpha: float) -> Tensor | None:
        b = sd.get(key)
        if b is None:
            if alpha != 0:
                raise KeyError(f"from_pilimit: missing key {key!r} (bias multiplier is {alpha})")
            return None
        if b.shape != (size,):
            raise ValueError(f"from_pilimit: {key!r} must have shape ({size},), got {tuple(b.shape)}")
        return b if alpha != 0 else None

    # bias multiplier 0 means no bias in pinet; a stored bias under a zero multiplier has no effect.
    b0 = check_bias("layers.0.bias", r, bias_alpha)
    hidden_bias_alpha = layers[0][3] if depth > 0 else bias_alpha
    net = InfPiMLP(
        d_in, d_out, r, depth,
        first_layer_alpha=first_alpha, last_layer_alpha=last_alpha * layers[-1][4],
        bias_alpha=bias_alpha, last_bias_alpha=layers[-1][3], layernorm=layernorm,
        chunk_size=chunk_size, device=device, dtype=dtype or layers[0][0].dtype,
    )  # fmt: skip
    for i, (A, B, c, ba, la) in enumerate(layers, start=1):
        layer = net.layers[i]
        if (ba == 0) != (layer.bias is None):
            raise ValueError(
                f"from_pilimit: 'layers.{i}.bias_alpha'={ba} disagrees with the network-wide bias multiplier "
                f"{hidden_bias_alpha if i < n_pi else last_bias_alpha}"
            )
        layer.bias_alpha = ba
        if i < n_pi:
            layer.alpha = la
        b = check_bias(f"layers.{i}.bias", A.shape[1], ba)
        layer.state.load_state_dict({"A": A, "B": B, "c": c})
        if b is not None:
            with torch.no_grad():
                layer.bias.copy_(b)
    with torch.no_grad():
        net.layers[0].A.copy_(A0)
        if b0 is not None:
            net.layers[0].bias.copy_(b0)
    return net
