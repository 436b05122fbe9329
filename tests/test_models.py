import io
import math

import pytest
import torch

import pinet
from pinet import functional as F

D = torch.float64


def _grow(net, rows=6, seed=0):
    """Append random rows to every π-layer, as a few training steps would."""
    g = torch.Generator().manual_seed(seed)
    for layer in net.pi_layers:
        st = layer.state
        A = torch.randn(rows, st.r_out, generator=g, dtype=D) * 0.5
        B = torch.nn.functional.normalize(torch.randn(rows, st.r_in, generator=g, dtype=D), dim=1)
        st.append(A.to(st.dtype), B.to(st.dtype), -0.3 * torch.rand(rows, generator=g, dtype=D).to(st.c.dtype))
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.normal_(generator=g)


def _net(**kw):
    kw.setdefault("dtype", D)
    return pinet.InfPiMLP(6, 3, 5, 2, first_layer_alpha=1.3, last_layer_alpha=0.7, bias_alpha=0.5, **kw)


@pytest.mark.parametrize("layernorm", [False, True])
def test_forward_equals_spec_composition(layernorm):
    net = _net(layernorm=layernorm)
    _grow(net)
    x = torch.randn(4, 6, dtype=D)
    l0 = net.layers[0]
    g = 1.3 * (x @ l0.A + 0.5 * l0.bias)
    for i, layer in enumerate(net.pi_layers):
        s = torch.ones(4, 1, dtype=D) if layernorm else g.norm(dim=1, keepdim=True)
        q = (g / g.norm(dim=1, keepdim=True)) @ layer.B.T
        out = (s * F.J(q) * layer.c.detach()) @ layer.A + 0.5 * layer.bias
        g = out * (0.7 if i == len(net.pi_layers) - 1 else 1.0)
    assert torch.allclose(net(x), g, atol=1e-12)


def test_initialisation_follows_spec():
    net = pinet.InfPiMLP(7, 3, 5, 1, dtype=D)
    A0 = net.layers[0].A
    assert torch.allclose(A0.norm(dim=0), torch.ones(5, dtype=D))
    hidden, out = net.layers[1], net.layers[2]
    assert hidden.state.rows == 5 and torch.equal(hidden.c.detach(), torch.ones(5, dtype=D))
    assert torch.allclose(hidden.B.norm(dim=1), torch.ones(5, dtype=D))
    assert torch.equal(out.A, torch.zeros(5, 3, dtype=D))
    assert torch.equal(net(torch.randn(2, 7, dtype=D)), torch.zeros(2, 3, dtype=D))


def test_bias_alpha_zero_means_no_bias_parameters():
    net = pinet.InfPiMLP(4, 2, 3, 1, bias_alpha=0.0)
    assert all(layer.bias is None for layer in net.layers)
    assert not any("bias" in n for n, _ in net.named_parameters())
    net2 = pinet.InfPiMLP(4, 2, 3, 1, bias_alpha=1.0, last_bias_alpha=0.0)
    assert net2.layers[-1].bias is None and net2.layers[0].bias is not None


def test_sampled_trained_net_converges_at_root_n_rate():
    torch.manual_seed(1)
    net = _net()
    _grow(net, rows=8)
    x = torch.randn(16, 6, dtype=D)
    y = net(x)
    errs = {}
    for n in (256, 1024, 4096):
        e = []
        for s in range(6):
            fin = net.sample(n, generator=torch.Generator().manual_seed(1000 * s + n))
            e.append(((fin(x) - y).norm() / y.norm()).item())
        errs[n] = sum(e) / len(e)
    slope = math.log(errs[4096] / errs[256]) / math.log(16)
    # Expected slope -1/2 (n^-1/2 fluctuations); over 6 seeds the fitted slope scatters by ~0.1.
    assert -0.75 < slope < -0.3, errs
    assert errs[4096] < 0.1, errs


def test_sample_output_layer_scaling_and_bias():
    net = _net()
    _grow(net)
    fin = net.sample(64, generator=torch.Generator().manual_seed(0))
    out_inf, out_fin = net.layers[-1], fin.layers[-1]
    assert torch.equal(out_fin.bias, out_inf.bias)  # copied as is, not zero
    omega = fin.omegas[-1]
    expected = (out_inf.c.detach()[:, None] * out_inf.A).T @ torch.relu(omega @ out_inf.B.T).T / math.sqrt(64)
    assert torch.allclose(out_fin.weight, expected)


def test_state_dict_round_trip_is_bit_exact_for_grown_net():
    net = _net(layernorm=True)
    for k in range(5):
        _grow(net, rows=7, seed=k)
    x = torch.randn(5, 6, dtype=D)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()))
    # A net built with other multipliers and no layernorm adopts the saved ones.
    other = pinet.InfPiMLP(6, 3, 5, 2, bias_alpha=0.5, layernorm=False, dtype=D)
    other.load_state_dict(sd)
    assert other.layernorm and other.first_layer_alpha == 1.3 and other.last_layer_alpha == 0.7
    assert torch.equal(other(x), net(x))
    rebuilt = pinet.InfPiMLP.from_state_dict(sd)
    assert torch.equal(rebuilt(x), net(x))
    assert [layer.state.rows for layer in rebuilt.pi_layers] == [layer.state.rows for layer in net.pi_layers]


def test_load_state_dict_structure_mismatch_is_clear():
    sd = _net().state_dict()
    with pytest.raises(ValueError, match="depth: saved 2 vs this 1"):
        pinet.InfPiMLP(6, 3, 5, 1, bias_alpha=0.5, dtype=D).load_state_dict(sd, strict=False)
    with pytest.raises(ValueError, match="saved bias_alpha=0.5 but this layer was built without a bias"):
        pinet.InfPiMLP(6, 3, 5, 2, bias_alpha=0.0, dtype=D).load_state_dict(sd)


def test_finite_state_dict_round_trip():
    fin = _net().sample(32, generator=torch.Generator().manual_seed(0))
    sd = fin.state_dict()
    assert "layers.0.proj.omega" in sd and "layers.1.proj.gram_inv" in sd
    other = pinet.FinPiMLP(6, 3, 5, 2, 32, bias_alpha=0.5, dtype=D)
    other.load_state_dict(sd)
    x = torch.randn(3, 6, dtype=D)
    assert torch.equal(other(x), fin(x))


def test_bad_inputs_raise_clear_errors():
    net = _net()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 6\)"):
        net(torch.randn(3, 5, dtype=D))
    with pytest.raises(ValueError, match=r"x must have shape"):
        net(torch.randn(6, dtype=D))
    bad = torch.randn(3, 6, dtype=D)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        net(bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        net.sample(8)(bad)
    with pytest.raises(TypeError, match="x must be a tensor"):
        net([[1.0] * 6])
    for kwargs, msg in [
        (dict(d_in=0, d_out=2, r=3, depth=1), "d_in"),
        (dict(d_in=2, d_out=2, r=3.0, depth=1), "r must be a positive int"),
        (dict(d_in=2, d_out=2, r=3, depth=-1), "depth"),
        (dict(d_in=2, d_out=2, r=3, depth=1, bias_alpha=float("nan")), "bias_alpha"),
        (dict(d_in=2, d_out=2, r=3, depth=1, layernorm="yes"), "layernorm"),
        (dict(d_in=2, d_out=2, r=3, depth=1, chunk_size=0), "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=msg):
            pinet.InfPiMLP(**kwargs)
    with pytest.raises(ValueError, match="width"):
        net.sample(0)
    with pytest.raises(ValueError, match="width must be at least r=5"):
        net.sample(4)
    with pytest.raises(ValueError, match="width n=3 must be at least the rank r=4"):
        pinet.FinPiState(torch.randn(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_storage_runs_and_keeps_fp32_coefficients(dtype):
    net = pinet.InfPiMLP(6, 3, 5, 1, dtype=dtype)
    assert net.layers[1].state.dtype == dtype
    assert net.layers[1].c.dtype == torch.float32 and net.layers[0].A.dtype == torch.float32
    y = net(torch.randn(4, 6))
    assert y.dtype == torch.float32
    y.sum().backward()
    assert net.layers[1].state.pending_rows().rows == 4


def test_module_to_dtype_converts_whole_net():
    net = _net()
    _grow(net)
    x = torch.randn(3, 6, dtype=D)
    y = net(x)
    net.to(torch.float32)
    assert net.layers[1].state.dtype == torch.float32
    assert torch.allclose(net(x.float()).double(), y, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_backward_matches_cpu():
    net = _net()
    _grow(net)
    x = torch.randn(3, 6, dtype=D)
    y = net(x)
    net.cuda()
    yc = net(x.cuda())
    yc.sum().backward()
    assert torch.allclose(yc.cpu(), y)


def test_numpy_integer_sizes_are_sizes():
    # A width from np.arange or a config array used to be refused ("must be a positive int, got
    # np.int64(32)"); bool still is not a size.
    import numpy as np

    net = pinet.InfPiMLP(np.int64(6), np.int64(3), np.int64(4), 1)
    fin = net.sample(np.int64(32))
    assert type(fin.width) is int and fin.width == 32 and type(net.r) is int
    with pytest.raises(ValueError, match="width must be a positive int, got True"):
        net.sample(True)
