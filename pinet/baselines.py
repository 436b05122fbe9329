"""Baselines for π-nets: the NNGP and NTK of the same ReLU MLP, kernel regression, and a finite MLP
trained without projection.

Architecture shared by everything here (``depth`` = number of hidden π-layers, as in
:class:`pinet.InfPiMLP`): an input layer, ``depth`` hidden layers and an output layer, i.e.
``depth + 2`` weight matrices and ``depth + 1`` ReLUs. Multipliers follow the π-net: ``α_in``
(``first_layer_alpha``) on the first layer's output, ``α_out`` (``last_layer_alpha``) on the network
output, ``β`` (``bias_alpha``) on every bias and ``β_out`` (``last_bias_alpha``, default ``β``) on
the output bias; ``β = 0`` means no biases.

Kernels (:func:`nngp_kernel`, :func:`ntk_kernel`) are the infinite-width limits of the
*NTK-parametrised* MLP (:class:`MLP` with ``parametrization="ntk"``): weights ``N(0, 1)``, each
layer divides by ``sqrt(fan_in)``, biases ``N(0, bias_var)``::

    h₀ = α_in (W₀ x / √d + β b₀)
    h_l = W_l relu(h_{l-1}) / √n + β b_l                 l = 1 .. depth
    f  = α_out (W relu(h_depth) / √n + β_out b)

With ``R(Σ)(x, x') = √(Σ(x,x) Σ(x',x')) J(ρ)`` and ``Ṙ(Σ)(x, x') = J'(ρ)``, ``ρ`` the correlation,
``J``/``J'`` from :mod:`pinet.functional` (the same functions the π-limit is built on)::

    Σ₀ = α_in² (x·x'/d + β² v_b)                Θ₀ = α_in² (m_in x·x'/d + m_b β²)
    Σ_l = R(Σ_{l-1}) + β² v_b                    Θ_l = R(Σ_{l-1}) + m_b β² + Ṙ(Σ_{l-1}) Θ_{l-1}
    Σ_out = α_out² (R(Σ_L) + β_out² v_b)         Θ_out = α_out² (m_out R(Σ_L) + m_b β_out² + Ṙ(Σ_L) Θ_L)

``v_b`` is the bias variance at initialisation (``bias_var``; 0 by default, like the π-net whose
biases start at zero) and ``m_in, m_out, m_b`` are the π-net's learning-rate multipliers
(``first_layer_lr_mult``, ``last_layer_lr_mult``, ``bias_lr_mult``): with per-group learning rates
``η m_p`` gradient descent follows the kernel ``Σ_p m_p ∇_p f ∇_p f'``, so the NTK weights each
parameter group's contribution by its multiplier. Weights are ``N(0, 1)`` with no He factor 2, so
``R`` halves the variance per layer exactly as ``J(1) = 1/2`` does in the π-limit. Both kernels are
per output coordinate (outputs are independent and share the kernel).

:class:`MLP` with ``parametrization="mup"`` (the default) is the finite baseline trained without
projection: μP, written in the π-net's own coordinates (see its docstring).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import J, J_prime

__all__ = ["nngp_kernel", "ntk_kernel", "kernel_ridge", "one_hot_targets", "accuracy", "KernelRegressor", "MLP"]


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int (number of hidden layers), got {depth!r}")
    return depth


def _check_num(name: str, v, *, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return float(v)


def _check_inputs(X1: Tensor, X2: Tensor | None) -> tuple[Tensor, Tensor]:
    if not isinstance(X1, Tensor) or X1.dim() != 2:
        raise ValueError(f"X1 must be a 2-d tensor (N1, d), got {getattr(X1, 'shape', type(X1).__name__)}")
    if X2 is None:
        X2 = X1
    if not isinstance(X2, Tensor) or X2.dim() != 2 or X2.shape[1] != X1.shape[1]:
        got = getattr(X2, "shape", type(X2).__name__)
        raise ValueError(f"X2 must be a 2-d tensor (N2, {X1.shape[1]}), got {got}")
    if not X1.is_floating_point():
        X1 = X1.double()
    X2 = X2.to(X1.dtype)
    return X1, X2


def _relu_step(S: Tensor, d1: Tensor, d2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One ReLU: covariance ``S`` (N1, N2) with variances ``d1`` (N1,), ``d2`` (N2,) ->
    ``R`` (N1, N2), ``Ṙ`` (N1, N2) and the new variances ``d1/2``, ``d2/2`` (``J(1) = 1/2``)."""
    norm = torch.sqrt(d1[:, None] * d2[None, :])
    rho = S / norm.clamp_min(torch.finfo(S.dtype).tiny)
    # J clamps rho to [-1, 1]: rounding can push correlations of identical inputs past 1.
    R = norm * J(rho)
    Rdot = J_prime(rho)
    # A ReLU halves the variance: E[relu(u)²] = σ² J(1) = σ²/2.
    return R, Rdot, d1 * 0.5, d2 * 0.5


def _kernels(
    X1: Tensor,
    X2: Tensor | None,
    depth: int,
    first_layer_alpha: float,
    last_layer_alpha: float,
    bias_alpha: float,
    last_bias_alpha: float | None,
    bias_var: float,
    first_layer_lr_mult: float,
    last_layer_lr_mult: float,
    bias_lr_mult: float,
    want_ntk: bool,
) -> tuple[Tensor, Tensor | None]:
    depth = _check_depth(depth)
    a_in = _check_num("first_layer_alpha", first_layer_alpha)
    a_out = _check_num("last_layer_alpha", last_layer_alpha)
    beta = _check_num("bias_alpha", bias_alpha)
    beta_out = beta if last_bias_alpha is None else _check_num("last_bias_alpha", last_bias_alpha)
    vb = _check_num("bias_var", bias_var, nonneg=True)
    m_in = _check_num("first_layer_lr_mult", first_layer_lr_mult, nonneg=True)
    m_out = _check_num("last_layer_lr_mult", last_layer_lr_mult, nonneg=True)
    m_b = _check_num("bias_lr_mult", bias_lr_mult, nonneg=True)
    X1, X2 = _check_inputs(X1, X2)
    d = X1.shape[1]
    lin = X1 @ X2.T / d  # (N1, N2)
    d1 = X1.square().sum(1) / d  # (N1,)
    d2 = X2.square().sum(1) / d  # (N2,)
    S = a_in**2 * (lin + beta**2 * vb)
    d1, d2 = a_in**2 * (d1 + beta**2 * vb), a_in**2 * (d2 + beta**2 * vb)
    T = a_in**2 * (m_in * lin + m_b * beta**2) if want_ntk else None
    for _ in range(depth):
        R, Rdot, d1, d2 = _relu_step(S, d1, d2)
        if want_ntk:
            T = R + m_b * beta**2 + Rdot * T
        S = R + beta**2 * vb
        d1, d2 = d1 + beta**2 * vb, d2 + beta**2 * vb
    R, Rdot, _, _ = _relu_step(S, d1, d2)
    nngp = a_out**2 * (R + beta_out**2 * vb)
    ntk = a_out**2 * (m_out * R + m_b * beta_out**2 + Rdot * T) if want_ntk else None
    return nngp, ntk


def nngp_kernel(
    X1: Tensor,
    X2: Tensor | None = None,
    *,
    depth: int = 1,
    first_layer_alpha: float = 1.0,
    last_layer_alpha: float = 1.0,
    bias_alpha: float = 1.0,
    last_bias_alpha: float | None = None,
    bias_var: float = 0.0,
) -> Tensor:
    """NNGP kernel ``Σ_out`` of the ReLU MLP (module docstring): ``(N1, d), (N2, d) -> (N1, N2)``.

    ``X2=None`` means ``X2 = X1``. Computed in the inputs' dtype (integers become float64); use
    float64 for kernel regression. ``bias_var`` is the bias variance at initialisation (0: biases
    start at zero, as in the π-net, and do not enter the NNGP).
    """
    nngp, _ = _kernels(X1, X2, depth, first_layer_alpha, last_layer_alpha, bias_alpha, last_bias_alpha,
                       bias_var, 1.0, 1.0, 1.0, want_ntk=False)  # fmt: skip
    return nngp


def ntk_kernel(
    X1: Tensor,
    X2: Tensor | None = None,
    *,
    depth: int = 1,
    first_layer_alpha: float = 1.0,
    last_layer_alpha: float = 1.0,
    bias_alpha: float = 1.0,
    last_bias_alpha: float | None = None,
    bias_var: float = 0.0,
    first_layer_lr_mult: float = 1.0,
    last_layer_lr_mult: float = 1.0,
    bias_lr_mult: float = 1.0,
) -> Tensor:
    """Neural tangent kernel ``Θ_out`` of the ReLU MLP (module docstring): ``(N1, d), (N2, d) -> (N1, N2)``.

    The learning-rate multipliers weight each parameter group's gradient contribution, as in
    :func:`pinet.optim.param_groups` (hidden weights have multiplier 1).
    """
    mults = (first_layer_lr_mult, last_layer_lr_mult, bias_lr_mult)
    _, ntk = _kernels(X1, X2, depth, first_layer_alpha, last_layer_alpha, bias_alpha, last_bias_alpha,
                      bias_var, *mults, want_ntk=True)  # fmt: skip
    return ntk


# The explicit inverse is what the reference transfer script uses by default (its --solve-kernel
# switches to torch.solve); both are kept so that its pipeline can be reproduced, Cholesky is the
# default here. One eigendecomposition serves every λ, but on the development CPU (AMD EPYC Zen 1,
# one thread, float64) it costs 12x (N = 1000) to 21x (N = 2000) one Cholesky factorisation, so
# "auto" uses it only from this many ridges on.
_EIGH_FROM = 16
_METHODS = ("auto", "cholesky", "solve", "inverse", "eigh")


def one_hot_targets(y: Tensor, num_classes: int | None = None, *, center: bool = True, dtype=torch.float64) -> Tensor:
    """Regression targets for classification: labels ``y`` (N,) in ``[0, k)`` -> (N, k) one-hot,
    minus ``1/k`` with ``center`` (the reference's MSE targets). Centering subtracts the same value
    from every class column of a kernel-ridge prediction, so it never changes the argmax."""
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"one_hot_targets: y must be (N,) integer labels, got {getattr(y, 'shape', y)!r}")
    if y.numel() and y.min() < 0:
        raise ValueError("one_hot_targets: class labels must be >= 0")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.numel() and int(y.max()) >= k:
        raise ValueError(f"one_hot_targets: label {int(y.max())} is not below num_classes={k}")
    Y = torch.nn.functional.one_hot(y.long(), k).to(dtype)
    return Y - 1.0 / k if center else Y


def _ridges(ridge) -> tuple[list[float], bool]:
    many = isinstance(ridge, (list, tuple))
    vals = list(ridge) if many else [ridge]
    if many and not vals:
        raise ValueError("ridge: expected at least one value")
    return [_check_num("ridge", v, nonneg=True) for v in vals], many


def kernel_ridge(
    K_train: Tensor,
    Y: Tensor,
    K_test: Tensor | None = None,
    ridge: float | list[float] | tuple[float, ...] = 1e-4,
    *,
    relative: bool = False,
    method: str = "auto",
) -> Tensor:
    """Kernel ridge regression ``f(X*) = K(X*, X) (K(X, X) + λ I)⁻¹ Y`` (spec, "Feature kernel").

    Args:
        K_train: (N, N) symmetric kernel of the training inputs.
        Y: (N, k) targets (e.g. :func:`one_hot_targets`) or (N,).
        K_test: (N', N) kernel between test and training inputs; ``None``: return the dual
            coefficients ``α = (K + λ I)⁻¹ Y`` (N, k) instead of predictions.
        ridge: ``λ >= 0``, or a list/tuple of them (the result then has a leading dimension R). The
            reference transfer script uses ``λ = 1e-4`` (and ``1e-8`` in quick checks), absolute.
        relative: ``λ`` is multiplied by ``mean(diag K)`` (a scale-free ridge; ``KernelRegressor``'s
            default), instead of being used as is (the spec's and the reference's ``λ I``).
        method: ``"cholesky"`` (an error if ``K + λI`` is not numerically positive definite),
            ``"solve"`` (LU, ``torch.linalg.solve``), ``"inverse"`` (explicit ``torch.linalg.inv``,
            the reference's default), ``"eigh"`` (one eigendecomposition ``K = V diag(e) Vᵀ`` for all
            λ: ``α = V diag(1/(e + λ)) Vᵀ Y``), or ``"auto"``: Cholesky per λ, ``eigh`` from 16 λ on
            (an eigendecomposition costs 12-21 Cholesky factorisations on the development CPU).

    Returns:
        (N', k) predictions (or (N, k) coefficients), with a leading (R,) if ``ridge`` is a sequence;
        a 1-d ``Y`` gives k = 1. Computed in ``K_train``'s dtype (use float64).
    """
    if not isinstance(K_train, Tensor) or K_train.dim() != 2 or K_train.shape[0] != K_train.shape[1]:
        raise ValueError(f"kernel_ridge: K_train must be a square (N, N) tensor, got {getattr(K_train, 'shape', K_train)!r}")
    N = K_train.shape[0]
    if not isinstance(Y, Tensor) or Y.dim() not in (1, 2) or Y.shape[0] != N:
        raise ValueError(f"kernel_ridge: Y must be (N,) or (N, k) with N={N}, got {getattr(Y, 'shape', Y)!r}")
    if K_test is not None and (not isinstance(K_test, Tensor) or K_test.dim() != 2 or K_test.shape[1] != N):
        raise ValueError(f"kernel_ridge: K_test must be (N', {N}), got {getattr(K_test, 'shape', K_test)!r}")
    if method not in _METHODS:
        raise ValueError(f"kernel_ridge: method must be one of {_METHODS}, got {method!r}")
    lams, many = _ridges(ridge)
    Y = Y.to(K_train.dtype)
    Y = Y[:, None] if Y.dim() == 1 else Y
    if relative:
        scale = K_train.diagonal().mean().clamp_min(torch.finfo(K_train.dtype).tiny).item()
        lams = [lam * scale for lam in lams]
    if method == "auto":
        method = "eigh" if len(lams) >= _EIGH_FROM else "cholesky"
    eye = torch.eye(N, dtype=K_train.dtype, device=K_train.device)
    alphas = []
    if method == "eigh":
        e, V = torch.linalg.eigh(K_train)
        VtY = V.T @ Y
        alphas = [V @ (VtY / (e + lam)[:, None]) for lam in lams]
    else:
        for lam in lams:
            A = K_train + lam * eye
            if method == "cholesky":
                L, info = torch.linalg.cholesky_ex(A)
                if int(info) != 0:
                    raise ValueError(
                        f"kernel_ridge: K + {lam:g} I is not positive definite to working precision "
                        f"(Cholesky failed at column {int(info)}); use a larger ridge, float64, or "
                        "method='eigh' / 'solve'"
                    )
                alphas.append(torch.cholesky_solve(Y, L))
            elif method == "solve":
                alphas.append(torch.linalg.solve(A, Y))
            else:
                alphas.append(torch.linalg.inv(A) @ Y)
    outs = alphas if K_test is None else [K_test.to(K_train.dtype) @ a for a in alphas]
    return torch.stack(outs) if many else outs[0]


def accuracy(pred: Tensor, y: Tensor) -> float | list[float]:
    """Fraction of rows whose argmax matches ``y`` (N,): ``pred`` (N, k) -> float, or (R, N, k)
    (several ridges) -> one float per ridge."""
    if not isinstance(pred, Tensor) or pred.dim() not in (2, 3) or pred.shape[-2] != y.shape[0]:
        raise ValueError(f"accuracy: pred must be (N, k) or (R, N, k) with N={y.shape[0]}, got "
                         f"{getattr(pred, 'shape', pred)!r}")  # fmt: skip
    hit = (pred.argmax(-1) == y.to(pred.device)).double().mean(-1)
    return hit.item() if pred.dim() == 2 else hit.tolist()


class KernelRegressor:
    """Kernel ridge regression / classification with the NNGP or NTK of the ReLU MLP, a feature
    kernel, any kernel function, or a precomputed kernel.

    ``fit(X, y)`` solves ``(K + λ'·I) α = Y`` on the training inputs ``X`` (N, d); ``predict(X')``
    returns ``K(X', X) α`` (N', k). ``λ' = λ·mean(diag K)`` with ``relative_ridge=True`` (default: a
    ridge that does not depend on the kernel's overall scale) or ``λ' = λ`` with
    ``relative_ridge=False`` (the spec's and the reference transfer script's ``K + λI``, λ = 1e-4 or
    1e-8 there). ``y`` is either integer class labels (N,) (classification: targets are one-hot minus
    ``1/k``, the reference's MSE targets for ``k = 10``; the shift never changes the argmax) or real
    targets (N,) / (N, k) (regression). With the NTK this is the prediction of an infinitely wide
    network trained to convergence by gradient descent on the MSE from an initialisation with zero
    output (the π-net's zero readout), plus ridge; with the NNGP it is the Gaussian-process posterior
    mean with noise variance ``λ'``.

    Args:
        kind: ``"ntk"``, ``"nngp"``, ``"precomputed"`` (``fit(K_train (N, N), y)``,
            ``predict(K_test (N', N))``) or a callable ``kernel(X1, X2) -> (N1, N2)`` (``X2`` may be
            ``None`` for ``K(X1, X1)``), e.g. ``functools.partial(pinet.feature_kernel, net)``.
        depth: number of hidden layers (π-net convention: ``depth + 1`` ReLUs; NNGP/NTK only).
        ridge: ``λ >= 0``, or a list/tuple of them: then one fit serves every λ and
            :meth:`predict` returns (R, N', k), :meth:`score` one accuracy per λ.
        relative_ridge: see above.
        method: linear solver, as in :func:`kernel_ridge`; ``"auto"`` here additionally falls back
            to least squares when Cholesky fails (ridge 0 with repeated points).
        dtype: dtype of the kernel computation and solve (float64 by default: kernel matrices of
            a few thousand points are ill-conditioned in float32).
        **kernel_kwargs: multipliers passed to :func:`nngp_kernel` / :func:`ntk_kernel`.
    """

    def __init__(
        self, kind="ntk", depth: int = 1, ridge: float | list[float] = 1e-3, *, relative_ridge: bool = True,
        method: str = "auto", dtype=torch.float64, **kernel_kwargs,
    ) -> None:  # fmt: skip
        if not (callable(kind) or kind in ("ntk", "nngp", "precomputed")):
            raise ValueError(f"KernelRegressor: kind must be 'ntk', 'nngp', 'precomputed' or a kernel function, got {kind!r}")
        if method not in _METHODS:
            raise ValueError(f"KernelRegressor: method must be one of {_METHODS}, got {method!r}")
        self.kind = kind
        self.depth = _check_depth(depth)
        lams, many = _ridges(ridge)
        self.ridge = lams if many else lams[0]
        self.relative_ridge = bool(relative_ridge)
        self.method = method
        self.dtype = dtype
        allowed = {"first_layer_alpha", "last_layer_alpha", "bias_alpha", "last_bias_alpha", "bias_var"}
        if kind == "ntk":
            allowed |= {"first_layer_lr_mult", "last_layer_lr_mult", "bias_lr_mult"}
        elif kind not in ("nngp",):
            allowed = set()
        unknown = set(kernel_kwargs) - allowed
        if unknown:
            raise ValueError(
                f"KernelRegressor({kind!r}): unknown kernel argument(s) {sorted(unknown)}; "
                f"allowed: {sorted(allowed)}"
            )
        self.kernel_kwargs = kernel_kwargs
        self.X_train: Tensor | None = None
        self.alpha: Tensor | None = None
        self.num_classes: int | None = None

    def kernel(self, X1: Tensor, X2: Tensor | None = None) -> Tensor:
        """The kernel matrix ``(N1, d), (N2, d) -> (N1, N2)`` in ``self.dtype``."""
        if self.kind == "precomputed":
            raise RuntimeError("KernelRegressor('precomputed') has no kernel function; pass kernel matrices")
        if callable(self.kind):
            return self.kind(X1, X2).to(self.dtype)
        fn = ntk_kernel if self.kind == "ntk" else nngp_kernel
        X1 = X1.to(self.dtype)
        X2 = None if X2 is None else X2.to(self.dtype)
        return fn(X1, X2, depth=self.depth, **self.kernel_kwargs)

    def _targets(self, y: Tensor, n: int) -> Tensor:
        if not isinstance(y, Tensor) or y.shape[0] != n or y.dim() not in (1, 2):
            got = getattr(y, "shape", type(y).__name__)
            raise ValueError(
                f"KernelRegressor.fit: y must be (N,) labels or (N, k) targets with N={n}, got {got}"
            )
        if y.dim() == 1 and not y.is_floating_point():
            if y.min() < 0:
                raise ValueError("KernelRegressor.fit: class labels must be >= 0")
            Y = one_hot_targets(y, dtype=self.dtype)
            self.num_classes = Y.shape[1]
            return Y
        self.num_classes = None
        Y = y.to(self.dtype)
        return Y[:, None] if Y.dim() == 1 else Y

    def fit(self, X: Tensor, y: Tensor) -> "KernelRegressor":
        """Fit on ``X`` (N, d) (``K_train`` (N, N) if precomputed) and ``y`` (N,) labels or (N,)/(N, k)
        targets. Returns ``self``."""
        if not isinstance(X, Tensor) or X.dim() < 2:
            got = getattr(X, "shape", type(X).__name__)
            raise ValueError(f"KernelRegressor.fit: X must be (N, d), got {got}")
        if self.kind == "precomputed" and X.shape[0] != X.shape[1]:
            raise ValueError(f"KernelRegressor('precomputed').fit: X must be the (N, N) training kernel, got {tuple(X.shape)}")
        Y = self._targets(y, X.shape[0])
        K = X.to(self.dtype) if self.kind == "precomputed" else self.kernel(X)
        method = self.method
        try:
            self.alpha = kernel_ridge(K, Y, None, self.ridge, relative=self.relative_ridge,
                                      method="cholesky" if method == "auto" and not isinstance(self.ridge, list) else method)  # fmt: skip
        except ValueError:
            if method != "auto":
                raise
            # auto with one ridge: singular (ridge 0 and repeated points, or a rank-deficient kernel):
            # least squares, as documented.
            lam = self.ridge * (K.diagonal().mean().clamp_min(torch.finfo(K.dtype).tiny) if self.relative_ridge else 1.0)
            A = K + lam * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
            self.alpha = torch.linalg.lstsq(A, Y).solution
        self.X_train = None if self.kind == "precomputed" else (X if callable(self.kind) else X.to(self.dtype))
        return self

    def predict(self, X: Tensor) -> Tensor:
        """Regression output ``(N', d) -> (N', k)`` (k = 1 for 1-d real targets; (R, N', k) with
        several ridges). Precomputed: ``X`` is ``K_test`` (N', N)."""
        if self.alpha is None:
            raise RuntimeError("KernelRegressor.predict: call fit() first")
        K = X.to(self.dtype) if self.kind == "precomputed" else self.kernel(X, self.X_train)
        n = self.alpha.shape[-2]
        if K.dim() != 2 or K.shape[1] != n:
            raise ValueError(f"KernelRegressor.predict: the test kernel must be (N', {n}), got {tuple(K.shape)}")
        return K @ self.alpha

    def predict_labels(self, X: Tensor) -> Tensor:
        """Class predictions ``(N', d) -> (N',)`` (argmax of :meth:`predict`; (R, N') with several ridges)."""
        return self.predict(X).argmax(dim=-1)

    def score(self, X: Tensor, y: Tensor) -> float | list[float]:
        """Accuracy of :meth:`predict_labels` on ``X`` (N', d) against labels ``y`` (N',) (a list, one
        per ridge, with several ridges)."""
        if self.num_classes is None:
            raise RuntimeError("KernelRegressor.score: needs a classifier (fit with integer labels)")
        return accuracy(self.predict(X), y)


class _Dense(nn.Module):
    """One layer of :class:`MLP`: ``alpha (act(h) (scale·W)ᵀ + bias_alpha b)``, (b, fan_in) -> (b, fan_out).

    ``act`` is the identity for the input layer and ReLU (of ``h / ‖h‖`` with layernorm) otherwise.
    """

    def __init__(self, fan_in, fan_out, *, scale, alpha, bias_alpha, relu, layernorm, device, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(fan_out, fan_in, device=device, dtype=dtype))
        if bias_alpha != 0.0:
            self.bias = nn.Parameter(torch.zeros(fan_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.scale, self.alpha, self.bias_alpha = scale, alpha, bias_alpha
        self.relu, self.layernorm = relu, layernorm

    def forward(self, h: Tensor) -> Tensor:
        if self.relu:
            if self.layernorm:
                h = h / h.norm(dim=1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
            h = torch.relu(h)
        out = h @ self.weight.T
        if self.scale != 1.0:
            out = out * self.scale
        if self.bias is not None:
            out = out + self.bias_alpha * self.bias
        return self.alpha * out

    def extra_repr(self) -> str:
        return (f"fan_in={self.weight.shape[1]}, fan_out={self.weight.shape[0]}, scale={self.scale:.4g}, "
                f"alpha={self.alpha}, bias_alpha={self.bias_alpha}, relu={self.relu}")  # fmt: skip


class MLP(nn.Module):
    """Finite ReLU MLP of width ``n`` trained *without* projection: ``(b, d_in) -> (b, d_out)``.

    Same layers, multipliers and ``depth`` convention as :class:`pinet.FinPiMLP` (``self.layers``:
    input, ``depth`` hidden, output; each with ``weight`` and optional ``bias``), so
    :func:`pinet.optim.param_groups` and :class:`pinet.optim.PiOptimizerWrapper` apply unchanged
    (the wrapper finds no projectors and only records/clips gradient norms). Weights are full-rank
    Gaussian; there is no ``Ω`` and gradients are used as is.

    ``parametrization="mup"`` (default): μP written in the π-net's coordinates, the same forward as
    :class:`pinet.FinPiMLP` (pre-activation *vectors* have O(1) norm, coordinates O(n^-½))::

        h₀ = α_in (W₀ x + β b₀),           W₀ ~ N(0, 1/(n d))
        h_l = W_l relu(h_{l-1}) + β b_l,    W_l ~ N(0, 2/n)      (He gain: keeps ‖h‖ through ReLU)
        f  = α_out (W relu(h_L) + β_out b), W = 0                (zero readout, as the π-net)

    Biases start at zero. Plain SGD with a width-independent learning rate then moves every
    layer's pre-activations by O(1) in norm per step: this is μP (Yang & Hu, 2021) with all
    pre-activations rescaled by ``n^-½``, the scaling in which the finite π-net is written. It is the
    natural "same network, no projection, no rank-r initialisation" baseline.

    ``parametrization="ntk"``: the NTK parametrisation whose infinite-width kernels are
    :func:`nngp_kernel` and :func:`ntk_kernel`: ``W ~ N(0, 1)`` everywhere (readout included), each
    layer multiplies by ``fan_in^-½``, biases ``N(0, bias_var)``. Used to check the kernel formulas;
    layernorm is not supported there.

    ``generator`` drives the initialisation (default: the global RNG).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int,
        depth: int = 1,
        *,
        parametrization: str = "mup",
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        bias_var: float = 0.0,
        layernorm: bool = False,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("d_in", d_in), ("d_out", d_out), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MLP: {name} must be a positive int, got {v!r}")
        if parametrization not in ("mup", "ntk"):
            raise ValueError(f"MLP: parametrization must be 'mup' or 'ntk', got {parametrization!r}")
        if parametrization == "ntk" and layernorm:
            raise ValueError("MLP: layernorm is only supported with parametrization='mup'")
        self.d_in, self.d_out, self.width, self.depth = d_in, d_out, width, _check_depth(depth)
        self.parametrization = parametrization
        a_in = _check_num("first_layer_alpha", first_layer_alpha)
        a_out = _check_num("last_layer_alpha", last_layer_alpha)
        beta = _check_num("bias_alpha", bias_alpha)
        beta_out = beta if last_bias_alpha is None else _check_num("last_bias_alpha", last_bias_alpha)
        self.bias_var = _check_num("bias_var", bias_var, nonneg=True)
        dtype = dtype or torch.get_default_dtype()
        ntk = parametrization == "ntk"
        n = width
        kw = dict(layernorm=layernorm, device=device, dtype=dtype)
        s_in, s_n = (d_in**-0.5, n**-0.5) if ntk else (1.0, 1.0)  # NTK: divide by sqrt(fan_in)
        layers = [_Dense(d_in, n, scale=s_in, alpha=a_in, bias_alpha=beta, relu=False, **kw)]
        layers += [_Dense(n, n, scale=s_n, alpha=1.0, bias_alpha=beta, relu=True, **kw) for _ in range(depth)]
        layers.append(_Dense(n, d_out, scale=s_n, alpha=a_out, bias_alpha=beta_out, relu=True, **kw))
        # Roles as pinet's layers declare them, so that pinet.optim.param_groups gives this MLP the
        # reference's first/last/bias learning-rate multipliers too.
        for i, layer in enumerate(layers):
            layer.pi_role = "input" if i == 0 else "readout" if i == len(layers) - 1 else "hidden"
        self.layers = nn.ModuleList(layers)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the initialisation described in the class docstring."""
        ntk = self.parametrization == "ntk"
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            w = layer.weight
            z = torch.randn(w.shape, generator=generator, dtype=torch.float64, device=w.device)
            if ntk:
                std = 1.0
            elif i == 0:
                std = (self.width * self.d_in) ** -0.5
            elif i == last:
                std = 0.0
            else:
                std = (2.0 / self.width) ** 0.5
            w.copy_(z * std)
            if layer.bias is not None:
                b = torch.randn(layer.bias.shape, generator=generator, dtype=torch.float64, device=w.device)
                layer.bias.copy_(b * math.sqrt(self.bias_var) if ntk else torch.zeros_like(b))

    def forward(self, x: Tensor) -> Tensor:
        """(b, d_in) -> (b, d_out)."""
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"MLP.forward: x must have shape (batch, {self.d_in}), got {tuple(x.shape)}")
        x = x.to(self.layers[0].weight.dtype)
        for layer in self.layers:
            x = layer(x)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Last hidden activations ``relu(h_depth)`` (b, n) (after layernorm if enabled)."""
        x = x.to(self.layers[0].weight.dtype)
        for layer in self.layers[:-1]:
            x = layer(x)
        if self.layers[-1].layernorm:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return torch.relu(x)

    def extra_repr(self) -> str:
        return f"parametrization={self.parametrization!r}, width={self.width}, depth={self.depth}"
