"""All-or-nothing ``load_state_dict`` for any module built from pinet layers.

``torch.nn.Module.load_state_dict`` loads module by module and raises at the end, so a bad
checkpoint leaves the net half loaded. :func:`load_state_dict` first checks the whole state dict
without writing anything (a dry run), then loads it with torch's own machinery (so load hooks and
metadata behave as usual). Nothing is backed up: a π-state can be many GB, and checking first needs
no copy.

What the dry run checks, per module of ``model`` (each message names the full key):

* keys: every key ``model.state_dict()`` would have is present (``strict``), no other key is
  (``strict``), including a stray ``_extra_state``;
* ordinary parameters and buffers: a tensor of the model's shape, not complex when the model's is
  real (torch's ``copy_`` would drop the imaginary part);
* pinet modules check their own entries (``_pinet_check_load``): a :class:`~pinet.state.PiState`
  its ``A``/``B``/``c`` (tensors, shapes, equal row counts), a layer its extra state (finite
  multipliers, a bool ``layernorm``, bias present exactly when the layer has one), a π-MLP its
  structure (an infinite net refuses a finite net's state and vice versa).

Modules of your own with a ``set_extra_state`` and no ``_pinet_check_load`` cannot be dry-run: their
extra states are set first, and if one of them raises, those already set are restored (from
``get_extra_state``) before the error propagates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["StateDictError", "check_state_dict", "load_state_dict"]

_EXTRA = "_extra_state"


class StateDictError(RuntimeError, ValueError):
    """A state dict that does not fit the model. A ``RuntimeError`` like torch's load errors and a
    ``ValueError`` like pinet's argument errors; the message lists every problem, each naming its key."""


def _walk(module: nn.Module, prefix: str = ""):
    # The same traversal as torch's load (duplicates included: a shared module loads under each name).
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, prefix + name + ".")


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).set_extra_state is not nn.Module.set_extra_state


def _local_tensors(module: nn.Module) -> dict[str, Tensor]:
    """What torch's default ``_load_from_state_dict`` would copy into: parameters and persistent buffers."""
    out = {k: v for k, v in module._parameters.items() if v is not None}
    out.update(
        (k, v) for k, v in module._buffers.items() if v is not None and k not in module._non_persistent_buffers_set
    )
    return out


def _check_tensor_entry(key: str, value, target: Tensor, problems: list[str]) -> None:
    if not isinstance(value, Tensor):
        problems.append(f"{key}: expected a tensor from the checkpoint, got {type(value).__name__}")
        return
    if value.layout != torch.strided or value.is_meta:
        problems.append(f"{key}: expected a dense tensor with data, got layout {value.layout}"
                        + (" on the meta device" if value.is_meta else ""))  # fmt: skip
        return
    if torch.nn.parameter.is_lazy(target):
        return
    shape = value.shape
    if len(target.shape) == 0 and len(shape) == 1 and shape[0] == 1:
        shape = torch.Size([])  # torch's backward-compatibility rule for 0-dim parameters
    if shape != target.shape:
        problems.append(
            f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
            f"the shape in current model is {tuple(target.shape)}"
        )
    elif value.is_complex() and not target.is_complex():
        problems.append(f"{key}: the checkpoint holds a complex tensor ({value.dtype}) for a real {target.dtype} one")


class _Report:
    def __init__(self) -> None:
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.problems: list[str] = []
        self.unchecked_extra: list[tuple[str, nn.Module]] = []


def _dry_run(model: nn.Module, state_dict: Mapping, strict: bool) -> _Report:
    rep = _Report()
    expected: set[str] = set()
    for prefix, module in _walk(model):
        custom = tuple(getattr(module, "_pinet_checked_keys", ()))
        local = set(_local_tensors(module)) | set(custom)
        if _has_extra_state(module):
            local.add(_EXTRA)
        for name in sorted(local):
            key = prefix + name
            expected.add(key)
            if key not in state_dict:
                rep.missing.append(key)
        tensors = _local_tensors(module)
        for name, target in tensors.items():
            key = prefix + name
            if name not in custom and key in state_dict:
                _check_tensor_entry(key, state_dict[key], target, rep.problems)
        check = getattr(module, "_pinet_check_load", None)
        if check is not None:
            rep.problems.extend(check(state_dict, prefix))
        elif _has_extra_state(module) and prefix + _EXTRA in state_dict:
            rep.unchecked_extra.append((prefix + _EXTRA, module))
    rep.unexpected = [k for k in state_dict if k not in expected]
    return rep


def _raise(model: nn.Module, rep: _Report, strict: bool) -> None:
    lines = []
    if strict and rep.unexpected:
        lines.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in rep.unexpected) + ".")
    if strict and rep.missing:
        lines.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in rep.missing) + ".")
    lines += rep.problems
    if lines:
        raise StateDictError(
            f"Error(s) in loading state_dict for {type(model).__name__} (nothing was loaded):\n\t" + "\n\t".join(lines)
        )


def check_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = True):
    """Dry run of :func:`load_state_dict`: raise :class:`StateDictError` if ``state_dict`` would
    not load into ``model``; write nothing. Returns torch's ``(missing_keys, unexpected_keys)``
    named tuple (both empty when ``strict``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_state_dict: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"check_state_dict: state_dict must be a mapping, got {type(state_dict).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"check_state_dict: strict must be a bool, got {strict!r}")
    rep = _dry_run(model, state_dict, strict)
    _raise(model, rep, strict)
    return torch.nn.modules.module._IncompatibleKeys(rep.missing, rep.unexpected)


def load_state_dict(model: nn.Module, state_dict: Mapping, strict: bool = True):
    """Load ``state_dict`` into ``model`` (any ``nn.Module``, e.g. one of your own built from pinet
    layers) all or nothing: check everything first (see the module docstring), then load.

    On any problem raises :class:`StateDictError` listing every bad key, and ``model`` is exactly as
    before (every tensor, every π-state's rows, every multiplier). ``strict=False`` allows missing
    and unexpected keys as in torch (a π-state with one of ``A``/``B``/``c`` missing keeps its rows);
    wrong shapes and bad values are errors either way. Returns torch's
    ``(missing_keys, unexpected_keys)`` named tuple.

    Only running out of memory while the new π-rows are copied in can interrupt the load itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_state_dict: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_state_dict: state_dict must be a mapping, got {type(state_dict).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"load_state_dict: strict must be a bool, got {strict!r}")
    rep = _dry_run(model, state_dict, strict)
    _raise(model, rep, strict)
    # Extra states nobody can dry-run: set them first, undo those set if one fails.
    done: list[tuple[nn.Module, object]] = []
    for key, module in rep.unchecked_extra:
        before = module.get_extra_state()
        try:
            module.set_extra_state(state_dict[key])
        except Exception as e:
            for m, old in reversed(done):
                m.set_extra_state(old)
            module.set_extra_state(before)
            raise StateDictError(
                f"Error(s) in loading state_dict for {type(model).__name__} (nothing was loaded):\n\t"
                f"{key}: {type(e).__name__}: {e}"
            ) from e
        done.append((module, before))
    return nn.Module.load_state_dict(model, state_dict, strict=strict)
