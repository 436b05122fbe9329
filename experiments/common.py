"""What the experiment commands share: data, model/optimizer construction, the training loop, logging,
checkpoints (with exact resume) and plots.

The training loop is written once (:func:`train_epoch`, :func:`evaluate`, :func:`fit`) and used by
``experiments.train``, ``experiments.cifar10.cifar10mlp`` and ``experiments.compare``. It is the
plain torch loop ``opt.zero_grad(); loss.backward(); opt.step()``, identical for infinite π-nets,
finite π-nets and the baseline MLP.

Shapes: inputs are flattened to ``(b, d_in)``, labels are ``(b,)`` class indices, network outputs
``(b, k)``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pinet
from pinet.hooks import Accumulate, ClipGradNorm
from pinet.optim import PiOptimizerWrapper, param_groups

__all__ = [
    "CLIError",
    "TensorData",
    "DatasetData",
    "load_digits_data",
    "RunResult",
    "add_training_args",
    "check_training_args",
    "precision",
    "resolve_device",
    "build_model",
    "build_optimizer",
    "make_loss",
    "train_epoch",
    "evaluate",
    "rows_per_layer",
    "fit",
    "load_model_file",
    "run_test",
    "format_header",
    "format_row",
    "plot_history",
    "plot_rows",
    "write_csv",
    "write_history_csv",
    "cli",
    "atomic_write",
]

CHECKPOINT_FORMAT = 1


class CLIError(Exception):
    """A user error reported as one line ``prog: error: message`` with exit status 2 (no traceback)."""


# ----------------------------------------------------------------------------------------- data
class TensorData:
    """An in-memory classification data set: ``X_train`` (N, d), ``y_train`` (N,), ``X_test`` (N', d),
    ``y_test`` (N',); labels are int64 class indices in ``[0, num_classes)``."""

    def __init__(
        self, name: str, X_train: Tensor, y_train: Tensor, X_test: Tensor, y_test: Tensor, num_classes: int
    ) -> None:
        self.name = name
        self.X_train, self.y_train, self.X_test, self.y_test = X_train, y_train, X_test, y_test
        self.d_in = X_train.shape[1]
        self.d_out = num_classes
        self.n_train, self.n_test = X_train.shape[0], X_test.shape[0]

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled mini-batches ``(b, d), (b,)``; the order comes from ``generator`` only, so a
        checkpointed generator state reproduces the next epoch exactly."""
        perm = torch.randperm(self.n_train, generator=generator)
        for i in range(0, self.n_train, batch_size):
            idx = perm[i : i + batch_size]
            yield self.X_train[idx], self.y_train[idx]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Test set in order, ``(b, d), (b,)``."""
        for i in range(0, self.n_test, batch_size):
            yield self.X_test[i : i + batch_size], self.y_test[i : i + batch_size]


class DatasetData:
    """Classification data from two ``torch.utils.data.Dataset`` s yielding ``(x, label)``; ``x`` is
    flattened to ``(b, d_in)`` by the loop. Shuffling uses a ``DataLoader`` driven by the given
    generator (workers: 0, so random augmentations draw from the checkpointed global torch RNG)."""

    def __init__(self, name: str, train_set, test_set, d_in: int, num_classes: int):
        self.name = name
        self.train_set, self.test_set = train_set, test_set
        self.d_in, self.d_out = d_in, num_classes
        self.n_train, self.n_test = len(train_set), len(test_set)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterable[tuple[Tensor, Tensor]]:
        """A shuffling ``DataLoader`` (order drawn from ``generator``) over the training set."""
        loader = torch.utils.data.DataLoader
        return loader(self.train_set, batch_size=batch_size, shuffle=True, generator=generator)

    def test_batches(self, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
        """The test set in order."""
        return torch.utils.data.DataLoader(self.test_set, batch_size=batch_size, shuffle=False)


def load_digits_data(
    *,
    test_size: float = 0.2,
    split_seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> TensorData:
    """scikit-learn's ``load_digits`` (1797 8×8 images, 64 features, 10 classes; ships with
    scikit-learn, no download), split with a fixed stratified shuffle (``split_seed``) into
    1437 train / 360 test by default and standardised with the *training* mean and std (constant
    pixels keep std 1). ``train_subset``/``test_subset`` keep the first N of each (already shuffled).
    Tensors are float64; the loop casts them to the model's dtype."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    # The split's own limits, said here instead of as a scikit-learn traceback: a numpy seed, and
    # a stratified split needs at least one example of each of the 10 classes on both sides.
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or not 0 <= split_seed < 2**32:
        raise CLIError(f"--split-seed must be an int in [0, 2**32), got {split_seed!r}")
    n_test = math.ceil(test_size * len(y)) if 0.0 < test_size < 1.0 else 0
    if not 10 <= n_test <= len(y) - 10:
        lo, hi = 10 / len(y), (len(y) - 10) / len(y)
        raise CLIError(
            f"--test-size must leave at least 10 examples (one per class) on each side of the {len(y)} digits: "
            f"a fraction in [{lo:.4f}, {hi:.4f}], got {test_size}"
        )
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=split_seed, stratify=y)
    # Statistics of the whole training split, so that subsets (and --test runs) see the same features.
    mean = Xtr.mean(axis=0)
    std = Xtr.std(axis=0)
    std[std == 0] = 1.0  # the border pixels are always 0 in some splits
    Xtr, Xte = Xtr[:train_subset], Xte[:test_subset]
    ytr, yte = ytr[:train_subset], yte[:test_subset]
    f = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return TensorData(
        "digits", f((Xtr - mean) / std), torch.tensor(ytr, dtype=torch.long),
        f((Xte - mean) / std), torch.tensor(yte, dtype=torch.long), num_classes=10,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- CLI
def _milestones(text: str) -> list[int]:
    if text.strip() == "":
        return []
    try:
        out = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        msg = f"expected comma-separated epochs like '40' or '30,45', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if any(m < 1 for m in out) or out != sorted(out):
        raise argparse.ArgumentTypeError(f"milestones must be increasing positive epochs, got {text!r}")
    return out


def add_training_args(
    parser: argparse.ArgumentParser,
    defaults: dict[str, Any],
    *,
    default_precision: str,
    single_run: bool = True,
) -> None:
    """Add the flags shared by ``experiments.train`` and ``experiments.cifar10.cifar10mlp``
    (the reference script's flags, same names and meanings). ``defaults`` overrides defaults by
    destination name; ``default_precision`` is ``"float32"`` or ``"half"`` (without ``--float``).
    ``single_run=False`` (``experiments.compare``) leaves out the flags of one training run
    (``--width``, ``--save-dir``, ``--save-model``, ``--resume``, ``--stop-after``, ``--test``,
    ``--model-path``) and sets them to their neutral values."""
    d = defaults
    net = parser.add_argument_group("network")
    arg = net.add_argument
    if single_run:
        arg("--width", type=int, default=d.get("width", 0),
            help="0: the infinite π-net; N > 0: the finite π-net of width N sampled from the same "
                 "initialisation (same --seed gives the same infinite net, then .sample(N))")
    else:
        parser.set_defaults(width=0, save_dir="", save_model=False, resume=None, stop_after=None, test=False,
                            model_path=None)
    arg("--r", "--pi-rank", dest="r", type=int, default=d.get("r", 64),
        help="rank r of the π-net (--pi-rank is the same flag: under torchrun, whose own parser takes --r "
             "for an ambiguous abbreviation of its options, write --pi-rank 400 or put -- before the flags)")
    arg("--depth", type=int, default=d.get("depth", 1),
        help="number of HIDDEN π-layers, as in the reference library (its L): the net has an input layer, "
             "DEPTH hidden π-layers and an output π-layer, i.e. DEPTH+1 ReLUs")
    arg("--first-layer-alpha", type=float, default=d.get("first_layer_alpha", 1.0),
        help="multiplier α_in on the input layer's output")
    arg("--last-layer-alpha", type=float, default=d.get("last_layer_alpha", 1.0),
        help="multiplier α_out on the network output")
    arg("--bias-alpha", type=float, default=d.get("bias_alpha", 1.0),
        help="multiplier β on every bias; 0 builds no biases")
    arg("--last-bias-alpha", type=float, default=None, help="output-bias multiplier (None: --bias-alpha)")
    arg("--layernorm", action="store_true", help="π-layers see only the direction of their input")
    arg("--chunk-size", type=int, default=None,
        help="evaluate infinite layers CHUNK_SIZE rows of M at a time (bounds b×M temporaries)")

    opt = parser.add_argument_group("optimisation: torch.optim.SGD wrapped by pinet.optim.PiOptimizerWrapper")
    arg = opt.add_argument
    arg("--lr", type=float, default=d.get("lr", 1.0), help="learning rate")
    arg("--wd", type=float, default=d.get("wd", 0.0), help="weight decay")
    arg("--momentum", type=float, default=d.get("momentum", 0.0), help="SGD momentum")
    arg("--dampening", type=float, default=0.0, help="SGD dampening")
    arg("--nesterov", action="store_true", help="Nesterov momentum (needs --momentum > 0, --dampening 0)")
    arg("--batch-size", type=int, default=d.get("batch_size", 32), help="training batch size")
    arg("--test-batch-size", type=int, default=d.get("test_batch_size", 1000), help="evaluation batch size")
    arg("--epochs", type=int, default=d.get("epochs", 6), help="number of epochs")
    arg("--first-layer-lr-mult", type=float, default=d.get("first_layer_lr_mult", 1.0),
        help="learning-rate multiplier of the input layer's weights")
    arg("--last-layer-lr-mult", type=float, default=d.get("last_layer_lr_mult", 1.0),
        help="learning-rate multiplier of the output layer's weights")
    arg("--bias-lr-mult", type=float, default=d.get("bias_lr_mult", 1.0), help="lr multiplier of the biases")
    arg("--apply-lr-mult-to-wd", action=argparse.BooleanOptionalAction,
        default=d.get("apply_lr_mult_to_wd", True),
        help="--no-apply-lr-mult-to-wd (the reference flag) divides each group's weight decay by its lr "
             "multiplier, so that lr*wd is the same in every group")
    arg("--gclip", type=float, default=d.get("gclip", 0.0),
        help="clip the gradient norm (π-layers by their ‖Δ‖) to GCLIP; 0 disables")
    arg("--gclip-per-param", action=argparse.BooleanOptionalAction, default=d.get("gclip_per_param", False),
        help="clip each parameter / π-layer by its own norm instead of the global norm")
    arg("--accum-steps", type=int, default=1, help="accumulate gradients over ACCUM_STEPS batches per update")
    arg("--scheduler", type=str.lower, default="none", choices=["none", "cosine", "multistep"],
        help="learning-rate schedule, stepped per epoch: cosine decays to 0 over --epochs, multistep "
             "multiplies by --lr-drop-ratio at each of --lr-drop-milestones")
    arg("--lr-drop-ratio", type=float, default=0.5, help="multistep factor")
    arg("--lr-drop-milestones", type=_milestones, default=[],
        help="comma-separated epochs at which multistep drops the learning rate, e.g. 40 or 30,45")
    arg("--loss", type=str.lower, default=d.get("loss", "xent"), choices=["xent", "mse"],
        help="xent: cross-entropy; mse: mean squared error to one-hot targets minus 1/k")
    arg("--seed", type=int, default=0, help="seed of the initialisation and of the data order")

    prec = parser.add_argument_group("precision and device")
    arg = prec.add_argument
    if default_precision == "half":
        fhelp = ("float32 everywhere (reference flag; without it the infinite net stores its π-rows in "
                 "float16 and computes in float32, finite nets use float32)")
    else:
        fhelp = "float32 everywhere (already the default here; accepted as in the reference command)"
    arg("--float", action="store_true", help=fhelp)
    arg("--float64", action="store_true", help="float64 everywhere (exact-resume checks)")
    arg("--cuda", action="store_true", help="run on the GPU (an error if CUDA is not available)")
    arg("--threads", type=int, default=None,
        help="torch CPU threads (None: torch's choice). On a machine shared with other jobs --threads 1 "
             "avoids OpenMP oversubscription, which can slow small steps down many times")
    arg("--native", action="store_true",
        help="run the π-product's float32 reduce products in pinet.native's AVX2 kernel (x86-64 with AVX2 "
             "and g++; an error if unavailable). 20-23%% faster steps at 20k-40k rows on the development CPU")
    arg("--dist-timeout", type=float, default=900.0, metavar="SECONDS",
        help="under torchrun with several processes (the π-rows are sharded over them, docs/distributed.md): "
             "the process group's timeout; a rank that died or hangs makes the others stop with an error "
             "after at most this long. Must exceed the time rank 0 takes to write a checkpoint")
    parser.set_defaults(_default_precision=default_precision)

    io = parser.add_argument_group("outputs, checkpoints, evaluation" if single_run else "data subsets")
    arg = io.add_argument
    arg("--train-subset", type=int, default=None, help="use only the first N training examples")
    arg("--test-subset", type=int, default=None, help="use only the first N test examples")
    if not single_run:
        return
    arg("--save-dir", type=str, default=d.get("save_dir", ""),
        help="directory for log.csv and checkpoint.pt (written every epoch) and curves.png (at the end); "
             "empty: write nothing")
    arg("--save-model", action="store_true",
        help="also write model.pt every epoch (the state dict; InfPiMLP.from_state_dict loads it)")
    arg("--resume", type=str, default=None, metavar="PATH",
        help="continue from a checkpoint.pt (model, optimizer, scheduler, epoch, RNG); training flags come "
             "from the checkpoint, --epochs may be raised (a cosine schedule keeps its original length)")
    arg("--stop-after", type=int, default=None, metavar="EPOCH",
        help="stop after this epoch as if interrupted (the schedule still follows --epochs); continue later "
             "with --resume")
    arg("--test", action="store_true", help="only evaluate the model in --model-path on the test set")
    arg("--model-path", type=str, default=None, help="model.pt or checkpoint.pt to evaluate with --test")


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad values with ``parser.error`` (usage + one line naming the flag, exit status 2)."""

    def bad(flag, msg):
        parser.error(f"argument {flag}: {msg}")

    def values(*names):
        return [("--" + n.replace("_", "-"), getattr(args, n)) for n in names]

    for flag, v in values("r", "batch_size", "test_batch_size", "accum_steps"):
        if v < 1:
            bad(flag, f"must be a positive integer, got {v}")
    for flag, v in values("width", "depth", "epochs"):
        if v < 0:
            bad(flag, f"must be >= 0, got {v}")
    if 0 < args.width < args.r:
        # The finite π-net projects gradients onto the r-dimensional column span of Ω (n × r):
        # with n < r, ΩᵀΩ is singular and there is no such projection.
        bad("--width", f"a finite π-net needs width >= r (got --width {args.width} < --r {args.r})")
    for flag, v in values("lr", "wd", "momentum", "gclip", "first_layer_lr_mult", "last_layer_lr_mult",
                          "bias_lr_mult", "lr_drop_ratio"):  # fmt: skip
        if not math.isfinite(v) or v < 0:
            bad(flag, f"must be a finite number >= 0, got {v}")
    if args.momentum >= 1:
        # The velocity of SGD with momentum μ >= 1 never forgets a gradient: it grows without bound.
        bad("--momentum", f"must be in [0, 1), got {args.momentum}")
    if not 0 <= args.seed < 2**63 - 8:  # torch seeds are 64-bit; the runs derive seed + 1, seed + 2, ...
        bad("--seed", f"must be an int in [0, 2**63 - 8), got {args.seed}")
    if args.epochs < 1 and not args.test:
        bad("--epochs", f"must be >= 1 (nothing would be trained), got {args.epochs}")
    for flag, v in values("first_layer_alpha", "last_layer_alpha", "bias_alpha", "last_bias_alpha"):
        if v is not None and not math.isfinite(v):
            bad(flag, f"must be finite, got {v}")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        bad("--dist-timeout", f"must be a positive number of seconds, got {args.dist_timeout}")
    for flag, v in values("threads", "chunk_size", "train_subset", "test_subset", "stop_after"):
        if v is not None and v < 1:
            bad(flag, f"must be a positive integer, got {v}")
    if not 0.0 <= args.dampening <= 1.0:
        bad("--dampening", f"must be in [0, 1], got {args.dampening}")
    if args.nesterov and (args.momentum <= 0 or args.dampening != 0):
        bad("--nesterov", "needs --momentum > 0 and --dampening 0 (torch.optim.SGD)")
    if args.scheduler == "multistep" and not args.lr_drop_milestones:
        bad("--scheduler", "multistep needs --lr-drop-milestones (e.g. --lr-drop-milestones 40)")
    if args.lr_drop_milestones and args.scheduler != "multistep":
        bad("--lr-drop-milestones", "only used with --scheduler multistep")
    if args.float and args.float64:
        bad("--float64", "not allowed together with --float")
    if args.test and not args.model_path:
        bad("--test", "needs --model-path PATH (a model.pt or checkpoint.pt to evaluate)")
    if args.model_path and not args.test:
        bad("--model-path", "is only used with --test")
    if args.test and args.resume:
        bad("--resume", "not allowed together with --test")
    if args.resume and not os.path.isfile(args.resume):
        bad("--resume", f"no such checkpoint file: {args.resume}")
    if args.model_path and not os.path.isfile(args.model_path):
        bad("--model-path", f"no such file: {args.model_path}")


def precision(args) -> tuple[torch.dtype, torch.dtype]:
    """``(storage dtype of the infinite net's π-rows, dtype of everything else)`` from the flags."""
    if args.float64:
        return torch.float64, torch.float64
    if args.float or args._default_precision == "float32":
        return torch.float32, torch.float32
    return torch.float16, torch.float32


def resolve_device(args) -> torch.device:
    """``cuda`` with ``--cuda`` (a :class:`CLIError` if there is no usable GPU), else ``cpu``. Under
    torchrun the GPU is ``cuda:LOCAL_RANK``."""
    if args.cuda:
        if not torch.cuda.is_available():
            raise CLIError("--cuda was given but CUDA is not available on this machine; run without --cuda "
                           "(on CPU the reference README also adds --float)")  # fmt: skip
        if world_size() > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise CLIError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible; "
                               "start at most one process per GPU (torchrun --nproc-per-node)")  # fmt: skip
            return torch.device("cuda", local)
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- several processes
def world_size() -> int:
    """Processes of this run: torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CLIError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def rank() -> int:
    """This process's rank (0 without torchrun or before the process group exists)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _init_distributed(args, device: torch.device) -> bool:
    """Under torchrun with ``WORLD_SIZE > 1``: join the process group (NCCL on CUDA, gloo on CPU,
    ``--dist-timeout``) and return True; else False. Finite nets are refused (nothing to shard)."""
    if world_size() <= 1:
        return False
    import datetime

    import torch.distributed as dist

    if args.width:
        raise CLIError(f"--width {args.width}: a finite π-net has no π-rows to shard over the {world_size()} "
                       "processes; train it in one process (without torchrun)")  # fmt: skip
    if not dist.is_available():
        raise CLIError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"cannot join the {world_size()}-process group ({backend}): {_one_line(e)}") from None
    return True


# ---------------------------------------------------------------------------------- model, optimizer
def build_model(args, d_in: int, d_out: int, device: torch.device) -> nn.Module:
    """The infinite π-MLP initialised from ``--seed`` or, with ``--width N``, its finite sample.

    The same seed always gives the same infinite initialisation; the finite net is ``.sample(N)``
    of it (``Ω`` drawn from the same generator afterwards).
    """
    storage, compute = precision(args)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    inf = pinet.InfPiMLP(
        d_in, d_out, args.r, args.depth,
        first_layer_alpha=args.first_layer_alpha, last_layer_alpha=args.last_layer_alpha,
        bias_alpha=args.bias_alpha, last_bias_alpha=args.last_bias_alpha, layernorm=args.layernorm,
        chunk_size=args.chunk_size, device=device, dtype=storage,
    )  # fmt: skip
    inf.reset_parameters(gen)
    if args.width:
        return inf.sample(args.width, generator=gen, dtype=compute)
    return inf


def build_optimizer(args, model: nn.Module) -> tuple[PiOptimizerWrapper, Any]:
    """SGD over :func:`pinet.optim.param_groups` wrapped with the accumulate/clip hooks, and the
    per-epoch learning-rate scheduler (or ``None``)."""
    groups = param_groups(
        model, args.lr, args.wd, args.first_layer_lr_mult, args.last_layer_lr_mult, args.bias_lr_mult,
        apply_lr_mult_to_wd=args.apply_lr_mult_to_wd,
    )  # fmt: skip
    # torch's fused SGD: one pass over gradient, momentum and weight instead of three, the same
    # update up to rounding (float64 weights differ by ~1e-17 after a few steps, fused FMAs); on the
    # CPU it saves 0.5-0.8 ms of a 17-33 ms step of the CIFAR-10 net (python -m
    # benchmarks.bench_step --sgd fused). Its kernels exist for CPU and CUDA tensors only.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())
    sgd = torch.optim.SGD(
        groups, lr=args.lr, momentum=args.momentum, dampening=args.dampening, nesterov=args.nesterov,
        fused=fused or None,
    )  # fmt: skip
    hooks = []
    if args.accum_steps > 1:
        hooks.append(Accumulate(args.accum_steps))  # before clipping: clip the accumulated gradient
    if args.gclip > 0:
        hooks.append(ClipGradNorm(args.gclip, per_param=args.gclip_per_param))
    opt = PiOptimizerWrapper(sgd, model, hooks=hooks)
    if args.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1))
    elif args.scheduler == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=args.lr_drop_milestones, gamma=args.lr_drop_ratio
        )
    else:
        sched = None
    return opt, sched


def make_loss(kind: str, num_classes: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss(out (b, k), y (b,)) -> 0-dim``: ``"xent"`` cross-entropy, ``"mse"`` mean squared error
    to one-hot targets minus ``1/k`` (the reference's ``one_hot - 0.1`` for 10 classes)."""
    if kind == "xent":
        return F.cross_entropy
    if kind == "mse":
        def mse(out: Tensor, y: Tensor) -> Tensor:
            target = F.one_hot(y, num_classes).to(out.dtype) - 1.0 / num_classes
            return F.mse_loss(out, target)

        return mse
    raise ValueError(f"make_loss: kind must be 'xent' or 'mse', got {kind!r}")


def rows_per_layer(model: nn.Module) -> list[int]:
    """``M`` of every π-layer of an infinite net (hidden then output), all processes together when
    the rows are sharded; ``[]`` for finite nets."""
    return [m.global_rows for m in model.modules() if isinstance(m, pinet.PiState)]


# ------------------------------------------------------------------------------------- the loop
def _to(x: Tensor, y: Tensor, device, dtype) -> tuple[Tensor, Tensor]:
    return x.reshape(x.shape[0], -1).to(device=device, dtype=dtype), y.to(device)


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    device=None,
    dtype=torch.float32,
    progress=None,
) -> dict[str, float]:
    """One pass of ``zero_grad; backward; step`` over ``batches``. Returns the example-weighted
    mean ``loss`` and ``acc`` of the training batches (measured before each step) and the mean
    norm ``grad_norm`` of the applied updates before clipping (``PiOptimizerWrapper.stats``). ``progress``: an optional tqdm bar
    updated per batch. A non-finite gradient raises ``FloatingPointError`` with the step number."""
    model.train()
    total = correct = 0
    loss_sum = 0.0
    norms = []
    for step, (x, y) in enumerate(batches):
        x, y = _to(x, y, device, dtype)
        out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        try:
            opt.step()
        except FloatingPointError as e:
            raise FloatingPointError(f"step {step + 1}: {e}") from None
        # The norm of each applied update before clipping (with --accumulate, of the accumulated
        # gradient: what is actually clipped); stash steps apply nothing and record nothing.
        stats = getattr(opt, "stats", None)
        if stats is not None and stats.applied:
            norms.append(stats.grad_norm)
        b = y.shape[0]
        loss_sum += loss.item() * b
        correct += (out.argmax(1) == y).sum().item()
        total += b
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return {
        "loss": loss_sum / max(total, 1),
        "acc": correct / max(total, 1),
        "grad_norm": sum(norms) / len(norms) if norms else float("nan"),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], loss_fn, *, device=None, dtype=torch.float32
) -> dict[str, float]:
    """Example-weighted mean ``loss`` and ``acc`` (plus ``n``, ``correct``) over ``batches``."""
    model.eval()
    total = correct = 0
    loss_sum = 0.0
    for x, y in batches:
        x, y = _to(x, y, device, dtype)
        out = model(x)
        loss_sum += loss_fn(out, y).item() * y.shape[0]
        correct += (out.argmax(1) == y).sum().item()
        total += y.shape[0]
    return {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1), "n": total, "correct": correct}


# ---------------------------------------------------------------------------------- logging, plots
_COLUMNS = [("epoch", 5), ("train_loss", 10), ("train_acc", 9), ("test_loss", 9), ("test_acc", 8),
            ("lr", 9), ("grad_norm", 9), ("M", 15), ("time", 7)]  # fmt: skip


def format_header() -> str:
    """The per-epoch table header (``M``: π-rows per infinite layer, ``time``: epoch seconds)."""
    return "  ".join(name.rjust(w) for name, w in _COLUMNS)


def format_row(row: dict) -> str:
    """One history row as a table line."""
    M = ",".join(str(m) for m in row.get("rows", [])) or "-"
    vals = {
        "epoch": str(row["epoch"]),
        "train_loss": f"{row['train_loss']:.4f}",
        "train_acc": f"{100 * row['train_acc']:.2f}%",
        "test_loss": f"{row['test_loss']:.4f}",
        "test_acc": f"{100 * row['test_acc']:.2f}%",
        "lr": f"{row['lr']:.3g}",
        "grad_norm": f"{row['grad_norm']:.3g}",
        "M": M,
        "time": f"{row['epoch_time']:.1f}s",
    }
    return "  ".join(vals[name].rjust(w) for name, w in _COLUMNS)


def write_history_csv(history: list[dict], path: str, head: list[str], tail: list[str]) -> None:
    """Write ``history`` (one dict per epoch, π-rows per infinite layer under ``"rows"``) as CSV,
    atomically: the columns ``head``, then ``M_layer{i}`` for every π-layer, then ``tail``."""
    n_layers = max((len(r.get("rows", [])) for r in history), default=0)
    fields = list(head) + [f"M_layer{i + 1}" for i in range(n_layers)] + list(tail)

    def write(f) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.DictWriter(text, fieldnames=fields)
        w.writeheader()
        for r in history:
            out = {k: r[k] for k in fields if k in r}
            out.update({f"M_layer{i + 1}": m for i, m in enumerate(r.get("rows", []))})
            w.writerow(out)
        text.flush()
        text.detach()  # leave the binary file open for the fsync

    atomic_write(path, write)


def write_csv(history: list[dict], path: str) -> None:
    """Write ``history`` as CSV: epoch, train/test loss and accuracy, lr, grad_norm, ``M_layer{i}``
    (π-rows of layer i of an infinite net), epoch_time, elapsed (seconds)."""
    head = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "grad_norm"]
    write_history_csv(history, path, head, ["epoch_time", "elapsed"])


def plot_rows(ax, history: list[dict]) -> None:
    """Draw the π-rows ``M`` of each layer per epoch (``history[i]["rows"]``) on the matplotlib
    axes ``ax``; a note for finite nets, which have none."""
    ep = [r["epoch"] for r in history]
    rows = [r.get("rows", []) for r in history]
    if rows and rows[-1]:
        for i in range(len(rows[-1])):
            name = f"π-layer {i + 1}" + (" (output)" if i == len(rows[-1]) - 1 else "")
            ax.plot(ep, [m[i] for m in rows], "o-", label=name)
        ax.set(xlabel="epoch", ylabel="rows M", title="state size M per π-layer")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "finite net: fixed size", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="state size M per π-layer", xticks=[], yticks=[])


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """PNG with the learning curves (train/test loss and accuracy per epoch) and, for infinite nets,
    the number of π-rows ``M`` of each layer per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    ax.plot(ep, [r["test_loss"] for r in history], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.legend()
    ax = axes[1]
    ax.plot(ep, [100 * r["train_acc"] for r in history], "o-", label="train")
    ax.plot(ep, [100 * r["test_acc"] for r in history], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax.legend()
    plot_rows(axes[2], history)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=90, format="png"))
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------- checkpoints
def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX; Windows has no
    # directory handles to sync, and there os.replace is already durable per file).
    if os.name != "posix":
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` atomically and durably: ``write(f)`` fills ``path + ".tmp"`` (binary file
    ``f``), which is fsynced, renamed over ``path``, and the directory fsynced. A stale temp file
    from an interrupted run is replaced; on any error the temp file is removed and ``path`` is
    untouched (the old file, or none)."""
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(path)


def _save(obj, path: str) -> None:
    # Write, fsync, rename, fsync the directory: an interrupted save (or a power loss) never leaves a
    # truncated checkpoint behind, and a finished one survives.
    atomic_write(path, lambda f: torch.save(obj, f))


# What a checkpoint.pt must hold for an exact resume, checked before anything is loaded.
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "history", "epoch")
_RNG_KEYS = ("torch", "data", "python")


def _check_checkpoint(checkpoint: dict, where: str) -> None:
    missing = [k for k in _CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise CLIError(f"{where} has no {', '.join(repr(k) for k in missing)} entry: it cannot be resumed exactly "
                       "(a checkpoint.pt written by this program holds the model, optimizer, scheduler, RNG "
                       "states, history and epoch)")  # fmt: skip
    rng = checkpoint["rng"]
    if not isinstance(rng, dict) or any(k not in rng for k in _RNG_KEYS):
        have = sorted(rng) if isinstance(rng, dict) else type(rng).__name__
        raise CLIError(f"{where}: its RNG state ('rng') must hold {', '.join(_RNG_KEYS)}, got {have}; "
                       "without it the data order and dropout of a resumed run would differ")  # fmt: skip
    for k in ("torch", "data"):
        if not isinstance(rng[k], Tensor) or rng[k].dtype != torch.uint8:
            raise CLIError(f"{where}: rng[{k!r}] must be a uint8 tensor (a torch generator state)")
    epoch = checkpoint["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CLIError(f"{where}: 'epoch' must be a non-negative int, got {epoch!r}")
    _check_history(checkpoint["history"], epoch, where)


# One row per epoch, as fit (and transfer_imagenet) write them: format_row, write_csv, plot_history
# and the resumed elapsed time read these keys.
_HISTORY_NUMBERS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "grad_norm", "epoch_time", "elapsed")


def _check_history(history, epoch: int, where: str) -> None:
    if not isinstance(history, list):
        raise CLIError(f"{where}: 'history' must be a list, got {type(history).__name__}")
    if len(history) != epoch:
        # A resumed run appends to it: any other length gives a log with missing or repeated epochs.
        raise CLIError(f"{where}: 'history' must hold one row per epoch ({epoch}), got {len(history)} rows")
    for i, row in enumerate(history):
        if not isinstance(row, dict):
            raise CLIError(f"{where}: history[{i}] must be a dict (one epoch's row), got {type(row).__name__}")
        missing = [k for k in ("epoch", *_HISTORY_NUMBERS, "rows") if k not in row]
        if missing:
            raise CLIError(f"{where}: history[{i}] has no {', '.join(map(repr, missing))} entry")
        if isinstance(row["epoch"], bool) or row["epoch"] != i + 1 or not isinstance(row["epoch"], int):
            raise CLIError(f"{where}: history[{i}]['epoch'] must be {i + 1}, got {row['epoch']!r}")
        for k in _HISTORY_NUMBERS:
            if isinstance(row[k], bool) or not isinstance(row[k], (int, float)):
                raise CLIError(f"{where}: history[{i}][{k!r}] must be a number, got {row[k]!r}")
        rows = row["rows"]
        if not isinstance(rows, list) or any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in rows):
            raise CLIError(f"{where}: history[{i}]['rows'] must be a list of π-row counts, got {rows!r}")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


_BOOL_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def _saved_value_problem(action: argparse.Action, v) -> str | None:
    """What is wrong with ``v`` as the parsed value of ``action`` (None: nothing), by the action's own
    type: the values a checkpoint saves are what the parser produced, so they must look like it."""
    if isinstance(action, _BOOL_ACTIONS):
        return None if isinstance(v, bool) else "a bool"
    if v is None and action.default is None:
        return None
    t = action.type
    if action.choices is not None:
        return None if isinstance(v, str) and v in action.choices else f"one of {list(action.choices)}"
    if t is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else "an int"
    if t is float:
        return None if isinstance(v, (int, float)) and not isinstance(v, bool) else "a number"
    if t is None or t is str:
        return None if isinstance(v, str) else "a string"
    # A list-valued flag (comma-separated on the command line, e.g. --lr-drop-milestones): what the
    # parser makes of the saved list written back as text must be that list.
    if not isinstance(v, list):
        return "a list"
    try:
        ok = t(",".join(map(str, v))) == v
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        ok = False
    return None if ok else f"a list the flag accepts ({_flag(action.dest)} {','.join(map(str, v))!r} does not parse to it)"


class _SavedFlagsError:
    """Stands in for the parser in a command's flag checks run on a checkpoint's saved flags: the
    check's ``parser.error(msg)`` becomes one CLIError naming the checkpoint (not a usage message
    about flags nobody typed)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, msg: str):
        raise CLIError(f"{self.where}: its saved training flags are invalid ({msg}); it was not written by this "
                       "program or has been edited")  # fmt: skip


def _check_saved_args(
    parser: argparse.ArgumentParser, saved, where: str, cli_only: set[str],
    check: Callable[[Any, argparse.Namespace], None] | None = None, prepare: Callable[[argparse.Namespace], None] | None = None,
    given: argparse.Namespace | None = None, typed: set[str] = frozenset(),
) -> None:
    """A CLIError unless ``saved`` (a checkpoint's ``args``) is a dict holding every training flag of
    ``parser`` (all but ``cli_only`` and --save-dir) with values of the flag's type that pass ``check``
    (default :func:`check_training_args`, the checks of typed flags), applied to the parser's defaults
    overridden by the saved flags (``prepare`` adjusts that namespace first). A flag the checkpoint
    lacks (one added after it was written) may be supplied on the command line: ``typed`` names the
    flags typed there and ``given`` holds their values."""
    if not isinstance(saved, dict):
        raise CLIError(f"{where}: its saved training flags ('args') must be a dict of flag values, got "
                       f"{type(saved).__name__}")  # fmt: skip
    actions = {a.dest: a for a in parser._actions if a.dest != "help" and a.default is not argparse.SUPPRESS}
    required = [d for d in actions if d not in cli_only and d != "save_dir"]
    missing = [d for d in required if d not in saved and d not in typed]
    if missing:
        # Resumed without them, the run would silently train with today's defaults instead.
        raise CLIError(f"{where}: its saved training flags ('args') lack {', '.join(map(_flag, missing))} (a "
                       "checkpoint from an older version?); pass them on the command line with the values "
                       "that run used")  # fmt: skip
    for d in required:
        if d in saved:
            problem = _saved_value_problem(actions[d], saved[d])
            if problem is not None:
                raise CLIError(f"{where}: its saved {_flag(d)} must be {problem}, got {saved[d]!r}")
    ns = parser.parse_args([])
    for d in required:
        setattr(ns, d, saved[d] if d in saved else getattr(given, d))
    if prepare is not None:
        prepare(ns)
    (check or check_training_args)(_SavedFlagsError(where), ns)


def _file_in_the_way(directory: str) -> str | None:
    """The nearest existing path at or above ``directory``, if it is not a directory."""
    p = os.path.abspath(directory)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return None if os.path.isdir(p) else p


def check_output_dir(flag: str, path: str) -> None:
    """A :class:`CLIError` before any work if the directory ``path`` cannot be made later: a file
    at ``path`` or where one of its parents would have to be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path} is an existing file, not a directory")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise CLIError(f"{flag} {path}: {blocker} is a file, not a directory")


def check_output_file(flag: str, path: str, also: tuple[str, ...] = ()) -> None:
    """A :class:`CLIError` before any work if ``path`` cannot be written later: a directory at
    ``path`` (or at ``path`` with each suffix in ``also`` for its own, e.g. ``(".json",)``), or a
    file where one of its parent directories would have to be."""
    for target in (path, *(os.path.splitext(path)[0] + suffix for suffix in also)):
        if os.path.isdir(target):
            raise CLIError(f"{flag} {path}: {target} is a directory, not a file")
    blocker = _file_in_the_way(os.path.dirname(os.path.abspath(path)))
    if blocker is not None:
        raise CLIError(f"{flag} {path}: {blocker} is a file, not a directory")


def _prepare_save_dir(save_dir: str) -> None:
    """Create ``save_dir`` (a :class:`CLIError` if it is a file or cannot be created) and remove the
    temp files an interrupted run may have left."""
    check_output_dir("--save-dir", save_dir)
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--save-dir {save_dir}: cannot create the directory ({e.strerror or e})") from None
    for name in ("checkpoint.pt", "model.pt", "log.csv", "curves.png"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(save_dir, name + ".tmp"))


def _one_line(e: Exception) -> str:
    # torch's and pinet's load errors put the problems on the lines after a header: keep the first.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[0] + (" " + lines[1] if len(lines) > 1 and lines[0].endswith(":") else "")


def _load(path: str, what: str) -> dict:
    try:
        # Under torchrun every rank reads the file: mapped, so each keeps only its share in memory.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=world_size() > 1)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        first_line = str(e).splitlines()[0] if str(e) else ""
        if len(first_line) > 160:  # a damaged zip archive is reported in one very long line
            first_line = first_line[:160] + " ..."
        raise CLIError(f"cannot read {what} {path}: not a complete file written by torch.save "
                       f"({type(e).__name__}: {first_line})") from None  # fmt: skip
    if not isinstance(obj, dict):
        raise CLIError(f"{what} {path} does not contain a dict (got {type(obj).__name__})")
    return obj


def load_model_file(path: str, device=None) -> nn.Module:
    """Rebuild a π-MLP from ``model.pt`` (a state dict) or ``checkpoint.pt`` (its ``"model"``):
    :class:`pinet.InfPiMLP` or :class:`pinet.FinPiMLP`, structure and multipliers from the file."""
    sd = _load(path, "model file")
    if "model" in sd and "format" in sd:
        sd = sd["model"]
    extra = sd.get("_extra_state")
    if not isinstance(extra, dict) or "depth" not in extra:
        raise CLIError(f"{path} is not a pinet π-MLP state dict (no '_extra_state' with the structure)")
    try:
        kind = pinet.FinPiMLP if "width" in extra else pinet.InfPiMLP
        net = kind.from_state_dict(sd, device=device)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CLIError(f"cannot load the model in {path}: {_one_line(e)}") from None
    return net


# On --resume, flags that are not part of the training itself always come from the command line,
# --epochs and --save-dir from the command line when given (else from the checkpoint / its
# directory), and every other flag from the checkpoint (giving a different value is an error).
_CLI_ONLY = {"resume", "no_progress", "human", "test", "model_path", "_default_precision", "threads", "dist_timeout",
             "native", "chunk_size", "cuda", "data", "download", "save_model", "test_batch_size", "stop_after"}
_CHANGEABLE = {"epochs", "save_dir"}


def given_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags typed in ``argv`` (``None``: ``sys.argv[1:]``), whatever their
    values: ``--lr 1.0`` counts as given even where 1.0 is the default. ``argv`` must already parse."""
    # A value compared with the default cannot tell `--save-dir output/train` from no --save-dir at
    # all. Parsed once more with every default suppressed, the namespace holds only what argv set.
    actions = [(a, a.default) for a in parser._actions]
    parser_defaults = dict(parser._defaults)
    try:
        for a, _ in actions:
            a.default = argparse.SUPPRESS
        parser._defaults.clear()
        typed = parser.parse_args(argv)
    finally:
        for a, default in actions:
            a.default = default
        parser._defaults.clear()
        parser._defaults.update(parser_defaults)
    return set(vars(typed))


def _merge_resume_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, saved: dict, given: set[str],
    cli_only: set[str] = _CLI_ONLY, changeable: str = "only --epochs, --save-dir and output flags may change",
    *, check: Callable[[Any, argparse.Namespace], None] | None = None,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> argparse.Namespace:
    """``args`` with the training flags of the checkpoint (``saved``). A flag in ``given`` (typed on
    the command line, see :func:`given_dests`) that differs from the checkpoint is a :class:`CLIError`,
    except --epochs and --save-dir, which are then taken from the command line; --save-dir not given
    is the checkpoint's directory. ``saved`` is checked first (:func:`_check_saved_args` with
    ``check`` and ``prepare``): a malformed, incomplete or invalid set of flags is a CLIError."""
    _check_saved_args(parser, saved, args.resume or "the checkpoint", cli_only, check, prepare, args, given)
    merged = argparse.Namespace(**vars(args))
    for key, old in saved.items():
        if key in cli_only or not hasattr(args, key):
            continue
        if key in given:
            if key in _CHANGEABLE:
                continue
            new = getattr(args, key)
            if new != old:
                flag = "--" + key.replace("_", "-")
                raise CLIError(f"{flag} {new} conflicts with the checkpoint ({flag} {old}); a resumed run keeps "
                               f"its training flags ({changeable})")
        setattr(merged, key, old)
    if "save_dir" not in given:
        merged.save_dir = os.path.dirname(os.path.abspath(args.resume))
    return merged


def _rng_state(data_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------ the driver
@dataclass
class RunResult:
    """What :func:`fit` returns: the per-epoch ``history`` rows, the trained ``model`` and where
    files were written (``save_dir``, ``""`` if nowhere)."""

    history: list[dict]
    model: nn.Module
    save_dir: str


def fit(
    args: argparse.Namespace,
    data,
    *,
    device: torch.device,
    checkpoint: dict | None = None,
    progress: bool = True,
    quiet: bool = False,
    title: str = "",
    model: nn.Module | None = None,
) -> RunResult:
    """Train per ``args`` (the shared flags) on ``data`` (:class:`TensorData`/:class:`DatasetData`).

    Prints a table row per epoch; with ``args.save_dir`` writes ``log.csv`` and ``checkpoint.pt``
    every epoch (and ``model.pt`` with ``args.save_model``) and ``curves.png`` at the end.
    ``checkpoint`` (a loaded ``checkpoint.pt``) continues a run exactly: model, optimizer and hook
    state, scheduler, epoch, history, torch/data/python RNG states. ``model``: train this model
    instead of the π-MLP that ``args`` describes (e.g. a :class:`pinet.baselines.MLP`, in its own
    dtype).
    """
    batches = math.ceil(data.n_train / args.batch_size) * args.epochs
    if args.accum_steps > batches:
        # One update per --accum-steps batches (the stash carries over epochs): with more than the
        # whole run has, it would end without a single optimizer step.
        raise CLIError(f"--accum-steps {args.accum_steps} exceeds the {batches} batches of the whole run "
                       f"({data.n_train} examples, --batch-size {args.batch_size}, --epochs {args.epochs}): "
                       "nothing would be trained")  # fmt: skip
    storage, compute = precision(args)
    if model is None:
        model = build_model(args, data.d_in, data.d_out, device)
        kind = f"finite π-MLP, width {args.width}" if args.width else "infinite π-MLP"
    else:
        compute = next(model.parameters()).dtype
        kind = type(model).__name__ + (f", width {model.width}" if hasattr(model, "width") else "")
    sharded = _shard_if_distributed(model)
    if sharded:
        kind += f", π-rows sharded over {world_size()} processes"
    lead = rank() == 0  # under torchrun only rank 0 prints and writes files
    opt, sched = build_optimizer(args, model)
    loss_fn = make_loss(args.loss, data.d_out)
    data_gen = torch.Generator().manual_seed(args.seed + 1)  # data order: its own stream
    history: list[dict] = []
    start = 0
    if args.save_dir and lead:
        check_output_dir("--save-dir", args.save_dir)  # a file in the way is refused before any work
        previous = [n for n in ("checkpoint.pt", "log.csv") if os.path.exists(os.path.join(args.save_dir, n))]
        if checkpoint is None and previous and not quiet:
            # Not silent: a fresh run replaces an earlier run's files there from its first epoch on.
            print(f"note: --save-dir {args.save_dir} holds an earlier run's {' and '.join(previous)}; this run "
                  "replaces them (continue that run with --resume instead)", file=sys.stderr)  # fmt: skip
    if checkpoint is not None:
        _check_checkpoint(checkpoint, "the checkpoint")
        try:
            # A sharded model keeps its share of the saved (whole-layer) rows and optimizer state.
            model.load_state_dict(checkpoint["model"])
            if sharded:
                pinet.distributed.load_optimizer_state_dict(opt, checkpoint["optimizer"])
            else:
                opt.load_state_dict(checkpoint["optimizer"])
            if sched is not None:
                sched.load_state_dict(checkpoint["scheduler"])
            _set_rng_state(checkpoint["rng"], data_gen)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CLIError(f"cannot restore the checkpoint: {_one_line(e)}") from None
        history = list(checkpoint["history"])
        start = int(checkpoint["epoch"])
    else:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
    if args.save_dir and lead:
        # Created only now: a checkpoint that cannot be restored leaves no empty folder behind.
        _prepare_save_dir(args.save_dir)

    save_dir = args.save_dir
    say = (lambda *a: None) if quiet or not lead else print
    say(f"{kind}: r={args.r}, depth={args.depth} hidden π-layer(s), {data.name}: {data.n_train} train / "
        f"{data.n_test} test, {data.d_in} features, {data.d_out} classes, {compute}"
        + (f" (π-rows {storage})" if rows_per_layer(model) and storage != compute else "")
        + f", {device}")  # fmt: skip
    if start:
        say(f"resumed from {args.resume} at epoch {start}")
    if checkpoint is not None and start >= args.epochs:
        say(f"nothing to do: the checkpoint is at epoch {start} and --epochs is {args.epochs}")
    say(format_header())
    for row in history:
        say(format_row(row))
    steps = math.ceil(data.n_train / args.batch_size)
    elapsed = history[-1]["elapsed"] if history else 0.0
    end = min(args.epochs, args.stop_after) if args.stop_after else args.epochs
    for epoch in range(start, end):
        t0 = time.perf_counter()
        group = opt.param_groups[0]
        # The base learning rate now: schedulers scale every group by the same factor.
        lr = args.lr * group["lr"] / group["initial_lr"] if group.get("initial_lr") else args.lr
        bar = None
        if progress and lead:
            from tqdm import tqdm

            desc = f"epoch {epoch + 1}/{args.epochs}"
            bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
        try:
            tr = train_epoch(model, data.train_batches(args.batch_size, data_gen), opt, loss_fn,
                             device=device, dtype=compute, progress=bar)  # fmt: skip
        except FloatingPointError as e:
            msg = f"training diverged in epoch {epoch + 1}, {e}; lower --lr or clip with --gclip"
            raise CLIError(msg) from None
        finally:
            if bar is not None:
                bar.close()
        if sched is not None:
            sched.step()
        te = evaluate(model, data.test_batches(args.test_batch_size), loss_fn, device=device, dtype=compute)
        dt = time.perf_counter() - t0
        elapsed += dt
        row = {
            "epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "test_loss": te["loss"],
            "test_acc": te["acc"], "lr": lr, "grad_norm": tr["grad_norm"], "rows": rows_per_layer(model),
            "epoch_time": dt, "elapsed": elapsed,
        }  # fmt: skip
        history.append(row)
        say(format_row(row))
        if save_dir:
            # Sharded: every rank sends its rows, rank 0 writes the whole layer (a one-process
            # checkpoint, loadable with any number of processes).
            model_sd = pinet.distributed.full_state_dict(model) if sharded else model.state_dict()
            opt_sd = pinet.distributed.full_optimizer_state_dict(opt) if sharded else opt.state_dict()
        if save_dir and lead:
            ckpt = {
                "format": CHECKPOINT_FORMAT, "args": _plain_args(args), "epoch": epoch + 1,
                "model": model_sd, "optimizer": opt_sd,
                "scheduler": sched.state_dict() if sched is not None else None,
                "rng": _rng_state(data_gen), "history": history,
            }  # fmt: skip
            _save(ckpt, os.path.join(save_dir, "checkpoint.pt"))
            if args.save_model:
                _save(model_sd, os.path.join(save_dir, "model.pt"))
            write_csv(history, os.path.join(save_dir, "log.csv"))
    if save_dir and history and lead:
        plot_history(history, os.path.join(save_dir, "curves.png"), title or f"{kind} on {data.name}")
        files = "log.csv, curves.png, checkpoint.pt" + (", model.pt" if args.save_model else "")
        say(f"wrote {files} in {save_dir} (resume with --resume {os.path.join(save_dir, 'checkpoint.pt')})")
    return RunResult(history, model, save_dir)


def _shard_if_distributed(model: nn.Module) -> bool:
    """Shard ``model``'s π-rows over the process group if there is one (torchrun); True if it did."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    try:
        pinet.distributed.shard(model)
    except ValueError as e:
        raise CLIError(f"cannot shard the model over {dist.get_world_size()} processes: {_one_line(e)}") from None
    return True


def _plain_args(args: argparse.Namespace) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def run_test(args, data, device: torch.device) -> dict[str, float]:
    """``--test --model-path``: evaluate a saved model on the test set and print one line."""
    model = load_model_file(args.model_path, device=device)
    _shard_if_distributed(model)
    if model.d_in != data.d_in or model.d_out != data.d_out:
        raise CLIError(f"the model in {args.model_path} maps {model.d_in} -> {model.d_out} features but the "
                       f"data has {data.d_in} features and {data.d_out} classes")
    dtype = model.layers[0].A.dtype if hasattr(model.layers[0], "A") else model.layers[0].weight.dtype
    loss_fn = make_loss(args.loss, data.d_out)
    res = evaluate(model, data.test_batches(args.test_batch_size), loss_fn, device=device, dtype=dtype)
    rows = rows_per_layer(model)
    if rank() != 0:
        return res
    print(f"test: loss {res['loss']:.4f}, accuracy {100 * res['acc']:.2f}% ({res['correct']}/{res['n']}), "
          f"model {args.model_path}" + (f" (M per π-layer: {','.join(map(str, rows))})" if rows else ""))
    return res


def _who() -> str:
    # Every rank reports its own errors; the prefix tells them apart.
    return f"[rank {os.environ.get('RANK', '?')}] " if world_size() > 1 else ""


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    make_data: Callable[[argparse.Namespace], Any],
    *,
    progress: Callable[[argparse.Namespace], bool],
) -> RunResult | dict | None:
    """Parse ``argv``, validate, optionally resume, load data, then train (or ``--test``).

    User errors print ``prog: error: ...`` on one line and raise ``SystemExit(2)``; a
    ``KeyboardInterrupt`` says how to resume and exits 130.
    """
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    try:
        checkpoint = None
        if args.resume:
            checkpoint = _load(args.resume, "checkpoint")
            if checkpoint.get("format") != CHECKPOINT_FORMAT or "args" not in checkpoint:
                raise CLIError(f"{args.resume} is not a checkpoint.pt written by this program "
                               "(model files are evaluated with --test --model-path)")
            _check_checkpoint(checkpoint, args.resume)
            args = _merge_resume_args(parser, args, checkpoint["args"], given_dests(parser, argv))
            # The checks of typed flags again, on what the run will use (saved and typed together).
            check_training_args(parser, args)
        if args.save_dir and os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
            raise CLIError(f"--save-dir {args.save_dir} is an existing file, not a directory")
        device = resolve_device(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        with contextlib.ExitStack() as scope:
            grouped = _init_distributed(args, device)
            if grouped:
                scope.callback(_leave_group)
            try:  # the setting is restored on return: cli() also runs inside other programs and tests
                scope.enter_context(pinet.native.use(args.native))
            except pinet.native.NativeUnavailable as e:
                raise CLIError(f"--native: {e}") from None
            data = make_data(args)
            if args.test:
                result = run_test(args, data, device)
            else:
                result = fit(args, data, device=device, checkpoint=checkpoint, progress=progress(args))
            if grouped:
                # A finished run leaves the group together: rank 0 is still writing its files when
                # the others are done, and a gloo peer torn down mid-connection can abort a process.
                import torch.distributed as dist

                try:
                    dist.barrier()
                except RuntimeError as e:  # a peer died or hung after its last step
                    raise pinet.distributed.ShardError(f"the other processes did not finish the run: {_one_line(e)}") from None
            return result
    except CLIError as e:
        print(f"{_who()}{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except pinet.distributed.ShardError as e:  # a rank died or hung: the others stop, saying so
        print(f"{_who()}{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        where = os.path.join(args.save_dir, "checkpoint.pt") if args.save_dir else None
        hint = f"; resume with --resume {where}" if where and os.path.exists(where) else ""
        print(f"\n{parser.prog}: interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None
