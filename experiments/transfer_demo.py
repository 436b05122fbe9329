"""Transfer learning on embedded data (no download): pretrain on digits 0-4, transfer to digits 5-9
by kernel ridge regression with each model's feature kernel (spec, "Feature kernel"), the
paper's ImageNet -> CIFAR-10 protocol in miniature::

    python -m experiments.transfer_demo             # 3 seeds, about a minute on 2 CPU cores
    python -m experiments.transfer_demo --seeds 1 --epochs 2    # quick look

Rows of the table (all on the same fixed split of scikit-learn's digits):

- π-limit trained on the source classes (infinite π-MLP, ``experiments.train``'s hyperparameters);
- the same π-limit untrained (its initialisation: a rank-r feature kernel, not the NNGP);
- finite π-nets *sampled from the trained π-limit* at several widths (their feature kernels
  converge to the π-limit's at rate n^-1/2);
- a finite π-net trained on the source itself (projected SGD from the sampled initialisation);
- a finite μP MLP trained on the source without projection (its ``features``' dot product);
- the NNGP and NTK kernels of the same architecture (no pretraining).

Target task: the five held-out classes, with ``--shots`` labelled images per class and with all of
the target training images; the ridge is ``--ridge`` relative to the kernel's mean diagonal (the
reference's 1e-4, made independent of each kernel's scale). Writes the markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

import pinet
from experiments.common import (
    CLIError,
    TensorData,
    add_training_args,
    check_output_file,
    check_training_args,
    fit,
    load_digits_data,
)
from experiments.train import DEFAULTS
from pinet.baselines import MLP, accuracy, kernel_ridge, nngp_kernel, ntk_kernel, one_hot_targets

SOURCE = (0, 1, 2, 3, 4)


def _ints(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: ``experiments.train``'s π-net flags plus the demo's own."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.transfer_demo",
        description="Pretrain on digits 0-4, transfer to digits 5-9 with feature kernels: trained π-limit, "
        "untrained π-limit, finite π-nets sampled from the trained one, a trained finite π-net, a μP MLP, NNGP, NTK.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_args(p, DEFAULTS, default_precision="float32", single_run=False)
    d = p.add_argument_group("transfer demo")
    arg = d.add_argument
    arg("--seeds", type=int, default=3, help="number of seeds (from --seed)")
    arg(
        "--widths",
        type=_ints,
        default=[256, 1024, 4096],
        help="widths of the finite π-nets sampled from the trained π-limit",
    )
    arg(
        "--trained-width",
        type=int,
        default=512,
        help="width of the finite π-net trained on the source (0: none)",
    )
    arg("--mlp-width", type=int, default=1024, help="width of the μP MLP trained on the source (0: none)")
    arg("--shots", type=int, default=10, help="labelled target images per class in the few-shot column")
    arg("--ridge", type=float, default=1e-4, help="ridge λ, relative to the kernel's mean diagonal")
    arg("--split-seed", type=int, default=0, help="seed of the fixed digits train/test split")
    arg("--out", type=str, default="output/transfer_demo.md", help="markdown table ('' : do not write)")
    arg("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _subset(X, y, classes):
    m = torch.isin(y, torch.tensor(classes))
    lut = {c: i for i, c in enumerate(classes)}
    return X[m], torch.tensor([lut[int(v)] for v in y[m]], dtype=torch.long)


def _few(y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first ``k`` examples of every class (the split is already shuffled)."""
    return torch.cat([torch.nonzero(y == c).flatten()[:k] for c in range(int(y.max()) + 1)])


class Target:
    """The target task: ``(X, y)`` train/test of the held-out classes and the few-shot subset."""

    def __init__(self, data: TensorData, classes, shots: int, ridge: float) -> None:
        self.Xtr, self.ytr = _subset(data.X_train, data.y_train, classes)
        self.Xte, self.yte = _subset(data.X_test, data.y_test, classes)
        self.few = _few(self.ytr, shots)
        self.ridge = ridge

    def score(self, kernel) -> tuple[float, float]:
        """``kernel(X1, X2=None) -> (N1, N2)`` float64 -> (few-shot accuracy, all-label accuracy)."""
        K = kernel(self.Xtr).double()
        Kt = kernel(self.Xte, self.Xtr).double()
        out = []
        for idx in (self.few, torch.arange(len(self.ytr))):
            Y = one_hot_targets(self.ytr[idx])
            pred = kernel_ridge(K[idx][:, idx], Y, Kt[:, idx], self.ridge, relative=True)
            out.append(accuracy(pred, self.yte))
        return out[0], out[1]


def _feature(net):
    return lambda a, b=None: pinet.feature_kernel(net, a, b, dtype=torch.float64)


def _mlp_feature(mlp: MLP):
    def k(a, b=None):
        with torch.no_grad():
            fa = mlp.features(a).double()
            fb = fa if b is None else mlp.features(b).double()
        return fa @ fb.T

    return k


def run(args, log) -> tuple[list[dict], dict]:
    """All rows of the table: ``{"method", "width", "few": [...], "all": [...], "src": [...], "times": [...]}``."""
    data = load_digits_data(split_seed=args.split_seed)
    target_classes = tuple(c for c in range(10) if c not in SOURCE)
    Xs, ys = _subset(data.X_train, data.y_train, SOURCE)
    Xst, yst = _subset(data.X_test, data.y_test, SOURCE)
    source = TensorData("digits 0-4", Xs, ys, Xst, yst, num_classes=len(SOURCE))
    target = Target(data, target_classes, args.shots, args.ridge)
    info = dict(n_source=len(ys), n_target=len(target.ytr), n_few=len(target.few), n_test=len(target.yte))
    rows: dict[str, dict] = {}

    def add(key, method, width, few, all_, t, src=None, note=""):
        r = rows.setdefault(
            key,
            {"method": method, "width": width, "few": [], "all": [], "src": [], "times": [], "note": note},
        )
        r["few"].append(few)
        r["all"].append(all_)
        r["times"].append(t)
        if src is not None:
            r["src"].append(src)
        log(f"  {method} {width}: {100 * few:.2f}% / {100 * all_:.2f}% ({t:.1f}s)")

    kw = dict(
        depth=args.depth,
        first_layer_alpha=args.first_layer_alpha,
        last_layer_alpha=args.last_layer_alpha,
        bias_alpha=args.bias_alpha,
        last_bias_alpha=args.last_bias_alpha,
    )
    for key, fn, name in (("nngp", nngp_kernel, "NNGP kernel"), ("ntk", ntk_kernel, "NTK kernel")):
        t0 = time.perf_counter()
        few, all_ = target.score(lambda a, b=None, fn=fn: fn(a, b, **kw))
        add(key, name, "∞", few, all_, time.perf_counter() - t0, note="no pretraining")
    seeds = range(args.seed, args.seed + args.seeds)
    for seed in seeds:
        run_args = argparse.Namespace(**vars(args))
        run_args.seed, run_args.width = seed, 0
        t0 = time.perf_counter()
        res = fit(run_args, source, device=torch.device("cpu"), progress=False, quiet=True)
        t_train = time.perf_counter() - t0
        net = res.model
        src = res.history[-1]["test_acc"] if res.history else float("nan")
        t0 = time.perf_counter()
        few, all_ = target.score(_feature(net))
        M = net.layers[1].state.rows
        add(
            "limit",
            "π-limit, pretrained",
            "∞",
            few,
            all_,
            t_train + time.perf_counter() - t0,
            src,
            note=f"M = {M} rows per π-layer after pretraining",
        )
        init = pinet.InfPiMLP(source.d_in, source.d_out, args.r, args.depth, **net.multipliers())
        init.reset_parameters(torch.Generator().manual_seed(seed))  # the initialisation fit() started from
        t0 = time.perf_counter()
        few, all_ = target.score(_feature(init))
        add(
            "init",
            "π-limit, untrained (same init)",
            "∞",
            few,
            all_,
            time.perf_counter() - t0,
            note="rank-r initial features",
        )
        for w in args.widths:
            t0 = time.perf_counter()
            fin = net.sample(w, generator=torch.Generator().manual_seed(1000 * seed + w))
            few, all_ = target.score(_feature(fin))
            add(
                f"sampled{w}",
                "finite π-net sampled from the pretrained π-limit",
                str(w),
                few,
                all_,
                time.perf_counter() - t0,
                note="no training of its own",
            )
        if args.trained_width:
            run_args.width = args.trained_width
            t0 = time.perf_counter()
            res = fit(run_args, source, device=torch.device("cpu"), progress=False, quiet=True)
            few, all_ = target.score(_feature(res.model))
            add(
                "fintrained",
                "finite π-net, pretrained",
                str(args.trained_width),
                few,
                all_,
                time.perf_counter() - t0,
                res.history[-1]["test_acc"],
                note="projected SGD, same hyperparameters",
            )
        if args.mlp_width:
            run_args.width = 0
            mlp = MLP(
                source.d_in,
                source.d_out,
                args.mlp_width,
                args.depth,
                layernorm=args.layernorm,
                generator=torch.Generator().manual_seed(seed),
                **{k: v for k, v in kw.items() if k != "depth"},
            )
            t0 = time.perf_counter()
            res = fit(run_args, source, device=torch.device("cpu"), progress=False, quiet=True, model=mlp)
            few, all_ = target.score(_mlp_feature(mlp))
            add(
                "mlp",
                "μP MLP, pretrained (no projection)",
                str(args.mlp_width),
                few,
                all_,
                time.perf_counter() - t0,
                res.history[-1]["test_acc"],
                note="full-rank Gaussian init, plain SGD",
            )
    order = ["limit", "init"] + [f"sampled{w}" for w in args.widths] + ["fintrained", "mlp", "nngp", "ntk"]
    return [rows[k] for k in order if k in rows], info


def _cell(xs: list[float]) -> str:
    if not xs:
        return "–"
    xs = [100 * x for x in xs]
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.2f} ± {std:.2f}"


def render(rows: list[dict], info: dict, args, seconds: float) -> str:
    """The markdown table with a paragraph describing the setting."""
    head = (
        f"Pretrain on digits 0-4 ({info['n_source']} training images), transfer to digits 5-9 by kernel ridge "
        f"regression with each model's feature kernel: {args.shots} labelled images per class "
        f"({info['n_few']}) or all {info['n_target']}, {info['n_test']} test images; ridge {args.ridge:g} × mean "
        f"diagonal. Networks: r={args.r}, depth={args.depth}, {args.epochs} epochs, batch {args.batch_size}, lr "
        f"{args.lr} (experiments.train's defaults). Seeds {args.seed}..{args.seed + args.seeds - 1} (mean ± std); "
        f"{seconds:.0f} s in all on {platform.machine()} with {torch.get_num_threads()} torch thread(s)."
    )
    lines = [
        head,
        "",
        f"| Method | Width | Target acc., {args.shots}/class (%) | Target acc., all (%) | "
        "Source test acc. (%) | Time / run (s) | Notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = statistics.fmean(r["times"])
        lines.append(
            f"| {r['method']} | {r['width']} | {_cell(r['few'])} | {_cell(r['all'])} | {_cell(r['src'])} | "
            f"{t:.1f} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Run the demo with ``argv``; prints and returns the markdown table (and writes ``--out``)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_training_args(p, args)
    # Flags of experiments.train that this demo cannot honour: refused, not silently ignored.
    for flag, v in (("--train-subset", args.train_subset), ("--test-subset", args.test_subset)):
        if v is not None:
            p.error(f"argument {flag}: not used by the transfer demo (it uses the whole digits split: "
                    "source digits 0-4, target digits 5-9)")  # fmt: skip
    if args.cuda:
        p.error("argument --cuda: the transfer demo runs on the CPU (its nets are small)")
    if args.out:
        try:
            check_output_file("--out", args.out)  # now, not after the runs
        except CLIError as e:
            p.error(f"argument {e}")
    if args.seeds < 1:
        p.error(f"argument --seeds: must be a positive integer, got {args.seeds}")
    if args.shots < 1:
        p.error(f"argument --shots: must be a positive integer, got {args.shots}")
    if any(w < args.r for w in args.widths) or 0 < args.trained_width < args.r:
        p.error(f"argument --widths/--trained-width: finite π-nets need width >= r = {args.r}")
    if args.mlp_width < 0 or args.trained_width < 0:
        p.error("argument --mlp-width/--trained-width: must be >= 0")
    if not (math.isfinite(args.ridge) and args.ridge >= 0):
        p.error(f"argument --ridge: must be a finite number >= 0, got {args.ridge}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        per_seed = 2 + len(args.widths) + bool(args.trained_width) + bool(args.mlp_width)
        bar = tqdm(total=2 + per_seed * args.seeds, desc="transfer demo", leave=False, file=sys.stderr)

    def log(msg):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(msg.strip()[:60], refresh=True)

    try:
        t0 = time.perf_counter()
        rows, info = run(args, log)
        table = render(rows, info, args, time.perf_counter() - t0)
    except CLIError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if bar is not None:
            bar.close()
    print(table, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
