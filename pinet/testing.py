"""``pinet.testing``: check that finite π-networks track their infinite one, on your own network.

Train an infinite π-network and finite counterparts sampled from it (:func:`pinet.sample`) side
by side, on the same batches with the same optimizer recipe, and measure how far apart they end
up: relative errors of held-out outputs, of the loss curve and of the gradient-norm curve
(:func:`measure_rates`), the log-log rate over widths (:func:`fit_slope`), the calibrated
tracking statistic with its bounds (:func:`measure_tracking`, :func:`tracking_problems`) and one
assertion that does it all (:func:`assert_tracks_limit`). Also: hypothesis strategies for
optimizer configurations (:func:`optimizer_configs`, needs ``hypothesis``) and a hand-written
coefficient-space SGD reference for π-MLPs (:class:`CoefficientSpaceReference`).

Any network works: pass ``build(cfg, seed) -> nn.Module`` (an untrained infinite net built from
pinet's layers). Its output may be a tensor (b, k) or a tuple of them (several readouts): they are
concatenated along dim 1, and ``cfg.d`` / ``cfg.k`` must be the net's input size and total output
size. Without ``build`` the net is the :class:`pinet.InfPiMLP` described by ``cfg``.

Everything runs in float64 with explicit seeds, so a run is a deterministic function of
``(config, seed, width, omega_seed)``. The infinite net is trained once per ``(config, seed)``;
each finite net is sampled from a copy of the *untrained* infinite net and then trained alone on
the recorded batches (one finite net in memory at a time).

Shapes: ``d`` input dimension, ``k`` outputs, ``b`` batch, ``T`` held-out points, ``S`` steps.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch
from torch import Tensor

from torch import nn

from . import functional as F
from .hooks import Accumulate, ClipGradNorm, ProjectToR
from .models import InfPiMLP
from .optim import PiOptimizerWrapper, param_groups
from .sampling import sample

__all__ = [
    "DTYPE",
    "ERRORS",
    "Profile",
    "profile",
    "Builder",
    "TrainConfig",
    "RATE_CONFIGS",
    "Task",
    "Trajectory",
    "make_task",
    "build_infinite",
    "build_optimizer",
    "loss_fn",
    "train",
    "train_infinite",
    "train_finite",
    "rel_error",
    "fit_slope",
    "geo_mean",
    "RateResult",
    "measure_rates",
    "sampling_fluctuation",
    "sampled_errors",
    "omega_generator",
    "Tracking",
    "measure_tracking",
    "MAX_AMPLIFICATION",
    "MAX_RATIO",
    "tracking_problems",
    "stable",
    "BROKEN_OPTIMIZERS",
    "TRAINED_SAMPLING_CONFIGS",
    "SLOPE_RANGE",
    "MAX_ERROR_4096",
    "MAX_SLOPE",
    "assert_tracks_limit",
    "optimizer_configs",
    "outputs",
    "CoefficientSpaceReference",
]

DTYPE = torch.float64

#: ``build(cfg, seed) -> nn.Module``: an untrained infinite π-network for one seed.
Builder = Callable[["TrainConfig", int], nn.Module]

#: The errors a :class:`RateResult` holds, by the names ``which`` takes.
ERRORS = ("out", "loss", "gnorm")

# Seeds are offset and scaled into torch generator seeds (make_task, omega_generator); below 2**32
# these stay far inside the 64-bit range torch accepts.
_MAX_SEED = 2**32


# --------------------------------------------------------------------------- argument checks
# Users run this harness on their own nets: every public entry point checks its arguments before any
# training, so that a wrong call is a named TypeError/ValueError and never a test that cannot fail
# (no error names in `which`, a slope over one width) or a NaN that reads like a failure.
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(fn: str, name: str, v, lo: int | None = None, hi: int | None = None) -> int:
    if not _is_int(v):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        what = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
        raise ValueError(f"{fn}: {name} must be an int {what}, got {v}")
    return int(v)


def _seed(fn: str, name: str, v) -> int:
    return _int(fn, name, v, 0, _MAX_SEED)


def _real(fn: str, name: str, v, *, lo: float | None = None, open_lo: bool = False) -> float:
    if not _is_real(v):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v) or (lo is not None and (v <= lo if open_lo else v < lo)):
        what = "a finite number" + ("" if lo is None else f" {'>' if open_lo else '>='} {lo:g}")
        raise ValueError(f"{fn}: {name} must be {what}, got {v}")
    return v


def _bool(fn: str, name: str, v) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(v).__name__} {v!r}")


def _config(fn: str, name: str, cfg) -> None:
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"{fn}: {name} must be a pinet.testing.TrainConfig, got {type(cfg).__name__}")


def _callable(fn: str, name: str, v, what: str, optional: bool = True) -> None:
    if (v is not None or not optional) and not callable(v):
        raise TypeError(f"{fn}: {name} must be {what}{' or None' if optional else ''}, got {type(v).__name__}")


def _widths(fn: str, widths, *, slope: bool, r: int | None = None) -> list[int]:
    """``widths`` as a list of distinct positive ints (at least two with ``slope``; >= ``r`` if given)."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
        raise TypeError(f"{fn}: widths must be a collection of ints, got {type(widths).__name__} {widths!r}")
    widths = list(widths)
    for w in widths:
        _int(fn, "every width", w, 1)
    widths = [int(w) for w in widths]
    if len(set(widths)) != len(widths):
        # Errors are collected per width: a repeated width would pool two runs under one key.
        raise ValueError(f"{fn}: widths must be distinct, got {widths}")
    if len(widths) < (2 if slope else 1):
        need = "at least two distinct widths (a log-log slope needs two points)" if slope else "at least one width"
        raise ValueError(f"{fn}: need {need}, got {widths}")
    if r is not None and min(widths) < r:
        raise ValueError(f"{fn}: every width must be >= r = {r} of the config (ΩᵀΩ must be invertible), got {widths}")
    return widths


def _seeds(fn: str, seeds) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"{fn}: seeds must be a collection of ints, got {type(seeds).__name__} {seeds!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError(f"{fn}: seeds must not be empty (errors are averaged over seeds)")
    return [_seed(fn, "every seed", s) for s in seeds]


def _which(fn: str, which) -> list[str]:
    if isinstance(which, str):
        # A string is an iterable of letters: which="out" used to look up errors "o", "u", "t".
        raise TypeError(f"{fn}: which must be a collection of error names from {ERRORS}, got the string {which!r} "
                        f"(write ({which!r},))")  # fmt: skip
    if not isinstance(which, Iterable):
        raise TypeError(f"{fn}: which must be a collection of error names from {ERRORS}, got {type(which).__name__}")
    which = list(which)
    if not which:
        raise ValueError(f"{fn}: which must name at least one error from {ERRORS} (an empty which checks nothing)")
    bad = [w for w in which if w not in ERRORS]
    if bad:
        raise ValueError(f"{fn}: unknown error name(s) {bad} in which; expected names from {ERRORS}")
    return which


def _error_name(fn: str, which) -> str:
    if not isinstance(which, str) or which not in ERRORS:
        raise ValueError(f"{fn}: which must be one of {ERRORS}, got {which!r}")
    return which


def _net_and_inputs(fn: str, net, X) -> None:
    if not isinstance(net, nn.Module):
        raise TypeError(f"{fn}: net must be an nn.Module, got {type(net).__name__}")
    if not isinstance(X, Tensor) or X.dim() != 2:
        got = f"shape {tuple(X.shape)}" if isinstance(X, Tensor) else type(X).__name__
        raise TypeError(f"{fn}: X must be a (T, d) tensor, got {got}")


def _same_task(fn: str, cfg: TrainConfig, finite_cfg) -> None:
    if finite_cfg is None:
        return
    _config(fn, "finite_cfg", finite_cfg)
    # The finite nets are trained on the task made from cfg: finite_cfg may change the optimizer only.
    diff = [k for k in _TASK_FIELDS if getattr(cfg, k) != getattr(finite_cfg, k)]
    if diff:
        raise ValueError(f"{fn}: finite_cfg must describe the same data as cfg (it may change the optimizer only); "
                         f"it differs in {', '.join(f'{k} ({getattr(finite_cfg, k)} vs {getattr(cfg, k)})' for k in diff)}")


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration, applied identically to the infinite net and its finite samples.

    Network: ``d`` inputs, ``k`` outputs, rank ``r``, ``depth`` hidden π-layers, multipliers and
    ``layernorm`` as in :class:`pinet.InfPiMLP` (``bias_alpha = 0``: no biases); with a custom
    ``build`` only ``d`` and ``k`` (total outputs) are used.
    Optimizer: ``torch.optim.SGD`` over :func:`pinet.optim.param_groups` (``lr``, ``weight_decay``,
    the three lr multipliers, ``apply_lr_mult_to_wd``) with ``momentum``, ``dampening``,
    ``nesterov``; hooks ``Accumulate(accumulate)`` (if > 1) then ``ClipGradNorm(clip, per_param)``
    (if ``clip``), in that order, so that the accumulated gradient is clipped.
    Data: ``steps`` calls of ``step()`` (micro-batches when accumulating, so ``steps / accumulate``
    updates) of ``batch`` points each. ``minibatches=False`` trains on one fixed batch (full-batch
    gradient descent); ``True`` draws a fresh random minibatch from a pool of ``pool`` points every
    step. Outputs are compared on ``test`` held-out points.
    """

    name: str = "sgd"
    d: int = 4
    k: int = 2
    r: int = 4
    depth: int = 1
    layernorm: bool = False
    first_layer_alpha: float = 1.0
    last_layer_alpha: float = 1.0
    bias_alpha: float = 1.0
    lr: float = 0.5
    weight_decay: float = 0.0
    first_layer_lr_mult: float = 1.0
    last_layer_lr_mult: float = 1.0
    bias_lr_mult: float = 1.0
    apply_lr_mult_to_wd: bool = True
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    clip: float | None = None
    per_param_clip: bool = False
    accumulate: int = 1
    batch: int = 8
    steps: int = 20
    minibatches: bool = False
    pool: int = 64
    test: int = 64

    def __post_init__(self) -> None:
        # Checked at construction (and by dataclasses.replace): accumulate=0 used to mean 1, batch=0
        # or test=0 gave NaN errors, steps=0 and d=0 raw torch / ZeroDivision errors.
        fn = "TrainConfig"
        if not isinstance(self.name, str):
            raise TypeError(f"{fn}: name must be a str, got {type(self.name).__name__}")
        for name in ("d", "k", "r", "accumulate", "batch", "steps", "pool", "test"):
            _int(fn, name, getattr(self, name), 1)
        _int(fn, "depth", self.depth, 0)
        for name in ("layernorm", "apply_lr_mult_to_wd", "nesterov", "per_param_clip", "minibatches"):
            _bool(fn, name, getattr(self, name))
        for name in ("first_layer_alpha", "last_layer_alpha", "bias_alpha"):
            _real(fn, name, getattr(self, name))
        for name in ("lr", "weight_decay", "first_layer_lr_mult", "last_layer_lr_mult", "bias_lr_mult", "dampening"):
            _real(fn, name, getattr(self, name), lo=0.0)
        if not 0.0 <= _real(fn, "momentum", self.momentum, lo=0.0) < 1.0:
            # The velocity of SGD with momentum >= 1 never forgets a gradient: it grows without bound.
            raise ValueError(f"{fn}: momentum must be in [0, 1), got {self.momentum}")
        if self.dampening > 1.0:
            raise ValueError(f"{fn}: dampening must be in [0, 1], got {self.dampening}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"{fn}: nesterov needs momentum > 0 and dampening 0 (torch.optim.SGD), got momentum "
                             f"{self.momentum}, dampening {self.dampening}")  # fmt: skip
        if self.clip is not None:
            _real(fn, "clip", self.clip, lo=0.0, open_lo=True)
        if self.batch > self.pool:
            # Batches index the pool: a larger batch would index past it (full batch) or silently
            # shrink to the pool (minibatches).
            raise ValueError(f"{fn}: batch ({self.batch}) must be <= pool ({self.pool}), the points batches are drawn from")

    def short(self) -> str:
        """The fields that differ from the defaults, for test ids and tables."""
        default = TrainConfig()
        diff = {k: v for k, v in asdict(self).items() if k != "name" and v != getattr(default, k)}
        return ", ".join(f"{k}={v}" for k, v in diff.items()) or "defaults"


# The fields that make the task (make_task): a finite_cfg must agree with cfg on these.
_TASK_FIELDS = ("d", "k", "batch", "steps", "minibatches", "pool", "test")

# The rate-test configurations. Depth 0 (input layer + output π-layer: the finite net is n × d and
# k × n, so width 4096 costs milliseconds) isolates one optimizer ingredient per configuration;
# depth 1 and 3 (n × n hidden layers, where the time goes) combine them (`d1-nesterov-mix` is
# slow-profile only: accumulation and per-parameter clipping double its cost). Learning rates keep
# the infinite net's own dynamics away from instability, where fluctuations are amplified
# exponentially and the n^-1/2 regime starts at much larger widths: the effective step
# lr·(1-dampening)/(1-momentum), times `accumulate` (micro-batch gradients are summed), is at most
# ~0.35 at depth ≥ 1 (depth 0 tolerates ~1). Measured: depth 0 with accumulate=2 at lr 0.3 climbs
# to losses of 5 from 1.4; depth 3 at lr 1.0 overflows to NaN; depth 1 at lr 0.5 leaves finite nets
# of width 256 diverging. Errors and slopes of every configuration: docs/equivalence_rates.md.
_D0 = TrainConfig(depth=0, lr=0.3)
_MIX_MOMENTUM = dict(
    lr=0.025, momentum=0.9, dampening=0.3, weight_decay=0.05, first_layer_lr_mult=2.0,
    last_layer_lr_mult=0.5, bias_lr_mult=2.0, minibatches=True, clip=1.0,
)  # fmt: skip
_MIX_NESTEROV = dict(
    lr=0.02, momentum=0.8, nesterov=True, clip=0.3, per_param_clip=True, accumulate=2,
    layernorm=True, bias_alpha=0.0, last_layer_alpha=4.0, minibatches=True,
)  # fmt: skip
RATE_CONFIGS: dict[str, TrainConfig] = {
    c.name: c
    for c in [
        replace(_D0, name="d0-sgd"),
        replace(_D0, name="d0-weight-decay", weight_decay=0.1),
        replace(_D0, name="d0-momentum", lr=0.1, momentum=0.9),
        replace(_D0, name="d0-nesterov", lr=0.1, momentum=0.9, nesterov=True),
        replace(_D0, name="d0-dampening", lr=0.2, momentum=0.9, dampening=0.5),
        replace(_D0, name="d0-clip-global", clip=0.3),
        replace(_D0, name="d0-clip-per-param", clip=0.2, per_param_clip=True),
        replace(_D0, name="d0-accumulate", lr=0.15, accumulate=2, minibatches=True),
        replace(_D0, name="d0-layernorm", layernorm=True),
        replace(_D0, name="d0-no-bias", bias_alpha=0.0),
        replace(
            _D0, name="d0-lr-mults", first_layer_lr_mult=2.0, last_layer_lr_mult=0.5, bias_lr_mult=2.0,
            weight_decay=0.05, apply_lr_mult_to_wd=False,
        ),  # fmt: skip
        replace(_D0, name="d0-big-last-mult-clip", last_layer_alpha=4.0, clip=0.5),
        replace(_D0, name="d0-minibatches", minibatches=True),
        TrainConfig(name="d1-sgd", depth=1, lr=0.2),
        TrainConfig(name="d1-momentum-mix", depth=1, **_MIX_MOMENTUM),
        TrainConfig(name="d1-nesterov-mix", depth=1, **_MIX_NESTEROV),
        TrainConfig(name="d3-momentum-clip", depth=3, lr=0.1, momentum=0.7, clip=0.5),
    ]
}


@dataclass(frozen=True)
class Profile:
    """Sizes of one test profile (see ``conftest.py``).

    ``widths(depth)``: the widths of the rate and trained-sampling tests; ``seeds``: data and
    initialisation seeds the rate tests average over; ``prop_width``, ``prop_omegas`` (finite nets
    per example), ``prop_examples``, ``prop_depths``: the property tests; ``sampling_omegas``: Ω
    draws per width in the trained-sampling tests.
    """

    slow: bool
    seeds: int
    prop_width: int
    prop_omegas: int
    prop_examples: int
    prop_depths: tuple[int, ...]
    sampling_omegas: int

    def widths(self, depth: int) -> list[int]:
        if not self.slow:
            return [256, 1024, 4096]
        # Three 16384² float64 layers with gradients and buffers do not fit in 24 GB.
        return [256, 1024, 4096, 8192 if depth >= 2 else 16384]


def profile() -> Profile:
    """The active profile of pinet's own equivalence suite: slow when ``PINET_SLOW=1``
    (``pytest --slow``), fast otherwise."""
    if os.environ.get("PINET_SLOW") == "1":
        return Profile(True, seeds=10, prop_width=2048, prop_omegas=3, prop_examples=60,
                       prop_depths=(0, 1, 2), sampling_omegas=10)  # fmt: skip
    return Profile(False, seeds=10, prop_width=2048, prop_omegas=3, prop_examples=12,
                   prop_depths=(0, 1), sampling_omegas=10)  # fmt: skip


@dataclass
class Task:
    """Data of one seed: ``X`` (pool, d), ``Y`` (pool, k), ``X_test`` (test, d) and the index
    of the points of every step, ``batches`` (steps, batch)."""

    X: Tensor
    Y: Tensor
    X_test: Tensor
    batches: Tensor


def make_task(cfg: TrainConfig, seed: int) -> Task:
    """Regression data for ``cfg`` from ``seed``: targets ``tanh(X T)`` of a random teacher ``T``
    (d, k) with unit-variance inputs, so the nets have something smooth to fit."""
    _config("make_task", "cfg", cfg)
    _seed("make_task", "seed", seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    X = torch.randn(cfg.pool, cfg.d, generator=g, dtype=DTYPE)
    T = torch.randn(cfg.d, cfg.k, generator=g, dtype=DTYPE) * (2.0 / math.sqrt(cfg.d))
    Y = torch.tanh(X @ T)
    X_test = torch.randn(cfg.test, cfg.d, generator=g, dtype=DTYPE)
    if cfg.minibatches:
        batches = torch.stack([torch.randperm(cfg.pool, generator=g)[: cfg.batch] for _ in range(cfg.steps)])
    else:
        batches = torch.arange(cfg.batch).repeat(cfg.steps, 1)
    return Task(X, Y, X_test, batches)


def build_infinite(cfg: TrainConfig, seed: int) -> InfPiMLP:
    """The untrained infinite π-MLP of ``(cfg, seed)`` in float64 (the default :data:`Builder`)."""
    _config("build_infinite", "cfg", cfg)
    _seed("build_infinite", "seed", seed)
    torch.manual_seed(seed)
    net = InfPiMLP(
        cfg.d, cfg.k, cfg.r, cfg.depth,
        first_layer_alpha=cfg.first_layer_alpha, last_layer_alpha=cfg.last_layer_alpha,
        bias_alpha=cfg.bias_alpha, layernorm=cfg.layernorm, dtype=DTYPE,
    )  # fmt: skip
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> PiOptimizerWrapper:
    """The wrapped optimizer of ``cfg`` over ``model`` (infinite or finite: the same code)."""
    _config("build_optimizer", "cfg", cfg)
    groups = param_groups(
        model, cfg.lr, cfg.weight_decay,
        first_layer_lr_mult=cfg.first_layer_lr_mult, last_layer_lr_mult=cfg.last_layer_lr_mult,
        bias_lr_mult=cfg.bias_lr_mult, apply_lr_mult_to_wd=cfg.apply_lr_mult_to_wd,
    )  # fmt: skip
    sgd = torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening, nesterov=cfg.nesterov
    )
    hooks = []
    if cfg.accumulate > 1:
        hooks.append(Accumulate(cfg.accumulate))
    if cfg.clip is not None:
        hooks.append(ClipGradNorm(cfg.clip, per_param=cfg.per_param_clip))
    # atomic=False: the harness never makes a step fail on purpose, and the copies of the stepped
    # parameters an atomic step takes cost up to 2x on wide finite nets (docs/reliability.md).
    return PiOptimizerWrapper(sgd, model, hooks=hooks, atomic=False)


@dataclass
class Trajectory:
    """What one training run produced.

    ``losses`` (S,): the loss of every step's batch before its update; ``grad_norms`` (S,): the
    total gradient norm the wrapper recorded at every step (after projection, before clipping);
    ``outputs`` (test, k): the outputs on the held-out points after training.
    """

    losses: Tensor
    grad_norms: Tensor
    outputs: Tensor
    model: torch.nn.Module | None = field(default=None, repr=False)


def outputs(out) -> Tensor:
    """A net's output as one (b, k) tensor: a tensor as is, a tuple/list of (b, k_i) concatenated."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, Tensor) for o in out):
        return torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1)
    raise TypeError(f"pinet.testing: a net must return a tensor or a tuple of tensors, got {type(out).__name__}")


def loss_fn(out, y: Tensor) -> Tensor:
    """Mean over the batch of the squared error summed over outputs: (b, k), (b, k) -> ()."""
    out = outputs(out)
    if out.shape != y.shape:
        # Broadcasting would otherwise compare (b, k') outputs with (b, k) targets, or fail in torch's terms.
        raise ValueError(f"pinet.testing: the net returned outputs of shape {tuple(out.shape)} for targets of shape "
                         f"{tuple(y.shape)}; cfg.d and cfg.k must be the net's input size and total output size")
    return (out - y).square().sum(dim=1).mean()


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    task: Task,
    *,
    optimizer_factory: Callable[[torch.nn.Module, TrainConfig], PiOptimizerWrapper] = build_optimizer,
    keep_model: bool = False,
) -> Trajectory:
    """Train ``model`` in place for ``cfg.steps`` steps on ``task.batches``; the loop is the same for
    infinite and finite nets. ``optimizer_factory`` lets a test break the optimizer on purpose."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"train: model must be an nn.Module, got {type(model).__name__}")
    _config("train", "cfg", cfg)
    if not isinstance(task, Task):
        raise TypeError(f"train: task must be a pinet.testing.Task (make_task), got {type(task).__name__}")
    _callable("train", "optimizer_factory", optimizer_factory, "a callable (model, cfg) -> PiOptimizerWrapper", False)
    opt = optimizer_factory(model, cfg)
    losses, norms = [], []
    for idx in task.batches:
        opt.zero_grad()
        loss = loss_fn(model(task.X[idx]), task.Y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        norms.append(opt.stats.micro_batch_grad_norm)
    with torch.no_grad():
        out = outputs(model(task.X_test))
    return Trajectory(
        torch.stack(losses), torch.tensor(norms, dtype=DTYPE), out, model if keep_model else None
    )


def omega_generator(seed: int, width: int, omega_seed: int) -> torch.Generator:
    """The generator of the Ω's of one finite sample; distinct for every (seed, width, omega_seed)."""
    _seed("omega_generator", "seed", seed)
    _int("omega_generator", "width", width, 1)
    _seed("omega_generator", "omega_seed", omega_seed)
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * omega_seed + width)


def train_infinite(
    cfg: TrainConfig, seed: int, *, keep_model: bool = False, build: Builder | None = None
) -> tuple[nn.Module, Trajectory, Task]:
    """Build (``build``, default :func:`build_infinite`) and train the infinite net of ``(cfg, seed)``.

    Returns ``(init, trajectory, task)``: ``init`` is a copy of the net *before* training, from
    which :func:`train_finite` samples; the trained net is ``trajectory.model`` if ``keep_model``.
    """
    _callable("train_infinite", "build", build, "a callable (cfg, seed) -> nn.Module")
    task = make_task(cfg, seed)
    net = (build or build_infinite)(cfg, seed)
    if not isinstance(net, nn.Module):
        raise TypeError(f"train_infinite: build(cfg, seed) must return an nn.Module (an untrained infinite net), "
                        f"got {type(net).__name__}")  # fmt: skip
    init = copy.deepcopy(net)
    traj = train(net, cfg, task, keep_model=keep_model)
    return init, traj, task


def train_finite(
    init: nn.Module,
    cfg: TrainConfig,
    task: Task,
    seed: int,
    width: int,
    omega_seed: int = 0,
    *,
    optimizer_factory: Callable[[torch.nn.Module, TrainConfig], PiOptimizerWrapper] = build_optimizer,
) -> Trajectory:
    """Sample the finite net of ``width`` from the untrained ``init`` and train it like the infinite
    one (``cfg`` may differ from the infinite net's only when a test breaks it on purpose)."""
    if not isinstance(init, nn.Module):
        raise TypeError(f"train_finite: init must be an nn.Module (the untrained infinite net), got {type(init).__name__}")
    _config("train_finite", "cfg", cfg)
    fin = sample(init, width, generator=omega_generator(seed, width, omega_seed), dtype=DTYPE)
    return train(fin, cfg, task, optimizer_factory=optimizer_factory)


def rel_error(a: Tensor, ref: Tensor) -> float:
    """``‖a - ref‖ / ‖ref‖`` (Frobenius), any equal shapes."""
    for name, t in (("a", a), ("ref", ref)):
        if not isinstance(t, Tensor):
            raise TypeError(f"rel_error: {name} must be a tensor, got {type(t).__name__}")
    if a.shape != ref.shape:
        # Broadcasting would compare different things (e.g. (T, 1) against (T,)).
        raise ValueError(f"rel_error: a and ref must have the same shape, got {tuple(a.shape)} and {tuple(ref.shape)}")
    norm = ref.norm()
    if norm == 0:
        raise ValueError("rel_error: ref has norm 0, so a relative error is undefined")
    return float((a - ref).norm() / norm)


def fit_slope(widths: Iterable[int], errors: Iterable[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(width)``: at least two distinct positive
    widths and as many positive finite errors."""
    widths = _widths("fit_slope", widths, slope=True)
    if isinstance(errors, (str, bytes)) or not isinstance(errors, Iterable):
        raise TypeError(f"fit_slope: errors must be a collection of numbers, got {type(errors).__name__}")
    errors = list(errors)
    if len(errors) != len(widths):
        raise ValueError(f"fit_slope: need one error per width, got {len(errors)} errors for {len(widths)} widths")
    for e in errors:
        if not _is_real(e):
            raise TypeError(f"fit_slope: errors must be real numbers, got {type(e).__name__} {e!r}")
        if not (math.isfinite(e) and e > 0):
            # log(0) and log(NaN) have no slope: a NaN error (a diverged run) would read as slope NaN.
            raise ValueError(f"fit_slope: errors must be positive finite numbers, got {errors}")
    x = torch.tensor([math.log(w) for w in widths], dtype=DTYPE)
    y = torch.tensor([math.log(e) for e in errors], dtype=DTYPE)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def geo_mean(xs: Iterable[float]) -> float:
    """Geometric mean ``exp(mean(log x))`` of positive numbers (errors averaged over seeds or draws).

    A NaN or infinite value (a diverged run) gives NaN or inf, which the callers' bounds reject."""
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Iterable):
        raise TypeError(f"geo_mean: xs must be a collection of numbers, got {type(xs).__name__}")
    xs = list(xs)
    if not xs:
        raise ValueError("geo_mean: xs must not be empty")
    for x in xs:
        if not _is_real(x):
            raise TypeError(f"geo_mean: xs must be real numbers, got {type(x).__name__} {x!r}")
        if not x > 0 and not math.isnan(x):
            raise ValueError(f"geo_mean: xs must be positive, got {x}")
    logs = [math.log(x) if math.isfinite(x) else x for x in xs]
    return math.exp(sum(logs) / len(logs))


@dataclass
class RateResult:
    """Errors of finite nets against the infinite one, per width, over seeds.

    ``out_err[w]``, ``loss_err[w]``, ``gnorm_err[w]``: lists (one per seed) of the relative error of
    the held-out outputs after training, of the loss curve and of the gradient-norm curve.
    """

    widths: list[int]
    out_err: dict[int, list[float]]
    loss_err: dict[int, list[float]]
    gnorm_err: dict[int, list[float]]

    def mean(self, which: str = "out") -> list[float]:
        """Mean over seeds of one error, per width."""
        errs = getattr(self, f"{_error_name('RateResult.mean', which)}_err")
        return [sum(errs[w]) / len(errs[w]) for w in self.widths]

    def geo(self, which: str = "out") -> list[float]:
        """Geometric mean over seeds of one error, per width."""
        errs = getattr(self, f"{_error_name('RateResult.geo', which)}_err")
        return [geo_mean(errs[w]) for w in self.widths]

    def slope(self, which: str = "out") -> float:
        """Fitted log-log slope of the seed-averaged error against width."""
        return fit_slope(self.widths, self.mean(_error_name("RateResult.slope", which)))


def measure_rates(
    cfg: TrainConfig,
    widths: list[int],
    seeds: Iterable[int],
    *,
    finite_cfg: TrainConfig | None = None,
    progress: Callable[[], None] | None = None,
    build: Builder | None = None,
) -> RateResult:
    """Train, for every seed, the infinite net and one finite net per width, and collect errors.

    ``finite_cfg`` trains the finite nets with another configuration (to show that a mismatch is
    caught); ``progress`` is called after every finite run; ``build`` makes the infinite net.
    Everything is checked before any training (``widths``: distinct positive ints, >= ``cfg.r``
    without ``build``; ``seeds``: a non-empty collection of ints).
    """
    fn = "measure_rates"
    _config(fn, "cfg", cfg)
    _callable(fn, "build", build, "a callable (cfg, seed) -> nn.Module")
    widths = _widths(fn, widths, slope=False, r=None if build is not None else cfg.r)
    seeds = _seeds(fn, seeds)
    _same_task(fn, cfg, finite_cfg)
    _callable(fn, "progress", progress, "a callable with no arguments")
    res = RateResult(list(widths), {w: [] for w in widths}, {w: [] for w in widths}, {w: [] for w in widths})
    for seed in seeds:
        init, inf, task = train_infinite(cfg, seed, build=build)
        for w in widths:
            fin = train_finite(init, finite_cfg or cfg, task, seed, w)
            res.out_err[w].append(rel_error(fin.outputs, inf.outputs))
            res.loss_err[w].append(rel_error(fin.losses, inf.losses))
            res.gnorm_err[w].append(rel_error(fin.grad_norms, inf.grad_norms))
            if progress is not None:
                progress()
    return res


@torch.no_grad()
def sampling_fluctuation(net: nn.Module, X: Tensor, width: int, seed: int, samples: int) -> float:
    """Root-mean-square over ``samples`` Ω draws of the relative output error of a finite net of
    ``width`` sampled from ``net`` (trained or not), on inputs ``X`` (T, d).

    This is the n^-1/2 fluctuation of the infinite net itself: how far a finite sample of it is
    from it with no training in between."""
    _net_and_inputs("sampling_fluctuation", net, X)
    _int("sampling_fluctuation", "width", width, 1)
    _seed("sampling_fluctuation", "seed", seed)
    _int("sampling_fluctuation", "samples", samples, 1)
    ref = outputs(net(X))
    sq = 0.0
    for j in range(samples):
        fin = sample(net, width, generator=omega_generator(seed, width, 10_000 + j), dtype=DTYPE)
        sq += rel_error(outputs(fin(X)), ref) ** 2
    return math.sqrt(sq / samples)


@torch.no_grad()
def sampled_errors(net: nn.Module, X: Tensor, widths: Iterable[int], seed: int, draws: int) -> list[float]:
    """Per width, the geometric mean over ``draws`` Ω draws of the relative output error on ``X``
    (T, d) of a finite net sampled from ``net`` (trained or not), without any training."""
    _net_and_inputs("sampled_errors", net, X)
    widths = _widths("sampled_errors", widths, slope=False)
    _seed("sampled_errors", "seed", seed)
    _int("sampled_errors", "draws", draws, 1)
    ref = outputs(net(X))
    return [
        geo_mean(
            rel_error(outputs(sample(net, w, generator=omega_generator(seed, w, j), dtype=DTYPE)(X)), ref)
            for j in range(draws)
        )
        for w in widths
    ]


@dataclass
class Tracking:
    """How ``S`` finite nets of one width sit around the infinite net after training.

    With ``e_i`` (test, k) the output error of finite net ``i`` (independent Ω's, same data):
    ``error = sqrt(mean_i ‖e_i‖²) / ‖f_∞‖`` (typical relative error of one finite net),
    ``fluctuation = sqrt(Σ_i ‖e_i - ē‖² / (S - 1)) / ‖f_∞‖`` (the measured n^-1/2 spread of finite
    nets, the same quantity estimated without reference to the infinite net),
    ``ratio = error / fluctuation``, and ``static``: the error of finite nets of the same width
    sampled from the *trained* infinite net (:func:`sampling_fluctuation`), i.e. the infinite net's
    own n^-1/2 fluctuation with no training in between; ``error / static`` is how much training
    amplified it.

    If the finite nets scatter around the infinite net, ``e_i = ε_i`` with independent zero-mean
    ``ε_i`` of covariance Σ, and both ``mean_i ‖e_i‖²`` and ``Σ_i ‖e_i - ē‖² / (S - 1)`` estimate
    ``tr Σ``: ``ratio ≈ 1``. A systematic disagreement ``b`` (the same for every Ω, e.g. a dropped
    momentum term) adds ``‖b‖²`` to the first only: ``ratio ≈ sqrt(1 + ‖b‖² / tr Σ)``, the size of
    the disagreement in units of the fluctuation. (The O(1/n) mean offset of correct finite nets is
    O(n^-1/2) times the fluctuation, negligible at the widths used.)
    """

    width: int
    error: float
    fluctuation: float
    ratio: float
    errors: list[float]
    static: float


def measure_tracking(
    cfg: TrainConfig,
    seed: int,
    width: int,
    omegas: int,
    *,
    finite_cfg: TrainConfig | None = None,
    optimizer_factory: Callable[[torch.nn.Module, TrainConfig], PiOptimizerWrapper] = build_optimizer,
    build: Builder | None = None,
) -> Tracking:
    """Train the infinite net of ``(cfg, seed)`` and ``omegas`` (≥ 2) finite nets of ``width``, and
    compare (see :class:`Tracking`). ``finite_cfg`` / ``optimizer_factory`` break the finite side
    on purpose, to show that a mismatch is caught."""
    fn = "measure_tracking"
    _config(fn, "cfg", cfg)
    _seed(fn, "seed", seed)
    _callable(fn, "build", build, "a callable (cfg, seed) -> nn.Module")
    _int(fn, "width", width, 1 if build is not None else cfg.r)
    if not _is_int(omegas):
        raise TypeError(f"{fn}: omegas must be an int, got {type(omegas).__name__} {omegas!r}")
    if omegas < 2:
        raise ValueError(f"{fn}: need at least 2 finite nets (omegas) to measure their spread, got {omegas}")
    _same_task(fn, cfg, finite_cfg)
    _callable(fn, "optimizer_factory", optimizer_factory, "a callable (model, cfg) -> PiOptimizerWrapper", False)
    init, inf, task = train_infinite(cfg, seed, keep_model=True, build=build)
    static = sampling_fluctuation(inf.model, task.X_test, width, seed, samples=4)
    errs = []
    for j in range(omegas):
        fin = train_finite(init, finite_cfg or cfg, task, seed, width, j, optimizer_factory=optimizer_factory)
        errs.append((fin.outputs - inf.outputs).flatten())
    E = torch.stack(errs)  # (S, test * k)
    ref = float(inf.outputs.norm())
    error = float(E.square().sum(1).mean().sqrt()) / ref
    fluct = float((E - E.mean(0)).square().sum().div(omegas - 1).sqrt()) / ref
    return Tracking(width, error, fluct, error / fluct, [float(e.norm()) / ref for e in E], static)


# --------------------------------------------------------------------------- bounds
# Two bounds of the tracking statistic, both in units of a measured n^-1/2 fluctuation:
# * MAX_AMPLIFICATION bounds error / static, where `static` is the error of finite nets of the same
#   width sampled from the *trained* infinite net (the infinite net's own n^-1/2 fluctuation, with
#   no training in between); the quotient is how much 20 steps of training amplified it.
# * MAX_RATIO bounds error / spread of the S = 3 trained finite nets (a disagreement that is the
#   same for every Ω, i.e. systematic, rather than fluctuation).
# Calibration (docs/equivalence_calibration.md, `python -m experiments.equivalence --calibrate 60`):
# over 60 configurations drawn from `optimizer_configs` at depths 0-2, width 2048, the
# amplification was at most 2.7 (median 0.96) and the ratio at most 1.8 (median 0.98). The ratio
# of S = 3 nets is an F-like variable with few degrees of freedom, hence the room above it. The
# deliberately broken optimizers of BROKEN_OPTIMIZERS give amplifications of 13 to 440 and ratios
# of 6.0 to 80 (a dropped momentum term: 13 and 80); each fails at least one bound.
MAX_AMPLIFICATION = 8.0
MAX_RATIO = 6.0

# The rate bound: finite-net errors must fall with width at a log-log slope of at most -0.35
# (theory: -0.5; measured -0.43 to -0.63 over the rate configurations, docs/equivalence_rates.md).
MAX_SLOPE = -0.35

# Trained sampling (a finite net sampled *after* training, no training on the finite side): the
# error is Monte Carlo error of n-row sums, slope -0.5 up to seed noise. Measured slopes of the
# geometric mean over 10 Ω draws: -0.56 to -0.63, a little steeper than -0.5 because the error at
# width 256 (up to 0.23) still carries nonlinear O(1/n) terms. -0.35 is what a sampler with a wrong
# scaling or a dropped term violates (its error stops falling); -0.75 only guards against a
# degenerate comparison (e.g. comparing a net with itself).
SLOPE_RANGE = (-0.75, -0.35)
# Measured geometric-mean relative error at width 4096: 0.017 to 0.049 (the largest is the net
# trained with weight decay 0.1, whose outputs are small). The reference library's k^-1/2 readout
# scaling gives errors of order 1 at every width; 0.1 is twice the largest measured value.
MAX_ERROR_4096 = 0.1

TRAINED_SAMPLING_CONFIGS = {
    # Trained with momentum and weight decay so that old coefficients are not 1, and with biases
    # (which the reference code's sampler drops for the readout).
    "d1-momentum-wd": TrainConfig(name="d1-momentum-wd", depth=1, lr=0.1, momentum=0.9, weight_decay=0.1, minibatches=True),
    "d2-layernorm-no-bias": TrainConfig(name="d2-layernorm-no-bias", depth=2, lr=0.3, layernorm=True, bias_alpha=0.0, clip=1.0),
    "d3-mults": TrainConfig(
        name="d3-mults", depth=3, lr=0.3, first_layer_alpha=2.0, last_layer_alpha=0.5,
        bias_alpha=0.5, first_layer_lr_mult=0.5, bias_lr_mult=2.0, momentum=0.5,
    ),  # fmt: skip
}


def tracking_problems(t: Tracking) -> list[str]:
    """What is wrong with a :class:`Tracking` (empty if within both bounds)."""
    if not isinstance(t, Tracking):
        raise TypeError(f"tracking_problems: t must be a pinet.testing.Tracking (measure_tracking), got {type(t).__name__}")
    desc = (
        f"width {t.width}: error {t.error:.4f} (per net {[round(e, 4) for e in t.errors]}), static "
        f"fluctuation {t.static:.4f}, spread {t.fluctuation:.4f}"
    )
    problems = []
    if not t.error <= MAX_AMPLIFICATION * t.static:
        problems.append(f"error {t.error / t.static:.1f} x the static fluctuation > {MAX_AMPLIFICATION}; {desc}")
    if not t.ratio <= MAX_RATIO:
        problems.append(f"error {t.ratio:.1f} x the spread of the finite nets > {MAX_RATIO}; {desc}")
    return problems


def stable(cfg: TrainConfig, seed: int, build: Builder | None = None) -> bool:
    """Whether the infinite net trains without blowing up (cheap: it is the small one). A drawn
    configuration that makes the infinite net itself diverge says nothing about equivalence."""
    _config("stable", "cfg", cfg)
    _seed("stable", "seed", seed)
    try:
        _, inf, _ = train_infinite(cfg, seed, build=build)
    except FloatingPointError:
        return False
    return bool(torch.isfinite(inf.losses).all() and inf.losses.max() <= 4 * inf.losses[0])


def assert_tracks_limit(
    cfg: TrainConfig,
    *,
    build: Builder | None = None,
    widths: Iterable[int] = (256, 1024, 4096),
    seeds: Iterable[int] = range(3),
    max_slope: float = MAX_SLOPE,
    max_error: float | None = None,
    which: Iterable[str] = ("out", "loss"),
) -> RateResult:
    """Assert that finite counterparts of ``build(cfg, seed)`` track it at the n^-1/2 rate.

    Trains, per seed, the infinite net and one finite net per width side by side (same batches,
    same optimizer recipe ``cfg``), then checks, for each error in ``which`` (``"out"``: held-out
    outputs after training; ``"loss"``: the loss curve; ``"gnorm"``: the gradient-norm curve), that
    the log-log slope of the geometric mean over seeds against width is at most ``max_slope`` and,
    if given, that the error at the largest width is at most ``max_error``. Raises
    ``AssertionError`` with the table of errors; returns the :class:`RateResult`.

    The arguments are checked before any training (``TypeError``/``ValueError`` naming them):
    ``widths`` at least two distinct positive ints (>= ``cfg.r`` without ``build``), ``seeds`` a
    non-empty collection of ints, ``which`` a non-empty collection of names from :data:`ERRORS`
    (not a bare string), ``max_slope`` finite, ``max_error`` finite and > 0 or None: otherwise the
    assertion could not fail (an empty ``which``, an infinite bound) or would fail for no reason
    (a slope over one width is NaN).
    """
    fn = "assert_tracks_limit"
    _config(fn, "cfg", cfg)
    _callable(fn, "build", build, "a callable (cfg, seed) -> nn.Module")
    widths = sorted(_widths(fn, widths, slope=True, r=None if build is not None else cfg.r))
    seeds = _seeds(fn, seeds)
    which = _which(fn, which)
    max_slope = _real(fn, "max_slope", max_slope)
    if max_error is not None:
        max_error = _real(fn, "max_error", max_error, lo=0.0, open_lo=True)
    res = measure_rates(cfg, widths, seeds, build=build)
    problems = []
    for w in which:
        geo = res.geo(w)
        table = ", ".join(f"{n}: {e:.4f}" for n, e in zip(widths, geo))
        if not all(math.isfinite(e) and e > 0 for e in geo):
            # A diverged run (NaN/inf) or a comparison of a net with itself (0) has no slope.
            problems.append(f"{w} error: not positive and finite at every width ({table})")
            continue
        slope = fit_slope(widths, geo)
        if not slope <= max_slope:
            problems.append(f"{w} error: slope {slope:.3f} > {max_slope} ({table})")
        if max_error is not None and not geo[-1] <= max_error:
            problems.append(f"{w} error at width {widths[-1]}: {geo[-1]:.4f} > {max_error} ({table})")
    if problems:
        raise AssertionError(f"finite nets do not track the infinite net for {cfg.short()}: " + "; ".join(problems))
    return res


# --------------------------------------------------------------------------- the check can fail
# Each case trains the infinite net with `cfg` and the finite nets with a deliberately different
# optimizer; `measure_tracking` then reports a ratio above MAX_RATIO. Depth 1 so that the n × n
# hidden layer (the one whose projection matters) is involved.
_BASE = TrainConfig(name="mutation", depth=1, lr=0.1, momentum=0.0, minibatches=True)


def _without_projection(model, cfg):
    # The finite net trained with raw gradients: hidden weights then leave the span of Ω and the
    # net follows μP dynamics instead of the π-limit.
    opt = build_optimizer(model, cfg)
    keep = [i for i, h in enumerate(opt.hooks) if not isinstance(h, ProjectToR)]
    opt.hooks = [opt.hooks[i] for i in keep]
    opt.hook_states = [opt.hook_states[i] for i in keep]
    return opt


def _unclipped(model, cfg):
    return build_optimizer(model, replace(cfg, clip=None))


#: ``name -> (cfg, keyword arguments of measure_tracking that break the finite side)``.
BROKEN_OPTIMIZERS = {
    # The reference library's bug: the infinite net runs momentum 0.9, the finite nets without.
    "dropped-momentum": (replace(_BASE, lr=0.02, momentum=0.9), dict(finite_cfg=replace(_BASE, lr=0.02))),
    "dropped-weight-decay": (replace(_BASE, weight_decay=0.5), dict(finite_cfg=_BASE)),
    "dropped-clipping": (replace(_BASE, clip=0.1), dict(optimizer_factory=_unclipped)),
    "no-projection": (_BASE, dict(optimizer_factory=_without_projection)),
}


def optimizer_configs(depths: Iterable[int] = (0, 1)):
    """A hypothesis strategy of :class:`TrainConfig` s drawn from every training ingredient plus
    r, batch size and lr (needs ``hypothesis``).

    The learning rate is drawn as an *effective* step ``lr_eff`` in [0.05, 0.25] and converted so
    that momentum's 1/(1-μ) gain, dampening's (1-τ), summed micro-batches and a larger first-layer
    multiplier (which scales the first layer's update by α²) do not push the infinite net out of
    the stable range measured for the rate configurations (effective step ≲ 0.3)."""
    from hypothesis import strategies as st

    if isinstance(depths, (str, bytes)) or not isinstance(depths, Iterable):
        raise TypeError(f"optimizer_configs: depths must be a collection of ints, got {type(depths).__name__}")
    depths = tuple(_int("optimizer_configs", "every depth", d, 0) for d in depths)
    if not depths:
        raise ValueError("optimizer_configs: depths must not be empty")

    @st.composite
    def configs(draw) -> TrainConfig:
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0, 0.5]))
        accumulate = draw(st.integers(1, 3))
        clip = draw(st.one_of(st.none(), st.floats(0.2, 2.0)))
        first_alpha = draw(st.sampled_from([0.5, 1.0, 2.0]))
        # A large last-layer multiplier is drawn only with clipping (the "large multiplier with
        # clipping" ingredient); without it the readout's step grows like α² and the net diverges.
        last_alpha = draw(st.sampled_from([1.0, 4.0])) if clip is not None else 1.0
        lr_eff = draw(st.floats(0.05, 0.25))
        lr = lr_eff * (1 - momentum) / ((1 - dampening) * accumulate * max(1.0, first_alpha**2))
        return TrainConfig(
            name="drawn",
            d=draw(st.integers(2, 6)),
            k=draw(st.integers(1, 3)),
            r=draw(st.integers(2, 8)),
            depth=draw(st.sampled_from(depths)),
            layernorm=draw(st.booleans()),
            first_layer_alpha=first_alpha,
            last_layer_alpha=last_alpha,
            bias_alpha=draw(st.sampled_from([0.0, 0.5, 1.0])),
            lr=lr,
            weight_decay=draw(st.sampled_from([0.0, 0.05])),
            first_layer_lr_mult=draw(st.sampled_from([0.5, 1.0, 2.0])),
            last_layer_lr_mult=draw(st.sampled_from([0.5, 1.0, 2.0])),
            bias_lr_mult=draw(st.sampled_from([0.5, 1.0, 2.0])),
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            clip=clip,
            per_param_clip=clip is not None and draw(st.booleans()),
            accumulate=accumulate,
            batch=draw(st.integers(2, 12)),
            minibatches=draw(st.booleans()),
        )

    return configs()


# --------------------------------------------------------------------------- coefficient-space reference
class CoefficientSpaceReference:
    """The spec's infinite π-MLP training, written out by hand with plain tensors.

    Forward by the formula, δ from autograd on each π-layer's output, rows appended by hand, and
    torch's SGD update rule (first momentum step ``buf = d``, later ``buf = μ buf + (1-τ) d``)
    applied in coefficient space with the indicator gradient. Shares nothing with pinet.optim or
    pinet.hooks. ``net``: an :class:`pinet.InfPiMLP` with biases (copied, not changed); ``lr`` the
    base learning rate, ``mults`` the (first, last, bias) lr multipliers; float64.
    """

    def __init__(self, net, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 maximize=False, clip=None, per_param=False, accum=1, mults=(1.0, 1.0, 1.0)):  # fmt: skip
        self.alpha_in, self.beta = net.layers[0].alpha, net.layers[0].bias_alpha
        self.A0 = net.layers[0].A.detach().clone().requires_grad_()
        self.b0 = net.layers[0].bias.detach().clone().requires_grad_()
        self.pi = [
            dict(A=l.A.clone(), B=l.B.clone(), c=l.c.detach().clone(), alpha=l.alpha, beta=l.bias_alpha,
                 ln=l.layernorm, bias=l.bias.detach().clone().requires_grad_())  # fmt: skip
            for l in net.pi_layers
        ]
        self.mom, self.damp, self.nest, self.wd, self.max = momentum, dampening, nesterov, weight_decay, maximize
        self.clip, self.per_param, self.accum = clip, per_param, accum
        first, last, bias = mults
        self.lr = {"A0": lr * first, "b0": lr * bias}
        for i in range(len(self.pi)):
            self.lr[f"c{i}"] = lr * (last if i == len(self.pi) - 1 else 1.0)
            self.lr[f"b{i + 1}"] = lr * bias
        self.bufs = {}

    def forward(self, x):
        g = self.alpha_in * (x @ self.A0 + self.beta * self.b0)
        outs = []
        for p in self.pi:
            norm = g.norm(dim=1, keepdim=True)
            gbar = g / norm
            s = torch.ones_like(norm) if p["ln"] else norm
            out = (s * F.J(gbar @ p["B"].T) * p["c"]) @ p["A"] + p["beta"] * p["bias"]
            out.retain_grad()
            outs.append((out, s.detach(), gbar.detach()))
            g = p["alpha"] * out
        return g, outs

    def _sgd(self, key, param, grad):
        if self.max:
            grad = -grad
        d = grad + self.wd * param if self.wd else grad
        if self.mom:
            if key not in self.bufs:
                buf = d.clone()
            else:
                old = self.bufs[key]
                old = torch.cat([old, old.new_zeros(d.shape[0] - old.shape[0])]) if d.dim() == 1 and old.shape != d.shape else old
                buf = self.mom * old + (1 - self.damp) * d
            self.bufs[key] = buf
            d = d + self.mom * buf if self.nest else buf
        return param - self.lr[key] * d

    def step(self, micro_batches, loss_fn):
        grads = {}
        rows = [[] for _ in self.pi]
        for x, t in micro_batches:
            for v in [self.A0, self.b0] + [p["bias"] for p in self.pi]:
                v.grad = None
            y, outs = self.forward(x)
            loss_fn(y, t).backward()
            tensors = {"A0": self.A0, "b0": self.b0, **{f"b{i + 1}": p["bias"] for i, p in enumerate(self.pi)}}
            for k, v in tensors.items():
                grads[k] = grads.get(k, 0) + v.grad
            for i, (out, s, gbar) in enumerate(outs):
                rows[i].append((s * out.grad, gbar))
        rows = [(torch.cat([a for a, _ in r]), torch.cat([b for _, b in r])) for r in rows]
        coef = [torch.ones(a.shape[0], dtype=DTYPE) for a, _ in rows]
        if self.clip:
            sq = {k: g.square().sum() for k, g in grads.items()}
            # ‖Δ‖² = tr(Aᵀ K A), K_ij = J(B_i · B_j), written out as a double sum.
            for i, (a, b) in enumerate(rows):
                sq[f"c{i}"] = sum(F.J(b[u] @ b[v]) * (a[u] @ a[v]) for u in range(len(a)) for v in range(len(a)))
            groups = [[k] for k in sq] if self.per_param else [list(sq)]
            for names in groups:
                total = math.sqrt(sum(float(sq[k]) for k in names))
                factor = self.clip / (total + 1e-6)
                if factor < 1:
                    for k in names:
                        if k.startswith("c"):
                            coef[int(k[1:])] = coef[int(k[1:])] * factor
                        else:
                            grads[k] = grads[k] * factor
        with torch.no_grad():
            self.A0 = self._sgd("A0", self.A0, grads["A0"]).requires_grad_()
            self.b0 = self._sgd("b0", self.b0, grads["b0"]).requires_grad_()
            for i, (p, (a, b)) in enumerate(zip(self.pi, rows)):
                p["bias"] = self._sgd(f"b{i + 1}", p["bias"], grads[f"b{i + 1}"]).requires_grad_()
                c = torch.cat([p["c"], torch.zeros(len(a), dtype=DTYPE)])
                g = torch.cat([torch.zeros(len(p["c"]), dtype=DTYPE), coef[i]])
                p["c"] = self._sgd(f"c{i}", c, g)
                p["A"] = torch.cat([p["A"], a])
                p["B"] = torch.cat([p["B"], b])
