"""Kernel dispatch (:mod:`pinet.kernels`): the layering, the backend switch and its errors, and
every backend against the float64 reference formula :func:`pinet.functional.pi_product`."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as TF

import pinet
from pinet import functional as F
from pinet import kernels
from pinet.kernels import native as knative

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64


@pytest.fixture(autouse=True)
def _auto_after():
    yield
    kernels.set_backend("auto")


def _native_ok() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    return shutil.which("g++") is not None and (cap.startswith("AVX2") or cap.startswith("AVX512"))


# --------------------------------------------------------------------------- layering
def test_functional_is_math_only():
    # functional.py imports torch and the standard library only: no kernel, state or layer module.
    tree = ast.parse((ROOT / "pinet" / "functional.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add("." * node.level + (node.module or ""))
    assert mods <= {"__future__", "math", "torch"}, mods


def test_functional_pi_layer_points_to_its_new_home():
    with pytest.raises(AttributeError, match=r"moved to pinet.kernels.pi_layer"):
        F.pi_layer  # noqa: B018


# --------------------------------------------------------------------------- the switch
def test_default_backend_is_visible_and_torch_is_always_available():
    assert kernels.setting() == "auto"
    assert kernels.backend() == "torch" and kernels.backend("cpu") == "torch"
    assert kernels.backend(torch.device("cuda", 0)) == "torch"
    assert {"auto", "torch"} <= set(kernels.available_backends())


def test_set_backend_forces_and_use_backend_restores():
    kernels.set_backend("torch")
    assert kernels.setting() == "torch" and kernels.backend() == "torch"
    with kernels.use_backend("auto"):
        assert kernels.setting() == "auto"
        with pytest.raises(RuntimeError):
            with kernels.use_backend("torch"):
                raise RuntimeError("inside")
        assert kernels.setting() == "auto"  # restored after an exception too
    assert kernels.setting() == "torch"


def test_unknown_backend_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'native', 'triton'\), got 'cuda'"):
        kernels.set_backend("cuda")
    assert kernels.setting() == "auto"


def test_forcing_triton_without_a_gpu_raises_and_changes_nothing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kernels.set_backend("torch")
    with pytest.raises(kernels.BackendUnavailable, match=r"backend 'triton' runs on CUDA devices and no CUDA device"):
        kernels.set_backend("triton")
    assert kernels.setting() == "torch"
    assert "triton" not in kernels.available_backends()


def test_forcing_native_without_a_compiler_raises_and_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(knative, "_lib", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("PINET_CACHE", str(tmp_path))
    with pytest.raises(kernels.BackendUnavailable, match=r"pinet.native compiles its kernel with g\+\+"):
        kernels.set_backend("native")
    assert kernels.setting() == "auto"
    assert kernels.unavailable_reason("native").startswith("pinet.native compiles")


def test_pinet_native_switch_is_the_native_backend():
    if not _native_ok():
        pytest.skip("pinet.native needs g++ and AVX2")
    with pinet.native.use():
        assert kernels.setting() == "native" and kernels.backend() == "native" and pinet.native.enabled()
        with pinet.native.use(False):
            assert kernels.setting() == "auto"
        assert kernels.setting() == "native"
    assert kernels.setting() == "auto"
    with kernels.use_backend("torch"):
        pinet.native.disable()  # leaves a backend other than native alone
        assert kernels.setting() == "torch"


def test_layers_use_the_selected_backend(monkeypatch):
    # InfPiLayer goes through kernels.pi_layer, so the switch reaches a model's training step.
    calls = []
    real = kernels.torch_ops.pi_product
    monkeypatch.setattr(kernels.torch_ops, "pi_product", lambda *a: calls.append(a[5:]) or real(*a))
    net = pinet.InfPiMLP(6, 2, r=4, depth=1)
    net(torch.randn(3, 6)).sum().backward()
    assert calls == [(), ()]  # two π-layers, torch's reduce (the default argument)
    if _native_ok():
        calls.clear()
        with kernels.use_backend("native"):
            net(torch.randn(3, 6)).sum().backward()
        assert calls == [(kernels.torch_ops.native_reduce,)] * 2
