"""The reference library's ImageNet32 -> CIFAR-10 transfer command, with the same flags and meanings::

    python -m experiments.imagenet.transfer_imagenet --save-dir=./output/ --save-model --cuda --r 200 \\
        --lr=0.01 --batch-size=16 --gclip=0 --epochs=40 --human --wd=0.0001 --bias-alpha=0.5 \\
        --first-layer-lr-mult=1.0 --last-layer-lr-mult=1.0 --gclip-per-param --transfer --transfer-milestones=0,5,10

Trains a π-MLP (infinite without ``--width``, as the reference; finite with ``--width N``) on a fixed
250-class subset of ImageNet 32×32 (``--imagenet-data``: the official pickled batches), and at each
``--transfer-milestones`` epoch (0 = before training) scores its features on CIFAR-10
(``--cifar-data``) by kernel ridge regression with its feature kernel
(:func:`pinet.feature_kernel`, spec "Feature kernel"): ``f = K(X*, X) (K(X, X) + λI)⁻¹ Y`` with
one-hot ``Y``, λ = 1e-4 (``--transfer-ridges``), the explicit inverse or, with ``--solve-kernel``,
``torch.linalg.solve``. Pickles are read without executing code (:mod:`experiments.imagenet.data`).

Writes to ``--save-dir`` every epoch: ``log.csv`` (ImageNet train/val loss and accuracy, ..., the
transfer accuracy at milestones), ``transfer.csv`` (one row per milestone and ridge),
``checkpoint.pt`` (exact ``--resume``), ``model.pt`` with ``--save-model``, and ``curves.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import random
import sys
import time

import torch

import pinet
from experiments.common import (
    _CLI_ONLY,
    CHECKPOINT_FORMAT,
    CLIError,
    _check_checkpoint,
    _load,
    _merge_resume_args,
    _plain_args,
    _rng_state,
    _save,
    _set_rng_state,
    add_training_args,
    build_model,
    build_optimizer,
    check_output_dir,
    check_training_args,
    evaluate,
    format_header,
    format_row,
    given_dests,
    load_model_file,
    make_loss,
    precision,
    resolve_device,
    rows_per_layer,
    train_epoch,
    write_csv,
)
from experiments.imagenet.data import Uint8Data, cifar10_folder, load_cifar10, load_imagenet32, normalize, parse_classes
from pinet.baselines import accuracy, kernel_ridge, one_hot_targets
from pinet.features import features, kernel_from_features
from pinet.hooks import ClipGradNorm

# The reference command's defaults (the reference transfer command; docs/transfer.md).
DEFAULTS = dict(
    width=None,
    r=400,
    depth=2,
    batch_size=64,
    test_batch_size=64,
    epochs=24,
    lr=2.0,
    wd=1e-4,
    gclip=0.2,
    first_layer_lr_mult=0.1,
    last_layer_lr_mult=1.0,
    bias_lr_mult=0.5,
    save_dir="",
)

# Unsupported reference flags: accepted by the parser (so reference command lines parse), refused
# when set, because their reference behaviour is not part of the spec pinet implements.
_REFUSED = {
    "init_from_data": "--init-from-data (the reference's data-dependent initialisation of the infinite net) is not "
    "implemented; pinet initialises as the spec",
    "init_A_B_direct": "--init-A-B-direct (fitting A and B of the initialisation by gradient descent) is not "
    "implemented; pinet initialises as the spec",
    "gaussian_init": "--gaussian-init (a finite net with iid Gaussian weights instead of a sample of the infinite "
    "net) is not implemented for π-nets; pinet.baselines.MLP is that network without projection",
}

# What a checkpoint.pt of this command holds for an exact resume (checked before anything loads).
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "history", "transfers", "epoch")

_TRANSFER_CLI_ONLY = {
    "imagenet_data",
    "cifar_data",
    "quiet",
    "verbose",
    "human",
    "transfer",
    "transfer_milestones",
    "transfer_ridges",
    "solve_kernel",
    "transfer_train_subset",
    "transfer_test_subset",
    "kernel_block_size",
    "cycarr",
}


def _epochs_list(text: str) -> list[int]:
    if text.strip() == "":
        return []
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated epochs like '0,5,10', got {text!r}"
        ) from None
    if any(m < 0 for m in out) or out != sorted(set(out)):
        raise argparse.ArgumentTypeError(f"epochs must be increasing and >= 0, got {text!r}")
    return out


def _floats(text: str) -> list[float]:
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like '1e-4,1e-8', got {text!r}"
        ) from None
    if not out or any(not math.isfinite(v) or v < 0 for v in out):
        raise argparse.ArgumentTypeError(f"ridges must be finite and >= 0, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: every flag of the reference command (same meanings) plus pinet's shared ones."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.imagenet.transfer_imagenet",
        description="Train a π-MLP on 250 classes of ImageNet 32x32 and score the transfer of its features to "
        "CIFAR-10 by kernel ridge regression with its feature kernel (the reference library's "
        "experiments/imagenet/transfer_imagenet.py). Without --width the net is infinite, as there.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_training_args(p, DEFAULTS, default_precision="half")
    p.set_defaults(seed=1)  # the reference's default seed
    data = p.add_argument_group("data")
    arg = data.add_argument
    arg(
        "--imagenet-data",
        type=str,
        default=os.path.join("examples", "imagenet", "data"),
        help="folder with ImageNet32's train_data_batch_1..10 and val_data (pickled dicts with 'data' (N, 3072) "
        "uint8 and 1-based 'labels', or the same names with .npz)",
    )
    arg(
        "--cifar-data",
        type=str,
        default="./dataset",
        help="folder containing cifar-10-batches-py/ (CIFAR-10's python batches)",
    )
    arg(
        "--imagenet-classes",
        type=str,
        default=None,
        help="the ImageNet classes trained on: comma-separated 1-based ids, a file of them, or 'all'; default "
        "the fixed 250 ids 1, 5, 9, ..., 997 (the reference's own list is not published with it)",
    )
    tr = p.add_argument_group("transfer (kernel ridge regression with the feature kernel on CIFAR-10)")
    arg = tr.add_argument
    arg("--transfer", action="store_true", help="evaluate CIFAR-10 transfer at --transfer-milestones")
    arg(
        "--transfer-milestones",
        type=_epochs_list,
        default=[],
        help="comma-separated epochs at which the transfer accuracy is evaluated, 0 = before training (default "
        "with --transfer: after the last epoch)",
    )
    arg(
        "--solve-kernel",
        action="store_true",
        help="solve (K + λI) α = Y with torch.linalg.solve instead of forming the inverse (the reference's default)",
    )
    arg(
        "--transfer-ridges",
        type=_floats,
        default=[1e-4],
        help="ridges λ (absolute, K + λI), comma-separated; each milestone reports every one (the first in log.csv)",
    )
    arg(
        "--transfer-train-subset",
        type=int,
        default=None,
        help="use only the first N CIFAR-10 training images",
    )
    arg("--transfer-test-subset", type=int, default=None, help="use only the first N CIFAR-10 test images")
    arg(
        "--kernel-block-size",
        type=int,
        default=2048,
        help="rows per block of the feature kernel (memory: block x M per forward block)",
    )
    ref = p.add_argument_group("other reference flags")
    arg = ref.add_argument
    arg("--verbose", action="store_true", help="print data and kernel details")
    arg("--human", action="store_true", help="human-friendly output: tqdm bars for epochs and kernels")
    arg("--quiet", action="store_true", help="print nothing but errors")
    arg(
        "--cycarr",
        action="store_true",
        help="accepted for the reference's command lines; pinet has one π-row storage (PiState, amortised "
        "growth), so it changes nothing",
    )
    arg(
        "--gclip-drop-ratio",
        type=float,
        default=0.5,
        help="with --scheduler multistep, --gclip is multiplied by this at each of --gclip-drop-milestones",
    )
    arg(
        "--gclip-drop-milestones",
        type=_epochs_list,
        default=[],
        help="comma-separated epochs after which --gclip is multiplied by --gclip-drop-ratio",
    )
    for flag, dest in (
        ("--init-from-data", "init_from_data"),
        ("--init-A-B-direct", "init_A_B_direct"),
        ("--gaussian-init", "gaussian_init"),
    ):
        arg(flag, dest=dest, action="store_true", help="reference flag, not implemented (an error if given)")
    return p


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    def bad(flag, msg):
        parser.error(f"argument {flag}: {msg}")

    if args.width is None:
        args.width = 0  # absent: the infinite net, as the reference's --width None
    elif args.width < 1:
        bad("--width", f"must be a positive width (leave it out for the infinite net), got {args.width}")
    check_training_args(parser, args)
    if args.gclip_drop_milestones and args.scheduler != "multistep":
        bad("--gclip-drop-milestones", "only used with --scheduler multistep")
    if args.gclip_drop_milestones and args.gclip <= 0:
        bad("--gclip-drop-milestones", "needs --gclip > 0")
    if not (math.isfinite(args.gclip_drop_ratio) and args.gclip_drop_ratio > 0):
        bad("--gclip-drop-ratio", f"must be a finite number > 0, got {args.gclip_drop_ratio}")
    if args.transfer_milestones and not args.transfer:
        bad("--transfer-milestones", "only used with --transfer")
    if args.transfer_milestones and args.transfer_milestones[-1] > args.epochs:
        bad("--transfer-milestones", f"epoch {args.transfer_milestones[-1]} is after --epochs {args.epochs}")
    for flag, v in (
        ("--transfer-train-subset", args.transfer_train_subset),
        ("--transfer-test-subset", args.transfer_test_subset),
        ("--kernel-block-size", args.kernel_block_size),
    ):
        if v is not None and v < 1:
            bad(flag, f"must be a positive integer, got {v}")
    if args.quiet and (args.verbose or args.human):
        bad("--quiet", "not allowed together with --verbose or --human")


def _saved_width(ns: argparse.Namespace) -> None:
    # The infinite net is saved as width 0 (what _check makes of an absent --width); its saved flags
    # are checked as an absent --width, as they resume.
    if ns.width == 0:
        ns.width = None


def _check_transfers(transfers, where: str) -> None:
    """A CLIError unless a checkpoint's ``transfers`` is a list of milestone records as run() writes
    them (``epoch``, ``acc`` per ridge, ``seconds``): they are re-logged and decide what is skipped."""
    if not isinstance(transfers, list):
        raise CLIError(f"{where}: 'transfers' must be a list, got {type(transfers).__name__}")
    for i, t in enumerate(transfers):
        ok = (
            isinstance(t, dict) and {"epoch", "acc", "seconds"} <= set(t)
            and isinstance(t["epoch"], int) and not isinstance(t["epoch"], bool) and t["epoch"] >= 0
            and isinstance(t["acc"], list) and len(t["acc"]) > 0
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in t["acc"])
            and isinstance(t["seconds"], (int, float)) and not isinstance(t["seconds"], bool)
        )  # fmt: skip
        if not ok:
            raise CLIError(f"{where}: transfers[{i}] must be a dict with an int 'epoch', a list 'acc' of accuracies "
                           f"and a number 'seconds', got {t!r}"[:300])  # fmt: skip


def _merge_resume(parser, args, saved: dict, given: set[str]) -> argparse.Namespace:
    """As experiments.common's resume merge, with this command's data and transfer flags CLI-only."""
    merged = _merge_resume_args(
        parser, args, saved, given, cli_only=_CLI_ONLY | _TRANSFER_CLI_ONLY,
        changeable="only --epochs, --save-dir, data, transfer and output flags may change",
        check=_check, prepare=_saved_width,
    )  # fmt: skip
    if "width" not in given and merged.width == 0:
        # The infinite net is saved as width 0 (what _check makes of an absent --width); it resumes
        # as an absent --width again, which _check turns back into 0.
        merged.width = None
    return merged


# ------------------------------------------------------------------------------------------ transfer
class Transfer:
    """CIFAR-10 transfer scorer: the feature kernel of a net on CIFAR-10 train/test, kernel ridge
    regression with every ridge, accuracies. Data are loaded once."""

    def __init__(self, args, device, say) -> None:
        Xtr, ytr, Xte, yte = load_cifar10(args.cifar_data)
        Xtr, ytr = Xtr[: args.transfer_train_subset], ytr[: args.transfer_train_subset]
        Xte, yte = Xte[: args.transfer_test_subset], yte[: args.transfer_test_subset]
        # The ImageNet normalisation: the net was trained on inputs with these statistics.
        self.Xtr, self.Xte = normalize(Xtr), normalize(Xte)
        self.ytr, self.yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
        self.ridges = list(args.transfer_ridges)
        self.method = "solve" if args.solve_kernel else "inverse"
        self.block = args.kernel_block_size
        self.human = args.human
        self.say = say
        self.verbose = args.verbose
        say(
            f"CIFAR-10 transfer: {len(self.ytr)} train / {len(self.yte)} test images, ridges "
            f"{', '.join(f'{r:g}' for r in self.ridges)}, {self.method}"
        )

    def _bar(self, desc):
        if not self.human:
            return None, None
        from tqdm import tqdm

        bar = tqdm(desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

        def cb(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        return bar, cb

    def __call__(self, net) -> dict:
        """``{"acc": [per ridge], "seconds": ...}`` for ``net`` (not modified)."""
        t0 = time.perf_counter()
        # Features once per image set (one forward over train and one over test), then both kernels.
        feats = []
        for name, X in (("train", self.Xtr), ("test", self.Xte)):
            bar, cb = self._bar(f"features of the CIFAR-10 {name} images")
            try:
                feats.append(features(net, X, block_size=self.block, progress=cb))
            finally:
                if bar is not None:
                    bar.close()
        ftr, fte = feats
        kw = dict(block_size=self.block, dtype=torch.float64)
        bar, cb = self._bar("feature kernel K(train, train)")
        try:
            K = kernel_from_features(ftr, progress=cb, **kw)
        finally:
            if bar is not None:
                bar.close()
        bar, cb = self._bar("feature kernel K(test, train)")
        try:
            Kt = kernel_from_features(fte, ftr, progress=cb, **kw)
        finally:
            if bar is not None:
                bar.close()
        t1 = time.perf_counter()
        Y = one_hot_targets(self.ytr, 10)
        pred = kernel_ridge(K, Y.to(K.device), Kt, self.ridges, method=self.method)
        accs = accuracy(pred, self.yte)
        dt = time.perf_counter() - t0
        if self.verbose:
            self.say(
                f"  kernels {tuple(K.shape)} and {tuple(Kt.shape)} in {t1 - t0:.1f}s, solves in "
                f"{dt - (t1 - t0):.1f}s"
            )
        return {"acc": accs, "seconds": dt}


def write_transfer_csv(records: list[dict], ridges: list[float], path: str) -> None:
    """``transfer.csv``: one row per milestone and ridge (epoch, ridge, accuracy, seconds)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "ridge", "transfer_acc", "seconds"])
        for rec in records:
            for lam, acc in zip(ridges, rec["acc"]):
                w.writerow([rec["epoch"], f"{lam:g}", acc, rec["seconds"]])
    os.replace(tmp, path)


def plot(history: list[dict], transfers: list[dict], path: str, title: str) -> None:
    """PNG: ImageNet loss and accuracy per epoch, CIFAR-10 transfer accuracy per milestone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ep = [r["epoch"] for r in history]
    axes[0].plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(ep, [r["test_loss"] for r in history], "s-", label="val")
    axes[0].set(xlabel="epoch", ylabel="loss", title="ImageNet32 loss")
    axes[1].plot(ep, [100 * r["train_acc"] for r in history], "o-", label="train")
    axes[1].plot(ep, [100 * r["test_acc"] for r in history], "s-", label="val")
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="ImageNet32 accuracy")
    for ax in axes[:2]:
        if ep:
            ax.legend()
    ax = axes[2]
    if transfers:
        ax.plot([t["epoch"] for t in transfers], [100 * t["acc"][0] for t in transfers], "o-")
        ax.set(xlabel="epoch (milestone)", ylabel="accuracy (%)", title="CIFAR-10 transfer (feature kernel)")
    else:
        ax.text(0.5, 0.5, "no --transfer", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="CIFAR-10 transfer", xticks=[], yticks=[])
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _write_log(history: list[dict], transfers: list[dict], path: str) -> None:
    # experiments.common's log.csv columns plus the first ridge's transfer accuracy at milestones.
    write_csv(history, path)
    by_epoch = {t["epoch"]: t["acc"][0] for t in transfers}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[0].append("transfer_acc")
    for row in rows[1:]:
        row.append(by_epoch.get(int(row[0]), ""))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, path)


def _gclip_at(args, epoch: int) -> float:
    drops = sum(1 for m in args.gclip_drop_milestones if m <= epoch)
    return args.gclip * args.gclip_drop_ratio**drops


# ---------------------------------------------------------------------------------------------- run
def run(args, data, device, *, checkpoint=None) -> dict:
    """Train with milestones; returns ``{"history", "transfers", "model"}``."""
    say = (lambda *a: None) if args.quiet else print
    storage, compute = precision(args)
    model = build_model(args, data.d_in, data.d_out, device)
    kind = f"finite π-MLP, width {args.width}" if args.width else "infinite π-MLP"
    opt, sched = build_optimizer(args, model)
    clip = (
        next((h for h in opt.hooks if isinstance(h, ClipGradNorm)), None) if hasattr(opt, "hooks") else None
    )
    loss_fn = make_loss(args.loss, data.d_out)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    history: list[dict] = []
    transfers: list[dict] = []
    start = 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["optimizer"])
            if sched is not None:
                sched.load_state_dict(checkpoint["scheduler"])
            _set_rng_state(checkpoint["rng"], data_gen)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CLIError(f"cannot restore the checkpoint: {str(e).splitlines()[0]}") from None
        history = list(checkpoint["history"])
        transfers = list(checkpoint.get("transfers", []))
        start = int(checkpoint["epoch"])
    else:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
    milestones = list(args.transfer_milestones) if args.transfer else []
    if args.transfer and not milestones:
        milestones = [args.epochs]
    done = {t["epoch"] for t in transfers}
    scorer = Transfer(args, device, say) if any(m not in done and m >= start for m in milestones) else None
    save_dir = args.save_dir
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    say(
        f"{kind}: r={args.r}, depth={args.depth} hidden π-layer(s), {data.name}: {data.n_train} train / "
        f"{data.n_test} val, {data.d_out} classes, {compute}"
        + (f" (π-rows {storage})" if rows_per_layer(model) and storage != compute else "")
        + f", {device}"
    )
    if args.cycarr:
        say("note: --cycarr changes nothing in pinet (one π-row storage)")
    if start:
        say(f"resumed from {args.resume} at epoch {start}")

    def transfer_at(epoch):
        res = scorer(model)
        rec = {"epoch": epoch, "acc": res["acc"], "seconds": res["seconds"]}
        transfers.append(rec)
        accs = ", ".join(f"λ={lam:g}: {100 * a:.2f}%" for lam, a in zip(args.transfer_ridges, res["acc"]))
        say(f"transfer at epoch {epoch}: CIFAR-10 accuracy {accs} ({res['seconds']:.1f}s)")

    def save(epoch):
        if not save_dir:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "args": _plain_args(args),
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": _rng_state(data_gen),
            "history": history,
            "transfers": transfers,
        }
        _save(ckpt, os.path.join(save_dir, "checkpoint.pt"))
        if args.save_model:
            _save(model.state_dict(), os.path.join(save_dir, "model.pt"))
        _write_log(history, transfers, os.path.join(save_dir, "log.csv"))
        if args.transfer:
            write_transfer_csv(transfers, args.transfer_ridges, os.path.join(save_dir, "transfer.csv"))

    if start == 0 and 0 in milestones and 0 not in done:
        transfer_at(0)
        save(0)
    say(format_header())
    for row in history:
        say(format_row(row))
    steps = math.ceil(data.n_train / args.batch_size)
    elapsed = history[-1]["elapsed"] if history else 0.0
    end = min(args.epochs, args.stop_after) if args.stop_after else args.epochs
    for epoch in range(start, end):
        if clip is not None:
            clip.max_norm = _gclip_at(args, epoch)
        t0 = time.perf_counter()
        group = opt.param_groups[0]
        lr = args.lr * group["lr"] / group["initial_lr"] if group.get("initial_lr") else args.lr
        bar = None
        if args.human:
            from tqdm import tqdm

            bar = tqdm(
                total=steps,
                desc=f"epoch {epoch + 1}/{args.epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        try:
            tr = train_epoch(
                model,
                data.train_batches(args.batch_size, data_gen),
                opt,
                loss_fn,
                device=device,
                dtype=compute,
                progress=bar,
            )
        except FloatingPointError as e:
            raise CLIError(
                f"training diverged in epoch {epoch + 1}, {e}; lower --lr or clip with --gclip"
            ) from None
        finally:
            if bar is not None:
                bar.close()
        if sched is not None:
            sched.step()
        te = evaluate(model, data.test_batches(args.test_batch_size), loss_fn, device=device, dtype=compute)
        dt = time.perf_counter() - t0
        elapsed += dt
        row = {
            "epoch": epoch + 1,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "test_loss": te["loss"],
            "test_acc": te["acc"],
            "lr": lr,
            "grad_norm": tr["grad_norm"],
            "rows": rows_per_layer(model),
            "epoch_time": dt,
            "elapsed": elapsed,
        }
        history.append(row)
        say(format_row(row))
        if epoch + 1 in milestones and epoch + 1 not in done:
            transfer_at(epoch + 1)
        save(epoch + 1)
    if save_dir and (history or transfers):
        plot(
            history,
            transfers,
            os.path.join(save_dir, "curves.png"),
            f"{kind} on ImageNet32 ({data.d_out} classes)",
        )
        files = (
            "log.csv, curves.png, checkpoint.pt"
            + (", transfer.csv" if args.transfer else "")
            + (", model.pt" if args.save_model else "")
        )
        say(f"wrote {files} in {save_dir} (resume with --resume {os.path.join(save_dir, 'checkpoint.pt')})")
    return {"history": history, "transfers": transfers, "model": model}


def _imagenet(args, say) -> Uint8Data:
    classes = parse_classes(args.imagenet_classes)
    Xtr, ytr, Xva, yva = load_imagenet32(args.imagenet_data, classes, progress=args.human)
    if args.train_subset:
        Xtr, ytr = Xtr[: args.train_subset], ytr[: args.train_subset]
    if args.test_subset:
        Xva, yva = Xva[: args.test_subset], yva[: args.test_subset]
    if args.verbose:
        say(
            f"ImageNet32: {len(classes)} classes, {len(ytr)} train / {len(yva)} val rows from {args.imagenet_data}"
        )
    return Uint8Data(f"ImageNet32 ({len(classes)} classes)", Xtr, ytr, Xva, yva, num_classes=len(classes))


def main(argv: list[str] | None = None) -> dict | None:
    """Run the command with ``argv`` (default ``sys.argv[1:]``). User errors print one line
    ``prog: error: ...`` on stderr and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for dest, msg in _REFUSED.items():
            if getattr(args, dest):
                raise CLIError(msg)
        checkpoint = None
        if args.resume:
            if not os.path.isfile(args.resume):
                parser.error(f"argument --resume: no such checkpoint file: {args.resume}")
            checkpoint = _load(args.resume, "checkpoint")
            if (
                checkpoint.get("format") != CHECKPOINT_FORMAT
                or "args" not in checkpoint
                or "transfers" not in checkpoint
            ):
                raise CLIError(f"{args.resume} is not a checkpoint.pt written by this command")
            missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
            if missing:
                raise CLIError(
                    f"{args.resume} has no {', '.join(map(repr, missing))} entry: it cannot be resumed exactly"
                )
            _check_checkpoint(checkpoint, args.resume)  # RNG state, epoch and history, as train's resume
            _check_transfers(checkpoint["transfers"], args.resume)
            args = _merge_resume(parser, args, checkpoint["args"], given_dests(parser, argv))
        _check(parser, args)
        if args.save_dir:
            check_output_dir("--save-dir", args.save_dir)
        if args.transfer:
            cifar10_folder(args.cifar_data)  # before ImageNet32 is loaded (minutes at full size)
        say = (lambda *a: None) if args.quiet else print
        device = resolve_device(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        with contextlib.ExitStack() as scope:
            try:
                scope.enter_context(pinet.native.use(args.native))
            except pinet.native.NativeUnavailable as e:
                raise CLIError(f"--native: {e}") from None
            if args.test:
                # Evaluate a saved model: ImageNet32 val and, with --transfer, CIFAR-10 transfer.
                model = load_model_file(args.model_path, device=device)
                data = _imagenet(args, say)
                if model.d_in != data.d_in or model.d_out != data.d_out:
                    raise CLIError(
                        f"the model in {args.model_path} maps {model.d_in} -> {model.d_out} but ImageNet32 "
                        f"here has {data.d_in} features and {data.d_out} classes"
                    )
                loss_fn = make_loss(args.loss, data.d_out)
                first = model.layers[0]
                dtype = first.A.dtype if hasattr(first, "A") else first.weight.dtype
                res = evaluate(
                    model, data.test_batches(args.test_batch_size), loss_fn, device=device, dtype=dtype
                )
                say(
                    f"test: loss {res['loss']:.4f}, accuracy {100 * res['acc']:.2f}% ({res['correct']}/{res['n']}), "
                    f"model {args.model_path}"
                )
                if args.transfer:
                    out = Transfer(args, device, say)(model)
                    accs = ", ".join(
                        f"λ={lam:g}: {100 * a:.2f}%" for lam, a in zip(args.transfer_ridges, out["acc"])
                    )
                    say(f"transfer: CIFAR-10 accuracy {accs}")
                    res["transfer_acc"] = out["acc"]
                return res
            data = _imagenet(args, say)
            return run(args, data, device, checkpoint=checkpoint)
    except CLIError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        where = os.path.join(args.save_dir, "checkpoint.pt") if args.save_dir else None
        hint = f"; resume with --resume {where}" if where and os.path.exists(where) else ""
        print(f"\n{parser.prog}: interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
