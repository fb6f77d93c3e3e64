// Fused attention backward on tensor cores (sm_80+), FlashAttention-2 algorithm.
//
//   o = softmax(q k^T * scale) v,  scale = 1 / sqrt(hd),  no mask,  Lq != Lk allowed;
//   given dO = grad_o, the forward's o and lse (= scale * m + log l, natural log):
//   D_i = rowsum(dO_i o O_i), P = exp(scale * S - lse), dV = P^T dO, dP = dO V^T,
//   dS = P o (dP - D), dK = scale * dS^T Q, dQ = scale * dS K.
//
// Shapes (contiguous, row-major; bh = b * nh + h):
//   q, grad_o   : (B*nh, Lq, HD) of T      T = __half or __nv_bfloat16 (no float32: use attention.cuh)
//   k, v        : (B*nh, Lk, HD) of T
//   lse, delta  : (B*nh, Lq) float32       delta = D, from attention_bwd_preprocess_kernel (attention.cuh)
//   dq_accum    : (B*nh, Lq, HD) float32   zero-initialised; receives dQ (attention_cast_kernel casts it)
//   grad_k, grad_v : (B*nh, Lk, HD) of T
// Limits: HD in {64, 128}; Lq, Lk >= 1 (partial Q tiles and partial K/V tiles are guarded: rows
// beyond Lq and keys beyond Lk are zero-filled, get P = 0 and are never stored); q, k, grad_o
// 16-byte aligned, v, grad_k, grad_v 4-byte aligned (the launcher checks 16 bytes for all).
// Products run on `mma.sync.aligned.m16n8k16` with fp32 accumulation through the tc_* primitives
// of attention_tc.cuh; P and dS are rounded to T as the A operands of the next products (as in
// the forward), dP and the accumulators stay float32.
//
// attention_bwd_tc_kernel: one block of 4 warps per (K/V tile j of BC = 64 keys, bh); warp w
// owns keys 16w..16w+15 of the tile and keeps their dK_j, dV_j rows in registers (C fragments)
// for the whole kernel. The warp computes the transposed scores S^T = K_j Q_i^T (keys as rows),
// so that P^T and dS^T come out of the mma as C fragments whose registers are already the A
// fragments of dV_j += P^T dO_i and dK_j += dS^T Q_i: no transposition through shared memory.
// The block walks over the Q tiles of BR rows (BR = 32 at HD 64, 16 at HD 128):
//   for i = 0 .. Tr-1:
//     1. issue cp.async of Q_{i+1}, dO_{i+1} (and plain loads of lse, D) into the other stage
//        (double buffering), commit; wait for the group of tile i, __syncthreads;
//     2. S^T = K_j Q_i^T (16 x BR per warp): A fragments of K_j by ldmatrix, B fragments from
//        the rows of Q_i by ldmatrix;
//     3. P^T = exp(scale * S^T - lse), lse of the query column; queries beyond Lq have
//        lse = +inf (P = 0), keys beyond Lk get P = 0;
//     4. dV_j += P^T dO_i: the C fragments of P^T, rounded to T, are the A fragments; dO_i B
//        fragments by ldmatrix.trans;
//     5. dP^T = V_j dO_i^T: V_j A fragments held in registers (loaded once from global memory),
//        dO_i B fragments by ldmatrix;
//     6. dS^T = P^T o (dP^T - D), D of the query column;
//     7. dK_j += dS^T Q_i (Q_i B fragments by ldmatrix.trans); dS^T goes to shared memory as T,
//        __syncthreads;
//     8. dQ_i += scale * dS K_j: warp w takes 16 rows and 32 dims of the BR x HD tile; dS A
//        fragments by ldmatrix.trans of the stored dS^T, K_j B fragments by ldmatrix.trans;
//        the products are added to dq_accum with float32 atomicAdd.
//   dK_j = scale * dK_j and dV_j go to global memory, rows below Lk.
// The barrier of step 7 also means every warp is done reading stage i before the next pass
// refills it (Q_i and dO_i are last read in step 7), and the barrier of step 1 means every
// warp is done reading dS^T (step 8) before the next pass overwrites it: two barriers a tile.
//
// dQ: atomicAdd into a float32 buffer, as FlashAttention-2 does, rather than a second kernel
// that loops over the K/V tiles per Q tile: the second kernel would recompute S, P, dP and dS
// (three more of the five products), while the blocks of the K/V tiles of one bh add to the
// same dQ rows only Tc = ceil(Lk / 64) times each; the float32 sums are then not bitwise
// deterministic (the order of the atomic adds varies from run to run).
//
// Shared memory (static): K_j (BC x HD), two stages of Q_i and dO_i (BR x HD each), dS^T
// (BC x BR), rows padded by kTcPad elements; two stages of lse and D (BR floats each):
// 33 280 bytes at HD 64, 38 144 bytes at HD 128. V_j never enters shared memory.
//
// Fragment layouts and the primitives: see attention_tc.cuh.
#pragma once

#include "attention_tc.cuh"

namespace DIT4DIT_KERNEL_NS {

// Keys per K/V tile (16 per warp) and query rows per Q tile of the backward, chosen so that
// the static shared memory stays below 48 KiB with two stages of Q and dO.
template <int HD>
struct TcBwdTile {
  static_assert(HD == 64 || HD == 128, "the tensor-core attention supports head dims 64 and 128");
  static constexpr int BC = 64;
  static constexpr int BR = HD == 64 ? 32 : 16;
};

// Rows [row0, row0 + BR) of lse (scaled by log2 e, so that P = exp2(S * scale * log2 e - lse))
// and of D into shared memory; rows beyond Lq get lse = +inf (P = 0) and D = 0.
template <int BR>
__device__ __forceinline__ void tc_load_row_stats(float* slse, float* sdelta, const float* __restrict__ lse,
                                                  const float* __restrict__ delta, int row0, int Lq) {
  for (int r = threadIdx.x; r < BR; r += kTcThreads) {
    const bool valid = row0 + r < Lq;
    slse[r] = valid ? lse[row0 + r] * 1.4426950408889634f : INFINITY;
    sdelta[r] = valid ? delta[row0 + r] : 0.f;
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kTcThreads)
    attention_bwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const T* __restrict__ grad_o, const float* __restrict__ lse,
                            const float* __restrict__ delta, float* __restrict__ dq_accum, T* __restrict__ grad_k,
                            T* __restrict__ grad_v, int Lq, int Lk, float scale) {
  constexpr int BR = TcBwdTile<HD>::BR, BC = TcBwdTile<HD>::BC;
  constexpr int kWarps = kTcThreads / kWarpSize;
  constexpr int S = HD + kTcPad;   // shared row stride of K_j, Q_i, dO_i (elements)
  constexpr int SP = BR + kTcPad;  // shared row stride of dS^T
  constexpr int KD = HD / 16;      // k-steps over the head dim (S^T, dP^T)
  constexpr int NQ = BR / 8;       // n-tiles (8 queries) of S^T, dP^T
  constexpr int ND = HD / 8;       // n-tiles (8 dims) of dK_j, dV_j
  constexpr int RW = BR / 16;      // step 8: warps along the rows of dQ_i
  constexpr int DQ = HD / (kWarps / RW);  // step 8: dims of dQ_i per warp
  static_assert(BC == 16 * kWarps, "each warp owns 16 keys of the K/V tile");
  static_assert(BR % 16 == 0 && kWarps % RW == 0 && DQ % 16 == 0, "dQ_i does not split among the warps");
  alignas(16) __shared__ T sk[BC * S];
  alignas(16) __shared__ T sqdo[2][2][BR * S];  // [stage][Q_i, dO_i]
  alignas(16) __shared__ T sds[BC * SP];        // dS^T: keys as rows
  __shared__ float slse[2][BR], sdelta[2][BR];

  const int bh = blockIdx.y, k0 = blockIdx.x * BC;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int mi = lane / 8, mr = lane % 8;  // ldmatrix: the matrix this lane addresses, and its row
  const T* qb = q + static_cast<long long>(bh) * Lq * HD;
  const T* dob = grad_o + static_cast<long long>(bh) * Lq * HD;
  const T* kb = k + static_cast<long long>(bh) * Lk * HD;
  const T* vb = v + static_cast<long long>(bh) * Lk * HD;
  const float* lseb = lse + static_cast<long long>(bh) * Lq;
  const float* deltab = delta + static_cast<long long>(bh) * Lq;
  float* dqb = dq_accum + static_cast<long long>(bh) * Lq * HD;
  const int key_lo = k0 + warp * 16 + g, key_hi = key_lo + 8;  // this lane's C-fragment rows (keys)

  // K_j, and Q_0, dO_0 into stage 0: one group.
  tc_load_tile_async<T, BC, HD>(sk, kb, k0, Lk);
  tc_load_tile_async<T, BR, HD>(sqdo[0][0], qb, 0, Lq);
  tc_load_tile_async<T, BR, HD>(sqdo[0][1], dob, 0, Lq);
  tc_cp_async_commit();
  tc_load_row_stats<BR>(slse[0], sdelta[0], lseb, deltab, 0, Lq);

  // A fragments of this warp's 16 rows of V_j, straight from global memory (two adjacent
  // elements per register); keys beyond Lk are zero.
  uint32_t vf[KD][4];
  for (int kk = 0; kk < KD; ++kk) {
    for (int e = 0; e < 4; ++e) {
      const int key = (e & 1) ? key_hi : key_lo, col = kk * 16 + (e >> 1) * 8 + 2 * t;
      vf[kk][e] = key < Lk ? *reinterpret_cast<const uint32_t*>(vb + static_cast<long long>(key) * HD + col) : 0u;
    }
  }

  float dv[ND][4], dk[ND][4];  // C fragments: keys key_lo (0, 1) and key_hi (2, 3), dims 8n + 2t, +1
  for (int n = 0; n < ND; ++n) {
    for (int e = 0; e < 4; ++e) dv[n][e] = dk[n][e] = 0.f;
  }
  const float scale_log2 = scale * 1.4426950408889634f;

  const int Tr = ceil_div(Lq, BR);
  for (int i = 0; i < Tr; ++i) {
    // 1. Prefetch Q_{i+1}, dO_{i+1}, lse and D into the other stage; wait for tile i.
    const int st = i & 1;
    if (i + 1 < Tr) {
      tc_load_tile_async<T, BR, HD>(sqdo[st ^ 1][0], qb, (i + 1) * BR, Lq);
      tc_load_tile_async<T, BR, HD>(sqdo[st ^ 1][1], dob, (i + 1) * BR, Lq);
      tc_load_row_stats<BR>(slse[st ^ 1], sdelta[st ^ 1], lseb, deltab, (i + 1) * BR, Lq);
    }
    tc_cp_async_commit();  // an empty group on the last tile keeps the count uniform
    tc_cp_async_wait<1>();
    __syncthreads();
    const T* sq = sqdo[st][0];
    const T* sdo = sqdo[st][1];

    // 2. S^T = K_j Q_i^T. K_j A fragments: matrix mi covers keys 8*(mi&1).. and dims 8*(mi>>1)..
    // of the k-step; Q_i B fragments by plain ldmatrix: matrix mi covers queries 8*(mi>>1).. of
    // a pair of n-tiles and dims 8*(mi&1).. of the k-step.
    float s[NQ][4];
    for (int n = 0; n < NQ; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    for (int kk = 0; kk < KD; ++kk) {
      uint32_t ka[4];
      tc_ldmatrix_x4(ka, sk + (warp * 16 + (mi & 1) * 8 + mr) * S + kk * 16 + (mi >> 1) * 8);
      for (int np = 0; np < NQ / 2; ++np) {
        uint32_t b[4];
        tc_ldmatrix_x4(b, sq + (np * 16 + (mi >> 1) * 8 + mr) * S + kk * 16 + (mi & 1) * 8);
        tc_mma<T>(s[2 * np], ka, b[0], b[1]);
        tc_mma<T>(s[2 * np + 1], ka, b[2], b[3]);
      }
    }

    // 3. P^T = exp(scale * S^T - lse): element e of n-tile n is key (e < 2 ? key_lo : key_hi),
    // query 8n + 2t + (e & 1) of the tile.
    for (int n = 0; n < NQ; ++n) {
      for (int e = 0; e < 4; ++e) {
        const bool key_valid = ((e < 2) ? key_lo : key_hi) < Lk;
        const float p = exp2f(s[n][e] * scale_log2 - slse[st][n * 8 + 2 * t + (e & 1)]);
        s[n][e] = key_valid ? p : 0.f;
      }
    }

    // 4. dV_j += P^T dO_i over k-steps of 16 queries: the A fragment of P^T is n-tiles 2kk
    // (a0, a1) and 2kk+1 (a2, a3); dO_i B fragments by ldmatrix.trans: matrix mi covers
    // queries 8*(mi&1).. and dims 8*(mi>>1).. of a pair of n-tiles.
    for (int kk = 0; kk < BR / 16; ++kk) {
      const uint32_t pa[4] = {tc_pack<T>(s[2 * kk][0], s[2 * kk][1]), tc_pack<T>(s[2 * kk][2], s[2 * kk][3]),
                              tc_pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              tc_pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      for (int dp = 0; dp < ND / 2; ++dp) {
        uint32_t b[4];
        tc_ldmatrix_x4_trans(b, sdo + (kk * 16 + (mi & 1) * 8 + mr) * S + dp * 16 + (mi >> 1) * 8);
        tc_mma<T>(dv[2 * dp], pa, b[0], b[1]);
        tc_mma<T>(dv[2 * dp + 1], pa, b[2], b[3]);
      }
    }

    // 5. dP^T = V_j dO_i^T: dO_i B fragments by plain ldmatrix, as Q_i in step 2.
    float dpt[NQ][4];
    for (int n = 0; n < NQ; ++n) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
    for (int kk = 0; kk < KD; ++kk) {
      for (int np = 0; np < NQ / 2; ++np) {
        uint32_t b[4];
        tc_ldmatrix_x4(b, sdo + (np * 16 + (mi >> 1) * 8 + mr) * S + kk * 16 + (mi & 1) * 8);
        tc_mma<T>(dpt[2 * np], vf[kk], b[0], b[1]);
        tc_mma<T>(dpt[2 * np + 1], vf[kk], b[2], b[3]);
      }
    }

    // 6. dS^T = P^T o (dP^T - D), in place of P^T.
    for (int n = 0; n < NQ; ++n) {
      for (int e = 0; e < 4; ++e) s[n][e] *= dpt[n][e] - sdelta[st][n * 8 + 2 * t + (e & 1)];
    }

    // 7. dK_j += dS^T Q_i (A fragments of dS^T as those of P^T in step 4, Q_i B fragments by
    // ldmatrix.trans); dS^T to shared memory for step 8.
    for (int kk = 0; kk < BR / 16; ++kk) {
      const uint32_t da[4] = {tc_pack<T>(s[2 * kk][0], s[2 * kk][1]), tc_pack<T>(s[2 * kk][2], s[2 * kk][3]),
                              tc_pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              tc_pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      for (int dp = 0; dp < ND / 2; ++dp) {
        uint32_t b[4];
        tc_ldmatrix_x4_trans(b, sq + (kk * 16 + (mi & 1) * 8 + mr) * S + dp * 16 + (mi >> 1) * 8);
        tc_mma<T>(dk[2 * dp], da, b[0], b[1]);
        tc_mma<T>(dk[2 * dp + 1], da, b[2], b[3]);
      }
    }
    for (int n = 0; n < NQ; ++n) {
      *reinterpret_cast<uint32_t*>(sds + (warp * 16 + g) * SP + n * 8 + 2 * t) = tc_pack<T>(s[n][0], s[n][1]);
      *reinterpret_cast<uint32_t*>(sds + (warp * 16 + g + 8) * SP + n * 8 + 2 * t) = tc_pack<T>(s[n][2], s[n][3]);
    }
    __syncthreads();  // dS^T visible; every warp is done with stage st

    // 8. dQ_i += scale * dS K_j: this warp's rows 16*rw.. and dims dq0.. of the tile, over
    // k-steps of 16 keys. dS A fragments from the stored dS^T by ldmatrix.trans: matrix mi
    // covers keys 8*(mi>>1).. (a2, a3: the upper 8 keys) and queries 8*(mi&1).. (a1, a3: the
    // lower 8 rows); K_j B fragments by ldmatrix.trans: matrix mi covers keys 8*(mi&1).. and
    // dims 8*(mi>>1).. of a pair of n-tiles.
    const int rw = warp % RW, dq0 = (warp / RW) * DQ;
    float dq[DQ / 8][4];
    for (int n = 0; n < DQ / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
    for (int kk = 0; kk < BC / 16; ++kk) {
      uint32_t a[4];
      tc_ldmatrix_x4_trans(a, sds + (kk * 16 + (mi >> 1) * 8 + mr) * SP + rw * 16 + (mi & 1) * 8);
      for (int dp = 0; dp < DQ / 16; ++dp) {
        uint32_t b[4];
        tc_ldmatrix_x4_trans(b, sk + (kk * 16 + (mi & 1) * 8 + mr) * S + dq0 + dp * 16 + (mi >> 1) * 8);
        tc_mma<T>(dq[2 * dp], a, b[0], b[1]);
        tc_mma<T>(dq[2 * dp + 1], a, b[2], b[3]);
      }
    }
    for (int r = 0; r < 2; ++r) {
      const int row = i * BR + rw * 16 + g + 8 * r;
      if (row >= Lq) continue;
      float* dst = dqb + static_cast<long long>(row) * HD + dq0 + 2 * t;
      for (int n = 0; n < DQ / 8; ++n) {
        atomicAdd(dst + n * 8, scale * dq[n][2 * r]);
        atomicAdd(dst + n * 8 + 1, scale * dq[n][2 * r + 1]);
      }
    }
  }

  // dK_j = scale * dK_j and dV_j, keys below Lk.
  T* dkb = grad_k + static_cast<long long>(bh) * Lk * HD;
  T* dvb = grad_v + static_cast<long long>(bh) * Lk * HD;
  for (int r = 0; r < 2; ++r) {
    const int key = r ? key_hi : key_lo;
    if (key >= Lk) continue;
    for (int n = 0; n < ND; ++n) {
      const long long off = static_cast<long long>(key) * HD + n * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dkb + off) = tc_pack<T>(scale * dk[n][2 * r], scale * dk[n][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dvb + off) = tc_pack<T>(dv[n][2 * r], dv[n][2 * r + 1]);
    }
  }
}

}  // namespace DIT4DIT_KERNEL_NS
