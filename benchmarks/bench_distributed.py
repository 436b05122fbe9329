"""Scaling benchmark of sharded π-states: ``python -m benchmarks.bench_distributed``.

The reference CIFAR-10 net (``InfPiMLP(d_in=3072, d_out=10, r=400, depth=1)``, float32, batch 8)
is grown to M rows per π-layer (random unit rows appended to each layer's ``PiState`` in chunks,
the same on every rank, each rank keeping its share) and trained on a fixed batch (SGD, momentum
0.9, ``ClipGradNorm(0.4, per_param=True)``, the reference command's optimizer) in P processes
(gloo, one thread each; ``pinet.distributed.shard`` when P > 1). Per (P, M) it measures:

* ms per training step (forward, cross-entropy, backward, the wrapper's step): per step the
  slowest rank's time, after a barrier so that every rank starts together; median over the timed
  steps of all rounds (rounds alternate P = 1 and P = 2 so both see the same machine load);
* CPU ms per step of each process (``time.process_time``, one thread: its own work, which other
  load on the machine does not inflate the way it inflates wall time), slowest rank;
* per-process memory: the bytes of π-state this process allocates (the ``A``/``B``/``c`` stores
  at their capacity, plus the momentum buffers of ``c``) and its resident set size (RSS);
* the all-reduce latency: median time of one ``all_reduce`` of each message a step sends (per
  π-layer one (b, r_out) output and one (b, r_in) input gradient: 4 messages here), alone, 200
  back to back.

A projection to more processes follows from the measured parts:
``t(P, M) = t_fixed + (t(1, M) − t_fixed) / P + Σ all-reduces(P)``, with ``t_fixed`` the step at
the initial M = r (input layer, biases, optimizer, Python) and the all-reduce latency of gloo's
ring taken as growing like ``P − 1`` times the measured 2-process one (a model, not a measurement;
NCCL on one node is far faster). Its P = 2 value is compared with the measured one.

Writes ``bench_distributed.md`` (tables), ``.png`` and ``.json`` under ``--out`` (docs/bench).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as TF

import pinet
from pinet import distributed as pd
from pinet.hooks import ClipGradNorm
from pinet.optim import PiOptimizerWrapper

D_IN, D_OUT, R, DEPTH, BATCH = 3072, 10, 400, 1, 8
CHUNK = 4096  # rows appended at a time while growing (bounds the replicated temporaries)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _grow(net: nn.Module, M: int, gen: torch.Generator) -> None:
    for st in (m for m in net.modules() if isinstance(m, pinet.PiState)):
        while st.global_rows < M:
            k = min(CHUNK, M - st.global_rows)
            B = torch.randn(k, st.r_in, generator=gen)
            B /= B.norm(dim=1, keepdim=True)
            A = torch.randn(k, st.r_out, generator=gen) / math.sqrt(st.r_out)
            c = torch.randn(k, generator=gen) * 1e-3
            st.append(A, B, c)


def _state_bytes(net, opt) -> int:
    total = 0
    for st in (m for m in net.modules() if isinstance(m, pinet.PiState)):
        item = torch.empty((), dtype=st.dtype).element_size()
        total += st.capacity * (st.r_in + st.r_out) * item + st.capacity * st.c.element_size()
        buf = opt.state.get(st.c, {}).get("momentum_buffer")
        if buf is not None:
            total += buf.numel() * buf.element_size()
    return total


def _worker(rank: int, world: int, store: str, sizes: list[int], warmup: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    results = []
    for M in sizes:
        gen = torch.Generator().manual_seed(0)
        net = pinet.InfPiMLP(D_IN, D_OUT, R, DEPTH, bias_alpha=0.5, last_layer_alpha=0.5, dtype=torch.float32)
        net.reset_parameters(gen)
        if world > 1:
            pd.shard(net)
        _grow(net, M, gen)
        sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        opt = PiOptimizerWrapper(sgd, net, hooks=[ClipGradNorm(0.4, per_param=True)])
        x = torch.randn(BATCH, D_IN, generator=gen)
        y = torch.randint(0, D_OUT, (BATCH,), generator=gen)
        times, cpu = [], []
        for i in range(warmup + steps):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss = TF.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends with its slowest rank
            if i >= warmup:
                times.append(float(dt[0]))
                cpu.append(float(dt[1]))
        ar = {}
        if world > 1:
            for width in (R, D_OUT):
                msg = torch.randn(BATCH, width)
                lat = []
                dist.barrier()
                for _ in range(200):  # back to back, as a step's all-reduces come
                    t0 = time.perf_counter()
                    dist.all_reduce(msg)
                    lat.append(time.perf_counter() - t0)
                ar[width] = statistics.median(lat[20:])
        mem = [None] * world
        dist.all_gather_object(mem, {"state_bytes": _state_bytes(net, opt), "rss_mb": _rss_mb(),
                                     "rows": [m.rows for m in net.modules() if isinstance(m, pinet.PiState)]})  # fmt: skip
        results.append({"M": M, "times": times, "cpu": cpu, "allreduce": ar, "mem": mem})
        del net, opt, sgd
        gc.collect()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _run(world: int, sizes, warmup, steps) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), sizes, warmup, steps, out),
                           nprocs=world, start_method="spawn")  # fmt: skip
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> None:
    """Run the benchmark and write the table, plot and raw numbers (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="20000,40000,80000", help="comma-separated M (rows per π-layer)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per (P, M) and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of P = 1 and P = 2")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args(argv)
    sizes = [R] + [int(s) for s in args.sizes.split(",")]  # M = r: the fixed cost of a step
    runs: dict[int, list[list[dict]]] = {1: [], 2: []}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        for world in (1, 2):
            print(f"round {rnd + 1}/{args.rounds}: P = {world} ...", flush=True)
            runs[world].append(_run(world, sizes, args.warmup, args.steps))
    wall = time.perf_counter() - t_start

    res: dict[int, dict[int, dict]] = {1: {}, 2: {}}
    for world, rounds in runs.items():
        for i, M in enumerate(sizes):
            times = [t for rnd in rounds for t in rnd[i]["times"]]
            cpu = [t for rnd in rounds for t in rnd[i]["cpu"]]
            mem = rounds[-1][i]["mem"]
            ar = rounds[-1][i]["allreduce"]
            res[world][M] = {
                "ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times),
                "cpu_ms": 1e3 * statistics.median(cpu),
                "state_mb": max(m["state_bytes"] for m in mem) / 2**20, "rss_mb": max(m["rss_mb"] for m in mem),
                "rows_per_rank": [m["rows"] for m in mem],
                "allreduce_us": {str(k): 1e6 * statistics.median([r[i]["allreduce"][k] for r in rounds]) for k in ar},
            }  # fmt: skip
    # One step sends, per π-layer, its output (b, r_out) and its input gradient (b, r_in).
    layers = [(R, R)] * DEPTH + [(R, D_OUT)]
    widths = [w for r_in, r_out in layers for w in (r_out, r_in)]
    big = max(sizes)
    ar_step_us = sum(res[2][big]["allreduce_us"][str(w)] for w in widths)
    t_fixed = res[1][R]["ms"]

    def project(P: int, M: int) -> float:
        return t_fixed + (res[1][M]["ms"] - t_fixed) / P + (P - 1) * ar_step_us / 1e3

    def project_mem(P: int, M: int) -> float:
        return res[1][M]["state_mb"] / P

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Sharded π-state: step time and memory per process vs number of processes",
        "",
        f"`python -m benchmarks.bench_distributed` (sizes {args.sizes}, {args.rounds} rounds x {args.steps} "
        f"timed steps, {wall:.0f} s). Reference CIFAR-10 net: d_in={D_IN}, r={R}, {DEPTH} hidden π-layer, "
        f"batch {BATCH}, float32, SGD momentum 0.9 + per-parameter clipping. gloo, one thread per process, "
        f"on {cpu} ({os.cpu_count()} cores), torch {torch.__version__}.",
        "",
        "**Noisy**: the 2 cores are shared with other jobs; min/max over the timed steps are shown. With",
        "P = 2 both processes need a core each, so any other load on the box slows P = 2 more than P = 1.",
        "The CPU time a process spends per step (slowest rank, `time.process_time`, one thread) is what",
        "the load does not inflate: it shows the work per process falling with P.",
        "",
        "| M per π-layer | P | ms/step (median) | min-max | speed-up vs P=1 | CPU ms/step per process | CPU ratio P=1/P | π-state MB / process | RSS MB / process | rows per rank (hidden) | projected ms (model) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for M in sizes:
        for P in (1, 2):
            r = res[P][M]
            rows = "/".join(str(x[0]) for x in r["rows_per_rank"])
            proj = f"{project(P, M):.1f}" if P == 2 else "-"
            lines.append(f"| {M} | {P} | {r['ms']:.1f} | {r['ms_min']:.1f}-{r['ms_max']:.1f} | "
                         f"{res[1][M]['ms'] / r['ms']:.2f} | {r['cpu_ms']:.1f} | {res[1][M]['cpu_ms'] / r['cpu_ms']:.2f} | "
                         f"{r['state_mb']:.1f} | {r['rss_mb']:.0f} | {rows} | {proj} |")  # fmt: skip
    lines += [
        "",
        "All-reduce latency (P = 2, gloo over loopback, one message at a time, 200 back to back, median):",
        "",
        "| message | µs |",
        "|---|---:|",
    ]
    for w, us in sorted(res[2][big]["allreduce_us"].items(), key=lambda kv: -int(kv[0])):
        lines.append(f"| ({BATCH}, {w}) float32 | {us:.0f} |")
    lines += [
        f"| **per step** ({len(widths)} messages: output and input gradient of each π-layer) | **{ar_step_us:.0f}** |",
        "",
        f"That is {100 * ar_step_us / 1e3 / res[2][big]['ms']:.1f}% of a P = 2 step at M = {big} and "
        f"{100 * ar_step_us / 1e3 / res[2][sizes[1]]['ms']:.1f}% at M = {sizes[1]}.",
        "",
        "Projection to more processes (model: fixed part t(P=1, M=r) = "
        f"{t_fixed:.1f} ms unchanged, the rest / P, all-reduces (P − 1) × the measured 2-process cost; "
        "memory: π-state / P):",
        "",
        "| M | P=1 ms | P=2 ms | P=4 ms | P=8 ms | π-state MB/process at P=1 / 2 / 4 / 8 |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for M in sizes[1:]:
        lines.append(f"| {M} | {res[1][M]['ms']:.1f} | {project(2, M):.1f} | {project(4, M):.1f} | {project(8, M):.1f} | "
                     + " / ".join(f"{project_mem(P, M):.0f}" for P in (1, 2, 4, 8)) + " |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.md").write_text(text)
    (out / "bench_distributed.json").write_text(json.dumps(
        {"sizes": sizes, "results": {str(P): {str(M): v for M, v in d.items()} for P, d in res.items()},
         "allreduce_per_step_us": ar_step_us, "t_fixed_ms": t_fixed, "raw": {str(k): v for k, v in runs.items()}},
        indent=1))  # fmt: skip
    _plot(out / "bench_distributed.png", sizes, res, project, project_mem)
    print(text)


def _plot(path, sizes, res, project, project_mem) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ms = sizes[1:]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for P, style in ((1, "o-"), (2, "s-")):
        ax.plot(Ms, [res[P][M]["ms"] for M in Ms], style, label=f"P={P} measured")
    for P in (2, 4, 8):
        ax.plot(Ms, [project(P, M) for M in Ms], "--", label=f"P={P} projected")
    ax.set(xlabel="rows M per π-layer", ylabel="ms per training step", title="step time (reference CIFAR-10 net)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for P, style in ((1, "o-"), (2, "s-")):
        ax.plot(Ms, [res[P][M]["state_mb"] for M in Ms], style, label=f"P={P} measured")
    for P in (4, 8):
        ax.plot(Ms, [project_mem(P, M) for M in Ms], "--", label=f"P={P} projected")
    ax.set(xlabel="rows M per π-layer", ylabel="MB of π-state per process", title="memory per process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
