"""pinet's C++ CPU kernels (x86-64 with AVX2): the ``"native"`` backend's reduce kernel and the
``"fused"`` backend's π-product forward and ``∂ḡ`` backward (:func:`fused_forward`,
:func:`fused_backward_g`; see :mod:`pinet.kernels.fused`). The fused kernels exist for two
instruction sets, AVX-512 (F + VL, 32 registers: wider register tiles) and AVX2/FMA, on one
source of the math (the J chain and the block drivers are shared); :func:`fused_isa` says which
runs, the widest the CPU has unless ``$PINET_FUSED_ISA`` or :func:`set_fused_isa` choose.

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

__all__ = [
    "FUSED_ISAS",
    "NativeUnavailable",
    "fused_backward_g",
    "fused_forward",
    "fused_isa",
    "fused_storage",
    "load",
    "load_fused",
    "reduce_into",
    "set_fused_isa",
]

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
// 8 consecutive float32 as one vector; the masked form reads only the first rem (1..7) and sets
// the other lanes to 0. The fused AVX2 build adds overloads for 16-bit rows (found by
// argument-dependent lookup when dot_tile is instantiated for them).
static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8(const float* p, int64_t rem) { return _mm256_maskload_ps(p, tail_mask(rem)); }

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Y (R rows, C columns) = X (R, K) Wᵀ: R × C 8-wide FMA accumulators over K and horizontal sums;
// X stored as S (float32 here, 16-bit rows in the fused build), W float32.
template <int R, int C, typename S>
static inline void dot_tile(const S* X, int64_t K, const float* W, float* Y, int64_t ldy) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 x[R];
    for (int r = 0; r < R; ++r) x[r] = ld8(X + r * K + k);
    // The next tile's rows, one cache line per 64 bytes: streaming 36 vs 31 GFLOP/s measured.
    // Past the last row this names addresses outside X, which a prefetch may do (it never faults).
    if ((k * (int64_t)sizeof(S)) % 64 == 0)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(X + (R + r) * K + k), _MM_HINT_T0);
    for (int c = 0; c < C; ++c) {
      __m256 w = _mm256_loadu_ps(W + c * K + k);
      // Keep w in a register: GCC otherwise folds the load into each of the R FMAs, so the tile
      // loads W R times (in cache on Zen 4: 75 GFLOP/s, 90 with the load pinned).
      __asm__("" : "+x"(w));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(x[r], w, acc[r][c]);
    }
  }
  if (k < K) {
    __m256 x[R];
    for (int r = 0; r < R; ++r) x[r] = ld8(X + r * K + k, K - k);
    for (int c = 0; c < C; ++c) {
      __m256 w = _mm256_maskload_ps(W + c * K + k, tail_mask(K - k));
      __asm__("" : "+x"(w));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(x[r], w, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) for (int c = 0; c < C; ++c) Y[r * ldy + c] = hsum8(acc[r][c]);
}

template <int R, typename S>
static inline void dot_rows(const S* X, int64_t K, const float* W, int64_t n, float* Y) {
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

# arccos(-q) and 2π J(q) on 8 lanes (AVX2; both instruction sets use it: it is a small part of the
# work). arccos by Abramowitz-Stegun 4.4.46: arccos(a) = sqrt(1 - a) p(a) on [0, 1], absolute
# error ≤ 2e-8, and arccos(-q) = arccos(|q|) for q ≤ 0, π - arccos(|q|) for q > 0.
_J_CHAIN = r"""
#include <cmath>

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

// Software prefetch into L2 of n consecutive elements (one per 64-byte line).
template <typename S>
static inline void pf_rows(const S* P, int64_t n) {
  for (int64_t o = 0; o < n; o += 64 / (int64_t)sizeof(S)) _mm_prefetch((const char*)(P + o), _MM_HINT_T1);
}

// Storage types of the state rows: float32, or 16-bit bfloat16 / IEEE half (converted to float32
// as they are loaded).
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
"""

# The two block operations of the fused kernels, once per instruction set, behind one interface:
#   Wprep w(W, n, K)             the small operand W (n, K) (ḡ or δ), laid out for dot_block;
#   dot_block(X, rows, K, w, Y, PF, pfk, far)
#                                Y (rows, n) = X (rows, K) Wᵀ; while it runs, prefetches into L2 the
#                                rows PF (rows, pfk) that the reduce of the same block reads next,
#                                and with `far` its own rows 24 ahead (when no reduce prefetches them);
#   reduce_block(V, b, X, K, rows, Z, pf, pfe)
#                                Z (b, K) += V (rows, b)ᵀ X (rows, K), prefetching [pf, pfe) (the
#                                next block's rows for the next dot) a few lines per row.
# Prefetching is what makes the blocks stream: without it the reduce reads its block of A
# column-tile by column-tile from memory with a row stride, and the step ran 1.6x slower (Zen 4).

# AVX2/FMA: dot by 2 rows × 4 columns of 8-wide accumulators and horizontal sums (DOT); reduce by
# 4 batch columns × 3 vectors (12 accumulators), so each row of X is loaded b / 4 times from L1/L2.
_AVX2_BLOCKS = r"""
// 16-bit rows as 8 float32 (DOT's ld8 for float32 rows); the masked form goes through a
// zero-padded copy (AVX2 has no 16-bit masked load).
static inline __m256 bf16x8(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
static inline __m256 ld8(const bf16_t* p) { return bf16x8(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256 ld8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
template <typename S>
static inline __m256 ld8(const S* p, int64_t rem) {
  alignas(16) S tmp[8] = {};
  for (int64_t i = 0; i < rem; ++i) tmp[i] = p[i];
  return ld8(tmp);
}

struct Wprep {
  const float* w;
  int64_t n;
  Wprep(const float* W, int64_t n_, int64_t) : w(W), n(n_) {}
};

template <typename S>
static void dot_block(const S* X, int64_t rows, int64_t K, const Wprep& W, float* Y,
                      const S* PF, int64_t pfk, bool far) {
  const int64_t n = W.n;
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    if (PF) pf_rows(PF + i * pfk, 2 * pfk);
    if (far) pf_rows(X + (i + 24) * K, 2 * K);
    dot_rows<2>(X + i * K, K, W.w, n, Y + i * n);
  }
  if (i < rows) {
    if (PF) pf_rows(PF + i * pfk, pfk);
    dot_rows<1>(X + i * K, K, W.w, n, Y + i * n);
  }
}

// Z (b, K) += V (rows, b)ᵀ X (rows, K) for one block of rows in cache: KB batch columns × NV
// 8-wide vectors of X per register tile (4 × 3: 12 accumulators), each row of X loaded once per
// 4 batch columns; prefetches [pf, pfe) one line per row.
template <int KB, int NV, bool TAIL, typename S>
static inline void multi_tile(const float* V, int64_t b, const S* X, int64_t K, int64_t rows, float* Z,
                              int64_t rem, const S*& pf, const S* pfe) {
  __m256 acc[KB][NV];
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) acc[kb][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    if (pf < pfe) { _mm_prefetch((const char*)pf, _MM_HINT_T1); pf += 64 / sizeof(S); }
    __m256 x[NV];
    for (int v = 0; v < NV; ++v)
      x[v] = (TAIL && v == NV - 1) ? ld8(X + i * K + 8 * v, rem) : ld8(X + i * K + 8 * v);
    for (int kb = 0; kb < KB; ++kb) {
      const __m256 s = _mm256_broadcast_ss(V + i * b + kb);
      for (int v = 0; v < NV; ++v) acc[kb][v] = _mm256_fmadd_ps(s, x[v], acc[kb][v]);
    }
  }
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) {
      float* z = Z + kb * K + 8 * v;
      if (TAIL && v == NV - 1) {
        const __m256i m = tail_mask(rem);
        _mm256_maskstore_ps(z, m, _mm256_add_ps(_mm256_maskload_ps(z, m), acc[kb][v]));
      } else {
        _mm256_storeu_ps(z, _mm256_add_ps(_mm256_loadu_ps(z), acc[kb][v]));
      }
    }
}

template <int KB, typename S>
static void multi_cols(const float* V, int64_t b, const S* X, int64_t K, int64_t rows, float* Z,
                       const S*& pf, const S* pfe) {
  int64_t j = 0;
  for (; j + 24 <= K; j += 24) multi_tile<KB, 3, false, S>(V, b, X + j, K, rows, Z + j, 0, pf, pfe);
  for (; j + 8 <= K; j += 8) multi_tile<KB, 1, false, S>(V, b, X + j, K, rows, Z + j, 0, pf, pfe);
  if (j < K) multi_tile<KB, 1, true, S>(V, b, X + j, K, rows, Z + j, K - j, pf, pfe);
}

template <typename S>
static void reduce_block(const float* V, int64_t b, const S* X, int64_t K, int64_t rows, float* Z,
                         const S* pf, const S* pfe) {
  int64_t k = 0;
  for (; k + 4 <= b; k += 4) multi_cols<4, S>(V + k, b, X, K, rows, Z + k * K, pf, pfe);
  for (; k < b; ++k) multi_cols<1, S>(V + k, b, X, K, rows, Z + k * K, pf, pfe);
}
"""

# AVX-512 (F + VL): 32 registers. Dot by 2 rows × 8 columns of 16-wide accumulators over a
# zero-padded copy of W, the 8 horizontal sums of a row done together (hsum8x16); reduce by 8
# batch columns × 3 vectors (24 accumulators), so each row of X is loaded once per 8 columns.
# On one Zen 4 core with the block in cache: dot 78 and reduce 106 GFLOP/s, against 60 and 39 for
# the AVX2 blocks (peak 115). Re-measured after both dots' W loads were pinned to registers
# (one block of 64-512 rows, r = 400, b = 8, called in a loop): AVX-512 dot 80 -> 100,
# reduce 107-114; AVX2 dot 75 -> 90 GFLOP/s.
_AVX512_BLOCKS = r"""
static inline __mmask16 kmask(int64_t rem) { return rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1u); }

// 16 consecutive stored elements as float32 (masked: lanes outside m are 0). bfloat16 is the high
// half of a float32; half uses the F16C conversion (exact: every half is a float32).
static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 bf16x16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
static inline __m512 ld16(const bf16_t* p) { return bf16x16(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 ld16(__mmask16 m, const bf16_t* p) { return bf16x16(_mm256_maskz_loadu_epi16(m, p)); }
static inline __m512 ld16(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 ld16(__mmask16 m, const f16_t* p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// 8 accumulators (16 lanes each) -> one ymm holding their 8 horizontal sums, in order.
static inline __m256 hsum8x16(const __m512* a) {
  __m512 s[4];
  for (int p = 0; p < 4; ++p)  // s[p]: 256-bit half h = column 2p + h, 8 partial sums each
    s[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xEE));
  // quad j of lo (hi): 4 partial sums of column j (4 + j)
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], 0x88), _mm512_shuffle_f32x4(s[0], s[1], 0xDD));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], 0x88), _mm512_shuffle_f32x4(s[2], s[3], 0xDD));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(lo, hi, 0x44), _mm512_shuffle_ps(lo, hi, 0xEE));
  const __m512 w = _mm512_add_ps(z, _mm512_shuffle_ps(z, z, 0xB1));  // quad j: [j, j, 4 + j, 4 + j]
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, w));
}

struct Wprep {  // W (n, K) zero-padded to (ceil(n / 8) * 8, Kp), Kp = K rounded up to 16
  std::vector<float> w;
  int64_t n, Kp;
  Wprep(const float* W, int64_t n_, int64_t K) : n(n_), Kp((K + 15) / 16 * 16) {
    w.assign((size_t)((n + 7) / 8 * 8) * Kp, 0.f);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < K; ++k) w[(size_t)j * Kp + k] = W[j * K + k];
  }
};

// Y (R rows, nc ≤ 8 columns) = X (R, K) Wpᵀ for 8 rows of the padded W. TAIL (K not a multiple
// of 16) and FAR are template arguments: with a runtime tail branch GCC kept the accumulators on
// the stack across it (32 extra loads and stores per tile) and tested `far` every 16 columns.
template <int R, bool TAIL, bool FAR, typename S>
static inline void dot16_tile(const S* X, int64_t K, const float* Wp, int64_t Kp, float* Y, int64_t ldy,
                              int64_t nc) {
  __m512 acc[R][8];
  for (int r = 0; r < R; ++r) for (int c = 0; c < 8; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 x[R];
    for (int r = 0; r < R; ++r) x[r] = ld16(X + r * K + k);
    // The next tile's rows into L1 and, with FAR, the rows 24 ahead into L2 (one line per 16
    // floats); past the last row these name addresses outside X, which a prefetch may (it never faults).
    for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(X + (R + r) * K + k), _MM_HINT_T0);
    if (FAR) for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(X + (24 + r) * K + k), _MM_HINT_T1);
    for (int c = 0; c < 8; ++c) {
      __m512 w = _mm512_loadu_ps(Wp + c * Kp + k);
      // Keep w in a register: GCC otherwise folds the load into each of the R FMAs, and the
      // tile then issues 8 R loads of W per 16 columns instead of 8 (load-bound: in cache on
      // Zen 4 the dot ran at 80 GFLOP/s, and 100 with the load pinned).
      __asm__("" : "+v"(w));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(x[r], w, acc[r][c]);
    }
  }
  if (TAIL && k < K) {
    const __mmask16 m = kmask(K - k);
    __m512 x[R];
    for (int r = 0; r < R; ++r) x[r] = ld16(m, X + r * K + k);
    for (int c = 0; c < 8; ++c) {
      __m512 w = _mm512_loadu_ps(Wp + c * Kp + k);
      __asm__("" : "+v"(w));
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(x[r], w, acc[r][c]);
    }
  }
  const __mmask8 om = nc >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << nc) - 1u);
  for (int r = 0; r < R; ++r) _mm256_mask_storeu_ps(Y + r * ldy, om, hsum8x16(acc[r]));
}

template <bool TAIL, bool FAR, typename S>
static void dot_rows16(const S* X, int64_t rows, int64_t K, const float* Wp, int64_t n, int64_t Kp, float* Y,
                       const S* PF, int64_t pfk) {
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    if (PF) pf_rows(PF + i * pfk, 2 * pfk);
    for (int64_t c = 0; c < n; c += 8) dot16_tile<2, TAIL, FAR>(X + i * K, K, Wp + c * Kp, Kp, Y + i * n + c, n, n - c);
  }
  if (i < rows) {
    if (PF) pf_rows(PF + i * pfk, pfk);
    for (int64_t c = 0; c < n; c += 8) dot16_tile<1, TAIL, FAR>(X + i * K, K, Wp + c * Kp, Kp, Y + i * n + c, n, n - c);
  }
}

template <typename S>
static void dot_block(const S* X, int64_t rows, int64_t K, const Wprep& W, float* Y,
                      const S* PF, int64_t pfk, bool far) {
  const int64_t n = W.n, Kp = W.Kp;
  const float* Wp = W.w.data();
  const bool tail = K % 16 != 0;
  if (tail && far) dot_rows16<true, true>(X, rows, K, Wp, n, Kp, Y, PF, pfk);
  else if (tail) dot_rows16<true, false>(X, rows, K, Wp, n, Kp, Y, PF, pfk);
  else if (far) dot_rows16<false, true>(X, rows, K, Wp, n, Kp, Y, PF, pfk);
  else dot_rows16<false, false>(X, rows, K, Wp, n, Kp, Y, PF, pfk);
}

template <int KB, int NV, bool TAIL, typename S>
static inline void red_tile(const float* V, int64_t b, const S* X, int64_t K, int64_t rows, float* Z,
                            __mmask16 m, const S*& pf, const S* pfe) {
  __m512 acc[KB][NV];
  for (int kb = 0; kb < KB; ++kb) for (int v = 0; v < NV; ++v) acc[kb][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i) {
    for (int p = 0; p < NV && pf < pfe; ++p) { _mm_prefetch((const char*)pf, _MM_HINT_T1); pf += 64 / sizeof(S); }
    __m512 x[NV];
    for (int v = 0; v < NV; ++v)
      x[v] = (TAIL && v == NV - 1) ? ld16(m, X + i * K + 16 * v) : ld16(X + i * K + 16 * v);
    for (int kb = 0; kb < KB; ++kb) {
      const __m512 s = _mm512_set1_ps(V[i * b + kb]);
      for (int v = 0; v < NV; ++v) acc[kb][v] = _mm512_fmadd_ps(s, x[v], acc[kb][v]);
    }
  }
  for (int kb = 0; kb < KB; ++kb)
    for (int v = 0; v < NV; ++v) {
      float* z = Z + kb * K + 16 * v;
      if (TAIL && v == NV - 1) _mm512_mask_storeu_ps(z, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, z), acc[kb][v]));
      else _mm512_storeu_ps(z, _mm512_add_ps(_mm512_loadu_ps(z), acc[kb][v]));
    }
}

template <int KB, typename S>
static void red_cols(const float* V, int64_t b, const S* X, int64_t K, int64_t rows, float* Z,
                     const S*& pf, const S* pfe) {
  int64_t j = 0;
  for (; j + 48 <= K; j += 48) red_tile<KB, 3, false, S>(V, b, X + j, K, rows, Z + j, 0xFFFF, pf, pfe);
  for (; j + 16 <= K; j += 16) red_tile<KB, 1, false, S>(V, b, X + j, K, rows, Z + j, 0xFFFF, pf, pfe);
  if (j < K) red_tile<KB, 1, true, S>(V, b, X + j, K, rows, Z + j, kmask(K - j), pf, pfe);
}

template <typename S>
static void reduce_block(const float* V, int64_t b, const S* X, int64_t K, int64_t rows, float* Z,
                         const S* pf, const S* pfe) {
  int64_t k = 0;
  for (; k + 8 <= b; k += 8) red_cols<8, S>(V + k, b, X, K, rows, Z + k * K, pf, pfe);
  for (; k + 4 <= b; k += 4) red_cols<4, S>(V + k, b, X, K, rows, Z + k * K, pf, pfe);
  for (; k < b; ++k) red_cols<1, S>(V + k, b, X, K, rows, Z + k * K, pf, pfe);
}
"""

# The kernels, on the blocks above (either instruction set). Per thread a contiguous range of
# rows, in blocks of FB rows (64 rows of r = 400 floats, 100 KB per operand, stay in L2); each
# thread keeps a partial result, added at the end, so a float32 sum carries rounding of order
# eps·(FB + M / FB) rather than eps·M.
_FUSED_DRIVERS = r"""
#include <cfloat>
#include <cmath>

static const int64_t FB = 64;

static inline int64_t next_rows(int64_t r0, int64_t rows, int64_t e) {  // rows of the block after
  const int64_t s = r0 + rows;
  return s >= e ? 0 : (s + FB < e ? FB : e - s);
}

// u (b, ro) += (J(B gᵀ) ⊙ c)ᵀ A; acos (M, b) receives arccos(-q) when not null. A and B stored
// as S (float32, bf16_t or f16_t), everything else float32.
template <typename S>
static void fused_fwd(const float* g, const S* A, const S* B, const float* c, int64_t M, int64_t b, int64_t r,
                      int64_t ro, float inv2pi, float* u, float* acos_out, int nthreads) {
  std::vector<float> part((size_t)nthreads * b * ro, 0.f);
  const Wprep gp(g, b, r);
  // The reduce over A (ro columns) prefetches the next block of B (r columns); when ro < r it
  // cannot issue enough prefetches, and the dot prefetches its own rows ahead instead.
  const bool far = ro < r;
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* P = part.data() + (size_t)t * b * ro;
    std::vector<float> w(FB * b), ac(FB * b);
    const int64_t per = (M + nt - 1) / nt;
    const int64_t a0 = t * per < M ? t * per : M, e = a0 + per < M ? a0 + per : M;
    for (int64_t r0 = a0; r0 < e; r0 += FB) {
      const int64_t rows = r0 + FB < e ? FB : e - r0;
      dot_block(B + r0 * r, rows, r, gp, w.data(), A + r0 * ro, ro, far);  // cosines (rows, b)
      j_chain(w.data(), acos_out ? acos_out + r0 * b : ac.data(), rows * b);
      for (int64_t i = 0; i < rows; ++i) {
        const float ci = c[r0 + i] * inv2pi;
        for (int64_t k = 0; k < b; ++k) w[i * b + k] *= ci;
      }
      const int64_t nx = next_rows(r0, rows, e);
      reduce_block(w.data(), b, A + r0 * ro, ro, rows, P, B + (r0 + rows) * r, B + (r0 + rows + nx) * r);
    }
  }
  for (int t = 0; t < nthreads; ++t)
    for (int64_t q = 0; q < b * ro; ++q) u[q] += part[(size_t)t * b * ro + q];
}

// gg (b, r) += ((A dᵀ) ⊙ arccos(-q) ⊙ c / 2π)ᵀ B: the gradient of ⟨d, u⟩ with respect to g.
// acos_in (M, b) from the forward, or null to recompute the cosines from the block of B, which
// the reduce then reads from cache.
template <typename S>
static void fused_bwd_g(const float* g, const float* d, const S* A, const S* B, const float* c,
                        const float* acos_in, int64_t M, int64_t b, int64_t r, int64_t ro, float inv2pi,
                        float* gg, int nthreads) {
  std::vector<float> part((size_t)nthreads * b * r, 0.f);
  const Wprep gp(g, b, r), dp(d, b, ro);
  const bool far = r < ro;  // as in the forward, with the roles of A and B exchanged
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* P = part.data() + (size_t)t * b * r;
    std::vector<float> gw(FB * b), q(FB * b), ac(FB * b);
    const int64_t per = (M + nt - 1) / nt;
    const int64_t a0 = t * per < M ? t * per : M, e = a0 + per < M ? a0 + per : M;
    for (int64_t r0 = a0; r0 < e; r0 += FB) {
      const int64_t rows = r0 + FB < e ? FB : e - r0;
      dot_block(A + r0 * ro, rows, ro, dp, gw.data(), B + r0 * r, r, far);  // ∂L/∂(J c) (rows, b)
      const float* acb;
      if (acos_in) {
        acb = acos_in + r0 * b;
      } else {
        dot_block(B + r0 * r, rows, r, gp, q.data(), (const S*)nullptr, 0, false);
        j_chain(q.data(), ac.data(), rows * b);
        acb = ac.data();
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float ci = c[r0 + i] * inv2pi;
        for (int64_t k = 0; k < b; ++k) gw[i * b + k] *= acb[i * b + k] * ci;  // ∂L/∂q
      }
      const int64_t nx = next_rows(r0, rows, e);
      // The reduce prefetches the next block of A for the next dot; with a narrow A (the readout,
      // ro < r) that is a few lines and the dot over it too short to hide the latency of the
      // block's B, so it prefetches its own next block of B instead.
      const S* pf = ro < r ? B + (r0 + rows) * r : A + (r0 + rows) * ro;
      const S* pfe = ro < r ? B + (r0 + rows + nx) * r : A + (r0 + rows + nx) * ro;
      reduce_block(gw.data(), b, B + r0 * r, r, rows, P, pf, pfe);
    }
  }
  for (int t = 0; t < nthreads; ++t)
    for (int64_t q = 0; q < b * r; ++q) gg[q] += part[(size_t)t * b * r + q];
}

// The whole π-layer in one call, as pinet.kernels.pi_layer composes it from torch ops: per row of
// g (b, r) the norm n = ‖g‖ (summed in double) and ḡ = g / max(n, FLT_MIN) (the composite's
// clamp_min(tiny)), u = (J(B ḡᵀ) ⊙ c)ᵀ A and out = n ⊙ u (u with layernorm). One call instead of
// about ten small torch ops, each of which runs cold after the product has streamed the state.
template <typename S>
static void fused_layer_fwd(const float* g, const S* A, const S* B, const float* c, int64_t M, int64_t b, int64_t r,
                            int64_t ro, float inv2pi, int layernorm, float* out, float* u, float* norm, float* gbar,
                            float* acos_out, int nthreads) {
  for (int64_t k = 0; k < b; ++k) {
    double ss = 0.0;
    for (int64_t j = 0; j < r; ++j) ss += (double)g[k * r + j] * g[k * r + j];
    // A norm below FLT_MIN counts as 0 (torch's float32 norm underflows there too): such a row
    // gets s = 0 and ḡ = g / FLT_MIN, as the composite's clamp_min(tiny) gives.
    const double nd = std::sqrt(ss);
    const float n = nd < FLT_MIN ? 0.f : (float)nd;
    const float den = n == 0.f ? FLT_MIN : n;
    norm[k] = n;
    for (int64_t j = 0; j < r; ++j) gbar[k * r + j] = g[k * r + j] / den;
  }
  for (int64_t q = 0; q < b * ro; ++q) u[q] = 0.f;
  if (M) fused_fwd<S>(gbar, A, B, c, M, b, r, ro, inv2pi, u, acos_out, nthreads);
  for (int64_t k = 0; k < b; ++k) {
    const float sk = layernorm ? 1.f : norm[k];
    for (int64_t j = 0; j < ro; ++j) out[k * ro + j] = sk * u[k * ro + j];
  }
}

// The vector-Jacobian product of fused_layer_fwd with respect to g: grad_out (b, ro) for out, and
// grad_s (b) / grad_gbar (b, r) for the returned s and ḡ (null: zero). With t = ∂L/∂ḡ (the
// product's backward at d = n ⊙ grad_out, plus grad_gbar) and σ = ⟨grad_out, u⟩ + grad_s (0 with
// layernorm, whose s is constant): ∂L/∂g = (t − ḡ ⟨ḡ, t⟩) / n + σ ḡ; for a zero row (n = 0, see
// fused_layer_fwd) the clamp passes no gradient to n and torch's norm backward gives 0 there, so
// ∂L/∂g = t / FLT_MIN. grad_g (b, r) is written.
template <typename S>
static void fused_layer_bwd(const float* gbar, const float* norm, const float* u,
                            const float* grad_out, const float* grad_s, const float* grad_gbar, const S* A,
                            const S* B, const float* c, const float* acos_in, int64_t M, int64_t b, int64_t r,
                            int64_t ro, float inv2pi, int layernorm, float* grad_g, int nthreads) {
  std::vector<float> gg_(b * r), d(b * ro);
  float* gg = gg_.data();
  for (int64_t q = 0; q < b * r; ++q) gg[q] = grad_gbar ? grad_gbar[q] : 0.f;
  if (grad_out && M) {
    for (int64_t k = 0; k < b; ++k) {
      const float sk = layernorm ? 1.f : norm[k];
      for (int64_t j = 0; j < ro; ++j) d[k * ro + j] = sk * grad_out[k * ro + j];
    }
    fused_bwd_g<S>(gbar, d.data(), A, B, c, acos_in, M, b, r, ro, inv2pi, gg, nthreads);
  }
  for (int64_t k = 0; k < b; ++k) {
    double sigma = 0.0;
    if (!layernorm) {
      if (grad_out)
        for (int64_t j = 0; j < ro; ++j) sigma += (double)grad_out[k * ro + j] * u[k * ro + j];
      if (grad_s) sigma += grad_s[k];
    }
    const float n = norm[k];
    const float* t = gg + k * r;
    const float* gb = gbar + k * r;
    float* o = grad_g + k * r;
    if (n > 0.f) {
      double dot = 0.0;
      for (int64_t j = 0; j < r; ++j) dot += (double)gb[j] * t[j];
      const float inv = 1.f / n, dt = (float)dot, sg = (float)sigma;
      for (int64_t j = 0; j < r; ++j) o[j] = (t[j] - gb[j] * dt) * inv + sg * gb[j];
    } else {
      for (int64_t j = 0; j < r; ++j) o[j] = t[j] / FLT_MIN;
    }
  }
}

// ‖Δ‖² of k π-rows (the optimizer's norm of a π-update): Σ_ij c_i c_j (A_i · A_j) J(B_i · B_j) for
// float32 A (k, ro), B (k, r) and c (k, null: ones), in double. One call instead of the ten
// small torch ops of pinet.functional.pi_rows_sqnorm (150 µs cold for k = 8, r = 400).
static inline double dot_f64(const float* x, const float* y, int64_t n) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums: vectorisable, no serial chain
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int l = 0; l < 8; ++l) s[l] += (double)x[t + l] * y[t + l];
  for (; t < n; ++t) s[0] += (double)x[t] * y[t];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

extern "C" double pinet_rows_sqnorm(const float* A, const float* B, const float* c, int64_t k, int64_t r,
                                    int64_t ro) {
  const double pi = 3.141592653589793;
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double q = dot_f64(B + i * r, B + j * r, r);
      q = q > 1.0 ? 1.0 : (q < -1.0 ? -1.0 : q);  // unit rows: rounding can leave |q| > 1
      const double J = (std::sqrt(1.0 - q * q) + (pi - std::acos(q)) * q) / (2.0 * pi);
      double w = dot_f64(A + i * ro, A + j * ro, ro) * J;
      if (c) w *= (double)c[i] * c[j];
      total += i == j ? w : 2.0 * w;
    }
  return total;
}

// The finite input layer's thin products (b ≤ 32 rows of data against a d × r weight), which MKL
// runs at 0.2-0.7 ms for a 3072 × 400 float32 weight where reading or writing it takes 0.08-0.15:
// out (b, r) = x W = Σ_i xᵀ_i ⊗ W_i, the π-product's reduce over the rows of W with per-thread
// partials (xT is x transposed, (d, b)), prefetching W's next block; and the weight gradient
// G (d, r) = xᵀ δ, row by row with 64 columns of G in registers over the b terms.
extern "C" void pinet_thin_xw(const float* xT, const float* W, int64_t b, int64_t d, int64_t r, float* out,
                              int nthreads) {
  std::vector<float> part((size_t)nthreads * b * r, 0.f);
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float* P = part.data() + (size_t)t * b * r;
    const int64_t per = (d + nt - 1) / nt;
    const int64_t a0 = t * per < d ? t * per : d, e = a0 + per < d ? a0 + per : d;
    for (int64_t r0 = a0; r0 < e; r0 += FB) {
      const int64_t rows = r0 + FB < e ? FB : e - r0;
      const int64_t nx = next_rows(r0, rows, e);
      reduce_block(xT + r0 * b, b, W + r0 * r, r, rows, P, W + (r0 + rows) * r, W + (r0 + rows + nx) * r);
    }
  }
  for (int64_t q = 0; q < b * r; ++q) {
    float s = 0.f;
    for (int t = 0; t < nthreads; ++t) s += part[(size_t)t * b * r + q];
    out[q] = s;
  }
}

// GCC vector extensions, one register wide: 16 floats in the AVX-512 build, 8 in the AVX2 one
// (a 64-byte type there compiles to code 20x slower).
#ifdef __AVX512F__
static const int PV = 16;
typedef float pinet_v __attribute__((vector_size(64)));
typedef float pinet_vu __attribute__((vector_size(64), aligned(4)));  // unaligned loads and stores
#else
static const int PV = 8;
typedef float pinet_v __attribute__((vector_size(32)));
typedef float pinet_vu __attribute__((vector_size(32), aligned(4)));
#endif

extern "C" void pinet_thin_outer(const float* xT, const float* g, int64_t b, int64_t d, int64_t r, float* out,
                                 int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < d; ++i) {
    const float* xi = xT + i * b;
    float* o = out + i * r;
    int64_t j0 = 0;
    for (; j0 + 64 <= r; j0 += 64) {  // 64 columns of the row in 64 / PV registers
      pinet_v acc[64 / PV] = {};
      for (int64_t k = 0; k < b; ++k) {
        const pinet_v x = pinet_v{} + xi[k];
        const float* gk = g + k * r + j0;
        for (int q = 0; q < 64 / PV; ++q) acc[q] += x * *(const pinet_vu*)(gk + q * PV);
      }
      for (int q = 0; q < 64 / PV; ++q) *(pinet_vu*)(o + j0 + q * PV) = acc[q];
    }
    for (; j0 + PV <= r; j0 += PV) {
      pinet_v acc = {};
      for (int64_t k = 0; k < b; ++k) acc += (pinet_v{} + xi[k]) * *(const pinet_vu*)(g + k * r + j0);
      *(pinet_vu*)(o + j0) = acc;
    }
    for (int64_t j = j0; j < r; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < b; ++k) acc += xi[k] * g[k * r + j];
      o[j] = acc;
    }
  }
}
"""

# C entry points per storage type: pinet_fused_fwd / pinet_fused_bwd_g for float32 rows, with
# suffix _bf16 / _f16 for 16-bit rows.
_ENTRY = r"""
extern "C" void pinet_fused_fwd{sfx}(const float* g, const void* A, const void* B, const float* c, int64_t M,
    int64_t b, int64_t r, int64_t ro, float inv2pi, float* u, float* acos_out, int nthreads) {{
  fused_fwd(g, (const {S}*)A, (const {S}*)B, c, M, b, r, ro, inv2pi, u, acos_out, nthreads);
}}
extern "C" void pinet_fused_bwd_g{sfx}(const float* g, const float* d, const void* A, const void* B, const float* c,
    const float* acos_in, int64_t M, int64_t b, int64_t r, int64_t ro, float inv2pi, float* gg, int nthreads) {{
  fused_bwd_g(g, d, (const {S}*)A, (const {S}*)B, c, acos_in, M, b, r, ro, inv2pi, gg, nthreads);
}}
extern "C" void pinet_fused_layer_fwd{sfx}(const float* g, const void* A, const void* B, const float* c, int64_t M,
    int64_t b, int64_t r, int64_t ro, float inv2pi, int layernorm, float* out, float* u, float* norm, float* gbar,
    float* acos_out, int nthreads) {{
  fused_layer_fwd(g, (const {S}*)A, (const {S}*)B, c, M, b, r, ro, inv2pi, layernorm, out, u, norm, gbar, acos_out,
                  nthreads);
}}
extern "C" void pinet_fused_layer_bwd{sfx}(const float* gbar, const float* norm, const float* u,
    const float* grad_out, const float* grad_s, const float* grad_gbar, const void* A, const void* B, const float* c,
    const float* acos_in, int64_t M, int64_t b, int64_t r, int64_t ro, float inv2pi, int layernorm, float* grad_g,
    int nthreads) {{
  fused_layer_bwd(gbar, norm, u, grad_out, grad_s, grad_gbar, (const {S}*)A, (const {S}*)B, c, acos_in, M, b, r,
                  ro, inv2pi, layernorm, grad_g, nthreads);
}}
"""
_STORAGE = {torch.float32: ("", "float"), torch.bfloat16: ("_bf16", "bf16_t"), torch.float16: ("_f16", "f16_t")}


def _entries(dtypes) -> str:
    return "".join(_ENTRY.format(sfx=_STORAGE[d][0], S=_STORAGE[d][1]) for d in dtypes)


# Sources per instruction set; the AVX-512 one needs AVX-512 F and VL at build and run time.
# The storage dtypes each build serves: both convert 16-bit rows with native instructions (half:
# F16C's vcvtph2ps, on every AVX2 CPU; bfloat16: a widening shift).
FUSED_STORAGE = {
    "avx2": (torch.float32, torch.bfloat16, torch.float16),
    "avx512": (torch.float32, torch.bfloat16, torch.float16),
}
_FUSED_SOURCES = {
    "avx2": PRELUDE + DOT + _J_CHAIN + _AVX2_BLOCKS + _FUSED_DRIVERS + _entries(FUSED_STORAGE["avx2"]),
    "avx512": PRELUDE + _J_CHAIN + _AVX512_BLOCKS + _FUSED_DRIVERS + _entries(FUSED_STORAGE["avx512"]),
}
_ISA_FLAGS = {"avx2": ["-mf16c"], "avx512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mf16c"]}

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


class NativeUnavailable(BackendUnavailable):
    """The native kernel cannot be used here; the message says why (CPU, compiler, build)."""


_lib: ctypes.CDLL | None = None


def _cache_dir() -> Path:
    return Path(os.environ.get("PINET_CACHE") or Path.home() / ".cache" / "pinet")


def _compile(source: str, name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile C++ ``source`` with ``g++ -O3 -mavx2 -mfma -fopenmp`` and ``extra_flags`` (once per
    compiler, source and flags; cached as ``$PINET_CACHE/<name>_<hash>.so``) and load it. Raises
    :class:`NativeUnavailable` saying what is missing: an x86-64 CPU with AVX2, a compiler, or a
    successful build."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeUnavailable(f"pinet.native needs an x86-64 CPU with AVX2; this is {platform.machine()}")
    cap = torch.backends.cpu.get_cpu_capability()
    if not (cap.startswith("AVX2") or cap.startswith("AVX512")):
        raise NativeUnavailable(f"pinet.native needs AVX2 and FMA; torch reports CPU capability {cap}")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise NativeUnavailable("pinet.native compiles its kernel with g++ (or $CXX); none found on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = [*_FLAGS, *extra_flags]
    key = hashlib.sha256("\n".join([source, cxx, version, *flags]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    target = cache / f"{name}_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a half-written file.
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
            src.write_text(source)
            done = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
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


FUSED_ISAS = ("avx512", "avx2")
_fused_libs: dict[str, ctypes.CDLL] = {}
_fused_isa: str | None = None  # the instruction set the fused kernels run with, once chosen


def _isa_reason(isa: str) -> str | None:
    """Why the fused kernels for ``isa`` cannot run on this CPU, or ``None`` if they can."""
    if isa not in FUSED_ISAS:
        return f"isa must be one of {FUSED_ISAS}, got {isa!r}"
    cap = torch.backends.cpu.get_cpu_capability()
    # torch reports "AVX512" only where AVX-512 F, BW, DQ and VL are all present.
    if isa == "avx512" and not cap.startswith("AVX512"):
        return f"the AVX-512 kernels need AVX-512 F and VL; torch reports CPU capability {cap}"
    # Half rows convert with F16C (on every AVX2 CPU made; checked where the kernel lists flags).
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " f16c" not in cpuinfo.read_text():
        return "the fused kernels need F16C (half-precision conversions); /proc/cpuinfo does not list it"
    return None


def _load_isa(isa: str) -> ctypes.CDLL:
    if isa not in _fused_libs:
        reason = _isa_reason(isa)
        if reason is not None:
            raise NativeUnavailable(f"pinet.kernels.native: {reason}")
        lib = _compile(_FUSED_SOURCES[isa], f"pinet_fused_{isa}", tuple(_ISA_FLAGS[isa]))
        P, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        for dtype in FUSED_STORAGE[isa]:
            sfx = _STORAGE[dtype][0]
            getattr(lib, "pinet_fused_fwd" + sfx).argtypes = [P, P, P, P, I, I, I, I, F, P, P, ctypes.c_int]
            getattr(lib, "pinet_fused_fwd" + sfx).restype = None
            getattr(lib, "pinet_fused_bwd_g" + sfx).argtypes = [P, P, P, P, P, P, I, I, I, I, F, P, ctypes.c_int]
            getattr(lib, "pinet_fused_bwd_g" + sfx).restype = None
            getattr(lib, "pinet_fused_layer_fwd" + sfx).argtypes = [
                P, P, P, P, I, I, I, I, F, ctypes.c_int, P, P, P, P, P, ctypes.c_int]
            getattr(lib, "pinet_fused_layer_fwd" + sfx).restype = None
            getattr(lib, "pinet_fused_layer_bwd" + sfx).argtypes = [
                P, P, P, P, P, P, P, P, P, P, I, I, I, I, F, ctypes.c_int, P, ctypes.c_int]
            getattr(lib, "pinet_fused_layer_bwd" + sfx).restype = None
        for fn in ("pinet_thin_xw", "pinet_thin_outer"):
            getattr(lib, fn).argtypes = [P, P, I, I, I, P, ctypes.c_int]
            getattr(lib, fn).restype = None
        lib.pinet_rows_sqnorm.argtypes = [P, P, P, I, I, I]
        lib.pinet_rows_sqnorm.restype = ctypes.c_double
        _fused_libs[isa] = lib
    return _fused_libs[isa]


def _default_isa() -> str:
    forced = os.environ.get("PINET_FUSED_ISA", "")
    if forced:
        if forced not in FUSED_ISAS:
            raise NativeUnavailable(f"pinet.kernels.native: PINET_FUSED_ISA must be one of {FUSED_ISAS}, got {forced!r}")
        return forced
    return "avx512" if _isa_reason("avx512") is None else "avx2"


def load_fused() -> ctypes.CDLL:
    """Build (cached on disk) and load the fused π-product kernels for :func:`fused_isa`, once per
    process; raises :class:`NativeUnavailable` if they cannot be built here."""
    global _fused_isa
    isa = _fused_isa or _default_isa()
    lib = _load_isa(isa)
    _fused_isa = isa
    return lib


def fused_isa() -> str:
    """The instruction set of the fused kernels in this process: ``"avx512"`` on CPUs with AVX-512
    F and VL (torch's CPU capability ``AVX512``), else ``"avx2"``; ``$PINET_FUSED_ISA`` or
    :func:`set_fused_isa` choose one. Builds the kernels if needed (:class:`NativeUnavailable`)."""
    load_fused()
    assert _fused_isa is not None
    return _fused_isa


def set_fused_isa(isa: str) -> None:
    """Run the fused kernels with ``isa`` (one of :data:`FUSED_ISAS`) from now on. Raises
    :class:`NativeUnavailable` (and changes nothing) if that instruction set cannot run or be
    built here."""
    global _fused_isa
    _load_isa(isa)
    _fused_isa = isa


_INV_TWO_PI = 1.0 / (2.0 * 3.141592653589793)


def fused_storage() -> tuple[torch.dtype, ...]:
    """The storage dtypes of ``A`` and ``B`` the fused kernels of :func:`fused_isa` serve:
    float32, bfloat16 and float16 in both builds."""
    return FUSED_STORAGE[fused_isa()]


def _fused_args(where: str, gbar: Tensor, A: Tensor, B: Tensor, c: Tensor) -> tuple[int, int, int, int, str]:
    _check(where, "gbar", gbar)
    storage = FUSED_STORAGE[_fused_isa]  # the callers loaded the kernels (load_fused) first
    for name, t in (("A", A), ("B", B)):
        if t.dtype not in storage or t.device.type != "cpu" or t.dim() != 2 or not t.is_contiguous():
            raise ValueError(
                f"{where}: {name} must be a contiguous 2-d CPU tensor stored as one of {storage} (the "
                f"{_fused_isa} kernels), got {t.dtype} on {t.device} with shape {tuple(t.shape)}, "
                f"contiguous={t.is_contiguous()}"
            )
    if A.dtype != B.dtype:
        raise ValueError(f"{where}: A and B must have one storage dtype, got {A.dtype} and {B.dtype}")
    if c.dtype != torch.float32 or c.device.type != "cpu" or c.dim() != 1 or not c.is_contiguous():
        raise ValueError(f"{where}: c must be a contiguous 1-d float32 CPU tensor, got {c.dtype} {tuple(c.shape)}")
    b, r = gbar.shape
    M, ro = A.shape
    if tuple(B.shape) != (M, r) or c.shape[0] != M:
        raise ValueError(f"{where}: B must be ({M}, {r}) and c ({M},), got {tuple(B.shape)} and {tuple(c.shape)}")
    return M, b, r, ro, _STORAGE[A.dtype][0]


def fused_forward(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, keep: bool) -> tuple[Tensor, Tensor | None]:
    """``u = (J(ḡ Bᵀ) ⊙ c) A`` (b, r_out) float32 by the fused kernel, and ``arccos(-q)`` (M, b) if
    ``keep``. Contiguous CPU tensors: ḡ (b, r) and c (M,) float32, A (M, r_out) and B (M, r)
    stored in one of :func:`fused_storage` (16-bit rows are converted to float32 as they load)."""
    lib = load_fused()
    M, b, r, ro, sfx = _fused_args("pinet.kernels.native.fused_forward", gbar, A, B, c)
    u = torch.zeros(b, ro)
    acos = torch.empty(M, b) if keep else None
    if M and b:
        getattr(lib, "pinet_fused_fwd" + sfx)(
            gbar.data_ptr(), A.data_ptr(), B.data_ptr(), c.data_ptr(), M, b, r, ro, _INV_TWO_PI,
            u.data_ptr(), None if acos is None else acos.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return u, acos


def fused_backward_g(gbar: Tensor, A: Tensor, B: Tensor, c: Tensor, acos: Tensor | None, grad_u: Tensor) -> Tensor:
    """``∂⟨grad_u, u⟩/∂ḡ`` (b, r) float32 by the fused kernel; ``acos`` (M, b) from
    :func:`fused_forward` or ``None`` (the cosines are recomputed per block). Tensors as in
    :func:`fused_forward`, ``grad_u`` (b, r_out) float32."""
    lib = load_fused()
    M, b, r, ro, sfx = _fused_args("pinet.kernels.native.fused_backward_g", gbar, A, B, c)
    _check("pinet.kernels.native.fused_backward_g", "grad_u", grad_u)
    if acos is not None:
        _check("pinet.kernels.native.fused_backward_g", "acos", acos)
    gg = torch.zeros(b, r)
    if M and b:
        getattr(lib, "pinet_fused_bwd_g" + sfx)(
            gbar.data_ptr(), grad_u.data_ptr(), A.data_ptr(), B.data_ptr(), c.data_ptr(),
            None if acos is None else acos.data_ptr(), M, b, r, ro, _INV_TWO_PI, gg.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return gg


def fused_layer_forward(
    g: Tensor, A: Tensor, B: Tensor, c: Tensor, layernorm: bool, keep: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The whole π-layer by one fused call: ``(out, u, n, ḡ, acos)`` with n = ‖g‖ (b, 1),
    ḡ = g / max(n, tiny) (b, r), u = (J(ḡ Bᵀ) ⊙ c) A (b, r_out), out = n ⊙ u (u with
    ``layernorm``) and ``arccos(-q)`` (M, b) if ``keep``. Tensors as in :func:`fused_forward`,
    ``g`` (b, r) in place of ḡ."""
    load_fused()
    _fused_args("pinet.kernels.native.fused_layer_forward", g, A, B, c)
    return layer_forward_unchecked(g, A, B, c, layernorm, keep)


def layer_forward_unchecked(g, A, B, c, layernorm: bool, keep: bool):
    """:func:`fused_layer_forward` without its argument checks, for a caller that has made them
    (:class:`pinet.kernels.fused.FusedPiLayer`, behind ``pi_layer``'s checks) and loaded the
    kernels: the checks run cold after a kernel has streamed the state, about 50 µs a call."""
    (b, r), (M, ro) = g.shape, A.shape
    out, u, n, gbar = torch.empty(b, ro), torch.empty(b, ro), torch.empty(b, 1), torch.empty(b, r)
    acos = torch.empty(M, b) if keep else None
    if b:
        getattr(_fused_libs[_fused_isa], "pinet_fused_layer_fwd" + _STORAGE[A.dtype][0])(
            g.data_ptr(), A.data_ptr(), B.data_ptr(), c.data_ptr(), M, b, r, ro, _INV_TWO_PI, int(layernorm),
            out.data_ptr(), u.data_ptr(), n.data_ptr(), gbar.data_ptr(),
            None if acos is None else acos.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return out, u, n, gbar, acos


def fused_layer_backward(
    gbar: Tensor, n: Tensor, u: Tensor, grad_out: Tensor | None, grad_s: Tensor | None,
    grad_gbar: Tensor | None, A: Tensor, B: Tensor, c: Tensor, acos: Tensor | None, layernorm: bool,
) -> Tensor:  # fmt: skip
    """``∂L/∂g`` (b, r) of :func:`fused_layer_forward`'s ``(out, s, ḡ)`` given their gradients
    ``grad_out`` (b, r_out), ``grad_s`` (b, 1) and ``grad_gbar`` (b, r), each contiguous float32
    or ``None`` (zero); ``acos`` from the forward or ``None`` (the cosines are recomputed)."""
    load_fused()
    where = "pinet.kernels.native.fused_layer_backward"
    M, b, r, ro, _ = _fused_args(where, gbar, A, B, c)
    shapes = {"n": (b, 1), "u": (b, ro), "grad_out": (b, ro), "grad_s": (b, 1), "grad_gbar": (b, r), "acos": (M, b)}
    given = {"n": n, "u": u, "grad_out": grad_out, "grad_s": grad_s, "grad_gbar": grad_gbar, "acos": acos}
    for name, t in given.items():
        if t is not None:
            _check(where, name, t)
            if tuple(t.shape) != shapes[name]:
                raise ValueError(f"{where}: {name} must have shape {shapes[name]}, got {tuple(t.shape)}")
    return layer_backward_unchecked(gbar, n, u, grad_out, grad_s, grad_gbar, A, B, c, acos, layernorm)


def layer_backward_unchecked(gbar, n, u, grad_out, grad_s, grad_gbar, A, B, c, acos, layernorm: bool) -> Tensor:
    """:func:`fused_layer_backward` without its argument checks (see :func:`layer_forward_unchecked`)."""
    (b, r), (M, ro) = gbar.shape, A.shape
    grad_g = torch.empty(b, r)
    if b:
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        getattr(_fused_libs[_fused_isa], "pinet_fused_layer_bwd" + _STORAGE[A.dtype][0])(
            gbar.data_ptr(), n.data_ptr(), u.data_ptr(), ptr(grad_out), ptr(grad_s), ptr(grad_gbar),
            A.data_ptr(), B.data_ptr(), c.data_ptr(), ptr(acos), M, b, r, ro, _INV_TWO_PI, int(layernorm),
            grad_g.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return grad_g


def rows_sqnorm(A: Tensor, B: Tensor, coef: Tensor | None) -> Tensor:
    """``Σ_ij coef_i coef_j (A_i · A_j) J(B_i · B_j)`` (:func:`pinet.functional.pi_rows_sqnorm`) by
    the fused library, summed in double: contiguous 2-d float32 CPU ``A`` (k, r_out) and ``B``
    (k, r), ``coef`` (k,) float32 or ``None``; returns a float32 0-dim tensor."""
    load_fused()
    where = "pinet.kernels.native.rows_sqnorm"
    _check(where, "A", A)
    _check(where, "B", B)
    k = A.shape[0]
    if B.shape[0] != k or (coef is not None and (coef.dtype != torch.float32 or coef.device.type != "cpu"
                                                 or tuple(coef.shape) != (k,) or not coef.is_contiguous())):
        raise ValueError(f"{where}: expected A (k, r_out), B (k, r) and coef (k,) float32 CPU with one k, got "
                         f"{tuple(A.shape)}, {tuple(B.shape)}, {None if coef is None else tuple(coef.shape)}")
    return rows_sqnorm_unchecked(A, B, coef)


def rows_sqnorm_unchecked(A: Tensor, B: Tensor, coef: Tensor | None) -> Tensor:
    """:func:`rows_sqnorm` without its argument checks, for :func:`pinet.kernels.rows_sqnorm`,
    which has made them (they run cold in the optimizer's step, about half of the call's time)."""
    val = _fused_libs[_fused_isa].pinet_rows_sqnorm(
        A.data_ptr(), B.data_ptr(), None if coef is None else coef.data_ptr(), A.shape[0], B.shape[1], A.shape[1]
    )
    return torch.tensor(val, dtype=torch.float32)


def _thin_args(where: str, xT: Tensor, Y: Tensor, y_name: str, xT_axis: int) -> None:
    # xT (d, b) against W (d, r) (xT_axis 0) or g (b, r) (xT_axis 1): one shared size.
    load_fused()
    _check(where, "xT", xT)
    _check(where, y_name, Y)
    if xT.shape[xT_axis] != Y.shape[0]:
        dim, shape = ("d", "(d, r)") if xT_axis == 0 else ("b", "(b, r)")
        raise ValueError(f"{where}: xT (d, b) and {y_name} {shape} must have one {dim}, got {tuple(xT.shape)} "
                         f"and {tuple(Y.shape)}")  # fmt: skip


def _thin_run(entry: str, xT: Tensor, Y: Tensor, rows: int) -> Tensor:
    out = torch.empty(rows, Y.shape[1])
    (d, b), r = xT.shape, Y.shape[1]
    getattr(_fused_libs[_fused_isa], entry)(xT.data_ptr(), Y.data_ptr(), b, d, r, out.data_ptr(), torch.get_num_threads())
    return out


def thin_xw(xT: Tensor, W: Tensor) -> Tensor:
    """``x W`` (b, r) from ``xT = xᵀ`` (d, b) and ``W`` (d, r), contiguous float32 CPU, by the
    fused library's row reduce (the finite input layer's forward; b small)."""
    _thin_args("pinet.kernels.native.thin_xw", xT, W, "W", 0)
    return thin_xw_unchecked(xT, W)


def thin_xw_unchecked(xT: Tensor, W: Tensor) -> Tensor:
    """:func:`thin_xw` without its checks, for :func:`pinet.kernels.thin_matmul`, which makes them."""
    return _thin_run("pinet_thin_xw", xT, W, xT.shape[1])


def thin_outer(xT: Tensor, g: Tensor) -> Tensor:
    """``xᵀ g`` (d, r) from ``xT = xᵀ`` (d, b) and ``g`` (b, r), contiguous float32 CPU: the finite
    input layer's weight gradient, written once, row by row."""
    _thin_args("pinet.kernels.native.thin_outer", xT, g, "g", 1)
    return thin_outer_unchecked(xT, g)


def thin_outer_unchecked(xT: Tensor, g: Tensor) -> Tensor:
    """:func:`thin_outer` without its checks (see :func:`thin_xw_unchecked`)."""
    return _thin_run("pinet_thin_outer", xT, g, xT.shape[0])
