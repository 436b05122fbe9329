"""Shared harness of the equivalence suite: train an infinite π-net and finite π-nets sampled from
it side by side, on the same batches with the same wrapped optimizer, and measure how far apart
they end up.

Everything runs in float64 with explicit seeds, so a run is a deterministic function of
``(config, seed, width, omega_seed)``. The infinite net is trained once per ``(config, seed)``;
each finite net is sampled from a copy of the *untrained* infinite net and then trained alone on
the recorded batches (one finite net in memory at a time: a depth-3 net of width 4096 holds
3 × 128 MB weights plus gradients and momentum buffers).

Shapes: ``d`` input dimension, ``k`` outputs, ``b`` batch, ``T`` held-out points, ``S`` steps.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch
from torch import Tensor

import pinet
from pinet.hooks import Accumulate, ClipGradNorm
from pinet.optim import PiOptimizerWrapper, param_groups

__all__ = [
    "DTYPE",
    "Profile",
    "profile",
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
]

DTYPE = torch.float64


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration, applied identically to the infinite net and its finite samples.

    Network: ``d`` inputs, ``k`` outputs, rank ``r``, ``depth`` hidden π-layers, multipliers and
    ``layernorm`` as in :class:`pinet.InfPiMLP` (``bias_alpha = 0``: no biases).
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

    def short(self) -> str:
        """The fields that differ from the defaults, for test ids and tables."""
        default = TrainConfig()
        diff = {k: v for k, v in asdict(self).items() if k != "name" and v != getattr(default, k)}
        return ", ".join(f"{k}={v}" for k, v in diff.items()) or "defaults"


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
    """The active profile: slow when ``PINET_SLOW=1`` (``--slow``), fast otherwise."""
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


def build_infinite(cfg: TrainConfig, seed: int) -> pinet.InfPiMLP:
    """The untrained infinite net of ``(cfg, seed)`` in float64."""
    torch.manual_seed(seed)
    net = pinet.InfPiMLP(
        cfg.d, cfg.k, cfg.r, cfg.depth,
        first_layer_alpha=cfg.first_layer_alpha, last_layer_alpha=cfg.last_layer_alpha,
        bias_alpha=cfg.bias_alpha, layernorm=cfg.layernorm, dtype=DTYPE,
    )  # fmt: skip
    net.reset_parameters(torch.Generator().manual_seed(seed))
    return net


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> PiOptimizerWrapper:
    """The wrapped optimizer of ``cfg`` over ``model`` (infinite or finite: the same code)."""
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
    return PiOptimizerWrapper(sgd, model, hooks=hooks)


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


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    """Mean over the batch of the squared error summed over outputs: (b, k), (b, k) -> ()."""
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
    opt = optimizer_factory(model, cfg)
    losses, norms = [], []
    for idx in task.batches:
        opt.zero_grad()
        loss = loss_fn(model(task.X[idx]), task.Y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        norms.append(opt.ctx.stats["grad_norm"])
    with torch.no_grad():
        out = model(task.X_test)
    return Trajectory(
        torch.stack(losses), torch.tensor(norms, dtype=DTYPE), out, model if keep_model else None
    )


def omega_generator(seed: int, width: int, omega_seed: int) -> torch.Generator:
    """The generator of the Ω's of one finite sample; distinct for every (seed, width, omega_seed)."""
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * omega_seed + width)


def train_infinite(cfg: TrainConfig, seed: int, *, keep_model: bool = False) -> tuple[pinet.InfPiMLP, Trajectory, Task]:
    """Build and train the infinite net of ``(cfg, seed)``.

    Returns ``(init, trajectory, task)``: ``init`` is a copy of the net *before* training, from
    which :func:`train_finite` samples; the trained net is ``trajectory.model`` if ``keep_model``.
    """
    task = make_task(cfg, seed)
    net = build_infinite(cfg, seed)
    init = copy.deepcopy(net)
    traj = train(net, cfg, task, keep_model=keep_model)
    return init, traj, task


def train_finite(
    init: pinet.InfPiMLP,
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
    fin = init.sample(width, generator=omega_generator(seed, width, omega_seed), dtype=DTYPE)
    return train(fin, cfg, task, optimizer_factory=optimizer_factory)


def rel_error(a: Tensor, ref: Tensor) -> float:
    """``‖a - ref‖ / ‖ref‖`` (Frobenius), any equal shapes."""
    return float((a - ref).norm() / ref.norm())


def fit_slope(widths: Iterable[int], errors: Iterable[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(width)``."""
    x = torch.tensor([math.log(w) for w in widths], dtype=DTYPE)
    y = torch.tensor([math.log(e) for e in errors], dtype=DTYPE)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def geo_mean(xs: Iterable[float]) -> float:
    """Geometric mean ``exp(mean(log x))`` of positive numbers (errors averaged over seeds or draws)."""
    logs = [math.log(x) for x in xs]
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
        errs = getattr(self, f"{which}_err")
        return [sum(errs[w]) / len(errs[w]) for w in self.widths]

    def geo(self, which: str = "out") -> list[float]:
        """Geometric mean over seeds of one error, per width."""
        errs = getattr(self, f"{which}_err")
        return [geo_mean(errs[w]) for w in self.widths]

    def slope(self, which: str = "out") -> float:
        """Fitted log-log slope of the seed-averaged error against width."""
        return fit_slope(self.widths, self.mean(which))


def measure_rates(
    cfg: TrainConfig,
    widths: list[int],
    seeds: Iterable[int],
    *,
    finite_cfg: TrainConfig | None = None,
    progress: Callable[[], None] | None = None,
) -> RateResult:
    """Train, for every seed, the infinite net and one finite net per width, and collect errors.

    ``finite_cfg`` trains the finite nets with another configuration (to show that a mismatch is
    caught); ``progress`` is called after every finite run.
    """
    res = RateResult(list(widths), {w: [] for w in widths}, {w: [] for w in widths}, {w: [] for w in widths})
    for seed in seeds:
        init, inf, task = train_infinite(cfg, seed)
        for w in widths:
            fin = train_finite(init, finite_cfg or cfg, task, seed, w)
            res.out_err[w].append(rel_error(fin.outputs, inf.outputs))
            res.loss_err[w].append(rel_error(fin.losses, inf.losses))
            res.gnorm_err[w].append(rel_error(fin.grad_norms, inf.grad_norms))
            if progress is not None:
                progress()
    return res


@torch.no_grad()
def sampling_fluctuation(net: pinet.InfPiMLP, X: Tensor, width: int, seed: int, samples: int) -> float:
    """Root-mean-square over ``samples`` Ω draws of the relative output error of a finite net of
    ``width`` sampled from ``net`` (trained or not), on inputs ``X`` (T, d).

    This is the n^-1/2 fluctuation of the infinite net itself: how far a finite sample of it is
    from it with no training in between."""
    ref = net(X)
    sq = 0.0
    for j in range(samples):
        fin = net.sample(width, generator=omega_generator(seed, width, 10_000 + j), dtype=DTYPE)
        sq += rel_error(fin(X), ref) ** 2
    return math.sqrt(sq / samples)


@torch.no_grad()
def sampled_errors(net: pinet.InfPiMLP, X: Tensor, widths: Iterable[int], seed: int, draws: int) -> list[float]:
    """Per width, the geometric mean over ``draws`` Ω draws of the relative output error on ``X``
    (T, d) of a finite net sampled from ``net`` (trained or not), without any training."""
    ref = net(X)
    return [
        geo_mean(rel_error(net.sample(w, generator=omega_generator(seed, w, j), dtype=DTYPE)(X), ref) for j in range(draws))
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
) -> Tracking:
    """Train the infinite net of ``(cfg, seed)`` and ``omegas`` (≥ 2) finite nets of ``width``, and
    compare (see :class:`Tracking`). ``finite_cfg`` / ``optimizer_factory`` break the finite side
    on purpose, to show that a mismatch is caught."""
    if omegas < 2:
        raise ValueError("measure_tracking: need at least 2 finite nets to measure their spread")
    init, inf, task = train_infinite(cfg, seed, keep_model=True)
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
