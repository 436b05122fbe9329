"""Load networks saved by the reference library (``pilimit_lib``).

What the reference's ``InfMLP`` computes (``pilimit_lib/inf/layers.py``, ``examples/networks.py``)
and how each saved key maps onto an :class:`~pinet.InfPiMLP`:

* input layer: ``g = first_layer_alpha * (x A₀ + bias_alpha₀ b₀)``; the reference builds the bias
  only when its ``bias_alpha`` is non-zero (``layers.0.bias_alpha``, else the top-level
  ``bias_alpha``);
* π-layer ``i``: ``(s J(ḡ Bᵀ) ⊙ Amult) A + β_i b_i`` with ``β_i = bias_alpha_i`` if non-zero and
  ``β_i = 1`` if it is zero: the reference always builds and trains these biases and adds them
  unscaled under a zero multiplier, so pinet loads them with multiplier 1 (exactly the same
  forward and gradient);
* the output is multiplied by ``last_layer_alpha``.

``layers.i.layer_alpha`` is **not** part of the forward: in the reference it is only the
learning-rate multiplier of that layer's coefficients ``Amult`` (new coefficients are
``-lr · layer_alpha · gradient``; weight decay ``1 - lr · wd`` does not use it). It is therefore not
folded into any multiplier; :func:`pilimit_lr_mults` returns it per coefficient parameter so
that training can continue as in the reference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from .models import InfPiMLP
from .state import unit_row_tolerance, worst_unit_row

__all__ = ["from_pilimit", "pilimit_lr_mults"]

_TOP = ("first_layer_alpha", "last_layer_alpha", "bias_alpha", "last_bias_alpha")
_PI = ("A", "B", "Amult", "bias", "bias_alpha", "layer_alpha")
# The spec lists only A and bias for the input layer; the reference also registers its bias_alpha
# buffer there, and some versions a layer_alpha (accepted only as 1: no reference forward uses it
# and no reference optimizer reads it for the input layer).
_INPUT = ("A", "bias", "bias_alpha", "layer_alpha")
_TENSORS = ("A", "B", "Amult", "bias")


def _tensor(sd: Mapping, key: str) -> Tensor:
    v = sd[key]
    if not isinstance(v, Tensor):
        raise TypeError(f"from_pilimit: {key!r} must be a tensor, got {type(v).__name__}")
    if not v.is_floating_point() or v.is_complex():
        raise TypeError(f"from_pilimit: {key!r} must be a real floating-point tensor, got {v.dtype}")
    return v


def _scalar(sd: Mapping, key: str) -> float:
    v = sd[key]
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"from_pilimit: {key!r} must be a scalar, got shape {tuple(v.shape)}")
        if v.is_complex():
            raise ValueError(f"from_pilimit: {key!r} must be real, got {v.dtype}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"from_pilimit: {key!r} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"from_pilimit: {key!r} must be finite, got {v}")
    return float(v)


def _check_unit_rows(key: str, B: Tensor) -> None:
    """A ValueError naming ``key`` and its worst row unless every row of ``B`` has norm 1 or 0
    within :func:`pinet.state.unit_row_tolerance` (which half-precision checkpoints pass). The
    reference stores directions ḡ = g / ‖g‖; pinet clamps the cosine ḡ·B_i to [-1, 1] and the
    reference does not, so rows of norm 3 loaded silently and computed a different forward (off
    by 20)."""
    if B.layout != torch.strided or B.device.type == "meta" or B.shape[0] == 0:
        return  # no data to read: sparse and meta tensors are refused by the load itself
    row, norm, dist = worst_unit_row(B)
    tol = unit_row_tolerance(B.dtype)
    if not dist <= tol:
        raise ValueError(
            f"from_pilimit: {key!r} rows must be unit vectors (the reference stores input directions g/|g|) or zero, "
            f"within {tol:.1e} for {B.dtype}; row {row} has norm {norm:.6g}"
        )


def _layer_indices(sd: Mapping) -> int:
    """Check the key set; return the number of π-layers (L + 1)."""
    for key in _TOP + ("layers.0.A",):
        if key not in sd:
            raise KeyError(f"from_pilimit: missing key {key!r}")
    indices = set()
    for key in sd:
        if key in _TOP:
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(f"from_pilimit: unexpected key {key!r}")
        i, name = int(m.group(1)), m.group(2)
        if name not in (_INPUT if i == 0 else _PI):
            raise ValueError(f"from_pilimit: unexpected key {key!r}")
        if name in _TENSORS:
            _tensor(sd, key)
        else:
            _scalar(sd, key)
        indices.add(i)
    n_pi = max(indices)
    if n_pi < 1 or indices != set(range(n_pi + 1)):
        raise ValueError(f"from_pilimit: π-layers must be numbered 1..L+1 without gaps, found layers {sorted(indices)}")
    for i in range(1, n_pi + 1):
        for name in ("A", "B", "Amult", "bias_alpha", "layer_alpha"):
            if f"layers.{i}.{name}" not in sd:
                raise KeyError(f"from_pilimit: missing key {f'layers.{i}.{name}'!r}")
    if "layers.0.layer_alpha" in sd and _scalar(sd, "layers.0.layer_alpha") != 1.0:
        raise ValueError(
            f"from_pilimit: 'layers.0.layer_alpha' is {_scalar(sd, 'layers.0.layer_alpha')}; the reference's input "
            "layer has no layer_alpha, so what this checkpoint means by it is unknown (only 1 is accepted)"
        )
    return n_pi


def pilimit_lr_mults(state_dict: Mapping) -> dict[str, float]:
    """The reference's per-layer learning-rate multipliers (``layers.i.layer_alpha``) keyed by the
    name of the :class:`~pinet.InfPiMLP` parameter they act on: ``{"layers.i.state.c": float}``.

    In the reference, a π-layer's new coefficients are ``-lr · layer_alpha · gradient`` and its
    weight decay ``c ← (1 - lr · wd) c`` ignores ``layer_alpha``. With plain SGD the same update is
    the parameter group ``{"params": [c], "lr": lr * m, "weight_decay": wd / m}`` (for ``m > 0``),
    e.g. (``net = from_pilimit(sd)``)::

        mults = pilimit_lr_mults(sd)
        groups = [{"params": [p], "lr": lr * mults.get(k, 1.0), "weight_decay": wd / mults.get(k, 1.0)}
                  for k, p in net.named_parameters()]

    Raises the same errors as :func:`from_pilimit` for a malformed state dict.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"pilimit_lr_mults: state_dict must be a mapping, got {type(state_dict).__name__}")
    n_pi = _layer_indices(state_dict)
    return {f"layers.{i}.state.c": _scalar(state_dict, f"layers.{i}.layer_alpha") for i in range(1, n_pi + 1)}


def from_pilimit(
    state_dict: Mapping,
    *,
    layernorm: bool = False,
    device=None,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> InfPiMLP:
    """Build an :class:`InfPiMLP` that computes exactly what a ``pilimit_lib`` ``InfMLP`` computes.

    Expected keys (spec, "Reference checkpoints"): ``first_layer_alpha``, ``last_layer_alpha``,
    ``bias_alpha``, ``last_bias_alpha``, ``layers.0.A`` (d, r), ``layers.0.bias`` (r,) (optional
    ``layers.0.bias_alpha``), and for each π-layer ``i >= 1``: ``layers.i.A`` (M, r_out),
    ``layers.i.B`` (M, r), ``layers.i.Amult`` (M,) (the coefficients ``c``), ``layers.i.bias``,
    ``layers.i.bias_alpha``, ``layers.i.layer_alpha``. See the module docstring for the forward:
    a π-layer bias under ``bias_alpha = 0`` is kept with multiplier 1 (as the reference adds it),
    and ``layer_alpha`` is a learning-rate multiplier only, returned by :func:`pilimit_lr_mults`
    (it does not change the forward).

    The reference does not save ``layernorm``: pass the value the network was trained with.
    ``dtype`` (storage of the π-state) defaults to that of ``layers.1.A``.

    Raises:
        KeyError: a required key is missing (named in the message).
        TypeError: an entry is not a tensor / a number where one belongs (named).
        ValueError: an unknown key, a bad shape (``Amult`` must be 1-d of length ``M``),
            ``A``/``B``/``Amult`` row counts that disagree, ``B`` rows whose norms are not 1 (or 0)
            to the precision of their dtype, a NaN or infinite multiplier, or a trained input bias
            under a zero input ``bias_alpha`` (the reference would not use it; refused rather than
            dropped).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"from_pilimit: state_dict must be a mapping, got {type(state_dict).__name__}")
    sd = dict(state_dict)
    n_pi = _layer_indices(sd)
    depth = n_pi - 1

    A0 = sd["layers.0.A"]
    if A0.dim() != 2:
        raise ValueError(f"from_pilimit: 'layers.0.A' must be (d_in, r), got shape {tuple(A0.shape)}")
    d_in, r = A0.shape
    first_alpha = _scalar(sd, "first_layer_alpha")
    last_alpha = _scalar(sd, "last_layer_alpha")
    for key in ("bias_alpha", "last_bias_alpha"):
        _scalar(sd, key)  # only construction arguments in the reference: the layers' own values count
    in_key = "layers.0.bias_alpha" if "layers.0.bias_alpha" in sd else "bias_alpha"
    in_bias_alpha = _scalar(sd, in_key)

    def bias(key: str, size: int) -> Tensor | None:
        b = sd.get(key)
        if b is not None and b.shape != (size,):
            raise ValueError(f"from_pilimit: {key!r} must have shape ({size},), got {tuple(b.shape)}")
        return b

    b0 = bias("layers.0.bias", r)
    if in_bias_alpha != 0 and b0 is None:
        raise KeyError(f"from_pilimit: missing key 'layers.0.bias' ({in_key!r} is {in_bias_alpha})")
    if in_bias_alpha == 0 and b0 is not None:
        raise ValueError(
            f"from_pilimit: 'layers.0.bias' is present but {in_key!r} is 0; the reference builds no input "
            "bias then and its forward would not add one, so this checkpoint is not a reference InfMLP "
            "(refused rather than dropping a trained tensor)"
        )

    layers = []
    for i in range(1, n_pi + 1):
        p = f"layers.{i}."
        A, B, c = sd[p + "A"], sd[p + "B"], sd[p + "Amult"]
        if A.dim() != 2:
            raise ValueError(f"from_pilimit: {p + 'A'!r} must be (M, r_out), got shape {tuple(A.shape)}")
        M = A.shape[0]
        if B.dim() != 2 or B.shape[1] != r:
            raise ValueError(f"from_pilimit: {p + 'B'!r} must be (M, {r}), got shape {tuple(B.shape)}")
        if B.shape[0] != M:
            raise ValueError(f"from_pilimit: {p + 'B'!r} has {B.shape[0]} rows but {p + 'A'!r} has {M}")
        if c.dim() != 1:
            # One coefficient per row: a (3, 3) Amult for M = 9 used to be flattened and loaded, pairing
            # coefficients with rows in an order nobody saved.
            raise ValueError(f"from_pilimit: {p + 'Amult'!r} must be a 1-d vector (M,) of coefficients, got shape "
                             f"{tuple(c.shape)}")  # fmt: skip
        if c.shape[0] != M:
            raise ValueError(f"from_pilimit: {p + 'Amult'!r} has {c.numel()} entries but {p + 'A'!r} has {M} rows")
        if i < n_pi and A.shape[1] != r:
            raise ValueError(f"from_pilimit: hidden layer {p + 'A'!r} must be (M, {r}), got shape {tuple(A.shape)}")
        _check_unit_rows(p + "B", B)
        ba = _scalar(sd, p + "bias_alpha")
        _scalar(sd, p + "layer_alpha")  # validated; a learning-rate multiplier (pilimit_lr_mults)
        b = bias(p + "bias", A.shape[1])
        if b is None and ba != 0:
            raise KeyError(f"from_pilimit: missing key {p + 'bias'!r} ({p + 'bias_alpha'!r} is {ba})")
        # The reference adds bias * bias_alpha, or the bias itself when bias_alpha is 0.
        effective = 0.0 if b is None else (ba if ba != 0 else 1.0)
        layers.append((A, B, c, b, effective))
    d_out = layers[-1][0].shape[1]

    net = InfPiMLP(
        d_in, d_out, r, depth,
        first_layer_alpha=first_alpha, last_layer_alpha=last_alpha, bias_alpha=in_bias_alpha,
        hidden_bias_alpha=layers[0][4] if depth > 0 else None, last_bias_alpha=layers[-1][4],
        layernorm=layernorm, chunk_size=chunk_size, device=device, dtype=dtype or layers[0][0].dtype,
    )  # fmt: skip
    # Translate to pinet's own state dict and load it (checked as a whole, then written).
    out = {"_extra_state": net.get_extra_state(), "layers.0.A": A0,
           "layers.0._extra_state": dict(net.layers[0].get_extra_state())}  # fmt: skip
    if b0 is not None:
        out["layers.0.bias"] = b0
    for i, (A, B, c, b, effective) in enumerate(layers, start=1):
        layer = net.layers[i]
        if (effective == 0) != (layer.bias is None):
            raise ValueError(
                f"from_pilimit: 'layers.{i}.bias' is {'absent' if b is None else 'present'} but layer 1's is "
                f"{'present' if b is None else 'absent'}; pinet's InfPiMLP has one bias setting for all hidden layers"
            )
        out.update({f"layers.{i}.state.A": A, f"layers.{i}.state.B": B, f"layers.{i}.state.c": c})
        if b is not None:
            out[f"layers.{i}.bias"] = b
        out[f"layers.{i}._extra_state"] = dict(layer.get_extra_state(), bias_alpha=effective)
    net.load_state_dict(out)
    return net
