"""pinet's C++ CPU kernels (x86-64 with AVX2): the ``"native"`` backend's reduce kernel and the
``"fused"`` backend's π-product forward and ``∂ḡ`` backward (:func:`fused_forward`,
:func:`fused_backward_g`, built from the same dot and reduce code; see :mod:`pinet.kernels.fused`).

Two of the four products of a π-layer's step are reductions over the rows of the state,
``u = wᵀ A`` (forward) and ``∂L/∂ḡ = (∂L/∂q)ᵀ B`` (backward): ``(b, M) @ (M, r)`` with a small
batch ``b``. On the 2-core AMD EPYC (Zen 1) this project is developed on, MKL runs them at 17-26
GFLOP/s while the ``(M, r) @ (r, b)`` products of the same step reach 36; the AVX2 kernel here
runs them at 30-35 (``python -m benchmarks.thin_gemm``), and a float32 training step of the
benchmark network at M = 20,000-40,000 takes 20-25% less time (``python -m benchmarks.bench_step
--native``). Elsewhere the gain may be nil or negative: measure before enabling it.

The kernel is C++ compiled on first use with ``g++ -O3 -mavx2 -mfma -fopenmp`` into
``$PINET_CACHE`` (default ``~/.cache/pinet``) and loaded with :mod:`ctypes`; it links the OpenMP
runtime torch already loaded (same ``libgomp.so.1``), so both share one thread pool, and uses
``torch.get_num_threads()`` threads. It serves the ``"native"`` backend of :mod:`pinet.kernels`
(``pinet.kernels.set_backend("native")``, or the older ``pinet.native.enable()``), which raises
:class:`NativeUnavailable` (saying what is missing) instead of falling back. That backend runs
torch's block-wise π-product with these reduce products for float32 CPU tensors; other dtypes
and devices use torch's products. Results equal torch's to float32 rounding (summation order
differs).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ._base import BackendUnavailable

__all__ = ["NativeUnavailable", "fused_backward_g", "fused_forward", "load", "load_fused", "reduce_into"]

# Z (n, K) += V (M, n)ᵀ @ X (M, K), all row-major float32.
# Each thread takes a contiguous range of rows and keeps its own partial Z; within it, blocks of
# 64 rows (100 KB at K = 400, in L2) are reduced one column of V at a time, 64 floats of K per
# register tile (8 AVX accumulators; measured faster from memory than 2×32, 4×16 or 8×8 tiles).
# A block's sum starts from zero and is then added to the partial, so a float32 result carries
# rounding of order eps·(64 + M/64) rather than eps·M.
# PRELUDE is shared with other AVX2 sources built by :func:`_compile` (the benchmark's probe).
PRELUDE = r"""
#include <cstdint>
#include <vector>
#include <immintrin.h>
#include <omp.h>

static inline __m256i tail_mask(int64_t rem) {  // first rem (1..7) lanes
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256((const __m256i*)(m + 8 - rem));
}
"""

# Y (M, n) = X (M, K) @ W (n, K)ᵀ for a tile of R rows: R × C 8-wide FMA accumulators over K,
# masked loads for the K tail, any n (C = 4, then 1). The blocking was picked by measuring 2×4,
# 3×4 and 4×2 on a Zen 1 machine (benchmarks/thin_gemm.py, which also uses it).
DOT = r"""
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int C>
static inline void dot_tile(const float* X, int64_t K, const float* W, float* Y, int64_t ldy) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 x[R];
    for (int r = 0; r < R; ++r) x[r] = _mm256_loadu_ps(X + r * K + k);
    // The next tile's rows, one cache line per 16 floats: streaming 36 vs 31 GFLOP/s measured.
    // Past the last row this names addresses outside X, which a prefetch may do (it never faults).
    if ((k & 15) == 0) for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(X + (R + r) * K + k), _MM_HINT_T0);
    for (int c = 0; c < C; ++c) {
      __m256 w = _mm256_loadu_ps(W + c * K + k);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(x[r], w, acc[r][c]);
    }
  }
  if (k < K) {
    const __m256i m = tail_mask(K - k);
    __m256 x[R];
    for (int r = 0; r < R; ++r) x[r] = _mm256_maskload_ps(X + r * K + k, m);
    for (int c = 0; c < C; ++c) {
      __m256 w = _mm256_maskload_ps(W + c * K + k, m);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(x[r], w, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) Y[r * ldy + c] = hsum8(acc[r][c]);
}

template <int R>
static inline void dot_rows(const float* X, int64_t K, const float* W, int64_t n, float* Y) {
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) dot_tile<R, 4>(X, K, W + c * K, Y + c, n);
  for (; c < n; ++c) dot_tile<R, 1>(X, K, W + c * K, Y + c, n);
}

"""

REDUCE = r"""
template <int KV, bool TAIL>
static inline void block_tile(const float* V, int64_t n, const float* X, int64_t K, int64_t rows,
                              float* Z, __m256i m) {
  __m256 acc[KV];
  for (int v = 0; v < KV; ++v) acc[v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    const __m256 s = _mm256_broadcast_ss(V + i * n);
    for (int v = 0; v < KV; ++v) {
      const __m256 x = (TAIL && v == KV - 1) ? _mm256_maskload_ps(X + i * K + 8 * v, m)
                                             : _mm256_loadu_ps(X + i * K + 8 * v);
      acc[v] = _mm256_fmadd_ps(s, x, acc[v]);
    }
  }
  for (int v = 0; v < KV; ++v) {
    if (TAIL && v == KV - 1) {
      _mm256_maskstore_ps(Z + 8 * v, m, _mm256_add_ps(_mm256_maskload_ps(Z + 8 * v, m), acc[v]));
    } else {
      _mm256_storeu_ps(Z + 8 * v, _mm256_add_ps(_mm256_loadu_ps(Z + 8 * v), acc[v]));
    }
  }
}

static void block_column(const float* V, int64_t n, const float* X, int64_t K, int64_t rows, float* Z) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) block_tile<8, false>(V, n, X + k, K, rows, Z + k, all);
  for (; k + 8 <= K; k += 8) block_tile<1, false>(V, n, X + k, K, rows, Z + k, all);
  if (k < K) block_tile<1, true>(V, n, X + k, K, rows, Z + k, tail_mask(K - k));
}
"""

_SOURCE = PRELUDE + REDUCE + r"""
extern "C" void pinet_reduce_f32(const float* V, int64_t M, int64_t n, const float* X, int64_t K,
                                 float* Z, int nthreads) {
  const int64_t RB = 64;
  std::vector<float> part((size_t)nthreads * n * K, 0.f);
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* Zt = part.data() + (size_t)t * n * K;
    const int64_t per = (M + nt - 1) / nt;
    const int64_t a = t * per < M ? t * per : M, e = a + per < M ? a + per : M;
    for (int64_t r0 = a; r0 < e; r0 += RB) {
      const int64_t rows = r0 + RB < e ? RB : e - r0;
      for (int64_t j = 0; j < n; ++j) block_column(V + r0 * n + j, n, X + r0 * K, K, rows, Zt + j * K);
    }
  }
  for (int t = 0; t < nthreads; ++t)
    for (int64_t q = 0; q < n * K; ++q) Z[q] += part[(size_t)t * n * K + q];
}
"""

_FUSED_SOURCE = PRELUDE + DOT + REDUCE + r"""
#include <cmath>

// arccos(-q) and 2π J(q) = sqrt(1 - q²) + arccos(-q) q for n cosines, 8 lanes at a time (clamped
// to [-1, 1]). arccos by Abramowitz-Stegun 4.4.46: arccos(a) = sqrt(1 - a) p(a) on [0, 1], absolute
// error ≤ 2e-8, and arccos(-q) = arccos(|q|) for q ≤ 0, π - arccos(|q|) for q > 0.
static inline __m256 acos_neg8(__m256 q) {
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), q);
  __m256 p = _mm256_set1_ps(-0.0012624911f);
  const float cs[7] = {0.0066700901f, -0.0170881256f, 0.0308918810f, -0.0501743046f, 0.0889789874f,
                       -0.2145988016f, 1.5707963050f};
  for (int i = 0; i < 7; ++i) p = _mm256_fmadd_ps(p, a, _mm256_set1_ps(cs[i]));
  const __m256 r = _mm256_mul_ps(_mm256_sqrt_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), a),
                                                               _mm256_setzero_ps())), p);
  const __m256 flip = _mm256_sub_ps(_mm256_set1_ps(3.14159265358979f), r);
  return _mm256_blendv_ps(r, flip, _mm256_cmp_ps(q, _mm256_setzero_ps(), _CMP_GT_OQ));
}

static void j_chain(float* q, float* ac, int64_t n) {  // q <- 2π J(q) in place, ac <- arccos(-q)
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f), mone = _mm256_set1_ps(-1.f), zero = _mm256_setzero_ps();
  for (; i < n; i += 8) {
    const __m256i m = n - i >= 8 ? _mm256_set1_epi32(-1) : tail_mask(n - i);
    __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_maskload_ps(q + i, m), mone), one);
    const __m256 a = acos_neg8(x);
    const __m256 s = _mm256_sqrt_ps(_mm256_max_ps(_mm256_fnmadd_ps(x, x, one), zero));
    _mm256_maskstore_ps(q + i, m, _mm256_fmadd_ps(a, x, s));
    _mm256_maskstore_ps(ac + i, m, a);
  }
}

static void dot_block(const float* X, int64_t rows, int64_t K, const float* W, int64_t n, float* Y) {
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) dot_rows<2>(X + i * K, K, W, n, Y + i * n);
  if (i < rows) dot_rows<1>(X + i * K, K, W, n, Y + i * n);
}

// Z (b, K) += V (rows, b)ᵀ X (rows, K) for one block of rows in cache: KB batch columns × NV
// 8-wide vectors of X per register tile (4 × 3: 12 accumulators), so each row of X is loaded once
// per 4 batch columns instead of once per column as in block_column (the block is read from L2
// b / 4 times instead of b times).
template <int KB, int NV, bool TAIL>
static inline void multi_tile(const float* V, int64_t b, const float* X, int64_t K, int64_t rows, float* Z,
                              __m256i m) {
  __m256 acc[KB][NV];
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) acc[kb][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    __m256 x[NV];
    for (int v = 0; v < NV; ++v)
      x[v] = (TAIL && v == NV - 1) ? _mm256_maskload_ps(X + i * K + 8 * v, m) : _mm256_loadu_ps(X + i * K + 8 * v);
    for (int kb = 0; kb < KB; ++kb) {
      const __m256 s = _mm256_broadcast_ss(V + i * b + kb);
      for (int v = 0; v < NV; ++v) acc[kb][v] = _mm256_fmadd_ps(s, x[v], acc[kb][v]);
    }
  }
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) {
      float* z = Z + kb * K + 8 * v;
      if (TAIL && v == NV - 1) {
        _mm256_maskstore_ps(z, m, _mm256_add_ps(_mm256_maskload_ps(z, m), acc[kb][v]));
      } else {
        _mm256_storeu_ps(z, _mm256_add_ps(_mm256_loadu_ps(z), acc[kb][v]));
      }
    }
}

template <int KB>
static void multi_cols(const float* V, int64_t b, const float* X, int64_t K, int64_t rows, float* Z) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 24 <= K; j += 24) multi_tile<KB, 3, false>(V, b, X + j, K, rows, Z + j, all);
  for (; j + 8 <= K; j += 8) multi_tile<KB, 1, false>(V, b, X + j, K, rows, Z + j, all);
  if (j < K) multi_tile<KB, 1, true>(V, b, X + j, K, rows, Z + j, tail_mask(K - j));
}

static void reduce_block(const float* V, int64_t b, const float* X, int64_t K, int64_t rows, float* Z) {
  int64_t k = 0;
  for (; k + 4 <= b; k += 4) multi_cols<4>(V + k, b, X, K, rows, Z + k * K);
  for (; k < b; ++k) multi_cols<1>(V + k, b, X, K, rows, Z + k * K);
}

static const int64_t FB = 64;  // rows per block: 64 rows of r = 400 floats (100 KB) stay in L2

// u (b, ro) = (J(B gᵀ) ⊙ c)ᵀ A, blocks of FB rows per thread; acos (M, b) receives arccos(-q)
// when not null. Each thread keeps a partial u; partials are added at the end.
extern "C" void pinet_fused_fwd(const float* g, const float* A, const float* B, const float* c,
                                int64_t M, int64_t b, int64_t r, int64_t ro, float inv2pi,
                                float* u, float* acos_out, int nthreads) {
  std::vector<float> part((size_t)nthreads * b * ro, 0.f);
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* P = part.data() + (size_t)t * b * ro;
    std::vector<float> w(FB * b), ac(FB * b);
    const int64_t per = (M + nt - 1) / nt;
    const int64_t a0 = t * per < M ? t * per : M, e = a0 + per < M ? a0 + per : M;
    for (int64_t r0 = a0; r0 < e; r0 += FB) {
      const int64_t rows = r0 + FB < e ? FB : e - r0;
      dot_block(B + r0 * r, rows, r, g, b, w.data());  // cosines (rows, b)
      j_chain(w.data(), acos_out ? acos_out + r0 * b : ac.data(), rows * b);
      for (int64_t i = 0; i < rows; ++i) {
        const float ci = c[r0 + i] * inv2pi;
        for (int64_t k = 0; k < b; ++k) w[i * b + k] *= ci;
      }
      reduce_block(w.data(), b, A + r0 * ro, ro, rows, P);
    }
  }
  for (int t = 0; t < nthreads; ++t)
    for (int64_t q = 0; q < b * ro; ++q) u[q] += part[(size_t)t * b * ro + q];
}

// gg (b, r) += ((A dᵀ) ⊙ arccos(-q) ⊙ c / 2π)ᵀ B: the gradient of ⟨d, u⟩ with respect to g.
// acos_in (M, b) from the forward, or null to recompute the cosines from the block of B, which
// the reduce then reads from cache.
extern "C" void pinet_fused_bwd_g(const float* g, const float* d, const float* A, const float* B,
                                  const float* c, const float* acos_in, int64_t M, int64_t b, int64_t r,
                                  int64_t ro, float inv2pi, float* gg, int nthreads) {
  std::vector<float> part((size_t)nthreads * b * r, 0.f);
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* P = part.data() + (size_t)t * b * r;
    std::vector<float> gw(FB * b), q(FB * b), ac(FB * b);
    const int64_t per = (M + nt - 1) / nt;
    const int64_t a0 = t * per < M ? t * per : M, e = a0 + per < M ? a0 + per : M;
    for (int64_t r0 = a0; r0 < e; r0 += FB) {
      const int64_t rows = r0 + FB < e ? FB : e - r0;
      dot_block(A + r0 * ro, rows, ro, d, b, gw.data());  // ∂L/∂(J c) (rows, b)
      const float* acb;
      if (acos_in) {
        acb = acos_in + r0 * b;
      } else {
        dot_block(B + r0 * r, rows, r, g, b, q.data());
        j_chain(q.data(), ac.data(), rows * b);
        acb = ac.data();
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float ci = c[r0 + i] * inv2pi;
        for (int64_t k = 0; k < b; ++k) gw[i * b + k] *= acb[i * b + k] * ci;  // ∂L/∂q
      }
      reduce_block(gw.data(), b, B + r0 * r, r, rows, P);
    }
  }
  for (int t = 0; t < nthreads; ++t)
    for (int64_t q = 0; q < b * r; ++q) gg[q] += part[(size_t)t * b * r + q];
}
"""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


class NativeUnavailable(BackendUnavailable):
    """The native kernel cannot be used here; the message says why (CPU, compiler, build)."""


_lib: ctypes.CDLL | None = None


def _cache_dir() -> Path:
    return Path(os.environ.get("PINET_CACHE") or Path.home() / ".cache" / "pinet")


def _compile(source: str, name: str) -> ctypes.CDLL:
    """Compile C++ ``source`` with ``g++ -O3 -mavx2 -mfma -fopenmp`` (once per compiler, source and flags; cached
    as ``$PINET_CACHE/<name>_<hash>.so``) and load it. Raises :class:`NativeUnavailable` saying
    what is missing: an x86-64 CPU with AVX2, a compiler, or a successful build."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeUnavailable(f"pinet.native needs an x86-64 CPU with AVX2; this is {platform.machine()}")
    cap = torch.backends.cpu.get_cpu_capability()
    if not (cap.startswith("AVX2") or cap.startswith("AVX512")):
        raise NativeUnavailable(f"pinet.native needs AVX2 and FMA; torch reports CPU capability {cap}")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise NativeUnavailable("pinet.native compiles its kernel with g++ (or $CXX); none found on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    key = hashlib.sha256("\n".join([source, cxx, version, *_FLAGS]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    target = cache / f"{name}_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a half-written file.
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
            src.write_text(source)
            done = subprocess.run([cxx, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if done.returncode != 0:
                raise NativeUnavailable(f"pinet.native: compiling the kernel with {cxx} failed:\n{done.stderr}")
            os.replace(out, target)
    return ctypes.CDLL(str(target))


def load() -> None:
    """Build (cached) and load the kernel library now; raises :class:`NativeUnavailable` if it cannot."""
    _load()


def _load() -> ctypes.CDLL:
    """Build (cached on disk) and load pinet's kernel library, once per process."""
    global _lib
    if _lib is None:
        lib = _compile(_SOURCE, "pinet_native")
        P, I = ctypes.c_void_p, ctypes.c_int64
        lib.pinet_reduce_f32.argtypes = [P, I, I, P, I, P, ctypes.c_int]
        lib.pinet_reduce_f32.restype = None
        _lib = lib
    return _lib


def _check(where: str, name: str, t: Tensor) -> None:
    """Raise ``ValueError`` naming ``where`` and ``name`` unless ``t`` is a contiguous 2-d float32
    CPU tensor (what the kernels read through a raw pointer)."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or not t.is_contiguous():
        raise ValueError(
            f"{where}: {name} must be a contiguous 2-d float32 CPU tensor, got "
            f"{t.dtype} on {t.device} with shape {tuple(t.shape)}, contiguous={t.is_contiguous()}"
        )


def reduce_into(out: Tensor, V: Tensor, X: Tensor) -> Tensor:
    """``out += Vᵀ X`` with the native kernel: out (n, K), V (M, n), X (M, K), all contiguous
    float32 on the CPU (``V`` is made contiguous if it is not; it is small). Returns ``out``.
    Works whatever backend is selected (it builds the kernel if needed)."""
    lib = _load()
    V = V.contiguous()
    for name, t in (("out", out), ("V", V), ("X", X)):
        _check("pinet.native.reduce_into", name, t)
    M, K = X.shape
    n = V.shape[1]
    if V.shape[0] != M:
        raise ValueError(f"pinet.native.reduce_into: V must have M = {M} rows like X, got {V.shape[0]}")
    if tuple(out.shape) != (n, K):
        raise ValueError(f"pinet.native.reduce_into: out must have shape ({n}, {K}), got {tuple(out.shape)}")
    if M:
        lib.pinet_reduce_f32(V.data_ptr(), M, n, X.data_ptr(), K, out.data_ptr(), torch.get_num_threads())
    return out


_fused_lib: ctypes.CDLL | None = None


def load_fused() -> ctypes.CDLL:
    """Build (cached on disk) and load the fused π-product kernels, once per process; raises
    :class:`NativeUnavailable` if they cannot be built here."""
    global _fused_lib
    if _fused_lib is None:
        lib = _compile(_FUSED_SOURCE, "pinet_fused")
        P, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.pinet_fused_fwd.argtypes = [P, P, P, P, I, I, I, I, F, P, P, ctypes.c_int]
        lib.pinet_fused_fwd.restype = None
        lib.pinet_fused_bwd_g.argtypes = [P, P, P, P, P, P, I, I, I, I, F, P, ctypes.c_int]
        lib.pinet_fused_bwd_g.restype = None
        _fused_lib = lib
    return _fused_lib


_INV_TWO_PI = 1.0 / (2.0 * 3.141592653589793)


def _fused_args(where: str, gbar: Tensor, A: Tensor, B: Tensor, c: Tensor) -> tuple[int, int, int, int]:
    for name, t in (("gbar", gbar), ("A", A), ("B", B)):
        _check(where, name, t)
    if c.dtype != torch.float32 or c.device.type != "cpu" or c.dim() != 1 or not c.is_contiguous():
        raise ValueError(f"{where}: c must be a contiguous 1-d float32 CPU tensor, got {c.dtype} {tuple(c.shape)}")
    b, r = gbar.shape
    M, ro = A.shape
    if tuple(B.shape) != (M, r) or c.shape[0] != M:
        raise ValueError(f"{where}: B must be ({M}, {r}) and c ({M},), got {tuple(B.shape)} and {tuple(c.shape)}")
    return M, b, r, ro


def fused_forward(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, keep: bool) -> tuple[Tensor, Tensor | None]:
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out) by the fused kernel, and ``arccos(-q)`` (M, b) if
    ``keep``. All float32 contiguous CPU tensors: ḡ (b, r), A (M, r_out), B (M, r), c (M,)."""
    lib = load_fused()
    M, b, r, ro = _fused_args("pinet.kernels.native.fused_forward", gbar, A, B, c)
    u = torch.zeros(b, ro)
    acos = torch.empty(M, b) if keep else None
    if M and b:
        lib.pinet_fused_fwd(gbar.data_ptr(), A.data_ptr(), B.data_ptr(), c.data_ptr(), M, b, r, ro, _INV_TWO_PI,
                            u.data_ptr(), None if acos is None else acos.data_ptr(), torch.get_num_threads())  # fmt: skip
    return u, acos


def fused_backward_g(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, acos: Tensor | None, grad_u: Tensor) -> Tensor:
    """``∂⟨grad_u, u⟩/∂ḡ`` (b, r) by the fused kernel; ``acos`` (M, b) from :func:`fused_forward`
    or ``None`` (the cosines are recomputed per block)."""
    lib = load_fused()
    M, b, r, ro = _fused_args("pinet.kernels.native.fused_backward_g", gbar, A, B, c)
    _check("pinet.kernels.native.fused_backward_g", "grad_u", grad_u)
    if acos is not None:
        _check("pinet.kernels.native.fused_backward_g", "acos", acos)
    gg = torch.zeros(b, r)
    if M and b:
        lib.pinet_fused_bwd_g(gbar.data_ptr(), grad_u.data_ptr(), A.data_ptr(), B.data_ptr(), c.data_ptr(),
                              None if acos is None else acos.data_ptr(), M, b, r, ro, _INV_TWO_PI, gg.data_ptr(),
                              torch.get_num_threads())  # fmt: skip
    return gg
