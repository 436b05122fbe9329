"""The shape of the paper's Table 1 on scikit-learn's digits: NNGP, NTK, finite π-nets of several
widths, a finite MLP trained without projection, and the π-limit, each with its test accuracy
(mean ± std over seeds) and wall time per run, written as a markdown table::

    python -m experiments.compare                     # 3 seeds, widths 256,512,1024: a few minutes
    python -m experiments.compare --seeds 1 --widths 256 --epochs 2    # quick look

All networks share the π-net hyperparameters of ``experiments.train`` (same flags, same defaults)
and the same fixed train/test split; seed ``s`` fixes the infinite initialisation, the finite
π-nets are ``.sample(width)`` of that same initialisation, and the MLP uses the same seed for its
own Gaussian initialisation. The kernels use the same depth and multipliers; they are
deterministic given the split (std 0), and their ridge is chosen on a validation split carved
from the training set, then refit on the whole training set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from experiments.common import (
    CLIError,
    add_training_args,
    check_output_file,
    check_training_args,
    fit,
    load_digits_data,
    precision,
    resolve_device,
)
from experiments.train import DEFAULTS
from pinet.baselines import MLP, KernelRegressor

METHODS = ("nngp", "ntk", "finite", "mlp", "limit")


def _ints(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def _floats(text: str) -> list[float]:
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out or any(not v >= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return out


def _methods(text: str) -> list[str]:
    out = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [m for m in out if m not in METHODS]
    if bad or not out:
        msg = f"unknown method(s) {bad or text!r}; choose from {','.join(METHODS)}"
        raise argparse.ArgumentTypeError(msg)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: the π-net flags of ``experiments.train`` plus the comparison's own."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description="Table 1 of the π-limit paper on digits: NNGP, NTK, finite π-nets, an MLP without "
        "projection and the π-limit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_args(p, DEFAULTS, default_precision="float32", single_run=False)
    arg = p.add_argument_group("comparison").add_argument
    arg("--seeds", type=int, default=3, help="number of seeds per network: --seed, --seed+1, ...")
    arg("--widths", type=_ints, default=[256, 512, 1024], help="widths of the finite π-nets (each >= --r)")
    arg("--mlp-width", type=int, default=1024, help="width of the MLP trained without projection")
    arg("--ridges", type=_floats, default=[0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        help="ridges tried for the kernels (relative to the mean kernel diagonal)")
    arg("--methods", type=_methods, default=list(METHODS), help=f"subset of {','.join(METHODS)}")
    arg("--out", type=str, default="output/compare.md", help="markdown file (raw results: same name, .json)")
    arg("--split-seed", type=int, default=0, help="seed of the fixed train/test split")
    return p


def _kernel_row(kind: str, args, data) -> dict:
    """Kernel ridge regression with the ridge picked on a validation split of the training set."""
    kw = dict(first_layer_alpha=args.first_layer_alpha, last_layer_alpha=args.last_layer_alpha,
              bias_alpha=args.bias_alpha, last_bias_alpha=args.last_bias_alpha)  # fmt: skip
    if kind == "ntk":
        kw |= dict(first_layer_lr_mult=args.first_layer_lr_mult, last_layer_lr_mult=args.last_layer_lr_mult,
                   bias_lr_mult=args.bias_lr_mult)  # fmt: skip
    t0 = time.perf_counter()
    n_val = max(1, data.n_train // 5)
    Xf, yf = data.X_train[:-n_val], data.y_train[:-n_val]
    Xv, yv = data.X_train[-n_val:], data.y_train[-n_val:]
    best = None
    for ridge in args.ridges:
        acc = KernelRegressor(kind, args.depth, ridge, **kw).fit(Xf, yf).score(Xv, yv)
        if best is None or acc >= best[0]:  # ties go to the larger ridge: the better-conditioned solve
            best = (acc, ridge)
    model = KernelRegressor(kind, args.depth, best[1], **kw).fit(data.X_train, data.y_train)
    acc = model.score(data.X_test, data.y_test)
    dt = time.perf_counter() - t0
    name = {"nngp": "NNGP", "ntk": "NTK"}[kind]
    return {"method": f"{name} (kernel ridge, ridge {best[1]:g})", "width": "∞", "accs": [acc], "times": [dt],
            "note": "deterministic; ridge picked on a validation split"}  # fmt: skip


def _mlp(args, data, width, seed, device):
    _, compute = precision(args)
    return MLP(
        data.d_in, data.d_out, width, args.depth, first_layer_alpha=args.first_layer_alpha,
        last_layer_alpha=args.last_layer_alpha, bias_alpha=args.bias_alpha,
        last_bias_alpha=args.last_bias_alpha, layernorm=args.layernorm, device=device, dtype=compute,
        generator=torch.Generator(device=device).manual_seed(seed),
    )  # fmt: skip


def _net_rows(args, data, device, log) -> list[dict]:
    seeds = list(range(args.seed, args.seed + args.seeds))
    plan = []
    if "finite" in args.methods:
        plan += [("finite", w) for w in args.widths]
    if "mlp" in args.methods:
        plan.append(("mlp", args.mlp_width))
    if "limit" in args.methods:
        plan.append(("limit", 0))
    rows = []
    for kind, width in plan:
        accs, times = [], []
        for seed in seeds:
            run = argparse.Namespace(**vars(args))
            run.seed, run.width = seed, (width if kind == "finite" else 0)
            model = _mlp(args, data, width, seed, device) if kind == "mlp" else None
            t0 = time.perf_counter()
            try:
                res = fit(run, data, device=device, progress=False, quiet=True, model=model)
            except CLIError as e:
                raise CLIError(f"{kind} width {width} seed {seed}: {e}") from None
            times.append(time.perf_counter() - t0)
            accs.append(res.history[-1]["test_acc"] if res.history else float("nan"))
            acc, t = 100 * accs[-1], times[-1]
            log(f"  {kind:6s} width {width or '∞':>5} seed {seed}: test {acc:.2f}%  ({t:.1f}s)")
        row = {"width": str(width) if width else "∞", "accs": accs, "times": times}
        if kind == "finite":
            row |= {"method": "finite π-net", "note": "sampled from the π-limit's init, projected SGD"}
        elif kind == "mlp":
            row |= {"method": "MLP, no projection (μP)", "note": "full-rank Gaussian init, plain SGD"}
        else:
            M = res.history[-1]["rows"][0] if res.history else 0
            row |= {"method": "π-limit (infinite π-net)", "note": f"final M per π-layer: {M}"}
        rows.append(row)
    return rows


def _fmt(row: dict) -> str:
    accs = [100 * a for a in row["accs"]]
    mean = statistics.fmean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    t = statistics.fmean(row["times"])
    cells = [row["method"], row["width"], f"{mean:.2f} ± {std:.2f}", f"{t:.1f}", str(len(accs)), row["note"]]
    return "| " + " | ".join(cells) + " |"


def render(rows: list[dict], args, data) -> str:
    """The markdown table, preceded by one paragraph describing the setting."""
    lr_mults = f"{args.first_layer_lr_mult}/{args.last_layer_lr_mult}/{args.bias_lr_mult}"
    mults = (f"α_in={args.first_layer_alpha}, α_out={args.last_layer_alpha}, β={args.bias_alpha}, "
             f"lr mults first/last/bias={lr_mults}")
    clip = "no clipping"
    if args.gclip:
        clip = f"gclip {args.gclip}{' per param' if args.gclip_per_param else ''}"
    wd = f"wd {args.wd}{'' if args.apply_lr_mult_to_wd else ' (not scaled by lr mults)'}"
    head = (
        f"digits ({data.n_train} train / {data.n_test} test, fixed split {args.split_seed}). Networks: "
        f"r={args.r}, depth={args.depth}, {args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr}, "
        f"momentum {args.momentum}, {wd}, {clip}, {args.loss} loss, {mults}. Seeds {args.seed}.."
        f"{args.seed + args.seeds - 1}. Wall time per run (training + per-epoch test evaluation) on "
        f"{platform.machine()} with {torch.get_num_threads()} torch thread(s)."
    )
    lines = [head, "", "| Method | Width | Test accuracy (%) | Wall time / run (s) | Runs | Notes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    return "\n".join(lines + [_fmt(r) for r in rows]) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the comparison with ``argv`` (default ``sys.argv[1:]``): prints the table and writes
    ``--out`` (markdown) and the same path with ``.json`` (raw accuracies and times)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_training_args(p, args)
    if args.seeds < 1:
        p.error(f"argument --seeds: must be a positive integer, got {args.seeds}")
    if args.mlp_width < 1:
        p.error(f"argument --mlp-width: must be a positive integer, got {args.mlp_width}")
    if args.train_subset is not None and args.train_subset < 2:
        # The kernels pick their ridge on a validation split carved from the training examples.
        p.error(f"argument --train-subset: must be >= 2 (a training and a validation example), got {args.train_subset}")
    bad_ridges = [v for v in args.ridges if not (math.isfinite(v) and v >= 0)]
    if bad_ridges or not args.ridges:
        p.error(f"argument --ridges: finite numbers >= 0, got {bad_ridges or args.ridges}")
    small = [w for w in args.widths if w < args.r]
    if small and "finite" in args.methods:
        p.error(f"argument --widths: finite π-nets need width >= r = {args.r}, got {small}")
    try:
        if args.out:
            check_output_file("--out", args.out, also=(".json",))  # now, not after the runs
        device = resolve_device(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        data = load_digits_data(split_seed=args.split_seed, train_subset=args.train_subset,
                                test_subset=args.test_subset)  # fmt: skip

        def log(msg):
            print(msg, flush=True)

        rows = []
        for kind in ("nngp", "ntk"):  # Table 1's order: kernels, finite networks by width, π-limit
            if kind in args.methods:
                rows.append(_kernel_row(kind, args, data))
                acc, t = rows[-1]["accs"][0], rows[-1]["times"][0]
                log(f"  {kind:6s} width     ∞        : test {100 * acc:.2f}%  ({t:.1f}s)")
        rows += _net_rows(args, data, device, log)
        table = render(rows, args, data)
        print()
        print(table, end="")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(table)
            with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
                json.dump({"args": vars(args), "rows": rows}, f, indent=1)
            print(f"wrote {args.out}")
    except CLIError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
