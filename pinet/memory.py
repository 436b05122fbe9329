"""Row stores on huge pages: how :class:`~pinet.state.PiState` allocates its ``A`` and ``B``.

A training step streams every row of every π-layer twice (forward and backward), hundreds of MB
at M = 20k. With 4 KiB pages that stream walks a new page every ten 400-float rows (a TLB miss,
and the hardware prefetchers stop at every page boundary); on Linux with transparent huge pages
in ``madvise`` mode (the common default) nothing gets 2 MiB pages unless it asks. So on Linux a
CPU store of at least :data:`MIN_BYTES` is, once filled, collapsed into 2 MiB pages
(``madvise(MADV_COLLAPSE)``, Linux 6.1+: synchronous, about 6 ms per 32 MB here, paid when a
store is allocated, which geometric growth makes rare). This is a hint to the kernel, not a
different memory layout: the tensor is an ordinary contiguous tensor either way, and where the
kernel declines (THP ``never``, an older kernel, no free huge pages, not Linux) the store keeps
small pages.

Why not ``MADV_HUGEPAGE`` before the first touch: faulting advised memory in 2 MiB pages cost
32 ms per 32 MB here (the kernel zeroes and compacts synchronously) against 6 ms for small pages
plus 6 ms for the collapse, and the advice would stay on the address range for whatever the C
allocator puts there after the store is freed.

Measured on the 2-core Zen 4 machine of docs/kernels.md (bare fused kernels of one hidden layer at
M = 20k, caches flushed, interleaved): forward 2-5% and backward 1-3% faster on huge pages.
:func:`huge_pages` says whether stores are collapsed; :func:`set_huge_pages` (or, for a block,
:func:`use_huge_pages`) or the environment variable ``PINET_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import numbers
import os
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "to_huge_pages", "zeros_rows", "huge_pages", "set_huge_pages", "use_huge_pages", "transparent_huge_pages_mode"]

#: Stores smaller than this (bytes) keep small pages: a 2 MiB page is the unit of a collapse.
MIN_BYTES = 4 << 20
_HUGE = 2 << 20
_MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1+; older kernels answer EINVAL (nothing happens)

_enabled = os.environ.get("PINET_HUGE_PAGES", "1").strip().lower() not in ("0", "false", "no", "off")
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                _madvise = False
    return _madvise


def transparent_huge_pages_mode() -> str | None:
    """The kernel's THP setting (``"always"``, ``"madvise"`` or ``"never"``), or ``None`` where
    it cannot be read (not Linux, no THP support)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def huge_pages() -> bool:
    """Whether new CPU row stores of at least :data:`MIN_BYTES` are collapsed into huge pages:
    not turned off by :func:`set_huge_pages` or ``PINET_HUGE_PAGES=0``, on Linux with
    ``madvise`` available and THP ``always`` or ``madvise``."""
    return bool(_enabled and _libc_madvise() and transparent_huge_pages_mode() in ("always", "madvise"))


def set_huge_pages(enabled: bool) -> None:
    """Turn huge pages for new row stores on or off (stores already allocated keep their pages)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_huge_pages: enabled must be a bool, got {enabled!r}")
    _enabled = enabled


@contextlib.contextmanager
def use_huge_pages(enabled: bool) -> Iterator[None]:
    """Within the block, new row stores ask for huge pages (``True``) or not (``False``); the
    previous setting is restored afterwards, also on an exception."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"use_huge_pages: enabled must be a bool, got {enabled!r}")
    old = _enabled
    _enabled = enabled
    try:
        yield
    finally:
        _enabled = old


def to_huge_pages(t: Tensor) -> Tensor:
    """Ask the kernel to back the whole 2 MiB pages inside ``t``'s memory by huge pages now, when
    :func:`huge_pages` is on and ``t`` is a CPU tensor of at least :data:`MIN_BYTES`; returns
    ``t``, whose values and layout do not change. Any shape and dtype."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < MIN_BYTES or not huge_pages():
        return t
    start = t.data_ptr()
    lo = (start + _HUGE - 1) & ~(_HUGE - 1)
    hi = (start + t.numel() * t.element_size()) & ~(_HUGE - 1)
    if hi > lo:
        # Advice only: EINVAL (kernel before 6.1), EAGAIN or ENOMEM (no huge page free) leave the
        # small pages, which is correct, only slower.
        _libc_madvise()(lo, hi - lo, _MADV_COLLAPSE)
    return t


def zeros_rows(rows: int, width: int, *, device=None, dtype=None) -> Tensor:
    """``torch.zeros(rows, width)``, on huge pages where :func:`to_huge_pages` can put it."""
    for name, v in (("rows", rows), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"zeros_rows: {name} must be a non-negative int, got {v!r}")
    return to_huge_pages(torch.zeros(rows, width, device=device, dtype=dtype))
