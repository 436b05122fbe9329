"""Parameter groups with the reference CLI's learning-rate multipliers."""

from __future__ import annotations

from torch import nn

__all__ = ["param_groups"]


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    first_layer_lr_mult: float = 1.0,
    last_layer_lr_mult: float = 1.0,
    bias_lr_mult: float = 1.0,
    apply_lr_mult_to_wd: bool = True,
) -> list[dict]:
    """Split ``model.parameters()`` into the reference library's groups.

    ``model.layers`` (a sequence of layers, infinite or finite) decides roles: the first layer's
    weights (``A₀`` / ``W₀``) get ``lr * first_layer_lr_mult``, the last layer's weights (output
    π-coefficients / ``W_out``) ``lr * last_layer_lr_mult``, every bias ``lr * bias_lr_mult``, all
    else (hidden π-coefficients / hidden ``W``) ``lr``. With ``apply_lr_mult_to_wd=False`` each
    group's weight decay is divided by its multiplier, so that ``lr * weight_decay`` stays as for the
    base group (the reference's ``--no-apply-lr-mult-to-wd``); a multiplier of 0 gets no decay.
    Empty groups are left out. Returns a list for ``torch.optim.SGD(groups, lr=lr)``.
    """
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) < 2:
        raise ValueError("param_groups: model must have a `layers` sequence of at least 2 layers (input ... output)")
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("first_layer_lr_mult", first_layer_lr_mult),
                    ("last_layer_lr_mult", last_layer_lr_mult), ("bias_lr_mult", bias_lr_mult)):  # fmt: skip
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"param_groups: {name} must be a non-negative number, got {v!r}")
    roles: dict[str, list] = {"first": [], "hidden": [], "last": [], "bias": []}
    for i, layer in enumerate(layers):
        for pname, p in layer.named_parameters():
            if pname == "bias":
                roles["bias"].append(p)
            elif i == 0:
                roles["first"].append(p)
            elif i == len(layers) - 1:
                roles["last"].append(p)
            else:
                roles["hidden"].append(p)
    mults = {"first": first_layer_lr_mult, "hidden": 1.0, "last": last_layer_lr_mult, "bias": bias_lr_mult}
    groups = []
    for role, params in roles.items():
        if not params:
            continue
        m = float(mults[role])
        wd = weight_decay if apply_lr_mult_to_wd else (weight_decay / m if m else 0.0)
        groups.append({"params": params, "lr": lr * m, "weight_decay": wd, "name": role})
    return groups
