"""Thin-product ceiling of this CPU: ``python -m benchmarks.thin_gemm``.

A π-layer's training step is four products of a tall state matrix (M × r, row-major) with a
batch-sized operand: ``B ḡᵀ`` and ``A δᵀ`` ("dot": (M, r) @ (r, b)) and ``wᵀ A``, ``(∂L/∂q)ᵀ B``
("reduce": (b, M) @ (M, r)). With b = 8 each does 2·b = 16 FLOPs per 4-byte element it reads, so a
step reaches the memory-read floor of ``bench_step`` only if the CPU sustains ``4 FLOP/byte × read
bandwidth`` on these shapes. This probe measures, in one run, what it sustains: torch's BLAS and
hand-written AVX2/FMA kernels (register-blocked, OpenMP over row blocks: the dot defined here, the
reduce from :mod:`pinet.native`, both compiled by :mod:`pinet.native`'s build step), each on a state
that streams from memory (M = 40,000 rows) and on one that stays in cache (M = 2,048 rows, 3.3 MB,
repeated to the same FLOPs), next to the read bandwidth and the square-sgemm rate, to tell a slow
library apart from a compute-bound machine (issue 6).

Writes ``thin_gemm.md`` and ``thin_gemm.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import pinet

from .bench_step import PASSES, Config, flops_per_row, read_bandwidth, sgemm_rate

# The dot kernel, float32 only (the benchmark's storage dtype): Y (M, n) = X (M, K) @ W(n, K)ᵀ by
# pinet.kernels.native.DOT (the fused backend's dot), OpenMP over pairs of rows. The reduce kernel
# is pinet's own (:mod:`pinet.native`).
KERNEL_SOURCE = pinet.kernels.native.PRELUDE + pinet.kernels.native.DOT + r"""
extern "C" void thin_dot(const float* X, int64_t M, int64_t K, const float* W, int64_t n, float* Y,
                         int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < M / 2; ++i) dot_rows<2>(X + 2 * i * K, K, W, n, Y + 2 * i * n);
  if (M % 2) dot_rows<1>(X + (M - 1) * K, K, W, n, Y + (M - 1) * n);
}
"""


class HandKernels:
    """Hand-written AVX2 kernels: the probe's dot and :func:`pinet.native.reduce_into`, both built
    by pinet.native's compiler step (cached in ``$PINET_CACHE``).

    Raises :class:`pinet.native.NativeUnavailable` (a ``RuntimeError`` saying what is missing:
    x86-64 with AVX2, g++, a successful build); nothing falls back silently.
    """

    def __init__(self) -> None:
        self._lib = pinet.native._compile(KERNEL_SOURCE, "thin_gemm_probe")
        P, I = ctypes.c_void_p, ctypes.c_int64
        self._lib.thin_dot.argtypes = [P, I, I, P, I, P, ctypes.c_int]
        pinet.native._load()

    def dot(self, X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``X @ Wᵀ``: X (M, K), W (n, K) -> (M, n)."""
        pinet.native._check("HandKernels.dot", "X", X)
        pinet.native._check("HandKernels.dot", "W", W)
        if W.shape[1] != X.shape[1]:
            raise ValueError(f"HandKernels.dot: W must have K = {X.shape[1]} columns, got {W.shape[1]}")
        Y = torch.empty(X.shape[0], W.shape[0])
        self._lib.thin_dot(X.data_ptr(), X.shape[0], X.shape[1], W.data_ptr(), W.shape[0], Y.data_ptr(),
                           torch.get_num_threads())  # fmt: skip
        return Y

    def reduce(self, V: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``Vᵀ @ X``: V (M, n), X (M, K) -> (n, K), by :func:`pinet.native.reduce_into`."""
        return pinet.native.reduce_into(torch.zeros(V.shape[1], X.shape[1]), V, X)


def _interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median seconds of each zero-argument ``fn``, timed round-robin so all see the same load."""
    for fn in fns:
        fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def probe(M: int, M_cache: int, r: int, batch: int, repeats: int, kernels: HandKernels) -> dict:
    """GFLOP/s of the dot and reduce products for torch and the hand kernel, streaming (``M``
    rows) and in cache (``M_cache`` rows, repeated ``M // M_cache`` times), plus the largest
    relative deviation of each from a float64 evaluation."""
    gen = torch.Generator().manual_seed(0)
    out: dict = {"err": {}}
    for where, rows in (("stream", M), ("cache", M_cache)):
        reps = max(1, M // rows)
        X = torch.randn(rows, r, generator=gen)
        W = torch.randn(batch, r, generator=gen)
        V = torch.randn(rows, batch, generator=gen)

        def rep(f):
            def run():
                for _ in range(reps):
                    f()
            return run

        cands = {
            "dot torch": rep(lambda: X @ W.T),
            "dot hand": rep(lambda: kernels.dot(X, W)),
            "reduce torch": rep(lambda: V.T @ X),
            "reduce hand": rep(lambda: kernels.reduce(V, X)),
        }
        secs = _interleaved_medians(list(cands.values()), repeats)
        flops = 2.0 * rows * r * batch * reps
        for name, s in zip(cands, secs):
            out[f"{name} {where}"] = flops / s / 1e9
        if where == "stream":
            ref_dot = X.double() @ W.double().T
            ref_red = V.double().T @ X.double()
            for name, got, ref in (("dot torch", X @ W.T, ref_dot), ("dot hand", kernels.dot(X, W), ref_dot),
                                   ("reduce torch", V.T @ X, ref_red), ("reduce hand", kernels.reduce(V, X), ref_red)):  # fmt: skip
                out["err"][name] = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the probe (``argv`` as on the command line); returns what the JSON file holds."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.thin_gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=40_000, help="rows of the streaming state (default 40000)")
    p.add_argument("--cache-rows", type=int, default=2048, help="rows of the in-cache state (default 2048: 3.3 MB, in L3)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per candidate (median reported)")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the machinery in a few seconds")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    a = p.parse_args(argv)
    cfg = Config()
    bw_mb = cfg.bw_mbytes
    if a.quick:
        a.rows, a.cache_rows, a.repeats, bw_mb = 2048, 256, 3, 16
    with tqdm(total=4, desc="thin_gemm", file=sys.stderr) as bar:
        kernels = HandKernels()
        bar.update()
        bw = read_bandwidth(bw_mb)
        bar.update()
        square = sgemm_rate(512 if a.quick else 1536) / 1e9
        bar.update()
        res = probe(a.rows, a.cache_rows, cfg.r, cfg.batch, a.repeats, kernels)
        bar.update()
    need = 2 * cfg.batch / 4 * bw / 1e9  # GFLOP/s that keeps up with streaming at b FLOP pairs per float
    best = max(res[f"{k} stream"] for k in ("dot torch", "dot hand")), max(res[f"{k} stream"] for k in ("reduce torch", "reduce hand"))  # fmt: skip
    # A step's four products per π-layer are two dots and two reduces: per row, FLOPs split evenly.
    fpr = flops_per_row(cfg)
    row_us = fpr / 2 / best[0] / 1e3 + fpr / 2 / best[1] / 1e3
    floor_us = PASSES * (cfg.depth * 2 * cfg.r + cfg.r + cfg.d_out + cfg.depth + 1) * 4 / bw * 1e6
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, r = {cfg.r}, b = {cfg.batch}, float32"
        + (" (quick: sizes too small to mean anything)" if a.quick else ""),
        "",
        f"read bandwidth {bw / 1e9:.1f} GB/s -> streaming at the read floor needs {need:.0f} GFLOP/s; "
        f"square sgemm {square:.1f} GFLOP/s",
        "",
        "| product | torch, streaming | hand AVX2, streaming | torch, in cache | hand AVX2, in cache |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, label in (("dot", f"dot ({a.rows}×{cfg.r}) @ ({cfg.r}×{cfg.batch})"),
                        ("reduce", f"reduce ({cfg.batch}×{a.rows}) @ ({a.rows}×{cfg.r})")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(f"{res[f'{kind} {w} {s}']:.1f}" for s, w in
                     (("stream", "torch"), ("stream", "hand"), ("cache", "torch"), ("cache", "hand"))) + " |")  # fmt: skip
    lines += [
        "",
        "GFLOP/s, median of interleaved calls. Max relative deviation from float64: "
        + ", ".join(f"{k} {v:.1e}" for k, v in res["err"].items()),
        "",
        f"Best streaming rates (dot {best[0]:.1f}, reduce {best[1]:.1f} GFLOP/s) put the bare products "
        f"of the bench_step network at {row_us:.2f} µs per row per step = {row_us / floor_us:.2f}× its "
        f"read floor ({floor_us:.2f} µs/row, {PASSES} passes at {bw / 1e9:.1f} GB/s).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "thin_gemm.md").write_text(text)
    result = {"read_GBps": bw / 1e9, "square_GFLOPs": square, "need_GFLOPs": need, "row_us": row_us,
              "floor_us": floor_us, **res}  # fmt: skip
    (a.out / "thin_gemm.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
