"""Baselines: NNGP/NTK closed forms against wide random networks, kernel regression, the finite MLP."""

import math

import pytest
import torch
import torch.nn.functional as F

from pinet.baselines import MLP, KernelRegressor, nngp_kernel, ntk_kernel
from pinet.optim import PiOptimizerWrapper, param_groups

# Small tensors: one thread (tests/conftest.py) avoids OpenMP oversubscription on shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")


MULTS = dict(first_layer_alpha=1.3, last_layer_alpha=0.7, bias_alpha=0.5, last_bias_alpha=0.8, bias_var=1.0)
LR_MULTS = dict(first_layer_lr_mult=0.5, last_layer_lr_mult=2.0, bias_lr_mult=3.0)


def _empirical_kernels(X, depth, width, seed):
    """NNGP and NTK of one random NTK-parametrised MLP of the given width, (N, N) each.

    NNGP: the output covariance given the last hidden layer, α_out² (φ·φ'/n + β_out² v_b) (its
    expectation over the readout). NTK: Σ_p m_p ∇_p f(x) · ∇_p f(x') by autograd over every parameter,
    each group weighted by its learning-rate multiplier exactly as pinet.optim.param_groups assigns it.
    """
    net = MLP(X.shape[1], 1, width, depth, parametrization="ntk", dtype=torch.float64,
              generator=torch.Generator().manual_seed(seed), **MULTS)  # fmt: skip
    phi = net.features(X)
    a_out, b_out = MULTS["last_layer_alpha"], MULTS["last_bias_alpha"]
    nngp = a_out**2 * (phi @ phi.T / width + b_out**2 * MULTS["bias_var"])
    groups = param_groups(net, 1.0, 0.0, LR_MULTS["first_layer_lr_mult"], LR_MULTS["last_layer_lr_mult"],
                          LR_MULTS["bias_lr_mult"])  # fmt: skip
    mult = {id(p): g["lr"] for g in groups for p in g["params"]}
    rows = []
    for i in range(X.shape[0]):
        net.zero_grad()
        net(X[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() * math.sqrt(mult[id(p)]) for p in net.parameters()]))
    G = torch.stack(rows)
    return nngp, G @ G.T


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_kernels_match_wide_random_networks(depth):
    torch.manual_seed(1)
    X = torch.randn(4, 7, dtype=torch.float64)
    width, seeds = 1024, 4
    emp = [_empirical_kernels(X, depth, width, s) for s in range(seeds)]
    nngp_emp = sum(e[0] for e in emp) / seeds
    ntk_emp = sum(e[1] for e in emp) / seeds
    nngp = nngp_kernel(X, depth=depth, **MULTS)
    ntk = ntk_kernel(X, depth=depth, **MULTS, **LR_MULTS)
    # Each empirical entry is an average of n·S per-unit terms (n = width, S = seeds). For ReLU
    # features the per-term coefficient of variation is about sqrt(5) (relu(u)² has mean σ²/2 and
    # variance 5σ⁴/4), so one entry fluctuates by ~2.2 (nS)^-1/2 of the kernel scale; deeper
    # layers add a propagated fluctuation of the same order, and we take the max over 16 entries
    # (~3 standard deviations). 8 (nS)^-1/2 = 0.125 leaves room for that and still separates the
    # two kernels, which differ by far more (asserted below). Measured errors are 0.01-0.05.
    tol = 8.0 / math.sqrt(width * seeds)
    scale_nngp = nngp.diagonal().mean()
    scale_ntk = ntk.diagonal().mean()
    assert ((nngp_emp - nngp).abs().max() / scale_nngp).item() < tol
    assert ((ntk_emp - ntk).abs().max() / scale_ntk).item() < tol
    # The check can tell the kernels apart: swapping them would fail by a wide margin.
    assert ((ntk - nngp).abs().max() / scale_ntk).item() > 3 * tol


def test_kernel_closed_forms():
    X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
    # depth 0, no bias: NNGP(x, x') = α_out² α_in² |x||x'|/d J(cos); J(1) = 1/2, J(0) = 1/(2π), J(-1) = 0.
    K = nngp_kernel(X, depth=0, first_layer_alpha=2.0, last_layer_alpha=3.0, bias_alpha=0.0)
    c = 9 * 4 / 2
    assert torch.allclose(K[0, 0], torch.tensor(c * 0.5, dtype=torch.float64))
    assert torch.allclose(K[0, 1], torch.tensor(c * 2 / (2 * math.pi), dtype=torch.float64))
    assert K[0, 2].abs() < 1e-12
    # Training only the readout: the NTK is the NNGP (depth 0, no bias contribution).
    nt = ntk_kernel(X, depth=0, first_layer_alpha=2.0, last_layer_alpha=3.0, bias_alpha=0.0,
                    first_layer_lr_mult=0.0)  # fmt: skip
    assert torch.allclose(nt, K)
    # Symmetric and positive semi-definite, cross-kernel consistent with the full kernel.
    Y = torch.randn(6, 2, dtype=torch.float64)
    for fn in (nngp_kernel, ntk_kernel):
        full = fn(torch.cat([X, Y]), depth=2, bias_var=0.5)
        assert torch.allclose(full, full.T)
        assert torch.linalg.eigvalsh(full).min() > -1e-10
        assert torch.allclose(fn(X, Y, depth=2, bias_var=0.5), full[:3, 3:])


def test_kernel_argument_errors():
    X = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="depth"):
        nngp_kernel(X, depth=-1)
    with pytest.raises(ValueError, match="bias_var"):
        nngp_kernel(X, bias_var=-1.0)
    with pytest.raises(ValueError, match="X2"):
        ntk_kernel(X, torch.randn(3, 5))
    with pytest.raises(ValueError, match="first_layer_lr_mult"):
        ntk_kernel(X, first_layer_lr_mult=float("nan"))


def test_kernel_regressor_fits_and_classifies():
    g = torch.Generator().manual_seed(0)
    n = 60
    y = torch.arange(n) % 3
    centers = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    X = centers[y] + torch.randn(n, 3, generator=g, dtype=torch.float64)
    for kind in ("nngp", "ntk"):
        kr = KernelRegressor(kind, depth=1, ridge=0.0).fit(X, y)
        # Without ridge the regressor interpolates its training targets (one-hot minus 1/k).
        target = F.one_hot(y, 3).double() - 1 / 3
        assert torch.allclose(kr.predict(X), target, atol=1e-5)
        kr = KernelRegressor(kind, depth=1, ridge=1e-2, bias_alpha=0.5).fit(X[:40], y[:40])
        assert kr.predict(X[40:]).shape == (20, 3)
        assert kr.score(X[40:], y[40:]) > 0.9
    # Real-valued targets: regression output (N, 1).
    reg = KernelRegressor("ntk", depth=1, ridge=1e-3).fit(X, X[:, 0])
    assert reg.predict(X[:5]).shape == (5, 1)


def test_kernel_regressor_errors():
    X = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="kind"):
        KernelRegressor("rbf")
    with pytest.raises(ValueError, match="first_layer_lr_mult"):
        KernelRegressor("nngp", first_layer_lr_mult=2.0)  # the NNGP has no learning rates
    with pytest.raises(ValueError, match="ridge"):
        KernelRegressor("ntk", ridge=-1.0)
    with pytest.raises(RuntimeError, match="fit"):
        KernelRegressor("ntk").predict(X)
    with pytest.raises(ValueError, match="N=5"):
        KernelRegressor("ntk").fit(X, torch.zeros(4, dtype=torch.long))


def test_mlp_is_mup_and_trains_without_projection():
    torch.manual_seed(0)
    X = torch.randn(16, 10, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    changes, losses = [], []
    for width in (64, 1024):
        gen = torch.Generator().manual_seed(0)
        net = MLP(10, 3, width, 1, bias_alpha=0.5, dtype=torch.float64, generator=gen)
        assert torch.count_nonzero(net(X)) == 0  # zero readout, like the π-net
        before = net.features(X)
        # Pre-activation vectors have O(1) norm at every width (π-net coordinates).
        assert 0.5 < before.norm(dim=1).mean().item() < 2.0
        opt = PiOptimizerWrapper(torch.optim.SGD(param_groups(net, 0.5), lr=0.5), net)
        assert not opt.ctx.projectors and not opt.ctx.pi_states  # nothing to project or concatenate
        for _ in range(3):
            loss = F.cross_entropy(net(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        changes.append((net.features(X) - before).norm(dim=1).mean().item())
        losses.append(F.cross_entropy(net(X), y).item())
    # μP: with a width-independent learning rate the hidden features move by O(1) at every width
    # (they would freeze as n^-1/2 in the NTK parametrisation) and the loss curve is width-stable.
    assert changes[0] > 0.05 and 0.6 < changes[1] / changes[0] < 1.6
    assert abs(losses[1] - losses[0]) < 0.05 * losses[0]


def test_mlp_options_and_errors():
    net = MLP(4, 2, 8, 2, bias_alpha=0.0)
    assert all(layer.bias is None for layer in net.layers) and len(net.layers) == 4
    assert MLP(4, 2, 8, 0, layernorm=True)(torch.randn(3, 4)).shape == (3, 2)
    ntk = MLP(4, 2, 8, 1, parametrization="ntk")
    assert torch.count_nonzero(ntk(torch.randn(3, 4))) > 0  # Gaussian readout in the NTK parametrisation
    with pytest.raises(ValueError, match="parametrization"):
        MLP(4, 2, 8, parametrization="sp")
    with pytest.raises(ValueError, match="layernorm"):
        MLP(4, 2, 8, parametrization="ntk", layernorm=True)
    with pytest.raises(ValueError, match="width"):
        MLP(4, 2, 0)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(3, 5))
