// Device helpers shared by the CUDA kernels of dit4dit: element-type conversion,
// warp reductions and small integer helpers.
//
// The device headers in this folder take raw pointers and include no ATen, so the
// same source compiles with nvcc (kernels/csrc/cuda/*.cu) and, as host C++, with the
// CPU emulation harness of the tests (tests/emu/cuda_emu.h, which must be included
// first and provides __half, __nv_bfloat16, the shuffles and the barriers).
// Element types: float, __half, __nv_bfloat16; all arithmetic is float32.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// The namespace is a macro so that the emulation tests can compile a deliberately
// broken variant of a kernel next to the real one without symbol clashes.
#ifndef DIT4DIT_KERNEL_NS
#define DIT4DIT_KERNEL_NS dit4dit_cuda
#endif

namespace DIT4DIT_KERNEL_NS {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Element type <-> float32. Loads widen to float, stores round to nearest even.
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return Convert<T>::load(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return Convert<T>::store(v);
}

// Butterfly all-reduce over the 32 lanes of a warp: every lane ends with the sum.
__device__ __forceinline__ float warp_allreduce_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace DIT4DIT_KERNEL_NS
