"""pinet: infinite-width π-networks (the feature-learning π-limit) and their finite samples.

Main entry points: :class:`InfPiMLP`, :class:`FinPiMLP`, the layers in :mod:`pinet.layers`, the
state modules :class:`PiState` / :class:`FinPiState`, the optimizer wrapper
:class:`pinet.optim.PiOptimizerWrapper` and the gradient hooks in :mod:`pinet.hooks`; the
π-product's kernel backends (a fused C++ kernel by default on x86-64 CPUs with AVX2 and g++,
torch's products elsewhere, an opt-in Triton kernel for CUDA) in :mod:`pinet.kernels`.
"""

from . import baselines, compat, distributed, functional, hooks, kernels, memory, native, optim
from .layers import FinPiInput, FinPiLayer, FinPiModule, InfPiInput, InfPiLayer, InfPiModule, pi_product
from .models import FinPiMLP, InfPiMLP
from .checkpoint import StateDictError, check_state_dict, load_state_dict
from .features import feature_kernel
from .rows import PiRows
from .sampling import MixedSpacesError, sample, trace
from .state import FinPiState, PiState
from . import testing  # noqa: E402  (needs the names above)
from . import meta  # noqa: E402  (MAML; needs layers and optim)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "kernels",
    "memory",
    "native",
    "compat",
    "baselines",
    "hooks",
    "optim",
    "distributed",
    "PiState",
    "PiRows",
    "FinPiState",
    "InfPiInput",
    "InfPiLayer",
    "FinPiInput",
    "FinPiLayer",
    "InfPiModule",
    "FinPiModule",
    "pi_product",
    "sample",
    "trace",
    "MixedSpacesError",
    "testing",
    "meta",
    "InfPiMLP",
    "FinPiMLP",
    "load_state_dict",
    "check_state_dict",
    "StateDictError",
    "feature_kernel",
]
