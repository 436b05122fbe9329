"""Property tests: for a configuration drawn from every training ingredient, finite π-nets of width
2048 trained side by side with the infinite net must stay within their own measured n^-1/2
fluctuation of it; and the check must be able to fail (deliberately broken finite optimizers).

Statistic (see :class:`pinet.testing.Tracking`): ``S`` finite nets with independent Ω's give errors
``e_i`` against the infinite net; their spread ``fluctuation`` is the measured n^-1/2 fluctuation;
``ratio = rms error / fluctuation`` is ≈ 1 when the finite nets scatter around the infinite net and
≈ ``‖bias‖ / fluctuation`` when they agree with each other but not with it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pinet.testing import (
    BROKEN_OPTIMIZERS, TrainConfig, measure_tracking, optimizer_configs, profile, stable,
    tracking_problems,
)  # fmt: skip

P = profile()

# The bounds (MAX_AMPLIFICATION, MAX_RATIO), their calibration, the strategy and the broken
# optimizers live in pinet.testing, so that users run the same check on their own networks.


@settings(
    max_examples=P.prop_examples,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(cfg=optimizer_configs(P.prop_depths), seed=st.integers(0, 2**16))
def test_finite_nets_track_the_infinite_net(cfg: TrainConfig, seed: int):
    assume(stable(cfg, seed))
    t = measure_tracking(cfg, seed, P.prop_width, P.prop_omegas)
    assert not tracking_problems(t), f"{tracking_problems(t)} for {cfg.short()}"


@pytest.mark.parametrize("name", list(BROKEN_OPTIMIZERS))
def test_a_broken_finite_optimizer_fails_the_bound(name: str):
    cfg, broken = BROKEN_OPTIMIZERS[name]
    ok = measure_tracking(cfg, 0, P.prop_width, P.prop_omegas)
    bad = measure_tracking(cfg, 0, P.prop_width, P.prop_omegas, **broken)
    # The correct pairing passes; the broken one fails the property test's check.
    assert not tracking_problems(ok), f"{name}: correct pairing failed: {tracking_problems(ok)}"
    assert tracking_problems(bad), f"{name}: broken pairing not caught: {bad}"
