import io

import numpy as np
import pytest
import torch

import pinet
from pinet import PiState

D = torch.float64


def _rows(k, r_in=4, r_out=3, dtype=D):
    return (
        torch.randn(k, r_out, dtype=dtype),
        torch.nn.functional.normalize(torch.randn(k, r_in, dtype=dtype), dim=1),
        torch.randn(k, dtype=dtype),
    )


def test_append_is_amortised_and_keeps_parameter_identity():
    st = PiState(4, 3, dtype=D)
    c = st.c
    pointers = set()
    for _ in range(1000):
        st.append(*_rows(8))
        pointers.add(st._A.data_ptr())
    assert st.rows == 8000
    # Geometric growth (x1.5 from 64) needs ~12 reallocations for 8000 rows, not 1000.
    assert len(pointers) <= 15
    assert st.c is c and st.c.shape == (8000,)
    assert st.A.data_ptr() == st._A.data_ptr()  # views, not copies
    assert st.c.data_ptr() == st._c.data_ptr()


def test_append_values_and_views():
    st = PiState(4, 3, dtype=D)
    chunks = [_rows(k) for k in (3, 70, 1)]
    for A, B, c in chunks:
        st.append(A, B, c)
    assert torch.equal(st.A, torch.cat([ch[0] for ch in chunks]))
    assert torch.equal(st.B, torch.cat([ch[1] for ch in chunks]))
    assert torch.equal(st.c.detach(), torch.cat([ch[2] for ch in chunks]))
    st.append(*_rows(2)[:2])
    assert torch.equal(st.c.detach()[-2:], torch.zeros(2, dtype=D))


def test_append_rejects_bad_shapes():
    st = PiState(4, 3, dtype=D)
    A, B, c = _rows(5)
    with pytest.raises(ValueError, match="A_new"):
        st.append(A[:, :2], B, c)
    with pytest.raises(ValueError, match="B_new"):
        st.append(A, B[:4], c)
    with pytest.raises(ValueError, match="c_new"):
        st.append(A, B, c[:3])


@pytest.mark.parametrize("which", ["A", "B", "c"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_append_refuses_non_finite_rows_and_stores_nothing(which, bad):
    st = PiState(4, 3, dtype=D)
    st.append(*_rows(2))
    before = [t.clone() for t in (st.A, st.B, st.c.detach())]
    rows = dict(zip("ABc", _rows(5)))
    rows[which][1] = bad  # one row (a single entry for c)
    with pytest.raises(ValueError, match=rf"append: {which}_new must be finite \(NaN or inf found\); nothing was appended"):
        st.append(rows["A"], rows["B"], rows["c"])
    assert st.rows == 2
    assert all(torch.equal(a, b) for a, b in zip(before, (st.A, st.B, st.c.detach())))
    st.append(rows["A"], rows["B"], rows["c"], check_finite=False)  # the caller vouches for them
    assert st.rows == 7


@pytest.mark.parametrize("check_finite", [True, False])
def test_append_checks_the_rows_as_they_will_be_stored(check_finite):
    # float32 rows past float16's 65504, or float64 coefficients past float32's range, are finite
    # as given and inf once stored: refused whether or not the caller vouched for finiteness.
    torch.manual_seed(0)
    half = PiState(4, 3, dtype=torch.float16)
    A, B, _ = _rows(2, dtype=torch.float32)
    half.append(A, B)
    before = [t.clone() for t in (half.A, half.B, half.c.detach())]
    with pytest.raises(ValueError, match=r"append: A_new has values beyond the range of the torch.float16 store "
                       r"\(\|x\| <= 65504\), which would be stored as inf; nothing was appended"):
        half.append(A * 1e5, B, check_finite=check_finite)
    assert half.rows == 2 and all(torch.equal(a, b) for a, b in zip(before, (half.A, half.B, half.c.detach())))
    single = PiState(4, 3, dtype=torch.float32)
    A, B, c = _rows(3)  # float64 rows
    c[1] = 1e300
    with pytest.raises(ValueError, match=r"append: c_new has values beyond the range of the torch.float32 store"):
        single.append(A, B, c, check_finite=check_finite)
    assert single.rows == 0
    c[1] = float("nan")  # not finite as given: the usual message (the narrowing cast is checked either way)
    with pytest.raises(ValueError, match=r"append: c_new must be finite \(NaN or inf found\)"):
        single.append(A, B, c, check_finite=check_finite)
    half.append(A.float() * 100, B.float(), check_finite=check_finite)  # within range: stored
    assert half.rows == 5 and torch.equal(half.A[2:], (A * 100).half())


def test_append_refuses_meta_rows_and_a_non_bool_check_finite():
    st = PiState(4, 3, dtype=D)
    A, B, c = _rows(2)
    with pytest.raises(ValueError, match="append: B_new is on the meta device"):
        st.append(A, B.to("meta"), c)
    with pytest.raises(TypeError, match="append: check_finite must be a bool, got 'no'"):
        st.append(A, B, c, check_finite="no")
    assert st.rows == 0
    st.append(A, B, c)
    st.truncate(np.int64(1))  # numpy integers are counts too, stored as Python ints
    assert st.rows == 1 and type(st.rows) is int and st.c.shape == (1,)


def test_append_refuses_non_tensors_and_non_float_rows():
    st = PiState(4, 3, dtype=D)
    A, B, c = _rows(5)
    with pytest.raises(TypeError, match="append: A_new must be a tensor, got list"):
        st.append(A.tolist(), B, c)
    with pytest.raises(TypeError, match="append: B_new must be a real floating-point tensor, got torch.int64"):
        st.append(A, B.long(), c)
    with pytest.raises(TypeError, match="append: c_new must be a real floating-point tensor, got torch.complex128"):
        st.append(A, B, c.to(torch.complex128))
    assert st.rows == 0


def test_truncate_and_reserve_name_a_wrong_count():
    st = PiState(4, 3, dtype=D)
    st.append(*_rows(5))
    capacity = st.capacity
    for bad in ("3", 2.0, True):
        with pytest.raises(TypeError, match=rf"truncate: rows must be an int, got {bad!r}"):
            st.truncate(bad)
    for bad in (-5, 2.5, "9", False):
        with pytest.raises(ValueError, match=rf"reserve: capacity must be a non-negative int, got {bad!r}"):
            st.reserve(bad)
    assert st.rows == 5 and st.capacity == capacity


def test_state_dict_round_trip_resizes_and_is_compact():
    st = PiState(4, 3, dtype=D)
    for _ in range(70):
        st.append(*_rows(7))
    sd = st.state_dict()
    assert set(sd) == {"A", "B", "c"} and sd["A"].shape == (490, 3)
    buf = io.BytesIO()
    torch.save(sd, buf)
    # Only the 490 used rows (8 float64 numbers each) are written, not the spare capacity; 4 kB
    # covers torch.save's zip/pickle overhead, and the whole stores would not fit the bound.
    bound = 490 * 8 * 8 + 4000
    assert len(buf.getvalue()) < bound < st.capacity * 8 * 8
    other = PiState(4, 3, dtype=D)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert other.rows == 490
    assert torch.equal(other.A, st.A) and torch.equal(other.B, st.B) and torch.equal(other.c, st.c)


def test_load_state_dict_errors_name_the_key():
    st = PiState(4, 3, dtype=D)
    st.append(*_rows(5))
    sd = st.state_dict()
    bad = dict(sd, B=sd["B"][:4])
    with pytest.raises(RuntimeError, match="B"):
        PiState(4, 3, dtype=D).load_state_dict(bad)
    bad = dict(sd, A=sd["A"][:, :2])
    with pytest.raises(RuntimeError, match="A: expected shape"):
        PiState(4, 3, dtype=D).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="Missing key.*c"):
        PiState(4, 3, dtype=D).load_state_dict({"A": sd["A"], "B": sd["B"]})
    with pytest.raises(RuntimeError, match="Unexpected key.*Amult"):
        PiState(4, 3, dtype=D).load_state_dict(dict(sd, Amult=sd["c"]))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_to_half_keeps_coefficients_fp32(half):
    st = PiState(4, 3, dtype=torch.float32)
    st.append(*_rows(5, dtype=torch.float32))
    c = st.c
    st.to(half)
    assert st.A.dtype == half and st.B.dtype == half
    assert st.c.dtype == torch.float32 and st.c is c
    st.append(*_rows(3, dtype=torch.float32))
    assert st.c.data_ptr() == st._c.data_ptr()
    st.double()
    assert st.A.dtype == D and st.c.dtype == D
    with pytest.raises(ValueError, match="coef_dtype"):
        PiState(4, 3, coef_dtype=torch.bfloat16)


def test_truncate_and_invalid_args():
    st = PiState(4, 3, dtype=D)
    st.append(*_rows(5))
    st.truncate(2)
    assert st.rows == 2 and st.c.shape == (2,)
    with pytest.raises(ValueError, match="truncate"):
        st.truncate(3)
    with pytest.raises(ValueError, match="r_in"):
        PiState(0, 3)
    with pytest.raises(ValueError, match="growth"):
        PiState(2, 3, growth=1.0)


def test_captured_rows_are_dropped_by_zero_grad():
    net = pinet.InfPiMLP(5, 2, 4, 1, dtype=D)
    x = torch.randn(3, 5, dtype=D)
    net(x).sum().backward()
    st = net.layers[1].state
    assert st.pending_rows().rows == 3
    net(x).sum().backward()
    assert st.pending_rows().rows == 6  # two backward passes: rows concatenate, like .grad sums
    net.zero_grad()
    assert st.pending_rows() is None
    net(x).sum().backward()
    st.c.grad.zero_()  # zero_grad(set_to_none=False) style
    assert st.pending_rows() is None


# ---------------------------------------------------------------- huge-page row stores
def _advice_recorder(monkeypatch):
    import pinet.memory as PM

    calls = []
    monkeypatch.setattr(PM, "_madvise", lambda addr, n, flag: calls.append((addr, n, flag)) or 0)
    monkeypatch.setattr(PM, "transparent_huge_pages_mode", lambda: "madvise")
    return PM, calls


def test_large_cpu_stores_are_collapsed_into_huge_pages(monkeypatch):
    PM, calls = _advice_recorder(monkeypatch)
    monkeypatch.setattr(PM, "_enabled", True)
    st = PiState(400, 400, dtype=torch.float32)
    st.append(*_rows(8, 400, 400, torch.float32))
    assert calls == []  # 64-row stores are far below MIN_BYTES
    st.reserve(20_000)
    assert len(calls) == 2  # A and B, not c
    for (addr, n, flag), store in zip(calls, (st._A, st._B)):
        start, end = store.data_ptr(), store.data_ptr() + store.nbytes
        assert flag == 25 and addr % (2 << 20) == 0 and n % (2 << 20) == 0 and n > 0
        assert start <= addr and addr + n <= end  # only whole 2 MiB pages inside the store
    # The rows survived the move to the collapsed stores, and the spare capacity is zero.
    assert st.rows == 8 and torch.all(st._A[8:] == 0) and torch.all(st._B[8:] == 0)
    # A checkpoint load allocates its stores the same way.
    calls.clear()
    big = PiState(400, 400, dtype=torch.float32)
    big.load_state_dict(st.state_dict())
    assert calls == [] and torch.equal(big.A, st.A)  # 8 rows: small
    st.reserve(30_000)
    for _ in range(3):
        st.append(*_rows(4000, 400, 400, torch.float32))
    calls.clear()
    big.load_state_dict(st.state_dict())
    assert len(calls) == 2 and torch.equal(big.A, st.A) and torch.equal(big.B, st.B)


def test_huge_page_advice_can_be_turned_off_and_checks_its_argument(monkeypatch):
    PM, calls = _advice_recorder(monkeypatch)
    monkeypatch.setattr(PM, "_enabled", True)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        PM.set_huge_pages("no")
    assert PM._enabled is True
    PM.set_huge_pages(False)
    assert not PM.huge_pages()
    PM.zeros_rows(10_000, 400)
    assert calls == []
    PM.set_huge_pages(True)
    assert PM.huge_pages()
    t = PM.zeros_rows(10_000, 400, dtype=torch.float64)
    assert len(calls) == 1 and t.dtype == torch.float64 and t.shape == (10_000, 400) and not t.any()
    with pytest.raises(RuntimeError, match="inside"):
        with PM.use_huge_pages(False):
            assert not PM.huge_pages()
            raise RuntimeError("inside")
    assert PM.huge_pages()  # restored after the exception
    with pytest.raises(TypeError, match="use_huge_pages: enabled must be a bool"):
        with PM.use_huge_pages(1):
            pass
    assert PM._enabled is True
    monkeypatch.setattr(PM, "transparent_huge_pages_mode", lambda: "never")
    assert not PM.huge_pages()


@pytest.mark.skipif(
    pinet.memory.transparent_huge_pages_mode() not in ("always", "madvise") or not pinet.memory.huge_pages(),
    reason="the kernel offers no transparent huge pages here",
)
def test_a_large_store_is_backed_by_huge_pages():
    # The kernel's own account (/proc/self/smaps) of the mapping that holds the store. With THP
    # MADV_COLLAPSE the kernel allocates the 2 MiB pages synchronously (compacting if it must), so
    # this holds on a machine with a few MB free, not just by luck of fragmentation.
    st = PiState(400, 400, dtype=torch.float32, capacity=16_384)  # 25 MB per store
    addr = st._B.data_ptr() + (4 << 20)
    huge_kb = None
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and all(ch in "0123456789abcdef-" for ch in head[0]):
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head[0] == "AnonHugePages:":
                huge_kb = int(head[1])
                break
    assert huge_kb is not None and huge_kb >= 2048, huge_kb


def test_zeros_rows_and_fin_state_name_bad_arguments():
    from pinet import memory

    for bad in ((-1, 3), (2.5, 3), (3, True)):
        with pytest.raises(ValueError, match=r"zeros_rows: (rows|width) must be a non-negative int"):
            memory.zeros_rows(*bad)
    assert memory.zeros_rows(0, 3).shape == (0, 3)
    # Columns that are not linearly independent: no projector onto their span from (ΩᵀΩ)⁻¹.
    with pytest.raises(ValueError, match=r"FinPiState: omega \(4, 2\) must have rank r=2 .*ΩᵀΩ is singular"):
        pinet.FinPiState(torch.ones(4, 2, dtype=D))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_finite_states_and_nets_accept_half_precision(half):
    # torch.linalg.inv has no half kernels: (ΩᵀΩ)⁻¹ used to fail with "Low precision dtypes not
    # supported" although the dtype check lists both half types as accepted.
    torch.manual_seed(0)
    omega = torch.randn(16, 4, dtype=D)
    st = pinet.FinPiState(omega.to(half))
    ref = torch.linalg.inv(omega.to(half).double().T @ omega.to(half).double())
    assert st.gram_inv.dtype == half
    # rounding of ΩᵀΩ in float32, then of the inverse to the half type (8 or 11 significant bits)
    torch.testing.assert_close(st.gram_inv.double(), ref, rtol=2 * torch.finfo(half).eps, atol=0)
    net = pinet.FinPiMLP(d_in=6, d_out=3, width=16, r=4, depth=1, dtype=half)
    opt = pinet.optim.PiOptimizerWrapper(torch.optim.SGD(net.parameters(), lr=0.1), net)
    x = torch.randn(5, 6).to(half)
    opt.zero_grad()
    net(x).float().square().sum().backward()
    opt.step()
    assert net(x).dtype == half and bool(torch.isfinite(net(x)).all())
    inf = pinet.InfPiMLP(d_in=6, d_out=3, r=4, depth=1)
    assert next(pinet.sample(inf, 32, dtype=half).parameters()).dtype == half


def test_to_meta_and_back_moves_every_store_and_coefficient():
    # `.data =` refuses another tensor type: .to("meta") used to fail half-way, leaving some
    # layers on meta and the coefficients on the CPU.
    net = pinet.InfPiMLP(4, 3, 4, 1)
    rows = [l.state.rows for l in net.pi_layers]
    net.to("meta")
    assert {p.device.type for p in net.parameters()} == {"meta"}
    assert all(l.state.A.is_meta and l.state.B.is_meta for l in net.pi_layers)
    assert [l.state.rows for l in net.pi_layers] == rows and all(p.requires_grad for p in net.parameters())
    net.to_empty(device="cpu")  # materialise, as for deferred initialisation
    assert {p.device.type for p in net.parameters()} == {"cpu"}
    assert all(l.state.c.shape == (m,) and l.state.A.device.type == "cpu" for l, m in zip(net.pi_layers, rows))


def test_append_refuses_rows_b_that_are_not_unit():
    # J clamps the cosines ḡ · B_i into [-1, 1]: a B row of another norm silently computes another
    # function. Zero rows (from a zero input) and float16 rounding are fine.
    st = PiState(4, 3, dtype=D)
    A, B, c = _rows(3)
    with pytest.raises(ValueError, match=r"append: B_new rows must be unit vectors \(or zero\): row 1 has norm 3 "):
        st.append(A, torch.cat([B[:1], 3 * B[1:2], B[2:]]), c)
    assert st.rows == 0
    st.append(A, torch.cat([B[:2], torch.zeros(1, 4, dtype=D)]), c)
    half = PiState(400, 3, dtype=torch.float16)
    rows = torch.nn.functional.normalize(torch.randn(8, 400), dim=1)
    half.append(torch.randn(8, 3), rows)  # rounded to float16: norms within 4 eps of 1
    st.append(A, 3 * B, c, check_finite=False)  # the caller vouches for them (the wrapper's own rows)
    assert st.rows == 6
