// Test library: runs the CUDA kernels of kernels/csrc/cuda/*.cuh on the CPU through the
// emulation harness (cuda_emu.h). Built by tests/test_cuda_emulated.py with
// torch.utils.cpp_extension.load and called through ctypes on raw pointers of CPU
// tensors; it includes no torch header, so it compiles in seconds.
//
// Every entry point returns 0 on success, or 1 and an error message in `err`. The grids,
// blocks and template arguments are those of the launchers in kernels/csrc/cuda/*.cu.
// dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
#include "cuda_emu.h"
// (the emulation header must come first)
#include "adaln.cuh"
#include "attention.cuh"
#include "attention_tc.cuh"
#include "attention_tc_bwd.cuh"
#include "qknorm.cuh"

#include <algorithm>
#include <cstdio>
#include <type_traits>
#include <utility>

using namespace dit4dit_cuda;

namespace {

template <typename F>
int guarded(char* err, int errlen, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
    return 1;
  }
}

template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(__half{}); break;
    case 2: f(__nv_bfloat16{}); break;
    default: throw std::runtime_error(emu::cat("unknown dtype code ", dtype));
  }
}

template <typename F>
void dispatch_head_dim(int hd, F&& f) {
  if (hd < 1 || hd > kAttnMaxHeadDim) throw std::runtime_error(emu::cat("head dim ", hd, " outside 1..128"));
  with_head_dim_bucket(hd, std::forward<F>(f));  // the launchers' own choice of instantiation
}

// ----- kernels used only to exercise the harness's own checks --------------------------------
__global__ void warp_sum_kernel(const float* in, float* out) {
  const float v = warp_allreduce_sum(in[blockIdx.x * blockDim.x + threadIdx.x]);
  if (threadIdx.x % kWarpSize == 0) out[blockIdx.x * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize] = v;
}

// Two half-warps reduce independently with disjoint masks, in opposite branches.
__global__ void half_warp_sum_kernel(const float* in, float* out) {
  const int lane = threadIdx.x % kWarpSize;
  float v = in[threadIdx.x];
  if (lane < 16) {
    for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(0x0000ffffu, v, offset, 16);
  } else {
    for (int offset = 1; offset < 16; offset *= 2) v += __shfl_down_sync(0xffff0000u, v, offset, 16);
  }
  if (lane % 16 == 0) out[threadIdx.x / 16] = v;
}

__global__ void divergent_barrier_kernel(float* out) {
  __shared__ float buf[64];
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 40) {
    __syncthreads();  // only part of the block reaches this barrier
    out[threadIdx.x] = buf[63 - threadIdx.x];
  }
}

__global__ void mismatched_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    out[threadIdx.x] = 1.f;
    __syncthreads();
  } else {
    out[threadIdx.x] = 2.f;
    __syncthreads();
  }
}

__global__ void shuffle_outside_mask_kernel(float* out) {
  // Lanes 0..15 exchange among themselves but read lane (lane ^ 16), outside the mask.
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 16);
}

__global__ void shuffle_excludes_caller_kernel(float* out) {
  // Every lane passes a mask naming only lanes 0..15.
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
}

// run.template operator()<T, HD>() for the tensor-core kernels' dtype code (1 float16, 2 bfloat16)
// and head dim (64 or 128); anything else throws.
template <typename F>
void dispatch_tc(int dtype, int hd, F&& run) {
  if (hd != 64 && hd != 128) throw std::runtime_error(emu::cat("tensor-core attention: hd ", hd, " not 64/128"));
  if (dtype == 1) {
    hd == 64 ? run.template operator()<__half, 64>() : run.template operator()<__half, 128>();
  } else if (dtype == 2) {
    hd == 64 ? run.template operator()<__nv_bfloat16, 64>() : run.template operator()<__nv_bfloat16, 128>();
  } else {
    throw std::runtime_error(emu::cat("tensor-core attention: dtype code ", dtype, " is not float16/bfloat16"));
  }
}

}  // namespace

extern "C" {

int emu_adaln_fwd(int dtype, const void* x, const void* shift, const void* scale, void* y, float* mean, float* rstd,
                  int B, int N, int D, int G, float eps, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    dispatch_dtype(dtype, [&]<typename T>(T) {
      constexpr int W = kAdalnWarpsPerBlock;
      const int rows = B * N;
      emu::launch(adaln_fwd_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize), static_cast<const T*>(x),
                  static_cast<const T*>(shift), static_cast<const T*>(scale), static_cast<T*>(y), mean, rstd, rows, N,
                  D, G, eps);
    });
  });
}

int emu_adaln_bwd(int dtype, const void* grad_y, const void* x, const void* scale, const float* mean,
                  const float* rstd, void* grad_x, void* grad_shift, void* grad_scale, int B, int N, int D, int G,
                  char* err, int errlen) {
  return guarded(err, errlen, [&] {
    dispatch_dtype(dtype, [&]<typename T>(T) {
      constexpr int W = kAdalnWarpsPerBlock;
      const int rows = B * N;
      emu::launch(adaln_bwd_dx_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize),
                  static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(scale), mean, rstd,
                  static_cast<T*>(grad_x), rows, N, D, G);
      emu::launch(adaln_bwd_param_kernel<T, kAdalnParamCols, kAdalnParamRows, false>,
                  dim3(ceil_div(D, kAdalnParamCols), B * G), dim3(kAdalnParamCols, kAdalnParamRows),
                  static_cast<const T*>(grad_y), static_cast<const T*>(x), mean, rstd, static_cast<T*>(grad_shift),
                  static_cast<T*>(grad_scale), static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                  static_cast<T*>(nullptr), N, D, G);
    });
  });
}

int emu_residual_fwd(int dtype, const void* x, const void* y, const void* gate, const void* shift, const void* scale,
                     void* x_new, void* h, float* mean, float* rstd, int B, int N, int D, int G, float eps, char* err,
                     int errlen) {
  return guarded(err, errlen, [&] {
    dispatch_dtype(dtype, [&]<typename T>(T) {
      constexpr int W = kAdalnWarpsPerBlock;
      const int rows = B * N;
      emu::launch(residual_fwd_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize), static_cast<const T*>(x),
                  static_cast<const T*>(y), static_cast<const T*>(gate), static_cast<const T*>(shift),
                  static_cast<const T*>(scale), static_cast<T*>(x_new), static_cast<T*>(h), mean, rstd, rows, N, D, G,
                  eps);
    });
  });
}

int emu_residual_bwd(int dtype, const void* grad_x_new, const void* grad_h, const void* x_new, const void* y,
                     const void* gate, const void* scale, const float* mean, const float* rstd, void* grad_x,
                     void* grad_y, void* grad_gate, void* grad_shift, void* grad_scale, int B, int N, int D, int G,
                     char* err, int errlen) {
  return guarded(err, errlen, [&] {
    dispatch_dtype(dtype, [&]<typename T>(T) {
      constexpr int W = kAdalnWarpsPerBlock;
      const int rows = B * N;
      emu::launch(residual_bwd_dx_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize),
                  static_cast<const T*>(grad_x_new), static_cast<const T*>(grad_h), static_cast<const T*>(x_new),
                  static_cast<const T*>(gate), static_cast<const T*>(scale), mean, rstd, static_cast<T*>(grad_x),
                  static_cast<T*>(grad_y), rows, N, D, G);
      emu::launch(adaln_bwd_param_kernel<T, kAdalnParamCols, kAdalnParamRows, true>,
                  dim3(ceil_div(D, kAdalnParamCols), B * G), dim3(kAdalnParamCols, kAdalnParamRows),
                  static_cast<const T*>(grad_h), static_cast<const T*>(x_new), mean, rstd, static_cast<T*>(grad_shift),
                  static_cast<T*>(grad_scale), static_cast<const T*>(y), static_cast<const T*>(grad_x),
                  static_cast<T*>(grad_gate), N, D, G);
    });
  });
}

int emu_qk_norm_rope_fwd(int dtype, const void* x, const float* weight, const float* cos, const float* sin, void* y,
                         float* rstd, int rows, int N, int hd, float eps, int interleaved, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    dispatch_dtype(dtype, [&]<typename T>(T) {
      constexpr int W = kQkWarpsPerBlock;
      emu::launch(qk_norm_rope_fwd_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize),
                  static_cast<const T*>(x), weight, cos, sin, static_cast<T*>(y), rstd, rows, N, hd, eps,
                  interleaved != 0);
    });
  });
}

// partial must hold min(kQkWeightBlocks, ceil(rows / kQkWeightRows)) rows of hd floats.
int emu_qk_norm_rope_bwd(int dtype, const void* grad_y, const void* x, const float* weight, const float* cos,
                         const float* sin, const float* rstd, void* grad_x, float* partial, float* grad_weight,
                         int rows, int N, int hd, int interleaved, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    dispatch_dtype(dtype, [&]<typename T>(T) {
      constexpr int W = kQkWarpsPerBlock;
      const int P = std::min(kQkWeightBlocks, ceil_div(rows, kQkWeightRows));
      emu::launch(qk_norm_rope_bwd_dx_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize),
                  static_cast<const T*>(grad_y), static_cast<const T*>(x), weight, cos, sin, rstd,
                  static_cast<T*>(grad_x), rows, N, hd, interleaved != 0);
      emu::launch(qk_norm_rope_bwd_w_kernel<T, kQkWeightCols, kQkWeightRows>,
                  dim3(ceil_div(hd, kQkWeightCols), P), dim3(kQkWeightCols, kQkWeightRows),
                  static_cast<const T*>(grad_y), static_cast<const T*>(x), cos, sin, rstd, partial, rows, N, hd,
                  interleaved != 0);
      emu::launch(qk_norm_rope_sum_kernel, dim3(ceil_div(hd, 128)), dim3(128), static_cast<const float*>(partial),
                  grad_weight, P, hd);
    });
  });
}

int emu_attention_fwd(int dtype, const void* q, const void* k, const void* v, void* o, float* lse, int BH, int Lq,
                      int Lk, int hd, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    dispatch_dtype(dtype, [&]<typename T>(T) {
      dispatch_head_dim(hd, [&]<typename Bucket>(Bucket) {
        constexpr int BR = Bucket::FWD_BR, BC = Bucket::FWD_BC;
        emu::launch(attention_fwd_kernel<T, Bucket::HD, BR, BC, kAttnThreads>, dim3(ceil_div(Lq, BR), BH),
                    dim3(kAttnThreads), static_cast<const T*>(q), static_cast<const T*>(k),
                    static_cast<const T*>(v), static_cast<T*>(o), lse, Lq, Lk, hd, scale);
      });
    });
  });
}

// The tensor-core forward (attention_tc.cuh), as attention.cu launches it: float16 or bfloat16,
// hd 64 or 128 exactly.
int emu_attention_fwd_tc(int dtype, const void* q, const void* k, const void* v, void* o, float* lse, int BH,
                         int Lq, int Lk, int hd, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    auto run = [&]<typename T, int HD>() {
      emu::launch(attention_fwd_tc_kernel<T, HD>, dim3(ceil_div(Lq, kTcBR), BH), dim3(kTcThreads),
                  static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(o),
                  lse, Lq, Lk, scale);
    };
    dispatch_tc(dtype, hd, run);
  });
}

// 1: the emulated mma reads B fragments in a wrong (transposed) layout; 0: the PTX ISA's.
void emu_set_mma_b_layout_fault(int fault) { emu::mma_b_layout_fault() = fault; }

// 1: the emulated ldmatrix ignores .trans (a forgotten .trans); 0: the PTX ISA's.
void emu_set_ldmatrix_trans_fault(int fault) { emu::ldmatrix_trans_fault() = fault; }

// The tensor-core backward (attention_tc_bwd.cuh), as attention.cu launches it: delta by the
// preprocess kernel of attention.cuh, the tensor-core kernel, then grad_q cast from dq_accum
// (zero-filled float32). float16 or bfloat16, hd 64 or 128 exactly.
int emu_attention_bwd_tc(int dtype, const void* grad_o, const void* q, const void* k, const void* v, const void* o,
                         const float* lse, float* delta, float* dq_accum, void* dq, void* dk, void* dv, int BH,
                         int Lq, int Lk, int hd, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    auto run = [&]<typename T, int HD>() {
      constexpr int W = kAttnRowWarps;
      const int rows = BH * Lq;
      emu::launch(attention_bwd_preprocess_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize),
                  static_cast<const T*>(grad_o), static_cast<const T*>(o), delta, rows, hd);
      emu::launch(attention_bwd_tc_kernel<T, HD>, dim3(ceil_div(Lk, TcBwdTile<HD>::BC), BH), dim3(kTcThreads),
                  static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                  static_cast<const T*>(grad_o), lse, static_cast<const float*>(delta), dq_accum,
                  static_cast<T*>(dk), static_cast<T*>(dv), Lq, Lk, scale);
      const long long n = static_cast<long long>(rows) * hd;
      constexpr int threads = 256;
      emu::launch(attention_cast_kernel<T>, dim3(static_cast<unsigned>((n + threads - 1) / threads)), dim3(threads),
                  static_cast<const float*>(dq_accum), static_cast<T*>(dq), n);
    };
    dispatch_tc(dtype, hd, run);
  });
}

// dq_accum must be zero-filled float32; for float32 it is grad_q itself (dq is then unused).
int emu_attention_bwd(int dtype, const void* grad_o, const void* q, const void* k, const void* v, const void* o,
                      const float* lse, float* delta, float* dq_accum, void* dq, void* dk, void* dv, int BH, int Lq,
                      int Lk, int hd, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    dispatch_dtype(dtype, [&]<typename T>(T) {
      constexpr int W = kAttnRowWarps;
      const int rows = BH * Lq;
      emu::launch(attention_bwd_preprocess_kernel<T, W>, dim3(ceil_div(rows, W)), dim3(W * kWarpSize),
                  static_cast<const T*>(grad_o), static_cast<const T*>(o), delta, rows, hd);
      dispatch_head_dim(hd, [&]<typename Bucket>(Bucket) {
        constexpr int BR = Bucket::BWD_BR, BC = Bucket::BWD_BC;
        emu::launch(attention_bwd_kernel<T, Bucket::HD, BR, BC, kAttnThreads>, dim3(ceil_div(Lk, BC), BH),
                    dim3(kAttnThreads), static_cast<const T*>(q), static_cast<const T*>(k),
                    static_cast<const T*>(v), static_cast<const T*>(grad_o), lse,
                    static_cast<const float*>(delta), dq_accum, static_cast<T*>(dk), static_cast<T*>(dv), Lq, Lk,
                    hd, scale);
      });
      if (!std::is_same<T, float>::value) {
        const long long n = static_cast<long long>(rows) * hd;
        constexpr int threads = 256;
        emu::launch(attention_cast_kernel<T>, dim3(static_cast<unsigned>((n + threads - 1) / threads)),
                    dim3(threads), static_cast<const float*>(dq_accum), static_cast<T*>(dq), n);
      }
    });
  });
}

// Harness checks: a correct warp reduction, and kernels whose synchronisation is wrong.
int emu_warp_sum(const float* in, float* out, int blocks, int threads, char* err, int errlen) {
  return guarded(err, errlen, [&] { emu::launch(warp_sum_kernel, dim3(blocks), dim3(threads), in, out); });
}

int emu_half_warp_sum(const float* in, float* out, int threads, char* err, int errlen) {
  return guarded(err, errlen, [&] { emu::launch(half_warp_sum_kernel, dim3(1), dim3(threads), in, out); });
}

int emu_bad_kernel(int which, float* out, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    switch (which) {
      case 0: emu::launch(divergent_barrier_kernel, dim3(1), dim3(64), out); break;
      case 1: emu::launch(mismatched_barrier_kernel, dim3(1), dim3(64), out); break;
      case 2: emu::launch(shuffle_outside_mask_kernel, dim3(1), dim3(32), out); break;
      case 3: emu::launch(shuffle_excludes_caller_kernel, dim3(1), dim3(32), out); break;
      default: throw std::runtime_error(emu::cat("unknown bad kernel ", which));
    }
  });
}

void emu_set_timeout_ms(long ms) { emu::set_timeout_ms(ms); }

// Round trips of the 16-bit conversions, to compare with torch's.
void emu_float_to_half(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).bits;
}
void emu_float_to_bfloat16(const float* in, uint16_t* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).bits;
}
void emu_half_to_float(const uint16_t* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}

}  // extern "C"
