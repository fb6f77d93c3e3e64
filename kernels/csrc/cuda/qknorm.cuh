// The per-head RMSNorm of q or k with its gain, followed by the rotary embedding (RoPE),
// on the GPU (qk_norm_rope):
//     r = rsqrt(mean_hd(x^2) + eps),  xn = x * r * w,
//     y_a = xn_a cos - xn_b sin,  y_b = xn_a sin + xn_b cos   for each channel pair i = (a, b)
// with pairs (2i, 2i+1) when interleaved, else (i, i + hd/2) ("rotate half").
//
// Shapes (all contiguous, row-major; one row = one head of one token, rows = B * nh * N):
//   x, y, grad_y, grad_x : (B, nh, N, hd) of T     T = float, __half or __nv_bfloat16; hd even
//   weight               : (hd) float32
//   cos, sin             : (N, hd/2) float32       the angle of pair i at token n = row % N
//   rstd                 : (B, nh, N) float32      saved by the forward for the backward
//   partial              : (P, hd) float32         grad_weight's per-block partial sums
//   grad_weight          : (hd) float32
// All arithmetic is float32. Limits: rows < 2^31, hd < 2^26.
//
// Kernels:
//   qk_norm_rope_fwd_kernel     one warp per row: lanes own channel pairs; sum(x^2) is a
//                               butterfly all-reduce, then each lane rotates its pairs.
//   qk_norm_rope_bwd_dx_kernel  one warp per row: dxn = R^T dy (rotation by minus the
//                               angle), dxhat = dxn * w, one all-reduce for
//                               mean(dxhat * xhat), dx = r * (dxhat - xhat * mean).
//   qk_norm_rope_bwd_w_kernel   grad_weight's partial sums dw_d = sum_rows dxn_d * xhat_d:
//                               block (32 columns, ROWS), each block strides over its share
//                               of the rows and reduces its ROWS partials in shared memory
//                               into one row of `partial`.
//   qk_norm_rope_sum_kernel     grad_weight = the P partial rows added in a fixed order.
// No atomics: the result is deterministic.
#pragma once

#include "common.cuh"

namespace DIT4DIT_KERNEL_NS {

constexpr int kQkWarpsPerBlock = 4;  // rows per block of the row kernels
constexpr int kQkWeightCols = 32;    // columns per block of the weight-gradient kernel
constexpr int kQkWeightRows = 8;     // row strides per block of the weight-gradient kernel
constexpr int kQkWeightBlocks = 64;  // row blocks of the weight-gradient kernel (at most)

// The channels (a, b) of pair i.
struct Pair {
  int a, b;
};

__host__ __device__ __forceinline__ Pair rope_pair(int i, int hh, bool interleaved) {
  return interleaved ? Pair{2 * i, 2 * i + 1} : Pair{i, i + hh};
}

template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    qk_norm_rope_fwd_kernel(const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ cos,
                            const float* __restrict__ sin, T* __restrict__ y, float* __restrict__ rstd_out, int rows,
                            int N, int hd, float eps, bool interleaved) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // whole warp leaves together: no shuffle below misses it
  const int hh = hd / 2;
  const T* xr = x + static_cast<long long>(row) * hd;
  T* yr = y + static_cast<long long>(row) * hd;
  const float* cr = cos + static_cast<long long>(row % N) * hh;
  const float* sr = sin + static_cast<long long>(row % N) * hh;

  // Pass 1: the row's mean square.
  float sq = 0.f;
  for (int d = lane; d < hd; d += kWarpSize) {
    const float v = to_float(xr[d]);
    sq += v * v;
  }
  const float r = rsqrtf(warp_allreduce_sum(sq) / hd + eps);

  // Pass 2: normalise, scale by the gain and rotate, one pair at a time.
  for (int i = lane; i < hh; i += kWarpSize) {
    const Pair p = rope_pair(i, hh, interleaved);
    const float xa = to_float(xr[p.a]) * r * weight[p.a];
    const float xb = to_float(xr[p.b]) * r * weight[p.b];
    yr[p.a] = from_float<T>(xa * cr[i] - xb * sr[i]);
    yr[p.b] = from_float<T>(xa * sr[i] + xb * cr[i]);
  }
  if (lane == 0) rstd_out[row] = r;
}

template <typename T, int WARPS>
__global__ void __launch_bounds__(WARPS * kWarpSize)
    qk_norm_rope_bwd_dx_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                               const float* __restrict__ weight, const float* __restrict__ cos,
                               const float* __restrict__ sin, const float* __restrict__ rstd_in,
                               T* __restrict__ grad_x, int rows, int N, int hd, bool interleaved) {
  const int lane = threadIdx.x % kWarpSize;
  const int row = blockIdx.x * WARPS + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const int hh = hd / 2;
  const long long off = static_cast<long long>(row) * hd;
  const float* cr = cos + static_cast<long long>(row % N) * hh;
  const float* sr = sin + static_cast<long long>(row % N) * hh;
  const float r = rstd_in[row];

  // The row reduction sum(dxhat * xhat), dxhat = w * R^T dy.
  float dot = 0.f;
  for (int i = lane; i < hh; i += kWarpSize) {
    const Pair p = rope_pair(i, hh, interleaved);
    const float ga = to_float(grad_y[off + p.a]), gb = to_float(grad_y[off + p.b]);
    const float dxa = (ga * cr[i] + gb * sr[i]) * weight[p.a];
    const float dxb = (gb * cr[i] - ga * sr[i]) * weight[p.b];
    dot += dxa * to_float(x[off + p.a]) * r + dxb * to_float(x[off + p.b]) * r;
  }
  const float m = warp_allreduce_sum(dot) / hd;

  for (int i = lane; i < hh; i += kWarpSize) {
    const Pair p = rope_pair(i, hh, interleaved);
    const float ga = to_float(grad_y[off + p.a]), gb = to_float(grad_y[off + p.b]);
    const float dxa = (ga * cr[i] + gb * sr[i]) * weight[p.a];
    const float dxb = (gb * cr[i] - ga * sr[i]) * weight[p.b];
    grad_x[off + p.a] = from_float<T>(r * (dxa - to_float(x[off + p.a]) * r * m));
    grad_x[off + p.b] = from_float<T>(r * (dxb - to_float(x[off + p.b]) * r * m));
  }
}

// Block (COLS, ROWS); grid (ceil(hd / COLS), P). Block (cx, p) writes partial[p, its columns]:
// the sum over rows p * ROWS + ty, stepping by P * ROWS, of dxn_d * xhat_d.
template <typename T, int COLS, int ROWS>
__global__ void __launch_bounds__(COLS * ROWS)
    qk_norm_rope_bwd_w_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const float* __restrict__ cos,
                              const float* __restrict__ sin, const float* __restrict__ rstd_in,
                              float* __restrict__ partial, int rows, int N, int hd, bool interleaved) {
  __shared__ float part[ROWS][COLS];
  const int d = blockIdx.x * COLS + threadIdx.x;
  const int hh = hd / 2;
  float s = 0.f;
  if (d < hd) {
    // d's pair i, its partner channel and whether d is the pair's second channel b.
    const bool second = interleaved ? (d & 1) != 0 : d >= hh;
    const int i = interleaved ? d / 2 : (second ? d - hh : d);
    const int partner = interleaved ? (d ^ 1) : (second ? d - hh : d + hh);
    const float sign = second ? -1.f : 1.f;  // dxn_a = g_a c + g_b s, dxn_b = g_b c - g_a s
    for (int row = blockIdx.y * ROWS + threadIdx.y; row < rows; row += gridDim.y * ROWS) {
      const long long off = static_cast<long long>(row) * hd;
      const long long t = static_cast<long long>(row % N) * hh + i;
      const float dxn = to_float(grad_y[off + d]) * cos[t] + sign * to_float(grad_y[off + partner]) * sin[t];
      s += dxn * to_float(x[off + d]) * rstd_in[row];
    }
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();  // all partial sums of the block are in shared memory
  if (threadIdx.y == 0 && d < hd) {
    float total = 0.f;
    for (int k = 0; k < ROWS; ++k) total += part[k][threadIdx.x];
    partial[static_cast<long long>(blockIdx.y) * hd + d] = total;
  }
}

// grad_weight[d] = sum over the P partial rows, in row order. Grid ceil(hd / threads).
__global__ void qk_norm_rope_sum_kernel(const float* __restrict__ partial, float* __restrict__ grad_weight, int P,
                                        int hd) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= hd) return;
  float total = 0.f;
  for (int p = 0; p < P; ++p) total += partial[static_cast<long long>(p) * hd + d];
  grad_weight[d] = total;
}

}  // namespace DIT4DIT_KERNEL_NS
