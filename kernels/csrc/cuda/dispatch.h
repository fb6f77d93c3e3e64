// Host-side helpers of the CUDA launchers (ATen side; the device headers *.cuh stay
// ATen-free): input checks and the dispatch from an ATen dtype to a device element type.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

namespace dit4dit_cuda_launch {

// Calls f(T{}) with T = float, __half or __nv_bfloat16 matching `dtype`.
template <typename F>
void dispatch_element_type(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default:
      TORCH_CHECK(false, op, ": the CUDA kernel supports float32, float16 and bfloat16 inputs, got ", dtype);
  }
}

// `t` lives on the CUDA device `device`, has `dtype` and `dim` dimensions.
inline void check_input(const at::Tensor& t, const char* op, const char* name, const at::Device& device,
                        at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other inputs are on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace dit4dit_cuda_launch
