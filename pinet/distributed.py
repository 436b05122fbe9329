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
:func:`load_state_dict` into the same rank of a run with as many processes (anything else raises,
never a silent partial model).

Failures. Every collective runs under the process group's timeout (``init_process_group(timeout=)``):
a rank that died or stopped taking part makes the others raise :class:`ShardError` within that
timeout (gloo usually reports a closed connection at once), never hang.

Shapes: ``A`` (M, r_out), ``B`` (M, r_in), ``c`` (M,), M local unless said otherwise.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
    P = dist.get_world_size(group)
    size = torch.tensor([fp.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(P)]
    try:
        dist.all_gather(sizes, size, group=group)
        if len({int(s) for s in sizes}) != 1:
            raise ShardMismatchError(
                f"pinet.distributed.shard: the ranks hold models of different structure "
                f"({[int(s) for s in sizes]} tensors); build the same model on every rank"
            )
        fp = fp.to(device)
        all_fp = [torch.zeros_like(fp) for _ in range(P)]
        dist.all_gather(all_fp, fp, group=group)
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, ShardMismatchError):
            raise
        raise _fail("pinet.distributed.shard (checking that every rank holds the same model)", group, e) from e
    ref = all_fp[0].cpu()
    for p, other in enumerate(all_fp[1:], 1):
        other = other.cpu()
        # Sums may be taken with other thread counts on other ranks: compare to rounding, not bits.
        bad = ~torch.isclose(other, ref, rtol=1e-9, atol=1e-12)
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
    Captured rows and ``c.grad`` are dropped. Call it before building the optimizer (per-row
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
    return model


def _comm_device(group, device: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo CPU tensors (it also takes CUDA ones, staged through the host).
    return device if dist.get_backend(group) != "nccl" else torch.device("cuda", torch.cuda.current_device())


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


def gather_rows(state: PiState, dst: int | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(A, B, c)`` of the whole layer, rows in global order: (G, r_out), (G, r_in), (G,).

    Collective over the state's group: every rank must call it. ``dst=None``: on every rank;
    ``dst=k``: on rank ``k`` (of the group), ``None`` elsewhere. An unsharded state returns its own."""
    if state.shard is None:
        return state.A, state.B, state.c.detach()
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
    every rank. Peak memory on ``dst``: one whole layer's rows at a time, twice."""
    sd = model.state_dict()
    states = sharded_states(model)
    if not states:
        return sd
    me = dist.get_rank(next(iter(states.values())).shard.group)
    gathered: dict[int, tuple] = {}
    for prefix in _shard_prefixes(sd):
        st = model.get_submodule(prefix[:-1]) if prefix else model
        del sd[prefix + "_shard"]
        if id(st) not in gathered:
            gathered[id(st)] = gather_rows(st, dst)
        rows = gathered[id(st)]
        if rows is not None:
            for part, t in zip(("A", "B", "c"), rows):
                sd[prefix + part] = t
    return None if dst is not None and me != dst else sd


def load_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """Load into a (sharded) model, all or nothing (:func:`pinet.load_state_dict`), either

    * a whole-layer state dict (from :func:`full_state_dict` or any one-process run): each rank
      keeps its share of the rows, whatever the number of processes that saved it; or
    * this rank's own shard (a sharded model's ``model.state_dict()``): it must come from the same
      rank of a run with the same number of processes, else :class:`ShardMismatchError`.

    Not collective. Returns torch's ``(missing_keys, unexpected_keys)``."""
    where = "pinet.distributed.load_state_dict"
    prefixes = _shard_prefixes(state_dict)
    local: list[tuple[PiState, int]] = []
    for prefix in prefixes:
        key = prefix + "_shard"
        try:
            rank, world, total = (int(v) for v in state_dict[key].tolist())
        except Exception as e:  # noqa: BLE001
            raise ShardMismatchError(f"{where}: {key} must be [rank, world_size, global_rows], got {state_dict[key]!r}") from e
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
    sd = wrapper.state_dict()
    states = sharded_states(wrapper.model)
    if not states:
        return sd
    info = next(iter(states.values())).shard
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
    inner = dict(state_dict["optimizer"])
    inner["state"] = {k: dict(v) for k, v in inner.get("state", {}).items()}

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
    for h in state_dict["hooks"]:
        h = dict(h)
        hs = h.get("state")
        if isinstance(hs, dict) and isinstance(hs.get("grads"), dict):
            hs = dict(hs)
            hs["grads"] = {n: split(g, c_names[n], f"stashed gradient of {n}") if n in c_names else g
                           for n, g in hs["grads"].items()}  # fmt: skip
            h["state"] = hs
        hooks.append(h)
    wrapper.load_state_dict({"optimizer": inner, "hooks": hooks})
