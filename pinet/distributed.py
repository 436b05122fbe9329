"""π-states sharded over processes with ``torch.distributed`` (spec, "Sharding the rows over processes").

A π-layer is a sum over its rows, so its rows can live on P processes: rank ``p`` holds the global
rows ``m`` with ``m % P == p`` of ``A``, ``B``, ``c`` (and of the optimizer's per-row state), and

    out = Σ_p (s · J(ḡ B_pᵀ) ⊙ c_p) A_p          one all-reduce of (b, r_out) per layer per forward
    ∂L/∂g = Σ_p (the same per-rank parts)         one all-reduce of (b, r_in) per layer per backward

:func:`shard` turns every :class:`~pinet.state.PiState` of a model (any pinet network) into this
rank's shard in place. Afterwards :func:`pinet.layers.pi_product` does the two all-reduces as the
autograd-correct tensor-parallel pair (:func:`copy_to_shards`: identity forward, all-reduce
backward on the input; :func:`reduce_from_shards`: all-reduce forward, identity backward on the
output), the captured gradient rows are the same on every rank, and each step's new rows are split
round-robin over the ranks (:meth:`PiState.append <pinet.state.PiState.append>`), so shards stay
balanced within one batch. Ordinary tensors (input layer, biases) stay replicated: every rank
computes the same gradients from the same all-reduced values, so they stay bit-identical.
:class:`~pinet.optim.PiOptimizerWrapper`, its hooks (clipping norms of the new rows need no
communication: the rows are replicated) and LR schedulers work unchanged.

Checkpoints. :func:`full_state_dict` / :func:`full_optimizer_state_dict` gather the whole layer
(rows in global order) onto one rank: an ordinary one-process state dict that loads into any
number of processes. A sharded model's ``load_state_dict`` (torch's or :func:`pinet.load_state_dict`)
of such a whole-layer state dict keeps this rank's share; :func:`load_optimizer_state_dict` does
the same for the optimizer. A sharded model's own ``model.state_dict()`` is this rank's shard,
marked by a ``<state>._shard`` entry ``[rank, world_size, global_rows]``: it loads only through
:func:`load_state_dict` (collective: every rank checks, then all load or all raise) into the same
rank of a run with as many processes (anything else raises, never a silent partial model).

Agreement. Every rank must run the same batches: each forward of the sharded model compares a
fingerprint of its inputs over the ranks first (one all_gather of 6 numbers) and raises
:class:`ShardMismatchError` on every rank if they differ. :func:`pinet.sample` of a sharded model
draws each ``Ω`` on rank 0 of the group and broadcasts it (:func:`_agree_draws`), so per-rank seeds
still give the whole layer's finite net, the one rank 0's generator gives in one process.

Failures. Every collective runs under the process group's timeout (``init_process_group(timeout=)``):
a rank that died or stopped taking part makes the others raise :class:`ShardError` within that
timeout (gloo usually reports a closed connection at once), never hang.

Shapes: ``A`` (M, r_out), ``B`` (M, r_in), ``c`` (M,), M local unless said otherwise.
"""

from __future__ import annotations

import math
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .checkpoint import check_state_dict as _check_state_dict
from .checkpoint import load_state_dict as _checked_load_state_dict
from .state import PiState, ShardInfo

__all__ = [
    "ShardError",
    "ShardMismatchError",
    "ShardInfo",
    "shard",
    "is_sharded",
    "sharded_states",
    "copy_to_shards",
    "reduce_from_shards",
    "gather_rows",
    "full_state_dict",
    "load_state_dict",
    "full_optimizer_state_dict",
    "load_optimizer_state_dict",
]


class ShardError(RuntimeError):
    """A collective of a sharded π-state failed: another process died, or did not take part within
    the process group's timeout."""


class ShardMismatchError(ShardError, ValueError):
    """Processes that should agree do not: a shard saved by another rank or world size, or ranks
    that hold different models when :func:`shard` is called."""


# ------------------------------------------------------------------------------ collectives
def _where(group) -> str:
    return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"


def _fail(what: str, group, e: BaseException) -> ShardError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ShardError(
        f"pinet.distributed: {what} failed on {_where(group)}: another process died or did not take part "
        f"within the process group's timeout (torch.distributed.init_process_group(timeout=...)); "
        f"{type(e).__name__}: {first}"
    )


def _all_reduce(t: Tensor, group, what: str) -> None:
    try:
        dist.all_reduce(t, group=group)
    except (RuntimeError, dist.DistError) as e:
        raise _fail(what, group, e) from e


class _CopyToShards(torch.autograd.Function):
    # Identity forward, all-reduce backward: every rank's rows contribute a part of ∂L/∂g.
    @staticmethod
    def forward(ctx, g: Tensor, group) -> Tensor:
        ctx.group = group
        if not _inside_checked_forward(group):
            # A π-layer called outside the forward of the model passed to shard(): its input was not
            # checked there, and the all-reduce of the output that follows has the batch's size.
            _check_same_batch((g,), group, "a sharded π-layer called on its own")
        return g.view_as(g)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        _all_reduce(grad, ctx.group, "the all-reduce of a π-layer's input gradient")
        return grad, None


class _ReduceFromShards(torch.autograd.Function):
    # All-reduce forward, identity backward: the reduced output is replicated, so its gradient is too.
    @staticmethod
    def forward(ctx, u: Tensor, group) -> Tensor:
        out = u.contiguous().clone()
        _all_reduce(out, group, "the all-reduce of a π-layer's output")
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def copy_to_shards(g: Tensor, group=None) -> Tensor:
    """``g`` (b, r_in) unchanged; in backward its gradient is all-reduced over ``group``."""
    return _CopyToShards.apply(g, group)


def reduce_from_shards(u: Tensor, group=None) -> Tensor:
    """The sum of ``u`` (b, r_out) over the ranks of ``group``; its gradient passes unchanged."""
    return _ReduceFromShards.apply(u, group)


# ------------------------------------------------------------------------------ same batches
# Every rank must run the same batches (the rows are split, not the data). A rank fed another
# batch would train silently on mixed data, and one fed another batch *size* would make gloo abort
# the process (size mismatch in the all-reduce, SIGABRT, no Python exception). So the forward of
# the model given to shard() first compares a fingerprint of its inputs across the ranks: 6
# numbers per rank (tensor count, first dimension, element count, a hash of the shapes and dtypes,
# sum, sum of squares, float64), one all_gather per forward of the whole net, not per layer (a
# π-layer called outside that forward checks its own input). Cost, measured 2026-12-04 on the
# shared 2-core box (gloo, 2 processes, one thread each, load ~1): the fingerprint 0.012 ms for a
# (8, 6) float64 batch, 0.11 ms for (256, 3072) float32 (summed in float32: no float64 copy); the
# whole check alone, in a loop, 0.4-0.9 ms, i.e. one gloo message like a π-layer's all-reduce. The
# forward of the test net (d=6, r=5, 2 π-layers, batch 8) took 4.0-4.8 ms with the check and
# 4.7-5.8 ms without (medians, interleaved blocks): no measurable increase, the all_gather lines the
# ranks up for the all-reduces that follow. On a GPU (NCCL) it adds one device-to-host copy.
_SHAPE_MOD = 2**47 - 115  # the shape hash stays an exact float64 integer
_state = threading.local()  # per thread: the sharded forwards running now, by group
# Whether a module carrying the hooks still holds sharded states, found at its first forward: a deep
# copy whose π-layers were swapped for finite ones (pinet.sample of a custom net) keeps the hooks
# but has nothing to agree on, and must not wait for the other ranks.
_has_shards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shape_code(values, code: int = 0) -> int:
    """Fold the ints ``values`` into the hash ``code`` (an exact float64 integer: ranks compare it)."""
    for d in values:
        code = (code * 1000003 + d + 1) % _SHAPE_MOD
    return code


def _open_forwards(group) -> list:
    table = getattr(_state, "open", None)
    if table is None:
        table = _state.open = {}
    return table.setdefault(id(group), [])


def _inside_checked_forward(group) -> bool:
    return bool(getattr(_state, "open", {}).get(id(group)))


_DTYPE_CODES = {dt: i + 1 for i, dt in enumerate((torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                   torch.bool, torch.complex64, torch.complex128))}  # fmt: skip


def _batch_fingerprint(tensors, device=None) -> tuple[Tensor, float]:
    """6 numbers of the inputs (float64, on ``device``) and the relative tolerance their sums are
    compared with. No host synchronisation: on a GPU the one sync is the gathered result's copy."""
    n = len(tensors)
    first = -1.0
    numel = 0
    code = 0
    rtol = 1e-9
    sums = []
    for i, t in enumerate(tensors):
        if i == 0 and t.dim():
            first = float(t.shape[0])
        numel += t.numel()
        code = _shape_code((_DTYPE_CODES.get(t.dtype, 0), t.dim(), *t.shape), code)
        if t.device.type == "meta" or t.numel() == 0:
            continue  # no values to compare
        v = t.detach()
        if v.is_complex():
            v = torch.view_as_real(v)
        v = v.reshape(-1)
        if v.dtype == torch.float32:
            rtol = 1e-4  # summed in float32 (no float64 copy of the batch): rounding near 1e-6
        elif v.dtype != torch.float64:
            v = v.to(torch.float64)  # half precision would overflow, integers have no dot
        sums.append(torch.stack([v.sum(), torch.dot(v, v)]).to(device=device, dtype=torch.float64))
    head = torch.tensor([n, first, numel, code], dtype=torch.float64, device=device)
    sq = torch.stack(sums).sum(0) if sums else torch.zeros(2, dtype=torch.float64, device=device)
    return torch.cat([head, sq]), rtol


def _all_gather_small(vec: Tensor, group, what: str) -> list[Tensor]:
    """``vec`` (a few numbers, the same length on every rank) of every rank of ``group``, on the CPU."""
    dev = _comm_device(group, vec.device)
    vec = vec.to(dev)
    parts = [torch.empty_like(vec) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, vec, group=group)
    except (RuntimeError, dist.DistError) as e:
        raise _fail(what, group, e) from e
    return [p.cpu() for p in parts]


def _close(a: float, b: float, tol: float) -> bool:
    # NaN sums (NaN in the batch) are equal when both are NaN; inf only equals inf.
    return a == b or (math.isnan(a) and math.isnan(b)) or (math.isfinite(a - b) and abs(a - b) <= tol)


def _check_same_batch(tensors, group, what: str) -> None:
    """Raise :class:`ShardMismatchError` on every rank unless every rank of ``group`` got the same
    input ``tensors`` (to rounding: the ranks may sum with other thread counts)."""
    dev = _comm_device(group, tensors[0].device if tensors and tensors[0].device.type != "meta" else torch.device("cpu"))
    fp, rtol = _batch_fingerprint(tensors, dev)
    fps = _all_gather_small(fp, group, f"checking that every rank runs the same batch ({what})")
    ref = fps[0].tolist()
    tail = ("; every process must run the same batches (sharding splits the π-rows, not the data: "
            "no DistributedSampler, the same seed for the data order on every rank)")  # fmt: skip
    for p, other in enumerate(fps[1:], 1):
        n, first, numel, code, s, q = other.tolist()
        if first != ref[1]:
            def rows(b):
                return "an input without a batch dimension" if b < 0 else f"a batch of {int(b)} rows"

            raise ShardMismatchError(f"pinet.distributed ({what}): rank {p} got {rows(first)}, rank 0 {rows(ref[1])}{tail}")
        if (n, numel, code) != (ref[0], ref[2], ref[3]):
            raise ShardMismatchError(
                f"pinet.distributed ({what}): rank {p} got inputs of other shapes or dtypes than rank 0 ({int(n)} vs "
                f"{int(ref[0])} tensors, {int(numel)} vs {int(ref[2])} elements){tail}"
            )
        # Equal shapes and dtypes here, so every rank has the same rtol. sqrt(numel * q) >= Σ|x|.
        scale = math.sqrt(numel * max(q, ref[5])) if math.isfinite(q) and math.isfinite(ref[5]) else 0.0
        if not (_close(s, ref[4], rtol * (scale + abs(ref[4]))) and _close(q, ref[5], rtol * max(q, ref[5]))):
            raise ShardMismatchError(
                f"pinet.distributed ({what}): rank {p} got other data than rank 0 in a batch of the same "
                f"shape (sum {s!r} vs {ref[4]!r}, sum of squares {q!r} vs {ref[5]!r}){tail}"
            )


class _BatchCheck:
    # Forward pre-hook (pre=True) and always-called forward hook of the model given to shard().
    # Shared, not copied, by deepcopy: it holds nothing but the group.
    def __init__(self, group, pre: bool) -> None:
        self.group, self.pre = group, pre

    def __deepcopy__(self, memo):
        return self

    def __call__(self, module, args, *rest):
        stack = _open_forwards(self.group)
        if not self.pre:
            if id(module) in stack:
                del stack[len(stack) - 1 - stack[::-1].index(id(module))]
            return None
        live = _has_shards.get(module)
        if live is None:
            live = _has_shards[module] = is_sharded(module)
        if not live:
            return None
        if id(module) in stack:
            # Its own forward is still open: a KeyboardInterrupt skipped the always-called hook.
            stack.clear()
        stack.append(id(module))  # before the check: the always-called hook pops it if it raises
        kwargs = rest[0] if rest else {}
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        _check_same_batch(leaves, self.group, f"the forward of {type(module).__name__}")
        return None


# ------------------------------------------------------------------------------ sharding
def sharded_states(model: nn.Module) -> dict[str, PiState]:
    """The sharded :class:`PiState` s of ``model`` by name (empty if it is not sharded)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PiState) and m.shard is not None}


def is_sharded(model: nn.Module) -> bool:
    """Whether any :class:`PiState` of ``model`` (or ``model`` itself) is sharded."""
    return bool(sharded_states(model))


def _fingerprint(model: nn.Module, states: dict[str, PiState]) -> tuple[list[str], Tensor]:
    # Row counts, sums and sums of squares of every tensor (float64): equal on every rank for
    # replicated models; a different seed or checkpoint changes them far beyond rounding.
    names, vals = [], []
    for name, st in states.items():
        names.append(f"{name} rows")
        vals.append(float(st.rows))
        for part, t in (("A", st.A), ("B", st.B), ("c", st.c.detach())):
            names += [f"{name}.{part}", f"{name}.{part} (squares)"]
            t = t.to(torch.float64)
            vals += [float(t.sum()), float(t.square().sum())]
    coefs = {id(st.c) for st in states.values()}
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if id(t) in coefs:
                continue  # π-coefficients: covered above
            t = t.detach().to(torch.float64)
            names += [f"{kind} {name}", f"{kind} {name} (squares)"]
            vals += [float(t.sum()), float(t.square().sum())]
    return names, torch.tensor(vals, dtype=torch.float64)


def _check_replicated(model: nn.Module, states: dict[str, PiState], group, device) -> None:
    names, fp = _fingerprint(model, states)
    what = "pinet.distributed.shard (checking that every rank holds the same model)"
    sizes = _all_gather_small(torch.tensor([fp.numel()], dtype=torch.int64, device=device), group, what)
    if len({int(s) for s in sizes}) != 1:
        raise ShardMismatchError(
            f"pinet.distributed.shard: the ranks hold models of different structure "
            f"({[int(s) for s in sizes]} tensors); build the same model on every rank"
        )
    all_fp = _all_gather_small(fp.to(device), group, what)
    ref = all_fp[0]
    for p, other in enumerate(all_fp[1:], 1):
        # Sums may be taken with other thread counts on other ranks: compare to rounding, not bits.
        # NaN sums (a model holding NaN) count as equal when both ranks have them: the same model.
        bad = ~torch.isclose(other, ref, rtol=1e-9, atol=1e-12, equal_nan=True)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ShardMismatchError(
                f"pinet.distributed.shard: rank {p} holds another model than rank 0 ({names[i]}: "
                f"{float(other[i])!r} vs {float(ref[i])!r}); initialise every rank with the same seed or "
                "load the same checkpoint on every rank before sharding"
            )


def shard(model: nn.Module, process_group=None) -> nn.Module:
    """Turn every :class:`PiState` of ``model`` into this rank's shard, in place; returns ``model``.

    ``torch.distributed`` must be initialised and every rank of ``process_group`` (``None``: the
    default group) must call this with the same model (same seed, or the same checkpoint loaded:
    checked, :class:`ShardMismatchError` otherwise). Rank ``p`` of P keeps the global rows
    ``m % P == p``; ``state.rows`` is then the local count, ``state.global_rows`` the layer's.
    Captured rows and ``c.grad`` are dropped. Afterwards every forward of ``model`` first checks
    that every rank got the same inputs (one all_gather of 6 numbers per rank; a rank fed another
    batch, or a batch of another size, makes every rank raise :class:`ShardMismatchError`).
    Call it before building the optimizer (per-row
    optimizer state of the whole layer does not fit the shard; load it with
    :func:`load_optimizer_state_dict`).
    """
    where = "pinet.distributed.shard"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets the environment)")  # fmt: skip
    states: dict[str, PiState] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, PiState) and id(m) not in seen:
            seen.add(id(m))
            states[name] = m
    if not states:
        raise ValueError(f"{where}: model ({type(model).__name__}) has no PiState: only infinite π-layers "
                         "have rows to shard")  # fmt: skip
    already = [n for n, st in states.items() if st.shard is not None]
    if already:
        raise ValueError(f"{where}: {already} are already sharded")
    rank, P = dist.get_rank(process_group), dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError(f"{where}: this process is not in process_group")
    device = _comm_device(process_group, next(iter(states.values())).device)
    _check_replicated(model, states, process_group, device)
    for st in states.values():
        st.shard = ShardInfo(process_group, rank, P, st.rows)
        errors: list[str] = []
        # The load path keeps this rank's share of a whole-layer state and shrinks the stores.
        st._load_from_state_dict({"A": st.A, "B": st.B, "c": st.c.detach()}, "", {}, True, [], [], errors)
        if errors:  # pragma: no cover - the state's own rows always fit it
            raise RuntimeError(f"{where}: {errors[0]}")
    # Every forward of the model first checks that every rank got the same batch (see _BatchCheck).
    model.register_forward_pre_hook(_BatchCheck(process_group, pre=True), with_kwargs=True)
    model.register_forward_hook(_BatchCheck(process_group, pre=False), always_call=True)
    return model


def _comm_device(group, device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU tensors (it also takes CUDA ones, staged through the host).
    return device if dist.get_backend(group) != "nccl" else torch.device("cuda", torch.cuda.current_device())


def _agree_draws(model: nn.Module, draws: dict[str, Tensor], width: int, dtype: torch.dtype, where: str) -> dict[str, Tensor]:
    """For :func:`pinet.sample`: the ``Ω`` draws (float64, (width, r) each) of rank 0 of the group of
    ``model``'s sharded states on every rank, unchanged where ``model`` is not sharded. Each rank's
    finite weight is all-reduced from its rows (``sample_pi_weight``), which is the whole layer's
    only if every rank used the same ``Ω``. First one all_gather of a few numbers (width, dtype,
    the spaces' ranks: a rank that differs would make gloo abort in the broadcast), then one
    broadcast of all the draws. Rank 0's draws are kept bit for bit."""
    states = sharded_states(model)
    if not states:
        return draws
    group = next(iter(states.values())).shard.group
    kinds = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    code = _shape_code(t.shape[1] for t in draws.values())
    head = torch.tensor([width, kinds.index(dtype) if dtype in kinds else -1, len(draws), code], dtype=torch.float64)
    heads = _all_gather_small(head, group, f"{where} (checking that every rank samples the same width)")
    def dtype_name(k: int) -> str:
        return str(kinds[k]) if k >= 0 else "another dtype"

    ref = [int(v) for v in heads[0]]
    for p, h in enumerate(heads):
        w, k, n, c = (int(v) for v in h)
        if [w, k, n, c] == ref:
            continue
        if w != ref[0]:
            what = f"width {w}, rank 0 width {ref[0]}"
        elif k != ref[1]:
            what = f"dtype {dtype_name(k)}, rank 0 {dtype_name(ref[1])}"
        else:
            what = "a net with other coordinate spaces (Ω shapes) than rank 0"
        raise ShardMismatchError(f"{where}: rank {p} samples {what}; every rank of a sharded net must call it "
                                 "with the same width and dtype")  # fmt: skip
    names = list(draws)
    flat = torch.cat([draws[n].reshape(-1) for n in names]) if names else torch.zeros(0, dtype=torch.float64)
    dev = _comm_device(group, flat.device)
    buf = flat.to(dev)
    try:
        dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    except (RuntimeError, dist.DistError) as e:
        raise _fail(f"{where} (broadcasting rank 0's Ω)", group, e) from e
    buf = buf.to(flat.device)
    out, at = {}, 0
    for n in names:
        k = draws[n].numel()
        out[n] = buf[at : at + k].view_as(draws[n])
        at += k
    return out


# ------------------------------------------------------------------------------ gathering
def _gather_rows_of(t: Tensor, info: ShardInfo, dst: int | None, what: str) -> Tensor | None:
    """Whole-layer tensor (global_rows, ...) in global row order from each rank's local rows ``t``."""
    P, G, group = info.world_size, info.global_rows, info.group
    n = -(-G // P)  # rows of the largest shard
    local = t.detach()
    dev = _comm_device(group, local.device)
    pad = local.new_zeros((n,) + tuple(local.shape[1:]), device=dev)
    pad[: local.shape[0]] = local.to(dev)
    try:
        if dst is None:
            parts = [torch.empty_like(pad) for _ in range(P)]
            dist.all_gather(parts, pad, group=group)
        else:
            me = dist.get_rank(group)
            parts = [torch.empty_like(pad) for _ in range(P)] if me == dst else None
            dist.gather(pad, parts, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
            if me != dst:
                return None
    except (RuntimeError, dist.DistError) as e:
        raise _fail(f"gathering {what}", group, e) from e
    # Global row m = i * P + rank is local row i of rank `rank`: interleave.
    out = torch.stack(parts, dim=1).reshape((n * P,) + tuple(local.shape[1:]))[:G]
    return out.to(t.device)


def _local_dst(dst, world: int | None, where: str):
    """``dst`` as an int rank (``None`` stays), or the TypeError/ValueError to raise."""
    if dst is None:
        return None
    try:
        k = None if isinstance(dst, bool) else operator.index(dst)  # numpy ints are ranks; bools are not
    except TypeError:
        k = None
    span = f"[0, {world})" if world is not None else "[0, world_size)"
    if k is None:
        return TypeError(f"{where}: dst must be an int rank in {span} or None (every rank), got {dst!r}")
    if k < 0 or (world is not None and k >= world):
        return ValueError(f"{where}: dst must be a rank in {span} of the process group or None, got {dst!r}")
    return k


def _agree_dst(dst, group, where: str) -> int | None:
    """Check ``dst`` on every rank of ``group`` (one all_gather of one number): every rank raises,
    the one with a bad ``dst`` its TypeError/ValueError, the others ShardMismatchError, before any
    gather whose root would differ between the ranks (gloo would hang or abort there)."""
    world = dist.get_world_size(group)
    k = _local_dst(dst, world, where)
    code = -2 if isinstance(k, Exception) else (-1 if k is None else k)
    codes = [int(c) for c in _all_gather_small(torch.tensor([code], dtype=torch.int64), group, f"{where} (dst)")]
    if isinstance(k, Exception):
        raise k
    if len(set(codes)) > 1:
        shown = ", ".join(f"rank {p}: " + ("an invalid dst" if c == -2 else "None" if c == -1 else str(c))
                          for p, c in enumerate(codes))  # fmt: skip
        raise ShardMismatchError(f"{where}: the ranks passed different dst ({shown}); every rank must pass the same dst")
    return k


def gather_rows(state: PiState, dst: int | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(A, B, c)`` of the whole layer, rows in global order: (G, r_out), (G, r_in), (G,).

    Collective over the state's group: every rank must call it. ``dst=None``: on every rank;
    ``dst=k``: on rank ``k`` (of the group), ``None`` elsewhere; every rank must pass the same
    ``dst`` (checked). An unsharded state returns its own."""
    where = "pinet.distributed.gather_rows"
    if not isinstance(state, PiState):
        raise TypeError(f"{where}: state must be a PiState, got {type(state).__name__}")
    if state.shard is None:
        k = _local_dst(dst, None, where)
        if isinstance(k, Exception):
            raise k
        return state.A, state.B, state.c.detach()
    return _gather_state(state, _agree_dst(dst, state.shard.group, where))


def _gather_state(state: PiState, dst: int | None):
    out = [_gather_rows_of(t, state.shard, dst, f"rows {part}") for part, t in
           (("A", state.A), ("B", state.B), ("c", state.c.detach()))]  # fmt: skip
    return None if out[0] is None else tuple(out)


def _shard_prefixes(sd) -> list[str]:
    return [k[: -len("_shard")] for k in sd if k.endswith("._shard") or k == "_shard"]


def full_state_dict(model: nn.Module, dst: int | None = 0) -> dict | None:
    """``model.state_dict()`` with every sharded π-state's rows gathered, in global row order.

    The result is a one-process state dict (no ``_shard`` entries): it loads into an unsharded model
    and, keeping each rank's share, into a model sharded over any number of processes. Collective:
    every rank must call it. ``dst``: the rank that receives it (others get ``None``); ``None``:
    every rank; an int rank of the process group (checked on every rank: all pass the same).
    Peak memory on ``dst``: one whole layer's rows at a time, twice."""
    where = "pinet.distributed.full_state_dict"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    states = sharded_states(model)
    if not states:
        k = _local_dst(dst, None, where)
        if isinstance(k, Exception):
            raise k
        return model.state_dict()
    group = next(iter(states.values())).shard.group
    dst = _agree_dst(dst, group, where)
    sd = model.state_dict()
    me = dist.get_rank(group)
    gathered: dict[int, tuple] = {}
    for prefix in _shard_prefixes(sd):
        st = model.get_submodule(prefix[:-1]) if prefix else model
        del sd[prefix + "_shard"]
        if id(st) not in gathered:
            gathered[id(st)] = _gather_state(st, dst)
        rows = gathered[id(st)]
        if rows is not None:
            for part, t in zip(("A", "B", "c"), rows):
                sd[prefix + part] = t
    return None if dst is not None and me != dst else sd


def _shard_marker(v, key: str, where: str) -> tuple[int, int, int]:
    # [rank, world_size, global_rows] as saved by PiState: an integer tensor of 3 entries, nothing else
    # (a float marker would be truncated, a bool one read as 0/1).
    ok = isinstance(v, Tensor) and v.shape == (3,) and v.device.type != "meta" and not (
        v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool)  # fmt: skip
    if ok:
        rank, world, total = (int(x) for x in v.tolist())
        ok = world >= 1 and 0 <= rank < world and total >= 0
    if not ok:
        raise ShardMismatchError(
            f"{where}: {key} must be an integer tensor [rank, world_size, global_rows] with 0 <= rank < "
            f"world_size and global_rows >= 0 (what a sharded model's state_dict() saves), got {v!r}"
        )
    return rank, world, total


def _plan_load(model: nn.Module, state_dict, strict: bool, where: str):
    """Check everything :func:`load_state_dict` will load, writing nothing: returns the plain state
    dict (markers removed), the own shards ``[(state, global_rows)]`` and, for every sharded state of
    ``model`` in order, its row count of the whole layer after the load."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{where}: state_dict must be a mapping, got {type(state_dict).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"{where}: strict must be a bool, got {strict!r}")
    local: list[tuple[PiState, int]] = []
    for prefix in _shard_prefixes(state_dict):
        key = prefix + "_shard"
        rank, world, total = _shard_marker(state_dict[key], key, where)
        try:
            st = model.get_submodule(prefix[:-1]) if prefix else model
        except AttributeError:
            st = None
        if not isinstance(st, PiState):
            raise ShardMismatchError(f"{where}: {key}: the model has no PiState {prefix[:-1]!r}")
        if st.shard is None:
            raise ShardMismatchError(
                f"{where}: {key}: the state dict holds rank {rank}'s shard of a {world}-process run ({total} "
                "rows in all) but this model is not sharded; load it into rank "
                f"{rank} of a {world}-process run, or save with pinet.distributed.full_state_dict"
            )
        if (rank, world) != (st.shard.rank, st.shard.world_size):
            raise ShardMismatchError(
                f"{where}: {key}: the state dict holds rank {rank}'s shard of a {world}-process run, but this "
                f"is rank {st.shard.rank} of {st.shard.world_size} processes; a shard loads only into the "
                "same rank of a run with as many processes (save with pinet.distributed.full_state_dict to "
                "load into any number of processes)"
            )
        n = state_dict.get(prefix + "A")
        if isinstance(n, Tensor) and n.dim() == 2 and n.shape[0] != st.shard.local_rows(total):
            raise ShardMismatchError(f"{where}: {prefix}A has {n.shape[0]} rows, rank {rank} of {world} holds "
                                     f"{st.shard.local_rows(total)} of {total}")  # fmt: skip
        local.append((st, total))
    plain = OrderedDict((k, v) for k, v in state_dict.items() if not (k.endswith("._shard") or k == "_shard"))
    if hasattr(state_dict, "_metadata"):
        plain._metadata = state_dict._metadata  # torch's per-module versions
    _check_state_dict(model, plain, strict=strict)  # raises StateDictError; writes nothing
    own = {id(st): total for st, total in local}
    totals = []
    for name, st in sharded_states(model).items():
        prefix = name + "." if name else ""
        A = plain.get(prefix + "A")
        if id(st) in own:
            totals.append(own[id(st)])
        elif all(prefix + k in plain for k in ("A", "B", "c")):
            totals.append(A.shape[0])  # a whole layer: checked above
        else:
            totals.append(st.global_rows)  # strict=False, not in the state dict: kept
    return plain, local, totals


def load_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """Load into a (sharded) model, all or nothing (:func:`pinet.load_state_dict`), either

    * a whole-layer state dict (from :func:`full_state_dict` or any one-process run): each rank
      keeps its share of the rows, whatever the number of processes that saved it; or
    * this rank's own shard (a sharded model's ``model.state_dict()``): it must come from the same
      rank of a run with the same number of processes, else :class:`ShardMismatchError`.

    Collective for a sharded model (every rank of its group calls it; two all_gathers of a few
    numbers): every rank checks its state dict, then all load or all raise, so the ranks never
    disagree on a layer's row count (a rank whose state dict is refused raises its own error, the
    others :class:`ShardMismatchError`; two ranks' shards of different runs are refused on every
    rank). Not collective for an unsharded model. Returns torch's ``(missing_keys, unexpected_keys)``."""
    where = "pinet.distributed.load_state_dict"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    states = sharded_states(model)
    if not states:
        plain, local, _ = _plan_load(model, state_dict, strict, where)
    else:
        group = next(iter(states.values())).shard.group
        try:
            plain, local, totals = _plan_load(model, state_dict, strict, where)
            err = None
        except Exception as e:  # noqa: BLE001 - raised below, after the other ranks have heard of it
            err, totals = e, []
        what = f"{where} (checking that every rank loads the same model)"
        heads = _all_gather_small(torch.tensor([err is None, len(states)], dtype=torch.int64), group, what)
        if err is not None:
            raise err
        refused = [p for p, h in enumerate(heads) if not int(h[0])]
        if refused:
            raise ShardMismatchError(f"{where}: rank(s) {refused} refused their state dict (the error is raised "
                                     "there); nothing was loaded on any rank")  # fmt: skip
        if len({int(h[1]) for h in heads}) > 1:
            raise ShardMismatchError(f"{where}: the ranks hold models with different numbers of sharded states "
                                     f"({[int(h[1]) for h in heads]}); nothing was loaded")  # fmt: skip
        every = _all_gather_small(torch.tensor(totals, dtype=torch.int64), group, what)
        for i, name in enumerate(states):
            counts = [int(t[i]) for t in every]
            if len(set(counts)) > 1:
                raise ShardMismatchError(
                    f"{where}: the ranks' state dicts give {name or 'the state'} different row counts of the "
                    f"whole layer ({', '.join(f'rank {p}: {c}' for p, c in enumerate(counts))}): shards of "
                    "different runs or steps; nothing was loaded on any rank"
                )
    for st, total in local:
        st.shard.loading_local = total
    try:
        return _checked_load_state_dict(model, plain, strict=strict)
    finally:
        for st, _ in local:
            st.shard.loading_local = None


# ------------------------------------------------------------------------------ optimizer state
def _per_row_entries(wrapper, model_states: dict[str, PiState]):
    """``(state_key, param_name, PiState)`` for every inner-optimizer state entry of a sharded ``c``."""
    by_id = {id(st.c): (name, st) for name, st in model_states.items()}
    index = 0
    out = []
    for group in wrapper.optimizer.param_groups:
        for p in group["params"]:
            if id(p) in by_id:
                name, st = by_id[id(p)]
                out.append((index, (name + ".c") if name else "c", st))
            index += 1
    return out


def full_optimizer_state_dict(wrapper, dst: int | None = 0) -> dict | None:
    """``wrapper.state_dict()`` (a :class:`~pinet.optim.PiOptimizerWrapper`) with the per-row
    state of every sharded ``c`` (momentum buffers; gradients stashed by
    :class:`~pinet.hooks.Accumulate`) gathered in global row order: the optimizer state of the
    one-process run, loadable anywhere with :func:`load_optimizer_state_dict`. Collective; ``dst``
    as in :func:`full_state_dict`."""
    where = "pinet.distributed.full_optimizer_state_dict"
    states = sharded_states(wrapper.model)
    if not states:
        k = _local_dst(dst, None, where)
        if isinstance(k, Exception):
            raise k
        return wrapper.state_dict()
    info = next(iter(states.values())).shard
    dst = _agree_dst(dst, info.group, where)
    sd = wrapper.state_dict()
    me = dist.get_rank(info.group)
    inner = sd["optimizer"]["state"]
    for idx, pname, st in _per_row_entries(wrapper, states):
        entry = inner.get(idx)
        if not entry:
            continue
        for key in sorted(entry):
            v = entry[key]
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == st.rows:
                entry[key] = _gather_rows_of(v, st.shard, dst, f"optimizer state {key!r} of {pname}")
    c_names = {(n + ".c") if n else "c": st for n, st in states.items()}
    for h in sd["hooks"]:
        grads = h["state"].get("grads") if isinstance(h.get("state"), dict) else None
        if not isinstance(grads, dict):
            continue
        for name in sorted(grads):
            st = c_names.get(name)
            v = grads[name]
            if st is not None and isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] == st.rows:
                grads[name] = _gather_rows_of(v, st.shard, dst, f"{h['type']}'s stashed gradient of {name}")
    if dst is not None and me != dst:
        return None
    return sd


def load_optimizer_state_dict(wrapper, state_dict: dict) -> None:
    """Load a one-process (whole-layer) optimizer state (:func:`full_optimizer_state_dict`, or
    ``wrapper.state_dict()`` of an unsharded run) into ``wrapper`` over a sharded model: each
    rank keeps its share of the per-row state. Load the model first (its ``global_rows`` must
    match). Not collective; nothing changes if it raises."""
    where = "pinet.distributed.load_optimizer_state_dict"
    states = sharded_states(wrapper.model)
    if not states:
        wrapper.load_state_dict(state_dict)
        return
    if not isinstance(state_dict, dict) or "optimizer" not in state_dict or "hooks" not in state_dict:
        raise ValueError(f"{where}: expected a dict with keys 'optimizer' and 'hooks'")
    inner = state_dict["optimizer"]
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict) or "param_groups" not in inner:
        raise ValueError(
            f"{where}: 'optimizer' must be an optimizer state dict (a dict with keys 'state', a dict, and "
            f"'param_groups'), got {type(inner).__name__}"
        )
    bad = [k for k, v in inner["state"].items() if not isinstance(v, dict)]
    if bad:
        v = inner["state"][bad[0]]
        raise ValueError(f"{where}: optimizer state of parameter index {bad[0]!r} must be a dict, got {type(v).__name__}")
    hooks_in = state_dict["hooks"]
    if not isinstance(hooks_in, list) or not all(isinstance(h, dict) for h in hooks_in):
        raise ValueError(
            f"{where}: 'hooks' must be a list of dicts with keys 'type', 'config' and 'state' (what "
            f"state_dict() returns), got {type(hooks_in).__name__}"
        )
    inner = dict(inner)
    inner["state"] = {k: dict(v) for k, v in inner["state"].items()}

    def split(v, st: PiState, what: str):
        if not isinstance(v, Tensor) or v.dim() < 1:
            return v
        if v.shape[0] != st.global_rows:
            raise ShardMismatchError(
                f"{where}: {what} has {v.shape[0]} rows but the layer has {st.global_rows}: load the model's "
                "state from the same checkpoint first (a one-process/whole-layer optimizer state is expected)"
            )
        return v[st.shard.rank :: st.shard.world_size].clone()

    for idx, pname, st in _per_row_entries(wrapper, states):
        entry = inner["state"].get(idx)
        if entry:
            for key in list(entry):
                entry[key] = split(entry[key], st, f"optimizer state {key!r} of {pname}")
    c_names = {(n + ".c") if n else "c": st for n, st in states.items()}
    hooks = []
    for h in hooks_in:
        h = dict(h)
        hs = h.get("state")
        if isinstance(hs, dict) and isinstance(hs.get("grads"), dict):
            hs = dict(hs)
            hs["grads"] = {n: split(g, c_names[n], f"stashed gradient of {n}") if n in c_names else g
                           for n, g in hs["grads"].items()}  # fmt: skip
            h["state"] = hs
        hooks.append(h)
    wrapper.load_state_dict({"optimizer": inner, "hooks": hooks})
