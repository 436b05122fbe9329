"""Trained sampling: a finite net sampled *after* the infinite net was trained reproduces its outputs,
with an error that falls like n^-1/2 (spec, "Two kinds of sampling", 2).

No training happens on the finite side, so the error is pure Monte Carlo error of the n-row sums
that replace the Gaussian expectations: its slope is -0.5 up to seed noise, and what this checks is
the sampling formulas of every layer of a *trained* net (hidden rows with coefficients other than
1, non-zero hidden and output biases, the readout's n^-1/2 scale, layernorm).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

import pinet

from pinet.testing import (
    DTYPE, MAX_ERROR_4096, SLOPE_RANGE, TrainConfig, fit_slope, geo_mean, omega_generator, profile, rel_error,
    sampled_errors, train, train_infinite,
)  # fmt: skip
from pinet.testing import TRAINED_SAMPLING_CONFIGS as CONFIGS

P = profile()

# Bounds (SLOPE_RANGE, MAX_ERROR_4096) and their calibration: pinet.testing.


def _widths(depth: int) -> list[int]:
    return P.widths(depth)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampling_a_trained_net_converges_like_inverse_sqrt_width(name: str):
    cfg = CONFIGS[name]
    _, traj, task = train_infinite(cfg, seed=3, keep_model=True)
    net = traj.model
    # The trained net has moved: its outputs are no longer the zero readout of initialisation and
    # its hidden coefficients have decayed (weight decay) or grown in number.
    with torch.no_grad():
        ref = net(task.X_test)
    assert ref.norm() > 0.1 * math.sqrt(ref.numel()), "the infinite net did not train"
    widths = _widths(cfg.depth)
    means = sampled_errors(net, task.X_test, widths, seed=3, draws=P.sampling_omegas)
    slope = fit_slope(widths, means)
    table = ", ".join(f"{w}: {m:.4f}" for w, m in zip(widths, means))
    assert SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1], f"{name}: slope {slope:.3f} ({table})"
    assert means[widths.index(4096)] <= MAX_ERROR_4096, f"{name}: error at 4096 too large ({table})"


def test_sampling_after_training_then_training_on_stays_with_the_infinite_net():
    # Both kinds of sampling combined: train the infinite net 10 steps, sample finite nets from it,
    # then train all of them 10 more steps (fresh optimizers, same batches). The finite nets must
    # still follow the infinite one at n^-1/2: from width 256 to 4096 the geometric-mean error over
    # 8 draws must drop by at least 16^0.35 = 2.6 (n^-1/2 predicts 4). Finite nets are trained one
    # at a time (the harness's `train`).
    cfg = TrainConfig(name="resume", depth=1, lr=0.1, momentum=0.5, steps=10, minibatches=True)
    _, traj, task = train_infinite(cfg, seed=5, keep_model=True)
    trained = copy.deepcopy(traj.model)  # the state the finite nets are sampled from
    later = replace(task, batches=task.batches.flip(0))
    inf = train(traj.model, cfg, later)
    widths, draws = [256, 4096], 8
    geo = {
        w: geo_mean(
            rel_error(train(pinet.sample(trained, w, generator=omega_generator(5, w, j), dtype=DTYPE), cfg, later).outputs,
                      inf.outputs)  # fmt: skip
            for j in range(draws)
        )
        for w in widths
    }
    assert geo[256] / geo[4096] >= 16**0.35, geo
