// adaLN modulation on the GPU: y = LayerNorm(x) * (1 + scale[g]) + shift[g].
//
// Shapes (all contiguous, row-major):
//   x, y, grad_y, grad_x : (B, N, D) of T       T = float, __half or __nv_bfloat16
//   shift, scale         : (B, G, D) of T       token n of a sample uses group g = n / (N / G)
//   mean, rstd           : (B, N) float32       saved by the forward for the backward
//   grad_shift/scale     : (B, G, D) of T
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
//   adaln_bwd_param_kernel  dshift = sum_n dy, dscale = sum_n dy * xhat over the tokens
//                           of each (sample, group): a second kernel, column-parallel;
//                           each block owns 32 columns of one (b, g), its threads
//                           stride over the group's tokens and the partial sums are
//                           reduced in shared memory. No atomics, deterministic.
#pragma once

#include "common.cuh"

namespace DIT4DIT_KERNEL_NS {

constexpr int kAdalnWarpsPerBlock = 4;  // rows per block of the row kernels
constexpr int kAdalnParamCols = 32;     // columns per block of the parameter-gradient kernel
constexpr int kAdalnParamRows = 4;      // token strides per block of the parameter-gradient kernel

template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    adaln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                     T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                     int rows, int N, int D, int G, float eps) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warp leaves together: no shuffle or barrier below misses it
  const int b = row / N;
  const int g = (row % N) / (N / G);
  const T* xr = x + static_cast<long long>(row) * D;
  const long long group_offset = (static_cast<long long>(b) * G + g) * D;

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
  T* yr = y + static_cast<long long>(row) * D;
  for (int d = lane; d < D; d += kWarpSize) {
    const float xhat = (to_float(xr[d]) - mean) * rstd;
    const float sc = to_float(scale[group_offset + d]);
    const float sh = to_float(shift[group_offset + d]);
    yr[d] = from_float<T>(xhat * (1.f + sc) + sh);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
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
  const int b = row / N;
  const int g = (row % N) / (N / G);
  const long long row_offset = static_cast<long long>(row) * D;
  const long long group_offset = (static_cast<long long>(b) * G + g) * D;
  const float mean = mean_in[row];
  const float rstd = rstd_in[row];

  // The two row reductions: sum(g) and sum(g * xhat), g = dy * (1 + scale), rounded once so that
  // both loops see the same g.
  float sum_g = 0.f, sum_gx = 0.f;
  for (int d = lane; d < D; d += kWarpSize) {
    const float gd = __fmul_rn(to_float(grad_y[row_offset + d]), 1.f + to_float(scale[group_offset + d]));
    const float xhat = (to_float(x[row_offset + d]) - mean) * rstd;
    sum_g += gd;
    sum_gx += gd * xhat;
  }
  const float mean_g = __fdiv_rn(warp_allreduce_sum(sum_g), static_cast<float>(D));
  const float mean_gx = __fdiv_rn(warp_allreduce_sum(sum_gx), static_cast<float>(D));

  for (int d = lane; d < D; d += kWarpSize) {
    const float gd = __fmul_rn(to_float(grad_y[row_offset + d]), 1.f + to_float(scale[group_offset + d]));
    const float xhat = (to_float(x[row_offset + d]) - mean) * rstd;
    grad_x[row_offset + d] = from_float<T>(rstd * (gd - mean_g - xhat * mean_gx));
  }
}

// Block (COLS, ROWS); grid (ceil(D / COLS), B * G).
template <typename T, int COLS, int ROWS>
__global__ void __launch_bounds__(COLS * ROWS)
    adaln_bwd_param_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                           T* __restrict__ grad_shift, T* __restrict__ grad_scale, int N, int D, int G) {
  __shared__ float part_shift[ROWS][COLS];
  __shared__ float part_scale[ROWS][COLS];
  const int col = threadIdx.x;
  const int d = blockIdx.x * COLS + col;
  const int bg = blockIdx.y;  // b * G + g
  const int b = bg / G;
  const int g = bg % G;
  const int tokens = N / G;

  // Each thread sums its column over every ROWS-th token of the group.
  float s_shift = 0.f, s_scale = 0.f;
  if (d < D) {
    for (int t = threadIdx.y; t < tokens; t += ROWS) {
      const int row = b * N + g * tokens + t;
      const long long off = static_cast<long long>(row) * D + d;
      const float dy = to_float(grad_y[off]);
      const float xhat = (to_float(x[off]) - mean_in[row]) * rstd_in[row];
      s_shift += dy;
      s_scale += dy * xhat;
    }
  }
  part_shift[threadIdx.y][col] = s_shift;
  part_scale[threadIdx.y][col] = s_scale;
  __syncthreads();  // all partial sums of the block are in shared memory

  if (threadIdx.y == 0 && d < D) {
    float total_shift = 0.f, total_scale = 0.f;
    for (int r = 0; r < ROWS; ++r) {
      total_shift += part_shift[r][col];
      total_scale += part_scale[r][col];
    }
    const long long out = static_cast<long long>(bg) * D + d;
    grad_shift[out] = from_float<T>(total_shift);
    grad_scale[out] = from_float<T>(total_scale);
  }
}

}  // namespace DIT4DIT_KERNEL_NS
