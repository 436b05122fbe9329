"""MAML with π-nets: the reference's meta-learning command (every flag; docs/meta.md).

    python -m experiments.meta.train unused --dataset digits --adapt-readout-only --output-folder output/meta   # embedded task
    python -m experiments.meta.train DATA --dataset omniglot --num-ways 5 --num-shots 1 ...  # Omniglot

``--hidden-size -1`` meta-trains the infinite π-net, ``--hidden-size N`` the finite π-net of width
N sampled from the same initialisation (same ``--seed``). ``--gp`` / ``--ntk`` (and the one-hidden-
layer ``--gp1lp`` / ``--ntk1lp``) score the NNGP / NTK kernel baselines instead (kernel regression
on each support set; nothing is meta-trained). Writes ``log.csv`` (one row per epoch),
``curves.png``, ``checkpoint.pt`` (every epoch) and ``model.th`` (best meta-test accuracy) into
``--output-folder``; ``--validate-only`` writes ``validate.csv`` there and leaves those as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch

import pinet
from experiments.common import CLIError, atomic_write, check_output_dir, plot_rows, rows_per_layer, write_history_csv
from experiments.meta.data import SPLITS, load_digits_tasks, load_omniglot
from pinet.hooks import ClipGradNorm, ProjectToR
from pinet.meta import MAML
from pinet.optim import PiOptimizerWrapper, param_groups

DATASETS = ("omniglot", "digits")
CHECKPOINT_FORMAT = 1


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.meta.train`` (the reference command's flags)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.meta.train",
        description="MAML (second or first order) with infinite π-nets, their finite samples, or NNGP/NTK "
        "kernel baselines, on Omniglot or an embedded few-shot task from scikit-learn's digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("folder", type=str, help="data folder (holds omniglot-py/ for --dataset omniglot; unused for digits)")
    a("--dataset", type=str, default="omniglot", help=f"one of {DATASETS}")
    a("--output-folder", type=str, default=None, help="where log.csv, curves.png and checkpoints go")
    a("--load-model-path", type=str, default=None,
      help="start from this model state dict (model.th) or checkpoint.pt (a checkpoint also resumes "
           "the optimizer, scheduler, history and epoch)")  # fmt: skip
    a("--num-ways", type=int, default=5, help="classes per task (N in N-way)")
    a("--num-shots", type=int, default=5, help="support examples per class (k in k-shot)")
    a("--num-shots-test", type=int, default=15, help="query examples per class; negative: same as --num-shots")
    a("--hidden-size", type=int, default=-1, help="width of the finite π-net; negative: infinite (π-limit)")
    a("--depth", type=int, default=2, help="number of hidden layers")
    a("--infnet-r", "--infnet_r", dest="infnet_r", type=int, default=100, help="rank r of the π-net")
    a("--no-adapt-readout", action="store_true", help="the readout does not adapt in the inner loop")
    a("--adapt-readout-only", action="store_true", help="only the readout (and its bias) adapts in the inner loop")
    a("--orig-model", action="store_true", help="reference's plain MLP (not available in pinet: an error)")
    a("--lin-model", action="store_true", help="reference's linear model (not available in pinet: an error)")
    a("--normalize", type=str, default="None", help="None | LN (layernorm inside π-layers); BN has no π-limit")
    a("--mu-init", action="store_true", help="μP init of the reference's plain MLP (with --orig-model only)")
    a("--bias-alpha", type=float, default=1.0, help="bias multiplier")
    a("--last-bias-alpha", type=float, default=0.0, help="readout bias multiplier (overrides --bias-alpha)")
    a("--first-layer-alpha", type=float, default=1.0, help="input-layer multiplier")
    a("--sigma1", type=float, default=1.0, help="--gp1lp/--ntk1lp: first-layer weight std")
    a("--sigma2", type=float, default=1.0, help="--gp1lp/--ntk1lp: readout weight std")
    a("--varw", type=float, default=1.0, help="--gp/--ntk: weight variance of the non-readout layers")
    a("--varb", type=float, default=0.0, help="--gp/--ntk: bias variance of the non-readout layers")
    a("--train-last-layer-only", action="store_true", help="reference's plain-MLP option (an error in pinet)")
    a("--readout-zero-init", action="store_true", help="zero readout at init (pinet's π-nets always start at zero)")
    a("--gp1lp", action="store_true", help="NNGP baseline of a one-hidden-layer ReLU net")
    a("--ntk1lp", action="store_true", help="NTK baseline of a one-hidden-layer ReLU net")
    a("--gp", action="store_true", help="NNGP baseline of the ReLU MLP of --depth")
    a("--ntk", action="store_true", help="NTK baseline of the ReLU MLP of --depth")
    a("--sigmab", type=float, default=1.0, help="--gp1lp/--ntk1lp: first-layer bias std")
    a("--first-layer-init-alpha", type=float, default=1.0, help="reference's plain-MLP option (must stay 1)")
    a("--second-layer-init-alpha", type=float, default=1.0, help="reference's plain-MLP option (must stay 1)")
    a("--optimizer", type=str, default="sgd", help="sgd | adam (adam: finite nets only; it has no π-limit)")
    a("--scheduler", type=str, default="None", help="None | cosine | multistep | exp | linear (per meta-batch)")
    a("--first-layer-lr-mult", type=float, default=1.0, help="meta-lr multiplier of the input layer")
    a("--last-layer-lr-mult", type=float, default=1.0, help="meta-lr multiplier of the readout")
    a("--bias-lr-mult", type=float, default=1.0, help="meta-lr multiplier of biases")
    a("--gclip-per-param", action="store_true", help="clip every parameter / π-layer by its own norm")
    a("--lr-drop-ratio", type=float, default=0.5, help="multistep/exp schedulers: lr factor")
    a("--lr-drop-milestones", type=str, default="", help="multistep: comma-separated epochs (x --num-batches steps)")
    a("--train-loss-function", type=str, default="None",
      help="None (cross-entropy) | SmoothL1Loss (on one-hot targets), for the inner and outer losses")  # fmt: skip
    a("--batch-size", type=int, default=25, help="tasks per meta-batch")
    a("--num-steps", type=int, default=1, help="inner (adaptation) steps")
    a("--num-epochs", type=int, default=50, help="meta-training epochs")
    a("--num-batches", type=int, default=100, help="meta-batches per epoch")
    a("--num-test-batches", type=int, default=100, help="meta-batches per meta-test")
    a("--step-size", type=float, default=0.1, help="inner step size ε")
    a("--first-order", action="store_true", help="first-order MAML (no derivatives through the inner steps)")
    a("--Gproj-outer", dest="Gproj_outer", action="store_true",
      help="finite π-nets: project the meta-gradients onto span Ω (always so at infinite width)")  # fmt: skip
    a("--Gproj-inner", dest="Gproj_inner", action="store_true",
      help="finite π-nets: project the inner gradients onto span Ω (always so at infinite width)")  # fmt: skip
    a("--meta-lr", type=float, default=0.001, help="meta-optimizer learning rate")
    a("--meta-momentum", type=float, default=0.0, help="meta-optimizer momentum (SGD)")
    a("--grad-clip", type=float, default=-1.0, help="meta-gradient clipping norm; <= 0: none")
    a("--num-workers", type=int, default=1, help="accepted for compatibility: tasks are drawn in-process from memory")
    a("--verbose", action="store_true", help="print the configuration and per-epoch details")
    a("--use-cuda", action="store_true", help="run on CUDA (error if unavailable)")
    a("--overwrite-existing", action="store_true", help="overwrite an --output-folder that holds a log.csv")
    a("--no-train-shuffle", action="store_true", help="the same meta-training tasks every epoch")
    a("--validate-only", action="store_true",
      help="only meta-test (with --load-model-path); with --output-folder the result goes to validate.csv there")
    a("--test-dataset-split", type=str, default="val", help=f"meta-test split: one of {SPLITS}")
    a("--seed", type=int, default=1, help="seed of the initialisation, Ω and the tasks")
    a("--dtype", type=str, default="float64", help="float64 | float32 | float16 (π-row storage; compute >= float32)")
    a("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def check_args(args) -> None:
    """One-line :class:`CLIError` for every flag value the run cannot honour."""
    if args.dataset not in DATASETS:
        raise CLIError(f"--dataset must be one of {DATASETS}, got {args.dataset!r}")
    for flag in ("orig_model", "lin_model", "train_last_layer_only", "mu_init"):
        if getattr(args, flag):
            raise CLIError(f"--{flag.replace('_', '-')} selects the reference's plain MLP, which pinet does not "
                           "provide; use π-nets (--hidden-size) or the kernel baselines --gp/--ntk/--gp1lp/--ntk1lp")  # fmt: skip
    for flag in ("first_layer_init_alpha", "second_layer_init_alpha"):
        if getattr(args, flag) != 1.0:
            raise CLIError(f"--{flag.replace('_', '-')} applies to the reference's plain MLP only; leave it at 1")
    if sum(map(bool, (args.gp, args.ntk, args.gp1lp, args.ntk1lp))) > 1:
        raise CLIError("choose at most one of --gp, --ntk, --gp1lp, --ntk1lp")
    if args.adapt_readout_only and args.no_adapt_readout:
        raise CLIError("--adapt-readout-only and --no-adapt-readout exclude each other")
    if args.normalize not in ("None", "LN", "BN"):
        raise CLIError(f"--normalize must be None, LN or BN, got {args.normalize!r}")
    if args.normalize == "BN":
        raise CLIError("--normalize BN: batch norm has no π-limit (it couples the samples of a batch); use LN or None")
    for flag in ("num_ways", "num_shots", "batch_size", "num_steps", "num_batches", "num_test_batches", "infnet_r"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_epochs < 0 or args.depth < 0:
        raise CLIError("--num-epochs and --depth must be >= 0")
    if args.hidden_size >= 0 and args.hidden_size < args.infnet_r:
        raise CLIError(f"--hidden-size {args.hidden_size}: a finite π-net needs width >= --infnet-r ({args.infnet_r})")
    if args.optimizer not in ("sgd", "adam"):
        raise CLIError(f"--optimizer must be sgd or adam, got {args.optimizer!r}")
    if args.optimizer == "adam" and args.hidden_size < 0:
        raise CLIError("--optimizer adam has no π-limit (it normalises per coordinate); use sgd with --hidden-size -1")
    if args.scheduler not in ("None", "cosine", "multistep", "exp", "linear"):
        raise CLIError(f"--scheduler must be None, cosine, multistep, exp or linear, got {args.scheduler!r}")
    if args.train_loss_function not in ("None", "SmoothL1Loss"):
        raise CLIError(f"--train-loss-function must be None or SmoothL1Loss, got {args.train_loss_function!r}")
    if args.test_dataset_split not in SPLITS:
        raise CLIError(f"--test-dataset-split must be one of {SPLITS}, got {args.test_dataset_split!r}")
    if args.dtype not in ("float64", "float32", "float16"):
        raise CLIError(f"--dtype must be float64, float32 or float16, got {args.dtype!r}")
    for flag in ("step_size", "meta_lr", "meta_momentum", "bias_alpha", "last_bias_alpha", "first_layer_alpha",
                 "first_layer_lr_mult", "last_layer_lr_mult", "bias_lr_mult", "grad_clip", "lr_drop_ratio",
                 "sigma1", "sigma2", "sigmab", "varw", "varb"):  # fmt: skip
        if not math.isfinite(getattr(args, flag)):
            raise CLIError(f"--{flag.replace('_', '-')} must be finite, got {getattr(args, flag)}")
    # A negative learning-rate multiplier or schedule factor would ascend the meta-loss; a negative
    # variance has no kernel. pinet.optim.param_groups and the kernels would refuse them only later,
    # as tracebacks (an "exp" schedule takes a root of the factor, complex for a negative one).
    for flag in ("first_layer_lr_mult", "last_layer_lr_mult", "bias_lr_mult", "lr_drop_ratio", "varw", "varb"):
        if getattr(args, flag) < 0:
            raise CLIError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
    if not 0 <= args.seed < 2**63 - 8:  # torch seeds are 64-bit; the run derives seed + 1 ... seed + 3
        raise CLIError(f"--seed must be an int in [0, 2**63 - 8), got {args.seed}")
    if args.num_shots_test == 0:
        raise CLIError("--num-shots-test must be >= 1 (or negative: the same as --num-shots), got 0")
    if args.meta_lr < 0:
        raise CLIError(f"--meta-lr must be >= 0, got {args.meta_lr}")
    if not 0 <= args.meta_momentum < 1:
        raise CLIError(f"--meta-momentum must be in [0, 1), got {args.meta_momentum}")
    if args.step_size < 0:
        raise CLIError(f"--step-size must be >= 0 (the inner loop descends), got {args.step_size}")
    kernel = args.gp or args.ntk or args.gp1lp or args.ntk1lp
    if not kernel and not args.validate_only and args.hidden_size < 0 and not args.first_order and adapt_set(args) != "readout":
        # What MAML.meta_step would refuse at its first step (docs/meta.md), said before anything is built.
        raise CLIError(
            f"second-order MAML with adapt={adapt_set(args)!r} on the infinite net (--hidden-size -1) has no π-limit "
            "form: its meta-gradient is not a set of π-rows (docs/meta.md); pass --adapt-readout-only (the paper's "
            "setting), --first-order, or a finite --hidden-size"
        )
    if args.validate_only and not args.load_model_path:
        raise CLIError("--validate-only needs --load-model-path (there is nothing trained to test)")

    if args.use_cuda and not torch.cuda.is_available():
        raise CLIError("--use-cuda: CUDA is not available")
    if args.output_folder:
        check_output_dir("--output-folder", args.output_folder)
    if (args.output_folder and os.path.exists(os.path.join(args.output_folder, "log.csv"))
            and not args.overwrite_existing and not args.load_model_path):  # fmt: skip
        raise CLIError(f"--output-folder {args.output_folder} already holds a log.csv; pass --overwrite-existing")


def _milestones(text: str, num_batches: int) -> list[int]:
    try:
        return [int(float(e) * num_batches) for e in text.split(",") if e.strip()]
    except ValueError:
        raise CLIError(f"--lr-drop-milestones must be comma-separated numbers, got {text!r}") from None


def adapt_set(args) -> str:
    """The :data:`pinet.meta.ADAPT` set the flags select."""
    return "readout" if args.adapt_readout_only else "no-readout" if args.no_adapt_readout else "all"


def build_model(args, d_in: int, device) -> torch.nn.Module:
    """The infinite π-MLP of ``--seed``, or its finite sample of width ``--hidden-size``."""
    storage = getattr(torch, args.dtype)
    compute = torch.float64 if storage == torch.float64 else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    net = pinet.InfPiMLP(
        d_in, args.num_ways, args.infnet_r, args.depth, first_layer_alpha=args.first_layer_alpha,
        bias_alpha=args.bias_alpha, last_bias_alpha=args.last_bias_alpha, layernorm=args.normalize == "LN",
        dtype=storage,
    )  # fmt: skip
    net.reset_parameters(gen)
    if args.hidden_size >= 0:
        net = pinet.sample(net, args.hidden_size, generator=torch.Generator().manual_seed(args.seed + 1), dtype=compute)
    return net.to(device)


def build_optimizer(args, model, total_steps: int):
    """``(PiOptimizerWrapper, scheduler or None)`` with the lr multipliers, clipping and projection flags."""
    groups = param_groups(model, args.meta_lr, first_layer_lr_mult=args.first_layer_lr_mult,
                          last_layer_lr_mult=args.last_layer_lr_mult, bias_lr_mult=args.bias_lr_mult)  # fmt: skip
    if args.optimizer == "adam":
        inner = torch.optim.Adam(groups, lr=args.meta_lr)
    else:
        inner = torch.optim.SGD(groups, lr=args.meta_lr, momentum=args.meta_momentum)
    hooks = [ClipGradNorm(args.grad_clip, per_param=args.gclip_per_param)] if args.grad_clip > 0 else []
    try:
        opt = PiOptimizerWrapper(inner, model, hooks)
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None
    if args.hidden_size >= 0 and not args.Gproj_outer:
        # A finite net without --Gproj-outer takes raw meta-gradients (the reference's default).
        keep = [i for i, h in enumerate(opt.hooks) if not isinstance(h, ProjectToR)]
        opt.hooks = [opt.hooks[i] for i in keep]
        opt.hook_states = [opt.hook_states[i] for i in keep]
    sch = None
    if args.scheduler == "cosine":
        sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    elif args.scheduler == "multistep":
        sch = torch.optim.lr_scheduler.MultiStepLR(opt, _milestones(args.lr_drop_milestones, args.num_batches),
                                                   gamma=args.lr_drop_ratio)  # fmt: skip
    elif args.scheduler == "exp":
        sch = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=args.lr_drop_ratio ** (1.0 / args.num_batches))
    elif args.scheduler == "linear":
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / max(1, total_steps)))
    return opt, sch


def make_loss(kind: str, ways: int):
    if kind == "SmoothL1Loss":
        l1 = torch.nn.SmoothL1Loss()
        return lambda out, y: l1(out, torch.nn.functional.one_hot(y, ways).to(out.dtype))
    return torch.nn.functional.cross_entropy


def kernel_baseline(args, test, device) -> dict:
    """Meta-test accuracy of kernel regression with the NNGP or NTK kernel on each support set."""
    from pinet import baselines

    depth = 1 if (args.gp1lp or args.ntk1lp) else max(args.depth, 1)
    ntk = args.ntk or args.ntk1lp
    if args.gp1lp or args.ntk1lp:
        kw = dict(first_layer_alpha=args.sigma1, last_layer_alpha=args.sigma2, bias_alpha=args.sigmab, bias_var=1.0)
    else:
        kw = dict(first_layer_alpha=math.sqrt(args.varw), bias_alpha=1.0, bias_var=args.varb)
    kernel = baselines.ntk_kernel if ntk else baselines.nngp_kernel
    gen = torch.Generator().manual_seed(args.seed + 2)
    queries = args.num_shots_test
    accs = []
    for _ in range(args.num_test_batches):
        for xs, ys, xq, yq in test.tasks(args.batch_size, args.num_ways, args.num_shots, queries, gen):
            xs, xq = xs.to(device), xq.to(device)
            Y = baselines.one_hot_targets(ys.to(device), args.num_ways)
            pred = baselines.kernel_ridge(kernel(xs, depth=depth, **kw), Y, kernel(xq, xs, depth=depth, **kw),
                                          ridge=1e-4, relative=True)  # fmt: skip
            accs.append(float((pred.argmax(1).cpu() == yq).double().mean()))
    name = ("NTK" if ntk else "NNGP") + (" 1LP" if depth == 1 and (args.gp1lp or args.ntk1lp) else "")
    return {"kernel": name, "test_accuracy": sum(accs) / len(accs), "tasks": len(accs)}


def write_log(history: list[dict], path: str) -> None:
    """``log.csv``: epoch, train_outer_loss, train_accuracy, test_outer_loss, test_accuracy, lr,
    ``M_layer{i}`` (π-rows per infinite layer), epoch_time."""
    head = ["epoch", "train_outer_loss", "train_accuracy", "test_outer_loss", "test_accuracy", "lr"]
    write_history_csv(history, path, head, ["epoch_time"])


def plot(history: list[dict], path: str, title: str) -> None:
    """PNG: outer losses, meta-test accuracy and π-rows per layer against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    tr = [(r["epoch"], r["train_outer_loss"]) for r in history if r.get("train_outer_loss") is not None]
    if tr:
        ax[0].plot(*zip(*tr), "o-", label="meta-train (query, after adaptation)")
    ax[0].plot(ep, [r["test_outer_loss"] for r in history], "s-", label="meta-test")
    ax[0].set(xlabel="epoch", ylabel="outer loss", title="outer loss")
    ax[0].legend()
    ax[1].plot(ep, [100 * r["test_accuracy"] for r in history], "s-", label="meta-test")
    if tr:
        ax[1].plot(ep, [100 * r["train_accuracy"] for r in history], "o-", label="meta-train")
    ax[1].set(xlabel="epoch", ylabel="accuracy after adaptation (%)", title="accuracy")
    ax[1].legend()
    plot_rows(ax[2], history)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    finally:
        plt.close(fig)


def _load(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CLIError(f"cannot read --load-model-path {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(obj, dict):
        raise CLIError(f"--load-model-path {path} does not hold a dict")
    return obj


def run(args, progress: bool) -> dict:
    """Meta-train / meta-test as the flags say; returns the last history row (or the baseline)."""
    device = torch.device("cuda" if args.use_cuda else "cpu")
    torch.manual_seed(args.seed)
    if args.dataset == "digits":
        train, test = load_digits_tasks(args.test_dataset_split)
    else:
        if not os.path.isdir(args.folder):
            raise CLIError(f"data folder {args.folder} does not exist (Omniglot expected in {args.folder}/omniglot-py)")
        train, test = load_omniglot(args.folder, args.test_dataset_split, progress=progress)
    queries = args.num_shots if args.num_shots_test < 0 else args.num_shots_test
    args.num_shots_test = queries
    train.check(args.num_ways, args.num_shots, queries, "meta-train data")
    test.check(args.num_ways, args.num_shots, queries, "meta-test data")
    if args.gp or args.ntk or args.gp1lp or args.ntk1lp:
        result = kernel_baseline(args, test, device)
        print(f"{result['kernel']} kernel regression: meta-test accuracy {100 * result['test_accuracy']:.2f}% "
              f"over {result['tasks']} tasks")  # fmt: skip
        return result
    model = build_model(args, train.d_in, device)
    if args.hidden_size < 0 and args.last_layer_lr_mult == 0:
        # A readout with meta-lr 0 would append rows with coefficient 0 every step: freeze it.
        model.layers[-1].state.c.requires_grad_(False)
    compute = next(p for p in model.parameters() if p.requires_grad).dtype
    total = args.num_epochs * args.num_batches
    opt, sch = build_optimizer(args, model, total)
    maml = MAML(model, step_size=args.step_size, num_steps=args.num_steps, adapt=adapt_set(args),
                first_order=args.first_order, project_inner=args.Gproj_inner or args.hidden_size < 0,
                loss_fn=make_loss(args.train_loss_function, args.num_ways))  # fmt: skip
    history: list[dict] = []
    start_epoch = 0
    train_gen = torch.Generator().manual_seed(args.seed + 3)
    if args.load_model_path:
        saved = _load(args.load_model_path)
        resume = saved.get("format") == CHECKPOINT_FORMAT and "model" in saved
        try:
            model.load_state_dict(saved["model"] if resume else saved)
            if resume and not args.validate_only:
                opt.load_state_dict(saved["optimizer"])
                if sch is not None and saved.get("scheduler"):
                    sch.load_state_dict(saved["scheduler"])
                history, start_epoch = saved["history"], saved["epoch"]
                train_gen.set_state(saved["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            lines = [s for s in str(e).splitlines() if s.strip()]
            raise CLIError(f"cannot load --load-model-path {args.load_model_path}: {' '.join(lines[:2])}") from None
    if args.output_folder:
        os.makedirs(args.output_folder, exist_ok=True)
    if args.verbose:
        print(model)
        print(f"adapt={maml.adapt_set} first_order={args.first_order} steps={args.num_steps} device={device}")
    from tqdm import tqdm

    def cast(task):
        return tuple(t.to(device=device, dtype=compute) if t.is_floating_point() else t.to(device) for t in task)

    def meta_test(epoch: int) -> dict:
        gen = torch.Generator().manual_seed(args.seed + 2)  # the same meta-test tasks every epoch
        tot = {"outer_loss": 0.0, "accuracy": 0.0}
        for _ in tqdm(range(args.num_test_batches), desc=f"meta-test {epoch}", leave=False, disable=not progress):
            batch = [cast(t) for t in test.tasks(args.batch_size, args.num_ways, args.num_shots, queries, gen)]
            st = maml.evaluate(batch)
            for k in tot:
                tot[k] += st[k] / args.num_test_batches
        return tot

    print("epoch  train_outer_loss  train_acc  test_outer_loss  test_acc  rows  time")
    epochs = range(start_epoch, start_epoch + 1) if args.validate_only else range(start_epoch, args.num_epochs)
    best = max((r["test_accuracy"] for r in history), default=-1.0)
    for epoch in epochs:
        t0 = time.time()
        row = {"epoch": epoch + 1, "train_outer_loss": None, "train_accuracy": None}
        if not args.validate_only:
            if args.no_train_shuffle:
                train_gen.manual_seed(args.seed + 3)
            tl, ta = 0.0, 0.0
            bar = tqdm(range(args.num_batches), desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
            for _ in bar:
                batch = [cast(t) for t in train.tasks(args.batch_size, args.num_ways, args.num_shots, queries, train_gen)]
                try:
                    st = maml.meta_step(batch, opt)
                except NotImplementedError as e:
                    raise CLIError(str(e)) from None
                except FloatingPointError as e:  # the wrapper refused a non-finite meta-gradient
                    raise CLIError(f"meta-training diverged in epoch {epoch + 1}: {e}; lower --meta-lr or "
                                   "--step-size, or clip with --grad-clip") from None
                if sch is not None:
                    sch.step()
                tl += st["outer_loss"] / args.num_batches
                ta += st["accuracy"] / args.num_batches
                bar.set_postfix(loss=f"{st['outer_loss']:.3f}")
            row.update(train_outer_loss=tl, train_accuracy=ta)
        te = meta_test(epoch + 1)
        row.update(test_outer_loss=te["outer_loss"], test_accuracy=te["accuracy"], lr=opt.param_groups[0]["lr"],
                   rows=rows_per_layer(model), epoch_time=time.time() - t0)  # fmt: skip
        history.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"{epoch + 1:5d}  {fmt(row['train_outer_loss']):>16}  {fmt(row['train_accuracy']):>9}  "
              f"{row['test_outer_loss']:15.4f}  {row['test_accuracy']:8.4f}  {row['rows']}  {row['epoch_time']:.1f}s",
              flush=True)  # fmt: skip
        if args.output_folder and args.validate_only:
            # Its own file: the folder's log.csv and curves.png are the training run's, kept as they are.
            write_log(history, os.path.join(args.output_folder, "validate.csv"))
        elif args.output_folder:
            write_log(history, os.path.join(args.output_folder, "log.csv"))
            kind = "π-limit" if args.hidden_size < 0 else f"finite π-net n={args.hidden_size}"
            plot(history, os.path.join(args.output_folder, "curves.png"),
                 f"MAML {args.num_ways}-way {args.num_shots}-shot, {args.dataset}, {kind}")  # fmt: skip
            ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sch.state_dict() if sch is not None else None, "history": history,
                    "epoch": epoch + 1, "rng": train_gen.get_state(), "args": vars(args)}  # fmt: skip
            atomic_write(os.path.join(args.output_folder, "checkpoint.pt"), lambda f: torch.save(ckpt, f))
            if row["test_accuracy"] > best:
                best = row["test_accuracy"]
                sd = model.state_dict()
                atomic_write(os.path.join(args.output_folder, "model.th"), lambda f: torch.save(sd, f))
    return history[-1] if history else {}


def main(argv: list[str] | None = None) -> dict:
    """Run with command-line arguments ``argv``; user errors print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        with contextlib.ExitStack():
            return run(args, progress=not args.no_progress)
    except CLIError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
