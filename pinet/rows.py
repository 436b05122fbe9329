"""``PiRows``: the π-gradient of one infinite layer as a value type.

A π-gradient is ``k`` rows ``A`` (k, r_out), ``B`` (k, r_in) with coefficient gradients ``coef``
(k,). Sums of π-gradients concatenate rows (the gradients of two losses are the union of their
rows), and scaling a gradient scales its coefficient gradient, so ``rows1 + rows2`` and
``0.5 * rows`` mean what they mean for ordinary gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from .kernels import rows_sqnorm

__all__ = ["PiRows"]


@dataclass(frozen=True, eq=False)
class PiRows:
    """A π-gradient: rows ``A`` (k, r_out), ``B`` (k, r_in) and coefficient gradient ``coef`` (k,).

    Appending the rows to a :class:`~pinet.state.PiState` and giving ``c`` the gradient ``coef``
    on the new rows is the projected gradient step of the infinite layer. Value semantics:

    * ``a + b`` concatenates rows (the sum of two π-gradients); ``sum([...])`` works too;
    * ``x * rows``, ``rows * x``, ``rows / x``, ``-rows`` scale ``coef`` (rows stay as captured);
    * ``A, B, coef = rows`` unpacks.

    Shapes are checked on construction: a ``PiRows`` is always internally consistent.
    """

    A: Tensor
    B: Tensor
    coef: Tensor

    def __post_init__(self) -> None:
        for name in ("A", "B", "coef"):
            v = getattr(self, name)
            if not isinstance(v, Tensor):
                raise TypeError(f"PiRows: {name} must be a tensor, got {type(v).__name__}")
        A, B, coef = self.A, self.B, self.coef
        if A.dim() != 2 or B.dim() != 2 or coef.dim() != 1:
            raise ValueError(
                f"PiRows: expected A (k, r_out), B (k, r_in), coef (k,), got A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}, coef {tuple(coef.shape)}"
            )
        if not A.shape[0] == B.shape[0] == coef.shape[0]:
            raise ValueError(
                f"PiRows: A, B and coef must have the same number of rows, got {A.shape[0]}, "
                f"{B.shape[0]}, {coef.shape[0]}"
            )

    @property
    def rows(self) -> int:
        """k, the number of rows."""
        return self.A.shape[0]

    @property
    def r_in(self) -> int:
        return self.B.shape[1]

    @property
    def r_out(self) -> int:
        return self.A.shape[1]

    def __iter__(self):
        return iter((self.A, self.B, self.coef))

    def cat(self, other: "PiRows") -> "PiRows":
        """Concatenate rows (the sum of two π-gradients)."""
        if not isinstance(other, PiRows):
            raise TypeError(f"PiRows.cat: expected PiRows, got {type(other).__name__}")
        if (other.r_in, other.r_out) != (self.r_in, self.r_out):
            raise ValueError(
                f"PiRows: cannot add rows of shape (r_in={other.r_in}, r_out={other.r_out}) to rows "
                f"of shape (r_in={self.r_in}, r_out={self.r_out})"
            )
        return PiRows(torch.cat([self.A, other.A]), torch.cat([self.B, other.B]), torch.cat([self.coef, other.coef]))

    def scale(self, factor: Tensor | float) -> "PiRows":
        """Multiply the update by ``factor`` (acts on ``coef`` only; rows stay as captured)."""
        return PiRows(self.A, self.B, self.coef * factor)

    def __add__(self, other):
        if isinstance(other, PiRows):
            return self.cat(other)
        if isinstance(other, Real) and other == 0:
            return self  # so that sum([rows, ...]) works
        return NotImplemented

    __radd__ = __add__

    def __mul__(self, factor):
        if isinstance(factor, PiRows):
            return NotImplemented
        if isinstance(factor, Tensor) and factor.numel() != 1:
            raise ValueError(f"PiRows: can only be scaled by a scalar, got a tensor of shape {tuple(factor.shape)}")
        if not isinstance(factor, (Real, Tensor)):
            return NotImplemented
        return self.scale(factor)

    __rmul__ = __mul__

    def __truediv__(self, factor):
        if not isinstance(factor, (Real, Tensor)):
            return NotImplemented
        return self.scale(1.0 / factor)

    def __neg__(self) -> "PiRows":
        return self.scale(-1.0)

    def to(self, *args, **kwargs) -> "PiRows":
        """``Tensor.to`` on all three parts."""
        return PiRows(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs), self.coef.to(*args, **kwargs))

    def sqnorm(self) -> Tensor:
        """``‖Δ‖²`` of this update (see :func:`pinet.functional.pi_rows_sqnorm`), on the selected
        kernel backend (:func:`pinet.kernels.rows_sqnorm`)."""
        return rows_sqnorm(self.A, self.B, self.coef)

    def __repr__(self) -> str:
        return f"PiRows(rows={self.rows}, r_in={self.r_in}, r_out={self.r_out}, dtype={self.A.dtype})"
