import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from pinet import functional as F
from pinet import kernels

D = torch.float64


def test_J_known_values_and_monte_carlo():
    c = torch.tensor([-1.0, 0.0, 1.0], dtype=D)
    assert torch.allclose(F.J(c), torch.tensor([0.0, 1 / (2 * math.pi), 0.5], dtype=D))
    # E[relu(u) relu(v)] by Monte Carlo; 2e6 samples give a standard error ~5e-4.
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 2_000_000, generator=g, dtype=D)
    for rho in (-0.7, 0.3, 0.9):
        u, v = z[0], rho * z[0] + math.sqrt(1 - rho**2) * z[1]
        mc = (u.relu() * v.relu()).mean()
        assert abs(mc - F.J(torch.tensor(rho, dtype=D))) < 3e-3
        mc1 = ((u > 0) & (v > 0)).to(D).mean()
        assert abs(mc1 - F.J_prime(torch.tensor(rho, dtype=D))) < 3e-3


def test_J_gradient_is_J_prime_and_finite_at_plus_minus_one():
    c = torch.tensor([-1.0, -1 - 1e-15, -0.5, 0.0, 0.5, 1.0, 1 + 1e-15], dtype=D, requires_grad=True)
    F.J(c).sum().backward()
    assert torch.isfinite(c.grad).all()
    assert torch.allclose(c.grad, F.J_prime(c.detach()))
    assert c.grad[0] == 0 and c.grad[5] == 0.5  # J'(-1) = 0, J'(1) = 1/2


def test_J_gradcheck():
    c = torch.linspace(-0.99, 0.99, 11, dtype=D, requires_grad=True)
    assert gradcheck(F.J, (c,))
    assert gradgradcheck(F.J, (c,))


def _layer_inputs(b=5, r=4, r_out=3, M=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, r, generator=g, dtype=D)
    A = torch.randn(M, r_out, generator=g, dtype=D)
    B = torch.nn.functional.normalize(torch.randn(M, r, generator=g, dtype=D), dim=1)
    c = torch.randn(M, generator=g, dtype=D)
    return x, A, B, c


@pytest.mark.parametrize("layernorm", [False, True])
def test_pi_layer_gradcheck(layernorm):
    x, A, B, c = _layer_inputs()
    x.requires_grad_()
    A.requires_grad_()
    c.requires_grad_()

    def f(x, A, c):
        return kernels.pi_layer(x, A, B, c, layernorm=layernorm)[0]

    assert gradcheck(f, (x, A, c))


@pytest.mark.parametrize("layernorm", [False, True])
def test_pi_layer_matches_spec_formula_elementwise(layernorm):
    x, A, B, c = _layer_inputs()
    out = kernels.pi_layer(x, A, B, c, layernorm=layernorm)[0]
    # Direct evaluation, one sample and one row at a time.
    ref = torch.zeros_like(out)
    for i in range(x.shape[0]):
        s = 1.0 if layernorm else math.sqrt(sum(float(v) ** 2 for v in x[i]))
        gbar = x[i] / x[i].norm()
        for m in range(A.shape[0]):
            q = float(gbar @ B[m])
            Jq = (math.sqrt(max(0.0, 1 - q * q)) + (math.pi - math.acos(q)) * q) / (2 * math.pi)
            ref[i] += s * Jq * float(c[m]) * A[m]
    assert torch.allclose(out, ref, atol=1e-12)


def test_pi_layer_chunked_equals_unchunked():
    x, A, B, c = _layer_inputs(M=23)
    full = kernels.pi_layer(x, A, B, c)[0]
    for chunk in (1, 5, 22, 100):
        assert torch.allclose(kernels.pi_layer(x, A, B, c, chunk_size=chunk)[0], full, atol=1e-13)


def test_pi_layer_zero_input_row_is_finite():
    x, A, B, c = _layer_inputs()
    x[0] = 0
    x.requires_grad_()
    out = kernels.pi_layer(x, A, B, c)[0]
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_pi_rows_sqnorm_matches_finite_frobenius_norm():
    # ‖Δ‖² = tr(Aᵀ K A) is the limit of the Frobenius norm of n^-1/2 Aᵀ relu(Ω Bᵀ)ᵀ; at n = 2^20
    # the relative fluctuation of the Gram estimate is ~ n^-1/2 ≈ 1e-3, so 2% is a safe margin.
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 3, generator=g, dtype=D)
    B = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=D), dim=1)
    n = 2**20
    omega = torch.randn(n, 4, generator=g, dtype=D)
    W = A.T @ torch.relu(omega @ B.T).T / math.sqrt(n)
    assert abs(F.pi_rows_sqnorm(A, B) / W.square().sum() - 1) < 0.02
    coef = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5, 1.0], dtype=D)
    assert torch.allclose(F.pi_rows_sqnorm(A, B, coef), F.pi_rows_sqnorm(A * coef[:, None], B))


def test_project_is_the_orthogonal_projector():
    g = torch.Generator().manual_seed(4)
    omega = torch.randn(50, 3, generator=g, dtype=D)
    G = torch.linalg.inv(omega.T @ omega)
    P = omega @ G @ omega.T
    X = torch.randn(50, 7, generator=g, dtype=D)
    assert torch.allclose(F.project(X, omega, G), P @ X)
    v = torch.randn(50, generator=g, dtype=D)
    assert torch.allclose(F.project(v, omega, G), P @ v)
    assert torch.allclose(F.project(F.project(X, omega, G), omega, G), F.project(X, omega, G))


def test_relu_kernel_matches_scaled_J():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, generator=g, dtype=D) * 3
    K = F.relu_kernel(x)
    nx = x.norm(dim=1)
    cos = (x @ x.T) / (nx[:, None] * nx[None, :])
    assert torch.allclose(K, nx[:, None] * nx[None, :] * F.J(cos))
