// CUDA launchers of dit4dit::adaln_modulate_fwd / adaln_modulate_bwd (device code in adaln.cuh).
//
//   adaln_modulate_fwd(x (B,N,D), shift (B,G,D), scale (B,G,D), eps) -> y (B,N,D), mean (B,N), rstd (B,N)
//   adaln_modulate_bwd(grad_y, x, scale, mean, rstd, groups) -> grad_x, grad_shift, grad_scale
// Inputs: CUDA tensors of one dtype (float32, float16 or bfloat16), N % G == 0; mean and rstd
// float32. Non-contiguous inputs are copied to contiguous ones first. Kernels run on the
// current CUDA stream of the inputs' device.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "../ops.h"
#include "adaln.cuh"
#include "dispatch.h"

namespace dit4dit::cuda {

using namespace dit4dit_cuda;
using namespace dit4dit_cuda_launch;

// Entry points (declared in ../ops.h, registered in ../ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fwd(const at::Tensor& x_in,
                                                                  const at::Tensor& shift_in,
                                                                  const at::Tensor& scale_in, double eps) {
  const char* op = "adaln_modulate_fwd";
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got device ", x_in.device());
  const at::Device device = x_in.device();
  check_input(x_in, op, "x", device, x_in.scalar_type(), 3);
  check_input(shift_in, op, "shift", device, x_in.scalar_type(), 3);
  check_input(scale_in, op, "scale", device, x_in.scalar_type(), 3);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), G = shift_in.size(1);
  TORCH_CHECK(G >= 1 && shift_in.size(0) == B && shift_in.size(2) == D, op, ": shift must have shape (B, G, D) = (",
              B, ", G, ", D, ") for x of shape ", x_in.sizes(), ", got ", shift_in.sizes());
  TORCH_CHECK(scale_in.sizes() == shift_in.sizes(), op, ": scale has shape ", scale_in.sizes(),
              " but shift has shape ", shift_in.sizes());
  TORCH_CHECK(N % G == 0, op, ": the number of tokens N=", N, " must be divisible by the number of groups G=", G);
  TORCH_CHECK(B * N < (int64_t{1} << 31) && D < (int64_t{1} << 26), op, ": x of shape ", x_in.sizes(),
              " exceeds the CUDA kernel's index range");
  TORCH_CHECK(B * G <= 65535, op, ": B*G=", B * G, " exceeds the CUDA grid limit 65535");

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor x = x_in.contiguous(), shift = shift_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({B, N}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({B, N}, x.options().dtype(at::kFloat));
  const int rows = static_cast<int>(B * N);
  if (rows == 0 || D == 0) return {y, mean.fill_(0), rstd.fill_(0)};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  dispatch_element_type(x.scalar_type(), op, [&]<typename T>(T) {
    constexpr int W = kAdalnWarpsPerBlock;
    adaln_fwd_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(x), ptr<T>(shift), ptr<T>(scale), ptr<T>(y), ptr<float>(mean), ptr<float>(rstd), rows,
        static_cast<int>(N), static_cast<int>(D), static_cast<int>(G), static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd(const at::Tensor& grad_y_in,
                                                                  const at::Tensor& x_in,
                                                                  const at::Tensor& scale_in,
                                                                  const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in, int64_t groups) {
  const char* op = "adaln_modulate_bwd";
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got device ", x_in.device());
  const at::Device device = x_in.device();
  check_input(x_in, op, "x", device, x_in.scalar_type(), 3);
  check_input(grad_y_in, op, "grad_y", device, x_in.scalar_type(), 3);
  check_input(scale_in, op, "scale", device, x_in.scalar_type(), 3);
  check_input(mean_in, op, "mean", device, at::kFloat, 2);
  check_input(rstd_in, op, "rstd", device, at::kFloat, 2);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), G = groups;
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes(), op, ": grad_y has shape ", grad_y_in.sizes(), " but x has shape ",
              x_in.sizes());
  TORCH_CHECK(G >= 1 && N % G == 0, op, ": groups=", G, " must be >= 1 and divide the number of tokens N=", N);
  TORCH_CHECK(scale_in.size(0) == B && scale_in.size(1) == G && scale_in.size(2) == D, op,
              ": scale must have shape (B, groups, D) = (", B, ", ", G, ", ", D, "), got ", scale_in.sizes());
  TORCH_CHECK(mean_in.size(0) == B && mean_in.size(1) == N && rstd_in.sizes() == mean_in.sizes(), op,
              ": mean and rstd must have shape (B, N) = (", B, ", ", N, "), got ", mean_in.sizes(), " and ",
              rstd_in.sizes());
  TORCH_CHECK(B * N < (int64_t{1} << 31) && D < (int64_t{1} << 26), op, ": x of shape ", x_in.sizes(),
              " exceeds the CUDA kernel's index range");
  TORCH_CHECK(B * G <= 65535, op, ": B*groups=", B * G, " exceeds the CUDA grid limit 65535");

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_shift = at::empty({B, G, D}, x.options());
  at::Tensor grad_scale = at::empty({B, G, D}, x.options());
  const int rows = static_cast<int>(B * N);
  if (rows == 0 || D == 0) return {grad_x, grad_shift.zero_(), grad_scale.zero_()};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index());
  dispatch_element_type(x.scalar_type(), op, [&]<typename T>(T) {
    constexpr int W = kAdalnWarpsPerBlock;
    adaln_bwd_dx_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(grad_y), ptr<T>(x), ptr<T>(scale), ptr<float>(mean), ptr<float>(rstd), ptr<T>(grad_x), rows,
        static_cast<int>(N), static_cast<int>(D), static_cast<int>(G));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(ceil_div(static_cast<int>(D), kAdalnParamCols), static_cast<unsigned>(B * G));
    const dim3 block(kAdalnParamCols, kAdalnParamRows);
    adaln_bwd_param_kernel<T, kAdalnParamCols, kAdalnParamRows><<<grid, block, 0, stream>>>(
        ptr<T>(grad_y), ptr<T>(x), ptr<float>(mean), ptr<float>(rstd), ptr<T>(grad_shift), ptr<T>(grad_scale),
        static_cast<int>(N), static_cast<int>(D), static_cast<int>(G));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_shift, grad_scale};
}

}  // namespace dit4dit::cuda
