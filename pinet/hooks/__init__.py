"""Composable gradient transforms run by :class:`pinet.optim.PiOptimizerWrapper`, in order.

Default chain (always present, in this order): :class:`Concatenate` (infinite layers),
:class:`ProjectToR` (finite layers), :class:`GradNorm` (records the norm, rejects non-finite
gradients). User hooks (:class:`ClipGradNorm`, :class:`Accumulate`, your own :class:`GradHook`)
follow in the order given.
"""

from .accumulate import Accumulate
from .base import Chain, GradHook, Grads, HookContext, chain, check_grads
from .clip import ClipGradNorm
from .concatenate import Concatenate
from .norm import GradNorm, grad_sqnorms, total_norm
from .project import ProjectToR

__all__ = [
    "GradHook",
    "Grads",
    "HookContext",
    "Chain",
    "chain",
    "check_grads",
    "Concatenate",
    "ProjectToR",
    "GradNorm",
    "ClipGradNorm",
    "Accumulate",
    "grad_sqnorms",
    "total_norm",
    "default_hooks",
]


def default_hooks() -> list[GradHook]:
    """The hooks every wrapper runs first: ``[Concatenate(), ProjectToR(), GradNorm()]``."""
    return [Concatenate(), ProjectToR(), GradNorm()]
