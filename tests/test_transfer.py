"""Transfer learning: the feature kernel (spec, "Feature kernel"), kernel ridge regression on it, and
the ImageNet32 -> CIFAR-10 transfer command on small generated files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pinet
from pinet.baselines import KernelRegressor, accuracy, kernel_ridge, one_hot_targets
from pinet.features import features, kernel_from_features, readout_layer
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
            _rel(
                pinet.feature_kernel(
                    net.sample(w, generator=torch.Generator().manual_seed(100 * w + j), dtype=DT), X
                ),
                K_inf,
            )
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
    # From features computed once per input set.
    f1, f2 = features(net, X1, block_size=6), features(net, X2)
    assert torch.allclose(kernel_from_features(f2, f1, block_size=4), cross.T, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="same layer"):
        kernel_from_features(f1, ("finite" if not finite else "infinite", f2[1], f2[2]))
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
    # Checked before any feature or block is computed (a failure half-way would leave `out` part-filled).
    calls = []
    with pytest.raises(TypeError, match="progress must be a callable"):
        pinet.feature_kernel(net, x, progress=5)
    with pytest.raises(TypeError, match="progress must be a callable"):
        features(net, x, progress="yes")
    with pytest.raises(TypeError, match=r"dtype must be a floating-point torch.dtype or None, got torch.int32"):
        pinet.feature_kernel(net, x, dtype=torch.int32)
    out = torch.full((6, 6), 7, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"out must be a floating-point tensor, got torch.int64"):
        pinet.feature_kernel(net, x, out=out, progress=lambda d, t: calls.append(d))
    assert calls == [] and bool((out == 7).all())
    with pytest.raises(TypeError, match="progress must be a callable"):
        kernel_from_features(features(net, x), progress=1)


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
    kfn = lambda a, b=None: pinet.feature_kernel(net, a, b)
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
    raw = kfn(Xt, X) @ torch.linalg.solve(
        kfn(X) + 1e-4 * torch.eye(40, dtype=DT), one_hot_targets(y, center=False)
    )
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


# ------------------------------------------------------------------------- the ImageNet32 command
import csv
import os
import pickle

import numpy as np

from experiments.imagenet import data as imagenet_data
from experiments.imagenet import transfer_imagenet

# Labels of the tiny ImageNet32: 1, 5, 9 and 997 are in the default 250-class subset (ids 1, 5, ...,
# 997), 2, 3 and 1000 are not and must be dropped.
_KEPT, _DROPPED = [1, 5, 9, 997], [2, 3, 1000]


def _write_imagenet32(folder, per_batch=6, n_val=10, seed=0):
    """Tiny ImageNet32 in the official layout: train_data_batch_1..10 and val_data, pickled dicts with
    'data' (N, 3072) uint8 and 1-based 'labels' (plus the 'mean' the real training batches carry)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    kept = 0

    def batch(n):
        nonlocal kept
        y = rng.choice(_KEPT + _DROPPED, n)
        kept += int(np.isin(y, _KEPT).sum())
        x = np.clip((y[:, None] % 7) * 30 + rng.integers(0, 60, (n, 3072)), 0, 255).astype(np.uint8)
        return {"data": x, "labels": y.tolist(), "mean": x.mean(0)}

    for i in range(1, 11):
        with open(os.path.join(folder, f"train_data_batch_{i}"), "wb") as f:
            pickle.dump(batch(per_batch), f)
    n_train = kept
    with open(os.path.join(folder, "val_data"), "wb") as f:
        pickle.dump(batch(n_val), f)
    return n_train


def _write_cifar10(root, per_batch=8, n_test=12):
    """Tiny CIFAR-10 in the real python-pickle layout (as tests/test_experiments.py)."""
    rng = np.random.default_rng(1)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)

    def batch(n, label):
        y = rng.integers(0, 10, n)
        x = np.clip(y[:, None] * 25 + rng.integers(0, 40, (n, 3072)), 0, 255).astype(np.uint8)
        return {
            "batch_label": label,
            "labels": y.tolist(),
            "data": x,
            "filenames": [f"{i}.png" for i in range(n)],
        }

    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump(batch(per_batch, f"training batch {i} of 5"), f)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch(n_test, "testing batch 1 of 1"), f)


@pytest.fixture
def tiny_data(tmp_path):
    n_train = _write_imagenet32(tmp_path / "imagenet")
    _write_cifar10(tmp_path / "cifar")
    return tmp_path, n_train


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# The reference README's command (seeds/, pilimit_lib "Imagenet") with its transfer flags.
REFERENCE = [
    "--save-dir=./output/",
    "--save-model",
    "--cuda",
    "--r",
    "200",
    "--lr=0.01",
    "--batch-size=16",
    "--gclip=0",
    "--epochs=40",
    "--human",
    "--wd=0.0001",
    "--bias-alpha=0.5",
    "--first-layer-lr-mult=1.0",
    "--last-layer-lr-mult=1.0",
    "--gclip-per-param",
    "--transfer",
    "--transfer-milestones=0,5,10",
]

# Every flag of the reference command (the reference transfer command; docs/transfer.md).
REFERENCE_FLAGS = [
    "--verbose",
    "--imagenet-data",
    "--cifar-data",
    "--save-dir",
    "--save-model",
    "--cuda",
    "--float",
    "--batch-size",
    "--test-batch-size",
    "--lr",
    "--scheduler",
    "--lr-drop-ratio",
    "--gclip-drop-ratio",
    "--lr-drop-milestones",
    "--gclip-drop-milestones",
    "--no-apply-lr-mult-to-wd",
    "--wd",
    "--gclip",
    "--gclip-per-param",
    "--layernorm",
    "--first-layer-lr-mult",
    "--last-layer-lr-mult",
    "--bias-lr-mult",
    "--first-layer-alpha",
    "--bias-alpha",
    "--last-layer-alpha",
    "--depth",
    "--loss",
    "--r",
    "--init-from-data",
    "--init-A-B-direct",
    "--gaussian-init",
    "--cycarr",
    "--human",
    "--width",
    "--epochs",
    "--quiet",
    "--seed",
    "--transfer",
    "--solve-kernel",
    "--transfer-milestones",
]


def test_transfer_flags_parse_as_the_reference():
    p = transfer_imagenet.build_parser()
    assert set(REFERENCE_FLAGS) <= set(p._option_string_actions)
    d = p.parse_args([])
    # The reference's defaults; --width absent means the infinite net.
    expect = dict(
        width=None,
        r=400,
        depth=2,
        batch_size=64,
        test_batch_size=64,
        lr=2.0,
        scheduler="none",
        lr_drop_ratio=0.5,
        gclip_drop_ratio=0.5,
        lr_drop_milestones=[],
        gclip_drop_milestones=[],
        apply_lr_mult_to_wd=True,
        wd=1e-4,
        gclip=0.2,
        gclip_per_param=False,
        layernorm=False,
        first_layer_lr_mult=0.1,
        last_layer_lr_mult=1.0,
        bias_lr_mult=0.5,
        first_layer_alpha=1.0,
        bias_alpha=1.0,
        last_layer_alpha=1.0,
        loss="xent",
        epochs=24,
        seed=1,
        transfer=False,
        solve_kernel=False,
        transfer_milestones=[],
        cifar_data="./dataset",
        save_dir="",
        float=False,
        cuda=False,
        save_model=False,
        verbose=False,
        human=False,
        quiet=False,
        cycarr=False,
        init_from_data=False,
        init_A_B_direct=False,
        gaussian_init=False,
    )
    assert {k: getattr(d, k) for k in expect} == expect
    assert d.imagenet_data == os.path.join("examples", "imagenet", "data")
    a = p.parse_args(
        REFERENCE
        + [
            "--scheduler",
            "multistep",
            "--lr-drop-milestones",
            "30",
            "--gclip-drop-milestones",
            "20,30",
            "--no-apply-lr-mult-to-wd",
            "--width",
            "512",
        ]
    )
    got = {
        k: getattr(a, k)
        for k in (
            "save_dir",
            "save_model",
            "cuda",
            "r",
            "lr",
            "batch_size",
            "gclip",
            "epochs",
            "human",
            "wd",
            "bias_alpha",
            "first_layer_lr_mult",
            "last_layer_lr_mult",
            "gclip_per_param",
            "transfer",
            "transfer_milestones",
            "scheduler",
            "lr_drop_milestones",
            "gclip_drop_milestones",
            "apply_lr_mult_to_wd",
            "width",
        )
    }
    assert got == dict(
        save_dir="./output/",
        save_model=True,
        cuda=True,
        r=200,
        lr=0.01,
        batch_size=16,
        gclip=0.0,
        epochs=40,
        human=True,
        wd=1e-4,
        bias_alpha=0.5,
        first_layer_lr_mult=1.0,
        last_layer_lr_mult=1.0,
        gclip_per_param=True,
        transfer=True,
        transfer_milestones=[0, 5, 10],
        scheduler="multistep",
        lr_drop_milestones=[30],
        gclip_drop_milestones=[20, 30],
        apply_lr_mult_to_wd=False,
        width=512,
    )
    a.gclip = 0.4
    a.gclip_drop_ratio = 0.5
    assert [transfer_imagenet._gclip_at(a, e) for e in (0, 19, 20, 29, 30, 40)] == [
        0.4,
        0.4,
        0.2,
        0.2,
        0.1,
        0.1,
    ]


def _recompute_transfer(net, cifar_root, ridges, method="inverse"):
    Xtr, ytr, Xte, yte = imagenet_data.load_cifar10(cifar_root)
    Xtr, Xte = imagenet_data.normalize(Xtr), imagenet_data.normalize(Xte)
    K = pinet.feature_kernel(net, Xtr, dtype=DT)
    Kt = pinet.feature_kernel(net, Xte, Xtr, dtype=DT)
    Y = one_hot_targets(torch.from_numpy(ytr), 10)
    preds = [Kt @ (torch.linalg.inv(K + lam * torch.eye(K.shape[0], dtype=DT)) @ Y) for lam in ridges]
    return [accuracy(p, torch.from_numpy(yte)) for p in preds]


def test_transfer_command_end_to_end_with_milestones(tiny_data, capsys):
    root, n_train = tiny_data
    out = str(root / "out")
    # Later flags win in argparse: the reference command, small, on CPU, our paths.
    small = [
        "--r",
        "8",
        "--depth",
        "1",
        "--epochs",
        "2",
        "--float64",
        "--batch-size",
        "8",
        "--transfer-milestones",
        "0,2",
        "--transfer-ridges",
        "1e-4,1e-8",
        "--kernel-block-size",
        "16",
        "--save-dir",
        out,
        "--imagenet-data",
        str(root / "imagenet"),
        "--cifar-data",
        str(root / "cifar"),
    ]
    argv = [a for a in REFERENCE if a not in ("--cuda", "--human")] + small
    res = transfer_imagenet.main(argv)
    stdout = capsys.readouterr().out
    assert "transfer at epoch 0" in stdout and "transfer at epoch 2" in stdout
    log = _csv(os.path.join(out, "log.csv"))
    assert [int(r["epoch"]) for r in log] == [1, 2]
    # The 250-class subset: only rows of kept classes are trained on, one π-row each per epoch.
    assert int(log[0]["M_layer1"]) == 8 + n_train and int(log[1]["M_layer1"]) == 8 + 2 * n_train
    model = pinet.InfPiMLP.from_state_dict(torch.load(os.path.join(out, "model.pt"), weights_only=True))
    assert model.d_out == 250
    tr = _csv(os.path.join(out, "transfer.csv"))
    assert [(int(r["epoch"]), float(r["ridge"])) for r in tr] == [(0, 1e-4), (0, 1e-8), (2, 1e-4), (2, 1e-8)]
    assert log[1]["transfer_acc"] == tr[2]["transfer_acc"] and log[0]["transfer_acc"] == ""
    # The logged accuracies are the feature-kernel ridge accuracies of the saved (epoch 2) net and of
    # the initialisation (epoch 0: the same seed rebuilds it).
    accs = _recompute_transfer(model, str(root / "cifar"), [1e-4, 1e-8])
    assert [float(r["transfer_acc"]) for r in tr[2:]] == pytest.approx(accs, abs=1e-12)
    init = res["model"].__class__.from_state_dict(
        torch.load(os.path.join(out, "model.pt"), weights_only=True)
    )
    init.reset_parameters(torch.Generator().manual_seed(1))  # --seed 1 (the reference default)
    accs0 = _recompute_transfer(init, str(root / "cifar"), [1e-4, 1e-8])
    assert [float(r["transfer_acc"]) for r in tr[:2]] == pytest.approx(accs0, abs=1e-12)
    from PIL import Image

    with Image.open(os.path.join(out, "curves.png")) as im:
        im.verify()
    # A saved model evaluated with --test --transfer (the reference's "load a trained net, milestone 0").
    test = transfer_imagenet.main(
        [
            "--test",
            "--model-path",
            os.path.join(out, "model.pt"),
            "--transfer",
            "--solve-kernel",
            "--transfer-ridges",
            "1e-4",
            "--imagenet-data",
            str(root / "imagenet"),
            "--cifar-data",
            str(root / "cifar"),
        ]
    )
    assert test["transfer_acc"] == pytest.approx(accs[:1], abs=1e-12)


@pytest.mark.parametrize("width", [["--width", "16"], []], ids=["finite", "infinite"])
def test_transfer_resume_finite_and_infinite(tiny_data, width, capsys):
    # The infinite net is saved as width 0; it must resume as the infinite net again (it was once
    # refused: "--width must be a positive width").
    root, _ = tiny_data
    common = [
        "--r",
        "8",
        "--depth",
        "1",
        "--epochs",
        "2",
        "--float64",
        "--batch-size",
        "8",
        "--quiet",
        "--transfer",
        "--transfer-milestones",
        "1,2",
        "--imagenet-data",
        str(root / "imagenet"),
        "--cifar-data",
        str(root / "cifar"),
        "--imagenet-classes",
        "1,5,9,997",
        *width,
    ]
    tag = "finite" if width else "infinite"
    a = transfer_imagenet.main(common + ["--save-dir", str(root / f"a_{tag}")])
    transfer_imagenet.main(common + ["--save-dir", str(root / f"b_{tag}"), "--stop-after", "1"])
    b = transfer_imagenet.main(
        [
            "--resume",
            str(root / f"b_{tag}" / "checkpoint.pt"),
            "--quiet",
            "--transfer",
            "--transfer-milestones",
            "1,2",
            "--imagenet-data",
            str(root / "imagenet"),
            "--cifar-data",
            str(root / "cifar"),
        ]
    )
    assert isinstance(a["model"], pinet.FinPiMLP if width else pinet.InfPiMLP) and a["model"].d_out == 4
    assert isinstance(b["model"], type(a["model"]))
    # A damaged checkpoint gets the same checks as train's resume: one line, exit 2.
    ckpt = torch.load(root / f"b_{tag}" / "checkpoint.pt", weights_only=False)
    ckpt["rng"] = {}
    torch.save(ckpt, root / f"bad_{tag}.pt")
    with pytest.raises(SystemExit) as e:
        transfer_imagenet.main(["--resume", str(root / f"bad_{tag}.pt"), "--quiet",
                                "--imagenet-data", str(root / "imagenet"), "--cifar-data", str(root / "cifar")])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its RNG state ('rng') must hold torch, data, python" in err, err
    key = lambda h: [(r["epoch"], r["train_loss"], r["test_acc"]) for r in h]
    assert key(a["history"]) == key(b["history"])
    assert [(t["epoch"], t["acc"]) for t in a["transfers"]] == [
        (t["epoch"], t["acc"]) for t in b["transfers"]
    ]


def test_restricted_loader_rejects_a_pickle_that_carries_code(tiny_data, capsys):
    root, _ = tiny_data
    marker = root / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = root / "imagenet" / "train_data_batch_3"
    with open(path, "wb") as f:
        pickle.dump({"data": Evil(), "labels": [1]}, f)
    with pytest.raises(imagenet_data.UnsafePickleError, match="system"):
        imagenet_data.restricted_load(str(path))
    with pytest.raises(SystemExit) as e:
        transfer_imagenet.main(["--imagenet-data", str(root / "imagenet"), "--r", "8", "--float"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "carries code" in err and "train_data_batch_3" in err
    assert not marker.exists()
    # A real numpy pickle still loads (arrays, lists, numbers only).
    ok = imagenet_data.restricted_load(str(root / "imagenet" / "train_data_batch_1"))
    assert ok["data"].dtype == np.uint8 and ok["data"].shape[1] == 3072


@pytest.mark.parametrize("labels", [["a", "b"], [1.5, 2.0]])
def test_batch_with_non_integer_labels_is_a_one_line_error(tmp_path, labels):
    # Strings used to end in numpy's "invalid literal for int()"; fractions were truncated silently.
    path = tmp_path / "train_data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": labels}, f)
    with pytest.raises(imagenet_data.CLIError, match=r"train_data_batch_1: 'labels' must be integers, got"):
        imagenet_data.read_batch(str(path), label_base=1)


def test_missing_data_and_refused_flags_are_one_line_errors(tiny_data, capsys):
    root, _ = tiny_data

    def err_of(argv, usage=False):
        with pytest.raises(SystemExit) as e:
            transfer_imagenet.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err
        if usage:  # a bad flag value: argparse's usage, then one line naming the flag
            assert err.startswith("usage:")
            return err.splitlines()[-1]
        assert len(err.splitlines()) == 1
        return err

    err = err_of(["--imagenet-data", str(root / "nowhere"), "--float"])
    assert (
        str(root / "nowhere") in err
        and "train_data_batch_1" in err
        and "val_data" in err
        and "--imagenet-data" in err
    )
    os.remove(root / "imagenet" / "val_data")
    err = err_of(["--imagenet-data", str(root / "imagenet"), "--float"])
    assert "lacks val_data" in err
    _write_imagenet32(root / "imagenet")
    err = err_of(
        [
            "--imagenet-data",
            str(root / "imagenet"),
            "--cifar-data",
            str(root / "nocifar"),
            "--transfer",
            "--r",
            "8",
            "--epochs",
            "1",
            "--float",
        ]
    )
    assert "CIFAR-10 not found" in err and "data_batch_1" in err and "--cifar-data" in err
    # Checked before ImageNet32 is loaded: with both missing, the CIFAR-10 error comes first.
    err = err_of(["--imagenet-data", str(root / "noimagenet"), "--cifar-data", str(root / "nocifar"), "--transfer"])
    assert "CIFAR-10 not found" in err, err
    assert "not implemented" in err_of(["--gaussian-init", "--width", "64"])
    assert "after --epochs 2" in err_of(
        ["--transfer", "--transfer-milestones", "5", "--epochs", "2"], usage=True
    )
    assert "only used with --transfer" in err_of(["--transfer-milestones", "0"], usage=True)
    assert "--width" in err_of(["--width", "0"], usage=True)
    (root / "afile").write_text("")
    assert "not a directory" in err_of(
        ["--save-dir", str(root / "afile"), "--imagenet-data", str(root / "imagenet")]
    )
    torch.save({"format": 1, "args": {}, "transfers": []}, root / "bad.pt")
    assert "cannot be resumed" in err_of(["--resume", str(root / "bad.pt")])


# ------------------------------------------------------------------------------ the embedded demo
def test_transfer_demo_table(tmp_path, capsys):
    from experiments import transfer_demo

    out = tmp_path / "demo.md"
    table = transfer_demo.main(
        [
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--r",
            "16",
            "--widths",
            "32,64",
            "--trained-width",
            "32",
            "--mlp-width",
            "32",
            "--no-progress",
            "--out",
        ]
        + [str(out)]
    )
    assert out.read_text() == table and table in capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    methods = [line.split("|")[1].strip() for line in lines]
    assert methods == [
        "π-limit, pretrained",
        "π-limit, untrained (same init)",
        "finite π-net sampled from the pretrained π-limit",
        "finite π-net sampled from the pretrained π-limit",
        "finite π-net, pretrained",
        "μP MLP, pretrained (no projection)",
        "NNGP kernel",
        "NTK kernel",
    ]
    for line in lines:
        for cell in line.split("|")[3:5]:
            mean, std = cell.split("±")
            # Five target classes: chance is 20%; every kernel here is far above it.
            assert 40 <= float(mean) <= 100 and float(std) >= 0, line


def test_custom_net_sampled_by_pinet_sample():
    # pinet.sample of a custom net (two readouts on one trunk): the finite net's feature kernel at
    # a chosen readout converges to the infinite one. Geometric mean over 4 Ω draws at 256 and
    # 4096: n^-1/2 predicts a 4x drop; the slope bound -0.35 means at least 16^0.35 = 2.6.
    # Measured: 0.265 -> 0.078 (a 3.4x drop).
    torch.manual_seed(0)
    net = _TwoHeads()
    x = torch.randn(10, 5, dtype=DT)
    K = pinet.feature_kernel(net, x, layer=net.head_b)
    errs = {}
    for w in (256, 4096):
        errs[w] = _geo_mean(
            _rel(pinet.feature_kernel(fin, x, layer=fin.head_b), K)
            for fin in (
                pinet.sample(net, w, generator=torch.Generator().manual_seed(10 * w + j)) for j in range(4)
            )
        )
    assert errs[256] / errs[4096] >= 16**0.35, errs
    fin = pinet.sample(net, 256, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="head_a, head_b"):
        pinet.feature_kernel(fin, x)  # two finite readouts: which one is ambiguous


def test_transfer_demo_refuses_what_it_cannot_honour_before_any_work(tmp_path, capsys):
    from experiments import transfer_demo

    (tmp_path / "afile").write_text("keep")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--train-subset", "64"], "--train-subset: not used by the transfer demo"),
        (["--test-subset", "64"], "--test-subset: not used by the transfer demo"),
        (["--cuda"], "--cuda: the transfer demo runs on the CPU"),
        (["--epochs", "0"], "--epochs: must be >= 1"),
        (["--out", str(tmp_path / "adir")], "is a directory, not a file"),
        (["--out", str(tmp_path / "afile" / "x.md")], "afile is a file, not a directory"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            transfer_demo.main(argv + ["--no-progress"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "keep"


def _transfer_err(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        transfer_imagenet.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_empty_validation_set_and_empty_batches_are_one_line_errors(tiny_data, capsys):
    # A validation set with no image of the selected classes was evaluated on nothing and every
    # epoch logged val loss 0.0 and accuracy 0.0 (history, log.csv, checkpoint). An empty batch was
    # refused or not depending on its labels' container. All are refused before any training.
    root, _ = tiny_data
    out = root / "out"
    argv = ["--r", "8", "--depth", "1", "--epochs", "1", "--float64", "--batch-size", "8", "--quiet",
            "--imagenet-data", str(root / "imagenet"), "--cifar-data", str(root / "cifar"), "--save-dir", str(out)]  # fmt: skip

    def write(name, obj):
        with open(root / "imagenet" / name, "wb") as f:
            pickle.dump(obj, f)

    write("val_data", {"data": np.zeros((3, 3072), np.uint8), "labels": [2, 3, 1000]})
    err = _transfer_err(capsys, argv)
    assert "no validation image (val_data) belongs to the 250 selected classes" in err, err
    assert not out.exists()
    for labels in ([], np.zeros(0, np.int64), np.zeros(0, np.uint8)):
        write("val_data", {"data": np.zeros((0, 3072), np.uint8), "labels": labels})
        assert "val_data holds no images" in _transfer_err(capsys, argv)
        write("train_data_batch_2", {"data": np.zeros((0, 3072), np.uint8), "labels": labels})
        assert "train_data_batch_2 holds no images" in _transfer_err(capsys, argv)
        _write_imagenet32(root / "imagenet")
    write("train_data_batch_2", {"data": np.zeros((2, 3072), np.uint8), "labels": []})
    assert "'data' has 2 rows but 'labels' is empty" in _transfer_err(capsys, argv)
    assert not out.exists()


def test_transfer_resume_refuses_malformed_saved_flags_and_history(tiny_data, capsys):
    # The resume checks of train (experiments.common) with this command's own flag checks.
    root, _ = tiny_data
    data = ["--imagenet-data", str(root / "imagenet"), "--cifar-data", str(root / "cifar")]
    transfer_imagenet.main(["--r", "8", "--depth", "1", "--epochs", "1", "--float64", "--batch-size", "8", "--quiet",
                            "--save-dir", str(root / "run"), *data])  # fmt: skip
    ckpt = torch.load(root / "run" / "checkpoint.pt", weights_only=True)
    before = {p.name: p.read_bytes() for p in (root / "run").iterdir()}
    cases = [
        (lambda c: c.update(args=5), "saved training flags ('args') must be a dict"),
        (lambda c: c["args"].update(batch_size=0), "argument --batch-size: must be a positive integer, got 0"),
        (lambda c: c["args"].update(gclip_drop_ratio=-1.0), "argument --gclip-drop-ratio: must be a finite number > 0"),
        (lambda c: c["args"].update(lr="x"), "its saved --lr must be a number, got 'x'"),
        (lambda c: c["args"].pop("wd"), "lack --wd"),
        (lambda c: c.update(history=[{}]), "history[0] has no 'epoch'"),
        (lambda c: c.update(transfers=[5]), "transfers[0] must be a dict"),
    ]
    for edit, msg in cases:
        bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
        edit(bad)
        torch.save(bad, root / "bad.pt")
        err = _transfer_err(capsys, ["--resume", str(root / "bad.pt"), "--epochs", "2", "--quiet", *data])
        assert msg in err, err
    assert {p.name: p.read_bytes() for p in (root / "run").iterdir()} == before
    assert sorted(p.name for p in root.iterdir()) == ["bad.pt", "cifar", "imagenet", "run"]
