"""π-state modules: what an infinite or finite π-layer owns besides ordinary weights.

:class:`PiState` holds one infinite layer's growing rows ``A`` (M, r_out), ``B`` (M, r) and the
coefficients ``c`` (M,), plus the gradient rows captured during ``backward`` that the optimizer
wrapper has not applied yet. :class:`FinPiState` holds a finite layer's ``Ω`` (n, r) and
``(ΩᵀΩ)⁻¹`` (r, r). Hooks and the optimizer wrapper find layers only through these modules.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import functional as F
from .memory import to_huge_pages, zeros_rows
from .rows import PiRows

__all__ = ["PiState", "PiRows", "FinPiState", "ShardInfo", "owned_parameters"]

_HALF = (torch.float16, torch.bfloat16)


def _check_dtype(owner: str, dtype, name: str = "dtype") -> None:
    """Refuse a ``dtype`` that is not a real floating-point ``torch.dtype`` (``None`` passes: default).

    Integer and complex states would fail deep inside torch (or only at the first forward), and a
    complex one would silently drop imaginary parts on every cast."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise ValueError(
            f"{owner}: {name} must be a real floating-point torch.dtype (torch.float16, torch.bfloat16, "
            f"torch.float32 or torch.float64), got {dtype!r}"
        )


def _check_tensor(key: str, v, problems: list[str]) -> bool:
    # One entry of a state dict: a real floating-point tensor, else a problem naming the key.
    if not isinstance(v, Tensor):
        problems.append(f"{key}: expected a tensor, got {type(v).__name__}")
        return False
    if not v.is_floating_point() or v.is_complex():
        problems.append(f"{key}: expected a real floating-point tensor, got dtype {v.dtype}")
        return False
    if v.layout != torch.strided or v.is_meta:
        problems.append(f"{key}: expected a dense tensor with data, got layout {v.layout}"
                        + (" on the meta device" if v.is_meta else ""))  # fmt: skip
        return False
    return True


def unit_row_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 the norm of a stored unit row ``B_i`` may be: 1e-4 for float32 and wider
    (rounding of a normalised row of a few thousand entries is ~1e-6; the floor also admits float32
    directions saved as float64), 4 eps for float16 (4e-3) and bfloat16 (3e-2): rounding each
    entry moves the norm by at most the unit roundoff eps / 2, and 4 eps leaves room for the
    normalisation's own rounding."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


_NORM_CHUNK = 1 << 16  # rows per block: the norms of a multi-GB half B without a float32 copy of it


def worst_unit_row(B: Tensor) -> tuple[int, float, float]:
    """``(row, norm, distance)`` of the row of ``B`` (k, r) whose norm is furthest from the nearer
    of 1 and 0 (a NaN norm is infinitely far), computed in float32 or wider, in blocks of rows.
    ``(0, 1.0, 0.0)`` for no rows."""
    acc = torch.promote_types(B.dtype, torch.float32)
    worst = (0, 1.0, 0.0)
    with torch.no_grad():
        for i in range(0, B.shape[0], _NORM_CHUNK):
            norms = torch.linalg.vector_norm(B[i : i + _NORM_CHUNK].to(acc), dim=1)
            dist = torch.minimum((norms - 1).abs(), norms).nan_to_num(nan=math.inf)
            j = int(dist.argmax())
            if float(dist[j]) > worst[2]:
                worst = (i + j, float(norms[j]), float(dist[j]))
    return worst


def _check_unit_rows(where: str, B: Tensor) -> None:
    # The π-formula's cosines are ḡ · B_i for unit rows (zero rows come from a zero input); any
    # other norm is clamped into [-1, 1] by J and silently gives another function.
    row, norm, dist = worst_unit_row(B)
    if not dist <= unit_row_tolerance(B.dtype):
        raise ValueError(
            f"{where} rows must be unit vectors (or zero): row {row} has norm {norm:.6g} "
            f"(tolerance {unit_row_tolerance(B.dtype):.1g} for {B.dtype}); nothing was appended"
        )


def _coef_dtype(dtype: torch.dtype) -> torch.dtype:
    # Coefficients accumulate -lr * (1 - lr*wd)^t products over the whole run: never below fp32.
    return torch.float32 if dtype in _HALF else dtype


class ShardInfo:
    """Where a sharded :class:`PiState`'s rows live (set by :func:`pinet.distributed.shard`).

    Global row ``m`` of the layer is held by rank ``m % world_size`` as its local row
    ``m // world_size``, so the local rows are the global ones ``rank, rank + P, ...`` in order.

    Attributes: ``group`` (the ``torch.distributed`` process group, ``None``: the default one),
    ``rank`` (this process's rank in ``group``), ``world_size`` (P), ``global_rows`` (rows of the
    whole layer, all ranks together).
    """

    def __init__(self, group, rank: int, world_size: int, global_rows: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardInfo: rank must be in [0, {world_size}), got {rank}")
        self.group, self.rank, self.world_size, self.global_rows = group, rank, world_size, global_rows
        # Set by pinet.distributed.load_state_dict while it loads one rank's own shard.
        self.loading_local: int | None = None

    def local_rows(self, global_rows: int) -> int:
        """How many of the first ``global_rows`` global rows this rank holds."""
        return max(0, -(-(global_rows - self.rank) // self.world_size))

    def share(self, k: int) -> slice:
        """The slice of ``k`` rows appended after the current ``global_rows`` that this rank keeps."""
        return slice((self.rank - self.global_rows) % self.world_size, None, self.world_size)

    def __deepcopy__(self, memo) -> "ShardInfo":
        # A copy of a sharded state is a shard of the same processes: share the group (process
        # group handles cannot be copied), copy the counts.
        new = ShardInfo(self.group, self.rank, self.world_size, self.global_rows)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        return f"ShardInfo(rank={self.rank}, world_size={self.world_size}, global_rows={self.global_rows})"


class PiState(nn.Module):
    """Growing state of one infinite π-layer.

    Attributes (read-only views, M rows):
        A: (M, r_out) storage dtype.  B: (M, r_in) unit rows, storage dtype.
        c: (M,) ``nn.Parameter``, float32 or wider (the only parameter; optimizers see this).

    Rows live in preallocated stores whose capacity grows geometrically (``growth``), so
    :meth:`append` costs amortised O(rows appended) and never copies the whole state per step.
    ``state_dict`` saves exactly M rows and loading resizes; ``.to()`` moves the stores.

    Gradient rows arrive from ``backward`` through :meth:`capture` and wait in ``pending`` until the
    optimizer wrapper applies them. Like ``.grad``, they are dropped by ``zero_grad``: they are only
    valid while ``c.grad`` is the tensor they were recorded with.
    """

    def __init__(
        self,
        r_in: int,
        r_out: int,
        *,
        capacity: int = 0,
        growth: float = 1.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        coef_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("r_in", r_in), ("r_out", r_out)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"PiState: {name} must be a positive int, got {v!r}")
        r_in, r_out = int(r_in), int(r_out)  # numpy integers pass the check
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth > 1.0 or growth == math.inf:
            raise ValueError(f"PiState: growth must be a finite number > 1, got {growth!r}")
        _check_dtype("PiState", dtype)
        _check_dtype("PiState", coef_dtype, "coef_dtype")
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 0:
            raise ValueError(f"PiState: capacity must be a non-negative int, got {capacity!r}")
        capacity = int(capacity)
        dtype = dtype or torch.get_default_dtype()
        coef_dtype = coef_dtype or _coef_dtype(dtype)
        if coef_dtype in _HALF:
            raise ValueError(f"PiState: coef_dtype must be float32 or wider, got {coef_dtype}")
        self.r_in, self.r_out, self.growth = r_in, r_out, float(growth)
        self._M = 0
        self._A = zeros_rows(capacity, r_out, device=device, dtype=dtype)
        self._B = zeros_rows(capacity, r_in, device=device, dtype=dtype)
        self._c = torch.zeros(capacity, device=device, dtype=coef_dtype)
        self.c = nn.Parameter(self._c[:0])
        self.pending: list[PiRows] = []
        self._pending_token: tuple[int, int] | None = None
        # Set by pinet.distributed.shard: this process holds global rows m with m % world == rank.
        self.shard: ShardInfo | None = None

    # ------------------------------------------------------------------ views
    @property
    def rows(self) -> int:
        """M, the number of rows held here (this process's share when :attr:`shard` is set)."""
        return self._M

    @property
    def global_rows(self) -> int:
        """Rows of the whole layer: :attr:`rows` summed over the processes of a sharded state
        (:mod:`pinet.distributed`), else :attr:`rows`."""
        return self._M if self.shard is None else self.shard.global_rows

    @property
    def capacity(self) -> int:
        """Rows that fit before the stores are reallocated."""
        return self._A.shape[0]

    @property
    def A(self) -> Tensor:
        """(M, r_out) view of the A rows."""
        return self._A[: self._M]

    @property
    def B(self) -> Tensor:
        """(M, r_in) view of the unit B rows."""
        return self._B[: self._M]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of ``A`` and ``B``."""
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        return self._A.device

    def extra_repr(self) -> str:
        return (
            f"r_in={self.r_in}, r_out={self.r_out}, rows={self._M}, capacity={self.capacity}, "
            f"dtype={self.dtype}, coef_dtype={self._c.dtype}"
        )

    # ------------------------------------------------------------------ growth
    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` rows (one copy of the used rows if the stores move)."""
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 0:
            raise ValueError(f"reserve: capacity must be a non-negative int, got {capacity!r}")
        if capacity <= self.capacity:
            return
        M = self._M
        A = zeros_rows(capacity, self.r_out, device=self._A.device, dtype=self._A.dtype)
        B = zeros_rows(capacity, self.r_in, device=self._B.device, dtype=self._B.dtype)
        c = self._c.new_zeros(capacity)
        A[:M] = self._A[:M]
        B[:M] = self._B[:M]
        c[:M] = self._c[:M]
        self._A, self._B, self._c = A, B, c
        self.c.data = self._c[:M]

    def append(
        self, A_new: Tensor, B_new: Tensor, c_new: Tensor | None = None, *, check_finite: bool = True
    ) -> slice:
        """Append ``k`` rows: A_new (k, r_out), B_new (k, r_in), c_new (k,) (default zeros).

        Returns the slice of the ``k`` rows that were stored here: all of them, or for a sharded
        state (:attr:`shard`; the same rows are appended on every process) this process's share,
        the new global rows ``m`` with ``m % world_size == rank``, so shards stay balanced within
        one batch. Non-tensors, complex or integer rows and (with ``check_finite``, the default)
        NaN or infinite values raise before anything is stored: one such row would make every
        later output of the layer NaN. The check is made on the values as they will be stored, so
        float32 rows beyond a float16 store's range (65504) raise too instead of becoming inf.
        ``check_finite=False`` skips the check (one device sync) for rows already known to be
        finite, as the optimizer wrapper's are (it checked their norm), except where the stores'
        dtypes have a smaller range than the rows' (float32 rows into float16 or bfloat16 rows,
        float64 into float32): that cast is always checked.
        """
        for name, t in (("A_new", A_new), ("B_new", B_new), ("c_new", c_new)):
            if t is None and name == "c_new":
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"append: {name} must be a tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"append: {name} must be a real floating-point tensor, got {t.dtype}")
            if t.is_meta and not self._A.is_meta:
                raise ValueError(f"append: {name} is on the meta device (it has no values to store)")
        k = A_new.shape[0] if A_new.dim() else 0
        if A_new.dim() != 2 or A_new.shape[1] != self.r_out:
            raise ValueError(f"append: A_new must be (k, {self.r_out}), got {tuple(A_new.shape)}")
        if B_new.shape != (k, self.r_in):
            raise ValueError(f"append: B_new must be ({k}, {self.r_in}), got {tuple(B_new.shape)}")
        if c_new is not None and c_new.shape != (k,):
            raise ValueError(f"append: c_new must be ({k},), got {tuple(c_new.shape)}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"append: check_finite must be a bool, got {check_finite!r}")
        given = {"A_new": A_new, "B_new": B_new, "c_new": c_new}
        store = {"A_new": self._A.dtype, "B_new": self._B.dtype, "c_new": self._c.dtype}
        # The rows as they will be stored (the same tensors where the dtype already matches):
        # checking those catches a cast that overflows (float32 rows past float16's 65504, float64
        # coefficients past float32's range), which a check of the given rows cannot see. Every
        # row is checked, not only a shard's share, so all processes of a sharded state agree.
        cast = {n: t if t is None or t.dtype == store[n] else t.to(store[n]) for n, t in given.items()}
        narrows = any(t is not None and torch.finfo(store[n]).max < torch.finfo(t.dtype).max for n, t in given.items())
        if (check_finite or narrows) and not self._A.is_meta:  # a meta store holds no values to check
            finite = torch.isfinite(cast["A_new"]).all() & torch.isfinite(cast["B_new"]).all()
            if c_new is not None:
                finite &= torch.isfinite(cast["c_new"]).all()
            if not bool(finite):
                bad, over = [], []
                for n, t in cast.items():
                    if t is None or bool(torch.isfinite(t).all()):
                        continue
                    (over if bool(torch.isfinite(given[n]).all()) else bad).append(n)
                if bad:
                    raise ValueError(f"append: {', '.join(bad)} must be finite (NaN or inf found); nothing was appended")
                raise ValueError(
                    f"append: {', '.join(over)} " + ("has" if len(over) == 1 else "have") + " values beyond the range "
                    f"of the {', '.join(str(store[n]) for n in over)} store (|x| <= "
                    f"{', '.join(f'{torch.finfo(store[n]).max:.6g}' for n in over)}), which would be stored as inf; "
                    "nothing was appended"
                )
        if check_finite and not self._A.is_meta:
            _check_unit_rows("append: B_new", cast["B_new"])
        A_new, B_new, c_new = cast["A_new"], cast["B_new"], cast["c_new"]
        keep = slice(None)
        shard = self.shard
        if shard is not None:
            keep = shard.share(k)
            A_new, B_new = A_new[keep], B_new[keep]
            c_new = None if c_new is None else c_new[keep]
            shard.global_rows += k
            k = A_new.shape[0]
        M = self._M
        if M + k > self.capacity:
            self.reserve(max(M + k, math.ceil(self.capacity * self.growth), 64))
        with torch.no_grad():
            self._A[M : M + k] = A_new
            self._B[M : M + k] = B_new
            self._c[M : M + k] = 0 if c_new is None else c_new
        self._M = M + k
        self.c.data = self._c[: self._M]
        return keep

    def truncate(self, rows: int, global_rows: int | None = None) -> None:
        """Drop rows beyond ``rows`` (capacity is kept). Used to undo a failed step.

        A sharded state also needs ``global_rows``, the layer's row count to go back to (local
        ``rows`` alone does not determine it)."""
        for name, v in (("rows", rows), ("global_rows", global_rows)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise TypeError(f"truncate: {name} must be an int, got {v!r}")
        if not 0 <= rows <= self._M:
            raise ValueError(f"truncate: rows must be in [0, {self._M}], got {rows}")
        if self.shard is not None:
            if global_rows is None:
                raise ValueError("truncate: a sharded PiState needs global_rows as well as its local rows")
            if self.shard.local_rows(global_rows) != rows:
                raise ValueError(
                    f"truncate: global_rows={global_rows} puts {self.shard.local_rows(global_rows)} rows on "
                    f"rank {self.shard.rank}, not rows={rows}"
                )
            self.shard.global_rows = int(global_rows)
        self._M = rows = int(rows)  # a numpy integer passes the check; keep the count a Python int
        self.c.data = self._c[:rows]

    # ------------------------------------------------------------------ gradient rows
    def capture(self, s: Tensor, gbar: Tensor, delta: Tensor) -> None:
        """Record the π-gradient of one backward pass: rows ``A = s ⊙ δ``, ``B = ḡ``.

        Shapes: s (b, 1), gbar (b, r_in), delta (b, r_out) = ∂loss/∂(layer output). Called from a
        tensor hook during ``backward``. Sets ``c.grad`` to zeros if it is ``None`` so that
        ``zero_grad`` (which resets ``c.grad``) also discards these rows.
        """
        c = self.c
        if c.grad is None:
            c.grad = torch.zeros_like(c)
            self.pending.clear()
        elif not self._pending_valid():
            self.pending.clear()
        delta = delta.detach()
        rows = PiRows(s * delta, gbar, torch.ones(delta.shape[0], dtype=c.dtype, device=c.device))
        self.pending.append(rows)
        self._pending_token = (id(c.grad), c.grad._version)

    def _pending_valid(self) -> bool:
        g = self.c.grad
        return g is not None and self._pending_token == (id(g), g._version)

    def pending_rows(self) -> PiRows | None:
        """All valid captured rows concatenated, or ``None`` (stale rows are dropped)."""
        if not self.pending or not self._pending_valid():
            self.pending.clear()
            return None
        rows = self.pending[0]
        for more in self.pending[1:]:
            rows = rows.cat(more)
        return rows

    def clear_pending(self) -> None:
        """Forget captured rows."""
        self.pending.clear()
        self._pending_token = None

    # ------------------------------------------------------------------ torch.nn.Module plumbing
    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - torch override
        # The stores are plain attributes (their unused capacity must not be saved), so .to(),
        # .cuda(), .half() ... are applied here, keeping `c` a view of its store and >= fp32.
        self._A = fn(self._A)
        self._B = fn(self._B)
        c = fn(self._c)
        if c.dtype in _HALF:
            c = c.float()
        self._c = c
        view = self._c[: self._M]
        grad = self.c.grad
        if torch._has_compatible_shallow_copy_type(self.c, view):
            self.c.data = view
        else:
            # Another tensor type (to or from the meta device): `.data =` refuses it, and, as
            # torch's own Module._apply does there, the parameter is replaced by a new one.
            self.c = nn.Parameter(view, requires_grad=self.c.requires_grad)
        if grad is not None:
            grad = fn(grad)
            self.c.grad = grad.to(c.dtype) if grad.dtype != c.dtype else grad
        self.clear_pending()
        return self

    @staticmethod
    def _compact(t: Tensor) -> Tensor:
        # torch.save writes whole storages: clone views that do not cover theirs.
        return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "A"] = self._compact(self.A)
        destination[prefix + "B"] = self._compact(self.B)
        c = self.c if keep_vars else self.c.detach()
        destination[prefix + "c"] = c if keep_vars else self._compact(c)
        if self.shard is not None:
            # One rank's rows only: marked, so it is never mistaken for the whole layer.
            sh = self.shard
            destination[prefix + "_shard"] = torch.tensor([sh.rank, sh.world_size, sh.global_rows])

    # Keys this module checks itself (see pinet.checkpoint): A and B are not registered tensors.
    _pinet_checked_keys = ("A", "B", "c")

    def _pinet_check_load(self, state_dict, prefix: str) -> list[str]:
        """Problems with this state's entries ``prefix + A/B/c`` of ``state_dict``; writes nothing.

        Missing entries are not problems here (the caller reports missing keys); if any of the three
        is missing the state is not loaded at all, so the others are not checked."""
        keys = {k: prefix + k for k in ("A", "B", "c")}
        if prefix + "_shard" in state_dict:
            return [_shard_problem(state_dict[prefix + "_shard"], prefix)]
        if not all(v in state_dict for v in keys.values()):
            return []
        problems: list[str] = []
        ok = [_check_tensor(keys[k], state_dict[keys[k]], problems) for k in ("A", "B", "c")]
        if not all(ok):
            return problems
        A, B, c = (state_dict[keys[k]] for k in ("A", "B", "c"))
        M = A.shape[0] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[1] != self.r_out:
            problems.append(f"{keys['A']}: expected shape (M, {self.r_out}), got {tuple(A.shape)}")
        if B.dim() != 2 or B.shape[1] != self.r_in or B.shape[0] != M:
            problems.append(
                f"{keys['B']}: expected shape ({M}, {self.r_in}) to match {keys['A']}, "
                f"got {tuple(B.shape)}"
            )
        if c.shape != (M,):
            problems.append(f"{keys['c']}: expected shape ({M},) to match {keys['A']}, got {tuple(c.shape)}")
        return problems

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        keys = {k: prefix + k for k in ("A", "B", "c")}
        for k in state_dict:
            if k.startswith(prefix) and k[len(prefix) :] not in keys and "." not in k[len(prefix) :]:
                unexpected_keys.append(k)
        present = [v for v in keys.values() if v in state_dict]
        missing_keys.extend(v for v in keys.values() if v not in state_dict)
        if prefix + "_shard" in state_dict:
            error_msgs.append(_shard_problem(state_dict[prefix + "_shard"], prefix))
            return
        if len(present) != 3:
            return
        problems = self._pinet_check_load(state_dict, prefix)
        if problems:
            error_msgs.extend(problems)
            return
        A, B, c = (state_dict[keys[k]] for k in ("A", "B", "c"))
        shard = self.shard
        global_rows = A.shape[0]
        if shard is not None:
            if shard.loading_local is not None:
                global_rows = shard.loading_local  # this rank's own saved shard
            else:
                # The whole layer (any number of processes saved it): keep this rank's share.
                keep = slice(shard.rank, None, shard.world_size)
                A, B, c = A[keep], B[keep], c[keep]
        # Build all three new stores before replacing any: a failure here leaves the state as it was.
        with torch.no_grad():
            new_A = to_huge_pages(A.detach().to(device=self._A.device, dtype=self._A.dtype).clone())
            new_B = to_huge_pages(B.detach().to(device=self._B.device, dtype=self._B.dtype).clone())
            new_c = c.detach().to(device=self._c.device, dtype=self._c.dtype).clone()
        self._A, self._B, self._c = new_A, new_B, new_c
        self._M = A.shape[0]
        if shard is not None:
            shard.global_rows = global_rows
        self.c.data = self._c
        self.c.grad = None
        self.clear_pending()


def _shard_problem(info, prefix: str) -> str:
    # A '_shard' entry: one rank's rows of a sharded state (pinet.distributed), not the whole layer.
    try:
        rank, world, total = (int(v) for v in info.tolist())
        what = f"rank {rank}'s shard of a {world}-process run ({total} rows in all)"
    except Exception:  # noqa: BLE001 - a malformed marker is still a shard marker
        what = "one rank's shard of a sharded run"
    return (
        f"{prefix}_shard: this state dict holds {what}, not the whole layer; load it with "
        "pinet.distributed.load_state_dict in the same rank of a run with as many processes, or save "
        "with pinet.distributed.full_state_dict to load into any number of processes"
    )


class FinPiState(nn.Module):
    """Projector state of one finite π-layer: ``Ω`` (n, r) and ``(ΩᵀΩ)⁻¹`` (r, r), as buffers.

    The gradients of the parameters of the module that owns this state are projected onto the
    column span of ``Ω`` by the :class:`pinet.hooks.ProjectToR` hook: those the owner declares with
    ``projected_parameters()`` (:class:`pinet.FinPiModule`), by default :func:`owned_parameters`.
    """

    def __init__(self, omega: Tensor) -> None:
        super().__init__()
        if not isinstance(omega, Tensor):
            raise TypeError(f"FinPiState: omega must be a tensor (n, r), got {type(omega).__name__}")
        _check_dtype("FinPiState", omega.dtype, "omega.dtype")
        if omega.dim() != 2:
            raise ValueError(f"FinPiState: omega must be (n, r), got {tuple(omega.shape)}")
        if omega.shape[0] < omega.shape[1]:
            # ΩᵀΩ is singular below n = r: its "inverse" would be garbage, not a projector.
            raise ValueError(
                f"FinPiState: width n={omega.shape[0]} must be at least the rank r={omega.shape[1]}"
            )
        # torch.linalg.inv has no half-precision kernels: invert in float32, store in omega's dtype.
        work = omega.float() if omega.dtype in _HALF else omega
        try:
            gram_inv = torch.linalg.inv(work.T @ work).to(omega.dtype)
        except torch.linalg.LinAlgError as e:
            raise ValueError(
                f"FinPiState: omega {tuple(omega.shape)} must have rank r={omega.shape[1]} (linearly independent "
                "columns); ΩᵀΩ is singular"
            ) from e
        self.register_buffer("omega", omega)
        self.register_buffer("gram_inv", gram_inv)

    @property
    def width(self) -> int:
        return self.omega.shape[0]

    @property
    def rank(self) -> int:
        return self.omega.shape[1]

    def project(self, X: Tensor) -> Tensor:
        """``Ω (G⁻¹ (Ωᵀ X))`` for X (n, ...)."""
        if X.shape[0] != self.width:
            raise ValueError(f"project: X must have {self.width} rows, got {tuple(X.shape)}")
        return F.project(X, self.omega.to(X.dtype), self.gram_inv.to(X.dtype))

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}"


def owned_parameters(module: nn.Module):
    """``(name, parameter)`` pairs a projector owner projects by default: every parameter of
    ``module`` and its submodules, except those under a submodule that owns a :class:`FinPiState`
    of its own (it projects them itself). Names are relative to ``module``."""
    nested = [
        n + "." for n, m in module.named_modules() if n and any(isinstance(c, FinPiState) for c in m.children())
    ]
    for n, p in module.named_parameters():
        if not any(n.startswith(prefix) for prefix in nested):
            yield n, p
