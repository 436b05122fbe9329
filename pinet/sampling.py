"""Finite counterparts of any network built from pinet's infinite layers: :func:`sample`.

Every infinite layer writes a *coordinate space* (per sample ``g ∈ R^r``, standing for the width-n
pre-activation ``h ≈ n^-½ Ω g``). The finite counterpart draws one ``Ω`` (n, r) per coordinate
space, swaps every infinite layer for its finite layer (:meth:`pinet.InfPiModule.finite`) and
keeps the network's own ``forward`` code. Which space feeds which layer is read off one forward
pass (:func:`trace`) in which every tensor derived from a layer's output carries that layer's space:

* a layer whose input carries space ``p`` samples its weight with ``Ω_p`` on the input side;
* fan-out is free (two heads reading one trunk both use the trunk's ``Ω``);
* scaling coordinates by a constant is fine (it commutes with ``Ω``);
* an operation that combines two *different* spaces (adding or concatenating two layers'
  outputs) has no finite counterpart: :func:`trace` refuses it, naming both layers.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .layers import ROLES, InfPiInput, InfPiLayer, InfPiModule, _positive_index

__all__ = ["sample", "trace", "DataFlow", "MixedSpacesError"]


class MixedSpacesError(ValueError):
    """A forward pass combines two coordinate spaces: the net has no finite counterpart."""


@dataclass(eq=False)
class _Space:
    producer: str  # name of the layer that writes this space
    rank: int


@dataclass
class DataFlow:
    """The wiring of an infinite π-network, read off one forward pass.

    Attributes:
        layers: outermost infinite layers (:class:`~pinet.InfPiModule`) by qualified name, in the
            order of their first call.
        spaces: names of the layers that write a coordinate space (input and hidden layers), in
            order of creation; ``Ω`` s are drawn in this order.
        inputs: for every non-input layer, the name of the layer whose space it reads.
        ranks: rank ``r`` of each space, by producer name.
    """

    layers: dict[str, InfPiModule] = field(default_factory=dict)
    spaces: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def consumers(self, space: str) -> list[str]:
        """Names of the layers that read ``space``."""
        return [name for name, src in self.inputs.items() if src == space]


class _Tracer(TorchFunctionMode):
    # Propagates a coordinate-space tag through every torch operation outside the π-layers.
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, _Space] = {}
        self.readouts: dict[int, str] = {}  # outputs of readouts: plain values, remembered for messages
        self.keep: list[Tensor] = []  # tagged tensors stay alive, so their ids are not reused
        self.depth = 0  # > 0 while inside an infinite layer (its internals are not coordinates)

    def tag(self, t: Tensor, space: _Space | None) -> None:
        self.keep.append(t)
        if space is None:
            self.tags.pop(id(t), None)
        else:
            self.tags[id(t)] = space

    def spaces_of(self, tree) -> dict[_Space, None]:
        leaves, _ = tree_flatten(tree)
        found: dict[_Space, None] = {}
        for t in leaves:
            if isinstance(t, Tensor) and id(t) in self.tags:
                found[self.tags[id(t)]] = None
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        found = self.spaces_of((args, kwargs))
        if len(found) > 1:
            names = " and ".join(f"'{s.producer}'" for s in found)
            raise MixedSpacesError(
                f"pinet.sample: {getattr(func, '__name__', func)} combines the coordinate spaces of the "
                f"layers {names}; a π-network whose forward adds or concatenates the outputs of two "
                "different infinite layers has no finite counterpart (each space has its own Ω)"
            )
        if found:
            (space,) = found
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.tag(t, space)
        return out


def _outermost_layers(model: nn.Module) -> dict[str, InfPiModule]:
    layers: dict[str, InfPiModule] = {}
    for name, m in model.named_modules():
        if isinstance(m, InfPiModule) and not any(name.startswith(p + ".") for p in layers):
            if m.pi_role not in ROLES:
                raise ValueError(f"layer '{name}' ({type(m).__name__}): pi_role must be one of {ROLES}, got {m.pi_role!r}")
            layers[name or type(m).__name__] = m
    return layers


def _example_input(layers: dict[str, InfPiModule], device) -> tuple:
    inputs = [m for m in layers.values() if isinstance(m, InfPiInput)]
    if len(inputs) != 1:
        raise ValueError(
            f"pinet.sample: cannot build an example input ({len(inputs)} InfPiInput layers); pass "
            "example_input=(tensors the forward takes)"
        )
    # In the input layer's dtype: a float64 module in front of it (a BatchNorm) refuses float32.
    x = torch.zeros(2, inputs[0].d_in, device=device, dtype=inputs[0].A.dtype)
    return (x.normal_(generator=torch.Generator(device).manual_seed(0)),)


@torch.no_grad()
def trace(model: nn.Module, example_input: tuple | Tensor | None = None) -> DataFlow:
    """Read the coordinate-space wiring of ``model`` off one forward pass.

    ``example_input``: what ``model`` takes (a tensor or a tuple of positional arguments); default
    ``randn(2, d_in)`` when the net has exactly one :class:`~pinet.InfPiInput`. The pass runs under
    ``no_grad`` (no rows are captured) with every module in eval mode (a BatchNorm in train mode
    would update its running statistics); each module's own training flag is restored afterwards,
    also when the pass raises, so nothing in ``model`` changes. Raises :class:`MixedSpacesError` if
    two spaces are combined and ``ValueError`` for wiring without a finite counterpart (a π-layer
    fed by data or by a readout, one layer called on two spaces, a declared role that contradicts
    the wiring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pinet.sample: model must be an nn.Module, got {type(model).__name__}")
    if example_input is not None and not isinstance(example_input, (Tensor, tuple)):
        raise TypeError(
            "pinet.sample: example_input must be a tensor, a tuple of the forward's positional arguments "
            f"or None, got {type(example_input).__name__}"
        )
    layers = _outermost_layers(model)
    if not layers:
        raise ValueError(f"pinet.sample: {type(model).__name__} contains no infinite π-layer (InfPiModule)")
    names = {id(m): n for n, m in layers.items()}
    device = next(model.parameters()).device
    if example_input is None:
        example_input = _example_input(layers, device)
    elif isinstance(example_input, Tensor):
        example_input = (example_input,)
    flow = DataFlow()
    tracer = _Tracer()
    own: dict[str, _Space] = {}

    def pre(module, args, kwargs):
        name = names[id(module)]
        if tracer.depth == 0:
            found = tracer.spaces_of((args, kwargs))
            if module.pi_role == "input":
                if found:
                    (space, *_) = found
                    raise ValueError(
                        f"pinet.sample: input layer '{name}' reads the coordinates written by '{space.producer}'; "
                        "an input layer reads data"
                    )
            else:
                if len(found) != 1:
                    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
                    src = next((tracer.readouts[id(t)] for t in leaves if id(t) in tracer.readouts), None)
                    what = f"the output of readout '{src}'" if src else "data, not the coordinates of an infinite layer"
                    if len(found) > 1:
                        raise MixedSpacesError(
                            f"pinet.sample: layer '{name}' reads the spaces of "
                            + " and ".join(f"'{s.producer}'" for s in found)
                        )
                    raise ValueError(f"pinet.sample: π-layer '{name}' reads {what}; it must read a coordinate space")
                (space,) = found
                prev = flow.inputs.get(name)
                if prev is not None and prev != space.producer:
                    raise ValueError(
                        f"pinet.sample: layer '{name}' is called on the spaces of '{prev}' and "
                        f"'{space.producer}'; its finite weight can read only one Ω"
                    )
                flow.inputs[name] = space.producer
            flow.layers.setdefault(name, module)
        tracer.depth += 1

    def post(module, args, kwargs, output):
        tracer.depth -= 1
        if tracer.depth:
            return None
        name = names[id(module)]
        outs = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
        if module.pi_role == "readout":
            for t in outs:
                tracer.tag(t, None)
                tracer.readouts[id(t)] = name
            return None
        if name not in own:
            rank = outs[0].shape[-1] if outs else 0
            own[name] = _Space(name, rank)
            flow.spaces.append(name)
            flow.ranks[name] = rank
        for t in outs:
            tracer.tag(t, own[name])
        return None

    handles = []
    # Per module, not model.train(mode): a net may keep some submodules in eval on purpose.
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in layers.values():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        with tracer:
            try:
                model(*example_input)
            except (MixedSpacesError, ValueError):
                raise
            except Exception as e:
                raise ValueError(
                    f"pinet.sample: the forward pass on the example input failed ({type(e).__name__}: {e}); "
                    "pass example_input=(tensors the forward takes)"
                ) from e
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    for name, m in flow.layers.items():
        if m.pi_role != "readout" and not flow.consumers(name):
            raise ValueError(
                f"pinet.sample: layer '{name}' has role {m.pi_role!r} but no π-layer reads its output; "
                "a layer whose output leaves the network is a readout (InfPiLayer(..., readout=True))"
            )
    unused = [n for n in layers if n not in flow.layers]
    if unused:
        raise ValueError(f"pinet.sample: the forward pass on the example input never calls {unused}")
    return flow


def _draw_omegas(flow: DataFlow, width: int, generator, draw_device, device, dtype, model=None) -> dict[str, Tensor]:
    # Drawn in float64 and rounded, space by space in creation order (InfPiMLP: layer 0, 1, ...), on
    # the generator's device (torch requires it) and moved to the model's: the same Ω either way.
    draws = {
        name: torch.randn(width, flow.ranks[name], generator=generator, device=draw_device, dtype=torch.float64)
        for name in flow.spaces
    }
    if model is not None:
        # A sharded model (pinet.distributed): every rank takes rank 0's draws (collective), so per-rank
        # seeds still give the whole layer's finite net; no-op otherwise.
        from . import distributed

        draws = distributed._agree_draws(model, draws, width, dtype, "pinet.sample")
    return {name: d.to(device=device, dtype=dtype) for name, d in draws.items()}


def _check_width(width) -> int:
    return _positive_index("pinet.sample", "width", width)


def _check_generator(generator) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"pinet.sample: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type == "meta":
        raise ValueError("pinet.sample: generator is on the meta device, which draws no numbers; use a CPU or CUDA generator")


def _memory(device: torch.device) -> int | None:
    # Total memory of the device (None: unknown, no check). CPU: physical RAM.
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def _check_memory(flow: DataFlow, width: int, device: torch.device, dtype: torch.dtype) -> None:
    # A lower bound of what the result keeps, computed from shapes only: every Ω (n, r) in dtype,
    # one float64 draw, and the finite weights of pinet's own layers (a hidden one is n × n). A width
    # it already refuses cannot succeed and would otherwise end in an allocator error naming no argument.
    if not flow.ranks:
        return
    size = torch.empty(0, dtype=dtype).element_size()
    elems = width * sum(flow.ranks.values())
    for layer in flow.layers.values():
        if isinstance(layer, InfPiInput):
            elems += width * layer.d_in
        elif isinstance(layer, InfPiLayer):
            elems += width * (layer.r_out if layer.pi_role == "readout" else width)
    need = elems * size + width * max(flow.ranks.values()) * 8
    total = _memory(device)
    if total is not None and need > total:
        raise ValueError(
            f"pinet.sample: width={width} needs at least {need:,} bytes ({need / 2**30:,.1f} GiB) for the "
            f"finite weights and Ω, more than the {total / 2**30:,.1f} GiB of memory on {device}"
        )


def finite_layers(flow: DataFlow, omegas: dict[str, Tensor], dtype: torch.dtype) -> dict[str, nn.Module]:
    """The finite layer of every infinite layer in ``flow`` given one ``Ω`` (n, r) per space."""
    out = {}
    for name, layer in flow.layers.items():
        src = flow.inputs.get(name)
        omega_in = omegas[src] if src is not None else None
        omega_out = omegas.get(name) if layer.pi_role != "readout" else None
        out[name] = layer.finite(omega_in, omega_out, dtype=dtype)
    return out


def _compute_dtype(flow: DataFlow) -> torch.dtype:
    for layer in flow.layers.values():
        for p in layer.parameters():
            return p.dtype
    return torch.get_default_dtype()


@torch.no_grad()
def sample(
    model: nn.Module,
    width: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    example_input: tuple | Tensor | None = None,
) -> nn.Module:
    """The finite π-network of ``width`` n sampled from ``model`` (trained or not).

    ``model`` is any module built from pinet's infinite layers (any nesting, fan-out of a space to
    several layers, several readouts, constants scaling coordinates). Returns the same ``forward``
    code with every infinite layer replaced by its finite layer (a deep copy of ``model`` in which
    only those layers differ; a net class may override this by defining
    ``_assemble_finite(layers, width)``), and one ``Ω ~ N(0, 1)`` (n, r) per coordinate space,
    drawn from ``generator`` in the order the spaces are first written. Readout outputs are the same
    shape as the infinite net's; they agree with them up to ``O(n^-½)``. Train it with
    :class:`pinet.optim.PiOptimizerWrapper`: it projects the gradients of every non-readout layer.

    ``width``: a positive int (or integer-like, e.g. ``numpy.int64``); ``dtype``: a real
    floating-point ``torch.dtype``, default the compute dtype of ``model``; ``generator``: a
    ``torch.Generator`` on any device but ``meta`` (``Ω`` is drawn there and moved to the model's
    device); ``example_input`` is passed to :func:`trace`. The model is not changed (its buffers,
    training flags, parameters, gradients and hooks are as before, also when ``sample`` raises).
    A width whose weights cannot fit in the device's memory is refused before anything is drawn.

    A model sharded over processes (:func:`pinet.distributed.shard`): collective (every rank calls it
    with the same width and dtype, checked); every rank uses the ``Ω`` drawn on rank 0 of the group,
    so all get the finite net of the whole layer that rank 0's generator gives in one process
    (each rank's own generator advances as in one process).
    """
    width = _check_width(width)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(
            "pinet.sample: dtype must be a real floating-point torch.dtype (torch.float16, torch.bfloat16, "
            f"torch.float32 or torch.float64) or None, got {dtype!r}"
        )
    _check_generator(generator)
    flow = trace(model, example_input)
    ranks = sorted(set(flow.ranks.values()))
    if ranks and width < ranks[-1]:
        raise ValueError(f"pinet.sample: width must be at least r={ranks[-1]} (the rank; ΩᵀΩ must be invertible), got {width}")
    dtype = dtype or _compute_dtype(flow)
    device = next(model.parameters()).device
    draw_device = generator.device if generator is not None else device
    _check_memory(flow, width, device, dtype)  # what the result keeps lives on the model's device
    omegas = _draw_omegas(flow, width, generator, draw_device, device, dtype, model)
    layers = finite_layers(flow, omegas, dtype)
    assemble = getattr(model, "_assemble_finite", None)
    if assemble is not None:
        return assemble(layers, width)
    memo = {id(flow.layers[name]): fin for name, fin in layers.items()}
    return copy.deepcopy(model, memo)
