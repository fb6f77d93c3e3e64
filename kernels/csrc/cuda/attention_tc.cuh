// Fused attention forward on tensor cores (sm_80+), FlashAttention-2 algorithm.
//
//   o = softmax(q k^T * scale) v,  scale = 1 / sqrt(hd),  no mask,  Lq != Lk allowed,
//   lse = logsumexp of the scaled scores (natural log), saved for the backward.
//
// Shapes (contiguous, row-major; bh = b * nh + h):
//   q, o : (B*nh, Lq, HD) of T      T = __half or __nv_bfloat16 (no float32: use attention.cuh)
//   k, v : (B*nh, Lk, HD) of T
//   lse  : (B*nh, Lq) float32
// Limits: hd == HD exactly, HD in {64, 128}; Lq, Lk >= 1 (partial Q tiles and partial K/V
// tiles are guarded: rows beyond Lq are zero-filled and never stored, keys beyond Lk are
// zero-filled and get score -inf); q, k, v, o 16-byte aligned (the launcher checks it).
// Products run on `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}` (fp32 accumulation);
// fragments come from shared memory with `ldmatrix` (.trans for V); tiles travel from
// global to shared memory with `cp.async.cg` in commit groups. The backward pass on tensor
// cores is attention_tc_bwd.cuh (built on the tc_* primitives below), which takes this
// kernel's o and lse.
//
// attention_fwd_tc_kernel: one block of 4 warps per (Q tile i of BR = 64 rows, bh); warp w
// owns rows 16w..16w+15 of the tile. Shared memory holds two stages of (K_j, V_j), BC keys
// each, rows padded by 8 elements so that ldmatrix rows fall in distinct banks; the Q tile
// is staged once in stage 1 and moved into registers (A fragments) before the loop.
//   for j = 0 .. Tc-1:
//     1. issue cp.async of K_{j+1}, V_{j+1} into the other stage (double buffering), commit;
//        wait for the group of tile j, __syncthreads;
//     2. S = Q_i K_j^T (16 x BC per warp, C fragments), keys beyond Lk get -inf;
//     3. online softmax per row: m_new = max(m, rowmax S), P = exp(scale * (S - m_new)),
//        alpha = exp(scale * (m - m_new)), l = alpha * l + rowsum P, O = alpha * O;
//        the C fragments of P, rounded to T, are the A fragments of the next product;
//     4. O += P V_j (V_j B fragments by ldmatrix.trans); __syncthreads before the stage
//        is overwritten.
//   O /= l, lse = scale * m + log l (FlashAttention-2 defers the 1/l to the end).
//
// Fragment layouts of m16n8k16 (PTX ISA; g = lane / 4, t = lane % 4; each 32-bit
// register holds two 16-bit elements, the lower-indexed one in the low half):
//   A (16x16, row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8, col):  b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C, D (16x8):    c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]   (float32)
// ldmatrix .x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; register m of lane
// l receives row l/4, elements 2(l%4), 2(l%4)+1 of matrix m (.trans: column l/4, rows
// 2(l%4), 2(l%4)+1).
//
// The PTX lives in the tc_* wrappers below; under the CPU emulation of the tests
// (tests/emu/cuda_emu.h) they call the harness's host implementations instead.
#pragma once

#include "common.cuh"

#include <cstdint>
#include <type_traits>

namespace DIT4DIT_KERNEL_NS {

constexpr int kTcThreads = 128;  // 4 warps
constexpr int kTcBR = 64;        // query rows per block: 16 per warp
constexpr int kTcPad = 8;        // elements of padding per shared-memory row (16 bytes)

// Keys per K/V tile: two stages of K and V stay below 48 KiB of static shared memory.
template <int HD>
struct TcTile {
  static_assert(HD == 64 || HD == 128, "the tensor-core attention supports head dims 64 and 128");
  static constexpr int BC = HD == 64 ? 64 : 32;
};

// ----- primitives: inline PTX on the device, the harness's emulation on the CPU ------------
template <typename T>
__device__ __forceinline__ uint32_t tc_bits(T x);

#if defined(DIT4DIT_CUDA_EMULATION)
template <>
inline uint32_t tc_bits<__half>(__half x) { return x.bits; }
template <>
inline uint32_t tc_bits<__nv_bfloat16>(__nv_bfloat16 x) { return x.bits; }

template <typename T>
inline void tc_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::emu::mma_m16n8k16<T>(d, a, b0, b1);
}
inline void tc_ldmatrix_x4(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix_x4(r, row, false); }
inline void tc_ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix_x4(r, row, true); }
inline void tc_cp_async_16(void* dst, const void* src, bool valid) { ::emu::cp_async_16(dst, src, valid); }
inline void tc_cp_async_commit() {}
template <int N>
inline void tc_cp_async_wait() {}  // the emulated copies complete when issued
#else
template <>
__device__ __forceinline__ uint32_t tc_bits<__half>(__half x) { return __half_as_ushort(x); }
template <>
__device__ __forceinline__ uint32_t tc_bits<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <typename T>
__device__ __forceinline__ void tc_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the launcher runs this kernel on sm_80+ only
#endif
}

__device__ __forceinline__ void tc_ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

__device__ __forceinline__ void tc_ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  __trap();
#endif
}

// 16 bytes global -> shared; valid == false writes 16 zero bytes (src-size 0, nothing read).
__device__ __forceinline__ void tc_cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(src_size) : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void tc_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void tc_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// Two T elements in one register, lo in the low half (the element order of the fragments).
template <typename T>
__device__ __forceinline__ uint32_t tc_pack(float lo, float hi) {
  return tc_bits<T>(from_float<T>(lo)) | (tc_bits<T>(from_float<T>(hi)) << 16);
}

// Issues the cp.async copies of rows [row0, row0 + ROWS) of a (len, HD) matrix into a
// (ROWS, HD + kTcPad) shared tile; rows beyond len are zero-filled.
template <typename T, int ROWS, int HD>
__device__ __forceinline__ void tc_load_tile_async(T* tile, const T* __restrict__ src, int row0, int len) {
  constexpr int kChunks = HD / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kTcThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = row0 + r < len;
    const T* from = valid ? src + static_cast<long long>(row0 + r) * HD + col : src;
    tc_cp_async_16(tile + r * (HD + kTcPad) + col, from, valid);
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kTcThreads)
    attention_fwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            T* __restrict__ o, float* __restrict__ lse, int Lq, int Lk, float scale) {
  constexpr int BR = kTcBR, BC = TcTile<HD>::BC;
  constexpr int S = HD + kTcPad;  // shared row stride (elements)
  constexpr int KD = HD / 16;     // k-steps of S = Q K^T over the head dim
  constexpr int NS = BC / 8;      // n-tiles (8 keys) of S
  constexpr int NO = HD / 8;      // n-tiles (8 dims) of O
  static_assert(BR <= 2 * BC, "the Q tile is staged in the two tiles of stage 1");
  // Stage s: K_j at smem + 2s*BC*S, V_j right after it.
  alignas(16) __shared__ T smem[4 * BC * S];

  const int bh = blockIdx.y, row0 = blockIdx.x * BR;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: the matrix this lane addresses, and its row
  const T* qb = q + static_cast<long long>(bh) * Lq * HD;
  const T* kb = k + static_cast<long long>(bh) * Lk * HD;
  const T* vb = v + static_cast<long long>(bh) * Lk * HD;
  T* stage1 = smem + 2 * BC * S;

  // Q_i into stage 1, K_0 and V_0 into stage 0: one group.
  tc_load_tile_async<T, BR, HD>(stage1, qb, row0, Lq);
  tc_load_tile_async<T, BC, HD>(smem, kb, 0, Lk);
  tc_load_tile_async<T, BC, HD>(smem + BC * S, vb, 0, Lk);
  tc_cp_async_commit();
  tc_cp_async_wait<0>();
  __syncthreads();

  // A fragments of this warp's 16 rows of Q_i: matrix mi covers rows 8*(mi&1).., dims 8*(mi>>1)..
  uint32_t qf[KD][4];
  for (int kk = 0; kk < KD; ++kk) {
    tc_ldmatrix_x4(qf[kk], stage1 + (warp * 16 + (mi & 1) * 8 + mr) * S + kk * 16 + (mi >> 1) * 8);
  }
  __syncthreads();  // stage 1 is free for K_1, V_1

  float acc[NO][4];  // O, C fragments: rows g and g+8, dims 8n + 2t, +1
  for (int n = 0; n < NO; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of the raw scores, rows g and g+8
  float l[2] = {0.f, 0.f};              // running sum, this lane's columns only (reduced at the end)
  const float scale_log2 = scale * 1.4426950408889634f;

  const int Tc = ceil_div(Lk, BC);
  for (int j = 0; j < Tc; ++j) {
    // 1. Prefetch K_{j+1}, V_{j+1} into the other stage; wait for tile j.
    if (j + 1 < Tc) {
      T* next = smem + ((j + 1) & 1) * 2 * BC * S;
      tc_load_tile_async<T, BC, HD>(next, kb, (j + 1) * BC, Lk);
      tc_load_tile_async<T, BC, HD>(next + BC * S, vb, (j + 1) * BC, Lk);
    }
    tc_cp_async_commit();  // an empty group on the last tile keeps the count uniform
    tc_cp_async_wait<1>();
    __syncthreads();
    const T* sk = smem + (j & 1) * 2 * BC * S;
    const T* sv = sk + BC * S;

    // 2. S = Q_i K_j^T. B fragments from K_j rows (keys) by plain ldmatrix: matrix mi covers
    // keys 8*(mi>>1).. of a 16-key pair of n-tiles and dims 8*(mi&1).. of the k-step.
    float s[NS][4];
    for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    for (int kk = 0; kk < KD; ++kk) {
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t b[4];
        tc_ldmatrix_x4(b, sk + (np * 16 + (mi >> 1) * 8 + mr) * S + kk * 16 + (mi & 1) * 8);
        tc_mma<T>(s[2 * np], qf[kk], b[0], b[1]);
        tc_mma<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }
    if ((j + 1) * BC > Lk) {  // partial K/V tile: keys beyond Lk do not exist
      for (int n = 0; n < NS; ++n) {
        for (int e = 0; e < 4; ++e) {
          if (j * BC + n * 8 + 2 * t + (e & 1) >= Lk) s[n][e] = -INFINITY;
        }
      }
    }

    // 3. Online softmax; the four lanes of a quad (same g) share a row.
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
      for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      // mx is finite: every tile holds at least one key below Lk.
      const float alpha = exp2f((m[r] - mx) * scale_log2);
      const float shift = mx * scale_log2;
      float rowsum = 0.f;
      for (int n = 0; n < NS; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] * scale_log2 - shift);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] * scale_log2 - shift);
        rowsum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l[r] = alpha * l[r] + rowsum;
      m[r] = mx;
      for (int n = 0; n < NO; ++n) {
        acc[n][2 * r] *= alpha;
        acc[n][2 * r + 1] *= alpha;
      }
    }

    // 4. O += P V_j over k-steps of 16 keys. The A fragment of P is n-tiles 2kk (a0, a1) and
    // 2kk+1 (a2, a3) of S; V_j B fragments by ldmatrix.trans: matrix mi covers keys
    // 8*(mi&1).. and dims 8*(mi>>1).. of a pair of n-tiles.
    for (int kk = 0; kk < BC / 16; ++kk) {
      const uint32_t pa[4] = {tc_pack<T>(s[2 * kk][0], s[2 * kk][1]), tc_pack<T>(s[2 * kk][2], s[2 * kk][3]),
                              tc_pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              tc_pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      for (int dp = 0; dp < NO / 2; ++dp) {
        uint32_t b[4];
        tc_ldmatrix_x4_trans(b, sv + (kk * 16 + (mi & 1) * 8 + mr) * S + dp * 16 + (mi >> 1) * 8);
        tc_mma<T>(acc[2 * dp], pa, b[0], b[1]);
        tc_mma<T>(acc[2 * dp + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // O /= l and lse = scale * m + log l, rows g and g+8 of this warp.
  T* ob = o + static_cast<long long>(bh) * Lq * HD;
  for (int r = 0; r < 2; ++r) {
    float lr = l[r];
    lr += __shfl_xor_sync(kFullMask, lr, 1);
    lr += __shfl_xor_sync(kFullMask, lr, 2);
    const int row = row0 + warp * 16 + g + 8 * r;
    if (row >= Lq) continue;
    const float inv = 1.f / lr;
    for (int n = 0; n < NO; ++n) {
      *reinterpret_cast<uint32_t*>(ob + static_cast<long long>(row) * HD + n * 8 + 2 * t) =
          tc_pack<T>(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
    }
    if (t == 0) lse[static_cast<long long>(bh) * Lq + row] = m[r] * scale + logf(lr);
  }
}

}  // namespace DIT4DIT_KERNEL_NS
