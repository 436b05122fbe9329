"""pinet.compat.from_pilimit against the reference library's own forward (pilimit_lib InfMLP)."""

import math

import pytest
import torch

import pinet
from pinet.compat import from_pilimit, pilimit_lr_mults

D = torch.float64


def _reference_forward(sd: dict, x: torch.Tensor, layernorm: bool) -> torch.Tensor:
    """The reference InfMLP.forward, transcribed from pilimit_lib (inf/layers.py, inf/functional.py,
    inf/math.py): input layer, π-layers with F00ReLUsqrt and their bias rule, then last_layer_alpha.
    layer_alpha appears nowhere: it is only the coefficients' learning-rate multiplier there."""

    def F00ReLUsqrt(c, vsqrt, v2sqrt):
        sqrt = torch.sqrt(torch.clamp(1 - c**2, min=1e-20))
        acos = torch.acos(torch.clamp(-c, min=-1 + 1e-20, max=1 - 1e-20))
        return (0.5 / math.pi) * (sqrt + acos * c) * (vsqrt * v2sqrt)

    f = lambda k: float(sd[k])  # noqa: E731
    ba0 = f("layers.0.bias_alpha") if "layers.0.bias_alpha" in sd else f("bias_alpha")
    g = x @ sd["layers.0.A"]
    if "layers.0.bias" in sd:  # the reference registers it only when bias_alpha is non-zero
        g = g + sd["layers.0.bias"].unsqueeze(0) * ba0
    g = g * f("first_layer_alpha")
    i = 1
    while f"layers.{i}.A" in sd:
        s = g.norm(dim=1, keepdim=True)
        gbar = g / s
        if layernorm:
            s = 1
        q = gbar @ sd[f"layers.{i}.B"].T
        out = (F00ReLUsqrt(q, 1, s) * sd[f"layers.{i}.Amult"]) @ sd[f"layers.{i}.A"]
        ba, b = f(f"layers.{i}.bias_alpha"), sd[f"layers.{i}.bias"]
        g = out + (b * ba if ba else b)
        i += 1
    return g * f("last_layer_alpha")


def _random_reference(depth=2, d=7, r=4, k=3, M=(9, 12, 10), bias_alpha=0.5, last_bias_alpha=None, seed=0):
    """A reference InfMLP state dict with 'trained' (random) rows, coefficients and biases."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=D)  # noqa: E731
    t = lambda v: torch.tensor(float(v), dtype=D)  # noqa: E731
    last_bias_alpha = bias_alpha if last_bias_alpha is None else last_bias_alpha
    sd = {"first_layer_alpha": t(1.5), "last_layer_alpha": t(0.7), "bias_alpha": t(bias_alpha),
          "last_bias_alpha": t(last_bias_alpha), "layers.0.A": randn(d, r), "layers.0.bias_alpha": t(bias_alpha)}  # fmt: skip
    if bias_alpha:
        sd["layers.0.bias"] = randn(r)
    for i in range(1, depth + 2):
        out = k if i == depth + 1 else r
        sd[f"layers.{i}.A"] = randn(M[i - 1], out)
        sd[f"layers.{i}.B"] = torch.nn.functional.normalize(randn(M[i - 1], r), dim=1)
        sd[f"layers.{i}.Amult"] = randn(M[i - 1])
        sd[f"layers.{i}.bias"] = randn(out)
        sd[f"layers.{i}.bias_alpha"] = t(last_bias_alpha if i == depth + 1 else bias_alpha)
        sd[f"layers.{i}.layer_alpha"] = t(1.0)
    return sd


# pinet and the transcription order the same float64 sums differently: agreement to rounding.
_TOL = dict(rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layernorm", [False, True])
def test_from_pilimit_reproduces_the_reference_forward(layernorm):
    sd = _random_reference()
    net = from_pilimit(sd, layernorm=layernorm)
    x = torch.randn(6, 7, dtype=D)
    torch.testing.assert_close(net(x), _reference_forward(sd, x, layernorm), **_TOL)
    assert net.layernorm == layernorm and net.depth == 2
    assert [l.state.rows for l in net.pi_layers] == [9, 12, 10]


def test_layer_alpha_is_a_learning_rate_multiplier_not_an_output_one():
    sd = _random_reference()
    sd["layers.3.layer_alpha"] = torch.tensor(2.0, dtype=D)
    sd["layers.1.layer_alpha"] = torch.tensor(0.25, dtype=D)
    x = torch.randn(5, 7, dtype=D)
    torch.testing.assert_close(from_pilimit(sd)(x), _reference_forward(sd, x, False), **_TOL)
    assert torch.equal(from_pilimit(sd)(x), from_pilimit(_random_reference())(x))
    assert pilimit_lr_mults(sd) == {"layers.1.state.c": 0.25, "layers.2.state.c": 1.0, "layers.3.state.c": 2.0}
    assert set(pilimit_lr_mults(sd)) <= {k for k, _ in from_pilimit(sd).named_parameters()}


def test_lr_mults_as_param_groups_give_the_reference_update():
    # Reference PiSGD on Amult: c <- cat((1 - lr*wd) c, -lr * layer_alpha * ones(batch)); the
    # docstring's groups (lr*m, wd/m) must give exactly that with plain SGD.
    sd = _random_reference(depth=0, M=(6,))
    sd["layers.1.layer_alpha"] = torch.tensor(2.0, dtype=D)
    net = from_pilimit(sd)
    lr, wd = 0.1, 0.01
    mults = pilimit_lr_mults(sd)
    groups = [{"params": [p], "lr": lr * mults.get(k, 1.0), "weight_decay": wd / mults.get(k, 1.0)}
              for k, p in net.named_parameters()]  # fmt: skip
    opt = pinet.optim.PiOptimizerWrapper(torch.optim.SGD(groups, lr=lr), net)
    c0 = net.layers[1].c.detach().clone()
    opt.zero_grad()
    net(torch.randn(3, 7, dtype=D)).sum().backward()
    opt.step()
    c = net.layers[1].c.detach()
    torch.testing.assert_close(c[:6], (1 - lr * wd) * c0, rtol=1e-15, atol=0)
    torch.testing.assert_close(c[6:], torch.full((3,), -lr * 2.0, dtype=D), rtol=1e-15, atol=0)


def test_zero_bias_alpha_keeps_the_trained_biases_unscaled():
    # The reference with bias_alpha=0: no input bias, but hidden/output biases exist, train, and are
    # added with multiplier 1. Dropping them would change the outputs.
    sd = _random_reference(bias_alpha=0.0)
    assert "layers.0.bias" not in sd and "layers.2.bias" in sd
    net = from_pilimit(sd)
    x = torch.randn(6, 7, dtype=D)
    ref = _reference_forward(sd, x, False)
    torch.testing.assert_close(net(x), ref, **_TOL)
    assert net.layers[0].bias is None and all(l.bias_alpha == 1.0 for l in net.pi_layers)
    no_bias = dict(sd, **{f"layers.{i}.bias": torch.zeros_like(sd[f"layers.{i}.bias"]) for i in (1, 2, 3)})
    assert (_reference_forward(no_bias, x, False) - ref).abs().max() > 0.1
    # only the output bias under a zero multiplier, hidden ones scaled
    sd = _random_reference(bias_alpha=0.5, last_bias_alpha=0.0)
    torch.testing.assert_close(from_pilimit(sd)(x), _reference_forward(sd, x, False), **_TOL)
    # and the net saves and reloads with those biases
    again = pinet.InfPiMLP.from_state_dict(from_pilimit(sd).state_dict())
    torch.testing.assert_close(again(x), _reference_forward(sd, x, False), **_TOL)


def test_input_bias_under_zero_multiplier_is_refused_not_dropped():
    sd = _random_reference(bias_alpha=0.0)
    sd["layers.0.bias"] = torch.ones(4, dtype=D)
    with pytest.raises(ValueError, match=r"'layers.0.bias' is present but 'layers.0.bias_alpha' is 0.*not dropping|refused"):
        from_pilimit(sd)


def _pinet_reference_state_dict(net: pinet.InfPiMLP) -> dict:
    """What pilimit_lib's InfMLP.state_dict() holds for the same network (spec key list)."""
    t = lambda v: torch.tensor(v, dtype=D)  # noqa: E731
    sd = {
        "first_layer_alpha": t(net.first_layer_alpha),
        "last_layer_alpha": t(net.last_layer_alpha),
        "bias_alpha": t(net.bias_alpha),
        "last_bias_alpha": t(net.last_bias_alpha),
        "layers.0.A": net.layers[0].A.detach().clone(),
        "layers.0.bias": net.layers[0].bias.detach().clone(),
    }
    for i, layer in enumerate(net.pi_layers, start=1):
        sd[f"layers.{i}.A"] = layer.A.clone()
        sd[f"layers.{i}.B"] = layer.B.clone()
        sd[f"layers.{i}.Amult"] = layer.c.detach().clone()
        sd[f"layers.{i}.bias"] = layer.bias.detach().clone()
        sd[f"layers.{i}.bias_alpha"] = t(layer.bias_alpha)
        sd[f"layers.{i}.layer_alpha"] = t(1.0)
    return sd


@pytest.mark.parametrize("layernorm", [False, True])
def test_pinet_net_round_trips_through_the_reference_format(layernorm):
    net = pinet.InfPiMLP(7, 3, 4, 2, first_layer_alpha=1.5, last_layer_alpha=0.5, bias_alpha=0.5,
                         layernorm=layernorm, dtype=D)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in net.pi_layers:
            layer.state.append(torch.randn(5, layer.r_out, generator=gen, dtype=D),
                               torch.nn.functional.normalize(torch.randn(5, 4, generator=gen, dtype=D), dim=1),
                               torch.randn(5, generator=gen, dtype=D))  # fmt: skip
        for layer in net.layers:
            layer.bias.add_(0.1)
    loaded = from_pilimit(_pinet_reference_state_dict(net), layernorm=layernorm)
    x = torch.randn(6, 7, dtype=D)
    assert torch.equal(loaded(x), net(x))
    assert [l.state.rows for l in loaded.pi_layers] == [l.state.rows for l in net.pi_layers] == [9, 9, 9]


def test_from_pilimit_errors_name_the_key():
    sd = _random_reference()
    nan = torch.tensor(float("nan"), dtype=D)
    cases = [
        ({k: v for k, v in sd.items() if k != "layers.2.B"}, KeyError, "layers.2.B"),
        ({k: v for k, v in sd.items() if k != "last_bias_alpha"}, KeyError, "last_bias_alpha"),
        ({k: v for k, v in sd.items() if k != "layers.0.bias"}, KeyError, "layers.0.bias"),
        ({k: v for k, v in sd.items() if k != "layers.2.bias"}, KeyError, "layers.2.bias"),
        (dict(sd, **{"layers.1.Amult": sd["layers.1.Amult"][:-1]}), ValueError, "layers.1.Amult"),
        (dict(sd, **{"layers.2.B": sd["layers.2.B"][:-2]}), ValueError, "layers.2.B.*rows"),
        (dict(sd, **{"layers.1.B": sd["layers.1.B"][:, :3]}), ValueError, "layers.1.B"),
        (dict(sd, **{"layers.3.bias": sd["layers.3.bias"][:2]}), ValueError, "layers.3.bias"),
        (dict(sd, **{"layers.1.weight": sd["layers.1.A"]}), ValueError, "unexpected key 'layers.1.weight'"),
        (dict(sd, **{"optimizer": sd["layers.1.A"]}), ValueError, "unexpected key 'optimizer'"),
        ({k: v for k, v in sd.items() if not k.startswith("layers.2.")}, ValueError, "without gaps"),
        (dict(sd, **{"layers.2.layer_alpha": nan}), ValueError, "'layers.2.layer_alpha' must be finite"),
        (dict(sd, **{"layers.3.bias_alpha": -nan}), ValueError, "'layers.3.bias_alpha' must be finite"),
        (dict(sd, **{"first_layer_alpha": torch.tensor(math.inf)}), ValueError, "'first_layer_alpha' must be finite"),
        (dict(sd, **{"last_layer_alpha": float("nan")}), ValueError, "'last_layer_alpha' must be finite"),
        (dict(sd, **{"layers.0.layer_alpha": torch.tensor(2.0)}), ValueError, "'layers.0.layer_alpha' is 2.0"),
        (dict(sd, **{"layers.1.A": sd["layers.1.A"].tolist()}), TypeError, "'layers.1.A' must be a tensor, got list"),
        (dict(sd, **{"layers.0.A": sd["layers.0.A"].tolist()}), TypeError, "'layers.0.A' must be a tensor, got list"),
        (dict(sd, **{"layers.2.Amult": sd["layers.2.Amult"].long()}), TypeError, "'layers.2.Amult'.*int64"),
        (dict(sd, **{"layers.1.layer_alpha": "2"}), TypeError, "'layers.1.layer_alpha' must be a number"),
        (dict(sd, **{"bias_alpha": torch.ones(2)}), ValueError, "'bias_alpha' must be a scalar"),
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            from_pilimit(bad)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        from_pilimit([1])
    with pytest.raises(ValueError, match="'layers.2.layer_alpha' must be finite"):
        pilimit_lr_mults(dict(sd, **{"layers.2.layer_alpha": nan}))


def test_from_pilimit_refuses_a_coefficient_matrix():
    # A (3, 3) Amult for M = 9 used to be flattened and loaded: one coefficient per row means 1-d (M,).
    sd = _random_reference()
    for shape in [(3, 3), (1, 9), (9, 1)]:
        bad = dict(sd, **{"layers.1.Amult": sd["layers.1.Amult"].reshape(shape)})
        with pytest.raises(ValueError, match=rf"'layers.1.Amult' must be a 1-d vector \(M,\).*{shape[0]}, {shape[1]}"):
            from_pilimit(bad)


def test_from_pilimit_refuses_b_rows_that_are_not_directions():
    # pinet clamps the cosine ḡ·B_i to [-1, 1] and the reference does not: rows of norm 3 used to load
    # and compute a forward 20 away from the reference's. The worst row and its norm are named.
    sd = _random_reference()
    B = sd["layers.2.B"].clone()
    B[4] *= 3
    B[7] *= 1.5
    with pytest.raises(ValueError, match=r"'layers.2.B' rows must be unit vectors.*row 4 has norm 3\b"):
        from_pilimit(dict(sd, **{"layers.2.B": B}))
    B = sd["layers.1.B"].clone()
    B[0] *= 1 + 1e-3  # float64: far beyond rounding
    with pytest.raises(ValueError, match="'layers.1.B' rows must be unit vectors.*row 0 has norm 1.001"):
        from_pilimit(dict(sd, **{"layers.1.B": B}))
    B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="row 0 has norm nan"):
        from_pilimit(dict(sd, **{"layers.1.B": B}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_from_pilimit_accepts_unit_rows_rounded_to_low_precision(dtype):
    # A reference checkpoint in half precision stores float32 directions rounded to its dtype; zero
    # rows (unused storage) are allowed too.
    gen = torch.Generator().manual_seed(3)
    sd = _random_reference(r=64, M=(500, 400, 300))
    for i in (1, 2, 3):
        B = torch.nn.functional.normalize(torch.randn(sd[f"layers.{i}.A"].shape[0], 64, generator=gen), dim=1)
        B[-1] = 0
        sd[f"layers.{i}.B"] = B.to(dtype)
    net = from_pilimit(sd)
    assert [l.state.rows for l in net.pi_layers] == [500, 400, 300]
