"""pinet.distributed: π-states sharded over 2-3 processes (gloo, spawned here, one thread each).

A sharded run must equal the one-process run step by step (float64: to rounding, the summation
order changes), its checkpoints must load into any number of processes, and a dead or stuck rank
must raise within the process group's timeout. Every spawn has a deadline: a hang fails the test.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pinet
from pinet import distributed as pd
from pinet.hooks import Accumulate, ClipGradNorm
from pinet.optim import PiOptimizerWrapper

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SPAWN_DEADLINE = 120.0  # seconds for one spawned group (start-up of 3 processes on a loaded box included)
PG_TIMEOUT = 30.0  # the process group's timeout in the training workers
RTOL = 1e-10  # float64; sharding only changes the summation order
D_IN, D_OUT, R = 6, 3, 5
STEPS, MORE = 13, 4  # micro-steps before the checkpoint (odd: Accumulate(2) holds a stash), after it


# ------------------------------------------------------------------------------ spawning
# Workers start like "spawn" (a fresh single-threaded process, no inherited OpenMP state), but from
# a forkserver that has imported torch and pinet once: importing them takes 5-6 s per process on
# the loaded 2-core CI box, 0.1-0.2 s per group through the forkserver (measured).
if "forkserver" in mp.get_all_start_methods():
    _START = "forkserver"
    mp.get_context("forkserver").set_forkserver_preload(["torch", "pinet", "pinet.distributed"])
else:  # pragma: no cover - not on Linux
    _START = "spawn"

def _entry(rank, fn, world, tmp, tag, pg_timeout, args):
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(tmp, f"store-{tag}"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))  # fmt: skip
    fn(rank, world, tmp, *args)
    dist.destroy_process_group()


def _spawn(fn, world, tmp_path, *args, tag=None, pg_timeout=PG_TIMEOUT):
    """Run ``fn(rank, world, tmp, *args)`` in ``world`` processes; a worker's exception fails the test
    (with its traceback), and so does a group that is not done within SPAWN_DEADLINE."""
    tag = tag or fn.__name__
    ctx = mp.start_processes(_entry, args=(fn, world, str(tmp_path), tag, pg_timeout, args), nprocs=world,
                             join=False, start_method=_START)  # fmt: skip
    end = time.monotonic() + SPAWN_DEADLINE
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world} processes of {fn.__name__} did not finish within {SPAWN_DEADLINE}s")


# ------------------------------------------------------------------------------ the networks
def _mlp() -> pinet.InfPiMLP:
    net = pinet.InfPiMLP(D_IN, D_OUT, R, 1, bias_alpha=0.5, last_layer_alpha=0.5, dtype=torch.float64)
    net.reset_parameters(torch.Generator().manual_seed(3))
    return net


def _optimizer(net):
    sgd = torch.optim.SGD(net.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-3)
    # max_norm small enough that most steps are clipped (checked below through the stats).
    opt = PiOptimizerWrapper(sgd, net, hooks=[Accumulate(2), ClipGradNorm(0.05)])
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)


def _batches(n, seed=11, b=5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, D_IN, generator=gen, dtype=torch.float64), torch.randint(0, D_OUT, (b,), generator=gen))
            for _ in range(n)]  # fmt: skip


def _step(net, opt, sched, x, y):
    """One micro-step; returns (outputs before the step, input gradient)."""
    x = x.clone().requires_grad_()
    out = net(x)
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    opt.step()
    if opt.stats.applied:
        sched.step()
    return out.detach(), x.grad


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class TwoHeads(nn.Module):
    """A custom π-network: one trunk, two readouts reading the same coordinate space."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.inp = pinet.InfPiInput(D_IN, R, dtype=torch.float64)
        self.trunk = pinet.InfPiLayer(R, R, dtype=torch.float64)
        self.head_a = pinet.InfPiLayer(R, 3, readout=True, dtype=torch.float64)
        self.head_b = pinet.InfPiLayer(R, 2, readout=True, bias_alpha=0.0, dtype=torch.float64)
        for m in (self.inp, self.trunk, self.head_a, self.head_b):
            m.reset_parameters(gen)

    def forward(self, x):
        g = self.trunk(self.inp(x))
        return self.head_a(g), self.head_b(g)


# ------------------------------------------------------------------------------ workers
def _train_worker(rank, world, tmp):
    ref, net = _mlp(), pd.shard(_mlp())
    ref_opt, ref_sched = _optimizer(ref)
    opt, sched = _optimizer(net)
    states = {n: m for n, m in net.named_modules() if isinstance(m, pinet.PiState)}
    ref_states = {n: m for n, m in ref.named_modules() if isinstance(m, pinet.PiState)}
    err = 0.0
    clipped = 0
    for i, (x, y) in enumerate(_batches(STEPS)):
        if i == 5:
            # Micro-step 4 is stashed, so this step applies; an inner optimizer that raises must
            # leave the shard's local and global row counts (and everything else) as they were.
            before = {n: (st.rows, st.global_rows) for n, st in states.items()}
            real = opt.optimizer.step

            def broken(*a, **k):
                raise RuntimeError("injected")

            opt.optimizer.step = broken
            opt.zero_grad()
            net(x).sum().backward()
            with pytest.raises(RuntimeError, match="injected"):
                opt.step()
            opt.optimizer.step = real
            for n, st in states.items():
                assert (st.rows, st.global_rows) == before[n], n
        out_ref, gx_ref = _step(ref, ref_opt, ref_sched, x, y)
        out, gx = _step(net, opt, sched, x, y)
        err = max(err, _rel(out, out_ref), _rel(gx, gx_ref))  # input gradient: not P times too large
        assert opt.stats.applied == ref_opt.stats.applied
        if opt.stats.applied:
            clipped += opt.stats.grad_norm > 0.05
            assert math.isclose(opt.stats.grad_norm, ref_opt.stats.grad_norm, rel_tol=1e-10)
        for n, st in states.items():
            assert st.global_rows == ref_states[n].rows, (i, n)
            # Each rank holds its round-robin share: within one row of G/P.
            assert st.rows == st.shard.local_rows(st.global_rows)
            assert abs(st.rows - st.global_rows / world) <= 1
    assert err < RTOL, err
    assert clipped >= 3  # clipping really acted
    full = pd.full_state_dict(net, dst=None)
    mine = ref.state_dict()
    assert full.keys() == mine.keys()
    for k, v in mine.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            err = max(err, _rel(full[k], v))
    full_opt = pd.full_optimizer_state_dict(opt, dst=None)
    ref_sd = ref_opt.state_dict()
    for idx, entry in ref_sd["optimizer"]["state"].items():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim():
                err = max(err, _rel(full_opt["optimizer"]["state"][idx][key], v))
    stash = ref_sd["hooks"][3]["state"]["grads"]
    assert stash, "the checkpoint must hold an Accumulate stash"
    for k, v in stash.items():
        got = full_opt["hooks"][3]["state"]["grads"][k]
        if isinstance(v, torch.Tensor):
            assert got.shape == v.shape
            err = max(err, _rel(got, v) if v.abs().max() > 0 else float(got.abs().max()))
    assert err < RTOL, err
    # Ordinary tensors are replicated bit for bit.
    flat = torch.cat([p.detach().reshape(-1) for n, p in net.named_parameters() if not n.endswith(".c")])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(every[0], f) for f in every)
    # pinet.sample and feature_kernel see the whole layer on every rank (collective calls).
    fins = [pinet.sample(m, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            for m in (ref, net)]  # fmt: skip
    fsd = [f.state_dict() for f in fins]
    err = max([err] + [_rel(fsd[1][k], v) for k, v in fsd[0].items()
                          if isinstance(v, torch.Tensor) and v.is_floating_point()])
    x = _batches(1, seed=14)[0][0]
    err = max(err, _rel(pinet.feature_kernel(net, x), pinet.feature_kernel(ref, x)))
    assert err < RTOL, err

    # Checkpoints: the whole layer on rank 0, each rank's own shard, and the one-process run's.
    ck = {"model": pd.full_state_dict(net), "opt": pd.full_optimizer_state_dict(opt), "sched": sched.state_dict()}
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, os.path.join(tmp, f"shard{rank}.pt"))
    if rank == 0:
        torch.save(ck, os.path.join(tmp, "full.pt"))
        torch.save({"model": ref.state_dict(), "opt": ref_opt.state_dict(), "sched": ref_sched.state_dict()},
                   os.path.join(tmp, "one.pt"))  # fmt: skip
    outs = [_step(net, opt, sched, x, y)[0] for x, y in _batches(MORE, seed=12)]
    if rank == 0:
        torch.save({"outs": outs, "err": err}, os.path.join(tmp, "cont.pt"))

    # A custom network shards too.
    ref2, net2 = TwoHeads(), pd.shard(TwoHeads())
    opts = [PiOptimizerWrapper(torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.5), m, hooks=[ClipGradNorm(1.0)])
            for m in (ref2, net2)]  # fmt: skip
    err2 = 0.0
    for x, y in _batches(6, seed=13):
        outs2 = []
        for m, o in zip((ref2, net2), opts):
            a, b = m(x)
            o.zero_grad()
            (F.cross_entropy(a, y) + F.mse_loss(b, x[:, :2])).backward()
            o.step()
            outs2.append((a.detach(), b.detach()))
        err2 = max(err2, _rel(outs2[1][0], outs2[0][0]), _rel(outs2[1][1], outs2[0][1]))
    assert net2.head_b.state.global_rows == ref2.head_b.state.rows == R + 6 * 5
    assert net2.trunk.state.rows == net2.trunk.state.shard.local_rows(R + 6 * 5)
    assert err2 < RTOL, err2
    _agreement_checks(rank, world, net, opt)


def _snapshot(net, opt=None):
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in net.state_dict().items()}
    rows = [(st.rows, st.global_rows) for st in pd.sharded_states(net).values()]
    return sd, rows, (copy.deepcopy(opt.state_dict()) if opt is not None else None)


def _same_snapshot(a, b) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y

    return same(a, b)


def _agreement_checks(rank, world, net, opt):
    """Ranks that disagree (batches, sample arguments, dst, checkpoints) raise on every rank, never
    abort in gloo, train on mixed data or load counts that differ between ranks; nothing changes."""
    x = _batches(1, seed=15)[0][0]  # (5, D_IN)
    before = _snapshot(net, opt)
    with torch.no_grad():
        # Batches of different sizes (an uneven last batch): gloo used to abort both processes.
        with pytest.raises(pd.ShardMismatchError, match="rank 1 got a batch of 4 rows, rank 0 a batch of 5 rows"):
            net(x[: 5 - rank])
        # The same shape, other data (the DistributedSampler habit): used to train silently.
        with pytest.raises(pd.ShardMismatchError, match="rank 1 got other data than rank 0"):
            net(x + rank)
        # A π-layer called on its own (outside the sharded model's forward) checks its input.
        g = torch.randn(3 + rank, R, dtype=torch.float64)
        with pytest.raises(pd.ShardMismatchError, match="called on its own.*rank 1 got a batch of 4 rows"):
            net.layers[1](g)
        assert torch.equal(net(x), net(x))  # agreeing ranks are fine afterwards
    # pinet.sample with per-rank generators: rank 0's Ω everywhere, bit for bit the one-process sample.
    fin = pinet.sample(net, 32, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
    whole = _mlp()  # the one-process model of net now
    pinet.load_state_dict(whole, pd.full_state_dict(net, dst=None))
    one = pinet.sample(whole, 32, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
    fsd, osd = fin.state_dict(), one.state_dict()
    omegas = [k for k in osd if k.endswith("omega")]
    assert omegas and all(torch.equal(fsd[k], osd[k]) for k in omegas)
    assert max(_rel(fsd[k], v) for k, v in osd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()) < RTOL
    with pytest.raises(pd.ShardMismatchError, match="rank 1 samples width 33, rank 0 width 32"):
        pinet.sample(net, 32 + rank)
    # The finite copy of a custom sharded net is not sharded: one rank alone may run it.
    fin2 = pinet.sample(pd.shard(TwoHeads()), 16, generator=torch.Generator().manual_seed(1))
    if rank == 0:
        fin2(x)
    dist.barrier()
    # dst: an int rank of the group, the same on every rank.
    for bad, err in ((True, TypeError), (1.0, TypeError), ("0", TypeError), (-1, ValueError), (world, ValueError)):
        with pytest.raises(err, match=r"dst must be .*rank"):
            pd.full_state_dict(net, dst=bad)
    with pytest.raises(pd.ShardMismatchError, match="different dst"):
        pd.full_optimizer_state_dict(opt, dst=rank)
    # A bad dst on one rank: that rank names it, the others are told, nobody waits in a gather.
    with pytest.raises(ValueError if rank == 0 else pd.ShardMismatchError, match=r"dst must be a rank|rank 0: an invalid dst"):
        pd.full_state_dict(net, dst=-1 if rank == 0 else 0)
    # Loading: every rank checks, then all load or all refuse.
    own = net.state_dict()
    key = next(k for k in own if k.endswith("._shard"))
    G = int(own[key][2])

    def refused(sd, match, exc=pd.ShardMismatchError):
        with pytest.raises(exc, match=match):
            pd.load_state_dict(net, sd)
        assert _same_snapshot(_snapshot(net, opt), before)

    refused(dict(own, **{key: own[key].double() + 0.4}), "must be an integer tensor")
    # Total one short on the rank where that still fits its rows: each rank alone would accept.
    shifted = torch.tensor([rank, world, G - 1 if rank == G % world else G])
    refused(dict(own, **{key: shifted}), rf"different row counts .*rank 0: {G - 1 if G % world == 0 else G}")
    refused(dict(own, **{key: torch.tensor([rank, world, G + 1])}), "rank|rows")  # one rank refuses: all do
    refused(None, "state_dict must be a mapping", TypeError)
    if rank == 1:
        refused([1, 2], "state_dict must be a mapping, got list", TypeError)
    else:
        refused(own, r"rank\(s\) \[1\] refused")
    pd.load_state_dict(net, own)  # and the real thing still loads
    # A whole-layer optimizer state with malformed parts: named, nothing changes.
    full_opt = pd.full_optimizer_state_dict(opt, dst=None)
    for bad, match in (({"optimizer": 5, "hooks": []}, "'optimizer' must be an optimizer state dict"),
                       (dict(full_opt, optimizer=dict(full_opt["optimizer"], state={0: 5})),
                        "optimizer state of parameter index 0 must be a dict"),
                       (dict(full_opt, hooks=None), "'hooks' must be a list")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pd.load_optimizer_state_dict(opt, bad)
        assert _same_snapshot(_snapshot(net, opt), before)
    # shard(): identical NaNs are the same model; a NaN on one rank only is another model.
    nan = _mlp()
    with torch.no_grad():
        nan.layers[0].A[0, 0] = float("nan")
    pd.shard(nan)
    odd = _mlp()
    with torch.no_grad():
        odd.layers[0].A[0, 0] = float("nan") if rank == 1 else 0.0
    with pytest.raises(pd.ShardMismatchError, match=r"rank 1 holds another model than rank 0 \(parameter layers.0.A: nan"):
        pd.shard(odd)


def _resume_worker(rank, world, tmp):
    cont = torch.load(os.path.join(tmp, "cont.pt"))
    for name in ("full.pt", "one.pt"):  # sharded-run checkpoint; one-process checkpoint
        ck = torch.load(os.path.join(tmp, name), mmap=True)
        net = pd.shard(_mlp())
        pd.load_state_dict(net, ck["model"])
        opt, sched = _optimizer(net)
        pd.load_optimizer_state_dict(opt, ck["opt"])
        sched.load_state_dict(ck["sched"])
        assert net.layers[1].state.rows == net.layers[1].state.shard.local_rows(net.layers[1].state.global_rows)
        outs = [_step(net, opt, sched, x, y)[0] for x, y in _batches(MORE, seed=12)]
        err = max(_rel(a, b) for a, b in zip(outs, cont["outs"]))
        assert err < RTOL, (name, err)
    # A shard of the 2-process run does not load into a 3-process run, whichever rank.
    shard = torch.load(os.path.join(tmp, f"shard{min(rank, 1)}.pt"))
    net = pd.shard(_mlp())
    before = net.layers[1].state.A.clone()
    with pytest.raises(pd.ShardMismatchError, match="2-process run, but this is rank"):
        pd.load_state_dict(net, shard["model"])
    with pytest.raises(pinet.StateDictError, match="pinet.distributed.load_state_dict"):
        net.load_state_dict(shard["model"])
    assert torch.equal(net.layers[1].state.A, before)  # nothing changed


def _own_shard_worker(rank, world, tmp):
    # Each rank's own shard loads back into the same rank of a run of the same size.
    cont = torch.load(os.path.join(tmp, "cont.pt"))
    ck = torch.load(os.path.join(tmp, f"shard{rank}.pt"))
    net = pd.shard(_mlp())
    pd.load_state_dict(net, ck["model"])
    opt, sched = _optimizer(net)
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(torch.load(os.path.join(tmp, "full.pt"))["sched"])
    outs = [_step(net, opt, sched, x, y)[0] for x, y in _batches(MORE, seed=12)]
    assert max(_rel(a, b) for a, b in zip(outs, cont["outs"])) < RTOL


def _failure_worker(rank, world, tmp, mode):
    net = pd.shard(_mlp())
    x = torch.randn(4, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # the same on every rank
    net(x)  # everyone alive: fine
    dist.barrier()
    if rank == 1:
        if mode == "dead":
            os._exit(0)  # dies without a word
        time.sleep(float(os.environ.get("PINET_TEST_STUCK", "7")))  # alive but not taking part
        return
    t0 = time.monotonic()
    try:
        net(x)
        outcome = "no error"
    except pd.ShardError as e:
        outcome = str(e)
    torch.save({"outcome": outcome, "elapsed": time.monotonic() - t0}, os.path.join(tmp, f"{mode}.pt"))
    os._exit(0)  # the group is broken: do not wait in destroy_process_group


# ------------------------------------------------------------------------------ tests
def test_sharded_training_checkpoints_and_resume(tmp_path, one_thread):
    """2 processes train 13 micro-steps (momentum, weight decay, clipping, Accumulate(2), StepLR)
    equal to one process; checkpoints then resume exactly in 1 and 3 processes and in 2 from
    each rank's own shard; a shard refuses other world sizes."""
    _spawn(_train_worker, 2, tmp_path)
    cont = torch.load(tmp_path / "cont.pt")
    assert cont["err"] < RTOL
    # One process: the sharded run's checkpoint is an ordinary state dict.
    ck = torch.load(tmp_path / "full.pt")
    net = _mlp()
    pinet.load_state_dict(net, ck["model"])
    opt, sched = _optimizer(net)
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    outs = [_step(net, opt, sched, x, y)[0] for x, y in _batches(MORE, seed=12)]
    assert max(_rel(a, b) for a, b in zip(outs, cont["outs"])) < RTOL
    # A shard in one process: refused by every loader, naming the way out.
    shard = torch.load(tmp_path / "shard0.pt")["model"]
    with pytest.raises(pinet.StateDictError, match=r"rank 0's shard of a 2-process run"):
        pinet.load_state_dict(_mlp(), shard)
    with pytest.raises(pinet.StateDictError, match=r"_shard"):
        pinet.InfPiMLP.from_state_dict(shard)
    with pytest.raises(pd.ShardMismatchError, match="this model is not sharded"):
        pd.load_state_dict(_mlp(), shard)
    _spawn(_resume_worker, 3, tmp_path)
    _spawn(_own_shard_worker, 2, tmp_path)


@pytest.mark.parametrize("mode", ["dead", "stuck"])
def test_dead_or_stuck_rank_raises_within_the_timeout(tmp_path, mode, one_thread):
    timeout = 4.0
    _spawn(_failure_worker, 2, tmp_path, mode, pg_timeout=timeout)
    res = torch.load(tmp_path / f"{mode}.pt")
    assert "failed on rank 0 of 2" in res["outcome"] and "timeout" in res["outcome"], res["outcome"]
    # gloo reports a closed connection at once; a rank that is alive but silent costs the timeout.
    assert res["elapsed"] < timeout + 5.0, res


def test_shard_refusals():
    with pytest.raises(RuntimeError, match="init_process_group"):
        pd.shard(_mlp())
    st = pinet.PiState(3, 2, dtype=torch.float64)
    B = torch.randn(4, 3, dtype=torch.float64)
    st.append(torch.randn(4, 2, dtype=torch.float64), B / B.norm(dim=1, keepdim=True))  # unit rows
    st.shard = pd.ShardInfo(None, 1, 3, 12)  # rank 1 of 3 holds 4 of 12 rows (1, 4, 7, 10)
    # New global rows 12..16: rank 1 keeps 13 and 16, i.e. new rows 1 and 4.
    keep = st.append(torch.arange(10.0).reshape(5, 2).double(), torch.zeros(5, 3, dtype=torch.float64))
    assert st.rows == 6 and st.global_rows == 17 and keep == slice(1, None, 3)
    assert st.A[4:, 0].tolist() == [2.0, 8.0]
    with pytest.raises(ValueError, match="global_rows"):
        st.truncate(4)
    with pytest.raises(ValueError, match="puts 4 rows on rank 1"):
        st.truncate(3, 12)
    st.truncate(4, 12)
    assert (st.rows, st.global_rows) == (4, 12)
    twin = copy.deepcopy(st)  # a copy is a shard of the same processes, with its own counts
    assert twin.shard is not st.shard and (twin.shard.rank, twin.shard.world_size, twin.global_rows) == (1, 3, 12)
    # Argument checks that need no process group (an unsharded model).
    for bad in (True, 1.0, "0"):
        with pytest.raises(TypeError, match="dst must be an int rank"):
            pd.full_state_dict(_mlp(), dst=bad)
    with pytest.raises(ValueError, match="dst must be a rank"):
        pd.full_state_dict(_mlp(), dst=-1)
    for bad in (None, [1, 2]):
        with pytest.raises(TypeError, match="pinet.distributed.load_state_dict: state_dict must be a mapping"):
            pd.load_state_dict(_mlp(), bad)
    # The batch fingerprint: count, batch size, elements, shapes and dtypes, sum, sum of squares.
    x = torch.randn(4, 3, dtype=torch.float64)
    fp, rtol = pd._batch_fingerprint([x])
    assert fp[:3].tolist() == [1.0, 4.0, 12.0] and math.isclose(fp[4], x.sum()) and rtol == 1e-9
    assert pd._batch_fingerprint([x.float()])[0][3] != fp[3]  # the dtype is in the shape code
    assert pd._close(float("nan"), float("nan"), 0.0) and not pd._close(float("nan"), 1.0, 1.0)


# ------------------------------------------------------------------------------ the training job
def test_training_job_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m experiments.train --pi-rank ...`` logs what one process logs
    (global row counts included); rank 0 alone prints and writes; its checkpoint resumes in one."""
    import csv
    import subprocess
    import sys

    from experiments import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ["--pi-rank", "12", "--epochs", "2", "--train-subset", "120", "--test-subset", "60", "--float64",
             "--momentum", "0.9", "--accum-steps", "3", "--no-progress", "--threads", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "experiments.train", *flags, "--save-dir", str(tmp_path / "two")]  # fmt: skip
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=SPAWN_DEADLINE)
    # The head of stderr holds the first failing rank's own message (an abort seen once under load
    # showed only torchrun's summary in the tail): keep both ends.
    err = res.stderr if len(res.stderr) <= 6000 else res.stderr[:3000] + "\n[...]\n" + res.stderr[-3000:]
    assert res.returncode == 0, err
    assert res.stdout.count("epoch  train_loss") == 1  # one table: rank 0's
    assert "π-rows sharded over 2 processes" in res.stdout
    train.main([*flags, "--save-dir", str(tmp_path / "one")])

    def log(name):
        with open(tmp_path / name / "log.csv") as f:
            return list(csv.DictReader(f))

    two, one = log("two"), log("one")
    assert [r["M_layer1"] for r in two] == [r["M_layer1"] for r in one] == ["108", "196"]  # r + the rows of the applied updates
    for a, b in zip(two, one):
        for k in ("train_loss", "test_loss", "grad_norm"):
            assert math.isclose(float(a[k]), float(b[k]), rel_tol=1e-10), (k, a[k], b[k])
    # The 2-process checkpoint is an ordinary one: it resumes in one process like the 1-process one.
    train.main(["--resume", str(tmp_path / "two" / "checkpoint.pt"), "--epochs", "3", "--no-progress"])
    train.main(["--resume", str(tmp_path / "one" / "checkpoint.pt"), "--epochs", "3", "--no-progress"])
    two, one = log("two"), log("one")
    assert math.isclose(float(two[-1]["train_loss"]), float(one[-1]["train_loss"]), rel_tol=1e-10)


def test_training_job_refuses_finite_nets_with_several_processes(monkeypatch):
    from experiments import common, train

    args = train.build_parser().parse_args(["--width", "256"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.CLIError, match="finite π-net has no π-rows to shard"):
        common._init_distributed(args, torch.device("cpu"))
