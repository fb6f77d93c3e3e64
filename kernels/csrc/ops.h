// C++ entry points of the dit4dit ops, one per op and backend; ops.cpp registers them.
//
// Each op's signature is written once, as a function type that follows its schema in
// ops.cpp; `AttentionFwd attention_fwd;` declares a function of that type. The CPU kernels
// (adaln_cpu.cpp, qknorm_cpu.cpp, attention_cpu.cpp) define dit4dit::cpu, the CUDA launchers (cuda/*.cu,
// built when DIT4DIT_WITH_CUDA is defined) define dit4dit::cuda.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace dit4dit {

// (x, shift, scale, eps) -> (y, mean, rstd)
using AdalnModulateFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& x, const at::Tensor& shift,
                                                                        const at::Tensor& scale, double eps);
// (grad_y, x, scale, mean, rstd, groups) -> (grad_x, grad_shift, grad_scale)
using AdalnModulateBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& scale, const at::Tensor& mean,
                                                                        const at::Tensor& rstd, int64_t groups);
// (x, y, gate, shift, scale, eps) -> (x_new, h, mean, rstd)
using ResidualModulateFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, double eps);
// (grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd) -> (grad_x, grad_y, grad_gate, grad_shift, grad_scale)
using ResidualModulateBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_x_new, const at::Tensor& grad_h, const at::Tensor& x_new, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd);
// (x, weight, cos, sin, eps, interleaved) -> (y, rstd)
using QkNormRopeFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x, const at::Tensor& weight,
                                                         const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                         bool interleaved);
// (grad_y, x, weight, cos, sin, rstd, interleaved) -> (grad_x, grad_weight)
using QkNormRopeBwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& cos,
                                                         const at::Tensor& sin, const at::Tensor& rstd,
                                                         bool interleaved);
// (q, k, v) -> (o, lse)
using AttentionFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
// (grad_o, q, k, v, o, lse) -> (grad_q, grad_k, grad_v)
using AttentionBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& grad_o, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& o, const at::Tensor& lse);

namespace cpu {
AdalnModulateFwd adaln_modulate_fwd;
AdalnModulateBwd adaln_modulate_bwd;
ResidualModulateFwd residual_modulate_fwd;
ResidualModulateBwd residual_modulate_bwd;
QkNormRopeFwd qk_norm_rope_fwd;
QkNormRopeBwd qk_norm_rope_bwd;
AttentionFwd attention_fwd;
AttentionBwd attention_bwd;
}  // namespace cpu

namespace cuda {
AdalnModulateFwd adaln_modulate_fwd;
AdalnModulateBwd adaln_modulate_bwd;
ResidualModulateFwd residual_modulate_fwd;
ResidualModulateBwd residual_modulate_bwd;
QkNormRopeFwd qk_norm_rope_fwd;
QkNormRopeBwd qk_norm_rope_bwd;
AttentionFwd attention_fwd;
AttentionBwd attention_bwd;
}  // namespace cuda

}  // namespace dit4dit
