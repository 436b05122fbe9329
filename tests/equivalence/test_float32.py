"""Float32 (the default storage and compute precision): the equivalence still holds.

The rest of the suite runs in float64 so that rounding cannot hide a bug. Here the same harness
runs a rate configuration in float32 as well, from the same initialisation and with the same Ω's
(each float32 net is a cast of its float64 twin before training), and checks that float32 rounding
changes neither the infinite net's trajectory beyond rounding nor the finite/infinite gap.
"""

from __future__ import annotations

import copy

import torch

from pinet.testing import (
    RATE_CONFIGS, Task, build_infinite, fit_slope, geo_mean, make_task, omega_generator, rel_error, train,
)  # fmt: skip

CFG = RATE_CONFIGS["d1-sgd"]
SEEDS = range(4)
WIDTHS = (256, 4096)
F32 = torch.float32

# Measured over these 4 seeds: the float32 infinite net ends within 3.5e-7 (relative) of the
# float64 one after 20 steps (unit roundoff 6e-8, amplified by training). 1e-5 leaves 30x room for
# other BLAS summation orders while a float32-specific bug (a product evaluated in half precision, a
# coefficient stored in bfloat16) shows at 1e-3.
MAX_INF_DRIFT = 1e-5
# The finite/infinite gap is the n^-1/2 fluctuation (0.009 .. 0.58 here); float32 rounding moved it
# by at most 1.2e-6 of itself (measured, same runs), so the per-run gaps in both precisions must
# agree to 1e-4 of the gap.
MAX_GAP_CHANGE = 1e-4


def _cast(task: Task) -> Task:
    return Task(task.X.to(F32), task.Y.to(F32), task.X_test.to(F32), task.batches)


def test_float32_training_keeps_the_finite_infinite_gap():
    gaps = {w: [] for w in WIDTHS}
    for seed in SEEDS:
        task = make_task(CFG, seed)
        init = build_infinite(CFG, seed)
        init32 = copy.deepcopy(init).to(F32)
        assert init32.pi_layers[0].state.A.dtype == F32
        inf64 = train(copy.deepcopy(init), CFG, task)
        inf32 = train(init32, CFG, _cast(task))
        drift = rel_error(inf32.outputs.double(), inf64.outputs)
        assert drift < MAX_INF_DRIFT, (seed, drift)
        for w in WIDTHS:
            fin = init.sample(w, generator=omega_generator(seed, w, 0))
            fin32 = copy.deepcopy(fin).to(F32)
            gap64 = rel_error(train(fin, CFG, task).outputs, inf64.outputs)
            gap32 = rel_error(train(fin32, CFG, _cast(task)).outputs.double(), inf32.outputs.double())
            assert abs(gap32 - gap64) <= MAX_GAP_CHANGE * gap64, (seed, w, gap32, gap64)
            gaps[w].append(gap32)
    geo = [geo_mean(gaps[w]) for w in WIDTHS]
    # The rate tests' bound on the slope (test_rates.MAX_SLOPE), here from two widths and 4 seeds.
    assert fit_slope(WIDTHS, geo) <= -0.35, geo
