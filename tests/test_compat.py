import pytest
import torch

import pinet
from pinet.compat import from_pilimit

D = torch.float64


def _reference_state_dict(net: pinet.InfPiMLP) -> dict:
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


def _trained_net(layernorm=False):
    net = pinet.InfPiMLP(7, 3, 4, 2, first_layer_alpha=1.5, last_layer_alpha=0.5, bias_alpha=0.5,
                         layernorm=layernorm, dtype=D)  # fmt: skip
    opt = pinet.optim.PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.3), net)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 7, dtype=D)).square().sum().backward()
        opt.step()
        with torch.no_grad():
            for layer in net.layers:
                layer.bias.add_(0.1)
    return net


@pytest.mark.parametrize("layernorm", [False, True])
def test_from_pilimit_reproduces_outputs(layernorm):
    net = _trained_net(layernorm)
    loaded = from_pilimit(_reference_state_dict(net), layernorm=layernorm)
    x = torch.randn(6, 7, dtype=D)
    assert torch.equal(loaded(x), net(x))
    assert loaded.layernorm == layernorm and loaded.depth == 2
    assert [l.state.rows for l in loaded.pi_layers] == [l.state.rows for l in net.pi_layers] == [19, 19, 19]


def test_from_pilimit_folds_layer_alpha():
    net = _trained_net()
    sd = _reference_state_dict(net)
    sd["layers.3.layer_alpha"] = torch.tensor(2.0, dtype=D)
    x = torch.randn(4, 7, dtype=D)
    assert torch.allclose(from_pilimit(sd)(x), 2 * net(x))


def test_from_pilimit_errors_name_the_key():
    sd = _reference_state_dict(_trained_net())
    cases = [
        ({k: v for k, v in sd.items() if k != "layers.2.B"}, KeyError, "layers.2.B"),
        ({k: v for k, v in sd.items() if k != "last_bias_alpha"}, KeyError, "last_bias_alpha"),
        (dict(sd, **{"layers.1.Amult": sd["layers.1.Amult"][:-1]}), ValueError, "layers.1.Amult"),
        (dict(sd, **{"layers.2.B": sd["layers.2.B"][:-2]}), ValueError, "layers.2.B.*rows"),
        (dict(sd, **{"layers.1.B": sd["layers.1.B"][:, :3]}), ValueError, "layers.1.B"),
        (dict(sd, **{"layers.3.bias": sd["layers.3.bias"][:2]}), ValueError, "layers.3.bias"),
        (dict(sd, **{"layers.1.weight": sd["layers.1.A"]}), ValueError, "unexpected key 'layers.1.weight'"),
        (dict(sd, **{"optimizer": sd["layers.1.A"]}), ValueError, "unexpected key 'optimizer'"),
        ({k: v for k, v in sd.items() if not k.startswith("layers.2.")}, ValueError, "without gaps"),
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            from_pilimit(bad)
