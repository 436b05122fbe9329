"""Transfer learning: the feature kernel (spec, "Feature kernel"), kernel ridge regression on it, and
the ImageNet32 -> CIFAR-10 transfer command on small generated files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pinet
from pinet.baselines import KernelRegressor, accuracy, kernel_ridge, one_hot_targets
from pinet.features import features, readout_layer
from pinet.functional import J
from pinet.optim import PiOptimizerWrapper, param_groups

# Small tensors: one thread (tests/conftest.py) avoids OpenMP oversubscription on shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def _geo_mean(xs):
    logs = [math.log(x) for x in xs]
    return math.exp(sum(logs) / len(logs))


def _slope(widths, errors):
    x = torch.tensor([math.log(w) for w in widths], dtype=DT)
    y = torch.tensor([math.log(e) for e in errors], dtype=DT)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _trained_net(layernorm: bool, depth: int = 1, steps: int = 12, seed: int = 0) -> pinet.InfPiMLP:
    """An InfPiMLP (d=6 -> 3 classes, r=8) trained a few SGD steps on a fixed random task, float64."""
    g = torch.Generator().manual_seed(seed)
    net = pinet.InfPiMLP(6, 3, 8, depth, bias_alpha=0.5, layernorm=layernorm, dtype=DT)
    net.reset_parameters(g)
    X = torch.randn(48, 6, generator=g, dtype=DT)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    inner = torch.optim.SGD(param_groups(net, lr=0.5), lr=0.5, momentum=0.5)
    opt = PiOptimizerWrapper(inner, net)
    for step in range(steps):
        i = (step % 6) * 8
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[i : i + 8]), y[i : i + 8]).backward()
        opt.step()
    return net


def _x(n=14, seed=7):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------------------ the kernel itself
@pytest.mark.parametrize("layernorm", [False, True])
def test_infinite_and_finite_kernels_are_the_spec_formulas(layernorm):
    net = _trained_net(layernorm)
    X = _x()
    K = pinet.feature_kernel(net, X)
    with torch.no_grad():
        g = net.layers[1](net.layers[0](X))  # the coordinates entering the readout
    n = g.norm(dim=1, keepdim=True)
    s = torch.ones_like(n) if layernorm else n
    assert torch.allclose(K, s * s.T * J((g / n) @ (g / n).T), rtol=1e-13, atol=1e-15)
    if layernorm:
        assert torch.allclose(K.diagonal(), torch.full((14,), 0.5, dtype=DT))  # J(1) = 1/2
    fin = net.sample(64, generator=torch.Generator().manual_seed(1), dtype=DT)
    with torch.no_grad():
        h = fin.layers[1](fin.layers[0](X))
    if layernorm:
        h = h / h.norm(dim=1, keepdim=True)
    phi = torch.relu(h)
    assert torch.allclose(pinet.feature_kernel(fin, X), phi @ phi.T, rtol=1e-13, atol=1e-15)  # no 1/n


@pytest.mark.parametrize("layernorm", [False, True])
def test_finite_feature_kernels_of_a_trained_net_converge_with_width(layernorm):
    # Nets sampled from a *trained* infinite net: the feature kernel is an average over n units of
    # relu(ω·g) relu(ω·g'), a Monte Carlo estimate of the infinite kernel with error ~ n^-1/2
    # (plus the O(n^-1/2) error of the sampled hidden layer feeding it). Geometric mean of the
    # relative Frobenius error over 4 Ω draws per width (as tests/equivalence).
    net = _trained_net(layernorm)
    X = _x()
    K_inf = pinet.feature_kernel(net, X)
    # The net did learn: its feature kernel has moved away from the one at initialisation.
    init = pinet.InfPiMLP(6, 3, 8, 1, bias_alpha=0.5, layernorm=layernorm, dtype=DT)
    init.reset_parameters(torch.Generator().manual_seed(0))
    assert _rel(pinet.feature_kernel(init, X), K_inf) > 0.05
    widths = [256, 512, 1024, 2048, 4096]
    errs = []
    for w in widths:
        draws = [
            _rel(pinet.feature_kernel(net.sample(w, generator=torch.Generator().manual_seed(100 * w + j), dtype=DT), X), K_inf)
            for j in range(4)
        ]
        errs.append(_geo_mean(draws))
    slope = _slope(widths, errs)
    table = ", ".join(f"{w}: {e:.4f}" for w, e in zip(widths, errs))
    # The bound (theory: -0.5); a wrong scale (e.g. a 1/n) or the wrong feature would not
    # fall. Measured: slope -0.58 without layernorm, -0.45 with it.
    assert slope <= -0.35, f"slope {slope:.3f} ({table})"
    # Measured geometric-mean error at 4096: 0.050 (no layernorm), 0.030 (layernorm); 0.1 is twice
    # the largest. The kernel of the wrong feature (e.g. the logits) or a missing factor is off by O(1).
    assert errs[-1] < 0.1, table


@pytest.mark.parametrize("finite", [False, True])
def test_blocked_kernel_equals_unblocked_symmetric_psd_and_net_untouched(finite):
    net = _trained_net(layernorm=False)
    if finite:
        net = net.sample(300, generator=torch.Generator().manual_seed(3), dtype=DT)
    X1, X2 = _x(23, 1), _x(11, 2)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    full = pinet.feature_kernel(net, X1, block_size=1000)
    calls = []
    blocked = pinet.feature_kernel(net, X1, block_size=5, progress=lambda d, t: calls.append((d, t)))
    assert torch.allclose(blocked, full, rtol=1e-12, atol=1e-14)
    assert calls[-1] == (15, 15)  # 5 row blocks: 15 blocks of the upper triangle
    assert torch.equal(blocked, blocked.T)
    eig = torch.linalg.eigvalsh(blocked)
    assert eig.min() >= -1e-12 * eig.max()
    cross = pinet.feature_kernel(net, X1, X2, block_size=4)
    assert cross.shape == (23, 11)
    assert torch.allclose(cross, pinet.feature_kernel(net, X1, X2, block_size=100), rtol=1e-12, atol=1e-14)
    # The joint kernel's off-diagonal block is the cross kernel.
    joint = pinet.feature_kernel(net, torch.cat([X1, X2]), block_size=7)
    assert torch.allclose(joint[:23, 23:], cross, rtol=1e-12, atol=1e-14)
    # Written into a preallocated buffer (e.g. a memmap) in another dtype.
    buf = torch.zeros(23, 11, dtype=torch.float32)
    assert pinet.feature_kernel(net, X1, X2, block_size=4, out=buf) is buf
    assert torch.allclose(buf.double(), cross, rtol=1e-6)
    # Nothing in the net changed: parameters, π-rows (no rows were captured), training flags.
    after = {k: v for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in net.modules())
    if not finite:
        assert all(layer.state.pending_rows() is None for layer in net.pi_layers)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = pinet.InfPiInput(5, 4, dtype=DT)
        self.trunk = pinet.InfPiLayer(4, 4, dtype=DT)
        self.head_a = pinet.InfPiLayer(4, 2, readout=True, dtype=DT)
        self.head_b = pinet.InfPiLayer(4, 3, readout=True, dtype=DT)

    def forward(self, x):
        g = self.trunk(self.inp(x))
        return self.head_a(g), self.head_b(g)


def test_layer_choice_for_custom_nets():
    net = _TwoHeads()
    x = torch.randn(6, 5, dtype=DT)
    with pytest.raises(ValueError, match="layer="):
        pinet.feature_kernel(net, x)
    K = pinet.feature_kernel(net, x, layer=net.head_b)
    with torch.no_grad():
        g = net.trunk(net.inp(x))
    n = g.norm(dim=1, keepdim=True)
    assert torch.allclose(K, n * n.T * J((g / n) @ (g / n).T), rtol=1e-13)
    # An inner layer: the features entering the trunk (the input layer's output).
    K_in = pinet.feature_kernel(net, x, layer=net.trunk)
    kind, F, s = features(net, x, layer=net.trunk)
    assert kind == "infinite" and F.shape == (6, 4) and torch.allclose(K_in, s * s.T * J(F @ F.T), rtol=1e-13)
    del net.head_a
    net.forward = lambda x: net.head_b(net.trunk(net.inp(x)))
    assert readout_layer(net) is net.head_b
    with pytest.raises(TypeError, match="layer must be"):
        pinet.feature_kernel(net, x, layer=net.inp)
    with pytest.raises(ValueError, match="not a submodule"):
        pinet.feature_kernel(net, x, layer=pinet.InfPiLayer(4, 2, dtype=DT))
    with pytest.raises(ValueError, match="block_size"):
        pinet.feature_kernel(net, x, block_size=0)
    with pytest.raises(ValueError, match="x2"):
        pinet.feature_kernel(net, x, torch.randn(3, 4, dtype=DT))


# ---------------------------------------------------------------------------- kernel ridge regression
def _spd(n, seed):
    A = torch.randn(n, n + 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return A @ A.T / n


@pytest.mark.parametrize("method", ["auto", "cholesky", "solve", "inverse", "eigh"])
def test_kernel_ridge_equals_a_direct_solve(method):
    K = _spd(30, 0)
    Kt = torch.randn(7, 30, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = torch.arange(30) % 4
    Y = one_hot_targets(y)
    assert Y.shape == (30, 4) and torch.allclose(Y.sum(1), torch.zeros(30, dtype=DT), atol=1e-15)
    ridges = [1e-4, 1e-8, 0.3]
    got = kernel_ridge(K, Y, Kt, ridges, method=method)
    assert got.shape == (3, 7, 4)
    for lam, pred in zip(ridges, got):
        ref = Kt @ torch.linalg.solve(K + lam * torch.eye(30, dtype=DT), Y)
        assert torch.allclose(pred, ref, rtol=1e-8, atol=1e-10), lam
    one = kernel_ridge(K, Y, Kt, 1e-4, method=method)
    assert torch.allclose(one, got[0], rtol=1e-8, atol=1e-10)
    # relative: λ scaled by the mean diagonal.
    rel = kernel_ridge(K, Y, Kt, 0.1, relative=True, method=method)
    lam = 0.1 * K.diagonal().mean()
    assert torch.allclose(rel, Kt @ torch.linalg.solve(K + lam * torch.eye(30, dtype=DT), Y), rtol=1e-9)
    # No test kernel: the dual coefficients.
    alpha = kernel_ridge(K, Y, None, 1e-4, method=method)
    assert torch.allclose(K @ alpha + 1e-4 * alpha, Y, atol=1e-8)


def test_accuracy_regressor_and_errors():
    net = _trained_net(layernorm=True)
    X, Xt = _x(40, 3), _x(10, 4)
    y, yt = (X[:, 0] > 0).long(), (Xt[:, 0] > 0).long()
    kfn = lambda a, b=None: pinet.feature_kernel(net, a, b)  # noqa: E731
    reg = KernelRegressor(kfn, ridge=[1e-4, 1e-8], relative_ridge=False).fit(X, y)
    pre = KernelRegressor("precomputed", ridge=[1e-4, 1e-8], relative_ridge=False)
    pre.fit(kfn(X), y)
    p1, p2 = reg.predict(Xt), pre.predict(kfn(Xt, X))
    assert p1.shape == (2, 10, 2) and torch.allclose(p1, p2, rtol=1e-10)
    ref = kfn(Xt, X) @ torch.linalg.solve(kfn(X) + 1e-4 * torch.eye(40, dtype=DT), one_hot_targets(y))
    assert torch.allclose(p1[0], ref, rtol=1e-8, atol=1e-10)
    accs = reg.score(Xt, yt)
    assert accs == pre.score(kfn(Xt, X), yt) and len(accs) == 2
    assert accs[0] == float((ref.argmax(1) == yt).double().mean())
    # Centering the one-hot targets by 1/k never changes the argmax.
    raw = kfn(Xt, X) @ torch.linalg.solve(kfn(X) + 1e-4 * torch.eye(40, dtype=DT), one_hot_targets(y, center=False))
    assert accuracy(raw, yt) == accs[0]
    with pytest.raises(ValueError, match="positive definite"):
        kernel_ridge(-torch.eye(3, dtype=DT), torch.ones(3, 1, dtype=DT), None, 0.0, method="cholesky")
    with pytest.raises(ValueError, match="method"):
        kernel_ridge(torch.eye(3, dtype=DT), torch.ones(3, 1, dtype=DT), method="qr")
    with pytest.raises(ValueError, match="ridge"):
        kernel_ridge(torch.eye(3, dtype=DT), torch.ones(3, 1, dtype=DT), ridge=[1e-4, -1.0])
    with pytest.raises(ValueError, match="K_test"):
        kernel_ridge(torch.eye(3, dtype=DT), torch.ones(3, 1, dtype=DT), torch.ones(2, 4, dtype=DT))
    with pytest.raises(ValueError, match="num_classes"):
        one_hot_targets(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="kind"):
        KernelRegressor("rbf")
