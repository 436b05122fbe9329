"""PiOptimizerWrapper is all-or-nothing: a step, load or add_param_group that fails leaves the model,
the inner optimizer and the hooks exactly as before (compared with torch.equal), and every bad
argument gets one message naming it (float64, fixed seeds)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import pinet
from pinet import PiRows
from pinet.hooks import Accumulate, ClipGradNorm, GradHook, GradNorm
from pinet.optim import PiOptimizerWrapper, param_groups

D = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return pinet.InfPiMLP(5, 3, 4, 1, bias_alpha=0.5, dtype=D)


def _opt(net, hooks=(), cls=torch.optim.SGD, **kw):
    kw = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, **kw}
    return PiOptimizerWrapper(cls(param_groups(net, kw.pop("lr"), kw.pop("weight_decay")), lr=0.1, **kw), net, hooks=list(hooks))


def _backward(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 5, generator=g, dtype=D), torch.randn(6, 3, generator=g, dtype=D)
    loss = (net(x) - y).square().mean()
    loss.backward()
    return loss


def _train(net, opt, steps=3):
    for s in range(steps):
        opt.zero_grad()
        _backward(net, seed=10 + s)
        opt.step()


def _flat(obj, prefix=""):
    """Every tensor and plain value of a nested state (dicts, lists, tuples, PiRows), by path."""
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().clone()
    elif isinstance(obj, PiRows):
        out.update(_flat(list(obj), prefix))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
    else:
        out[prefix] = copy.deepcopy(obj)
    return out


def _everything(net, opt):
    """Model state, wrapper state, row counts, gradients (c.grad included) and captured rows."""
    snap = _flat(net.state_dict(), "model") | _flat(opt.state_dict(), "opt")
    snap["rows"] = [l.state.rows for l in net.pi_layers]
    for name, p in net.named_parameters():
        snap[f"grad/{name}"] = None if p.grad is None else p.grad.clone()
    for i, l in enumerate(net.pi_layers):
        rows = l.state.pending_rows()
        snap.update(_flat(rows, f"pending/{i}") if rows is not None else {f"pending/{i}": None})
    return snap


def _same(a, b):
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y), k
        elif isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), (k, x, y)
        else:
            assert x == y, (k, x, y)


class RaisingSGD(torch.optim.SGD):
    """Updates every parameter, then raises (the worst case: half a step written)."""

    linear_in_grad = True

    def step(self, closure=None):
        super().step(closure)
        raise RuntimeError("inner optimizer failed")


def _failed_step_changes_nothing(net, opt):
    # One step whose inner optimizer raises after writing every parameter; then SGD again.
    opt.optimizer.__class__ = RaisingSGD
    before = _everything(net, opt)
    with pytest.raises(RuntimeError, match="inner optimizer failed"):
        opt.step()
    _same(before, _everything(net, opt))
    opt.optimizer.__class__ = torch.optim.SGD


def _run(fail: bool):
    # 5 steps with Accumulate(2) end in a half-finished accumulation cycle; then one step that
    # (optionally) fails inside the inner optimizer and is retried.
    net = _net()
    opt = _opt(net, hooks=[Accumulate(2), ClipGradNorm(0.5)], cls=RaisingSGD)
    opt.optimizer.__class__ = torch.optim.SGD
    for s in range(5):
        opt.zero_grad()
        _backward(net, seed=20 + s)
        opt.step()
    opt.zero_grad()
    _backward(net)
    if fail:
        _failed_step_changes_nothing(net, opt)
    opt.step()
    with torch.no_grad():
        return net(torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=D))


def test_inner_optimizer_that_raises_leaves_everything_as_before():
    # Everything is as before the failed call (checked inside _run), and retrying the step gives
    # exactly what the step gives when nothing failed.
    ok, retried = _run(False), _run(True)
    assert torch.isfinite(ok).all() and ok.abs().max() > 1e-3
    assert torch.equal(ok, retried)


def _run_pattern(fails):
    # One step per entry of `fails`; a True entry first fails inside the inner optimizer (checked
    # to leave everything as before), then is retried.
    net = _net()
    opt = _opt(net, hooks=[ClipGradNorm(0.5)], cls=RaisingSGD)
    opt.optimizer.__class__ = torch.optim.SGD
    for s, fail in enumerate(fails):
        opt.zero_grad()
        _backward(net, seed=30 + s)
        if fail:
            _failed_step_changes_nothing(net, opt)
        opt.step()
    with torch.no_grad():
        return net(torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=D))


def test_repeated_failures_restore_state_that_no_later_snapshot_overwrites():
    # Failures back to back and between good steps: each restore must leave nothing that a later
    # step's snapshot or inner step writes through (a restored state aliasing the snapshot's copies).
    ok = _run_pattern([False] * 5)
    assert torch.isfinite(ok).all() and ok.abs().max() > 1e-3
    assert torch.equal(ok, _run_pattern([True, False, True, True, False]))


def test_non_atomic_wrapper_still_restores_rows_state_shapes_and_hooks():
    net = _net()
    opt = PiOptimizerWrapper(RaisingSGD(net.parameters(), lr=0.1, momentum=0.9), net, atomic=False)
    opt.optimizer.__class__ = torch.optim.SGD
    _train(net, opt, 2)
    opt.optimizer.__class__ = RaisingSGD
    opt.zero_grad()
    _backward(net)
    rows = [l.state.rows for l in net.pi_layers]
    bufs = {p: opt.state[p]["momentum_buffer"].shape for p in opt.state}
    with pytest.raises(RuntimeError):
        opt.step()
    assert [l.state.rows for l in net.pi_layers] == rows
    assert {p: opt.state[p]["momentum_buffer"].shape for p in opt.state} == bufs
    assert all(l.c.grad.shape == l.c.shape for l in net.pi_layers)
    with pytest.raises(TypeError, match="atomic must be a bool"):
        PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1), net, atomic="no")


class WrongRows(GradHook):
    """Returns π-rows of the wrong output width for the last layer."""

    def update(self, grads, state, ctx):
        out = dict(grads)
        name = list(ctx.pi_states)[-1]
        rows = out[name]
        out[name] = PiRows(torch.zeros(rows.rows, 7, dtype=D), rows.B, rows.coef)
        return out, state


class ScaleGrads(GradHook):
    """The README's example hook."""

    def __init__(self, factor):
        self.factor = factor

    def update(self, grads, state, ctx):
        return {k: g * self.factor for k, g in grads.items()}, state


class WrongShape(GradHook):
    def update(self, grads, state, ctx):
        return {k: (g if isinstance(g, PiRows) else g.flatten()) for k, g in grads.items()}, state


class ForeignKey(GradHook):
    def update(self, grads, state, ctx):
        return {**grads, "not.a.param": torch.zeros(3, dtype=D)}, state


class IntegerGrads(GradHook):
    def update(self, grads, state, ctx):
        return {k: (g if isinstance(g, PiRows) else g.long()) for k, g in grads.items()}, state


class OnlyGrads(GradHook):
    def update(self, grads, state, ctx):
        return grads


class PiRowsOnly(GradHook):
    """Scales the π-rows and forgets the tensors: those used to be stepped with their raw .grad."""

    def update(self, grads, state, ctx):
        return {k: g.scale(0.0) for k, g in grads.items() if isinstance(g, PiRows)}, state


class HalfGrads(GradHook):
    def update(self, grads, state, ctx):
        return {k: (g if isinstance(g, PiRows) else g.half()) for k, g in grads.items()}, state


class MetaGrads(GradHook):
    def update(self, grads, state, ctx):
        return {k: (g if isinstance(g, PiRows) else g.to("meta")) for k, g in grads.items()}, state


class LongRows(GradHook):
    """B rows of norm 2: J would clamp their cosines into [-1, 1], another function silently."""

    def update(self, grads, state, ctx):
        return {k: (PiRows(g.A, 2 * g.B, g.coef) if isinstance(g, PiRows) else g) for k, g in grads.items()}, state


@pytest.mark.parametrize(
    "hook, error, match",
    [
        (WrongRows(), ValueError, r"WrongRows: π-rows for 'layers\.2\.state' have \(r_in, r_out\) = \(4, 7\), the state has \(4, 3\)"),
        (ScaleGrads(float("nan")), FloatingPointError, r"non-finite gradients for \['layers\.0\.A'"),
        (ScaleGrads(float("inf")), FloatingPointError, "non-finite gradients"),
        (WrongShape(), ValueError, r"WrongShape: gradient of 'layers\.0\.A' has shape \(20,\), the parameter \(5, 4\)"),
        (ForeignKey(), ValueError, r"ForeignKey: returned a gradient for 'not\.a\.param', which is not a parameter"),
        (IntegerGrads(), TypeError, r"IntegerGrads: 'layers\.0\.A' \(grad\) has dtype torch\.int64"),
        (OnlyGrads(), TypeError, r"OnlyGrads\.update must return \(grads, state\), got dict"),
        (PiRowsOnly(), ValueError, r"PiRowsOnly: dropped the gradients of \['layers\.0\.A', .*\]; a hook returns every gradient"),
        (HalfGrads(), TypeError, r"HalfGrads: gradient of 'layers\.0\.A' has dtype torch\.float16, the parameter torch\.float64"),
        (MetaGrads(), ValueError, r"MetaGrads: 'layers\.0\.A' \(grad\) is on meta, the parameter on cpu"),
        (LongRows(), ValueError, r"LongRows: π-rows for 'layers\.1\.state': B rows must be unit vectors \(or zero\): row \d+ has norm 2"),
    ],
)
def test_bad_hook_output_is_refused_before_anything_is_written(hook, error, match):
    net = _net()
    opt = _opt(net, hooks=[hook])
    opt.hooks.remove(hook)
    opt.hook_states = opt.hook_states[:-1]
    _train(net, opt, 2)
    opt.hooks.append(hook)
    opt.hook_states.append(hook.init(opt.ctx))
    opt.zero_grad()
    _backward(net)
    before = _everything(net, opt)
    with pytest.raises(error, match=match):
        opt.step()
    _same(before, _everything(net, opt))


def test_optimizer_state_of_the_whole_layer_is_refused_on_a_shard():
    # Built before pinet.distributed.shard(), the optimizer's per-row state has the whole layer's
    # rows: it used to be cut to this process's first rows, pairing momentum with other rows.
    net = _net()
    opt = _opt(net)
    _train(net, opt, 2)
    opt.zero_grad()
    _backward(net)
    st = net.pi_layers[0].state
    st.shard = pinet.state.ShardInfo(None, 0, 2, 2 * st.rows)  # as if this rank held half the rows
    st.truncate(st.rows // 2, 2 * (st.rows // 2))
    before = _everything(net, opt)
    with pytest.raises(RuntimeError, match=r"the optimizer state 'momentum_buffer' of 'layers\.1\.state\.c' has \d+ "
                       r"rows but this process holds \d+ rows of the sharded layer; build the optimizer \(and the "
                       r"wrapper\) after pinet\.distributed\.shard\(model\)"):
        opt.step()
    _same(before, _everything(net, opt))


def test_non_finite_loss_and_hyperparameters_are_refused():
    net = _net()
    opt = _opt(net)
    _train(net, opt, 2)
    opt.zero_grad()
    before = _everything(net, opt)

    def nan_closure():
        opt.zero_grad()
        _backward(net)  # finite gradients ...
        return torch.tensor(float("nan"), dtype=D)  # ... but the loss is NaN

    with pytest.raises(FloatingPointError, match="closure returned a non-finite loss"):
        opt.step(nan_closure)
    after = _everything(net, opt)
    assert [l.state.rows for l in net.pi_layers] == before["rows"]
    _same({k: v for k, v in before.items() if k.startswith(("model", "opt"))},
          {k: v for k, v in after.items() if k.startswith(("model", "opt"))})  # fmt: skip
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"param_groups: lr must be a finite non-negative number, got {bad}"):
            param_groups(net, bad)
        with pytest.raises(ValueError, match="first_layer_lr_mult must be a finite"):
            param_groups(net, 0.1, first_layer_lr_mult=bad)
    # A scheduler (or a user) that sets a NaN lr after construction: refused at step(), nothing changes.
    opt.zero_grad()
    _backward(net)
    before = _everything(net, opt)
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"group 1 \('hidden'\) has lr=nan; expected a finite number"):
        opt.step()
    opt.param_groups[1]["lr"] = before["opt/optimizer/param_groups/1/lr"]
    _same(before, _everything(net, opt))
    with pytest.raises(ValueError, match="momentum=nan"):
        PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=float("nan")), net)


def test_step_again_without_backward_is_refused():
    net = _net()
    opt = _opt(net)
    opt.zero_grad()
    _backward(net)
    opt.step()
    before = _everything(net, opt)
    with pytest.raises(RuntimeError, match="step\\(\\) is called again without a new backward\\(\\)"):
        opt.step()
    _same(before, _everything(net, opt))


def test_rows_beyond_a_half_store_refuse_the_step_and_change_nothing():
    # A loss scaled like GradScaler's first scale (65536) gives π-rows past float16's range: they
    # used to be stored as inf (the norm check runs on the float32 rows), and the net gave NaN.
    torch.manual_seed(0)
    net = pinet.InfPiMLP(6, 3, 4, 1, dtype=torch.float16)
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for scale in (1.0, 1.0):
        opt.zero_grad()
        ((net(x).float() - 1).square().sum() * scale).backward()
        opt.step()
    opt.zero_grad()
    ((net(x).float() - 1).square().sum() * 65536.0).backward()
    before = _everything(net, opt)
    with pytest.raises(FloatingPointError, match=r"PiOptimizerWrapper.step: the π-rows of 'layers.\d.state' cannot be "
                       r"stored: append: A_new has values beyond the range of the torch.float16 store"):
        opt.step()
    _same(before, _everything(net, opt))
    assert all(bool(torch.isfinite(l.state.A).all()) for l in net.pi_layers)
    opt.zero_grad()
    ((net(x).float() - 1).square().sum()).backward()
    opt.step()  # an unscaled step still trains
    assert bool(torch.isfinite(net(x)).all())


def test_accumulate_refuses_a_step_without_gradients():
    # It used to count as a micro-batch: Accumulate(2) then applied the update of one micro-batch.
    net = _net()
    opt = _opt(net, hooks=[Accumulate(2)])
    _backward(net)
    opt.step()  # stashed: micro-batch 1 of 2
    before = _everything(net, opt)
    for _ in range(2):  # step() again, and after zero_grad()
        with pytest.raises(RuntimeError, match=r"Accumulate: step\(\) got no gradients: call backward\(\) before "
                           r"every step\(\) \(this call would count as micro-batch 2 of 2"):
            opt.step()
        _same(before, _everything(net, opt))
        opt.zero_grad()
    _backward(net, seed=2)
    opt.step()
    assert opt.stats.applied and set(opt.stats.rows_appended.values()) == {12}  # 2 micro-batches of 6 rows


def _accumulate_state(mutate):
    def edit(sd):
        mutate(sd["hooks"][-1]["state"])
    return edit


def _momentum(value):
    def edit(sd):
        st = sd["optimizer"]["state"]
        first = next(iter(st))
        st[first]["momentum_buffer"] = value(st[first]["momentum_buffer"])
    return edit


def _group(key, value):
    def edit(sd):
        if value is KeyError:
            del sd["optimizer"]["param_groups"][0][key]
        else:
            sd["optimizer"]["param_groups"][0][key] = value
    return edit


def _first_rows(key, value):
    def edit(state):
        rows = next(g for g in state["grads"].values() if isinstance(g, dict))
        rows[key] = value(rows[key])
    return edit


@pytest.mark.parametrize(
    "edit,match",
    [
        (_momentum(lambda b: b * float("nan")), r"state 'momentum_buffer' of '.*' is not finite"),
        (_momentum(lambda b: torch.tensor(1.0, dtype=D)), r"must be a real floating-point tensor of the parameter's shape"),
        (_momentum(lambda b: b.tolist()), r"state 'momentum_buffer' of '.*' must be a tensor or None, got list"),
        (_group("momentum", None), r"saved group 0 has momentum=None; expected a finite number"),
        (_group("momentum", KeyError), r"saved group 0 has no 'momentum'"),
        (_group("lr", -1.0), r"saved group 0 has lr=-1.0; expected a non-negative number"),
        (_group("nesterov", "no"), r"saved group 0 has nesterov='no'; expected a bool"),
        (lambda sd: sd["hooks"][0].pop("state"), r"'hooks' must be a list of dicts with keys 'type', 'config' and 'state'"),
        (lambda sd: sd["optimizer"]["state"].__setitem__(0, 5), r"optimizer state of '.*' must be a dict, got int"),
        (_accumulate_state(lambda s: s.__setitem__("count", 99)), r"count must be an int in \[0, 3\) for Accumulate\(3\), got 99"),
        (_accumulate_state(lambda s: s.__setitem__("count", -5)), r"count must be an int in \[0, 3\).*got -5"),
        (_accumulate_state(lambda s: s.__setitem__("count", 1.5)), r"count must be an int in \[0, 3\).*got 1.5"),
        (_accumulate_state(lambda s: s.__setitem__("count", True)), r"count must be an int in \[0, 3\).*got True"),
        (_accumulate_state(lambda s: s.pop("count")), r"expected a dict with keys 'count' and 'grads', got \['grads'\]"),
        (_accumulate_state(lambda s: s.__setitem__("grads", [1, 2])), r"grads must be a dict of name -> gradient, got list"),
        (_accumulate_state(_first_rows("coef", lambda t: t * float("nan"))), r"stashed gradient 'layers.\d.state' is not finite"),
        (_accumulate_state(_first_rows("coef", lambda t: t[:1])), r"stashed π-rows 'layers.\d.state': PiRows: A, B and coef"),
    ],
)  # fmt: skip
def test_malformed_saved_state_is_refused_and_changes_nothing(edit, match):
    # Each of these used to load, then fail every later step() with torch's own error, or (NaN
    # momentum, NaN stash) turn the net into NaN or fail every step until the wrapper was rebuilt.
    net = _net()
    opt = _opt(net, hooks=[Accumulate(3)])
    for s in range(5):  # one update (3 micro-batches), then 2 stashed
        opt.zero_grad()
        _backward(net, seed=30 + s)
        opt.step()
    saved = _saved(net, opt)["opt"]
    edit(saved)
    before = _everything(net, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    _same(before, _everything(net, opt))
    opt.zero_grad()
    _backward(net)
    opt.step()  # the wrapper still works
    assert opt.stats.applied


def test_a_truncated_state_trains_on_and_a_stale_coefficient_gradient_is_named():
    net = _net()
    opt = _opt(net, weight_decay=0.0)  # old rows' coefficients then get no gradient: b ← 0.9 b exactly
    _train(net, opt, steps=2)
    opt.zero_grad()
    _backward(net)
    for l in net.pi_layers:  # after backward(): c.grad has rows the state no longer holds
        l.state.truncate(l.state.rows - 2)
    before = _everything(net, opt)
    with pytest.raises(RuntimeError, match=r"the coefficients 'layers.1.state.c' have a gradient of \d+ rows but the "
                       r"state holds \d+ \(it was truncated, appended to or loaded after backward\(\)\); call "
                       r"zero_grad\(\) and backward\(\) again"):
        opt.step()
    _same(before, _everything(net, opt))
    # Truncated before backward(): the removed rows' momentum goes with them (it used to fail with
    # torch's "size of tensor a (9) must match the size of tensor b (12)", step after step).
    opt.zero_grad()
    kept = {}
    for l in net.pi_layers:
        kept[l] = opt.optimizer.state[l.state.c]["momentum_buffer"][: l.state.rows].clone()
    _backward(net, seed=3)
    opt.step()
    for l, buf in kept.items():
        new = opt.optimizer.state[l.state.c]["momentum_buffer"]
        assert new.shape == l.state.c.shape
        assert torch.equal(new[: len(buf)], 0.9 * buf)  # the kept rows' momentum, continued
        assert torch.equal(new[len(buf) :], l.state.c.grad[len(buf) :])  # the new rows' first step
    _train(net, opt, steps=2)


def _saved(net, opt):
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_optimizer_state_of_another_step_is_refused_and_says_what_to_load_first():
    net = _net()
    opt = _opt(net, hooks=[Accumulate(3)])
    _train(net, opt, 3)
    old = _saved(net, opt)
    _train(net, opt, 3)
    before = _everything(net, opt)
    with pytest.raises(ValueError, match=r"'layers\.1\.state\.c' has shape \(\d+,\) but the parameter has \(\d+,\).*load the model's state_dict from the same checkpoint first"):
        opt.load_state_dict(old["opt"])
    _same(before, _everything(net, opt))
    # The right order works, bit for bit.
    net.load_state_dict(old["model"])
    opt.load_state_dict(old["opt"])
    # Hook settings are saved: Accumulate(3)'s state does not load into Accumulate(2).
    other = _opt(_net(), hooks=[Accumulate(2)])
    other.model.load_state_dict(old["model"])
    with pytest.raises(ValueError, match=r"hook Accumulate was saved with other settings steps: saved 3 vs this 2"):
        other.load_state_dict(old["opt"])
    with pytest.raises(ValueError, match=r"saved hooks \[.*'Accumulate'\] differ from this wrapper's"):
        _opt(_net()).load_state_dict(old["opt"])
    with pytest.raises(ValueError, match="expected a dict with keys 'optimizer' and 'hooks'"):
        opt.load_state_dict({"state": {}})


def test_add_param_group_with_a_foreign_parameter_is_not_added():
    net = _net()
    opt = _opt(net)
    n_groups = len(opt.param_groups)
    foreign = torch.nn.Parameter(torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="not parameters of model"):
        opt.add_param_group({"params": [foreign], "lr": 0.1})
    assert len(opt.param_groups) == n_groups == len(opt.optimizer.param_groups)
    assert all(foreign is not p for g in opt.param_groups for p in g["params"])


def test_argument_errors_name_the_argument():
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"hooks must be a list of GradHook, got a single ClipGradNorm; pass hooks=\[ClipGradNorm\(...\)\]"):
        PiOptimizerWrapper(sgd, net, hooks=ClipGradNorm(1.0))
    with pytest.raises(TypeError, match="hooks must be GradHook instances, got str"):
        PiOptimizerWrapper(sgd, net, hooks=["clip"])
    for bad in ("0.5x", None, float("nan"), -1.0, 0.0, True):
        with pytest.raises(ValueError, match=r"ClipGradNorm: max_norm must be a finite number > 0, got"):
            ClipGradNorm(bad)
    with pytest.raises(ValueError, match="ClipGradNorm: per_param must be a bool"):
        ClipGradNorm(1.0, per_param="yes")
    assert math.isclose(ClipGradNorm(2).max_norm, 2.0)
    # A string is truthy: "no" must not silently mean True.
    with pytest.raises(ValueError, match="GradNorm: error_if_nonfinite must be a bool, got 'no'"):
        GradNorm("no")
    wrapped = PiOptimizerWrapper(sgd, net)
    with pytest.raises(TypeError, match="zero_grad: set_to_none must be a bool, got 'no'"):
        wrapped.zero_grad("no")


def test_complex_inputs_are_refused_by_every_layer():
    torch.manual_seed(0)
    inf = pinet.InfPiMLP(5, 3, 4, 1, dtype=D)
    fin = inf.sample(64)
    z = torch.randn(2, 5, dtype=torch.complex128)
    for layer, x in [(inf.layers[0], z), (inf.layers[1], torch.randn(2, 4, dtype=torch.complex128)),
                     (fin.layers[0], z), (fin.layers[1], torch.randn(2, 64, dtype=torch.complex128))]:  # fmt: skip
        with pytest.raises(TypeError, match="input must be real"):
            layer(x)


def test_check_grads_skips_only_entries_already_checked():
    from pinet.hooks import HookContext
    from pinet.hooks.base import check_grads

    net = _net()
    ctx = HookContext.from_model(net)
    good = {name: torch.zeros_like(p) for name, p in ctx.params.items()}
    check_grads(good, ctx, where="first")
    # A later hook that passes every entry through, and one that replaces an entry with a bad one:
    # the replaced entry is checked (and named) although the rest is skipped.
    check_grads(dict(good), ctx, where="pass-through", checked=good)
    bad = {**good, "layers.0.A": good["layers.0.A"].flatten()}
    with pytest.raises(ValueError, match=r"Replacer: gradient of 'layers\.0\.A' has shape"):
        check_grads(bad, ctx, where="Replacer", checked=good)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        check_grads({**good, "extra": torch.zeros(1, dtype=D)}, ctx, where="Adder", checked=good)
