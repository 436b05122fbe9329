"""The optional native reduce kernel (:mod:`pinet.native`): exact to float32 rounding against
float64, inside the π-product (forward and every gradient) and through whole training steps; off
unless enabled; clear errors when it cannot be built or is given the wrong tensors."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn import functional as TF

import pinet
from pinet import kernels, native
from pinet.kernels import native as knative
from pinet.hooks import ClipGradNorm
from pinet.optim import PiOptimizerWrapper


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    # Skip only where the prerequisites are missing; a build failure on a capable machine fails.
    cap = torch.backends.cpu.get_cpu_capability()
    if shutil.which("g++") is None or not (cap.startswith("AVX2") or cap.startswith("AVX512")):
        pytest.skip(f"pinet.native needs g++ and AVX2 (capability {cap}, g++ {shutil.which('g++')})")
    native._load()


@pytest.fixture(autouse=True)
def _off_after():
    yield
    kernels.set_backend("auto")


def _rel(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


# Every tail: M below and across the 64-row blocks and the thread split, K below, at and above whole
# 8- and 64-float tiles, n from 1 to 13.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,n,K", [(1, 1, 3), (37, 5, 10), (130, 13, 72), (257, 8, 403), (5000, 8, 400), (64, 4, 64)])
def test_reduce_matches_float64(M, n, K, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(M + n + K)
        V = torch.randn(M, n, generator=gen, dtype=torch.float64)
        X = torch.randn(M, K, generator=gen, dtype=torch.float64)
        start = torch.randn(n, K, generator=gen, dtype=torch.float64)
        out = start.float()
        assert native.reduce_into(out, V.float(), X.float()) is out
        # float32 inputs are rounded at 6e-8; block sums keep the rounding of M = 5000 terms near
        # 1e-7 of the largest entry (observed ≤ 3e-7); a wrong tile or tail is off by O(1).
        ref = start.float().double() + V.float().double().T @ X.float().double()
        assert _rel(out, ref) < 2e-6
    finally:
        torch.set_num_threads(before)


def test_reduce_accepts_a_transposed_V_and_zero_rows():
    V = torch.randn(6, 3).T  # (3, 6) view, not contiguous: V is small, so it is copied
    X = torch.randn(3, 9)
    assert torch.allclose(native.reduce_into(torch.zeros(6, 9), V, X), V.T @ X, atol=1e-5)
    out = torch.ones(2, 4)
    assert torch.equal(native.reduce_into(out, torch.zeros(0, 2), torch.zeros(0, 4)), torch.ones(2, 4))


def test_reduce_rejects_bad_tensors_by_name():
    with pytest.raises(ValueError, match="X must be a contiguous 2-d float32 CPU tensor, got torch.float64"):
        native.reduce_into(torch.zeros(2, 3), torch.zeros(4, 2), torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="X must be a contiguous"):
        native.reduce_into(torch.zeros(2, 4), torch.zeros(3, 2), torch.zeros(4, 3).T)
    with pytest.raises(ValueError, match=r"V must have M = 4 rows like X, got 5"):
        native.reduce_into(torch.zeros(2, 3), torch.zeros(5, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3\), got \(3, 2\)"):
        native.reduce_into(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(4, 3))


def test_off_by_default_and_use_restores_the_setting():
    assert not native.enabled()
    with native.use():
        assert native.enabled()
        with native.use(False):
            assert not native.enabled()
        assert native.enabled()
    assert not native.enabled()
    native.enable()
    assert native.enabled()
    native.disable()
    assert not native.enabled()


@pytest.mark.parametrize("chunk", [None, 700])
def test_pi_product_and_all_gradients_match_torch_path(chunk):
    # float32 with the kernel vs float32 without it vs float64: both float32 paths are within
    # float32 rounding of float64 (observed ≤ 3e-6 for torch's path, which sums M terms in one go).
    gen = torch.Generator().manual_seed(3)
    M, r, r_out, b = 2501, 48, 12, 8
    g64 = torch.randn(b, r, generator=gen, dtype=torch.float64)
    A64 = torch.randn(M, r_out, generator=gen, dtype=torch.float64)
    B64 = TF.normalize(torch.randn(M, r, generator=gen, dtype=torch.float64), dim=1)
    c64 = torch.randn(M, generator=gen, dtype=torch.float64)
    weight = torch.linspace(-1, 1, b * r_out, dtype=torch.float64).reshape(b, r_out)

    def run(dtype, on):
        ins = [t.to(dtype, copy=True).requires_grad_() for t in (g64, A64, B64, c64)]
        with kernels.use_backend("native" if on else "torch"):
            out = kernels.pi_layer(*ins, chunk_size=chunk)[0]
            (out * weight.to(dtype)).sum().backward()
        return [out.detach()] + [t.grad for t in ins]

    ref = run(torch.float64, False)
    for on in (False, True):
        for got, want in zip(run(torch.float32, on), ref):
            assert _rel(got, want) < 1e-5


def test_native_only_serves_float32_cpu():
    # float64 products take torch's path even when enabled: identical bits either way.
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    A = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    B = TF.normalize(torch.randn(300, 16, generator=gen, dtype=torch.float64), dim=1)
    c = torch.randn(300, generator=gen, dtype=torch.float64)
    off = kernels.pi_layer(g, A, B, c)[0]
    with native.use():
        on = kernels.pi_layer(g, A, B, c)[0]
    assert torch.equal(on, off)


def test_training_with_native_matches_training_without():
    def train(on):
        torch.manual_seed(0)
        net = pinet.InfPiMLP(20, 3, r=8, depth=2)
        opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net,
                                 hooks=[ClipGradNorm(0.5, per_param=True)])  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        with kernels.use_backend("native" if on else "torch"):
            for _ in range(30):
                x, y = torch.randn(8, 20, generator=gen), torch.randint(0, 3, (8,), generator=gen)
                opt.zero_grad()
                TF.cross_entropy(net(x), y).backward()
                opt.step()
            return net(torch.randn(16, 20, generator=gen)).detach()

    off, on = train(False), train(True)
    # 30 steps of float32 with different summation orders; the trajectories agree to ~1e-6.
    assert _rel(on, off.double()) < 1e-4


def test_missing_compiler_raises_instead_of_falling_back(monkeypatch, tmp_path):
    monkeypatch.setattr(knative, "_lib", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("PINET_CACHE", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match=r"g\+\+ \(or \$CXX\); none found"):
        native.enable()
    assert not native.enabled()


def test_build_failure_is_reported_with_the_compiler_output(monkeypatch, tmp_path):
    monkeypatch.setattr(knative, "_lib", None)
    monkeypatch.setattr(knative, "_SOURCE", knative._SOURCE + "\nthis is not C++;\n")
    monkeypatch.setenv("PINET_CACHE", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match="compiling the kernel with .* failed"):
        native.enable()
    assert not list(tmp_path.glob("*.so"))  # nothing half-built is left for the next process


def test_built_kernel_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(knative, "_lib", None)
    monkeypatch.setenv("PINET_CACHE", str(tmp_path))
    knative._load()
    (so,) = tmp_path.glob("pinet_native_*.so")
    stamp = so.stat().st_mtime_ns
    monkeypatch.setattr(knative, "_lib", None)
    knative._load()  # a second process (here: a reset module) reuses the file
    assert so.stat().st_mtime_ns == stamp


def test_bench_step_native_quick_smoke(tmp_path):
    from benchmarks import bench_step

    res = bench_step.main(["--quick", "--native", "--repeats", "2", "--threads", "1", "--out", str(tmp_path)])
    assert res["config"]["native"] is True
    assert not native.enabled()  # the benchmark restores the setting
    text = (tmp_path / "bench_step_float32_native.md").read_text()
    assert "pinet.native on" in text
    assert res["chunk_check"]["out_rel_diff"] < 1e-5


def _train_log(argv, tmp_path, name):
    import csv

    from experiments import train

    train.main(argv + ["--save-dir", str(tmp_path / name)])
    with open(tmp_path / name / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_main_job_native_flag_trains_the_same_net(tmp_path):
    fast = "--train-subset 300 --test-subset 200 --r 32 --batch-size 16 --epochs 2 --no-progress".split()
    off = _train_log(fast, tmp_path, "off")
    on = _train_log(fast + ["--native"], tmp_path, "on")
    assert not native.enabled()  # the job restores the setting
    for a, b in zip(off, on):
        # float32 runs that differ only in the summation order of two products per π-layer
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert a["M_layer1"] == b["M_layer1"]


def test_main_job_native_flag_is_a_clear_error_when_unavailable(monkeypatch, tmp_path, capsys):
    from experiments import train

    monkeypatch.setattr(knative, "_lib", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "1", "--no-progress", "--native"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m experiments.train: error: --native: pinet.native compiles its kernel")
