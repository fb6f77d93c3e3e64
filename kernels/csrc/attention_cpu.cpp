// CPU kernels of dit4dit::attention_fwd / attention_bwd (FlashAttention-2 on a CPU).
//
// Computes softmax attention without a mask,
//     O = softmax(Q K^T * s) V,   s = 1 / sqrt(hd),
// and its gradients, never materialising the Lq x Lk score matrix: memory beyond
// the inputs and outputs is O(Br * Bc) per thread plus O(Lq) per head (the saved
// logsumexp and the backward's D), i.e. linear in the sequence lengths.
//
// Shapes: q, o, grad_o, grad_q (B, nh, Lq, hd); k, v, grad_k, grad_v (B, nh, Lk, hd);
// lse (B, nh, Lq) = natural-log logsumexp over keys of the scaled scores.
// Dtypes: float32, float64, bfloat16 and float16 (q, k, v share one dtype); lse is
// float32, float64 for float64 inputs. bfloat16 / float16 inputs are widened to float32
// at the entry points, run through the float32 kernels and the outputs rounded once to
// the input dtype: the arithmetic is float32 throughout (as on the GPU), at the cost of
// a conversion pass and float32 copies of the inputs.
// Limits: CPU, contiguous inputs (the Python wrapper makes them contiguous),
// Lk >= 1, hd >= 1; any Lq, Lk, hd (partial tiles are handled), Lq != Lk allowed.
//
// Notation (FlashAttention-2, Dao 2023): Q is cut into row tiles Q_i of Br rows,
// K and V into tiles K_j, V_j of Bc rows. S_ij = s * Q_i K_j^T is a Br x Bc tile,
// m_i the running row maximum, l_i the running row sum of exp(S - m_i), O_i the
// unnormalised output accumulator, L_i = m_i + log(l_i) the logsumexp.
// The tile products are BLAS GEMMs on raw pointers (cpu_common.h); the softmax
// work between them (max, exp, sums, rescaling) runs in vectorised loops that are
// compiled for AVX2+FMA and for the baseline ISA and picked at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "ops.h"

namespace dit4dit {
namespace cpu {
namespace {

// Tile sizes, sized for a 1 MiB L2 per core and tuned on one (hd = 64, L = 1024,
// float32: forward 256 x 512, backward 128 x 256; the speed was flat within a few
// percent between neighbouring sizes).
// Forward: the Br x Bc score tile S_ij (512 KiB) plus K_j and V_j (Bc x hd,
// 128 KiB each at hd = 64); Bc shrinks for larger head dims so K_j, V_j stay at
// 128 KiB, and Br shrinks when there are too few (head, Q tile) items to keep
// every thread busy (about 4 items per thread).
// Backward: S_ij and dP_ij tiles (Br x Bc, 128 KiB each) next to the head's
// Q, dO, dQ rows.
inline int64_t fwd_block_cols(int64_t Lk, int64_t hd) {
  return std::min(Lk, std::max<int64_t>(64, std::min<int64_t>(512, 32768 / hd)));
}
inline int64_t fwd_block_rows(int64_t BH, int64_t Lq) {
  int64_t Br = 256;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  while (Br > 32 && BH * ((Lq + Br - 1) / Br) < want) Br /= 2;
  return std::min(Br, std::max<int64_t>(Lq, 1));
}
inline int64_t bwd_block_cols(int64_t Lk, int64_t hd) {
  return std::min(Lk, std::max<int64_t>(32, std::min<int64_t>(256, 16384 / hd)));
}
inline int64_t bwd_block_rows(int64_t Lq) { return std::min<int64_t>(128, std::max<int64_t>(Lq, 1)); }

// ---------------------------------------------------------------------------------
// Elementwise row helpers. The float32 versions work on the 8-lane vector type v8f
// of cpu_common.h inside DIT4DIT_MULTIVERSION functions, so the softmax loops are
// vectorised explicitly instead of relying on the auto-vectoriser.
// exp(x) in float32, Cephes-style: x = n ln2 + r with |r| <= ln2/2, exp(r) by a
// degree-6 polynomial, 2^n built in the exponent bits. Relative error ~2 ulp.
// Inputs are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stays a normal float).
static inline v8f exp8(v8f x) {
  const v8f lo = splat(-87.0f), hi = splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v8f shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f t = x * 1.44269504088896341f + shifter;
  const v8f n = t - shifter;
  v8f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v8f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v8i bits = ((v8i)t - 0x4B400000 + 127) << 23;  // (n + bias) in the exponent field
  return p * (v8f)bits;
}
static inline float exp1(float x) {
  v8f v = splat(x);
  return exp8(v)[0];
}

DIT4DIT_MULTIVERSION
float row_max_f32(const float* a, int64_t n) {
  v8f m8 = splat(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f x = load8(a + i);
    m8 = x > m8 ? x : m8;
  }
  float m = m8[0];
  for (int l = 1; l < 8; ++l) m = m8[l] > m ? m8[l] : m;
  for (; i < n; ++i) m = a[i] > m ? a[i] : m;
  return m;
}

// a = exp(a - shift) elementwise; returns the sum of the new values.
DIT4DIT_MULTIVERSION
float exp_shift_sum_f32(float* a, int64_t n, float shift) {
  const v8f sh = splat(shift);
  v8f s8 = splat(0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f e = exp8(load8(a + i) - sh);
    store8(a + i, e);
    s8 += e;
  }
  float s = hsum8(s8);
  for (; i < n; ++i) {
    a[i] = exp1(a[i] - shift);
    s += a[i];
  }
  return s;
}

// a = exp(a - shift) elementwise.
DIT4DIT_MULTIVERSION
void exp_shift_f32(float* a, int64_t n, float shift) {
  const v8f sh = splat(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(a + i, exp8(load8(a + i) - sh));
  for (; i < n; ++i) a[i] = exp1(a[i] - shift);
}

// dp = p * (dp - d) elementwise (dS = P o (dP - D)).
DIT4DIT_MULTIVERSION
void softmax_grad_f32(float* dp, const float* p, int64_t n, float d) {
  const v8f d8 = splat(d);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dp + i, load8(p + i) * (load8(dp + i) - d8));
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - d);
}

DIT4DIT_MULTIVERSION
float dot_f32(const float* a, const float* b, int64_t n) {
  v8f s8 = splat(0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s8 += load8(a + i) * load8(b + i);
  float s = hsum8(s8);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

DIT4DIT_MULTIVERSION
void scale_f32(float* a, int64_t n, float alpha) {
  const v8f a8 = splat(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(a + i, load8(a + i) * a8);
  for (; i < n; ++i) a[i] *= alpha;
}

// Generic (float64) versions, and dispatch on the element type.
template <typename T>
T row_max(const T* a, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = a[i] > m ? a[i] : m;
  return m;
}
template <typename T>
T exp_shift_sum(T* a, int64_t n, T shift) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) {
    a[i] = std::exp(a[i] - shift);
    s += a[i];
  }
  return s;
}
template <typename T>
void exp_shift(T* a, int64_t n, T shift) {
  for (int64_t i = 0; i < n; ++i) a[i] = std::exp(a[i] - shift);
}
template <typename T>
void softmax_grad(T* dp, const T* p, int64_t n, T d) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d);
}
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
template <typename T>
void scale_row(T* a, int64_t n, T alpha) {
  for (int64_t i = 0; i < n; ++i) a[i] *= alpha;
}
template <>
float row_max<float>(const float* a, int64_t n) { return row_max_f32(a, n); }
template <>
float exp_shift_sum<float>(float* a, int64_t n, float shift) { return exp_shift_sum_f32(a, n, shift); }
template <>
void exp_shift<float>(float* a, int64_t n, float shift) { exp_shift_f32(a, n, shift); }
template <>
void softmax_grad<float>(float* dp, const float* p, int64_t n, float d) { softmax_grad_f32(dp, p, n, d); }
template <>
float dot<float>(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
template <>
void scale_row<float>(float* a, int64_t n, float alpha) { scale_f32(a, n, alpha); }

// ---------------------------------------------------------------------------------
// checks
bool is_reduced(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf; }

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_tensor(op, "q", q);
  check_cpu_tensor(op, "k", k);
  check_cpu_tensor(op, "v", v);
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": the CPU kernel supports float32, float64, bfloat16 and float16 inputs, got q of dtype ", dt);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (B, nh, Lq, hd), got ", shape_str(q));
  TORCH_CHECK(k.dim() == 4, op, ": k must have shape (B, nh, Lk, hd), got ", shape_str(k));
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v ", shape_str(v), " must have the shape of k ", shape_str(k));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op, ": k ",
              shape_str(k), " must match q ", shape_str(q), " in batch, heads and head dim (B, nh, *, hd)");
  TORCH_CHECK(q.size(3) >= 1, op, ": head dim hd must be >= 1, got q ", shape_str(q));
  TORCH_CHECK(k.size(2) >= 1, op, ": k and v need at least one key (Lk >= 1), got k ", shape_str(k));
}

// ---------------------------------------------------------------------------------
// forward
template <typename T>
void attention_fwd_impl(const T* q, const T* k, const T* v, T* o, T* lse, int64_t BH, int64_t Lq, int64_t Lk,
                        int64_t hd) {
  const T s = T(1) / std::sqrt(static_cast<T>(hd));
  const int64_t Br = fwd_block_rows(BH, Lq), Bc = fwd_block_cols(Lk, hd);
  const int64_t nq = (Lq + Br - 1) / Br;
  // One work item = one (head, Q tile) pair; items are independent.
  at::parallel_for(0, BH * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(static_cast<size_t>(Br * Bc));  // S_ij, then P~_ij in place
    std::vector<T> m(Br), l(Br);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nq, i0 = (item % nq) * Br, br = std::min(Br, Lq - i0);
      const T* Qi = q + (bh * Lq + i0) * hd;
      const T* K = k + bh * Lk * hd;
      const T* V = v + bh * Lk * hd;
      T* Oi = o + (bh * Lq + i0) * hd;  // the output rows hold the accumulator O_i
      // m_i = -inf, l_i = 0, O_i = 0.
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t j0 = 0; j0 < Lk; j0 += Bc) {
        const int64_t bc = std::min(Bc, Lk - j0);
        const bool first = j0 == 0;
        // S_ij = s * Q_i K_j^T  (br x bc, row stride Bc).
        gemm_rm<T>(false, true, br, bc, hd, s, Qi, hd, K + j0 * hd, hd, T(0), S.data(), Bc);
        for (int64_t r = 0; r < br; ++r) {
          T* Sr = S.data() + r * Bc;
          // m_new = max(m_i, rowmax(S_ij)); P~_ij = exp(S_ij - m_new);
          // l_i = exp(m_i - m_new) l_i + rowsum(P~_ij); O_i *= exp(m_i - m_new).
          const T m_new = std::max(m[r], row_max<T>(Sr, bc));
          const T rowsum = exp_shift_sum<T>(Sr, bc, m_new);
          const T alpha = std::exp(m[r] - m_new);
          l[r] = alpha * l[r] + rowsum;
          if (!first && alpha != T(1)) scale_row<T>(Oi + r * hd, hd, alpha);
          m[r] = m_new;
        }
        // O_i += P~_ij V_j (beta = 0 on the first tile initialises O_i).
        gemm_rm<T>(false, false, br, hd, bc, T(1), S.data(), Bc, V + j0 * hd, hd, first ? T(0) : T(1), Oi, hd);
      }
      // O_i = O_i / l_i; L_i = m_i + log(l_i).
      for (int64_t r = 0; r < br; ++r) {
        scale_row<T>(Oi + r * hd, hd, T(1) / l[r]);
        lse[bh * Lq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

}  // namespace

// Entry points (declared in ops.h, registered in ops.cpp).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* op = "dit4dit::attention_fwd";
  check_qkv(op, q, k, v);
  if (is_reduced(q)) {  // float32 arithmetic, outputs rounded once
    auto [o, lse] = attention_fwd(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat));
    return {o.to(q.scalar_type()), lse};
  }
  const int64_t B = q.size(0), nh = q.size(1), Lq = q.size(2), hd = q.size(3), Lk = k.size(2);
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({B, nh, Lq}, q.options().dtype(stats_dtype(q.scalar_type())));
  if (B * nh * Lq == 0) return {o, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_fwd_cpu", [&] {
    attention_fwd_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                 o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B * nh, Lq, Lk, hd);
  });
  return {o, lse};
}

namespace {

// ---------------------------------------------------------------------------------
// backward
//
// For one key/value tile j of one head, loop over all query tiles i:
//     S_ij  = s Q_i K_j^T
//     P_ij  = exp(S_ij - L_i)                 (recomputed from the saved logsumexp)
//     dV_j += P_ij^T dO_i
//     dP_ij = dO_i V_j^T
//     dS_ij = P_ij o (dP_ij - D_i),           D_i = rowsum(dO_i o O_i)
//     dQ_i += s dS_ij K_j
//     dK_j += s dS_ij^T Q_i
// dK_j and dV_j belong to this (head, j) item alone; dQ_i is accumulated into
// `dQ`, which the caller makes private to the thread (see attention_bwd_impl).
template <typename T>
void bwd_kv_tile(const T* Q, const T* K, const T* V, const T* dO, const T* Lse, const T* Dv, T* dQ, T* dK, T* dV,
                 int64_t Lq, int64_t hd, int64_t j0, int64_t bc, T s, T* S, T* dP, int64_t Br, int64_t Bc) {
  const T* Kj = K + j0 * hd;
  const T* Vj = V + j0 * hd;
  T* dKj = dK + j0 * hd;
  T* dVj = dV + j0 * hd;
  for (int64_t i0 = 0; i0 < Lq; i0 += Br) {
    const int64_t br = std::min(Br, Lq - i0);
    const bool first = i0 == 0;
    const T* Qi = Q + i0 * hd;
    const T* dOi = dO + i0 * hd;
    gemm_rm<T>(false, true, br, bc, hd, s, Qi, hd, Kj, hd, T(0), S, Bc);       // S_ij
    for (int64_t r = 0; r < br; ++r) exp_shift<T>(S + r * Bc, bc, Lse[i0 + r]);  // P_ij
    gemm_rm<T>(true, false, bc, hd, br, T(1), S, Bc, dOi, hd, first ? T(0) : T(1), dVj, hd);  // dV_j
    gemm_rm<T>(false, true, br, bc, hd, T(1), dOi, hd, Vj, hd, T(0), dP, Bc);    // dP_ij
    for (int64_t r = 0; r < br; ++r) softmax_grad<T>(dP + r * Bc, S + r * Bc, bc, Dv[i0 + r]);  // dS_ij
    gemm_rm<T>(false, false, br, hd, bc, s, dP, Bc, Kj, hd, T(1), dQ + i0 * hd, hd);             // dQ_i
    gemm_rm<T>(true, false, bc, hd, br, s, dP, Bc, Qi, hd, first ? T(0) : T(1), dKj, hd);        // dK_j
  }
}

template <typename T>
void attention_bwd_impl(const T* dO, const T* q, const T* k, const T* v, const T* o, const T* lse, T* dq, T* dk,
                        T* dv, int64_t BH, int64_t Lq, int64_t Lk, int64_t hd) {
  const T s = T(1) / std::sqrt(static_cast<T>(hd));
  const int64_t Br = bwd_block_rows(Lq), Bc = bwd_block_cols(Lk, hd);
  const int64_t nkv = (Lk + Bc - 1) / Bc;

  // D_i = rowsum(dO_i o O_i) for every query row of every head.
  std::vector<T> Dall(static_cast<size_t>(BH * Lq));
  at::parallel_for(0, BH * Lq, std::max<int64_t>(1, 16384 / hd), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) Dall[row] = dot<T>(dO + row * hd, o + row * hd, hd);
  });

  const int64_t nthreads = at::get_num_threads();
  if (BH >= nthreads) {
    // Enough heads: one head per work item, its KV tiles in sequence, so dQ of the
    // head is written by one thread only.
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> S(static_cast<size_t>(Br * Bc)), dP(static_cast<size_t>(Br * Bc));
      for (int64_t bh = begin; bh < end; ++bh) {
        T* dQh = dq + bh * Lq * hd;
        std::fill(dQh, dQh + Lq * hd, T(0));
        for (int64_t j = 0; j < nkv; ++j) {
          const int64_t j0 = j * Bc;
          bwd_kv_tile<T>(q + bh * Lq * hd, k + bh * Lk * hd, v + bh * Lk * hd, dO + bh * Lq * hd, lse + bh * Lq,
                         Dall.data() + bh * Lq, dQh, dk + bh * Lk * hd, dv + bh * Lk * hd, Lq, hd, j0,
                         std::min(Bc, Lk - j0), s, S.data(), dP.data(), Br, Bc);
        }
      }
    });
    return;
  }
  // Few heads (fewer than threads): work items are (head, KV tile) pairs; each
  // thread accumulates dQ into its own buffer, and the buffers are summed at the
  // end in thread order. Extra memory: nthreads x (BH x Lq x hd).
  std::vector<T> dq_part(static_cast<size_t>(nthreads * BH * Lq * hd), T(0));
  at::parallel_for(0, BH * nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(static_cast<size_t>(Br * Bc)), dP(static_cast<size_t>(Br * Bc));
    T* mine = dq_part.data() + at::get_thread_num() * BH * Lq * hd;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nkv, j0 = (item % nkv) * Bc;
      bwd_kv_tile<T>(q + bh * Lq * hd, k + bh * Lk * hd, v + bh * Lk * hd, dO + bh * Lq * hd, lse + bh * Lq,
                     Dall.data() + bh * Lq, mine + bh * Lq * hd, dk + bh * Lk * hd, dv + bh * Lk * hd, Lq, hd, j0,
                     std::min(Bc, Lk - j0), s, S.data(), dP.data(), Br, Bc);
    }
  });
  const int64_t total = BH * Lq * hd;
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T acc = 0;
      for (int64_t t = 0; t < nthreads; ++t) acc += dq_part[t * total + i];
      dq[i] = acc;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_o, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& o, const at::Tensor& lse) {
  const char* op = "dit4dit::attention_bwd";
  check_qkv(op, q, k, v);
  check_cpu_tensor(op, "grad_o", grad_o);
  check_cpu_tensor(op, "o", o);
  check_cpu_tensor(op, "lse", lse);
  check_same_dtype(op, "grad_o", grad_o, "q", q);
  check_same_dtype(op, "o", o, "q", q);
  TORCH_CHECK(grad_o.sizes() == q.sizes(), op, ": grad_o ", shape_str(grad_o), " must have the shape of q ",
              shape_str(q));
  TORCH_CHECK(o.sizes() == q.sizes(), op, ": o ", shape_str(o), " must have the shape of q ", shape_str(q));
  const int64_t B = q.size(0), nh = q.size(1), Lq = q.size(2), hd = q.size(3), Lk = k.size(2);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == nh && lse.size(2) == Lq, op, ": lse ",
              shape_str(lse), " must be (B, nh, Lq) = (", B, ", ", nh, ", ", Lq, ")");
  TORCH_CHECK(lse.scalar_type() == stats_dtype(q.scalar_type()), op, ": lse must be ", stats_dtype(q.scalar_type()),
              " for ", q.scalar_type(), " inputs (as returned by the forward), got ", lse.scalar_type());
  if (is_reduced(q)) {  // float32 arithmetic, gradients rounded once
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [dq, dk, dv] = attention_bwd(f(grad_o), f(q), f(k), f(v), f(o), lse);
    const auto dt = q.scalar_type();
    return {dq.to(dt), dk.to(dt), dv.to(dt)};
  }
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  if (B * nh == 0) return {dq, dk, dv};
  if (Lq == 0) {  // no query: no gradient flows to k and v
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd_cpu", [&] {
    attention_bwd_impl<scalar_t>(grad_o.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                 v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                 dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B * nh,
                                 Lq, Lk, hd);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace dit4dit
