// adaLN modulation on the GPU: y = LayerNorm(x) * (1 + scale[g]) + shift[g], alone
// (adaln_modulate) or after a gated residual (residual_modulate: x_new = x + gate[g] * y,
// h = adaLN(x_new)).
//
// Shapes (all contiguous, row-major):
//   x, y, grad_y, grad_x : (B, N, D) of T       T = float, __half or __nv_bfloat16
//   shift, scale         : (B, G, D) of T       token n of a sample uses group g = n / (N / G)
//   mean, rstd           : (B, N) float32       saved by the forward for the backward
//   grad_shift/scale     : (B, G, D) of T
//   residual_modulate: y, x_new, h, grad_x_new, grad_h, grad_y (B, N, D); gate, grad_gate (B, G, D)
// Statistics and all arithmetic are float32. Limits: B*N < 2^31, D < 2^31 / 32.
//
// Kernels:
//   adaln_fwd_kernel        one warp per row (token): two-pass mean / variance with
//                           butterfly shuffles, then the modulated output.
//   adaln_bwd_dx_kernel     one warp per row: with g = dy * (1 + scale) and
//                           xhat = (x - mean) * rstd, the two row reductions
//                           mean(g) and mean(g * xhat) give
//                           dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
//                           g is rounded once (__fmul_rn, never fused into an FMA)
//                           and the means are IEEE divisions (__fdiv_rn, not the
//                           fast-math approximation), so at D = 1, where mean(g) = g
//                           and xhat = 0, dx is exactly 0 as LayerNorm's gradient is;
//                           a fused g - mean(g) would leave the rounding error of g
//                           times rstd = 1/sqrt(eps).
//   residual_fwd_kernel     one warp per row: stores x_new = x + gate * y (rounded to T),
//                           then the adaLN forward of that stored row.
//   residual_bwd_dx_kernel  one warp per row: LayerNorm's gradient for x_new as above, plus
//                           grad_x_new: grad_x; grad_y = gate * grad_x.
//   adaln_bwd_param_kernel  dshift = sum_n dy, dscale = sum_n dy * xhat over the tokens
//                           of each (sample, group), and for residual_modulate (GATE)
//                           dgate = sum_n y * grad_x: a second kernel, column-parallel;
//                           each block owns 32 columns of one (b, g), its threads
//                           stride over the group's tokens and the partial sums are
//                           reduced in shared memory. No atomics, deterministic.
#pragma once

#include "common.cuh"

namespace DIT4DIT_KERNEL_NS {

constexpr int kAdalnWarpsPerBlock = 4;  // rows per block of the row kernels
constexpr int kAdalnParamCols = 32;     // columns per block of the parameter-gradient kernel
constexpr int kAdalnParamRows = 4;      // token strides per block of the parameter-gradient kernel

// ---------------------------------------------------------------------------------
// Row steps shared by the adaLN and residual_modulate kernels, run by one warp per row.
// The row pointers are plain (no __restrict__): residual_modulate's forward passes the x_new
// row that the same warp has just stored, which must be read back through coherent loads.

struct RowStats {
  float mean, rstd;
};

// Forward of one row: writes yr and returns the row's statistics.
template <typename T>
__device__ __forceinline__ RowStats adaln_row_fwd(const T* xr, const T* shift, const T* scale, T* yr, int lane, int D,
                                                float eps) {
  // Pass 1: mean.
  float sum = 0.f;
  for (int d = lane; d < D; d += kWarpSize) sum += to_float(xr[d]);
  const float mean = __fdiv_rn(warp_allreduce_sum(sum), static_cast<float>(D));  // exact at D = 1: xhat = 0
  // Pass 2: biased variance around the mean (x is re-read; it stays in cache).
  float sq = 0.f;
  for (int d = lane; d < D; d += kWarpSize) {
    const float c = to_float(xr[d]) - mean;
    sq += c * c;
  }
  const float rstd = rsqrtf(warp_allreduce_sum(sq) / D + eps);

  // Modulated output.
  for (int d = lane; d < D; d += kWarpSize) {
    const float xhat = (to_float(xr[d]) - mean) * rstd;
    yr[d] = from_float<T>(xhat * (1.f + to_float(scale[d])) + to_float(shift[d]));
  }
  return {mean, rstd};
}

// Backward of one row: calls store(d, dx_d) with LayerNorm's input gradient for each column
// d of the lane.
template <typename T, typename Store>
__device__ __forceinline__ void adaln_row_bwd(const T* dyr, const T* xr, const T* scale, float mean, float rstd,
                                              int lane, int D, Store store) {
  // The two row reductions: sum(g) and sum(g * xhat), g = dy * (1 + scale), rounded once so that
  // both loops see the same g.
  float sum_g = 0.f, sum_gx = 0.f;
  for (int d = lane; d < D; d += kWarpSize) {
    const float gd = __fmul_rn(to_float(dyr[d]), 1.f + to_float(scale[d]));
    const float xhat = (to_float(xr[d]) - mean) * rstd;
    sum_g += gd;
    sum_gx += gd * xhat;
  }
  const float mean_g = __fdiv_rn(warp_allreduce_sum(sum_g), static_cast<float>(D));
  const float mean_gx = __fdiv_rn(warp_allreduce_sum(sum_gx), static_cast<float>(D));

  for (int d = lane; d < D; d += kWarpSize) {
    const float gd = __fmul_rn(to_float(dyr[d]), 1.f + to_float(scale[d]));
    const float xhat = (to_float(xr[d]) - mean) * rstd;
    store(d, rstd * (gd - mean_g - xhat * mean_gx));
  }
}

// ---------------------------------------------------------------------------------
// adaln_modulate

template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    adaln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                     T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                     int rows, int N, int D, int G, float eps) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warp leaves together: no shuffle or barrier below misses it
  const long long row_offset = static_cast<long long>(row) * D;
  const long long group_offset = (static_cast<long long>(row / N) * G + (row % N) / (N / G)) * D;
  const RowStats stats = adaln_row_fwd(x + row_offset, shift + group_offset, scale + group_offset, y + row_offset,
                                     lane, D, eps);
  if (lane == 0) {
    mean_out[row] = stats.mean;
    rstd_out[row] = stats.rstd;
  }
}

template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    adaln_bwd_dx_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ scale,
                        const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                        T* __restrict__ grad_x, int rows, int N, int D, int G) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const long long row_offset = static_cast<long long>(row) * D;
  const long long group_offset = (static_cast<long long>(row / N) * G + (row % N) / (N / G)) * D;
  T* dxr = grad_x + row_offset;
  adaln_row_bwd(grad_y + row_offset, x + row_offset, scale + group_offset, mean_in[row], rstd_in[row], lane, D,
                [&](int d, float dx) { dxr[d] = from_float<T>(dx); });
}

// ---------------------------------------------------------------------------------
// residual_modulate: x_new = x + gate[g] * y, h = adaLN(x_new, shift, scale)

template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    residual_fwd_kernel(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate,
                        const T* __restrict__ shift, const T* __restrict__ scale, T* x_new, T* __restrict__ h,
                        float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows, int N, int D, int G,
                        float eps) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warp leaves together
  const long long row_offset = static_cast<long long>(row) * D;
  const long long group_offset = (static_cast<long long>(row / N) * G + (row % N) / (N / G)) * D;
  // The gated residual, stored in T; each lane reads back only its own columns below, so the
  // adaLN of the row sees the very x_new that is returned.
  T* xr = x_new + row_offset;
  for (int d = lane; d < D; d += kWarpSize) {
    const float gated = to_float(gate[group_offset + d]) * to_float(y[row_offset + d]);
    xr[d] = from_float<T>(to_float(x[row_offset + d]) + gated);
  }
  const RowStats stats = adaln_row_fwd(xr, shift + group_offset, scale + group_offset, h + row_offset, lane, D, eps);
  if (lane == 0) {
    mean_out[row] = stats.mean;
    rstd_out[row] = stats.rstd;
  }
}

// grad_x = grad_x_new + LayerNorm's gradient for x_new (from grad_h), grad_y = gate * grad_x.
template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    residual_bwd_dx_kernel(const T* __restrict__ grad_x_new, const T* __restrict__ grad_h,
                           const T* __restrict__ x_new, const T* __restrict__ gate, const T* __restrict__ scale,
                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                           T* __restrict__ grad_x, T* __restrict__ grad_y, int rows, int N, int D, int G) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const long long row_offset = static_cast<long long>(row) * D;
  const long long group_offset = (static_cast<long long>(row / N) * G + (row % N) / (N / G)) * D;
  adaln_row_bwd(grad_h + row_offset, x_new + row_offset, scale + group_offset, mean_in[row], rstd_in[row], lane, D,
                [&](int d, float dx) {
                  const float total = dx + to_float(grad_x_new[row_offset + d]);
                  grad_x[row_offset + d] = from_float<T>(total);
                  grad_y[row_offset + d] = from_float<T>(to_float(gate[group_offset + d]) * total);
                });
}

// ---------------------------------------------------------------------------------
// Parameter gradients, summed over the tokens of each (sample, group): dshift = sum dy,
// dscale = sum dy * xhat and, with GATE (residual_modulate; dy is grad_h, x is x_new),
// dgate = sum y * grad_x from the grad_x the dx kernel stored.
// Block (COLS, ROWS); grid (ceil(D / COLS), B * G).
template <typename T, int COLS, int ROWS, bool GATE>
__global__ void __launch_bounds__(COLS * ROWS)
    adaln_bwd_param_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                           T* __restrict__ grad_shift, T* __restrict__ grad_scale, const T* __restrict__ res_y,
                           const T* __restrict__ res_grad_x, T* __restrict__ grad_gate, int N, int D, int G) {
  constexpr int P = GATE ? 3 : 2;  // partial sums per column: shift, scale[, gate]
  __shared__ float part[P][ROWS][COLS];
  const int col = threadIdx.x;
  const int d = blockIdx.x * COLS + col;
  const int bg = blockIdx.y;  // b * G + g
  const int b = bg / G;
  const int g = bg % G;
  const int tokens = N / G;

  // Each thread sums its column over every ROWS-th token of the group.
  float s[P] = {};
  if (d < D) {
    for (int t = threadIdx.y; t < tokens; t += ROWS) {
      const int row = b * N + g * tokens + t;
      const long long off = static_cast<long long>(row) * D + d;
      const float dy = to_float(grad_y[off]);
      const float xhat = (to_float(x[off]) - mean_in[row]) * rstd_in[row];
      s[0] += dy;
      s[1] += dy * xhat;
      if constexpr (GATE) s[2] += to_float(res_y[off]) * to_float(res_grad_x[off]);
    }
  }
  for (int k = 0; k < P; ++k) part[k][threadIdx.y][col] = s[k];
  __syncthreads();  // all partial sums of the block are in shared memory

  if (threadIdx.y == 0 && d < D) {
    float total[P] = {};
    for (int r = 0; r < ROWS; ++r)
      for (int k = 0; k < P; ++k) total[k] += part[k][r][col];
    const long long out = static_cast<long long>(bg) * D + d;
    grad_shift[out] = from_float<T>(total[0]);
    grad_scale[out] = from_float<T>(total[1]);
    if constexpr (GATE) grad_gate[out] = from_float<T>(total[2]);
  }
}

}  // namespace DIT4DIT_KERNEL_NS
