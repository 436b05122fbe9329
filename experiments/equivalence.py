"""Equivalence experiment: an infinite π-net and finite π-nets sampled from it, trained side by side.

    python -m experiments.equivalence                      # d1-sgd, widths 256..4096, 10 seeds
    python -m experiments.equivalence --config d1-momentum-mix --widths 256,1024,4096,16384

For every seed, one infinite net is trained, and for every width ``--omegas`` finite nets sampled
from it before training are trained on the same batches with the same wrapped optimizer (the
harness of the equivalence tests, :mod:`pinet.testing`; configurations by name from its
``RATE_CONFIGS``). Writes ``<out>/<name>.png``: the loss curves of the first seed (infinite
dashed, finite per width) and the error against width with an n^-1/2 line; and
``<out>/<name>.md`` / ``<out>/<name>.csv``: the error table (relative errors of held-out outputs
after training, of the loss curve and of the gradient-norm curve; mean, geometric mean and
spread over seeds, and fitted log-log slopes). Runs in float64 on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from pathlib import Path

import torch

from experiments.common import CLIError, check_output_dir
from pinet import testing as H


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.equivalence", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="d1-sgd", choices=sorted(H.RATE_CONFIGS), help="training configuration")
    p.add_argument("--widths", default="256,1024,4096", help="comma-separated widths of the finite nets")
    p.add_argument("--seeds", type=int, default=10, help="data/initialisation seeds (one infinite net each)")
    p.add_argument("--omegas", type=int, default=1, help="finite nets (independent Ω) per width and seed")
    p.add_argument("--out", default="docs", help="output directory")
    p.add_argument("--name", default="equivalence", help="file name stem of the figure and tables")
    p.add_argument(
        "--all-configs", action="store_true",
        help="instead: run every configuration of the rate tests (widths, --seeds) and write the "
        "table of errors and slopes per configuration to <out>/<name>_rates.md",
    )  # fmt: skip
    p.add_argument(
        "--calibrate", type=int, metavar="N", default=0,
        help="instead: measure what the property and trained-sampling tests' bounds come from (N drawn "
        "configurations at depths 0-2, the deliberately broken optimizers, trained sampling) and write "
        "<out>/<name>_calibration.md",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Every flag before any work or any folder is made: one line naming the flag, exit 2.
    r = H.RATE_CONFIGS[args.config].r
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        widths = []
    if not widths or any(w < r for w in widths):
        p.error(f"argument --widths: comma-separated widths >= r = {r} of --config {args.config}, got {args.widths!r}")
    if not args.calibrate:
        # The tables fit a log-log slope over the widths: one width (or a repeated one) made it NaN,
        # written into the table with exit 0. --calibrate uses its own widths.
        if len(set(widths)) != len(widths):
            p.error(f"argument --widths: each width at most once, got {args.widths!r}")
        if len(widths) < 2:
            p.error(f"argument --widths: at least two distinct widths (a log-log slope needs two), got {args.widths!r}")
        if args.all_configs and sum(w <= 8192 for w in widths) < 2:
            p.error(f"argument --widths: --all-configs runs depth >= 2 only at widths <= 8192 and needs two of "
                    f"them, got {args.widths!r}")  # fmt: skip
    args.widths = ",".join(map(str, widths))
    for flag, v in (("--seeds", args.seeds), ("--omegas", args.omegas)):
        if v < 1:
            p.error(f"argument {flag}: must be a positive integer, got {v}")
    if args.threads is not None and args.threads < 1:
        p.error(f"argument --threads: must be a positive integer, got {args.threads}")
    if args.calibrate < 0:
        p.error(f"argument --calibrate: must be >= 0 (0: off), got {args.calibrate}")
    if not args.name or os.sep in args.name or args.name in (".", ".."):
        p.error(f"argument --name: a file name stem without {os.sep!r}, got {args.name!r}")
    try:
        check_output_dir("--out", args.out)
    except CLIError as e:
        p.error(f"argument {e}")


def run(cfg: H.TrainConfig, widths: list[int], seeds: int, omegas: int, progress: bool = True) -> dict:
    """Train everything. Returns ``{"inf_losses": [S] per seed, "fin_losses": {w: [[S] per Ω] per
    seed}, "err": {which: {w: [error per (seed, Ω)]}}, "seconds": {w: total}}``."""
    from tqdm import tqdm

    out = {
        "inf_losses": [],
        "fin_losses": {w: [] for w in widths},
        "err": {k: {w: [] for w in widths} for k in ("out", "loss", "gnorm")},
        "seconds": {w: 0.0 for w in widths},
    }
    bar = tqdm(total=seeds * len(widths) * omegas, disable=not progress, desc=cfg.name, unit="net")
    for seed in range(seeds):
        init, inf, task = H.train_infinite(cfg, seed)
        out["inf_losses"].append(inf.losses)
        for w in widths:
            curves = []
            for j in range(omegas):
                bar.set_postfix(seed=seed, width=w)
                t0 = time.perf_counter()
                fin = H.train_finite(init, cfg, task, seed, w, j)
                out["seconds"][w] += time.perf_counter() - t0
                curves.append(fin.losses)
                out["err"]["out"][w].append(H.rel_error(fin.outputs, inf.outputs))
                out["err"]["loss"][w].append(H.rel_error(fin.losses, inf.losses))
                out["err"]["gnorm"][w].append(H.rel_error(fin.grad_norms, inf.grad_norms))
                bar.update()
            out["fin_losses"][w].append(curves)
    bar.close()
    return out


def table_rows(res: dict, widths: list[int]) -> list[dict]:
    """One row per width: mean / geometric mean / std of each error, seconds per finite run."""
    rows = []
    for w in widths:
        row = {"width": w}
        for which in ("out", "loss", "gnorm"):
            xs = res["err"][which][w]
            mean = sum(xs) / len(xs)
            row[f"{which}_mean"] = mean
            row[f"{which}_geo"] = H.geo_mean(xs)
            row[f"{which}_std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1))
        row["runs"] = len(res["err"]["out"][w])
        row["sec_per_run"] = res["seconds"][w] / row["runs"]
        rows.append(row)
    return rows


def write_tables(rows: list[dict], widths: list[int], cfg: H.TrainConfig, out: Path, name: str, seeds: int, omegas: int) -> Path:
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    slopes = {
        which: (H.fit_slope(widths, [r[f"{which}_mean"] for r in rows]), H.fit_slope(widths, [r[f"{which}_geo"] for r in rows]))
        for which in ("out", "loss", "gnorm")
    }
    lines = [
        f"Configuration `{cfg.name}` ({cfg.short()}); {seeds} seeds × {omegas} finite net(s) per width; "
        f"float64. Relative errors against the infinite net: outputs on {cfg.test} held-out points after "
        f"{cfg.steps} steps, the loss curve, the gradient-norm curve. Mean ± std and geometric mean over runs.",
        "",
        "| width | output error | (geo) | loss-curve error | (geo) | grad-norm error | (geo) | s / run |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['out_mean']:.4f} ± {r['out_std']:.4f} | {r['out_geo']:.4f} "
            f"| {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | {r['loss_geo']:.4f} "
            f"| {r['gnorm_mean']:.4f} ± {r['gnorm_std']:.4f} | {r['gnorm_geo']:.4f} | {r['sec_per_run']:.2f} |"
        )
    lines.append(
        "| log-log slope | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | |".format(
            *[v for which in ("out", "loss", "gnorm") for v in slopes[which]]
        )
    )
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(res: dict, rows: list[dict], widths: list[int], cfg: H.TrainConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.viridis([i / max(1, len(widths) - 1) * 0.85 for i in range(len(widths))])
    steps = range(1, cfg.steps + 1)
    for w, c in zip(widths, colors):
        for j, curve in enumerate(res["fin_losses"][w][0]):
            ax1.plot(steps, curve.numpy(), color=c, lw=1.4, alpha=0.9, label=f"finite, n = {w}" if j == 0 else None)
    ax1.plot(steps, res["inf_losses"][0].numpy(), "k--", lw=2, label="infinite (π-limit)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (batch before update)")
    ax1.set_title(f"loss curves, seed 0 ({cfg.name})")
    ax1.legend(frameon=False)
    for which, marker, label in (("out", "o", "held-out outputs"), ("loss", "s", "loss curve"), ("gnorm", "^", "grad-norm curve")):
        ax2.plot(widths, [r[f"{which}_geo"] for r in rows], marker=marker, label=label)
    first = rows[0]["out_geo"]
    ax2.plot(widths, [first * math.sqrt(widths[0] / w) for w in widths], "k:", label="∝ n$^{-1/2}$")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("width n")
    ax2.set_ylabel("relative error vs infinite net (geo. mean)")
    ax2.set_title("finite vs infinite after training")
    ax2.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def all_configs(widths: list[int], seeds: int, out: Path, name: str, progress: bool = True) -> Path:
    """Rate measurement of every configuration in ``RATE_CONFIGS`` (one finite net per width and
    seed, like the rate tests): geometric-mean errors per width, slopes, seconds."""
    from tqdm import tqdm

    lines = [
        f"Geometric mean over {seeds} seeds of the relative error of finite nets against the infinite "
        f"net after 20 steps (held-out outputs; loss curve; gradient-norm curve), float64.",
        "",
        "| configuration | " + " | ".join(f"out @{w}" for w in widths)
        + " | slope out | slope loss | slope grad-norm | seconds |",
        "|---|" + "---:|" * (len(widths) + 4),
    ]  # fmt: skip
    bar = tqdm(total=len(H.RATE_CONFIGS) * seeds * len(widths), disable=not progress, unit="net")
    for cname, cfg in H.RATE_CONFIGS.items():
        bar.set_description(cname)
        ws = [w for w in widths if cfg.depth < 2 or w <= 8192]
        t0 = time.perf_counter()
        res = H.measure_rates(cfg, ws, range(seeds), progress=bar.update)
        secs = time.perf_counter() - t0
        geo = {k: res.geo(k) for k in ("out", "loss", "gnorm")}
        cells = [f"{geo['out'][ws.index(w)]:.4f}" if w in ws else "" for w in widths]
        slopes = [H.fit_slope(ws, geo[k]) for k in ("out", "loss", "gnorm")]
        lines.append(
            f"| `{cname}` | " + " | ".join(cells) + " | " + " | ".join(f"{x:.2f}" for x in slopes) + f" | {secs:.0f} |"
        )
    bar.close()
    path = out / f"{name}_rates.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def calibrate(examples: int, out: Path, name: str, progress: bool = True) -> Path:
    """Measure the statistics the property and trained-sampling tests bound, on more cases than the
    tests run: ``examples`` configurations drawn (derandomized) from the property tests' strategy at
    depths 0-2, the deliberately broken optimizers of ``pinet.testing.BROKEN_OPTIMIZERS``, and the
    trained-sampling configurations. Writes ``<out>/<name>_calibration.md``."""
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
    from tqdm import tqdm

    width, omegas = 2048, 3
    bar = tqdm(total=examples + 2 * len(H.BROKEN_OPTIMIZERS) + len(H.TRAINED_SAMPLING_CONFIGS), disable=not progress, unit="case")
    drawn: list[tuple[H.TrainConfig, H.Tracking]] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(cfg=H.optimizer_configs(depths=(0, 1, 2)), seed=st.integers(0, 2**16))
    def probe(cfg, seed):
        assume(H.stable(cfg, seed))
        drawn.append((cfg, H.measure_tracking(cfg, seed, width, omegas)))
        bar.update()

    bar.set_description("drawn configurations")
    probe()
    amps = sorted(t.error / t.static for _, t in drawn)
    ratios = sorted(t.ratio for _, t in drawn)
    worst = max(drawn, key=lambda ct: ct[1].error / ct[1].static)

    def q(xs, f):
        return xs[min(len(xs) - 1, int(f * len(xs)))]

    lines = [
        "# Equivalence suite: where the bounds come from",
        "",
        f"Written by `python -m experiments.equivalence --calibrate {examples}` (float64, CPU). "
        "Statistics as in `pinet.testing` (`Tracking`): *amplification* = error of the "
        "trained finite nets / static n^-1/2 fluctuation of the trained infinite net; *ratio* = error / "
        f"spread of the {omegas} finite nets. Width {width}.",
        "",
        f"## Property tests: {len(drawn)} configurations drawn at depths 0-2",
        "",
        f"Bounds in `pinet.testing` (used by `tests/equivalence/test_properties.py`): amplification <= {H.MAX_AMPLIFICATION}, ratio <= {H.MAX_RATIO}.",
        "",
        "| statistic | median | 90% | max |",
        "|---|---:|---:|---:|",
        f"| amplification | {q(amps, 0.5):.2f} | {q(amps, 0.9):.2f} | {amps[-1]:.2f} |",
        f"| ratio | {q(ratios, 0.5):.2f} | {q(ratios, 0.9):.2f} | {ratios[-1]:.2f} |",
        "",
        f"Largest amplification: `{worst[0].short()}`.",
        "",
        "## Deliberately broken finite optimizers (must fail the bounds)",
        "",
        "| mutation | correct: amplification | correct: ratio | broken: amplification | broken: ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    bar.set_description("mutations")
    for mname, (cfg, broken) in H.BROKEN_OPTIMIZERS.items():
        ok = H.measure_tracking(cfg, 0, width, omegas)
        bar.update()
        bad = H.measure_tracking(cfg, 0, width, omegas, **broken)
        bar.update()
        lines.append(
            f"| {mname} | {ok.error / ok.static:.2f} | {ok.ratio:.2f} | {bad.error / bad.static:.1f} | {bad.ratio:.1f} |"
        )
    lines += [
        "",
        "## Trained sampling (no training after sampling)",
        "",
        f"Geometric mean over {H.profile().sampling_omegas} Ω draws of the relative output error; bounds in "
        f"`pinet.testing` (used by `test_trained_sampling.py`): slope in {H.SLOPE_RANGE}, error at 4096 <= {H.MAX_ERROR_4096}.",
        "",
        "| configuration | widths | errors | slope |",
        "|---|---|---|---:|",
    ]
    bar.set_description("trained sampling")
    for cname, cfg in H.TRAINED_SAMPLING_CONFIGS.items():
        _, traj, task = H.train_infinite(cfg, seed=3, keep_model=True)
        widths = H.profile().widths(cfg.depth)
        means = H.sampled_errors(traj.model, task.X_test, widths, 3, H.profile().sampling_omegas)
        lines.append(
            f"| `{cname}` | {', '.join(map(str, widths))} | {', '.join(f'{m:.4f}' for m in means)} "
            f"| {H.fit_slope(widths, means):.2f} |"
        )
        bar.update()
    bar.close()
    path = out / f"{name}_calibration.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = H.RATE_CONFIGS[args.config]
    widths = [int(w) for w in args.widths.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        path = calibrate(args.calibrate, out, args.name, progress=not args.no_progress)
        print(path.read_text())
        print(f"wrote {path}")
        return
    if args.all_configs:
        path = all_configs(widths, args.seeds, out, args.name, progress=not args.no_progress)
        print(path.read_text())
        print(f"wrote {path}")
        return
    res = run(cfg, widths, args.seeds, args.omegas, progress=not args.no_progress)
    rows = table_rows(res, widths)
    md = write_tables(rows, widths, cfg, out, args.name, args.seeds, args.omegas)
    plot(res, rows, widths, cfg, out / f"{args.name}.png")
    print(md.read_text())
    print(f"wrote {out / (args.name + '.png')}, {md}, {out / (args.name + '.csv')}")


if __name__ == "__main__":
    main()
