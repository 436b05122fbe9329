"""GPU benchmark of the π-product backends: ``python -m benchmarks.bench_gpu`` (needs CUDA).

Grows ``InfPiMLP(d_in=3072, d_out=10, r=400, depth=2)`` (the reference CIFAR-10 network) on the
GPU, with bfloat16 state by default, to M rows per π-layer (random unit rows generated on the
device) and measures, per backend (``torch``, ``triton``) and M (default 250k, 500k, 1M, 2M):

* ms of a full training step (forward, cross-entropy, backward, the wrapper's step with
  per-parameter clipping and SGD momentum; batch 8), median over ``--repeats`` with CUDA syncs;
* the memory floor ``2 passes × state bytes ÷ bandwidth``, with the device's bandwidth measured
  in the same run (best ``copy_`` of a 1 GiB buffer, read + write bytes), and the fraction of that
  bandwidth the step reaches (floor ÷ step);
* the projected wall time of the paper's whole CIFAR-10 run, 287k steps at batch 8 (M grows by 8
  rows per step from 0): ``Σ_s t(8 s)`` with ``t(M) = a + b M`` fitted to the measured steps.

Writes ``bench_gpu_<dtype>.md`` and ``.json`` under ``--out``. ``--device cpu --quick`` runs the
machinery on tiny sizes on the CPU (torch backend only; a smoke test, not a measurement). No GPU
has been available to this project, so no results of this benchmark exist yet.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as TF

import pinet
from pinet.hooks import ClipGradNorm
from pinet.optim import PiOptimizerWrapper

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = 2  # reads of the whole state per training step (see bench_step)
PAPER_STEPS = 287_000  # the paper's CIFAR-10 run at batch 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, mbytes: int) -> float:
    """Best bytes/s of ``dst.copy_(src)`` over ``mbytes`` MiB, counting the read and the write."""
    n = mbytes * 2**20 // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def grow(net: pinet.InfPiMLP, M: int, device: torch.device, block: int = 1 << 16) -> None:
    """Append random rows (generated on ``device``) to every π-layer until it has M."""
    gen = torch.Generator(device=device).manual_seed(M)
    for layer in net.pi_layers:
        st = layer.state
        while st.rows < M:
            k = min(block, M - st.rows)
            B = torch.randn(k, st.r_in, generator=gen, device=device)
            A = torch.randn(k, st.r_out, generator=gen, device=device) / math.sqrt(st.r_out)
            c = -0.01 * torch.rand(k, generator=gen, device=device)
            st.append(A, B / B.norm(dim=1, keepdim=True), c)


def fit_projection(Ms: list[int], ms: list[float], steps: int = PAPER_STEPS, batch: int = 8) -> float | None:
    """Hours of ``steps`` training steps with M = batch·s at step s, from the least-squares line
    ``t(M) = a + b M`` (ms) through the measured points; ``None`` with fewer than two points."""
    if len(Ms) < 2:
        return None
    mx, my = statistics.fmean(Ms), statistics.fmean(ms)
    b = sum((x - mx) * (y - my) for x, y in zip(Ms, ms)) / sum((x - mx) ** 2 for x in Ms)
    a = my - b * mx
    total_ms = steps * a + b * batch * steps * (steps + 1) / 2
    return total_ms / 1e3 / 3600


def bench(backend: str, M: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    net = pinet.InfPiMLP(args.d_in, 10, args.r, 2, dtype=DTYPES[args.dtype], device=device)
    grow(net, M, device)
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), net,
                             hooks=[ClipGradNorm(0.4, per_param=True)])  # fmt: skip
    x = torch.randn(8, args.d_in, device=device)
    y = torch.randint(0, 10, (8,), device=device)
    state_bytes = sum(t.numel() * t.element_size() for l in net.pi_layers for t in (l.state.A, l.state.B, l.state.c))
    ts = []
    with pinet.kernels.use_backend(backend):
        for i in range(args.warmup + args.repeats):
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad()
            TF.cross_entropy(net(x), y).backward()
            opt.step()
            _sync(device)
            if i >= args.warmup:
                ts.append(time.perf_counter() - t0)
    return {"backend": backend, "M": M, "state_mb": state_bytes / 2**20, "step_ms": statistics.median(ts) * 1e3}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv`` as on the command line); returns what the JSON file holds."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[250_000, 500_000, 1_000_000, 2_000_000])
    p.add_argument("--backends", type=lambda s: [v for v in s.split(",") if v], default=["torch", "triton"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="π-state storage dtype")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes and network: a smoke test")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA device (torch.cuda.is_available() is False); --device cpu --quick for a smoke test")
    args.d_in, args.r, args.warmup, mbytes = 3072, 400, 2, 1024
    if args.quick:
        args.d_in, args.r, args.warmup, mbytes = 48, 16, 1, 16
        args.sizes = [s for s in args.sizes if s <= 4096] or [256, 512]
        args.repeats = min(args.repeats, 2)
    bw = bandwidth(device, mbytes)
    rows = []
    for name in args.backends:
        pinet.kernels.set_backend(name)  # raises if the backend cannot run here, before any timing
        pinet.kernels.set_backend("auto")
        for M in args.sizes:
            print(f"bench_gpu: {name} M={M}", file=sys.stderr)
            r = bench(name, M, args, device)
            r["floor_ms"] = PASSES * r["state_mb"] * 2**20 / bw * 1e3
            r["bandwidth_fraction"] = r["floor_ms"] / r["step_ms"]
            rows.append(r)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"{dev}, state {args.dtype}, InfPiMLP(d_in={args.d_in}, d_out=10, r={args.r}, depth=2), batch 8, "
             f"torch {torch.__version__}, measured copy bandwidth {bw / 1e9:.0f} GB/s"
             + (" (quick: sizes too small to mean anything)" if args.quick else "") + "\n",
             "| backend | M | state MB | step ms | memory floor ms | fraction of bandwidth |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['backend']} | {r['M']} | {r['state_mb']:.0f} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['bandwidth_fraction']:.0%} |" for r in rows]  # fmt: skip
    projections = {}
    for name in args.backends:
        pts = [(r["M"], r["step_ms"]) for r in rows if r["backend"] == name]
        projections[name] = fit_projection([m for m, _ in pts], [t for _, t in pts])
        if projections[name] is not None:
            lines.append(f"\n- {name}: projected wall time of {PAPER_STEPS:,} steps at batch 8: {projections[name]:.1f} h")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_gpu_{args.dtype}"
    stem.with_suffix(".md").write_text(text)
    result = {"device": dev, "bandwidth_gbs": bw / 1e9, "rows": rows, "projected_hours": projections}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
