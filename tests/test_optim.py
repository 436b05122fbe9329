"""PiOptimizerWrapper and hooks against plain hand-written references (float64)."""

import io

import pytest
import torch

import pinet
from pinet.hooks import Accumulate, ClipGradNorm, GradHook
from pinet.optim import PiOptimizerWrapper, param_groups
from pinet.testing import CoefficientSpaceReference

D = torch.float64
LR = 0.4


def mse(y, t):
    return (y - t).square().sum() / y.shape[0]


def _net(layernorm=False, depth=1):
    return pinet.InfPiMLP(5, 3, 4, depth, first_layer_alpha=1.2, last_layer_alpha=0.8, bias_alpha=0.7,
                          layernorm=layernorm, dtype=D)  # fmt: skip


def _batches(steps, accum, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(b, 5, generator=g, dtype=D), torch.randn(b, 3, generator=g, dtype=D))
             for _ in range(accum)] for _ in range(steps)]  # fmt: skip


def _train_and_compare(sgd_kwargs, *, hooks=(), clip=None, per_param=False, accum=1, mults=(1.0, 1.0, 1.0),
                       layernorm=False, depth=1, steps=5, loss=mse):  # fmt: skip
    torch.manual_seed(0)
    net = _net(layernorm, depth)
    ref_kwargs = {k: v for k, v in sgd_kwargs.items() if k not in ("foreach", "fused")}  # the reference has neither
    ref = CoefficientSpaceReference(net, lr=LR, clip=clip, per_param=per_param, accum=accum, mults=mults, **ref_kwargs)
    groups = param_groups(net, LR, sgd_kwargs.get("weight_decay", 0.0), *mults)
    opt_kwargs = {k: v for k, v in sgd_kwargs.items() if k != "weight_decay"}
    opt = PiOptimizerWrapper(torch.optim.SGD(groups, lr=LR, **opt_kwargs), net, hooks=hooks)
    for micro in _batches(steps, accum):
        for x, t in micro:
            opt.zero_grad()
            loss(net(x), t).backward()
            opt.step()
        ref.step(micro, loss)
    x = torch.randn(7, 5, dtype=D)
    assert torch.allclose(net(x), ref.forward(x)[0], atol=1e-10, rtol=0)
    for layer, p in zip(net.pi_layers, ref.pi):
        assert layer.state.rows == p["A"].shape[0]
        assert torch.allclose(layer.c.detach(), p["c"], atol=1e-10, rtol=0)
        assert torch.allclose(layer.A, p["A"], atol=1e-10, rtol=0) and torch.allclose(layer.B, p["B"], atol=1e-10, rtol=0)
    assert torch.allclose(net.layers[0].A, ref.A0, atol=1e-10, rtol=0)
    return net, opt


SGD_CONFIGS = {
    "plain": dict(),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-3, dampening=0.0),
    "momentum_dampening_wd": dict(momentum=0.9, dampening=0.1, weight_decay=1e-3),
    "maximize_momentum": dict(momentum=0.5, maximize=True),
    "foreach_off": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=False),
    "foreach_on": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, foreach=True),
    # torch's fused SGD kernel (CPU since torch 2.4): one pass over gradient, buffer and weight.
    "fused": dict(momentum=0.9, nesterov=True, weight_decay=1e-2, fused=True),
}


@pytest.mark.parametrize("name", list(SGD_CONFIGS))
def test_sgd_variants_equal_coefficient_space_reference(name):
    kwargs = SGD_CONFIGS[name]
    # Maximising the negated loss is the same descent, which keeps the values bounded.
    loss = (lambda y, t: -mse(y, t)) if kwargs.get("maximize") else mse
    net, opt = _train_and_compare(kwargs, loss=loss)
    if "foreach" in kwargs:
        assert opt.param_groups[0]["foreach"] is kwargs["foreach"]


def test_foreach_fused_and_for_loop_agree():
    results = []
    for impl in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        torch.manual_seed(0)
        net = _net()
        opt = PiOptimizerWrapper(
            torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-2, **impl), net
        )
        for micro in _batches(4, 1):
            opt.zero_grad()
            mse(net(micro[0][0]), micro[0][1]).backward()
            opt.step()
        results.append(net(torch.ones(2, 5, dtype=D)))
    assert torch.allclose(results[0], results[1], atol=1e-13)
    assert torch.allclose(results[0], results[2], atol=1e-13)


@pytest.mark.parametrize("per_param", [False, True])
def test_clipping_equals_reference(per_param):
    # max_norm small enough that every step clips (checked below).
    sgd = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    net, opt = _train_and_compare(sgd, hooks=[ClipGradNorm(0.05, per_param=per_param)], clip=0.05, per_param=per_param)
    assert opt.ctx.stats["grad_norm"] > 0.05


def test_accumulation_equals_reference():
    sgd = dict(momentum=0.9, dampening=0.1, weight_decay=1e-3)
    _train_and_compare(sgd, hooks=[Accumulate(3), ClipGradNorm(0.1)], clip=0.1, accum=3, steps=3)


def test_lr_multipliers_and_layernorm_depth2_equal_reference():
    sgd = dict(momentum=0.9, weight_decay=1e-3)
    _train_and_compare(sgd, mults=(0.5, 3.0, 0.2), layernorm=True, depth=2, steps=4)


def _finite_plain_loop(fin, steps, sgd_kwargs, clip=None):
    opt = torch.optim.SGD(fin.parameters(), lr=LR, **sgd_kwargs)
    for micro in _batches(steps, 1):
        opt.zero_grad()
        mse(fin(micro[0][0]), micro[0][1]).backward()
        with torch.no_grad():
            for layer in fin.layers[:-1]:
                omega = layer.proj.omega
                P = omega @ torch.linalg.inv(omega.T @ omega) @ omega.T  # n x n: fine at this size
                layer.weight.grad = P @ layer.weight.grad
                layer.bias.grad = P @ layer.bias.grad
        if clip:
            torch.nn.utils.clip_grad_norm_(fin.parameters(), clip)
        opt.step()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_finite_wrapper_equals_plain_projected_loop(clip):
    torch.manual_seed(0)
    inf = _net(depth=2)
    fins = [inf.sample(48, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    sgd = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    _finite_plain_loop(fins[0], 5, sgd, clip)
    hooks = [ClipGradNorm(clip)] if clip else []
    opt = PiOptimizerWrapper(torch.optim.SGD(fins[1].parameters(), lr=LR, **sgd), fins[1], hooks=hooks)
    for micro in _batches(5, 1):
        opt.zero_grad()
        mse(fins[1](micro[0][0]), micro[0][1]).backward()
        opt.step()
    for (name, a), b in zip(fins[0].named_parameters(), fins[1].parameters()):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), name


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 2], gamma=0.1),
    ],
)
def test_lr_schedulers_drive_coefficient_learning_rate(make_sched):
    net = _net()
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=LR), net)
    sched = make_sched(opt)
    lrs = []
    for micro in _batches(3, 1):
        lr = opt.param_groups[0]["lr"]
        assert opt.optimizer.param_groups[0]["lr"] == lr
        lrs.append(lr)
        opt.zero_grad()
        mse(net(micro[0][0]), micro[0][1]).backward()
        opt.step()
        sched.step()
        # Plain SGD: the appended rows carry coefficient -lr of that step.
        assert torch.allclose(net.layers[1].c.detach()[-4:], torch.full((4,), -lr, dtype=D))
    assert len(set(lrs)) > 1


def test_nonlinear_optimizers_are_refused_for_infinite_layers():
    net = _net()
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        with pytest.raises(TypeError, match="not linear in the gradient"):
            PiOptimizerWrapper(cls(net.parameters(), lr=0.1), net)
    # Finite nets have no coefficients: any optimizer is fine.
    fin = net.sample(16)
    PiOptimizerWrapper(torch.optim.Adam(fin.parameters(), lr=0.1), fin)

    class MySGD(torch.optim.SGD):
        linear_in_grad = True

    PiOptimizerWrapper(MySGD(net.parameters(), lr=0.1), net)

    class NotLinear(torch.optim.SGD):
        linear_in_grad = False

    with pytest.raises(TypeError, match="not linear"):
        PiOptimizerWrapper(NotLinear(net.parameters(), lr=0.1), net)


def test_wrapper_argument_errors():
    net = _net()
    with pytest.raises(ValueError, match=r"layers\.1\.state\.c"):
        PiOptimizerWrapper(torch.optim.SGD([net.layers[0].A], lr=0.1), net)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        PiOptimizerWrapper("sgd", net)
    with pytest.raises(TypeError, match="hooks must be GradHook"):
        PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1), net, hooks=[lambda g: g])
    with pytest.raises(ValueError, match="max_norm"):
        ClipGradNorm(0)
    with pytest.raises(ValueError, match="steps"):
        Accumulate(0)


def _snapshot(net, opt):
    return (
        {k: v.detach().clone() for k, v in net.state_dict().items() if torch.is_tensor(v)},
        [l.state.rows for l in net.pi_layers],
        {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()},
    )


@pytest.mark.parametrize("hooks", [[], [Accumulate(2), ClipGradNorm(0.1)]])
def test_nonfinite_gradient_raises_and_leaves_state_unchanged(hooks):
    net = _net()
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), net, hooks=hooks)
    for micro in _batches(2, 2):
        for x, t in micro:
            opt.zero_grad()
            mse(net(x), t).backward()
            opt.step()
    before = _snapshot(net, opt)
    hook_states = [dict(s) if isinstance(s, dict) else s for s in opt.hook_states]
    x, t = _batches(1, 1)[0][0]
    t[0, 0] = float("nan")
    opt.zero_grad()
    mse(net(x), t).backward()
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    after = _snapshot(net, opt)
    assert after[1] == before[1]
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    for k in before[2]:
        for n in before[2][k]:
            assert torch.equal(before[2][k][n], after[2][k][n])
    assert [s if not isinstance(s, dict) else s["count"] for s in opt.hook_states] == [
        s if not isinstance(s, dict) else s["count"] for s in hook_states
    ]


@pytest.mark.parametrize("hooks", [lambda: [], lambda: [Accumulate(3), ClipGradNorm(0.2, per_param=True)]])
def test_resume_is_bit_exact(hooks):
    sgd = dict(lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-3)
    batches = _batches(8, 1)

    def make():
        torch.manual_seed(0)
        net = _net(depth=2)
        opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), **sgd), net, hooks=hooks())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
        return net, opt, sched

    def train(net, opt, sched, part):
        for micro in part:
            opt.zero_grad()
            mse(net(micro[0][0]), micro[0][1]).backward()
            opt.step()
            sched.step()

    net, opt, sched = make()
    train(net, opt, sched, batches)
    x = torch.randn(6, 5, dtype=D)
    expected = net(x)

    net, opt, sched = make()
    train(net, opt, sched, batches[:4])  # with Accumulate(3), stops mid-cycle
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()))
    net, opt, sched = make()
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    train(net, opt, sched, batches[4:])
    assert torch.equal(net(x), expected)


def test_optimizer_state_dict_is_compact():
    net = _net()
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), net)
    for micro in _batches(5, 1):
        opt.zero_grad()
        mse(net(micro[0][0]), micro[0][1]).backward()
        opt.step()
    for s in opt.state_dict()["optimizer"]["state"].values():
        buf = s["momentum_buffer"]
        assert buf.untyped_storage().nbytes() == buf.numel() * buf.element_size()


def test_custom_hook_runs_in_order_and_can_scale():
    class Halve(GradHook):
        def update(self, grads, state, ctx):
            return {k: (g.scale(0.5) if hasattr(g, "scale") else g * 0.5) for k, g in grads.items()}, state

    net = _net()
    opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=LR), net, hooks=[Halve()])
    assert [type(h).__name__ for h in opt.hooks] == ["Concatenate", "ProjectToR", "GradNorm", "Halve"]
    x, t = _batches(1, 1)[0][0]
    opt.zero_grad()
    mse(net(x), t).backward()
    opt.step()
    assert torch.allclose(net.layers[1].c.detach()[-4:], torch.full((4,), -LR / 2, dtype=D))


def test_clipping_sees_gradients_a_previous_hook_changed_in_place():
    # GradNorm and ClipGradNorm share memoised norms; a hook in between that rescales gradients in
    # place (same tensor objects) or out of place must make ClipGradNorm use the new norms.
    class Triple(GradHook):
        def __init__(self, in_place):
            self.in_place = in_place

        def update(self, grads, state, ctx):
            out = {}
            for k, g in grads.items():
                if hasattr(g, "scale"):
                    out[k] = g.scale(3.0)
                elif self.in_place:
                    out[k] = g.mul_(3.0)
                else:
                    out[k] = g * 3.0
            return out, state

    results = []
    for in_place in (False, True):
        torch.manual_seed(0)
        net = _net()
        opt = PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=LR), net,
                                 hooks=[Triple(in_place), ClipGradNorm(0.05, per_param=True)])  # fmt: skip
        for micro in _batches(3, 1):
            opt.zero_grad()
            mse(net(micro[0][0]), micro[0][1]).backward()
            opt.step()
        results.append(net(torch.ones(2, 5, dtype=D)))
    assert torch.allclose(results[0], results[1], atol=1e-13, rtol=0)


def test_sqnorm_vector_is_exact_in_float64_for_mixed_dtypes():
    from pinet.hooks.norm import sqnorm_vector, total_norm

    # float32 values that are not representable in bfloat16, a bfloat16 and a float64 one: the
    # vector must hold each exactly (one promotion to the widest dtype, then float64), in order.
    vals = {"a": torch.tensor(1.0 + 2**-20), "b": torch.tensor(3.0, dtype=torch.bfloat16),
            "c": torch.tensor(1.0 + 2**-40, dtype=D), "d": torch.tensor(0.1)}  # fmt: skip
    vec = sqnorm_vector(vals)
    assert vec.dtype == D and vec.shape == (4,)
    assert vec.tolist() == [1.0 + 2**-20, 3.0, 1.0 + 2**-40, float(torch.tensor(0.1))]
    assert float(total_norm(vals)) == float(vec.sum().sqrt())
    assert sqnorm_vector({}).shape == (0,) and float(total_norm({})) == 0.0
