"""pinet's AVX2 reduce kernel, the ``"native"`` backend of :mod:`pinet.kernels` (older name).

The kernel itself lives in :mod:`pinet.kernels.native`; this module keeps the on/off switch the
training scripts' ``--native`` flag uses. ``enable()`` is ``pinet.kernels.set_backend("native")``
(raises :class:`NativeUnavailable` saying what is missing, e.g. no g++ or no AVX2, and changes
nothing then); ``enable(False)`` / ``disable()`` returns a ``"native"`` setting to ``"auto"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import kernels
from .kernels.native import PRELUDE, NativeUnavailable, _check, _compile, _load, reduce_into  # noqa: F401

__all__ = ["NativeUnavailable", "disable", "enable", "enabled", "reduce_into", "use"]


def enable(on: bool = True) -> None:
    """Select the ``"native"`` backend (``on``), or leave it for ``"auto"`` (``on=False``; any
    other forced backend is left as it is). Raises :class:`NativeUnavailable` if it cannot run."""
    _check_on("enable", on)
    if on:
        kernels.set_backend("native")
    elif kernels.setting() == "native":
        kernels.set_backend("auto")


def _check_on(where: str, on) -> None:
    # A truthy string such as "no" or "false" would otherwise switch the native backend on.
    if not isinstance(on, bool):
        raise TypeError(f"pinet.native.{where}: on must be a bool, got {on!r}")


def disable() -> None:
    """Same as ``enable(False)``."""
    enable(False)


def enabled() -> bool:
    """Whether the ``"native"`` backend is selected."""
    return kernels.setting() == "native"


@contextlib.contextmanager
def use(on: bool = True) -> Iterator[None]:
    """``with pinet.native.use(): ...`` selects the native backend inside the block (``on=False``:
    not native) and restores the previous backend setting after it."""
    _check_on("use", on)
    before = kernels.setting()
    enable(on)
    try:
        yield
    finally:
        kernels.set_backend(before)
