// Fused attention on the GPU, FlashAttention-2 algorithm, plain CUDA C++ (no tensor cores).
//
//   o = softmax(q k^T * scale) v,  scale = 1 / sqrt(hd),  no mask,  Lq != Lk allowed.
//
// Shapes (all contiguous, row-major; bh = b * nh + h indexes the (batch, head) pair):
//   q, o, grad_o, grad_q : (B*nh, Lq, hd) of T      T = float, __half or __nv_bfloat16
//   k, v, grad_k, grad_v : (B*nh, Lk, hd) of T
//   lse, delta           : (B*nh, Lq) float32       lse = natural-log logsumexp of the scaled scores
//   dq_accum             : (B*nh, Lq, hd) float32   zero-initialised accumulator of grad_q
// Limits: hd <= HD, the head-dim bucket the kernel is instantiated for (32, 64 or 128);
// tiles are zero-padded to HD, rows beyond Lq and keys beyond Lk are masked, so any
// Lq, Lk >= 1 works. All arithmetic is float32; tiles live in shared memory as float.
//
// Forward (attention_fwd_kernel): one block per (Q tile of BR rows, bh). The block walks
// over the K/V tiles of BC keys; per tile:
//   1. stage K_j in shared memory;
//   2. S = Q_i K_j^T * scale (BR x BC), keys beyond Lk get -inf;
//   3. online softmax, one thread per row: m_new = max(m, rowmax S), P = exp(S - m_new),
//      alpha = exp(m - m_new), l = alpha * l + rowsum P; meanwhile V_j replaces K_j;
//   4. O = alpha * O + P V_j (O in registers, BR*HD/NT elements per thread).
// At the end O /= l and lse = m + log l (FlashAttention-2 defers the 1/l to the end).
//
// Backward: attention_bwd_preprocess_kernel computes delta = rowsum(dO o O), one warp per
// row. attention_bwd_kernel: one block per (K/V tile of BC keys, bh); K_j, V_j stay in
// shared memory and dK_j, dV_j in registers while the block walks over the Q tiles:
//   P = exp(S - lse) (recomputed, never stored globally), dP = dO V_j^T,
//   dS = P o (dP - delta), dV_j += P^T dO, dK_j += dS^T Q * scale,
//   dQ_i += dS K_j * scale, added to the float32 dq_accum with atomicAdd (several K/V
//   blocks contribute to the same dQ rows). attention_cast_kernel then writes grad_q
//   in T (skipped for float, whose grad_q is the accumulator itself).
#pragma once

#include "common.cuh"

#include <utility>

namespace DIT4DIT_KERNEL_NS {

constexpr int kAttnThreads = 128;       // threads per block of the tile kernels
constexpr int kAttnRowWarps = 4;        // rows per block of the preprocess kernel
constexpr int kAttnMaxHeadDim = 128;

// A head-dim bucket: the head dim HD the kernels are instantiated for (hd <= HD is
// zero-padded to HD) and the tile sizes of the two tile kernels, BR query rows by BC keys,
// chosen so that the static shared memory stays below 48 KiB and each thread keeps at most
// 32 float accumulators.
template <int kHD, int kFwdBR, int kFwdBC, int kBwdBR, int kBwdBC>
struct AttnBucket {
  static constexpr int HD = kHD;
  static constexpr int FWD_BR = kFwdBR, FWD_BC = kFwdBC;  // attention_fwd_kernel
  static constexpr int BWD_BR = kBwdBR, BWD_BC = kBwdBC;  // attention_bwd_kernel
};
//                              HD  fwd BR, BC  bwd BR, BC
using AttnBucket32 = AttnBucket<32, 64, 64, 32, 32>;
using AttnBucket64 = AttnBucket<64, 64, 32, 32, 32>;
using AttnBucket128 = AttnBucket<128, 32, 32, 16, 16>;

// Calls f(bucket) for the smallest head-dim bucket with HD >= hd: the instantiation both
// the CUDA launchers and the CPU emulation tests run. The caller checks
// 1 <= hd <= kAttnMaxHeadDim first.
template <typename F>
inline void with_head_dim_bucket(long long hd, F&& f) {
  if (hd <= 32) {
    f(AttnBucket32{});
  } else if (hd <= 64) {
    f(AttnBucket64{});
  } else {
    f(AttnBucket128{});
  }
}

// Copy rows [row0, row0 + ROWS) of a (len, hd) matrix into a (ROWS, HD + 1) float tile,
// zero-filling rows beyond len and columns beyond hd. The +1 pad keeps the column reads
// of the products free of shared-memory bank conflicts.
template <typename T, int ROWS, int HD, int NT>
__device__ __forceinline__ void load_tile(float (*tile)[HD + 1], const T* __restrict__ src, int row0, int len,
                                          int hd) {
  for (int e = threadIdx.x; e < ROWS * HD; e += NT) {
    const int r = e / HD, d = e % HD;
    const int row = row0 + r;
    tile[r][d] = (row < len && d < hd) ? to_float(src[static_cast<long long>(row) * hd + d]) : 0.f;
  }
}

template <typename T, int HD, int BR, int BC, int NT>
__global__ void __launch_bounds__(NT)
    attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         T* __restrict__ o, float* __restrict__ lse, int Lq, int Lk, int hd, float scale) {
  static_assert((BR * HD) % NT == 0 && BR <= NT, "tile does not divide among the threads");
  constexpr int kOPerThread = BR * HD / NT;
  __shared__ float Qs[BR][HD + 1];
  __shared__ float KVs[BC][HD + 1];  // K_j, then V_j of the same keys
  __shared__ float Ss[BR][BC + 1];   // scores S, then probabilities P
  __shared__ float row_alpha[BR];    // exp(m_old - m_new) of the current tile
  __shared__ float row_l[BR];        // final softmax denominators

  const int tid = threadIdx.x;
  const int q0 = blockIdx.x * BR;
  const long long bh = blockIdx.y;
  const T* qh = q + bh * Lq * hd;
  const T* kh = k + bh * Lk * hd;
  const T* vh = v + bh * Lk * hd;

  load_tile<T, BR, HD, NT>(Qs, qh, q0, Lq, hd);
  float m = -INFINITY, l = 0.f;  // running max and sum of row `tid` (threads tid < BR)
  float acc[kOPerThread];        // unnormalised O: element (e / HD, e % HD), e = tid + i * NT
#pragma unroll
  for (int i = 0; i < kOPerThread; ++i) acc[i] = 0.f;

  for (int k0 = 0; k0 < Lk; k0 += BC) {
    // 1. Stage K_j.
    load_tile<T, BC, HD, NT>(KVs, kh, k0, Lk, hd);
#ifndef DIT4DIT_BREAK_FWD_KV_BARRIER
    __syncthreads();  // K_j (and, on the first tile, Q_i) visible to every thread
#endif
    // 2. S = Q_i K_j^T * scale, -inf for keys beyond Lk.
    for (int e = tid; e < BR * BC; e += NT) {
      const int r = e / BC, c = e % BC;
      float s = 0.f;
#pragma unroll 8
      for (int d = 0; d < HD; ++d) s += Qs[r][d] * KVs[c][d];
      Ss[r][c] = (k0 + c < Lk) ? s * scale : -INFINITY;
    }
    __syncthreads();  // S complete; K_j no longer read
    // 3. V_j replaces K_j, and the online softmax of row `tid`.
    load_tile<T, BC, HD, NT>(KVs, vh, k0, Lk, hd);
    if (tid < BR) {
      float m_new = m;
      for (int c = 0; c < BC; ++c) m_new = fmaxf(m_new, Ss[tid][c]);
      float rowsum = 0.f;
      for (int c = 0; c < BC; ++c) {
        const float p = expf(Ss[tid][c] - m_new);
        Ss[tid][c] = p;
        rowsum += p;
      }
      const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
      l = alpha * l + rowsum;
      m = m_new;
      row_alpha[tid] = alpha;
    }
    __syncthreads();  // P, alpha and V_j visible
    // 4. O = alpha * O + P V_j.
#pragma unroll
    for (int i = 0; i < kOPerThread; ++i) {
      const int e = tid + i * NT;
      const int r = e / HD, d = e % HD;
      float pv = 0.f;
      for (int c = 0; c < BC; ++c) pv += Ss[r][c] * KVs[c][d];
      acc[i] = row_alpha[r] * acc[i] + pv;
    }
    __syncthreads();  // the next tile may overwrite KVs, Ss and row_alpha
  }

  // O /= l, lse = m + log l.
  if (tid < BR) {
    row_l[tid] = l;
    if (q0 + tid < Lq) lse[bh * Lq + q0 + tid] = m + logf(l);
  }
  __syncthreads();  // row_l visible
  T* oh = o + bh * Lq * hd;
#pragma unroll
  for (int i = 0; i < kOPerThread; ++i) {
    const int e = tid + i * NT;
    const int r = e / HD, d = e % HD;
    if (q0 + r < Lq && d < hd) oh[static_cast<long long>(q0 + r) * hd + d] = from_float<T>(acc[i] / row_l[r]);
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d]; one warp per row of the (B*nh*Lq, hd) matrices.
template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    attention_bwd_preprocess_kernel(const T* __restrict__ grad_o, const T* __restrict__ o,
                                    float* __restrict__ delta, int rows, int hd) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // the whole warp leaves together
  const long long off = static_cast<long long>(row) * hd;
  float sum = 0.f;
  for (int d = lane; d < hd; d += kWarpSize) sum += to_float(grad_o[off + d]) * to_float(o[off + d]);
  sum = warp_allreduce_sum(sum);
  if (lane == 0) delta[row] = sum;
}

template <typename T, int HD, int BR, int BC, int NT>
__global__ void __launch_bounds__(NT)
    attention_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ grad_o, const float* __restrict__ lse,
                         const float* __restrict__ delta, float* __restrict__ dq_accum, T* __restrict__ grad_k,
                         T* __restrict__ grad_v, int Lq, int Lk, int hd, float scale) {
  static_assert((BC * HD) % NT == 0 && (BR * HD) % NT == 0, "tile does not divide among the threads");
  constexpr int kKVPerThread = BC * HD / NT;
  constexpr int kQPerThread = BR * HD / NT;
  __shared__ float Ks[BC][HD + 1];
  __shared__ float Vs[BC][HD + 1];
  __shared__ float Qs[BR][HD + 1];
  __shared__ float dOs[BR][HD + 1];
  __shared__ float Ps[BR][BC + 1];   // recomputed probabilities P
  __shared__ float dSs[BR][BC + 1];  // dS = P o (dP - delta)
  __shared__ float lse_s[BR];
  __shared__ float delta_s[BR];

  const int tid = threadIdx.x;
  const int k0 = blockIdx.x * BC;
  const long long bh = blockIdx.y;
  const T* qh = q + bh * Lq * hd;
  const T* doh = grad_o + bh * Lq * hd;
  float* dqh = dq_accum + bh * Lq * hd;

  load_tile<T, BC, HD, NT>(Ks, k + bh * Lk * hd, k0, Lk, hd);
  load_tile<T, BC, HD, NT>(Vs, v + bh * Lk * hd, k0, Lk, hd);
  float dk[kKVPerThread], dv[kKVPerThread];  // element (e / HD, e % HD) of the tile, e = tid + i * NT
#pragma unroll
  for (int i = 0; i < kKVPerThread; ++i) dk[i] = dv[i] = 0.f;

  for (int q0 = 0; q0 < Lq; q0 += BR) {
    // 1. Stage Q_i, dO_i, lse_i and delta_i.
    load_tile<T, BR, HD, NT>(Qs, qh, q0, Lq, hd);
    load_tile<T, BR, HD, NT>(dOs, doh, q0, Lq, hd);
    for (int r = tid; r < BR; r += NT) {
      const bool valid = q0 + r < Lq;
      lse_s[r] = valid ? lse[bh * Lq + q0 + r] : 0.f;
      delta_s[r] = valid ? delta[bh * Lq + q0 + r] : 0.f;
    }
    __syncthreads();  // tiles visible (and K_j, V_j on the first pass)
    // 2. P = exp(S - lse) and dS = P o (dP - delta), zero outside Lq x Lk.
    for (int e = tid; e < BR * BC; e += NT) {
      const int r = e / BC, c = e % BC;
      float s = 0.f, dp = 0.f;
#pragma unroll 8
      for (int d = 0; d < HD; ++d) {
        s += Qs[r][d] * Ks[c][d];
        dp += dOs[r][d] * Vs[c][d];
      }
      const bool valid = (q0 + r < Lq) && (k0 + c < Lk);
      const float p = valid ? expf(s * scale - lse_s[r]) : 0.f;
      Ps[r][c] = p;
      dSs[r][c] = p * (dp - delta_s[r]);
    }
    __syncthreads();  // P and dS visible
    // 3. dV_j += P^T dO_i, dK_j += dS^T Q_i (scaled at the end).
#pragma unroll
    for (int i = 0; i < kKVPerThread; ++i) {
      const int e = tid + i * NT;
      const int c = e / HD, d = e % HD;
      float sv = 0.f, sk = 0.f;
      for (int r = 0; r < BR; ++r) {
        sv += Ps[r][c] * dOs[r][d];
        sk += dSs[r][c] * Qs[r][d];
      }
      dv[i] += sv;
      dk[i] += sk;
    }
    // 4. dQ_i += dS K_j * scale into the float32 accumulator shared by all K/V blocks.
#pragma unroll
    for (int i = 0; i < kQPerThread; ++i) {
      const int e = tid + i * NT;
      const int r = e / HD, d = e % HD;
      if (q0 + r < Lq && d < hd) {
        float sq = 0.f;
        for (int c = 0; c < BC; ++c) sq += dSs[r][c] * Ks[c][d];
        atomicAdd(&dqh[static_cast<long long>(q0 + r) * hd + d], sq * scale);
      }
    }
    __syncthreads();  // the next Q tile may overwrite Qs, dOs, Ps, dSs
  }

  T* dkh = grad_k + bh * Lk * hd;
  T* dvh = grad_v + bh * Lk * hd;
#pragma unroll
  for (int i = 0; i < kKVPerThread; ++i) {
    const int e = tid + i * NT;
    const int c = e / HD, d = e % HD;
    if (k0 + c < Lk && d < hd) {
      dkh[static_cast<long long>(k0 + c) * hd + d] = from_float<T>(dk[i] * scale);
      dvh[static_cast<long long>(k0 + c) * hd + d] = from_float<T>(dv[i]);
    }
  }
}

// out[i] = T(in[i]): grad_q from its float32 accumulator.
template <typename T>
__global__ void attention_cast_kernel(const float* __restrict__ in, T* __restrict__ out, long long n) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_float<T>(in[i]);
}

}  // namespace DIT4DIT_KERNEL_NS
