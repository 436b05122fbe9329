"""Parameter groups with the reference CLI's learning-rate multipliers, by layer role."""

from __future__ import annotations

import math

from torch import nn

# The roles of pinet.layers.ROLES; read here by duck typing (`pi_role`) so that optim does not
# depend on the layer classes.
ROLES = ("input", "hidden", "readout")

__all__ = ["param_groups", "layer_roles"]


def layer_roles(model: nn.Module) -> dict[str, str]:
    """``{qualified layer name: role}`` for every pinet layer of ``model`` (any network).

    A layer is any module with a ``pi_role`` (:class:`pinet.InfPiModule`, :class:`pinet.FinPiModule`
    and their subclasses); roles are ``"input"``, ``"hidden"`` and ``"readout"``.
    """
    roles = {}
    for name, m in model.named_modules():
        role = getattr(m, "pi_role", None)
        if role is None:
            continue
        if role not in ROLES:
            raise ValueError(f"param_groups: layer '{name}' ({type(m).__name__}) has pi_role={role!r}, expected one of {ROLES}")
        roles[name] = role
    return roles


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    first_layer_lr_mult: float = 1.0,
    last_layer_lr_mult: float = 1.0,
    bias_lr_mult: float = 1.0,
    apply_lr_mult_to_wd: bool = True,
) -> list[dict]:
    """Split ``model.parameters()`` into the reference library's groups, by layer role.

    Works for any network built from pinet's layers, infinite or finite: the weights of input
    layers (``A₀`` / ``W₀``) get ``lr * first_layer_lr_mult`` (group ``"first"``), readouts'
    weights (output π-coefficients / ``W_out``) ``lr * last_layer_lr_mult`` (``"last"``), every
    parameter whose name ends in ``bias`` ``lr * bias_lr_mult`` (``"bias"``), hidden layers'
    weights (π-coefficients / hidden ``W``) ``lr`` (``"hidden"``). A parameter belongs to the
    innermost pinet layer that contains it; parameters outside every pinet layer (a user's own
    modules) get ``lr`` in a group ``"other"``. With ``apply_lr_mult_to_wd=False`` each group's
    weight decay is divided by its multiplier, so that ``lr * weight_decay`` stays as for the base
    group (the reference's ``--no-apply-lr-mult-to-wd``); a multiplier of 0 gets no decay. Empty
    groups are left out. Returns a list for ``torch.optim.SGD(groups, lr=lr)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups: model must be an nn.Module, got {type(model).__name__}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("first_layer_lr_mult", first_layer_lr_mult),
                    ("last_layer_lr_mult", last_layer_lr_mult), ("bias_lr_mult", bias_lr_mult)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"param_groups: {name} must be a finite non-negative number, got {v!r}")
    if not isinstance(apply_lr_mult_to_wd, bool):
        raise ValueError(f"param_groups: apply_lr_mult_to_wd must be a bool, got {apply_lr_mult_to_wd!r}")
    roles = layer_roles(model)
    if not roles:
        raise ValueError(
            f"param_groups: {type(model).__name__} contains no pinet layer (InfPiModule / FinPiModule with a "
            "pi_role); build it from pinet's layers, or pass its parameters to the optimizer yourself"
        )
    # Deepest layers first, so a parameter goes to the innermost layer that contains it.
    prefixes = sorted(roles, key=lambda n: -len(n))
    key = {"input": "first", "hidden": "hidden", "readout": "last"}
    buckets: dict[str, list] = {"first": [], "hidden": [], "last": [], "bias": [], "other": []}
    for pname, p in model.named_parameters():
        owner = next((n for n in prefixes if n == "" or pname.startswith(n + ".")), None)
        if owner is None:
            buckets["other"].append(p)
        elif pname.rsplit(".", 1)[-1] == "bias":
            buckets["bias"].append(p)
        else:
            buckets[key[roles[owner]]].append(p)
    mults = {"first": first_layer_lr_mult, "hidden": 1.0, "last": last_layer_lr_mult, "bias": bias_lr_mult, "other": 1.0}
    groups = []
    for role, params in buckets.items():
        if not params:
            continue
        m = float(mults[role])
        wd = weight_decay if apply_lr_mult_to_wd else (weight_decay / m if m else 0.0)
        groups.append({"params": params, "lr": lr * m, "weight_decay": wd, "name": role})
    return groups
