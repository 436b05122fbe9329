"""Training-step benchmark of an infinite π-MLP: ``python -m benchmarks.bench_step``.

Grows ``InfPiMLP(d_in=3072, d_out=10, r=400, depth=2)`` to M rows per π-layer (random unit rows
appended straight to each layer's ``PiState``, no training) and measures, per M:

* median ms of a full training step: forward, cross-entropy, backward, the wrapper's step with
  per-parameter clipping (``ClipGradNorm(0.4, per_param=True)``) and SGD with momentum 0.9;
* median ms of a forward alone (inference, ``torch.no_grad``);
* the same two for the naive baseline (:mod:`benchmarks.naive`, same function, concatenation
  growth and textbook matmul orientation), timed interleaved with pinet so both see the same
  machine load, and the speed-up ratio;
* bytes of π-state (``A``, ``B``, ``c`` of every π-layer), the memory-read floor
  ``state bytes × 2 passes ÷ read bandwidth`` with the bandwidth measured in the same run
  (best ``tensor.sum()`` over a buffer much larger than the caches, several before the size's
  steps and one after each timed round), and step ÷ floor;
* the time of the four thin products a step cannot avoid (per π-layer ``B ḡᵀ``, ``wᵀ A``,
  ``A δᵀ``, ``(∂L/∂q)ᵀ B``), alone on the same state: how far pinet is from its own GEMMs;
* memory: peak RSS of the process and how much it rose during the steps of each implementation
  (``VmHWM`` reset through ``/proc/self/clear_refs``); from the torch allocator's events (torch
  profiler with ``profile_memory``) the peak bytes held for temporaries during one whole step, the
  peak of a forward + backward through one π-layer alone (the O(b × M) part) and the bytes a step
  allocates in total; and how many timed steps moved a π-state store (a whole copy).

Why 2 passes: the forward reads every row of ``A`` and ``B`` once (``q = B ḡᵀ``, ``u = wᵀ A``);
the backward needs ``∂L/∂w = A δᵀ`` and ``∂L/∂ḡ = (∂L/∂q)ᵀ B``, which read ``A`` and ``B`` once
more and cannot start before ``δ`` exists. The optimizer touches only ``c`` (M floats, counted in
the state bytes) and the new rows. Fewer passes would need fusing consecutive steps.

Targets (printed as PASS/FAIL at the end): marginal ms per row between the two largest sizes
≥ 20k within 2.5× of the floor's per-row cost; naive/pinet ≥ 5× at M = 20k; no step copies the
whole state; step temporaries grow as O(b × M); with ``chunk_size`` set they do not grow with M
and the results match the unchunked ones to rounding.

With ``--native`` pinet runs with :mod:`pinet.native` enabled (the bare products too; the naive
baseline is unaffected) and the files get a ``_native`` suffix. ``--backends torch,native`` also
times a step on each named :mod:`pinet.kernels` backend, interleaved with the default one and
the naive baseline, and adds a per-backend table: ms per step, the ratio to the roofline floor
(the larger of the memory floor and the products' FLOPs at the square-sgemm rate) and the
speed-up over naive. Per size, the sgemm rate is the best of one ``1536 × 1536`` float32 matmul
after every timed round of steps, and the bandwidth also includes one read per round: the
ceilings under the load the steps saw (on a shared VM a single measurement before the run has
been 25-35% below the rate seen minutes later). The marginal-cost target uses the best sgemm rate
of the whole run. ``--sgd foreach,fused`` also times the step with torch's multi-tensor or
fused SGD (``torch.optim.SGD(..., foreach=True)`` / ``fused=True``; the default row uses the
for-loop implementation, torch's default on the CPU): each on its own copy of the network, grown
identically, interleaved with the others, reported in the same table. That table also gives,
per backend, the π-products alone (every π-layer's forward and backward on its own state, no input
layer, loss or optimizer) against the same roofline floor, and the rest of the step: how much of
the gap to the floor is the kernels' and how much the step's fixed part.

Writes ``bench_step_<dtype>.md`` (table), ``.png`` (ms/step vs M) and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as TF
from tqdm import tqdm

import pinet
from pinet.kernels.torch_ops import native_reduce, torch_reduce
from pinet.hooks import ClipGradNorm
from pinet.optim import PiOptimizerWrapper

from .naive import NaiveInfPiMLP, NaiveTrainer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: torch.optim.SGD implementations ``--sgd`` can add: the keyword that selects each.
SGD_IMPLS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
PASSES = 2  # reads of the whole state per training step (module docstring)


@dataclass
class Config:
    d_in: int = 3072
    r: int = 400
    depth: int = 2
    d_out: int = 10
    batch: int = 8
    sizes: tuple[int, ...] = (2000, 5000, 10000, 20000, 40000)
    repeats: int = 10
    warmup: int = 2
    dtype: str = "float32"
    chunk_size: int | None = None
    naive: bool = True
    native: bool = False
    backends: tuple[str, ...] = ()
    sgd: tuple[str, ...] = ()  # extra SGD implementations timed (keys of SGD_IMPLS)
    bw_mbytes: int = 512
    sgemm_n: int = 1536  # square sgemm size of the compute ceiling
    lr: float = 0.01
    momentum: float = 0.9
    max_norm: float = 0.4
    seed: int = 0


@dataclass
class Row:
    M: int
    state_mb: float
    bw_gbs: float
    floor_ms: float
    step_ms: float
    fwd_ms: float
    step_over_floor: float
    gemm_ms: float
    rss_peak_mb: float
    step_rss_rise_mb: float
    step_temp_mb: float
    layer_temp_mb: float
    largest_alloc_mb: float
    step_alloc_mb: float
    moved_steps: int
    timed_steps: int
    naive_step_ms: float | None = None
    naive_fwd_ms: float | None = None
    naive_rss_rise_mb: float | None = None
    naive_largest_alloc_mb: float | None = None
    naive_step_alloc_mb: float | None = None
    speedup: float | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- measurement helpers
def _proc_kb(key: str) -> float:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return float(m.group(1)) if m else float("nan")


def _reset_peak_rss() -> bool:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0); without it the peak is process-wide.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_bandwidth(mbytes: int, repeats: int = 7, buffer: Tensor | None = None) -> float:
    """Best read bandwidth in bytes/s of ``x.sum()`` over a float32 buffer of ``mbytes`` MiB
    (far larger than the caches, so it streams from memory with the configured threads).
    ``buffer``: a float32 tensor to read instead (reused between calls; ``mbytes`` is ignored)."""
    x = buffer if buffer is not None else torch.ones(mbytes * 2**18)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def sgemm_rate(n: int = 1536, repeats: int = 5, operands: tuple[Tensor, Tensor] | None = None) -> float:
    """Best FLOP/s of a square ``n × n`` float32 matmul: what this machine's BLAS reaches when
    nothing but arithmetic limits it (the compute ceiling the thin products are compared with).
    ``operands``: the two (n, n) matrices to reuse (random ones otherwise)."""
    x, y = operands if operands is not None else (torch.randn(n, n), torch.randn(n, n))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_row(cfg: Config) -> int:
    """FLOPs of one training step per row of state, summed over the π-layers: the four products
    (``B ḡᵀ``, ``wᵀ A``, ``A δᵀ``, ``(∂L/∂q)ᵀ B``) cost ``2 b r_in`` or ``2 b r_out`` each per row."""
    dims = [(cfg.r, cfg.r)] * cfg.depth + [(cfg.r, cfg.d_out)]
    return sum(4 * cfg.batch * (r_in + r_out) for r_in, r_out in dims)


def alloc_profile(fn) -> tuple[float, float, float]:
    """Run ``fn()`` under the torch profiler and return (peak bytes held above the level at the
    start, largest single allocation, total bytes allocated) from the CPU allocator's events.
    Frees of tensors allocated before the start are not reported: the peak is an upper bound."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    cur = peak = largest = total = 0
    for e in events:
        n = e.nbytes()
        cur += n
        peak = max(peak, cur)
        largest = max(largest, n)
        total += max(n, 0)
    return float(peak), float(largest), float(total)


def gemm_time(net: pinet.InfPiMLP, batch: int, repeats: int, block: int = 8192) -> float:
    """Median seconds of the four thin products a training step cannot avoid, alone, on the
    actual state: per π-layer ``B @ ḡᵀ`` and ``wᵀ @ A`` (forward), ``A @ δᵀ`` and
    ``(∂L/∂q)ᵀ @ B`` (backward), in the orientation pinet uses, with random small operands.
    Half storage is up-converted in blocks of ``block`` rows, as pinet does."""
    ops = []
    for layer in net.pi_layers:
        st = layer.state
        A, B = st.A, st.B
        g = torch.randn(batch, st.r_in)
        d = torch.randn(batch, st.r_out)
        w = torch.randn(st.rows, batch)
        step = st.rows if A.dtype == torch.float32 else block
        ops.append((A, B, g, d, w, step))

    reduce = native_reduce if pinet.native.enabled() else torch_reduce

    def run():
        for A, B, g, d, w, step in ops:
            u = g.new_zeros(g.shape[0], A.shape[1])
            v = g.new_zeros(g.shape)
            for i in range(0, B.shape[0], step):
                Bb, Ab, wb = B[i : i + step].float(), A[i : i + step].float(), w[i : i + step]
                Bb @ g.T
                reduce(u, wb, Ab)  # addmm_, or the native kernel under --native
                Ab @ d.T
                reduce(v, wb, Bb)

    run()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def products_runner(net: pinet.InfPiMLP, batch: int, chunk_size: int | None, gen: torch.Generator):
    """A function that runs every π-layer's product alone, forward and backward to its input
    (:func:`pinet.kernels.pi_layer` on the layer's own ``A``, ``B``, ``c``, random ``g`` and upstream
    gradient), on the selected backend: what the kernels cost in a step, without the input layer,
    the loss, the row capture or the optimizer. Step minus its time is the step's fixed part."""
    ops = []
    for layer in net.pi_layers:
        st = layer.state
        g = torch.randn(batch, st.r_in, generator=gen).requires_grad_()
        ops.append((g, torch.randn(batch, st.r_out, generator=gen), st))

    def run():
        for g, grad, st in ops:
            g.grad = None
            out = pinet.kernels.pi_layer(g, st.A, st.B, st.c.detach(), chunk_size=chunk_size)[0]
            out.backward(grad)

    return run


def layer_temporaries(net: pinet.InfPiMLP, batch: int, chunk_size: int | None, gen: torch.Generator) -> float:
    """Largest, over the π-layers, of the allocator's peak bytes during a forward + backward of
    that layer alone (``pi_layer`` on its state, random input): the O(b × M) part of a step,
    free of the input layer's and optimizer's fixed-size tensors."""
    temps = []
    for layer in net.pi_layers:
        st = layer.state
        g = torch.randn(batch, st.r_in, generator=gen).requires_grad_()

        def fwd_bwd():
            pinet.kernels.pi_layer(g, st.A, st.B, st.c.detach(), chunk_size=chunk_size)[0].sum().backward()

        fwd_bwd()
        temps.append(alloc_profile(fwd_bwd)[0])
    return max(temps)


def state_bytes(net: pinet.InfPiMLP) -> int:
    """Bytes of the used rows ``A``, ``B`` and coefficients ``c`` of every π-layer."""
    return sum(t.numel() * t.element_size() for l in net.pi_layers for t in (l.state.A, l.state.B, l.state.c))


def grow(net: pinet.InfPiMLP, M: int, gen: torch.Generator, block: int = 4096) -> None:
    """Append random rows to every π-layer until it has M: unit ``B`` rows, ``A ~ N(0, 1/r_out)``,
    ``c ~ -0.01·U(0, 1)`` (like π-updates with lr 0.01). Blocks keep the temporaries small and let
    the stores grow geometrically as in training."""
    for layer in net.pi_layers:
        st = layer.state
        while st.rows < M:
            k = min(block, M - st.rows)
            B = torch.randn(k, st.r_in, generator=gen)
            A = torch.randn(k, st.r_out, generator=gen) / math.sqrt(st.r_out)
            c = -0.01 * torch.rand(k, generator=gen)
            st.append(A, B / B.norm(dim=1, keepdim=True), c)


def _median_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


# --------------------------------------------------------------------------- one size
def _build(cfg: Config, M: int, sgd: dict) -> tuple[pinet.InfPiMLP, PiOptimizerWrapper, torch.Generator]:
    """The benchmark network grown to M rows and its wrapped SGD (``sgd``: extra keywords)."""
    gen = torch.Generator().manual_seed(cfg.seed + M)
    torch.manual_seed(cfg.seed)
    net = pinet.InfPiMLP(cfg.d_in, cfg.d_out, cfg.r, cfg.depth, dtype=DTYPES[cfg.dtype], chunk_size=cfg.chunk_size)
    grow(net, M, gen)
    opt = PiOptimizerWrapper(
        torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, **sgd),
        net,
        hooks=[ClipGradNorm(cfg.max_norm, per_param=True)],
    )
    return net, opt, gen


def _stepper(net, opt, x, y):
    def step():
        opt.zero_grad()
        TF.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def bench_size(cfg: Config, M: int, bar: tqdm) -> Row:
    net, opt, gen = _build(cfg, M, {})
    x = torch.randn(cfg.batch, cfg.d_in, generator=gen)
    y = torch.randint(0, cfg.d_out, (cfg.batch,), generator=gen)
    p_step = _stepper(net, opt, x, y)
    # Each extra SGD implementation trains its own copy of the network (optimizer state is per
    # parameter, and the rows each step appends differ between copies only by rounding).
    sgd_steps = {f"SGD {name}": _stepper(*_build(cfg, M, SGD_IMPLS[name])[:2], x, y) for name in cfg.sgd}

    naive = trainer = None
    if cfg.naive:
        naive = NaiveInfPiMLP.from_pinet(net)
        trainer = NaiveTrainer(naive, cfg.lr, cfg.momentum, cfg.max_norm)

    def n_step():
        trainer.step(x, y)

    # Bandwidth first, at this size's moment of the run (load on a shared machine drifts), then per round.
    bw_buffer = torch.ones(cfg.bw_mbytes * 2**18)
    bw = read_bandwidth(cfg.bw_mbytes, buffer=bw_buffer)
    bar.set_postfix_str(f"M={M} warmup")
    for _ in range(cfg.warmup):
        p_step()
        if naive is not None:
            n_step()

    # Interleaved timing: pinet and naive alternate so that both see the same load.
    stores = lambda: [l.state._A.data_ptr() for l in net.pi_layers]  # noqa: E731
    p_ts, n_ts, moved = [], [], 0
    b_ts: dict[str, list[float]] = {name: [] for name in (*cfg.backends, *sgd_steps)}
    # The products alone, timed in the same loop as the steps: timed later, their difference to
    # the step (the fixed part) would mostly measure how the machine's load drifted meanwhile.
    products = products_runner(net, cfg.batch, cfg.chunk_size, gen)
    prod_ts: dict[str, list[float]] = {name: [] for name in ("default", *cfg.backends)}
    products()
    # Both ceilings, timed once per round as well: on a shared machine a rate measured once can be
    # far from the one the steps see (sgemm 138 vs 188 GFLOP/s, reads 33 vs 53 GB/s have been
    # seen minutes apart). The floors use the best of this size's rounds: the machine as the
    # steps found it, at its best (a conservative ceiling).
    mats = (torch.randn(cfg.sgemm_n, cfg.sgemm_n, generator=gen), torch.randn(cfg.sgemm_n, cfg.sgemm_n, generator=gen))
    sgemm_best = 0.0
    for name in cfg.backends:  # warm each backend up once (builds, caches)
        with pinet.kernels.use_backend(name):
            p_step()
            products()
    for fn in sgd_steps.values():
        for _ in range(cfg.warmup):
            fn()
    for i in range(cfg.repeats):
        bar.set_postfix_str(f"M={M} step {i + 1}/{cfg.repeats}")
        before = stores()
        t0 = time.perf_counter()
        p_step()
        p_ts.append(time.perf_counter() - t0)
        moved += before != stores()
        t0 = time.perf_counter()
        products()
        prod_ts["default"].append(time.perf_counter() - t0)
        for name in cfg.backends:  # interleaved with the others: the same machine load
            with pinet.kernels.use_backend(name):
                t0 = time.perf_counter()
                p_step()
                b_ts[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                products()
                prod_ts[name].append(time.perf_counter() - t0)
        for name, fn in sgd_steps.items():
            t0 = time.perf_counter()
            fn()
            b_ts[name].append(time.perf_counter() - t0)
        if naive is not None:
            t0 = time.perf_counter()
            n_step()
            n_ts.append(time.perf_counter() - t0)
        sgemm_best = max(sgemm_best, sgemm_rate(cfg.sgemm_n, 1, mats))
        bw = max(bw, read_bandwidth(cfg.bw_mbytes, 1, bw_buffer))
        bar.update(1)
    del bw_buffer, mats
    with torch.no_grad():
        pf, nf = [], []
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            net(x)
            pf.append(time.perf_counter() - t0)
            if naive is not None:
                t0 = time.perf_counter()
                naive(x)
                nf.append(time.perf_counter() - t0)

    gemm_s = gemm_time(net, cfg.batch, cfg.repeats)

    # Memory. RSS windows: reset the high-water mark, run two steps, read the rise.
    bar.set_postfix_str(f"M={M} memory")
    rises = {}
    for name, fn in (("pinet", p_step), ("naive", n_step if naive is not None else None)):
        if fn is None:
            continue
        _reset_peak_rss()
        base = _proc_kb("VmRSS")
        for _ in range(2):
            fn()
        rises[name] = (_proc_kb("VmHWM") - base) / 1024
    temp, largest, total = alloc_profile(p_step)
    layer_temp = layer_temporaries(net, cfg.batch, cfg.chunk_size, gen)
    n_prof = alloc_profile(n_step) if naive is not None else None

    sb = state_bytes(net)
    floor_ms = PASSES * sb / bw * 1e3
    step_ms = _median_ms(p_ts)
    row = Row(
        M=M,
        state_mb=sb / 2**20,
        bw_gbs=bw / 1e9,
        floor_ms=floor_ms,
        step_ms=step_ms,
        fwd_ms=_median_ms(pf),
        step_over_floor=step_ms / floor_ms,
        gemm_ms=gemm_s * 1e3,
        rss_peak_mb=_proc_kb("VmHWM") / 1024,
        step_rss_rise_mb=rises["pinet"],
        step_temp_mb=temp / 2**20,
        layer_temp_mb=layer_temp / 2**20,
        largest_alloc_mb=largest / 2**20,
        step_alloc_mb=total / 2**20,
        moved_steps=moved,
        timed_steps=cfg.repeats,
    )
    row.rss_peak_mb = max(row.rss_peak_mb, _proc_kb("VmRSS") / 1024)
    if naive is not None:
        row.naive_step_ms = _median_ms(n_ts)
        row.naive_fwd_ms = _median_ms(nf)
        row.naive_rss_rise_mb = rises["naive"]
        row.naive_largest_alloc_mb = n_prof[1] / 2**20
        row.naive_step_alloc_mb = n_prof[2] / 2**20
        row.speedup = row.naive_step_ms / step_ms
    row.extra["backend_step_ms"] = {name: _median_ms(ts) for name, ts in b_ts.items()}
    row.extra["products_ms"] = {name: _median_ms(ts) for name, ts in prod_ts.items()}
    row.extra["sgemm_flops"] = sgemm_best
    return row


def backend_table(rows: list[Row], cfg: Config) -> str:
    """Per backend and size: ms per step, the ratio to the roofline floor (the larger of the
    memory floor and the four products' FLOPs at this size's best square-sgemm rate) and the speed-up over
    the naive baseline, all from the same interleaved run; and the π-products alone
    (:func:`products_runner`) against the same floor, the rate at which they stream the state (two
    reads) as a fraction of this size's read bandwidth, and the rest of the step (its fixed part)."""
    head = ("| backend | M | step ms | roofline floor ms | step/roofline | speed-up over naive | "
            "π-products alone ms | products/roofline | products' read rate GB/s | of the read bandwidth | "
            "rest of the step ms |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")  # fmt: skip
    lines = []
    for name in ("default", *cfg.backends, *(f"SGD {s}" for s in cfg.sgd)):
        for r in rows:
            ms = r.step_ms if name == "default" else r.extra["backend_step_ms"][name]
            # This size's ceilings (best of its rounds): the load the steps themselves saw.
            roof = max(r.floor_ms, flops_per_row(cfg) * r.M / r.extra["sgemm_flops"] * 1e3)
            speed = None if r.naive_step_ms is None else r.naive_step_ms / ms
            label = f"default ({pinet.kernels.backend()})" if name == "default" else name
            if name.startswith("SGD "):
                label = f"default ({pinet.kernels.backend()}), {name}"
            prod = r.extra.get("products_ms", {}).get("default" if name.startswith("SGD ") else name)
            if prod is None:
                cols = "| – | – | – | – | – |"
            else:  # the products read the whole state twice (PASSES): the rate they stream it at
                rate = PASSES * r.state_mb * 2**20 / (prod * 1e-3) / 1e9
                cols = f"| {prod:.2f} | {prod / roof:.2f} | {rate:.1f} | {rate / r.bw_gbs:.0%} | {ms - prod:.2f} |"
            lines.append(f"| {label} | {r.M} | {ms:.2f} | {roof:.2f} | {ms / roof:.2f} | {_fmt(speed)}× {cols}")
    return head + "\n".join(lines) + "\n"


def chunk_check(cfg: Config, M: int, chunk: int) -> dict:
    """At size M, automatic blocks against ``chunk_size=chunk``: the relative difference of the
    network's output and of the input layer's gradient after a forward + backward, and the
    allocator's peak temporaries of a forward + backward through each π-layer on its own."""
    dtype = DTYPES[cfg.dtype]
    gen = torch.Generator().manual_seed(cfg.seed + M)
    torch.manual_seed(cfg.seed)
    net = pinet.InfPiMLP(cfg.d_in, cfg.d_out, cfg.r, cfg.depth, dtype=dtype)
    grow(net, M, gen)
    x = torch.randn(cfg.batch, cfg.d_in, generator=gen)
    res = {}
    for key, cs in (("auto", None), ("chunked", chunk)):
        for l in net.pi_layers:
            l.chunk_size = cs
        net.zero_grad(set_to_none=True)
        out = net(x)
        # A loss whose gradient reaches every layer (the readout starts at zero).
        (out.square().sum() + net.layers[1](net.layers[0](x)).square().sum()).backward()
        res[key] = (out.detach(), net.layers[0].A.grad.detach().clone(), layer_temporaries(net, cfg.batch, cs, gen))
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    return {
        "M": M,
        "chunk_size": chunk,
        "out_rel_diff": rel(res["chunked"][0], res["auto"][0]),
        "grad_rel_diff": rel(res["chunked"][1], res["auto"][1]),
        "layer_temp_mb_auto": res["auto"][2] / 2**20,
        "layer_temp_mb_chunked": res["chunked"][2] / 2**20,
        "batch_x_M_mb": cfg.batch * M * 4 / 2**20,
    }


# --------------------------------------------------------------------------- report
def _fmt(v, nd=1):
    return "–" if v is None else f"{v:.{nd}f}"


def table(rows: list[Row], cfg: Config) -> str:
    head = (
        "| M | state MB | read GB/s | floor ms | GEMMs ms | step ms | step/floor | fwd ms | naive step ms | "
        "naive fwd ms | speed-up | peak RSS MB | step RSS rise MB | naive RSS rise MB | "
        "step temporaries MB | π-layer temporaries MB | moved stores |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.M} | {r.state_mb:.1f} | {r.bw_gbs:.1f} | {r.floor_ms:.2f} | {r.gemm_ms:.2f} | {r.step_ms:.2f} | "
        f"{r.step_over_floor:.2f} | {r.fwd_ms:.2f} | {_fmt(r.naive_step_ms, 2)} | {_fmt(r.naive_fwd_ms, 2)} | "
        f"{_fmt(r.speedup)}× | {r.rss_peak_mb:.0f} | {r.step_rss_rise_mb:.1f} | {_fmt(r.naive_rss_rise_mb)} | "
        f"{r.step_temp_mb:.2f} | {r.layer_temp_mb:.2f} | {r.moved_steps}/{r.timed_steps} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def targets(
    rows: list[Row], cfg: Config, chunk: dict | None, flops: float | None = None
) -> list[tuple[str, bool | None, str]]:
    """(name, passed or None if not measurable with these sizes, detail). ``flops``: the machine's
    square-sgemm rate (FLOP/s), for the compute floor reported next to the memory floor."""
    out = []
    big = [r for r in rows if r.M >= 20000]
    pair = big[-2:] if len(big) >= 2 else rows[-2:] if len(rows) >= 2 else []
    if len(pair) == 2:
        a, b = pair
        per_row_ms = (b.step_ms - a.step_ms) / (b.M - a.M)
        bw = 0.5 * (a.bw_gbs + b.bw_gbs) * 1e9
        row_bytes = (b.state_mb - a.state_mb) * 2**20 / (b.M - a.M)
        floor_row_ms = PASSES * row_bytes / bw * 1e3
        ratio = per_row_ms / floor_row_ms
        gemm_ratio = (b.gemm_ms - a.gemm_ms) / (b.M - a.M) / floor_row_ms
        compute = ""
        if flops:
            # b = 8 products do 4 FLOPs per byte of state read: on a CPU whose matmuls run below
            # 4 x (read bandwidth) FLOP/s the arithmetic, not the memory, is the real floor.
            compute_row_ms = flops_per_row(cfg) / flops * 1e3
            compute = (
                f"; compute floor at this machine's best sgemm rate ({flops / 1e9:.0f} GFLOP/s): "
                f"{compute_row_ms * 1e3:.3f} µs/row = {compute_row_ms / floor_row_ms:.2f}x the read floor, "
                f"step = {per_row_ms / compute_row_ms:.2f}x the compute floor"
            )
        out.append((
            f"marginal cost per row, M={a.M}..{b.M}, within 2.5x of the read floor",
            (0 < ratio <= 2.5) if big else None,  # a negative marginal cost is load noise, not a pass
            f"{per_row_ms * 1e3:.3f} µs/row vs floor {floor_row_ms * 1e3:.3f} µs/row = {ratio:.2f}x "
            f"(the four bare products alone: {gemm_ratio:.2f}x){compute}",
        ))
    at20 = [r for r in rows if r.M == 20000 and r.speedup is not None]
    if at20:
        s = at20[0].speedup
        out.append(("at least 5x faster than the naive baseline at M=20000", s >= 5, f"{s:.1f}x"))
    else:
        out.append(("at least 5x faster than the naive baseline at M=20000", None, "M=20000 not run"))
    moved = sum(r.moved_steps for r in rows)
    steps = sum(r.timed_steps for r in rows)
    if len(rows) >= 2:
        # A step that copied the whole state (concatenation growth) would hold a second copy of it
        # at its peak and allocate at least the state's bytes per row; here the stores must never
        # move between steps and a step's peak temporaries must stay far below the state. Total
        # bytes allocated are reported too: with half storage they include the block-wise float32
        # up-conversions, transient reads of the state that are freed block by block.
        a, b = rows[0], rows[-1]
        state_slope = (b.state_mb - a.state_mb) / (b.M - a.M)
        ratio = (b.step_alloc_mb - a.step_alloc_mb) / (b.M - a.M) / state_slope
        naive = ""
        if b.naive_step_alloc_mb is not None:
            n_ratio = (b.naive_step_alloc_mb - a.naive_step_alloc_mb) / (b.M - a.M) / state_slope
            naive = f" (naive: {n_ratio:.2f})"
        out.append((
            "no step copies the whole state (amortised growth)",
            moved <= max(1, steps // 10) and b.step_temp_mb < 0.5 * b.state_mb,
            f"{moved}/{steps} timed steps moved a store (geometric growth); peak step temporaries at "
            f"M={b.M}: {b.step_temp_mb:.1f} MB vs {b.state_mb:.0f} MB state; bytes allocated per step grow "
            f"by {ratio:.3f} x the state's bytes per row{naive}",
        ))
    if len(rows) >= 2:
        # Growth between the two largest sizes: at small M the fixed-size half-storage conversion
        # blocks (8192 rows) are still growing with M and would be mistaken for O(b x M) terms.
        a, b = rows[-2], rows[-1]
        per_row = (b.layer_temp_mb - a.layer_temp_mb) * 2**20 / (b.M - a.M)
        unit = cfg.batch * 4  # one float32 per sample and row
        out.append((
            "peak memory of a step <= state + O(batch x M): a π-layer's fwd+bwd temporaries grow "
            f"by <= 4 x batch floats per row (M={a.M}..{b.M})",
            per_row / unit <= 4,
            f"{per_row:.0f} B/row = {per_row / unit:.2f} x batch floats; at M={b.M}: {b.layer_temp_mb:.2f} MB "
            f"per π-layer, whole step {b.step_temp_mb:.1f} MB (input layer and optimizer included) vs "
            f"{b.state_mb:.0f} MB state",
        ))
    if chunk is not None:
        ok = (
            chunk["out_rel_diff"] < 1e-5
            and chunk["grad_rel_diff"] < 1e-4
            and chunk["layer_temp_mb_chunked"] < chunk["layer_temp_mb_auto"]
        )
        out.append((
            f"chunk_size={chunk['chunk_size']} bounds temporaries, same results to rounding (M={chunk['M']})",
            ok,
            f"π-layer fwd+bwd temporaries {chunk['layer_temp_mb_auto']:.2f} MB -> "
            f"{chunk['layer_temp_mb_chunked']:.2f} MB (batch x M floats = {chunk['batch_x_M_mb']:.2f} MB); "
            f"rel. diff: output {chunk['out_rel_diff']:.1e}, input-layer gradient {chunk['grad_rel_diff']:.1e}",
        ))
    return out


def plot(rows: list[Row], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ms = [r.M for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(Ms, [r.step_ms for r in rows], "o-", label="pinet: training step")
    ax.plot(Ms, [r.fwd_ms for r in rows], "o--", label="pinet: forward alone")
    if all(r.naive_step_ms is not None for r in rows):
        ax.plot(Ms, [r.naive_step_ms for r in rows], "s-", label="naive: training step")
        ax.plot(Ms, [r.naive_fwd_ms for r in rows], "s--", label="naive: forward alone")
    ax.plot(Ms, [r.gemm_ms for r in rows], "^:", color="gray", label="the 4 bare products per π-layer")
    ax.plot(Ms, [r.floor_ms for r in rows], "k:", label=f"memory-read floor ({PASSES} passes)")
    ax.set_xlabel("rows M per π-layer")
    ax.set_ylabel("ms per step (median)")
    ax.set_yscale("log")
    ax.set_title(
        f"InfPiMLP d_in={cfg.d_in} r={cfg.r} depth={cfg.depth} batch={cfg.batch}, "
        f"{cfg.dtype} state, {torch.get_num_threads()} threads",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _isa_note() -> str:
    """`` (AVX-512 build)``-style note on the fused kernels' instruction set, where they run."""
    if "fused" not in pinet.kernels.available_backends():
        return ""
    return f" ({pinet.kernels.native.fused_isa()} build)"


def _load_warning(load) -> str:
    # Timings on a shared machine are only meaningful when it is otherwise idle: with 2 threads
    # and a busy second core, every parallel region waits for a descheduled thread.
    busy = load[1] - 1.0
    cpus = os.cpu_count() or 1
    return f". WARNING: other work was running (5-min load {load[1]:.1f} on {cpus} CPUs)" if busy > 0.5 else ""


# --------------------------------------------------------------------------- CLI
def _sgd_list(text: str) -> tuple[str, ...]:
    names = tuple(v for v in text.split(",") if v)
    bad = [v for v in names if v not in SGD_IMPLS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown SGD implementation(s) {bad}; expected some of {list(SGD_IMPLS)}")
    return names


def parse(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: tuple(int(v) for v in s.split(",")), help="comma-separated M values")
    p.add_argument("--repeats", type=int, help="timed steps per size (median reported), default 10")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="π-state storage dtype")
    p.add_argument("--chunk-size", type=int, default=None, help="InfPiMLP chunk_size (default: automatic)")
    p.add_argument("--check-chunk", type=int, default=1024, help="chunk_size compared with automatic at the largest M (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--native", action="store_true", help="pinet with pinet.native enabled (needs g++ and AVX2)")
    p.add_argument("--backends", type=lambda s: tuple(v for v in s.split(",") if v), default=(),
                   help="comma-separated pinet.kernels backends also timed, interleaved (e.g. torch,native)")
    p.add_argument("--sgd", type=_sgd_list, default=(),
                   help=f"comma-separated torch.optim.SGD implementations also timed, interleaved ({', '.join(SGD_IMPLS)})")
    p.add_argument("--quick", action="store_true", help="tiny network and sizes: a smoke test of a few seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    a = p.parse_args(argv)
    cfg = Config(dtype=a.dtype, chunk_size=a.chunk_size, naive=not a.no_naive, native=a.native, backends=a.backends,
                 sgd=a.sgd)  # fmt: skip
    if a.quick:
        cfg = Config(d_in=48, r=16, depth=2, sizes=(64, 128, 256), repeats=2, warmup=1, bw_mbytes=16, sgemm_n=128,
                     dtype=a.dtype, chunk_size=a.chunk_size, naive=not a.no_naive, native=a.native,
                     backends=a.backends, sgd=a.sgd)  # fmt: skip
    if a.sizes:
        cfg.sizes = a.sizes
    if a.repeats:
        cfg.repeats = a.repeats
    if a.check_chunk and a.quick:
        a.check_chunk = 32
    return cfg, a


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv`` as on the command line) and return what the JSON file holds.
    The torch thread count is restored on return."""
    cfg, a = parse(argv)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        with pinet.native.use(cfg.native):
            return _run(cfg, a)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, a: argparse.Namespace) -> dict:
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    flops = sgemm_rate(cfg.sgemm_n)
    with tqdm(total=len(cfg.sizes) * cfg.repeats, desc="bench_step", unit="step", file=sys.stderr) as bar:
        for M in cfg.sizes:
            rows.append(bench_size(cfg, M, bar))
        chunk = None
        if a.check_chunk:
            bar.set_postfix_str(f"chunk check M={max(cfg.sizes)}")
            chunk = chunk_check(cfg, max(cfg.sizes), a.check_chunk)
    flops = max([flops] + [r.extra["sgemm_flops"] for r in rows])
    checks = targets(rows, cfg, chunk, flops)
    if a.quick:  # a smoke test of the machinery: tiny shapes say nothing about the targets
        checks = [(name, None, detail) for name, _, detail in checks]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    header = (
        f"InfPiMLP(d_in={cfg.d_in}, d_out={cfg.d_out}, r={cfg.r}, depth={cfg.depth}), batch {cfg.batch}, "
        f"state {cfg.dtype}, chunk_size={cfg.chunk_size}, pinet.native {'on' if cfg.native else 'off'}, "
        f"torch {torch.__version__}, default backend {pinet.kernels.backend()}{_isa_note()}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average at end "
        f"{load[0]:.2f} / {load[1]:.2f} (1 / 5 min){_load_warning(load)}"
        + (" (quick: sizes too small for the targets to mean anything)" if a.quick else "")
    )
    md = [f"{header}\n", table(rows, cfg), ""]
    if cfg.backends or cfg.sgd:
        rates = "; ".join(f"M={r.M}: {r.bw_gbs:.0f} GB/s, {r.extra['sgemm_flops'] / 1e9:.0f} GFLOP/s" for r in rows)
        md += [
            f"Per backend (roofline from each size's best read bandwidth and best square sgemm, timed "
            f"between its steps: {rates}):\n",
            backend_table(rows, cfg),
            "",
        ]
    for name, ok, detail in checks:
        mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        md.append(f"- {mark} {name}: {detail}")
    text = "\n".join(md) + "\n"
    print(text)
    stem = a.out / f"bench_step_{cfg.dtype}{'_native' if cfg.native else ''}"
    stem.with_suffix(".md").write_text(text)
    plot(rows, cfg, stem.with_suffix(".png"))
    result = {
        "config": {**asdict(cfg), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": [asdict(r) for r in rows],
        "chunk_check": chunk,
        "sgemm_flops": flops,
        "targets": [{"name": n, "passed": ok, "detail": d} for n, ok, d in checks],
        "files": [str(stem.with_suffix(s)) for s in (".md", ".png", ".json")],
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
