"""What every kernel backend shares: the error raised when a backend cannot be used."""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """A π-product backend was asked for but cannot run here; the message names it and says why."""
