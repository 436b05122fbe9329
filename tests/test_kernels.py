"""Kernel dispatch (:mod:`pinet.kernels`): the layering, the backend switch and its errors, and
every backend against the float64 reference formula :func:`pinet.functional.pi_product`."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as TF

import pinet
from pinet import functional as F
from pinet import kernels
from pinet.kernels import native as knative

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64


@pytest.fixture(autouse=True)
def _auto_after():
    yield
    kernels.set_backend("auto")


def _native_ok() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    return shutil.which("g++") is not None and (cap.startswith("AVX2") or cap.startswith("AVX512"))


# --------------------------------------------------------------------------- layering
def test_functional_is_math_only():
    # functional.py imports torch and the standard library only: no kernel, state or layer module.
    tree = ast.parse((ROOT / "pinet" / "functional.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add("." * node.level + (node.module or ""))
    assert mods <= {"__future__", "math", "torch"}, mods


def test_functional_pi_layer_points_to_its_new_home():
    with pytest.raises(AttributeError, match=r"moved to pinet.kernels.pi_layer"):
        F.pi_layer  # noqa: B018


# --------------------------------------------------------------------------- the switch
def test_default_backend_is_visible_and_torch_is_always_available():
    assert kernels.setting() == "auto"
    # The fused kernel where it can be built (it can wherever g++ and AVX2 are: the skip
    # conditions of test_native.py), torch's products on CUDA.
    assert kernels.backend() == kernels.backend("cpu") == ("fused" if _native_ok() else "torch")
    assert kernels.backend(torch.device("cuda", 0)) == "torch"
    assert {"auto", "torch"} <= set(kernels.available_backends())


def test_auto_falls_back_to_torch_visibly_where_fused_cannot_be_built(monkeypatch, tmp_path):
    monkeypatch.setattr(knative, "_fused_libs", {})
    monkeypatch.setattr(knative, "_fused_isa", None)
    monkeypatch.setattr(kernels, "_auto_choice", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("PINET_CACHE", str(tmp_path))
    assert kernels.backend() == "torch"
    assert "none found on PATH" in kernels.unavailable_reason("fused")


def test_set_backend_forces_and_use_backend_restores():
    kernels.set_backend("torch")
    assert kernels.setting() == "torch" and kernels.backend() == "torch"
    with kernels.use_backend("auto"):
        assert kernels.setting() == "auto"
        with pytest.raises(RuntimeError), kernels.use_backend("torch"):
            raise RuntimeError("inside")
        assert kernels.setting() == "auto"  # restored after an exception too
    assert kernels.setting() == "torch"


def test_unknown_backend_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'native', 'fused', 'triton'\), got 'cuda'"):
        kernels.set_backend("cuda")
    assert kernels.setting() == "auto"


def _layer_args(**over):
    args = {"g": torch.randn(3, 4), "A": torch.randn(5, 2), "B": torch.randn(5, 4), "c": torch.randn(5)}
    args.update(over)
    return args


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    ("over", "chunk", "error", "match"),
    [
        ({"g": torch.randn(4)}, None, ValueError, r"g must be 2-d, got shape \(4,\)"),
        ({"g": torch.ones(3, 4, dtype=torch.int64)}, None, TypeError, r"g must be a real floating-point tensor, got torch.int64"),
        ({"g": [[1.0] * 4] * 3}, None, TypeError, r"g must be a tensor, got list"),
        ({"B": torch.randn(5, 3)}, None, ValueError, r"one r and one M, got g \(3, 4\), A \(5, 2\), B \(5, 3\), c \(5,\)"),
        ({"c": torch.randn(6)}, None, ValueError, r"one r and one M, .*c \(6,\)"),
        ({"A": torch.randn(6, 2)}, None, ValueError, r"one r and one M, .*A \(6, 2\)"),
        ({"c": torch.randn(5, 1)}, None, ValueError, r"c must be 1-d, got shape \(5, 1\)"),
        ({"A": torch.randn(5, 2, dtype=D)}, None, TypeError, r"A and B must have one storage dtype, got torch.float64 and torch.float32"),
        ({}, "3", ValueError, r"chunk_size must be a positive int or None, got '3'"),
        ({}, True, ValueError, r"chunk_size must be a positive int or None, got True"),
        ({}, 0, ValueError, r"chunk_size must be a positive int or None, got 0"),
    ],
)
def test_pi_layer_names_a_wrong_argument_on_every_backend(backend, over, chunk, error, match):
    # The same clear error whichever backend would have computed (not a backend's own message or
    # a shape error from deep inside torch).
    with kernels.use_backend(backend), pytest.raises(error, match=r"pinet\.kernels\.pi_layer: .*" + match):
        kernels.pi_layer(**_layer_args(**over), chunk_size=chunk)


def test_pi_layer_accepts_integral_chunk_sizes():
    import numpy as np

    args = _layer_args()
    full = kernels.pi_layer(**args)[0]
    for chunk in (2, np.int64(2)):
        assert torch.allclose(kernels.pi_layer(**args, chunk_size=chunk)[0], full, rtol=1e-5, atol=1e-6)


def test_compile_step_refuses_a_non_callable():
    with pytest.raises(TypeError, match=r"compile_step: fn must be a callable, got int"):
        kernels.compile_step(5)


def test_forcing_triton_without_a_gpu_raises_and_changes_nothing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kernels.set_backend("torch")
    with pytest.raises(kernels.BackendUnavailable, match=r"backend 'triton' runs on CUDA devices and no CUDA device"):
        kernels.set_backend("triton")
    assert kernels.setting() == "torch"
    assert "triton" not in kernels.available_backends()


def test_forcing_native_without_a_compiler_raises_and_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(knative, "_lib", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("PINET_CACHE", str(tmp_path))
    with pytest.raises(kernels.BackendUnavailable, match=r"pinet.native compiles its kernel with g\+\+"):
        kernels.set_backend("native")
    assert kernels.setting() == "auto"
    assert kernels.unavailable_reason("native").startswith("pinet.native compiles")


def test_pinet_native_switch_is_the_native_backend():
    if not _native_ok():
        pytest.skip("pinet.native needs g++ and AVX2")
    with pinet.native.use():
        assert kernels.setting() == "native" and kernels.backend() == "native" and pinet.native.enabled()
        with pinet.native.use(False):
            assert kernels.setting() == "auto"
        assert kernels.setting() == "native"
    assert kernels.setting() == "auto"
    with kernels.use_backend("torch"):
        pinet.native.disable()  # leaves a backend other than native alone
        assert kernels.setting() == "torch"


def test_layers_use_the_selected_backend(monkeypatch):
    # InfPiLayer goes through kernels.pi_layer, so the switch reaches a model's training step.
    calls = []
    real = kernels.torch_ops.pi_product
    monkeypatch.setattr(kernels.torch_ops, "pi_product", lambda *a: calls.append(a[5:]) or real(*a))
    net = pinet.InfPiMLP(6, 2, r=4, depth=1)
    with kernels.use_backend("torch"):
        net(torch.randn(3, 6)).sum().backward()
    assert calls == [(), ()]  # two π-layers, torch's reduce (the default argument)
    if _native_ok():
        calls.clear()
        with kernels.use_backend("native"):
            net(torch.randn(3, 6)).sum().backward()
        assert calls == [(kernels.torch_ops.native_reduce,)] * 2
        from pinet.kernels import fused

        seen = []
        whole = fused.whole_layer
        monkeypatch.setattr(fused, "whole_layer", lambda *a: seen.append(a[0].dtype) or whole(*a))
        calls.clear()
        net(torch.randn(3, 6)).sum().backward()  # auto: the fused kernel, the whole layer in one call
        assert seen == [torch.float32] * 2 and calls == []


# --------------------------------------------------------------------------- triton (interpreter)
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when pinet.kernels.triton_pi is
# imported, so the interpreted runs happen in one subprocess that sets it before any import; this
# process computes the float64 references. Cases: (b, r, r_out, M, storage, programs) with odd
# M and b, M below one row block, a single program, more programs than blocks, and M = 0.
TRITON_CASES = [
    (3, 5, 7, 37, "float32", None),
    (5, 20, 3, 101, "float32", 1),
    (1, 16, 16, 16, "float32", None),
    (8, 40, 10, 300, "float32", 50),
    (7, 33, 17, 129, "float32", 2),
    (2, 9, 4, 0, "float32", None),
    (5, 24, 6, 97, "bfloat16", None),
    (3, 12, 5, 61, "float16", None),
]

_TRITON_SCRIPT = r"""
import os, sys
assert os.environ["TRITON_INTERPRET"] == "1"
import torch
from torch.nn import functional as TF
import pinet
from pinet import kernels
from pinet.kernels import triton_pi
from pinet.hooks import ClipGradNorm
from pinet.optim import PiOptimizerWrapper

cases, out = eval(sys.argv[1]), sys.argv[2]
res = {"available": kernels.available_backends()}
for k, (b, r, r_out, M, storage, programs) in enumerate(cases):
    gen = torch.Generator().manual_seed(k)
    g = TF.normalize(torch.randn(b, r, generator=gen, dtype=torch.float64), dim=1)
    A = torch.randn(M, r_out, generator=gen, dtype=torch.float64)
    B = TF.normalize(torch.randn(M, r, generator=gen, dtype=torch.float64), dim=1)
    c = torch.randn(M, generator=gen, dtype=torch.float64)
    d = torch.randn(b, r_out, generator=gen, dtype=torch.float64)
    st = getattr(torch, storage)
    ins = [g.float(), A.to(st), B.to(st), c.float()]
    u = triton_pi.forward(*ins, programs=programs)
    grads = triton_pi.backward(*ins, d.float(), (True,) * 4, programs=programs)
    only_g = triton_pi.backward(*ins, d.float(), (True, False, False, False), programs=programs)
    res[k] = {"inputs": [g, A, B, c, d], "rounded": [t.double() for t in ins], "u": u, "grads": grads,
              "only_g": only_g}

# Through pinet.kernels.pi_layer and autograd (layernorm and not) and a small training run: the
# triton backend against the torch backend, both float32.
gen = torch.Generator().manual_seed(99)
x = torch.randn(5, 12, generator=gen)
A = torch.randn(45, 6, generator=gen)
B = TF.normalize(torch.randn(45, 12, generator=gen), dim=1)
c = torch.randn(45, generator=gen)
for ln in (False, True):
    for name in ("torch", "triton"):
        ins = [t.clone().requires_grad_() for t in (x, A, B, c)]
        with kernels.use_backend(name):
            o = kernels.pi_layer(*ins, layernorm=ln)[0]
        o.pow(2).sum().backward()
        res[f"layer_{ln}_{name}"] = [o.detach()] + [t.grad for t in ins]

def train(name):
    torch.manual_seed(0)
    net = pinet.InfPiMLP(10, 3, r=8, depth=2)
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net,
                             hooks=[ClipGradNorm(0.5, per_param=True)])
    gen = torch.Generator().manual_seed(1)
    with kernels.use_backend(name):
        for _ in range(6):
            xb, yb = torch.randn(7, 10, generator=gen), torch.randint(0, 3, (7,), generator=gen)
            opt.zero_grad()
            TF.cross_entropy(net(xb), yb).backward()
            opt.step()
        return net(torch.randn(9, 10, generator=gen)).detach()

res["train_torch"], res["train_triton"] = train("torch"), train("triton")
torch.save(res, out)
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton") / "res.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, repr(TRITON_CASES), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def _rel(got, ref):
    if ref.numel() == 0:
        return 0.0
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _reference(g, A, B, c, d, needs=(True,) * 4):
    ins = [t.clone().requires_grad_(n) for t, n in zip((g, A, B, c), needs)]
    u = F.pi_product(*ins)
    grads = torch.autograd.grad(u, [t for t in ins if t.requires_grad], d, allow_unused=True)
    return u.detach(), grads


@pytest.mark.parametrize("case", range(len(TRITON_CASES)), ids=[str(c) for c in TRITON_CASES])
def test_triton_forward_and_four_gradients_match_float64(triton_results, case):
    res = triton_results[case]
    storage = getattr(torch, TRITON_CASES[case][4])
    d = res["inputs"][4]
    # Half storage: compare with the formula on the rounded rows (the kernel computes in float32).
    rg, rA, rB, rc = res["rounded"]
    u, grads = _reference(rg, rA, rB, rc, d.float().double())
    # float32 products of ≤ 40 terms and float32 sums of ≤ 300 rows: observed ≤ 3e-7 of the
    # largest entry; 2e-6 is float32 rounding with margin, a wrong tile or mask is off by O(1).
    assert _rel(res["u"], u) < 2e-6
    for name, got, want in zip("gABc", res["grads"], grads):
        assert got.shape == want.shape, name
        assert got.dtype == (storage if name in "AB" else torch.float32), name
        # Gradients for A and B come back in the storage dtype: for half storage compare to
        # that dtype's rounding (bf16 eps 2^-8, fp16 2^-11), else float32 rounding.
        tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}.get(got.dtype, 2e-6)
        assert _rel(got, want) < tol, (name, _rel(got, want))
    only = res["only_g"]
    assert only[1:] == (None, None, None)
    assert _rel(only[0], grads[0]) < 2e-6


def test_triton_backend_through_pi_layer_equals_torch_backend(triton_results):
    assert "triton" in triton_results["available"]
    for ln in (False, True):
        for got, want in zip(triton_results[f"layer_{ln}_triton"], triton_results[f"layer_{ln}_torch"]):
            assert _rel(got, want.double()) < 2e-6


def test_triton_training_run_equals_torch_backend(triton_results):
    # 6 wrapped-SGD steps in float32 that differ only in summation order: agree to ~1e-6.
    assert _rel(triton_results["train_triton"], triton_results["train_torch"].double()) < 1e-4


def test_triton_kernel_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from pinet.kernels import triton_pi

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    A = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"backend 'triton' runs on CUDA tensors, got tensors on cpu"):
        triton_pi.pi_product(torch.randn(2, 5), A, torch.randn(4, 5), torch.randn(4))
    with pytest.raises(ValueError, match=r"g must be float32 .* got torch.float64"):
        triton_pi.pi_product(torch.randn(2, 5, dtype=D), A, torch.randn(4, 5), torch.randn(4))


def test_triton_kernels_compile_for_an_h100_class_gpu():
    # The interpreter runs the kernels' semantics, not the GPU compiler: compile both for sm_90
    # (H100/H200) with Triton's own toolchain (no GPU needed) at the benchmark's shape, bfloat16
    # rows of r = 400 (tiles padded to 512), every gradient, so a construct the compiler rejects
    # fails here and not on a user's first GPU run.
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pinet.kernels import triton_pi

    if triton_pi._fwd_kernel.__class__.__name__ != "JITFunction":
        pytest.skip("TRITON_INTERPRET is set in this process")
    ints = {n: "i32" for n in ("M", "b", "r", "r_out", "stride_a", "stride_b", "blocks_per_prog")}
    tiles = dict(BLOCK_M=32, BLOCK_B=16, R_PAD=512, RO_PAD=512)
    for kernel, ptrs, flags in (
        (triton_pi._fwd_kernel, ("g_ptr", "A_ptr", "B_ptr", "c_ptr", "part_ptr"), {}),
        (triton_pi._bwd_kernel, ("g_ptr", "d_ptr", "A_ptr", "B_ptr", "c_ptr", "gA_ptr", "gB_ptr", "gc_ptr", "part_ptr"),
         dict(NEED_G=True, NEED_A=True, NEED_B=True, NEED_C=True)),
    ):  # fmt: skip
        consts = {**flags, **tiles}
        sig = {p: ("*bf16" if p in ("A_ptr", "B_ptr") else "*fp32") for p in ptrs}
        sig.update(ints, inv_two_pi="fp32", **{k: "constexpr" for k in consts})
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 8})  # fmt: skip
        except FileNotFoundError as e:  # a Triton build without the NVIDIA toolchain (ptxas)
            pytest.skip(f"Triton's CUDA toolchain is missing: {e}")
        assert "cubin" in compiled.asm


# --------------------------------------------------------------------------- torch.compile
def _compiled_training(compile_backend, steps=6):
    from pinet.optim import PiOptimizerWrapper

    def run(compiled):
        torch.manual_seed(0)
        net = pinet.InfPiMLP(10, 3, r=8, depth=2)
        opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
        loss_fn = lambda x, y: TF.cross_entropy(net(x), y)
        if compiled:
            loss_fn = kernels.compile_step(loss_fn, backend=compile_backend)
        gen = torch.Generator().manual_seed(1)
        losses, graphs = [], []
        for _ in range(steps):
            x, y = torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            loss = loss_fn(x, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        rows = [layer.state.rows for layer in net.pi_layers]
        return losses, graphs, rows, net(torch.randn(5, 10, generator=gen)).detach()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = run(True)
    finally:
        torch._dynamo.reset()
    return compiled, run(False)


def _check_compiled(compiled, eager):
    (losses_c, graphs, rows_c, out_c), (losses_e, _, rows_e, out_e) = compiled, eager
    assert rows_c == rows_e == [56, 56, 56]  # M grew by the batch at every step (8 rows at init)
    # Dynamo compiles at step 1 and once more when M first changes (it then makes M symbolic);
    # from step 3 on, M grows with no new graph.
    assert graphs[2] == graphs[-1], graphs
    # float32, the same kernels in a different op order: equal to rounding.
    assert losses_c == pytest.approx(losses_e, rel=1e-5)
    assert _rel(out_c, out_e.double()) < 1e-5


def test_compiled_training_step_does_not_recompile_as_m_grows(one_thread):
    # aot_eager: Dynamo + AOTAutograd (the custom operator's fake and autograd rules) without
    # inductor's C++ code generation, which takes ~30 s on 2 cores (slow profile below).
    _check_compiled(*_compiled_training("aot_eager"))


@pytest.mark.slow
def test_inductor_compiled_training_step_does_not_recompile_as_m_grows(one_thread):
    _check_compiled(*_compiled_training("inductor"))


def test_compiled_pi_layer_custom_op_gives_all_four_gradients(one_thread, monkeypatch):
    # The custom operator's autograd rule against the float64 formula, chunked and not.
    from pinet.kernels import ops

    calls = []
    real = ops._run_forward
    monkeypatch.setattr(ops, "_run_forward", lambda *a: calls.append(a[-2:]) or real(*a))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, generator=gen, dtype=D)
    A, c = torch.randn(29, 4, generator=gen, dtype=D), torch.randn(29, generator=gen, dtype=D)
    B = TF.normalize(torch.randn(29, 6, generator=gen, dtype=D), dim=1)
    d = torch.randn(3, 4, generator=gen, dtype=D)
    ref = [t.clone().requires_grad_() for t in (x, A, B, c)]
    out = F.normalize_rows(ref[0])[0] * F.pi_product(F.normalize_rows(ref[0])[1], *ref[1:])
    want = [out.detach()] + list(torch.autograd.grad(out, ref, d))
    torch._dynamo.reset()
    try:
        for chunk in (None, 8):
            f = kernels.compile_step(lambda *a, chunk=chunk: kernels.pi_layer(*a, chunk_size=chunk)[0],
                                     backend="aot_eager")  # fmt: skip
            ins = [t.clone().requires_grad_() for t in (x, A, B, c)]
            got = f(*ins)
            for g, w in zip([got.detach()] + list(torch.autograd.grad(got, ins, d)), want):
                assert torch.allclose(g, w, rtol=0, atol=1e-12)
        # the compiled graphs ran the custom operator, on the default backend (float64: torch's products)
        assert calls == [(None, kernels.backend()), (8, kernels.backend())]
    finally:
        torch._dynamo.reset()


def test_bench_step_reports_each_backend(tmp_path, one_thread):
    from benchmarks import bench_step

    res = bench_step.main(["--quick", "--backends", "torch", "--repeats", "2", "--check-chunk", "0",
                           "--out", str(tmp_path)])  # fmt: skip
    assert all(set(r["extra"]["backend_step_ms"]) == {"torch"} for r in res["rows"])
    text = (tmp_path / "bench_step_float32.md").read_text()
    assert "| backend | M | step ms | roofline floor ms | step/roofline | speed-up over naive |" in text
    assert f"| default ({kernels.backend()}) | 64 |" in text and "| torch | 256 |" in text
    assert kernels.setting() == "auto"  # the benchmark restores the setting


# --------------------------------------------------------------------------- fused CPU kernel
needs_native = pytest.mark.skipif(not _native_ok(), reason="the fused kernel needs g++ and AVX2")


def _isas() -> list[str]:
    return [isa for isa in knative.FUSED_ISAS if knative._isa_reason(isa) is None] if _native_ok() else []


@pytest.fixture(params=_isas() or ["none"])
def isa(request):
    """Each instruction set the fused kernels can run with here (AVX-512 and AVX2 on an AVX-512
    CPU), restored afterwards."""
    if request.param == "none":
        pytest.skip("the fused kernel needs g++ and AVX2")
    before = knative.fused_isa()
    knative.set_fused_isa(request.param)
    yield request.param
    knative.set_fused_isa(before)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize(
    "b,r,r_out,M",
    [(3, 5, 7, 37), (1, 9, 3, 1), (7, 33, 17, 129), (8, 64, 10, 2501), (5, 20, 10, 0), (9, 100, 61, 300),
     (12, 50, 400, 200)],
)  # fmt: skip
def test_fused_forward_and_four_gradients_match_float64(b, r, r_out, M, chunk, threads, isa):
    # Every tail: M below/across the 64-row blocks and the thread split, r and r_out below, at and
    # above whole 8-, 16-, 24- and 48-float tiles, b below, at and above 4 and 8 batch columns.
    from pinet.kernels import fused

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(M + r)
        g = TF.normalize(torch.randn(b, r, generator=gen, dtype=D), dim=1)
        A, c = torch.randn(M, r_out, generator=gen, dtype=D), torch.randn(M, generator=gen, dtype=D)
        B = TF.normalize(torch.randn(M, r, generator=gen, dtype=D), dim=1)
        d = torch.randn(b, r_out, generator=gen, dtype=D)
        ins32 = [t.float().requires_grad_() for t in (g, A, B, c)]
        u = fused.pi_product(*ins32, chunk)
        got = [u.detach()] + list(torch.autograd.grad(u, ins32, d.float()))
        want_u, want_g = _reference(*(t.float().double() for t in (g, A, B, c)), d.float().double())
        # float32 rounding (observed ≤ 3.5e-7 of the largest entry); a wrong tile, mask or
        # thread partial is off by O(1).
        for name, x, y in zip(("u", "g", "A", "B", "c"), got, [want_u, *want_g]):
            assert x.dtype == torch.float32 and x.shape == y.shape, name
            assert _rel(x, y) < 2e-6, (name, _rel(x, y))
        only = torch.autograd.grad(fused.pi_product(ins32[0], *(t.detach() for t in ins32[1:]), chunk), ins32[0],
                                   d.float())[0]  # fmt: skip
        assert _rel(only, want_g[0]) < 2e-6  # the training case: ∂ḡ alone, the fused backward
    finally:
        torch.set_num_threads(before)


def _layer_reference(g, A, B, c, layernorm, w_out, w_s, w_gbar):
    # pi_layer's composite (normalize_rows, the formula, the scale) in float64, and the gradient
    # of <w_out, out> + <w_s, s> + <w_gbar, ḡ> with respect to g.
    g = g.clone().requires_grad_()
    s, gbar = F.normalize_rows(g)
    if layernorm:
        s = torch.ones_like(s)
    out = s * F.pi_product(gbar, A, B, c)
    loss = (out * w_out).sum() + (gbar * w_gbar).sum() + ((s * w_s).sum() if not layernorm else 0)
    return out.detach(), s.detach(), gbar.detach(), torch.autograd.grad(loss, g)[0]


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("b,r,r_out,M", [(3, 5, 7, 37), (1, 9, 3, 1), (8, 64, 10, 2501), (5, 20, 10, 0), (9, 100, 61, 300)])
def test_fused_whole_layer_matches_float64(b, r, r_out, M, layernorm, chunk, threads, isa):
    # In training (constant rows and coefficients) pi_layer runs normalisation, product and scale
    # as one fused call each way (FusedPiLayer); its three outputs and the gradient through all
    # three, raw g with a zero row included, must equal the float64 composite.
    from pinet.kernels import fused

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(M + 3 * r + b)
        g = 3 * torch.randn(b, r, generator=gen, dtype=D)
        if b > 2:
            g[1] = 0  # a zero row: s = 0, ḡ = 0, as the composite gives
        A, c = torch.randn(M, r_out, generator=gen, dtype=D), torch.randn(M, generator=gen, dtype=D)
        B = TF.normalize(torch.randn(M, r, generator=gen, dtype=D), dim=1)
        ws = [torch.randn(b, k, generator=gen, dtype=D) for k in (r_out, 1, r)]
        if b > 2:
            # The zero row's ∂g is (w_ḡ + the product's backward of w_out with layernorm) / tiny:
            # small weights keep it below float32's largest value.
            ws[0][1] *= 1e-2
            ws[2][1] *= 1e-2
        g, A, B, c, *ws = (t.float().double() for t in (g, A, B, c, *ws))
        want = _layer_reference(g, A, B, c, layernorm, *ws)
        gr = g.float().requires_grad_()
        with kernels.use_backend("fused"):
            out, s, gbar = kernels.pi_layer(gr, A.float(), B.float(), c.float(), layernorm=layernorm, chunk_size=chunk)
        assert type(out.grad_fn) is fused.FusedPiLayer._backward_cls
        loss = (out * ws[0].float()).sum() + (gbar * ws[2].float()).sum() + ((s * ws[1].float()).sum() if not layernorm else 0)
        got = (out.detach(), s.detach(), gbar.detach(), torch.autograd.grad(loss, gr)[0])
        live = [i for i in range(b) if not (b > 2 and i == 1)]
        for name, x, y in zip(("out", "s", "ḡ", "∂g"), got, want):
            assert x.dtype == torch.float32 and x.shape == y.shape, name
            # float32 rounding (observed ≤ 1e-7 of the largest entry); a wrong scale, sign or
            # projection term is off by O(1).
            assert _rel(x[live], y[live]) < 2e-6, (name, _rel(x[live], y[live]))
        if b > 2:
            # The zero row's ∂g is w_ḡ / tiny, tiny being the dtype's smallest normal: compare it
            # with torch's float32 composite rather than float64's.
            g2 = g.float().requires_grad_()
            with kernels.use_backend("torch"):
                o2, s2, gb2 = kernels.pi_layer(g2, A.float(), B.float(), c.float(), layernorm=layernorm, chunk_size=chunk)
            loss2 = (o2 * ws[0].float()).sum() + (gb2 * ws[2].float()).sum() + ((s2 * ws[1].float()).sum() if not layernorm else 0)
            zero = torch.autograd.grad(loss2, g2)[0][1]
            assert torch.isfinite(got[3][1]).all() and _rel(got[3][1], zero.double()) < 2e-6
            assert got[1][1].item() == (1.0 if layernorm else 0.0) and not got[2][1].any()
        with torch.no_grad(), kernels.use_backend("fused"):  # the forward alone, no autograd node
            again = kernels.pi_layer(gr, A.float(), B.float(), c.float(), layernorm=layernorm, chunk_size=chunk)
        assert all(torch.equal(x, y) for x, y in zip(again, got[:3]))
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("layernorm", [False, True])
def test_fused_whole_layer_double_backward_equals_torch_backend(layernorm):
    # create_graph=True differentiates the rebuilt composite: the same second derivatives as the
    # torch backend's, to float32 rounding.
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(4, 12, generator=gen)
    A, c = torch.randn(300, 6, generator=gen), torch.randn(300, generator=gen)
    B = TF.normalize(torch.randn(300, 12, generator=gen), dim=1)
    res = {}
    for name in ("fused", "torch"):
        gr = g.clone().requires_grad_()
        with kernels.use_backend(name):
            out, s, _ = kernels.pi_layer(gr, A, B, c, layernorm=layernorm)
            (first,) = torch.autograd.grad((out**2).sum() + s.sum(), gr, create_graph=True)
            (second,) = torch.autograd.grad((first**2).sum(), gr)
        res[name] = (first.detach().double(), second.double())
    assert _rel(res["fused"][0], res["torch"][0]) < 1e-5 and _rel(res["fused"][1], res["torch"][1]) < 1e-5


@needs_native
def test_fused_whole_layer_only_for_constant_rows():
    # Gradients for A, B or c (meta-learning, tests) keep the product's own autograd function,
    # with the normalisation around it from torch ops.
    from pinet.kernels import fused

    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 8, generator=gen).requires_grad_()
    A, c = torch.randn(50, 4, generator=gen), torch.randn(50, generator=gen)
    B = TF.normalize(torch.randn(50, 8, generator=gen), dim=1)
    with kernels.use_backend("fused"):
        assert type(kernels.pi_layer(g, A, B, c)[0].grad_fn) is fused.FusedPiLayer._backward_cls
        out = kernels.pi_layer(g, A, B, c.clone().requires_grad_())[0]
    assert type(out.grad_fn) is not fused.FusedPiLayer._backward_cls


@needs_native
@pytest.mark.parametrize("k,r,r_out", [(8, 400, 400), (1, 3, 5), (13, 37, 10), (16, 400, 10)])
def test_fused_rows_sqnorm_matches_float64(k, r, r_out):
    # The optimizer's ‖Δ‖² of π-rows in one fused call (double sums) on the fused backend.
    gen = torch.Generator().manual_seed(k + r)
    A, c = torch.randn(k, r_out, generator=gen), torch.rand(k, generator=gen)
    B = TF.normalize(torch.randn(k, r, generator=gen), dim=1)
    B[0] = B[-1]  # a repeated row: its cosine is 1 up to rounding, which may exceed 1
    for coef in (c, None):
        want = F.pi_rows_sqnorm(A.double(), B.double(), None if coef is None else coef.double())
        with kernels.use_backend("fused"):
            got = kernels.rows_sqnorm(A, B, coef)
            assert got.dtype == torch.float32 and got.dim() == 0
            assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))  # float32 rounding of the result
            if coef is not None:  # what the optimizer's norm hooks call
                assert torch.equal(pinet.PiRows(A, B, coef).sqnorm(), got)
        with kernels.use_backend("torch"):  # the switch reaches it: torch's ops, bit for bit
            assert torch.equal(kernels.rows_sqnorm(A, B, coef), F.pi_rows_sqnorm(A, B, coef))
    Ag = A.clone().requires_grad_()
    with kernels.use_backend("fused"):  # rows that need a gradient: the differentiable composite
        (grad,) = torch.autograd.grad(kernels.rows_sqnorm(Ag, B, c), Ag)
    assert torch.equal(grad, torch.autograd.grad(F.pi_rows_sqnorm(Ag, B, c), Ag)[0])
    with pytest.raises(ValueError, match="rows_sqnorm: expected A"):
        knative.rows_sqnorm(A, B[:-1].contiguous() if k > 1 else torch.randn(2, r), c)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("b,d,r", [(8, 3072, 400), (1, 5, 3), (3, 37, 70), (13, 100, 129), (32, 64, 17)])
def test_fused_thin_matmul_and_its_gradients_match_float64(b, d, r, threads, isa):
    # The finite input layer's x @ W and xᵀ δ in the fused library: 64- and 16-column tiles and
    # their tails, 64-row blocks of W across the thread split, b = 1 to THIN_ROWS.
    from pinet.kernels import fused

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(b * d + r)
        x, W, d_out = (torch.randn(*shape, generator=gen) for shape in ((b, d), (d, r), (b, r)))
        xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
        out = kernels.thin_matmul(xr, Wr)
        assert type(out.grad_fn) is fused.FusedThinMatmul._backward_cls
        gx, gW = torch.autograd.grad(out, (xr, Wr), d_out)
        x64, W64, d64 = x.double(), W.double(), d_out.double()
        # float32 rounding (observed ≤ 3e-7 of the largest entry); a wrong tile or tail is O(1) off.
        for got, want in ((out.detach(), x64 @ W64), (gx, d64 @ W64.T), (gW, x64.T @ d64)):
            assert got.dtype == torch.float32 and _rel(got, want) < 2e-6, _rel(got, want)
        with torch.no_grad():  # the forward alone
            assert torch.equal(kernels.thin_matmul(x, W), out.detach())
    finally:
        torch.set_num_threads(before)


@needs_native
def test_thin_matmul_uses_torch_outside_its_domain_and_double_backward_is_exact():
    from pinet.kernels import fused

    gen = torch.Generator().manual_seed(3)
    x, W = torch.randn(4, 20, generator=gen), torch.randn(20, 6, generator=gen)
    wide = torch.randn(kernels.THIN_ROWS + 1, 20, generator=gen)
    with kernels.use_backend("fused"):
        assert torch.equal(kernels.thin_matmul(x.double(), W.double()), x.double() @ W.double())
        assert torch.equal(kernels.thin_matmul(wide, W), wide @ W)  # more rows than a thin product
        Wt = torch.randn(6, 20, generator=gen).T  # a non-contiguous weight would be copied: torch's @
        assert torch.equal(kernels.thin_matmul(x, Wt), x @ Wt)
        xr = x.clone().requires_grad_()
        out = kernels.thin_matmul(xr, W)
        assert type(out.grad_fn) is fused.FusedThinMatmul._backward_cls
        (g,) = torch.autograd.grad((out**2).sum(), xr, create_graph=True)
        (h,) = torch.autograd.grad((g**3).sum(), xr)
    xt = x.clone().requires_grad_()
    (gt,) = torch.autograd.grad(((xt @ W) ** 2).sum(), xt, create_graph=True)
    (ht,) = torch.autograd.grad((gt**3).sum(), xt)
    assert _rel(g.detach(), gt.detach().double()) < 1e-5 and _rel(h, ht.double()) < 1e-5
    with kernels.use_backend("torch"):
        assert torch.equal(kernels.thin_matmul(x, W), x @ W)
    def graph_nodes(t):  # every autograd node behind t
        seen, todo = [], [t.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in seen:
                seen.append(fn)
                todo += [f for f, _ in fn.next_functions]
        return seen

    net = pinet.InfPiMLP(20, 3, r=6, depth=1)
    with kernels.use_backend("fused"):  # the input layer of an infinite net goes through it
        assert any(type(fn) is fused.FusedThinMatmul._backward_cls for fn in graph_nodes(net.layers[0](x)))
    with pytest.raises(ValueError, match="thin_xw: xT \\(d, b\\) and W \\(d, r\\) must have one d"):
        knative.thin_xw(x.T.contiguous(), torch.randn(21, 6))
    with pytest.raises(ValueError, match="thin_outer: xT \\(d, b\\) and g \\(b, r\\) must have one b"):
        knative.thin_outer(x.T.contiguous(), torch.randn(5, 6))


@needs_native
def test_fused_layer_backward_names_a_wrong_shape():
    A, B, c = torch.randn(10, 4), TF.normalize(torch.randn(10, 6), dim=1), torch.randn(10)
    out, u, n, gbar, acos = knative.fused_layer_forward(torch.randn(3, 6), A, B, c, False, True)
    with pytest.raises(ValueError, match="grad_out must have shape \\(3, 4\\)"):
        knative.fused_layer_backward(gbar, n, u, torch.randn(3, 5), None, None, A, B, c, acos, False)
    with pytest.raises(ValueError, match="acos must have shape \\(10, 3\\)"):
        knative.fused_layer_backward(gbar, n, u, None, None, None, A, B, c, acos[:5], False)


@needs_native
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,r,r_out,M", [(8, 64, 10, 2501), (9, 100, 61, 300), (3, 5, 7, 37)])
def test_fused_half_storage_matches_float64_of_the_stored_rows(b, r, r_out, M, storage, isa):
    # 16-bit rows: both builds convert them as they load (AVX-512 masked 16-bit loads; AVX2
    # through a zero-padded copy for the K tails) and sum in float32.
    from pinet.kernels import fused

    gen = torch.Generator().manual_seed(M + b)
    g = TF.normalize(torch.randn(b, r, generator=gen), dim=1)
    A = torch.randn(M, r_out, generator=gen).to(storage)
    B = TF.normalize(torch.randn(M, r, generator=gen), dim=1).to(storage)
    c, d = torch.randn(M, generator=gen), torch.randn(b, r_out, generator=gen)
    assert fused._serves(g, A, B, c) == (storage in knative.FUSED_STORAGE[isa])
    gr = g.clone().requires_grad_()
    u = fused.pi_product(gr, A, B, c, None)
    (gg,) = torch.autograd.grad(u, gr, d)
    want_u, (want_g,) = _reference(g.double(), A.double(), B.double(), c.double(), d.double(), (True, False, False, False))
    assert u.dtype == torch.float32
    # The formula on the stored (rounded) rows, computed in float32: float32 rounding.
    assert _rel(u.detach(), want_u) < 2e-6 and _rel(gg, want_g) < 2e-6


@needs_native
def test_fused_backend_serves_float32_cpu_only():
    # float64 products take the torch backend's path even when forced: identical bits either way.
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 16, generator=gen, dtype=D)
    A, c = torch.randn(300, 5, generator=gen, dtype=D), torch.randn(300, generator=gen, dtype=D)
    B = TF.normalize(torch.randn(300, 16, generator=gen, dtype=D), dim=1)
    off = kernels.pi_layer(g, A, B, c)[0]
    with kernels.use_backend("fused"):
        assert kernels.backend() == "fused"
        on = kernels.pi_layer(g, A, B, c)[0]
    assert torch.equal(on, off)


@needs_native
def test_fused_training_matches_torch_backend(one_thread):
    from pinet.hooks import ClipGradNorm
    from pinet.optim import PiOptimizerWrapper

    def train(name, chunk):
        torch.manual_seed(0)
        net = pinet.InfPiMLP(20, 3, r=8, depth=2, chunk_size=chunk)
        opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net,
                                 hooks=[ClipGradNorm(0.5, per_param=True)])  # fmt: skip
        gen = torch.Generator().manual_seed(1)
        with kernels.use_backend(name):
            for _ in range(30):
                x, y = torch.randn(8, 20, generator=gen), torch.randint(0, 3, (8,), generator=gen)
                opt.zero_grad()
                TF.cross_entropy(net(x), y).backward()
                opt.step()
            return net(torch.randn(16, 20, generator=gen)).detach()

    ref = train("torch", None).double()
    for chunk in (None, 50):
        # 30 float32 steps that differ only in summation order agree to ~1e-6.
        assert _rel(train("fused", chunk), ref) < 1e-4


@needs_native
def test_fused_backend_under_torch_compile(one_thread):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 12, generator=gen)
    A, c = torch.randn(70, 5, generator=gen), torch.randn(70, generator=gen)
    B = TF.normalize(torch.randn(70, 12, generator=gen), dim=1)
    want = kernels.pi_layer(x.double().requires_grad_(), A.double(), B.double(), c.double())[0]
    torch._dynamo.reset()
    try:
        with kernels.use_backend("fused"):
            f = kernels.compile_step(lambda x: kernels.pi_layer(x, A, B, c)[0], backend="aot_eager")
            xs = x.clone().requires_grad_()
            out = f(xs)
            (gx,) = torch.autograd.grad(out, xs, torch.ones_like(out))
    finally:
        torch._dynamo.reset()
    xd = x.double().requires_grad_()
    want = kernels.pi_layer(xd, A.double(), B.double(), c.double())[0]
    (gx_want,) = torch.autograd.grad(want, xd, torch.ones_like(want))
    assert _rel(out, want.detach()) < 2e-6 and _rel(gx, gx_want) < 2e-6


@needs_native
def test_fused_isa_is_visible_switchable_and_refused_where_the_cpu_lacks_it(monkeypatch):
    want = "avx512" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "avx2"
    assert knative.fused_isa() == want  # the widest this CPU runs, unless PINET_FUSED_ISA says otherwise
    with pytest.raises(kernels.NativeUnavailable, match=r"isa must be one of \('avx512', 'avx2'\), got 'sse'"):
        knative.set_fused_isa("sse")
    assert knative.fused_isa() == want
    monkeypatch.setattr(knative, "_fused_libs", {})
    monkeypatch.setattr(knative, "_fused_isa", None)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(kernels.NativeUnavailable, match="need AVX-512 F and VL; torch reports CPU capability AVX2"):
        knative.set_fused_isa("avx512")
    assert knative._fused_isa is None and knative.fused_isa() == "avx2"  # the default follows the CPU
    monkeypatch.setattr(knative, "_fused_isa", None)
    monkeypatch.setenv("PINET_FUSED_ISA", "avx1024")
    with pytest.raises(kernels.NativeUnavailable, match="PINET_FUSED_ISA must be one of"):
        knative.fused_isa()


def test_forcing_fused_without_a_compiler_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(knative, "_fused_libs", {})
    monkeypatch.setattr(knative, "_fused_isa", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("PINET_CACHE", str(tmp_path))
    with pytest.raises(kernels.NativeUnavailable, match=r"g\+\+ \(or \$CXX\); none found"):
        kernels.set_backend("fused")
    assert kernels.setting() == "auto" and "fused" not in kernels.available_backends()


def test_bench_gpu_projection_and_cpu_smoke(tmp_path, one_thread):
    from benchmarks import bench_gpu

    # t(M) = 2 + 0.001 M ms over s = 1..3 steps at batch 8: 3·2 + 0.001·8·(1 + 2 + 3) ms.
    hours = bench_gpu.fit_projection([100, 300, 900], [2.1, 2.3, 2.9], steps=3, batch=8)
    assert hours == pytest.approx((6 + 0.048) / 1e3 / 3600)
    res = bench_gpu.main(["--device", "cpu", "--quick", "--backends", "torch", "--out", str(tmp_path)])
    assert [r["M"] for r in res["rows"]] == [256, 512] and res["projected_hours"]["torch"] is not None
    assert "| torch | 512 |" in (tmp_path / "bench_gpu_bfloat16.md").read_text()
    assert kernels.setting() == "auto"
