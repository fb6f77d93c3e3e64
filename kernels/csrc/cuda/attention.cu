// CUDA launchers of dit4dit::attention_fwd / attention_bwd (device code in attention.cuh,
// attention_tc.cuh and attention_tc_bwd.cuh).
//
//   attention_fwd(q (B,nh,Lq,hd), k (B,nh,Lk,hd), v (B,nh,Lk,hd)) -> o (B,nh,Lq,hd), lse (B,nh,Lq) float32
//   attention_bwd(grad_o, q, k, v, o, lse) -> grad_q, grad_k, grad_v
// Inputs: CUDA tensors of one dtype (float32, float16 or bfloat16), hd <= 128, Lk >= 1,
// B*nh <= 65535. Non-contiguous inputs are copied to contiguous ones first. Kernels run
// on the current CUDA stream of the inputs' device.
// Forward and backward run on tensor cores (attention_tc.cuh, attention_tc_bwd.cuh) for
// float16 / bfloat16 with hd 64 or 128 on devices of compute capability 8.0 or newer with
// 16-byte aligned tensors, unless DIT4DIT_CUDA_ATTENTION_TC=0; otherwise (float32, other head
// dims, older devices) on the SIMT kernels of attention.cuh. Both backward paths share the
// delta preprocessing, the float32 dQ accumulator (atomicAdd) and its cast to grad_q.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "../ops.h"
#include "attention.cuh"
#include "attention_tc.cuh"
#include "attention_tc_bwd.cuh"
#include "dispatch.h"

namespace dit4dit::cuda {

using namespace dit4dit_cuda;
using namespace dit4dit_cuda_launch;

namespace {

// Calls f(bucket) for the smallest head-dim bucket (AttnBucket) with HD >= hd.
template <typename F>
void dispatch_head_dim(int64_t hd, const char* op, F&& f) {
  TORCH_CHECK(hd >= 1 && hd <= kAttnMaxHeadDim, op, ": head dim hd=", hd,
              " is outside the CUDA kernel's range 1..", kAttnMaxHeadDim);
  with_head_dim_bucket(hd, std::forward<F>(f));
}

// q (B,nh,Lq,hd), k and v (B,nh,Lk,hd) on one CUDA device with one dtype.
void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  check_input(q, op, "q", q.device(), q.scalar_type(), 4);
  check_input(k, op, "k", q.device(), q.scalar_type(), 4);
  check_input(v, op, "v", q.device(), q.scalar_type(), 4);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must have shape (B, nh, Lk, hd) matching q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v has shape ", v.sizes(), " but k has shape ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1, op, ": k and v need at least one key (Lk >= 1), got shape ", k.sizes());
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, op, ": B*nh=", q.size(0) * q.size(1),
              " exceeds the CUDA grid limit 65535");
  TORCH_CHECK(q.size(2) < (int64_t{1} << 24) && k.size(2) < (int64_t{1} << 24), op,
              ": sequence lengths Lq=", q.size(2), ", Lk=", k.size(2), " exceed the CUDA kernel's range");
}

// Whether attention_fwd / attention_bwd run the tensor-core kernels for these (contiguous)
// tensors, q first: float16 or bfloat16, hd 64 or 128, compute capability >= 8.0 (checked at
// runtime), every tensor 16-byte aligned, and not disabled by DIT4DIT_CUDA_ATTENTION_TC=0.
bool use_tensor_cores(std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& q = **tensors.begin();
  const at::ScalarType dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (q.size(3) != 64 && q.size(3) != 128) return false;
  const char* env = std::getenv("DIT4DIT_CUDA_ATTENTION_TC");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (at::cuda::getDeviceProperties(q.device().index())->major < 8) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  return true;
}

template <typename T, int HD>
void launch_fwd_tc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& lse,
                   int64_t BH, int64_t Lq, int64_t Lk, float scale, cudaStream_t stream) {
  const dim3 grid(ceil_div(static_cast<int>(Lq), kTcBR), static_cast<unsigned>(BH));
  attention_fwd_tc_kernel<T, HD><<<grid, kTcThreads, 0, stream>>>(ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(o),
                                                                   ptr<float>(lse), static_cast<int>(Lq),
                                                                   static_cast<int>(Lk), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grid: one block per (K/V tile of TcBwdTile<HD>::BC keys, bh); static shared memory.
template <typename T, int HD>
void launch_bwd_tc(const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq_accum, at::Tensor& grad_k,
                   at::Tensor& grad_v, int64_t BH, int64_t Lq, int64_t Lk, float scale, cudaStream_t stream) {
  const dim3 grid(ceil_div(static_cast<int>(Lk), TcBwdTile<HD>::BC), static_cast<unsigned>(BH));
  attention_bwd_tc_kernel<T, HD><<<grid, kTcThreads, 0, stream>>>(
      ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(grad_o), ptr<float>(lse), ptr<float>(delta), ptr<float>(dq_accum),
      ptr<T>(grad_k), ptr<T>(grad_v), static_cast<int>(Lq), static_cast<int>(Lk), scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Entry points (declared in ../ops.h, registered in ../ops.cpp).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in) {
  const char* op = "attention_fwd";
  check_qkv(op, q_in, k_in, v_in);
  const int64_t B = q_in.size(0), nh = q_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2), hd = q_in.size(3);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor o = at::empty_like(q);
  at::Tensor lse = at::empty({B, nh, Lq}, q.options().dtype(at::kFloat));
  if (B * nh == 0 || Lq == 0) return {o, lse};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  if (use_tensor_cores({&q, &k, &v, &o})) {
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    if (bf16 && hd == 64) launch_fwd_tc<__nv_bfloat16, 64>(q, k, v, o, lse, B * nh, Lq, Lk, scale, stream);
    if (bf16 && hd == 128) launch_fwd_tc<__nv_bfloat16, 128>(q, k, v, o, lse, B * nh, Lq, Lk, scale, stream);
    if (!bf16 && hd == 64) launch_fwd_tc<__half, 64>(q, k, v, o, lse, B * nh, Lq, Lk, scale, stream);
    if (!bf16 && hd == 128) launch_fwd_tc<__half, 128>(q, k, v, o, lse, B * nh, Lq, Lk, scale, stream);
    return {o, lse};
  }
  dispatch_element_type(q.scalar_type(), op, [&]<typename T>(T) {
    dispatch_head_dim(hd, op, [&]<typename Bucket>(Bucket) {
      constexpr int BR = Bucket::FWD_BR, BC = Bucket::FWD_BC;
      const dim3 grid(ceil_div(static_cast<int>(Lq), BR), static_cast<unsigned>(B * nh));
      attention_fwd_kernel<T, Bucket::HD, BR, BC, kAttnThreads><<<grid, kAttnThreads, 0, stream>>>(
          ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(o), ptr<float>(lse), static_cast<int>(Lq),
          static_cast<int>(Lk), static_cast<int>(hd), scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_o_in,
                                                             const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in, const at::Tensor& o_in,
                                                             const at::Tensor& lse_in) {
  const char* op = "attention_bwd";
  check_qkv(op, q_in, k_in, v_in);
  check_input(grad_o_in, op, "grad_o", q_in.device(), q_in.scalar_type(), 4);
  check_input(o_in, op, "o", q_in.device(), q_in.scalar_type(), 4);
  check_input(lse_in, op, "lse", q_in.device(), at::kFloat, 3);
  TORCH_CHECK(grad_o_in.sizes() == q_in.sizes() && o_in.sizes() == q_in.sizes(), op,
              ": grad_o and o must have the shape of q ", q_in.sizes(), ", got ", grad_o_in.sizes(), " and ",
              o_in.sizes());
  const int64_t B = q_in.size(0), nh = q_in.size(1), Lq = q_in.size(2), Lk = k_in.size(2), hd = q_in.size(3);
  TORCH_CHECK(lse_in.size(0) == B && lse_in.size(1) == nh && lse_in.size(2) == Lq, op,
              ": lse must have shape (B, nh, Lq) = (", B, ", ", nh, ", ", Lq, "), got ", lse_in.sizes());

  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_o = grad_o_in.contiguous(), o = o_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  // float32 grad_q is its own accumulator; other dtypes accumulate in float32 and are cast at the end.
  const bool fp32 = q.scalar_type() == at::kFloat;
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor grad_q = fp32 ? dq_accum : at::empty_like(q);
  if (B * nh == 0 || Lq == 0) return {grad_q, grad_k.zero_(), grad_v.zero_()};
  at::Tensor delta = at::empty({B, nh, Lq}, q.options().dtype(at::kFloat));

  cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  const int rows = static_cast<int>(B * nh * Lq);
  const bool tensor_cores = use_tensor_cores({&q, &k, &v, &o, &grad_o});
  dispatch_element_type(q.scalar_type(), op, [&]<typename T>(T) {
    // 1. delta = rowsum(dO o O), one warp per row.
    constexpr int W = kAttnRowWarps;
    attention_bwd_preprocess_kernel<T, W><<<ceil_div(rows, W), W * kWarpSize, 0, stream>>>(
        ptr<T>(grad_o), ptr<T>(o), ptr<float>(delta), rows, static_cast<int>(hd));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // 2. dK, dV, and dQ into dq_accum: tensor cores when eligible (never for float32), else SIMT.
    bool done = false;
    if constexpr (!std::is_same_v<T, float>) {
      if (tensor_cores) {
        if (hd == 64) {
          launch_bwd_tc<T, 64>(grad_o, q, k, v, lse, delta, dq_accum, grad_k, grad_v, B * nh, Lq, Lk, scale, stream);
        } else {
          launch_bwd_tc<T, 128>(grad_o, q, k, v, lse, delta, dq_accum, grad_k, grad_v, B * nh, Lq, Lk, scale, stream);
        }
        done = true;
      }
    }
    if (!done) {
      dispatch_head_dim(hd, op, [&]<typename Bucket>(Bucket) {
        constexpr int BR = Bucket::BWD_BR, BC = Bucket::BWD_BC;
        const dim3 grid(ceil_div(static_cast<int>(Lk), BC), static_cast<unsigned>(B * nh));
        attention_bwd_kernel<T, Bucket::HD, BR, BC, kAttnThreads><<<grid, kAttnThreads, 0, stream>>>(
            ptr<T>(q), ptr<T>(k), ptr<T>(v), ptr<T>(grad_o), ptr<float>(lse), ptr<float>(delta),
            ptr<float>(dq_accum), ptr<T>(grad_k), ptr<T>(grad_v), static_cast<int>(Lq), static_cast<int>(Lk),
            static_cast<int>(hd), scale);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    // 3. grad_q = T(dq_accum).
    if (!fp32) {
      const long long n = dq_accum.numel();
      constexpr int threads = 256;
      attention_cast_kernel<T><<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(
          ptr<float>(dq_accum), ptr<T>(grad_q), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace dit4dit::cuda
