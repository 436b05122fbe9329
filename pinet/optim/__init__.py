"""Optimizers for π-nets: :class:`PiOptimizerWrapper` and the :func:`param_groups` helper."""

from .groups import param_groups
from .wrapper import LINEAR_OPTIMIZERS, PiOptimizerWrapper, StepStats, is_linear_optimizer

__all__ = ["PiOptimizerWrapper", "StepStats", "param_groups", "LINEAR_OPTIMIZERS", "is_linear_optimizer"]
