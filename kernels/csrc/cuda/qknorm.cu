// CUDA launchers of dit4dit::qk_norm_rope_fwd / qk_norm_rope_bwd (device code in qknorm.cuh).
//
//   qk_norm_rope_fwd(x (B,nh,N,hd), weight (hd), cos (N,hd/2), sin (N,hd/2), eps, interleaved)
//       -> y (B,nh,N,hd), rstd (B,nh,N)
//   qk_norm_rope_bwd(grad_y, x, weight, cos, sin, rstd, interleaved) -> grad_x (B,nh,N,hd), grad_weight (hd)
// Inputs: CUDA tensors; x and grad_y float32, float16 or bfloat16 with hd even; weight, cos, sin
// and rstd float32. Non-contiguous inputs are copied to contiguous ones first. Kernels run on
// the current CUDA stream of the inputs' device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <tuple>

#include "../ops.h"
#include "dispatch.h"
#include "qknorm.cuh"

namespace dit4dit::cuda {

using namespace dit4dit_cuda;
using namespace dit4dit_cuda_launch;

namespace {

// Checks shared by both launchers: x (B, nh, N, hd), hd even, weight (hd), cos and sin (N, hd/2).
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                  const at::Tensor& sin) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_input(x, op, "x", x.device(), x.scalar_type(), 4);
  check_input(weight, op, "weight", x.device(), at::kFloat, 1);
  check_input(cos, op, "cos", x.device(), at::kFloat, 2);
  check_input(sin, op, "sin", x.device(), at::kFloat, 2);
  const int64_t N = x.size(2), hd = x.size(3);
  TORCH_CHECK(hd >= 2 && hd % 2 == 0, op, ": the head dim hd of x ", x.sizes(),
              " must be even and >= 2 (RoPE rotates channel pairs)");
  TORCH_CHECK(weight.size(0) == hd, op, ": weight must have shape (hd) = (", hd, "), got ", weight.sizes());
  TORCH_CHECK(cos.size(0) == N && cos.size(1) == hd / 2 && sin.sizes() == cos.sizes(), op,
              ": cos and sin must have shape (N, hd/2) = (", N, ", ", hd / 2, "), got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(x.numel() / hd < (int64_t{1} << 31) && hd < (int64_t{1} << 26), op, ": x of shape ", x.sizes(),
              " exceeds the CUDA kernel's index range");
}

}  // namespace

// Entry points (declared in ../ops.h, registered in ../ops.cpp).
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_fwd(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                    const at::Tensor& cos_in, const at::Tensor& sin_in, double eps,
                                                    bool interleaved) {
  const char* op = "qk_norm_rope_fwd";
  check_inputs(op, x_in, weight_in, cos_in, sin_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kFloat));
  const int rows = static_cast<int>(rstd.numel());
  if (rows == 0) return {y, rstd};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  dispatch_element_type(x.scalar_type(), op, [&]<typename T>(T) {
    constexpr int W = kQkWarpsPerBlock;
    qk_norm_rope_fwd_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(x), ptr<float>(weight), ptr<float>(cos), ptr<float>(sin), ptr<T>(y), ptr<float>(rstd), rows,
        static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), static_cast<float>(eps), interleaved);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_bwd(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                                    const at::Tensor& weight_in, const at::Tensor& cos_in,
                                                    const at::Tensor& sin_in, const at::Tensor& rstd_in,
                                                    bool interleaved) {
  const char* op = "qk_norm_rope_bwd";
  check_inputs(op, x_in, weight_in, cos_in, sin_in);
  check_input(grad_y_in, op, "grad_y", x_in.device(), x_in.scalar_type(), 4);
  check_input(rstd_in, op, "rstd", x_in.device(), at::kFloat, 3);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), op, ": grad_y has shape ", grad_y_in.sizes(), " but x has shape ",
              x_in.sizes());
  TORCH_CHECK(rstd_in.size(0) == x_in.size(0) && rstd_in.size(1) == x_in.size(1) && rstd_in.size(2) == x_in.size(2),
              op, ": rstd must have shape (B, nh, N) of x ", x_in.sizes(), ", got ", rstd_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous(), rstd = rstd_in.contiguous();
  const int rows = static_cast<int>(rstd.numel());
  const int N = static_cast<int>(x.size(2)), hd = static_cast<int>(x.size(3));
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty({hd}, x.options().dtype(at::kFloat));
  if (rows == 0) return {grad_x, grad_weight.zero_()};
  const int P = std::min(kQkWeightBlocks, ceil_div(rows, kQkWeightRows));
  at::Tensor partial = at::empty({P, hd}, x.options().dtype(at::kFloat));

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  dispatch_element_type(x.scalar_type(), op, [&]<typename T>(T) {
    constexpr int W = kQkWarpsPerBlock;
    qk_norm_rope_bwd_dx_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(grad_y), ptr<T>(x), ptr<float>(weight), ptr<float>(cos), ptr<float>(sin), ptr<float>(rstd),
        ptr<T>(grad_x), rows, N, hd, interleaved);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    qk_norm_rope_bwd_w_kernel<T, kQkWeightCols, kQkWeightRows>
        <<<dim3(ceil_div(hd, kQkWeightCols), P), dim3(kQkWeightCols, kQkWeightRows), 0, stream>>>(
            ptr<T>(grad_y), ptr<T>(x), ptr<float>(cos), ptr<float>(sin), ptr<float>(rstd), ptr<float>(partial), rows,
            N, hd, interleaved);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  qk_norm_rope_sum_kernel<<<ceil_div(hd, 128), 128, 0, stream>>>(ptr<float>(partial), ptr<float>(grad_weight), P,
                                                                  hd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_weight};
}

}  // namespace dit4dit::cuda
