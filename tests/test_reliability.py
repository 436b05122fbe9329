"""A failed call changes nothing, bad input gets a clear error (issue 11; docs/reliability.md).

Every failing load is checked twice: the message names the key or argument, and the model's whole
state dict (torch.equal on every tensor, == on every extra state) and every π-layer's row count are
exactly as before the call.
"""

import math
import os

import pytest
import torch
from torch import nn

import pinet
from pinet import FinPiMLP, InfPiInput, InfPiLayer, InfPiMLP, PiState
from pinet.checkpoint import StateDictError

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- helpers
def _rows(model: nn.Module) -> list[int]:
    return [m.rows for m in model.modules() if isinstance(m, PiState)]


def _snapshot(model: nn.Module) -> tuple[dict, list[int]]:
    sd = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else dict(v)) for k, v in model.state_dict().items()}
    return sd, _rows(model)


def _assert_unchanged(model: nn.Module, snap) -> None:
    before, rows = snap
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
        else:
            assert now[k] == v, k
    assert _rows(model) == rows


def _grow(model: nn.Module, gen: torch.Generator, k: int) -> None:
    """Give every π-state ``k`` more rows and every bias a new value (stands in for training)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PiState):
                A = torch.randn(k, m.r_out, generator=gen, dtype=D)
                B = torch.nn.functional.normalize(torch.randn(k, m.r_in, generator=gen, dtype=D), dim=1)
                m.append(A, B, torch.randn(k, generator=gen, dtype=D))
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=D))


def _nets(**kw):
    """A checkpoint source (rows 4+6, 4+6) and a target net in another state (rows 4+18, 4)."""
    kw = dict(first_layer_alpha=1.5, last_layer_alpha=3.0, bias_alpha=0.5, dtype=D) | kw
    gen = torch.Generator().manual_seed(1)
    src, dst = InfPiMLP(5, 3, 4, 1, **kw), InfPiMLP(5, 3, 4, 1, **kw)
    _grow(src, gen, 6)
    _grow(dst.layers[1], gen, 18)
    return src, dst


def _load_fails(model, sd, *names, strict=True, via=None):
    """Loading ``sd`` raises a StateDictError naming each of ``names`` and leaves ``model`` as it was."""
    snap = _snapshot(model)
    load = via or (lambda: model.load_state_dict(sd, strict=strict))
    with pytest.raises(StateDictError) as e:
        load()
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    assert "nothing was loaded" in str(e.value)
    _assert_unchanged(model, snap)
    return str(e.value)


def _edit_extra(sd, key, **changes):
    return dict(sd, **{key: dict(sd[key], **changes)})


# ------------------------------------------------------------------- transactional load_state_dict
def test_bad_checkpoints_leave_the_net_untouched():
    src, dst = _nets()
    sd = src.state_dict()
    assert _rows(dst) != _rows(src)
    # Each bad entry sits in the LAST module torch would visit, so a module-by-module load would
    # already have replaced the earlier layers' rows and tensors.
    last = "layers.2"
    cases = [
        ({k: v for k, v in sd.items() if k != f"{last}.state.B"}, [f'"{last}.state.B"', "Missing"]),
        (dict(sd, **{f"{last}.extra": torch.zeros(3)}), [f'"{last}.extra"', "Unexpected"]),
        (dict(sd, **{f"{last}.bias": torch.zeros(4, dtype=D)}), [f"{last}.bias", "(4,)", "(3,)"]),
        (dict(sd, **{f"{last}.state.B": sd[f"{last}.state.B"][:-1]}), [f"{last}.state.B", "to match"]),
        (dict(sd, **{f"{last}.state.c": sd[f"{last}.state.c"][:-2]}), [f"{last}.state.c"]),
        (dict(sd, **{f"{last}.state.A": sd[f"{last}.state.A"][:, :2]}), [f"{last}.state.A", "(M, 3)"]),
        (_edit_extra(sd, f"{last}._extra_state", alpha=float("nan")), [f"{last}._extra_state", "alpha", "nan"]),
        (_edit_extra(sd, f"{last}._extra_state", bias_alpha=math.inf), [f"{last}._extra_state", "bias_alpha"]),
        (_edit_extra(sd, f"{last}._extra_state", layernorm="false"), [f"{last}._extra_state", "layernorm", "'false'"]),
        (_edit_extra(sd, f"{last}._extra_state", alpha=True), [f"{last}._extra_state", "alpha"]),
        (_edit_extra(sd, f"{last}._extra_state", surprise=1), [f"{last}._extra_state", "surprise"]),
        (dict(sd, **{f"{last}._extra_state": [1.0, 0.5]}), [f"{last}._extra_state", "dict"]),
        (dict(sd, **{f"{last}.state.A": sd[f"{last}.state.A"].tolist()}), [f"{last}.state.A", "list"]),
        (dict(sd, **{f"{last}.state.c": sd[f"{last}.state.c"].long()}), [f"{last}.state.c", "int64"]),
        (dict(sd, **{f"{last}.bias": sd[f"{last}.bias"].to(torch.complex128)}), [f"{last}.bias", "complex"]),
        (dict(sd, **{f"{last}.bias": sd[f"{last}.bias"].tolist()}), [f"{last}.bias", "list"]),
        (dict(sd, **{f"{last}.bias": sd[f"{last}.bias"].to_sparse()}), [f"{last}.bias", "dense"]),
        (dict(sd, **{f"{last}.state.B": sd[f"{last}.state.B"].to("meta")}), [f"{last}.state.B", "meta"]),
        (_edit_extra(sd, "_extra_state", depth=2), ["_extra_state", "depth: saved 2 vs this 1"]),
    ]
    for bad, names in cases:
        _load_fails(dst, bad, *names)
    # several problems at once: all are listed
    bad = dict(sd, **{"layers.0.A": sd["layers.0.A"][:2], f"{last}.state.B": sd[f"{last}.state.B"][:-1]})
    _load_fails(dst, bad, "layers.0.A", f"{last}.state.B")
    # and the good checkpoint then loads completely
    dst.load_state_dict(sd)
    assert _rows(dst) == _rows(src) == [10, 10]
    x = torch.randn(4, 5, dtype=D)
    assert torch.equal(dst(x), src(x))


def test_non_strict_still_refuses_bad_values_and_keeps_a_partial_pi_state():
    src, dst = _nets()
    sd = src.state_dict()
    _load_fails(dst, _edit_extra(sd, "layers.2._extra_state", alpha=float("nan")), "alpha", strict=False)
    _load_fails(dst, dict(sd, **{"layers.0.A": sd["layers.0.A"][:1]}), "layers.0.A", strict=False)
    # missing B: torch's non-strict semantics, reported; that π-state keeps its own rows
    rows_before = dst.layers[2].state.rows
    res = dst.load_state_dict({k: v for k, v in sd.items() if k != "layers.2.state.B"}, strict=False)
    assert res.missing_keys == ["layers.2.state.B"] and res.unexpected_keys == []
    assert dst.layers[2].state.rows == rows_before and dst.layers[1].state.rows == src.layers[1].state.rows


def test_bias_checkpoint_into_bias_free_net_and_back():
    src, _ = _nets()
    _, no_bias = _nets(bias_alpha=0.0)
    msg = _load_fails(no_bias, src.state_dict(), "layers.0.bias", "Unexpected",
                      "layers.0._extra_state", "saved bias_alpha=0.5 but this layer was built without a bias")  # fmt: skip
    assert "layers.1._extra_state" in msg and "layers.2._extra_state" in msg
    _load_fails(src, no_bias.state_dict(), '"layers.0.bias"', "Missing", "built with a bias")


def test_finite_state_into_infinite_net_and_back():
    inf, _ = _nets()
    fin = FinPiMLP(5, 3, 4, 1, 8, first_layer_alpha=1.5, last_layer_alpha=3.0, bias_alpha=0.5, dtype=D,
                   generator=torch.Generator().manual_seed(2))  # fmt: skip
    msg = _load_fails(inf, fin.state_dict(), "_extra_state", "this is a FinPiMLP state dict", "FinPiMLP.from_state_dict")
    assert '"layers.0.weight"' in msg and '"layers.1.state.A"' in msg  # unexpected and missing, by name
    _load_fails(fin, inf.state_dict(), "this is an InfPiMLP state dict", "InfPiMLP.from_state_dict")


class TwoHeads(nn.Module):
    """The README's custom net: a shared trunk, two readouts. x (b, 20) -> ((b, 3), (b, 5))."""

    def __init__(self, r=8):
        super().__init__()
        self.inp = InfPiInput(20, r, dtype=D)
        self.hidden = InfPiLayer(r, r, layernorm=True, dtype=D)
        self.head_a = InfPiLayer(r, 3, readout=True, alpha=0.5, dtype=D)
        self.head_b = InfPiLayer(r, 5, readout=True, bias_alpha=0.0, dtype=D)
        self.scale = nn.Linear(5, 5, dtype=D)  # an ordinary torch module in the mix

    def forward(self, x):
        h = self.hidden(self.inp(x))
        return self.head_a(h), self.scale(self.head_b(h))


def test_custom_module_loads_all_or_nothing():
    gen = torch.Generator().manual_seed(3)
    src, dst = TwoHeads(), TwoHeads()
    _grow(src, gen, 5)
    _grow(dst.hidden, gen, 11)
    sd = src.state_dict()
    via = lambda bad: (lambda: pinet.load_state_dict(dst, bad))  # noqa: E731
    cases = [
        (dict(sd, **{"scale.weight": torch.zeros(5, 4, dtype=D)}), ["scale.weight"]),
        ({k: v for k, v in sd.items() if k != "scale.bias"}, ['"scale.bias"']),
        (dict(sd, **{"head_b.state.B": sd["head_b.state.B"][:-1]}), ["head_b.state.B"]),
        (_edit_extra(sd, "head_b._extra_state", layernorm="false"), ["head_b._extra_state", "layernorm"]),
        (dict(sd, **{"head_b.bias": torch.zeros(5, dtype=D)}), ['"head_b.bias"']),
    ]
    for bad, names in cases:
        _load_fails(dst, bad, *names, via=via(bad))
    # torch's own Module.load_state_dict on the same custom net would have kept a partial load:
    bad = dict(sd, **{"scale.weight": torch.zeros(5, 4, dtype=D)})
    with pytest.raises(RuntimeError):
        nn.Module.load_state_dict(dst, bad)
    assert _rows(dst) == _rows(src)  # (the π-states were replaced before the error)
    dst = TwoHeads()
    pinet.load_state_dict(dst, sd)
    x = torch.randn(3, 20, dtype=D)
    assert all(torch.equal(a, b) for a, b in zip(dst(x), src(x)))
    assert pinet.check_state_dict(dst, sd) == ([], [])


class _Tagged(nn.Module):
    """A user module with its own extra state and no dry-run check."""

    def __init__(self):
        super().__init__()
        self.tag = "a"
        self.lin = nn.Linear(2, 2, dtype=D)

    def get_extra_state(self):
        return {"tag": self.tag}

    def set_extra_state(self, state):
        if not isinstance(state.get("tag"), str):
            raise ValueError("tag must be a str")
        self.tag = state["tag"]


def test_user_extra_state_is_rolled_back():
    model = nn.ModuleDict({"one": _Tagged(), "two": _Tagged(), "pi": InfPiLayer(2, 2, dtype=D)})
    sd = model.state_dict()
    sd["one._extra_state"] = {"tag": "b"}
    sd["two._extra_state"] = {"tag": 3}
    _load_fails(model, sd, "two._extra_state", "tag must be a str", via=lambda: pinet.load_state_dict(model, sd))
    assert model["one"].tag == "a" and model["two"].tag == "a"


def test_load_arguments_are_checked():
    src, dst = _nets()
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        pinet.load_state_dict(dst, [1, 2])
    with pytest.raises(TypeError, match="strict must be a bool"):
        pinet.load_state_dict(dst, src.state_dict(), strict="yes")
    with pytest.raises(ValueError, match="assign must be False"):
        dst.load_state_dict(src.state_dict(), assign=True)


def test_state_dict_error_is_both_runtime_and_value_error():
    # torch's load errors are RuntimeErrors, pinet's argument errors ValueErrors: both catch it.
    assert issubclass(StateDictError, RuntimeError) and issubclass(StateDictError, ValueError)


def test_resume_style_round_trip_is_bit_exact():
    src, _ = _nets()
    dst = InfPiMLP.from_state_dict(src.state_dict())
    assert _rows(dst) == _rows(src)
    for k, v in src.state_dict().items():
        w = dst.state_dict()[k]
        assert (torch.equal(v, w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w, k


# ------------------------------------------------------------------ arguments and extra state
def test_constructor_errors_name_the_argument():
    nan = float("nan")
    cases = [
        (lambda: FinPiMLP(3, 2, 4, 1, 8, first_layer_alpha=nan), "first_layer_alpha"),
        (lambda: FinPiMLP(3, 2, 4, 1, 8, last_layer_alpha=math.inf), "last_layer_alpha"),
        (lambda: FinPiMLP(3, 2, 4, 1, 8, last_bias_alpha=nan), "last_bias_alpha"),
        (lambda: FinPiMLP(3, 2, 4, 1, 8, layernorm="false"), "layernorm"),
        (lambda: InfPiMLP(3, 2, 4, 1, hidden_bias_alpha=nan), "hidden_bias_alpha"),
        (lambda: InfPiMLP(3, 2, 4, 1, layernorm="false"), "layernorm"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool, "float32"])
def test_non_float_dtypes_are_refused_at_construction(dtype):
    omega = torch.randn(6, 4, dtype=D)
    makers = [
        lambda: InfPiMLP(3, 2, 4, 1, dtype=dtype),
        lambda: FinPiMLP(3, 2, 4, 1, 8, dtype=dtype),
        lambda: InfPiInput(3, 4, dtype=dtype),
        lambda: InfPiLayer(4, 4, dtype=dtype),
        lambda: pinet.FinPiInput(3, omega, dtype=dtype),
        lambda: pinet.FinPiLayer(6, 6, omega=omega, dtype=dtype),
        lambda: pinet.FinPiLayer(6, 2, dtype=dtype),
        lambda: PiState(4, 4, dtype=dtype),
        lambda: PiState(4, 4, coef_dtype=dtype),
    ]
    for make in makers:
        with pytest.raises(ValueError, match=r"dtype must be a real floating-point torch\.dtype"):
            make()
    if isinstance(dtype, torch.dtype):
        with pytest.raises(ValueError, match=r"omega\.dtype"):
            pinet.FinPiState(omega.to(dtype))


def test_complex_inputs_are_refused():
    x = torch.randn(2, 3, dtype=torch.complex128)
    for net in (InfPiMLP(3, 2, 4, 1, dtype=D), FinPiMLP(3, 2, 4, 1, 8, dtype=D)):
        with pytest.raises(TypeError, match="x must be real.*complex128"):
            net(x)
    # integer inputs are exact in the net's float dtype and stay allowed
    assert InfPiMLP(3, 2, 4, 1, dtype=D)(torch.ones(2, 3, dtype=torch.int64)).dtype == D


def test_set_extra_state_refuses_strings_and_nan():
    layer = InfPiLayer(4, 4, dtype=D)
    before = layer.get_extra_state()
    for bad, name in [(dict(before, layernorm="false"), "layernorm"), (dict(before, alpha=float("nan")), "alpha"),
                      ({"alpha": 1.0}, "missing bias_alpha, layernorm")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            layer.set_extra_state(bad)
        assert layer.get_extra_state() == before


def test_from_state_dict_names_the_kind_and_the_key():
    inf, _ = _nets()
    fin = FinPiMLP(5, 3, 4, 1, 8, bias_alpha=0.5, dtype=D, generator=torch.Generator().manual_seed(4))
    with pytest.raises(StateDictError, match=r"this is a FinPiMLP state dict.*pinet\.FinPiMLP\.from_state_dict"):
        InfPiMLP.from_state_dict(fin.state_dict())
    with pytest.raises(StateDictError, match=r"this is an InfPiMLP state dict.*pinet\.InfPiMLP\.from_state_dict"):
        FinPiMLP.from_state_dict(inf.state_dict())
    sd = inf.state_dict()
    cases = [
        (_edit_extra(sd, "layers.0._extra_state", alpha=float("nan")), "layers.0._extra_state: alpha"),
        (_edit_extra(sd, "layers.2._extra_state", layernorm="false"), "layers.2._extra_state: layernorm"),
        (_edit_extra(sd, "_extra_state", r="4"), "'r' must be a positive int"),
        ({k: v for k, v in sd.items() if k != "layers.2._extra_state"}, "missing key 'layers.2._extra_state'"),
        ({k: v for k, v in sd.items() if k != "layers.2.state.A"}, "missing key 'layers.2.state.A'"),
        ({"layers.0.A": sd["layers.0.A"]}, "no '_extra_state'"),
    ]
    for bad, msg in cases:
        with pytest.raises(StateDictError, match=msg):
            InfPiMLP.from_state_dict(bad)
    # each kind rebuilds itself exactly, Ω included for the finite net
    x = torch.randn(3, 5, dtype=D)
    for net in (inf, fin):
        again = type(net).from_state_dict(net.state_dict())
        assert torch.equal(again(x), net(x))


def test_hidden_bias_alpha_survives_save_and_load():
    net = InfPiMLP(3, 2, 4, 2, bias_alpha=0.0, hidden_bias_alpha=1.0, last_bias_alpha=1.0, dtype=D)
    assert net.layers[0].bias is None and net.layers[1].bias is not None and net.hidden_bias_alpha == 1.0
    again = InfPiMLP.from_state_dict(net.state_dict())
    assert again.multipliers() == net.multipliers()


# ------------------------------------------------------------------------------ the training CLI
TINY = "--train-subset 48 --test-subset 24 --r 8 --batch-size 16 --epochs 1 --no-progress".split()


def _cli_error(capsys, argv) -> str:
    from experiments import train

    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_save_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("not a directory")
    err = _cli_error(capsys, TINY + ["--save-dir", str(f)])
    assert "--save-dir" in err and "existing file" in err
    assert f.read_text() == "not a directory"


def test_checkpoint_without_rng_state_is_a_one_line_error(tmp_path, capsys):
    from experiments import train

    train.main(TINY + ["--save-dir", str(tmp_path / "run"), "--save-model"])
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    # a model file that does not load: one line naming the key, not the bare header
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    model["layers.1._extra_state"] = dict(model["layers.1._extra_state"], layernorm="false")
    torch.save(model, tmp_path / "bad_model.pt")
    err = _cli_error(capsys, ["--test", "--model-path", str(tmp_path / "bad_model.pt"), "--train-subset", "48",
                              "--test-subset", "24", "--no-progress"])  # fmt: skip
    assert "layers.1._extra_state: layernorm must be a bool" in err, err
    for name, edit, expect in [
        ("no_rng", lambda c: c.pop("rng"), "'rng'"),
        ("bad_rng", lambda c: c["rng"].pop("data"), "RNG state ('rng')"),
        ("no_history", lambda c: c.pop("history"), "'history'"),
        ("bad_model", lambda c: c["model"].pop("layers.2.state.B"), "layers.2.state.B"),
    ]:
        bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
        edit(bad)
        path = tmp_path / f"{name}.pt"
        torch.save(bad, path)
        err = _cli_error(capsys, ["--resume", str(path), "--epochs", "2", "--no-progress"])
        assert expect in err, err


def test_checkpoint_writes_are_durable_and_clean_up(tmp_path, monkeypatch):
    from experiments import common, train

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint from a crash")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    train.main(TINY + ["--save-dir", str(out)])
    assert not (out / "checkpoint.pt.tmp").exists() and sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "curves.png", "log.csv"]  # fmt: skip
    if os.path.isdir("/proc/self/fd"):  # Linux: check what was synced, by path
        real = os.path.realpath(out)
        assert os.path.join(real, "checkpoint.pt.tmp") in synced  # the file, before its rename
        assert real in synced  # and the directory holding the new name
    # a write that fails leaves the previous file and no temp file
    before = (out / "checkpoint.pt").read_bytes()

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        common._save({"x": 1}, str(out / "checkpoint.pt"))
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "checkpoint.pt.tmp").exists()
