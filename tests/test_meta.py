"""pinet.meta (MAML) and experiments.meta.train: exact meta-gradients, π-limit tracking, CLI."""

from __future__ import annotations

import copy
import csv
import os

import numpy as np
import pytest
import torch

import pinet
from pinet.hooks import ClipGradNorm
from pinet.meta import MAML
from pinet.optim import PiOptimizerWrapper, param_groups
from pinet.testing import fit_slope, geo_mean

DT = torch.float64
D, K, R = 6, 3, 8


def _tasks(seed: int, n: int = 2, shots: int = 2, queries: int = 3, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        protos = torch.randn(K, d, generator=gen, dtype=DT)
        ys, yq = torch.arange(K).repeat_interleave(shots), torch.arange(K).repeat_interleave(queries)
        xs = protos[ys] + 0.5 * torch.randn(len(ys), d, generator=gen, dtype=DT)
        xq = protos[yq] + 0.5 * torch.randn(len(yq), d, generator=gen, dtype=DT)
        out.append((xs, ys, xq, yq))
    return out


def _infinite(depth: int = 1, seed: int = 3, d: int = D, r: int = R) -> pinet.InfPiMLP:
    net = pinet.InfPiMLP(d, K, r, depth, dtype=DT, last_layer_alpha=2.0, bias_alpha=1.0, last_bias_alpha=0.5)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net


def _pretrained() -> pinet.InfPiMLP:
    # A few plain steps first, so the readout is not zero and every term of the meta-gradient is on.
    net = _infinite()
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.3), net)
    for xs, ys, _, _ in _tasks(11, n=3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xs), ys).backward()
        opt.step()
    opt.zero_grad()
    return net


def _handwritten_meta_grads(fin, tasks, eps, steps, adapt, first_order):
    """MAML written out by hand on the finite π-MLP's weights: plain ReLU MLP, explicit
    projections Ω (ΩᵀΩ)⁻¹ Ωᵀ on the non-readout layers' inner gradients, mean query loss."""
    layers = list(fin.layers)
    names = [f"layers.{i}.{p}" for i, l in enumerate(layers) for p in ("weight", "bias") if getattr(l, p) is not None]
    base = {n: fin.get_parameter(n) for n in names}
    proj = {}
    for i, l in enumerate(layers[:-1]):
        om = l.proj.omega
        P = om @ torch.linalg.solve(om.T @ om, om.T)
        proj[f"layers.{i}.weight"] = proj[f"layers.{i}.bias"] = P
    last = len(layers) - 1
    adapted_names = [n for n in names if adapt == "all" or int(n.split(".")[1]) == last]

    def f(w, x):
        h = layers[0].alpha * (x @ w["layers.0.weight"].T + layers[0].bias_alpha * w["layers.0.bias"])
        for i in range(1, len(layers)):
            l = layers[i]
            b = w.get(f"layers.{i}.bias")
            h = l.alpha * (torch.relu(h) @ w[f"layers.{i}.weight"].T + (l.bias_alpha * b if b is not None else 0.0))
        return h

    total = 0.0
    for xs, ys, xq, yq in tasks:
        w = dict(base)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(f(w, xs), ys)
            gs = torch.autograd.grad(loss, [w[n] for n in adapted_names], create_graph=not first_order)
            for n, g in zip(adapted_names, gs):
                g = g.detach() if first_order else g
                w[n] = w[n] - eps * (proj[n] @ g if n in proj else g)
        total = total + torch.nn.functional.cross_entropy(f(w, xq), yq) / len(tasks)
    return dict(zip(names, torch.autograd.grad(total, [base[n] for n in names])))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("adapt", ["readout", "all"])
@pytest.mark.parametrize("first_order", [False, True])
def test_finite_meta_gradient_equals_handwritten_maml(steps, adapt, first_order, one_thread):
    inf = _pretrained()
    fin = pinet.sample(inf, 40, generator=torch.Generator().manual_seed(5), dtype=DT)
    tasks = _tasks(7)
    ref = _handwritten_meta_grads(fin, tasks, 0.4, steps, adapt, first_order)
    MAML(fin, step_size=0.4, num_steps=steps, adapt=adapt, first_order=first_order).meta_backward(tasks)
    for name, g in ref.items():
        got = fin.get_parameter(name).grad
        assert got is not None, name
        assert torch.allclose(got, g, rtol=0, atol=1e-10 * max(1.0, float(g.abs().max()))), name


def _perturbed_meta_loss(net, maml, tasks, rows, grads, t):
    # The meta-loss of the net moved by t times its own meta-gradient: π-rows appended with
    # coefficient t (then removed), ordinary tensors + t * grad.
    counts = {}
    with torch.no_grad():
        for name, st in rows.items():
            counts[name] = st[0].rows
            st[0].append(st[1].A, st[1].B, torch.full((st[1].rows,), t, dtype=DT))
        for p, g in grads:
            p.add_(t * g)
    try:
        total = 0.0
        for xs, ys, xq, yq in tasks:
            a = maml.adapt(xs, ys, create_graph=False)
            with torch.no_grad():
                total += float(torch.nn.functional.cross_entropy(maml.forward(a, xq), yq)) / len(tasks)
        return total
    finally:
        with torch.no_grad():
            for name, st in rows.items():
                st[0].truncate(counts[name])
            for p, g in grads:
                p.sub_(t * g)


@pytest.mark.parametrize("steps", [1, 2])
def test_infinite_second_order_meta_gradient_is_exact(steps, one_thread):
    """The captured rows (query and support forwards) plus the ordinary gradients are the exact
    meta-gradient: the derivative of the meta-loss along them equals their squared norm."""
    net = _pretrained()
    maml = MAML(net, step_size=0.4, num_steps=steps, adapt="readout")
    tasks = _tasks(7)
    maml.meta_backward(tasks)
    states = {n: m for n, m in net.named_modules() if isinstance(m, pinet.PiState)}
    rows = {n: (st, st.pending_rows()) for n, st in states.items()}
    # One row set per query forward and per support forward of every task.
    for _, (_, r) in rows.items():
        assert r.rows == len(tasks) * (3 * K + steps * 2 * K)
    grads = [(p, p.grad.clone()) for n, p in net.named_parameters() if not n.endswith(".c") and p.grad is not None]
    sq = sum(float(pinet.functional.pi_rows_sqnorm(r.A, r.B, r.coef)) for _, r in rows.values())
    sq += sum(float((g * g).sum()) for _, g in grads)
    h = 1e-5
    fd = (_perturbed_meta_loss(net, maml, tasks, rows, grads, h) - _perturbed_meta_loss(net, maml, tasks, rows, grads, -h)) / (2 * h)
    # Central difference: O(h²) truncation and ~1e-16/h rounding, so 1e-7 relative is ample.
    assert abs(fd - sq) <= 1e-7 * sq, (fd, sq)


def test_maml_names_a_bad_argument():
    net = pinet.InfPiMLP(6, 3, 4, 1)
    with pytest.raises(TypeError, match=r"MAML: loss_fn must be a callable \(logits, y\) -> loss or None, got int"):
        MAML(net, loss_fn=5)
    with pytest.raises(ValueError, match=r"MAML: step_size must be a finite number >= 0, got nan"):
        MAML(net, step_size=float("nan"))
    with pytest.raises(ValueError, match=r"MAML: step_size must be a finite number >= 0, got -0.1"):
        MAML(net, step_size=-0.1)
    assert MAML(net, step_size=0).step_size == 0.0  # no adaptation: a baseline, not an error
    with pytest.raises(ValueError, match=r"MAML: num_steps must be an int >= 1, got 1.5"):
        MAML(net, num_steps=1.5)
    with pytest.raises(TypeError, match=r"MAML: first_order must be a bool, got 'yes'"):
        MAML(net, first_order="yes")


def _grads_and_rows(net):
    out = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    for i, l in enumerate(net.pi_layers):
        rows = l.state.pending_rows()
        out[f"rows{i}"] = None if rows is None else [t.clone() for t in rows]
    return out


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, list):
            assert isinstance(y, list) and all(torch.equal(u, v) for u, v in zip(x, y)), k
        else:
            assert (x is None and y is None) or torch.equal(x, y), k


def test_a_failed_meta_backward_leaves_gradients_and_rows_as_before():
    # It used to keep the meta-gradient of the tasks before the failing one: a following step()
    # then applied half a meta-batch.
    net = _pretrained()
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    maml = MAML(net, step_size=0.5)
    good = _tasks(5, n=2)
    bad = list(good[1])
    bad[2] = bad[2].clone()
    bad[2][0, 0] = float("nan")  # found by the net's forward, after the first task's backward
    maml.meta_backward(good[:1])  # gradients and captured rows that must survive
    before = _grads_and_rows(net)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        maml.meta_backward([good[0], tuple(bad)])
    _equal(before, _grads_and_rows(net))
    with pytest.raises(ValueError, match=r"MAML.meta_step: task 1 has \(9,\) query inputs but \(2,\) query labels"):
        maml.meta_step([good[0], (*good[1][:3], good[1][3][:2])], opt)
    _equal(before, _grads_and_rows(net))  # checked before zero_grad
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        maml.meta_step([good[0], tuple(bad)], opt)
    _equal(before, _grads_and_rows(net))  # put back as before zero_grad
    opt.step()  # applies exactly the first call's meta-gradient
    ref = _pretrained()
    ref_opt = PiOptimizerWrapper(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), ref)
    MAML(ref, step_size=0.5).meta_backward(good[:1])
    ref_opt.step()
    x = good[0][0]
    assert torch.equal(net(x), ref(x))


def test_meta_backward_names_bad_tasks_and_scales():
    net = _infinite()
    maml = MAML(net, num_steps=np.int64(2))
    assert maml.num_steps == 2 and type(maml.num_steps) is int
    tasks = _tasks(3)
    for bad in (float("nan"), -1.0, "x", True):
        with pytest.raises(ValueError, match=rf"MAML.meta_backward: scale must be a finite number >= 0 or None, got {bad!r}"):
            maml.meta_backward(tasks, scale=bad)
    with pytest.raises(TypeError, match=r"MAML.meta_backward: tasks must be a list of \(x_support, y_support, x_query, y_query\), got int"):
        maml.meta_backward(5)
    with pytest.raises(TypeError, match=r"MAML.meta_backward: task 0 must be a tuple of 4 tensors"):
        maml.meta_backward([tasks[0][:3]])
    with pytest.raises(ValueError, match=r"MAML.meta_backward: task 1 has \(6,\) support inputs but \(5,\) support labels"):
        maml.meta_backward([tasks[0], (tasks[1][0], tasks[1][1][:5], *tasks[1][2:])])
    assert all(p.grad is None for p in net.parameters())


def test_infinite_second_order_refuses_non_row_meta_gradients():
    net = _infinite()
    with pytest.raises(NotImplementedError, match="not a set of π-rows"):
        MAML(net, adapt="all").meta_backward(_tasks(7))
    # First order is well defined there, and finite nets are exact in every case.
    MAML(net, adapt="all", first_order=True).meta_backward(_tasks(7))


def _meta_train(net, batches, held, steps):
    maml = MAML(net, step_size=0.5, num_steps=steps, adapt="readout")
    opt = PiOptimizerWrapper(
        torch.optim.SGD(param_groups(net, 0.5, first_layer_lr_mult=0.5), lr=0.5, momentum=0.5), net, [ClipGradNorm(2.0)]
    )
    losses = torch.tensor([maml.meta_step(b, opt)["outer_loss"] for b in batches], dtype=DT)
    outs = []
    for xs, ys, xq, _ in held:
        a = maml.adapt(xs, ys, create_graph=False)
        with torch.no_grad():
            outs.append(maml.forward(a, xq))
    return losses, torch.cat(outs)


def test_finite_maml_tracks_the_infinite_one(one_thread):
    """Finite π-nets sampled from an infinite net and meta-trained side by side (second order,
    K = 2, readout adapted) converge to it: outer-loss curve and held-out adapted outputs."""
    d, r = 12, 16
    batches = [_tasks(100 + i, n=3, d=d) for i in range(5)]
    held = _tasks(999, n=2, d=d)
    net = _infinite(depth=1, d=d, r=r)
    init = copy.deepcopy(net)
    L, O = _meta_train(net, batches, held, 2)
    # ~90 s on 2 cores (the 4096-wide hidden layer); measured 128 -> 2048 is pre-asymptotic (slope -0.18).
    widths, loss_err, out_err = [256, 1024, 4096], [], []
    for w in widths:
        le, oe = [], []
        for s in range(6):
            fin = pinet.sample(init, w, generator=torch.Generator().manual_seed(7 * w + s), dtype=DT)
            Lf, Of = _meta_train(fin, batches, held, 2)
            le.append(float((Lf - L).norm() / L.norm()))
            oe.append(float((Of - O).norm() / O.norm()))
        loss_err.append(geo_mean(le))
        out_err.append(geo_mean(oe))
    # n^-1/2 is the expected rate; -0.35 leaves room for the Ω-sampling noise of 6 draws per width.
    assert fit_slope(widths, loss_err) <= -0.35, loss_err
    assert fit_slope(widths, out_err) <= -0.35, out_err


# ------------------------------------------------------------------------------------------ CLI
from experiments.meta import train as meta_train  # noqa: E402


def _run(args):
    return meta_train.main([str(a) for a in args])


def test_cli_digits_above_chance(tmp_path, one_thread):
    out = tmp_path / "run"
    common = ["unused", "--dataset", "digits", "--num-ways", 5, "--num-shots", 1, "--num-shots-test", 5,
              "--batch-size", 4, "--num-batches", 4, "--num-test-batches", 5, "--infnet-r", 32, "--depth", 1,
              "--normalize", "LN", "--step-size", 0.5, "--meta-lr", 0.5, "--adapt-readout-only", "--no-progress",
              "--output-folder", out]  # fmt: skip
    row = _run(common + ["--num-epochs", 2])
    assert row["test_accuracy"] > 0.4  # chance is 0.2
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"epoch", "train_outer_loss", "test_accuracy", "M_layer1", "M_layer2"} <= set(rows[0])
    assert int(rows[1]["M_layer2"]) > int(rows[0]["M_layer2"]) > 32
    assert (out / "curves.png").stat().st_size > 0 and (out / "model.th").exists()
    # Resume from the checkpoint for one more epoch.
    row3 = _run(common + ["--num-epochs", 3, "--load-model-path", out / "checkpoint.pt"])
    assert row3["epoch"] == 3
    with open(out / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    # Validation of the trained model writes validate.csv and leaves the training run's files as they are
    # (it once replaced log.csv and curves.png with its single row).
    files = {n: (out / n).read_bytes() for n in ("log.csv", "curves.png", "checkpoint.pt")}
    val = _run(common + ["--validate-only", "--load-model-path", out / "model.th"])
    assert val["train_outer_loss"] is None and 0.0 <= val["test_accuracy"] <= 1.0
    assert {n: (out / n).read_bytes() for n in files} == files
    with open(out / "validate.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_cli_finite_and_kernel_baseline(tmp_path, capsys, one_thread):
    common = ["unused", "--dataset", "digits", "--num-ways", 5, "--num-shots", 1, "--num-shots-test", 3,
              "--batch-size", 2, "--num-batches", 2, "--num-test-batches", 2, "--infnet-r", 16, "--depth", 1,
              "--normalize", "LN", "--no-progress"]  # fmt: skip
    row = _run(common + ["--hidden-size", 64, "--num-epochs", 1, "--Gproj-inner", "--Gproj-outer", "--first-order"])
    assert row["rows"] == [] and 0.0 <= row["test_accuracy"] <= 1.0
    res = _run(common + ["--ntk"])
    assert res["kernel"] == "NTK" and res["test_accuracy"] > 0.4


def _write_omniglot(root):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for sub, alphabets in (("images_background", ("Alpha", "Beta")), ("images_evaluation", ("Gamma", "Delta"))):
        for a in alphabets:
            for c in range(3):
                folder = os.path.join(root, "omniglot-py", sub, a, f"character{c + 1:02d}")
                os.makedirs(folder)
                proto = torch.rand(105, 105, generator=gen) > 0.5
                for k in range(4):
                    noise = torch.rand(105, 105, generator=gen) > 0.9
                    img = ((proto ^ noise).numpy() * 255).astype("uint8")
                    Image.fromarray(img, mode="L").save(os.path.join(folder, f"{c}_{k:02d}.png"))


def test_cli_omniglot_folder(tmp_path, one_thread):
    _write_omniglot(str(tmp_path))
    row = _run([tmp_path, "--dataset", "omniglot", "--num-ways", 3, "--num-shots", 1, "--num-shots-test", 2,
                "--batch-size", 2, "--num-batches", 2, "--num-test-batches", 2, "--infnet-r", 16, "--depth", 1,
                "--num-epochs", 1, "--no-progress", "--normalize", "LN", "--test-dataset-split", "test",
                "--adapt-readout-only"])  # fmt: skip
    assert row["epoch"] == 1 and 0.0 <= row["test_accuracy"] <= 1.0


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nothing"
    with pytest.raises(SystemExit) as e:
        _run([missing, "--dataset", "omniglot", "--first-order", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err
    for bad in (["--normalize", "BN"], ["--hidden-size", 8], ["--orig-model"], ["--optimizer", "adam"],
                ["--num-shots-test", 0], ["--meta-lr", -5], ["--meta-momentum", 3], ["--step-size", -1]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            _run(["x", "--dataset", "digits", "--first-order", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and bad[0] in err, err
    # The defaults (second order, adapt all, infinite net) have no π-limit form: refused before the
    # data, the model or the output folder exist (it was once refused at the first meta-step).
    folder = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        _run(["x", "--dataset", "digits", "--output-folder", folder, "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr()
    assert "second-order MAML with adapt='all'" in err.err and "--adapt-readout-only" in err.err
    assert "epoch" not in err.out and not folder.exists()
    # A diverging meta-training run (meta-lr far too large) stops with one line, not a traceback.
    with pytest.raises(SystemExit) as e:
        _run(["x", "--dataset", "digits", "--num-ways", 5, "--num-shots", 1, "--num-shots-test", 3,
              "--batch-size", 2, "--num-batches", 8, "--num-test-batches", 1, "--infnet-r", 16, "--depth", 1,
              "--step-size", 10, "--meta-lr", 1000, "--adapt-readout-only", "--num-epochs", 1, "--no-progress"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err
