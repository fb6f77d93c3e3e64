// CUDA launchers of dit4dit::adaln_modulate_fwd / adaln_modulate_bwd and
// dit4dit::residual_modulate_fwd / residual_modulate_bwd (device code in adaln.cuh).
//
//   adaln_modulate_fwd(x (B,N,D), shift (B,G,D), scale (B,G,D), eps) -> y (B,N,D), mean (B,N), rstd (B,N)
//   adaln_modulate_bwd(grad_y, x, scale, mean, rstd, groups) -> grad_x, grad_shift, grad_scale
//   residual_modulate_fwd(x, y (B,N,D), gate, shift, scale (B,G,D), eps) -> x_new, h (B,N,D), mean, rstd
//   residual_modulate_bwd(grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd)
//       -> grad_x, grad_y (B,N,D), grad_gate, grad_shift, grad_scale (B,G,D)
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

namespace {

// Checks of the adaLN operands shared by both forward launchers.
void check_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_input(x, op, "x", x.device(), x.scalar_type(), 3);
  check_input(shift, op, "shift", x.device(), x.scalar_type(), 3);
  check_input(scale, op, "scale", x.device(), x.scalar_type(), 3);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), G = shift.size(1);
  TORCH_CHECK(G >= 1 && shift.size(0) == B && shift.size(2) == D, op, ": shift must have shape (B, G, D) = (",
              B, ", G, ", D, ") for x of shape ", x.sizes(), ", got ", shift.sizes());
  TORCH_CHECK(scale.sizes() == shift.sizes(), op, ": scale has shape ", scale.sizes(), " but shift has shape ",
              shift.sizes());
  TORCH_CHECK(N % G == 0, op, ": the number of tokens N=", N, " must be divisible by the number of groups G=", G);
  TORCH_CHECK(B * N < (int64_t{1} << 31) && D < (int64_t{1} << 26), op, ": x of shape ", x.sizes(),
              " exceeds the CUDA kernel's index range");
  TORCH_CHECK(B * G <= 65535, op, ": B*G=", B * G, " exceeds the CUDA grid limit 65535");
}

// Checks of the adaLN operands shared by both backward launchers; grad_name names the gradient
// of the modulated output (grad_y of adaln_modulate, grad_h of residual_modulate).
void check_bwd_inputs(const char* op, const char* grad_name, const at::Tensor& grad, const at::Tensor& x,
                      const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd, int64_t G) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  check_input(x, op, "x", x.device(), x.scalar_type(), 3);
  check_input(grad, op, grad_name, x.device(), x.scalar_type(), 3);
  check_input(scale, op, "scale", x.device(), x.scalar_type(), 3);
  check_input(mean, op, "mean", x.device(), at::kFloat, 2);
  check_input(rstd, op, "rstd", x.device(), at::kFloat, 2);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": ", grad_name, " has shape ", grad.sizes(), " but x has shape ",
              x.sizes());
  TORCH_CHECK(G >= 1 && N % G == 0, op, ": groups=", G, " must be >= 1 and divide the number of tokens N=", N);
  TORCH_CHECK(scale.size(0) == B && scale.size(1) == G && scale.size(2) == D, op,
              ": scale must have shape (B, groups, D) = (", B, ", ", G, ", ", D, "), got ", scale.sizes());
  TORCH_CHECK(mean.size(0) == B && mean.size(1) == N && rstd.sizes() == mean.sizes(), op,
              ": mean and rstd must have shape (B, N) = (", B, ", ", N, "), got ", mean.sizes(), " and ",
              rstd.sizes());
  TORCH_CHECK(B * N < (int64_t{1} << 31) && D < (int64_t{1} << 26), op, ": x of shape ", x.sizes(),
              " exceeds the CUDA kernel's index range");
  TORCH_CHECK(B * G <= 65535, op, ": B*groups=", B * G, " exceeds the CUDA grid limit 65535");
}

// The parameter-gradient kernel (GATE: residual_modulate's, with grad_gate).
template <typename T, bool GATE>
void launch_param_kernel(cudaStream_t stream, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& rstd, const at::Tensor& grad_shift, const at::Tensor& grad_scale,
                         const T* res_y, const T* res_grad_x, T* grad_gate, int64_t G) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const dim3 grid(ceil_div(static_cast<int>(D), kAdalnParamCols), static_cast<unsigned>(B * G));
  const dim3 block(kAdalnParamCols, kAdalnParamRows);
  adaln_bwd_param_kernel<T, kAdalnParamCols, kAdalnParamRows, GATE><<<grid, block, 0, stream>>>(
      ptr<T>(grad_out), ptr<T>(x), ptr<float>(mean), ptr<float>(rstd), ptr<T>(grad_shift), ptr<T>(grad_scale), res_y,
      res_grad_x, grad_gate, static_cast<int>(N), static_cast<int>(D), static_cast<int>(G));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Entry points (declared in ../ops.h, registered in ../ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fwd(const at::Tensor& x_in,
                                                                  const at::Tensor& shift_in,
                                                                  const at::Tensor& scale_in, double eps) {
  const char* op = "adaln_modulate_fwd";
  check_fwd_inputs(op, x_in, shift_in, scale_in);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), G = shift_in.size(1);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), shift = shift_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({B, N}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({B, N}, x.options().dtype(at::kFloat));
  const int rows = static_cast<int>(B * N);
  if (rows == 0 || D == 0) return {y, mean.fill_(0), rstd.fill_(0)};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
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
  check_bwd_inputs(op, "grad_y", grad_y_in, x_in, scale_in, mean_in, rstd_in, groups);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), G = groups;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_shift = at::empty({B, G, D}, x.options());
  at::Tensor grad_scale = at::empty({B, G, D}, x.options());
  const int rows = static_cast<int>(B * N);
  if (rows == 0 || D == 0) return {grad_x, grad_shift.zero_(), grad_scale.zero_()};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  dispatch_element_type(x.scalar_type(), op, [&]<typename T>(T) {
    constexpr int W = kAdalnWarpsPerBlock;
    adaln_bwd_dx_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(grad_y), ptr<T>(x), ptr<T>(scale), ptr<float>(mean), ptr<float>(rstd), ptr<T>(grad_x), rows,
        static_cast<int>(N), static_cast<int>(D), static_cast<int>(G));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_param_kernel<T, false>(stream, grad_y, x, mean, rstd, grad_shift, grad_scale, nullptr, nullptr, nullptr,
                                  G);
  });
  return {grad_x, grad_shift, grad_scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_fwd(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& gate_in, const at::Tensor& shift_in,
    const at::Tensor& scale_in, double eps) {
  const char* op = "residual_modulate_fwd";
  check_fwd_inputs(op, x_in, shift_in, scale_in);
  check_input(y_in, op, "y", x_in.device(), x_in.scalar_type(), 3);
  check_input(gate_in, op, "gate", x_in.device(), x_in.scalar_type(), 3);
  TORCH_CHECK(y_in.sizes() == x_in.sizes(), op, ": y has shape ", y_in.sizes(), " but x has shape ", x_in.sizes());
  TORCH_CHECK(gate_in.sizes() == shift_in.sizes(), op, ": gate has shape ", gate_in.sizes(),
              " but shift has shape ", shift_in.sizes());
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), G = shift_in.size(1);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), gate = gate_in.contiguous();
  const at::Tensor shift = shift_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor x_new = at::empty_like(x);
  at::Tensor h = at::empty_like(x);
  at::Tensor mean = at::empty({B, N}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({B, N}, x.options().dtype(at::kFloat));
  const int rows = static_cast<int>(B * N);
  if (rows == 0 || D == 0) return {x_new, h, mean.fill_(0), rstd.fill_(0)};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.device().index());
  dispatch_element_type(x.scalar_type(), op, [&]<typename T>(T) {
    constexpr int W = kAdalnWarpsPerBlock;
    residual_fwd_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(x), ptr<T>(y), ptr<T>(gate), ptr<T>(shift), ptr<T>(scale), ptr<T>(x_new), ptr<T>(h),
        ptr<float>(mean), ptr<float>(rstd), rows, static_cast<int>(N), static_cast<int>(D), static_cast<int>(G),
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_new, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_bwd(
    const at::Tensor& grad_x_new_in, const at::Tensor& grad_h_in, const at::Tensor& x_new_in, const at::Tensor& y_in,
    const at::Tensor& gate_in, const at::Tensor& scale_in, const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  const char* op = "residual_modulate_bwd";
  TORCH_CHECK(scale_in.dim() == 3, op, ": scale must have shape (B, G, D), got ", scale_in.sizes());
  const int64_t G = scale_in.size(1);
  check_bwd_inputs(op, "grad_h", grad_h_in, x_new_in, scale_in, mean_in, rstd_in, G);
  check_input(grad_x_new_in, op, "grad_x_new", x_new_in.device(), x_new_in.scalar_type(), 3);
  check_input(y_in, op, "y", x_new_in.device(), x_new_in.scalar_type(), 3);
  check_input(gate_in, op, "gate", x_new_in.device(), x_new_in.scalar_type(), 3);
  TORCH_CHECK(grad_x_new_in.sizes() == x_new_in.sizes() && y_in.sizes() == x_new_in.sizes(), op,
              ": grad_x_new and y must have the shape of x_new ", x_new_in.sizes(), ", got ", grad_x_new_in.sizes(),
              " and ", y_in.sizes());
  TORCH_CHECK(gate_in.sizes() == scale_in.sizes(), op, ": gate has shape ", gate_in.sizes(),
              " but scale has shape ", scale_in.sizes());
  const int64_t B = x_new_in.size(0), N = x_new_in.size(1), D = x_new_in.size(2);
  const c10::cuda::CUDAGuard guard(x_new_in.device());
  const at::Tensor grad_x_new = grad_x_new_in.contiguous(), grad_h = grad_h_in.contiguous();
  const at::Tensor x_new = x_new_in.contiguous(), y = y_in.contiguous(), gate = gate_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor grad_x = at::empty_like(x_new);
  at::Tensor grad_y = at::empty_like(x_new);
  at::Tensor grad_gate = at::empty({B, G, D}, x_new.options());
  at::Tensor grad_shift = at::empty({B, G, D}, x_new.options());
  at::Tensor grad_scale = at::empty({B, G, D}, x_new.options());
  const int rows = static_cast<int>(B * N);
  if (rows == 0 || D == 0) return {grad_x, grad_y, grad_gate.zero_(), grad_shift.zero_(), grad_scale.zero_()};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(x_new.device().index());
  dispatch_element_type(x_new.scalar_type(), op, [&]<typename T>(T) {
    constexpr int W = kAdalnWarpsPerBlock;
    residual_bwd_dx_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(grad_x_new), ptr<T>(grad_h), ptr<T>(x_new), ptr<T>(gate), ptr<T>(scale), ptr<float>(mean),
        ptr<float>(rstd), ptr<T>(grad_x), ptr<T>(grad_y), rows, static_cast<int>(N), static_cast<int>(D),
        static_cast<int>(G));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_param_kernel<T, true>(stream, grad_h, x_new, mean, rstd, grad_shift, grad_scale, ptr<T>(y), ptr<T>(grad_x),
                                 ptr<T>(grad_gate), G);
  });
  return {grad_x, grad_y, grad_gate, grad_shift, grad_scale};
}

}  // namespace dit4dit::cuda
