// A deliberately broken variant of the attention forward kernel, compiled from the same
// header as the real one (kernels/csrc/cuda/attention.cuh) with the barrier that publishes
// the staged K tile removed. tests/test_cuda_emulated.py shows that the emulation harness
// catches it (wrong outputs). Lives in its own namespace so it cannot clash with the real one.
#define DIT4DIT_KERNEL_NS dit4dit_cuda_broken
#define DIT4DIT_BREAK_FWD_KV_BARRIER 1
#include "cuda_emu.h"
// (the emulation header must come first)
#include "attention.cuh"

#include <cstdio>

using namespace dit4dit_cuda_broken;

extern "C" int emu_attention_fwd_broken(const float* q, const float* k, const float* v, float* o, float* lse, int BH,
                                        int Lq, int Lk, int hd, char* err, int errlen) {
  try {
    if (hd > 64) throw std::runtime_error("the broken variant is instantiated for hd <= 64 only");
    constexpr int HD = AttnBucket64::HD, BR = AttnBucket64::FWD_BR, BC = AttnBucket64::FWD_BC;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    emu::launch(attention_fwd_kernel<float, HD, BR, BC, kAttnThreads>, dim3(ceil_div(Lq, BR), BH),
                dim3(kAttnThreads), q, k, v, o, lse, Lq, Lk, hd, scale);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
    return 1;
  }
}
