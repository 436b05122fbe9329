"""Huge-page row stores against ordinary pages: ``python -m benchmarks.bench_huge_pages``.

Builds the step benchmark's network (``InfPiMLP(3072, 10, r=400, depth=2)``, per-parameter
clipping, SGD momentum 0.9, batch 8) twice per M: once with :func:`pinet.memory.set_huge_pages`
on, once off, so that one net's π-row stores ask the kernel for 2 MiB pages and the other's do
not. The two nets' steps are timed alternately in one process (which of them goes first swaps
from step to step), so both see the same machine load; the ratio of their medians is the result.
For each net it also reports how many MB of huge pages the process gained while the net was built
(``AnonHugePages``, ``/proc/self/smaps_rollup``): about its stores' size with huge pages on, 0 off.

Writes ``bench_huge_pages.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as TF
from tqdm import tqdm

import pinet
from pinet.hooks import ClipGradNorm
from pinet.optim import PiOptimizerWrapper

from .bench_step import grow


def anon_huge_kb() -> int:
    """kB of this process's anonymous memory on transparent huge pages (``/proc/self/smaps_rollup``;
    0 where it cannot be read)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def build(M: int, huge: bool, seed: int, d_in: int, r: int):
    """The network with M rows per π-layer, its wrapper, ``(MB of its stores, MB of huge pages the
    process gained while they were built)``."""
    before = anon_huge_kb()
    with pinet.memory.use_huge_pages(huge):
        torch.manual_seed(seed)
        net = pinet.InfPiMLP(d_in, 10, r, 2)
        grow(net, M, torch.Generator().manual_seed(seed + M))
    opt = PiOptimizerWrapper(
        torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), net, hooks=[ClipGradNorm(0.4, per_param=True)]
    )
    gained = (anon_huge_kb() - before) / 1024
    stores = sum(t.untyped_storage().nbytes() for layer in net.pi_layers for t in (layer.state._A, layer.state._B))
    return net, opt, (stores / 2**20, gained)


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison (``argv`` as on the command line); returns what the JSON file holds."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_huge_pages", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: tuple(int(v) for v in s.split(",")), default=(20000, 40000))
    p.add_argument("--repeats", type=int, default=40, help="timed steps per net and size (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny network and sizes: checks the machinery only")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    d_in, r = (48, 16) if a.quick else (3072, 400)
    sizes = (256, 512) if a.quick else a.sizes
    a.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, d_in, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    rows = []
    with tqdm(total=len(sizes) * 2 * (a.repeats + a.warmup), desc="bench_huge_pages", unit="step", file=sys.stderr) as bar:
        for M in sizes:
            # The small-page net first: built second, its stores could reuse memory the C allocator
            # got back from the other net's outgrown stores, which is on huge pages already.
            nets = {h: build(M, h, 0, d_in, r) for h in (False, True)}
            times = {True: [], False: []}
            for i in range(a.warmup + a.repeats):
                for h in ((True, False) if i % 2 else (False, True)):
                    net, opt, _ = nets[h]
                    t0 = time.perf_counter()
                    opt.zero_grad()
                    TF.cross_entropy(net(x), y).backward()
                    opt.step()
                    if i >= a.warmup:
                        times[h].append(time.perf_counter() - t0)
                    bar.update()
            on, off = (statistics.median(times[h]) * 1e3 for h in (True, False))
            rows.append({
                "M": M, "huge_ms": on, "small_ms": off, "ratio": off / on,
                "huge_share": {("on" if h else "off"): nets[h][2] for h in nets},
            })  # fmt: skip
            del nets
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        f"InfPiMLP(d_in={d_in}, r={r}, depth=2), batch 8, float32 state, backend {pinet.kernels.backend()}, "
        f"THP mode {pinet.memory.transparent_huge_pages_mode()}, {torch.get_num_threads()} threads, "
        f"load average at end {load[0]:.2f} / {load[1]:.2f}; medians of {a.repeats} alternating steps"
        + (" (quick: too small to mean anything)" if a.quick else ""),
        "",
        "| M | huge pages ms/step | 4 KiB pages ms/step | 4 KiB ÷ huge | stores MB | huge pages gained while built (on / off) |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        (mb, on), (_, off) = row["huge_share"]["on"], row["huge_share"]["off"]
        lines.append(
            f"| {row['M']:,} | {row['huge_ms']:.2f} | {row['small_ms']:.2f} | {row['ratio']:.3f} | {mb:.0f} | {on:.0f} / {off:.0f} MB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (a.out / "bench_huge_pages.md").write_text(text)
    result = {"rows": rows, "thp_mode": pinet.memory.transparent_huge_pages_mode(), "threads": torch.get_num_threads()}
    (a.out / "bench_huge_pages.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
