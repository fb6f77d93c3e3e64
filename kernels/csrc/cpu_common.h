// Helpers shared by the CPU kernels of the dit4dit ops.
//
//  - gemm_rm: a row-major GEMM on raw pointers, C = alpha * op(A) op(B) + beta * C,
//    used for the tile products of the attention kernels. It calls the BLAS
//    `sgemm_` / `dgemm_` that libtorch_cpu carries (MKL or OpenBLAS) through weak
//    references, so a torch build that does not export them still loads this
//    extension; there the tile product falls back to ATen's addmm on views of the
//    same memory. Both paths are called from inside at::parallel_for regions, where
//    the BLAS runs single-threaded (the parallelism is over heads and tiles).
//  - DIT4DIT_MULTIVERSION: compiles a hot elementwise function twice (x86-64-v3 =
//    AVX2+FMA, and the baseline ISA) and picks one at load time, so the extension
//    stays portable while the row loops (softmax, LayerNorm) run vectorised;
//    DIT4DIT_MULTIVERSION_AVX512 adds an x86-64-v4 (AVX-512) clone.
//  - v8f: the 8-lane float32 vector type those functions compute on (GCC/Clang
//    vector extension: one AVX register in the x86-64-v3 clone, two SSE registers in
//    the baseline clone), with splat/load8/store8/hsum8, and its 16-lane twin v16f.
//    This, not at::vec, is the vectorisation of the float32 kernels: the extension
//    is compiled for the baseline ISA, where at::vec::Vectorized falls back to its
//    scalar loops.
//  - prefetch_bytes, for row loops that walk rows of memory one after another;
//  - check helpers that build the error messages of every op.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define DIT4DIT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#define DIT4DIT_MULTIVERSION_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __clang_major__ >= 14
#define DIT4DIT_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#define DIT4DIT_MULTIVERSION_AVX512 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DIT4DIT_MULTIVERSION
#define DIT4DIT_MULTIVERSION_AVX512
#endif

// Fortran BLAS entry points (LP64 integers, as ATen itself declares them). Weak:
// they resolve to libtorch_cpu's copies when exported and to nullptr otherwise.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace dit4dit {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f splat(float a) { return v8f{a, a, a, a, a, a, a, a}; }
static inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
static inline float hsum8(v8f v) {
  float s = 0;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// The 16-lane twin, for memory-bound row loops that are short of instruction
// throughput at 8 lanes (adaLN): one AVX-512 register in a DIT4DIT_MULTIVERSION_AVX512
// function's x86-64-v4 clone, two AVX registers in its x86-64-v3 clone.
typedef float v16f __attribute__((vector_size(64)));

static inline v16f splat16(float a) { return v16f{} + a; }
static inline v16f load16(const float* p) {
  v16f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
static inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
static inline float hsum16(v16f v) {
  float s = 0;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

// Asks for the `bytes` bytes at p, one prefetch per 64-byte line, so that the load of the
// next row from memory overlaps the arithmetic on the current one.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// Fallback: the same product through ATen on strided views of the raw buffers.
template <typename T>
inline void gemm_rm_aten(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
                         const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // op(A) is M x K; stored row-major as M x K (lda) or, transposed, as K x M (lda).
  at::Tensor a = trans_a ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                         : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, op = transpose
// when trans_* is set. A row-major matrix is the column-major matrix of its
// transpose, so this is the column-major product C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha,
                    const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // empty sum: C = beta * C
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ != nullptr) {
      dgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
      return;
    }
  }
  gemm_rm_aten<T>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}


// "x (B, N, D)" style shape text for error messages.
inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

inline void check_cpu_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got device ",
              t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", shape_str(t), ", strides ",
              t.strides(), "); the Python wrappers in kernels/ call .contiguous() first");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; all inputs must share one dtype");
}

// Statistics (mean, rstd, logsumexp) are kept in float32, float64 for float64 inputs.
inline at::ScalarType stats_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace cpu
}  // namespace dit4dit
