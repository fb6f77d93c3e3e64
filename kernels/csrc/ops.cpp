// Operator schemas of the `dit4dit` namespace, defined once for every backend, and
// the kernel each backend registers for them.
//
// The CPU kernels live in adaln_cpu.cpp (adaLN and residual_modulate), qknorm_cpu.cpp and attention_cpu.cpp,
// the CUDA launchers in cuda/*.cu (built, and registered here, when DIT4DIT_WITH_CUDA is defined); ops.h
// declares both. Fake (meta) kernels and autograd are registered from Python in
// kernels/__init__.py.
//
//   adaln_modulate_fwd(x (B,N,D), shift (B,G,D), scale (B,G,D), eps)
//       -> y (B,N,D), mean (B,N), rstd (B,N)
//     y = (x - mean) * rstd * (1 + scale[g]) + shift[g], token n belongs to group
//     g = n / (N / G) (tokens grouped contiguously, N % G == 0). mean/rstd are
//     float32 (float64 when x is float64).
//   adaln_modulate_bwd(grad_y, x, scale, mean, rstd, groups)
//       -> grad_x (B,N,D), grad_shift (B,G,D), grad_scale (B,G,D)
//   residual_modulate_fwd(x (B,N,D), y (B,N,D), gate (B,G,D), shift (B,G,D), scale (B,G,D), eps)
//       -> x_new (B,N,D), h (B,N,D), mean (B,N), rstd (B,N)
//     the gated residual of a sublayer folded into the next sublayer's adaLN:
//     x_new = x + gate[g] * y, h = adaln_modulate(x_new, shift, scale, eps); mean and rstd
//     are x_new's statistics, as adaln_modulate_fwd returns them.
//   residual_modulate_bwd(grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd)
//       -> grad_x (B,N,D), grad_y (B,N,D), grad_gate, grad_shift, grad_scale (B,G,D)
//   qk_norm_rope_fwd(x (B,nh,N,hd), weight (hd), cos (N,hd/2), sin (N,hd/2), eps, interleaved)
//       -> y (B,nh,N,hd), rstd (B,nh,N)
//     the per-head RMSNorm of q or k with its gain, then the rotary embedding: y = RoPE(x * rstd * weight),
//     pairs (2i, 2i+1) when interleaved, else (i, i + hd/2). weight, cos, sin and rstd are float32
//     (float64 when x is float64).
//   qk_norm_rope_bwd(grad_y, x, weight, cos, sin, rstd, interleaved) -> grad_x (B,nh,N,hd), grad_weight (hd)
//   attention_fwd(q (B,nh,Lq,hd), k (B,nh,Lk,hd), v (B,nh,Lk,hd))
//       -> o (B,nh,Lq,hd), lse (B,nh,Lq)
//     o = softmax(q k^T / sqrt(hd)) v, no mask; lse is the natural-log
//     logsumexp of the scaled scores, float32 (float64 when q is float64).
//   attention_bwd(grad_o, q, k, v, o, lse) -> grad_q, grad_k, grad_v
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(dit4dit, m) {
  m.def("adaln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("adaln_modulate_bwd(Tensor grad_y, Tensor x, Tensor scale, Tensor mean, Tensor rstd, int groups) -> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)");
  m.def("residual_modulate_fwd(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps) -> (Tensor x_new, Tensor h, Tensor mean, Tensor rstd)");
  m.def("residual_modulate_bwd(Tensor grad_x_new, Tensor grad_h, Tensor x_new, Tensor y, Tensor gate, Tensor scale, Tensor mean, Tensor rstd) -> (Tensor grad_x, Tensor grad_y, Tensor grad_gate, Tensor grad_shift, Tensor grad_scale)");
  m.def("qk_norm_rope_fwd(Tensor x, Tensor weight, Tensor cos, Tensor sin, float eps, bool interleaved) -> (Tensor y, Tensor rstd)");
  m.def("qk_norm_rope_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor cos, Tensor sin, Tensor rstd, bool interleaved) -> (Tensor grad_x, Tensor grad_weight)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor o, Tensor lse)");
  m.def("attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(dit4dit, CPU, m) {
  m.impl("adaln_modulate_fwd", &dit4dit::cpu::adaln_modulate_fwd);
  m.impl("adaln_modulate_bwd", &dit4dit::cpu::adaln_modulate_bwd);
  m.impl("residual_modulate_fwd", &dit4dit::cpu::residual_modulate_fwd);
  m.impl("residual_modulate_bwd", &dit4dit::cpu::residual_modulate_bwd);
  m.impl("qk_norm_rope_fwd", &dit4dit::cpu::qk_norm_rope_fwd);
  m.impl("qk_norm_rope_bwd", &dit4dit::cpu::qk_norm_rope_bwd);
  m.impl("attention_fwd", &dit4dit::cpu::attention_fwd);
  m.impl("attention_bwd", &dit4dit::cpu::attention_bwd);
}

#ifdef DIT4DIT_WITH_CUDA
TORCH_LIBRARY_IMPL(dit4dit, CUDA, m) {
  m.impl("adaln_modulate_fwd", &dit4dit::cuda::adaln_modulate_fwd);
  m.impl("adaln_modulate_bwd", &dit4dit::cuda::adaln_modulate_bwd);
  m.impl("residual_modulate_fwd", &dit4dit::cuda::residual_modulate_fwd);
  m.impl("residual_modulate_bwd", &dit4dit::cuda::residual_modulate_bwd);
  m.impl("qk_norm_rope_fwd", &dit4dit::cuda::qk_norm_rope_fwd);
  m.impl("qk_norm_rope_bwd", &dit4dit::cuda::qk_norm_rope_bwd);
  m.impl("attention_fwd", &dit4dit::cuda::attention_fwd);
  m.impl("attention_bwd", &dit4dit::cuda::attention_bwd);
}
#endif

// `import kernels._C` loads this shared object, which runs the registrations
// above; the module itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
