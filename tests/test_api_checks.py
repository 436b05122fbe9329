"""Argument checks of the public kernels, feature-kernel and sampling functions: a wrong argument
raises one error naming the function, the argument and what was expected, the same on every
kernels backend, and a failing call changes nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as TF

import pinet
from pinet import functional as F
from pinet import kernels
from pinet.features import features, kernel_from_features

D = torch.float64
# The backends that compute on the CPU here; "native" and "fused" need g++ and AVX2.
CPU_BACKENDS = [b for b in ("torch", "native", "fused") if kernels.unavailable_reason(b) is None]


@pytest.fixture(autouse=True)
def _auto_after():
    yield
    kernels.set_backend("auto")


def _layer_args(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(3, 4, generator=gen, dtype=dtype)
    A = torch.randn(5, 2, generator=gen, dtype=dtype)
    B = TF.normalize(torch.randn(5, 4, generator=gen, dtype=dtype), dim=1)
    return g, A, B, torch.randn(5, generator=gen, dtype=dtype)


# --------------------------------------------------------------------------- A: flags
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", ["no", None, 1, 0, np.bool_(True)])
def test_pi_layer_layernorm_must_be_a_bool_on_every_backend(backend, bad):
    # "no" was truthy on torch/native and an int() error on fused; None was False elsewhere.
    with kernels.use_backend(backend), pytest.raises(TypeError, match=r"pinet\.kernels\.pi_layer: layernorm must be a bool, got "):
        kernels.pi_layer(*_layer_args(), layernorm=bad)


def test_backend_names_and_native_switch_refuse_wrong_types():
    with pytest.raises(TypeError, match=r"pinet\.kernels: backend must be a str, .*got int"):
        kernels.set_backend(5)
    with pytest.raises(TypeError, match=r"backend must be a str"):
        kernels.unavailable_reason(["torch"])
    assert kernels.setting() == "auto"
    for setting in ("auto", "torch"):  # parsed whether or not a backend is forced
        with kernels.use_backend(setting):
            with pytest.raises(ValueError, match=r"pinet\.kernels\.backend: device must name a torch device, got 'gpu'"):
                kernels.backend("gpu")
            with pytest.raises(TypeError, match=r"pinet\.kernels\.backend: device must be a torch.device or str, got list"):
                kernels.backend(["cpu"])
    for bad in ("no", None, 1):
        with pytest.raises(TypeError, match=r"pinet\.native\.enable: on must be a bool, got "):
            pinet.native.enable(bad)
        with pytest.raises(TypeError, match=r"pinet\.native\.use: on must be a bool"), pinet.native.use(bad):
            pass
        assert kernels.setting() == "auto"  # nothing switched


# --------------------------------------------------------------------------- B: non-contiguous operands
def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    # The same values in a transposed (column-major) layout.
    out = t.T.contiguous().T
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


@pytest.mark.parametrize("which", ["A", "B", "g", "ABg"])
@pytest.mark.parametrize("rows_grad", [False, True])
def test_backends_agree_on_noncontiguous_operands(which, rows_grad):
    # The native backend's kernel reads raw row-major pointers: a transposed A or B (or the
    # gradient of a transposed g) used to fail there with reduce_into's "must be contiguous".
    # rows_grad=False is the training case (constant rows: fused runs the whole layer in C++).
    g, A, B, c = _layer_args(seed=1)
    w = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=D)
    ref = [t.double().requires_grad_() for t in (g, A, B, c)]
    s, gbar = F.normalize_rows(ref[0])
    out64 = s * F.pi_product(gbar, *ref[1:])
    want = [out64.detach(), *torch.autograd.grad((out64 * w).sum(), ref)]
    for backend in CPU_BACKENDS:
        ops = [_noncontiguous(t) if name in which else t.clone() for name, t in zip("gABc", (g, A, B, c))]
        ops = [t.requires_grad_(name == "g" or rows_grad) for name, t in zip("gABc", ops)]
        with kernels.use_backend(backend):
            out = kernels.pi_layer(*ops)[0]
            got = [out.detach(), *torch.autograd.grad((out * w.float()).sum(), [t for t in ops if t.requires_grad])]
        for name, a, b in zip(["out", "g", "A", "B", "c"], got, want):
            # float32 rounding; an operand read with the wrong strides is O(1) off.
            assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5), (backend, name, (a.double() - b).abs().max())


# --------------------------------------------------------------------------- C: rows_sqnorm, thin_matmul
def _rows(dtype=torch.float32, k=6):
    gen = torch.Generator().manual_seed(k)
    A = torch.randn(k, 3, generator=gen, dtype=dtype)
    B = TF.normalize(torch.randn(k, 4, generator=gen, dtype=D), dim=1).to(dtype)
    return A, B, torch.rand(k, generator=gen, dtype=dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_sqnorm_refuses_wrong_arguments_on_every_backend(backend):
    A, B, coef = _rows()
    cases = [
        ((A, B, coef[:1]), ValueError, r"coef \(k,\) or None with one k, got A \(6, 3\), B \(6, 4\), coef \(1,\)"),
        ((A, B, coef[:, None]), ValueError, r"coef \(6, 1\)"),
        ((A[0], B, coef), ValueError, r"got A \(3,\)"),
        ((A, B[:5], coef), ValueError, r"B \(5, 4\)"),
        ((A.tolist(), B, coef), TypeError, r"A must be a tensor, got list"),
        ((A, B, [1.0] * 6), TypeError, r"coef must be a tensor, got list"),
        ((A.long(), B, coef), TypeError, r"A must be a real floating-point tensor, got torch.int64"),
        ((A, B.to(torch.complex64), coef), TypeError, r"B must be a real floating-point tensor, got torch.complex64"),
        ((A, B, coef > 0.5), TypeError, r"coef must be a real floating-point tensor, got torch.bool"),
        ((A, B.to("meta"), coef), ValueError, r"A, B and coef must be on one device, got cpu, meta, cpu"),
    ]
    with kernels.use_backend(backend):
        for args, error, match in cases:
            with pytest.raises(error, match=r"pinet\.kernels\.rows_sqnorm: .*" + match):
                kernels.rows_sqnorm(*args)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_rows_sqnorm_of_half_rows_is_float32_on_every_backend(half):
    # Half rows are summed and returned in float32 (a float16 norm overflows at 65504).
    A, B, coef = _rows(half, k=9)
    want = F.pi_rows_sqnorm(A.double(), B.double(), coef.double())
    want_plain = F.pi_rows_sqnorm(A.double(), B.double())
    for backend in CPU_BACKENDS:
        with kernels.use_backend(backend):
            for c, ref in ((coef, want), (None, want_plain), (coef.float(), want)):
                got = kernels.rows_sqnorm(A, B, c)
                assert got.dtype == torch.float32 and got.dim() == 0, (backend, got.dtype)
                assert abs(float(got) - float(ref)) <= 1e-5 * abs(float(ref)), backend
    # Float64 rows stay float64 (coef's dtype, as pi_rows_sqnorm documents).
    A, B, coef = _rows(D)
    assert kernels.rows_sqnorm(A, B, coef).dtype == D


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_thin_matmul_refuses_wrong_arguments_on_every_backend(backend):
    x, W = torch.randn(3, 5), torch.randn(5, 2)
    cases = [
        ((x.long(), W.long()), TypeError, r"x must be a real floating-point tensor, got torch.int64"),
        ((x, W.to(torch.complex64)), TypeError, r"W must be a real floating-point tensor, got torch.complex64"),
        ((x.tolist(), W), TypeError, r"x must be a tensor, got list"),
        ((x, W[:4]), ValueError, r"expected x \(b, d\) and W \(d, r\) with one d, got x \(3, 5\), W \(4, 2\)"),
        ((x[0], W), ValueError, r".*got x \(5,\), W \(5, 2\)"),
        ((x, W.double()), TypeError, r"x and W must have one dtype, got torch.float32 and torch.float64"),
        ((x, W.to("meta")), ValueError, r"x and W must be on one device, got cpu and meta"),
    ]
    with kernels.use_backend(backend):
        for args, error, match in cases:
            with pytest.raises(error, match=r"pinet\.kernels\.thin_matmul: " + match):
                kernels.thin_matmul(*args)
        assert torch.equal(kernels.thin_matmul(x.double(), W.double()), x.double() @ W.double())


# --------------------------------------------------------------------------- D: feature_kernel
def _net():
    torch.manual_seed(0)
    return pinet.InfPiMLP(4, 2, r=3, depth=1, dtype=D)


def _counting(net):
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_feature_kernel_checks_out_before_any_feature_is_computed():
    net, x = _net(), torch.randn(7, 4, dtype=D)
    calls = _counting(net)
    with pytest.raises(TypeError, match=r"feature_kernel: out must be a \(7, 7\) tensor or None, got ndarray .*torch\.from_numpy"):
        pinet.feature_kernel(net, x, out=np.zeros((7, 7)))
    with pytest.raises(ValueError, match=r"feature_kernel: out must be a \(7, 5\) tensor, got shape \(7, 7\)"):
        pinet.feature_kernel(net, x, x[:5], out=torch.zeros(7, 7, dtype=D))
    with pytest.raises(ValueError, match=r"feature_kernel: out is on the meta device"):
        pinet.feature_kernel(net, x, out=torch.zeros(7, 7, dtype=D, device="meta"))
    with pytest.raises(ValueError, match=r"feature_kernel: out must not require grad"):
        pinet.feature_kernel(net, x, out=torch.zeros(7, 7, dtype=D, requires_grad=True))
    assert not calls  # no forward ran
    out = torch.full((7, 7), 5.0, dtype=D)
    assert pinet.feature_kernel(net, x, out=out) is out and torch.equal(out, pinet.feature_kernel(net, x))


def test_feature_kernel_refuses_meta_inputs_and_nets_up_front():
    net, x = _net(), torch.randn(7, 4, dtype=D)
    calls = _counting(net)
    with pytest.raises(ValueError, match=r"feature_kernel: x1 is on the meta device"):
        pinet.feature_kernel(net, x.to("meta"))
    with pytest.raises(ValueError, match=r"feature_kernel: x2 is on the meta device"):
        pinet.feature_kernel(net, x, x.to("meta"))
    with pytest.raises(ValueError, match=r"feature_kernel: x is on the meta device"):
        features(net, x.to("meta"))
    with pytest.raises(TypeError, match=r"feature_kernel: net must be an nn.Module, got str"):
        pinet.feature_kernel("net", x)
    assert not calls
    meta_net = nn.Sequential(nn.Linear(4, 4, device="meta", dtype=D), pinet.InfPiLayer(4, 2, readout=True, dtype=D))
    with pytest.raises(ValueError, match=r"feature_kernel: net's parameters are on the meta device"):
        pinet.feature_kernel(meta_net, x)


def test_feature_kernel_block_size_accepts_integer_likes_and_refuses_others():
    net, x = _net(), torch.randn(7, 4, dtype=D)
    want = pinet.feature_kernel(net, x, block_size=3)
    assert torch.equal(pinet.feature_kernel(net, x, block_size=np.int64(3)), want)
    for bad in (True, 2.0, "3", None):
        with pytest.raises(TypeError, match=r"feature_kernel: block_size must be a positive int, got "):
            pinet.feature_kernel(net, x, block_size=bad)
    for bad in (0, -1, np.int64(0)):
        with pytest.raises(ValueError, match=r"feature_kernel: block_size must be a positive int, got "):
            pinet.feature_kernel(net, x, block_size=bad)


def test_kernel_from_features_checks_its_features_and_out():
    net, x = _net(), torch.randn(5, 4, dtype=D)
    f = features(net, x)
    with pytest.raises(TypeError, match=r"kernel_from_features: f1 must be the \(kind, F, s\) tuple of features\(\), got Tensor"):
        kernel_from_features(f[1])
    with pytest.raises(ValueError, match=r"kernel_from_features: f2's kind must be 'infinite' or 'finite', got 'inf'"):
        kernel_from_features(f, ("inf", f[1], f[2]))
    with pytest.raises(ValueError, match=r"kernel_from_features: f1's s must be a \(5, 1\) tensor"):
        kernel_from_features(("infinite", f[1], None))
    with pytest.raises(TypeError, match=r"feature_kernel: out must be a \(5, 5\) tensor or None, got list"):
        kernel_from_features(f, out=[[0.0] * 5] * 5)


# --------------------------------------------------------------------------- E: sample changes nothing
class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4, dtype=D)
        self.inp = pinet.InfPiInput(4, 3, dtype=D)
        self.head = pinet.InfPiLayer(3, 2, readout=True, dtype=D)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.head(self.drop(self.inp(self.bn(x))))


def _snapshot(m: nn.Module):
    sd = copy.deepcopy(m.state_dict())
    modes = [(n, s.training) for n, s in m.named_modules()]
    hooks = [(len(s._forward_hooks), len(s._forward_pre_hooks)) for s in m.modules()]
    grads = [p.grad for p in m.parameters()]
    return sd, modes, hooks, grads


def _assert_same(m: nn.Module, snap):
    sd, modes, hooks, grads = snap
    now = m.state_dict()
    assert now.keys() == sd.keys()
    for k, v in now.items():
        assert torch.equal(v, sd[k]) if isinstance(v, torch.Tensor) else v == sd[k], k
    assert [(n, s.training) for n, s in m.named_modules()] == modes
    assert [(len(s._forward_hooks), len(s._forward_pre_hooks)) for s in m.modules()] == hooks
    assert all(p.grad is g for p, g in zip(m.parameters(), grads))


@pytest.mark.parametrize("mixed", [False, True])
def test_sample_leaves_batchnorm_statistics_and_training_flags_alone(mixed):
    m = _BNNet()
    with torch.no_grad():
        m.bn.running_mean.fill_(0.25)
    if mixed:  # a submodule kept in eval inside a training model keeps its own flag
        m.drop.eval()
    snap = _snapshot(m)
    x = torch.randn(2, 4, dtype=D)
    fin = pinet.sample(m, 64, generator=torch.Generator().manual_seed(0), example_input=x)
    _assert_same(m, snap)
    assert fin.training and fin.bn.training and fin.drop.training == (not mixed)
    assert torch.equal(fin.bn.running_mean, m.bn.running_mean) and int(fin.bn.num_batches_tracked) == 0
    flow = pinet.trace(m, x)  # the public trace alike
    assert flow.spaces == ["inp"]
    _assert_same(m, snap)
    # The default example input is in the input layer's dtype (a float64 BatchNorm refuses float32).
    flow = pinet.trace(m)
    assert flow.spaces == ["inp"]
    _assert_same(m, snap)


class _Mixed(nn.Module):
    # Adds the outputs of two different infinite layers: refused during the traced forward.
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4, dtype=D)
        self.a = pinet.InfPiInput(4, 3, dtype=D)
        self.b = pinet.InfPiInput(4, 3, dtype=D)
        self.head = pinet.InfPiLayer(3, 2, readout=True, dtype=D)

    def forward(self, x):
        x = self.bn(x)
        return self.head(self.a(x) + self.b(x))


def test_sample_that_raises_changes_nothing():
    m = _Mixed()
    m.b.eval()
    snap = _snapshot(m)
    with pytest.raises(pinet.MixedSpacesError):
        pinet.sample(m, 64, example_input=torch.randn(2, 4, dtype=D))
    _assert_same(m, snap)
    m = _BNNet()
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"width must be at least r=3"):
        pinet.sample(m, 2)
    with pytest.raises(ValueError, match=r"width=10000000000 needs at least [0-9,]+ bytes"):
        pinet.sample(m, 10**10)
    _assert_same(m, snap)


# --------------------------------------------------------------------------- F: sample's arguments
class _UnusableGenerator(torch.Generator):
    # This torch refuses torch.Generator("meta") itself; older ones built it.
    @property
    def device(self):
        return torch.device("meta")


def test_sample_names_wrong_arguments():
    m = _BNNet()
    snap = _snapshot(m)
    cases = [
        ({"dtype": "float32"}, TypeError, r"dtype must be a real floating-point torch.dtype .* or None, got 'float32'"),
        ({"dtype": torch.int64}, TypeError, r"dtype must be a real floating-point torch.dtype .*got torch.int64"),
        ({"dtype": torch.complex64}, TypeError, r"dtype must .*got torch.complex64"),
        ({"generator": 5}, TypeError, r"generator must be a torch.Generator or None, got int"),
        ({"generator": _UnusableGenerator()}, ValueError, r"generator is on the meta device"),
        ({"example_input": 5}, TypeError, r"example_input must be a tensor, a tuple .*got int"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=r"pinet\.sample: " + match):
            pinet.sample(m, 64, **kwargs)
    for bad in (True, 64.0, "64", None):
        with pytest.raises(TypeError, match=r"pinet\.sample: width must be a positive int, got "):
            pinet.sample(m, bad)
    for bad in (0, -3, np.int64(0)):
        with pytest.raises(ValueError, match=r"pinet\.sample: width must be a positive int, got "):
            pinet.sample(m, bad)
    _assert_same(m, snap)


def test_sample_accepts_integer_like_widths():
    m = _BNNet()
    a = pinet.sample(m, 64, generator=torch.Generator().manual_seed(4))
    b = pinet.sample(m, np.int64(64), generator=torch.Generator().manual_seed(4))
    assert b.inp.weight.shape == (64, 4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k] for k, v in sa.items())
