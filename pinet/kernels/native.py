"""Optional native CPU kernel for the π-product's reduce products (opt-in, x86-64 with AVX2).

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

__all__ = ["NativeUnavailable", "reduce_into", "load"]

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

_SOURCE = PRELUDE + r"""
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
