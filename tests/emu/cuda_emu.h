// CUDA-on-CPU emulation harness: compiles plain CUDA C++ device code (the headers in
// kernels/csrc/cuda/*.cuh) as host C++ and executes a launch grid on CPU threads.
//
// Include this header before the device headers. Execution model:
//   - blocks of a grid run one after another; the threads of a block run concurrently,
//     one OS thread per CUDA thread, so data races between threads are real;
//   - `__shared__` becomes `static`: one copy per kernel instantiation, which is the
//     per-block shared memory because only one block (and one grid: launches are
//     serialised) runs at a time. Shared memory keeps the previous block's values
//     (like uninitialised shared memory on a GPU); kernels must write before they read;
//   - `__syncthreads()` is a real barrier of the block. It reports as errors a barrier
//     reached after a thread of the block exited, a thread exiting while others wait, and
//     threads waiting at different `__syncthreads()` calls (source lines);
//   - `__shfl_*_sync` and `__syncwarp` are real exchanges among the lanes named in the
//     mask. Errors: a caller not in its own mask, a source lane outside the mask, lanes
//     passing different masks or calling different shuffles, a named lane that has exited
//     or waits at `__syncthreads()` instead;
//   - any wait longer than the timeout (default 20 s, `emu::set_timeout_ms`) is reported
//     as a deadlock; a thread spinning in kernel code cannot be interrupted, though;
//   - `ldmatrix` and `mma.m16n8k16` (tensor-core kernels) are warp collectives built on the
//     same exchanges, with the PTX ISA's fragment layouts; `cp.async` copies at once;
//   - `atomicAdd` is a real atomic (compare-and-swap loop);
//   - `__half` / `__nv_bfloat16` are 16-bit host types with round-to-nearest-even
//     conversions, bit-compatible with torch.float16 / torch.bfloat16.
// `emu::launch(kernel, grid, block, args...)` runs a grid and throws std::runtime_error
// naming the block, thread and source line of the first error.
#pragma once

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// 16-bit floating-point types (storage only; arithmetic goes through float, as in the kernels).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline uint32_t emu_float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float emu_bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return emu_bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  return emu_bits_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = emu_float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u))};
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal (or the smallest normal after rounding)
    const float scaled = emu_bits_float(ax) * 16777216.0f;  // |f| * 2^24, exact
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));  // default rounding: to nearest even
    return {static_cast<uint16_t>(sign | m)};
  }
  const uint32_t mant = ax & 0x7fffffu;
  uint32_t h = ((((ax >> 23) - 127 + 15)) << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
  return {static_cast<uint16_t>(sign | h)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 b) { return emu_bits_float(static_cast<uint32_t>(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = emu_float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>(((x >> 16) & 0x8000u) | 0x7fc0u)};  // nan
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return {static_cast<uint16_t>(rounded >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---------------------------------------------------------------------------------------
// Device math functions that are not standard C++.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// As on the device, a __fmul_rn product is rounded and never fused into an FMA (the emulation is
// compiled with -ffp-contract=fast like nvcc's default); the volatile store forces the rounding.
inline float __fmul_rn(float a, float b) {
  volatile float p = a * b;
  return p;
}
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

inline float atomicAdd(float* address, float value) {
  uint32_t* p = reinterpret_cast<uint32_t*>(address);
  uint32_t expected = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (true) {
    const float old = emu_bits_float(expected);
    const uint32_t desired = emu_float_bits(old + value);
    if (__atomic_compare_exchange_n(p, &expected, desired, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old;
  }
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

// ---------------------------------------------------------------------------------------
namespace emu {

inline thread_local uint3 tl_threadIdx{0, 0, 0};
inline thread_local uint3 tl_blockIdx{0, 0, 0};
inline thread_local dim3 tl_blockDim{1, 1, 1};
inline thread_local dim3 tl_gridDim{1, 1, 1};

inline std::chrono::milliseconds& timeout_ref() {
  static std::chrono::milliseconds timeout{20000};
  return timeout;
}
inline void set_timeout_ms(long ms) { timeout_ref() = std::chrono::milliseconds(ms); }

// Thrown inside a CUDA thread to unwind it once its block has failed.
struct Abort {};

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

inline std::string hex(unsigned v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

// One open exchange among the lanes of `mask`. Rounds of disjoint masks may be open at the
// same time (independent thread scheduling); they are kept in the slot of the mask's lowest lane.
struct Round {
  unsigned mask = 0;
  unsigned arrived = 0;        // lanes that have published their value
  const char* kind = "";
  int line = 0;
  int readers_left = 0;        // lanes of the completed round that have not read yet
  uint64_t generation = 0;
  unsigned char values[32][8] = {};
};

struct Warp {
  unsigned lanes = 0;          // lanes that exist (the last warp of a block may be partial)
  unsigned exited = 0;         // lanes whose thread has returned
  unsigned at_barrier = 0;     // lanes waiting at __syncthreads
  Round rounds[32];
  std::condition_variable cv;
  // Lanes named by the open rounds other than slot `skip`; `what` describes one that names `lanes`.
  unsigned pending(int skip, unsigned lanes, std::string* what) const {
    unsigned named = 0;
    for (int i = 0; i < 32; ++i) {
      const Round& r = rounds[i];
      if (i == skip || r.arrived == 0) continue;
      named |= r.mask;
      if (r.mask & lanes) *what = cat(r.kind, " (line ", r.line, ") with mask ", hex(r.mask), " where lanes ", hex(r.arrived),
                            " wait");
    }
    return named;
  }
};

struct Block {
  explicit Block(int n) : nthreads(n), warps(new Warp[(n + 31) / 32]) {
    for (int w = 0; w < (n + 31) / 32; ++w) {
      const int lanes = std::min(32, n - 32 * w);
      warps[w].lanes = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
  }
  int nthreads;
  std::unique_ptr<Warp[]> warps;
  std::mutex mu;
  std::condition_variable cv;  // block barrier
  int arrived = 0;
  uint64_t generation = 0;
  const char* barrier_file = "";
  int barrier_line = 0;
  int exited = 0;
  bool failed = false;
  std::string error;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local int tl_linear = 0;

inline std::string who() {
  return cat("thread (", tl_threadIdx.x, ",", tl_threadIdx.y, ",", tl_threadIdx.z, ") [warp ", tl_linear / 32,
             " lane ", tl_linear % 32, "]");
}

// Records the block's first error and wakes every waiting thread. Caller holds b.mu.
inline void record_failure(Block& b, const std::string& message) {
  if (!b.failed) {
    b.failed = true;
    b.error = message;
  }
  b.cv.notify_all();
  for (int w = 0; w < (b.nthreads + 31) / 32; ++w) b.warps[w].cv.notify_all();
}

[[noreturn]] inline void fail(Block& b, const std::string& message) {
  record_failure(b, message);
  throw Abort{};
}

// Waits on cv until done(); unwinds when the block fails; reports a deadlock after the timeout.
template <typename Done>
void wait(Block& b, std::unique_lock<std::mutex>& lock, std::condition_variable& cv, Done done,
          const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + timeout_ref();
  while (!done()) {
    if (b.failed) throw Abort{};
    if (cv.wait_until(lock, deadline) == std::cv_status::timeout && !done() && !b.failed) {
      fail(b, cat("deadlock: ", who(), " waited more than ", timeout_ref().count(), " ms in ", what));
    }
  }
  if (b.failed) throw Abort{};
}

inline void syncthreads(const char* file, int line) {
  Block& b = *tl_block;
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.failed) throw Abort{};
  const int lane = tl_linear % 32;
  Warp& w = b.warps[tl_linear / 32];
  std::string round;
  if ((w.pending(-1, 1u << lane, &round) >> lane) & 1u) {
    fail(b, cat("divergent code: ", who(), " reached __syncthreads at ", file, ":", line, " while ", round,
                " for it"));
  }
  if (b.exited > 0) {
    fail(b, cat("divergent barrier: ", who(), " reached __syncthreads at ", file, ":", line, " after ", b.exited,
                " thread(s) of the block exited"));
  }
  if (b.arrived == 0) {
    b.barrier_file = file;
    b.barrier_line = line;
  } else if (b.barrier_line != line || std::strcmp(b.barrier_file, file) != 0) {
    fail(b, cat("divergent barrier: ", who(), " reached __syncthreads at ", file, ":", line, " while ", b.arrived,
                " thread(s) wait at __syncthreads at ", b.barrier_file, ":", b.barrier_line));
  }
  if (++b.arrived == b.nthreads) {
    b.arrived = 0;
    ++b.generation;
    for (int i = 0; i < (b.nthreads + 31) / 32; ++i) b.warps[i].at_barrier = 0;
    b.cv.notify_all();
    return;
  }
  w.at_barrier |= 1u << lane;
  const uint64_t generation = b.generation;
  wait(b, lock, b.cv, [&] { return b.generation != generation; }, cat("__syncthreads at ", file, ":", line));
}

// One exchange round among the lanes of `mask`: every lane publishes `value` and reads the
// value of lane `src` (an absolute lane index of the warp).
template <typename T>
T exchange(const char* kind, int line, unsigned mask, T value, int src) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of an unsupported type");
  Block& b = *tl_block;
  std::unique_lock<std::mutex> lock(b.mu);
  if (b.failed) throw Abort{};
  const int lane = tl_linear % 32;
  Warp& w = b.warps[tl_linear / 32];
  const std::string where = cat(kind, " (line ", line, ") with mask ", hex(mask));
  if (!((mask >> lane) & 1u)) fail(b, cat("bad mask: ", who(), " calls ", where, " that does not include itself"));
  if (!((mask >> src) & 1u)) {
    fail(b, cat("bad mask: ", who(), " reads lane ", src, " in ", where, ", but that lane is not in the mask"));
  }
  if (mask & ~w.lanes) fail(b, cat("bad mask: ", who(), " calls ", where, " naming lanes ", hex(mask & ~w.lanes),
                                    " that do not exist in this block"));
  if (mask & w.exited) fail(b, cat("bad mask: ", who(), " calls ", where, " naming lanes ", hex(mask & w.exited),
                                    " that have exited"));
  if (mask & w.at_barrier) {
    fail(b, cat("divergent code: ", who(), " calls ", where, " naming lanes ", hex(mask & w.at_barrier),
                " that wait at __syncthreads"));
  }
  const int slot = __builtin_ctz(mask);
  Round& r = w.rounds[slot];
  // The previous round of this slot must be fully read before its values are overwritten.
  wait(b, lock, w.cv, [&] { return r.readers_left == 0; }, where);
  std::string other;
  if ((w.pending(slot, 1u << lane, &other) >> lane) & 1u) {
    fail(b, cat("divergent warp: ", who(), " calls ", where, " while ", other, " for it"));
  }
  if (mask & w.pending(slot, mask, &other)) {
    fail(b, cat("divergent warp: ", who(), " calls ", where, " while ", other));
  }
  if (r.arrived == 0) {
    r.mask = mask;
    r.kind = kind;
    r.line = line;
  } else if (r.mask != mask || r.line != line || std::strcmp(r.kind, kind) != 0) {
    fail(b, cat("divergent warp: ", who(), " calls ", where, " while lanes ", hex(r.arrived), " wait in ", r.kind,
                " (line ", r.line, ") with mask ", hex(r.mask)));
  }
  std::memcpy(r.values[lane], &value, sizeof(T));
  r.arrived |= 1u << lane;
  const uint64_t generation = r.generation;
  if (r.arrived == mask) {
    r.arrived = 0;
    r.readers_left = __builtin_popcount(mask);
    ++r.generation;
    w.cv.notify_all();
  } else {
    wait(b, lock, w.cv, [&] { return r.generation != generation; }, where);
  }
  T out;
  std::memcpy(&out, r.values[src], sizeof(T));
  if (--r.readers_left == 0) w.cv.notify_all();
  return out;
}

template <typename T>
T shfl_xor(int line, unsigned mask, T var, int lane_mask, int width = 32) {
  const int lane = tl_linear % 32;
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside the segment: own value
  return exchange("__shfl_xor_sync", line, mask, var, src);
}
template <typename T>
T shfl_down(int line, unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = tl_linear % 32;
  const int src = (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return exchange("__shfl_down_sync", line, mask, var, src);
}
template <typename T>
T shfl_up(int line, unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = tl_linear % 32;
  const int src = (lane & (width - 1)) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return exchange("__shfl_up_sync", line, mask, var, src);
}
template <typename T>
T shfl(int line, unsigned mask, T var, int src_lane, int width = 32) {
  const int lane = tl_linear % 32;
  return exchange("__shfl_sync", line, mask, var, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}
inline void syncwarp(int line, unsigned mask = 0xffffffffu) {
  exchange("__syncwarp", line, mask, 0, tl_linear % 32);
}

// ---------------------------------------------------------------------------------------
// Warp-level matrix primitives of the tensor-core kernels (attention_tc.cuh), per the PTX
// ISA's fragment layouts. Each is a collective of the full warp: every lane copies its
// operands (for ldmatrix, the 16 bytes of the row it addresses) into a per-warp scratch
// area, a __syncwarp exchange publishes them, and every lane reads from the scratch what the
// instruction would deliver to it. A warp alternates between two scratch areas: a lane that
// writes area c % 2 in collective c has passed the exchange of collective c - 1, which every
// lane reaches only after it has read its results of collective c - 2 from that area.
struct WarpScratch {
  unsigned char rows[32][16];  // ldmatrix: the row addressed by every lane
  uint32_t regs[32][6];        // mma: a0..a3, b0, b1 of every lane
};
inline thread_local unsigned tl_collectives = 0;  // warp collectives this lane has entered
inline WarpScratch& warp_scratch() {
  static WarpScratch scratch[32][2];  // two per warp of the (single running) block
  return scratch[tl_linear / 32][tl_collectives++ & 1u];
}

// Test hook: 1 makes the emulated mma read its B fragment with the roles of k and n swapped
// inside each 8x8 block (a wrong layout), so the tests can show that such a mistake fails.
inline int& mma_b_layout_fault() {
  static int fault = 0;
  return fault;
}

// Test hook: 1 makes the emulated ldmatrix ignore .trans (a forgotten .trans: the registers
// hold rows where the kernel expects columns), so the tests can show that such a mistake fails.
inline int& ldmatrix_trans_fault() {
  static int fault = 0;
  return fault;
}

template <typename T>
inline float half_bits_to_float(uint32_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits)});
  } else {
    return __half2float(__half{static_cast<uint16_t>(bits)});
  }
}
inline uint32_t half_of(uint32_t reg, int h) { return h ? reg >> 16 : reg & 0xffffu; }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8m..8m+7 address the rows of 8x8
// matrix m (16 bytes each). Register m of lane l: row l/4, elements 2(l%4), 2(l%4)+1 of
// matrix m; with .trans, rows 2(l%4) and 2(l%4)+1 at column l/4. Rows must be 16-byte aligned.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  const int lane = tl_linear % 32;
  if (reinterpret_cast<std::uintptr_t>(row) % 16 != 0) {
    throw std::runtime_error(cat("ldmatrix: row address ", row, " is not 16-byte aligned"));
  }
  if (ldmatrix_trans_fault() != 0) trans = false;
  WarpScratch& w = warp_scratch();
  std::memcpy(w.rows[lane], row, 16);
  syncwarp(__LINE__);
  for (int mat = 0; mat < 4; ++mat) {
    if (!trans) {
      std::memcpy(&r[mat], w.rows[mat * 8 + lane / 4] + 4 * (lane % 4), 4);
    } else {
      uint16_t lo, hi;
      std::memcpy(&lo, w.rows[mat * 8 + 2 * (lane % 4)] + 2 * (lane / 4), 2);
      std::memcpy(&hi, w.rows[mat * 8 + 2 * (lane % 4) + 1] + 2 * (lane / 4), 2);
      r[mat] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + C in place.
// g = lane/4, t = lane%4. A (16x16): a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
// a3 = A[g+8][2t+8..]; B (16x8): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g];
// C, D: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]. Products and sums in float32.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = tl_linear % 32;
  WarpScratch& w = warp_scratch();
  for (int i = 0; i < 4; ++i) w.regs[lane][i] = a[i];
  w.regs[lane][4] = b0;
  w.regs[lane][5] = b1;
  syncwarp(__LINE__);
  const bool fault = mma_b_layout_fault() != 0;
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + (e & 1);
    float sum = d[e];
    for (int kk = 0; kk < 16; ++kk) {
      // A[row][kk]: lane (row%8)*4 + (kk%8)/2, register (row>=8) + 2*(kk>=8), half kk%2.
      const uint32_t ra = w.regs[(row % 8) * 4 + (kk % 8) / 2][(row >= 8) + 2 * (kk >= 8)];
      const float av = half_bits_to_float<T>(half_of(ra, kk & 1));
      // B[kk][col]: lane col*4 + (kk%8)/2, register 4 + (kk>=8), half kk%2.
      const uint32_t rb = fault ? w.regs[(kk % 8) * 4 + col / 2][4 + (kk >= 8)]
                                : w.regs[col * 4 + (kk % 8) / 2][4 + (kk >= 8)];
      const float bv = half_bits_to_float<T>(half_of(rb, fault ? (col & 1) : (kk & 1)));
      sum += av * bv;
    }
    d[e] = sum;
  }
}

// cp.async.cg.shared.global of 16 bytes, completed at once (commit and wait are no-ops);
// valid == false zero-fills like src-size 0. Misaligned addresses (a fault on the GPU) are errors.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 != 0 || (valid && reinterpret_cast<std::uintptr_t>(src) % 16 != 0)) {
    throw std::runtime_error(cat("cp.async: 16-byte copy ", src, " -> ", dst, " is not 16-byte aligned"));
  }
  if (valid) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}

// Called when a CUDA thread returns from the kernel.
inline void thread_exit() {
  Block& b = *tl_block;
  std::unique_lock<std::mutex> lock(b.mu);
  ++b.exited;
  const int lane = tl_linear % 32;
  Warp& w = b.warps[tl_linear / 32];
  w.exited |= 1u << lane;
  if (b.failed) return;
  if (b.arrived > 0) {
    record_failure(b, cat("divergent barrier: ", who(), " exited while ", b.arrived,
                          " thread(s) wait at __syncthreads at ", b.barrier_file, ":", b.barrier_line));
  } else {
    std::string round;
    if ((w.pending(-1, 1u << lane, &round) >> lane) & 1u) {
      record_failure(b, cat("bad mask: ", who(), " exited while ", round, " for it"));
    }
  }
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Runs kernel<<<grid, block>>>(args...) on the CPU; throws std::runtime_error on the first error.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024 || block.z > 64) {
    throw std::runtime_error(cat("launch: invalid block (", block.x, ",", block.y, ",", block.z, ")"));
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error(cat("launch: invalid grid (", grid.x, ",", grid.y, ",", grid.z, ")"));
  }
  std::lock_guard<std::mutex> serial(launch_mutex());  // one block of one grid at a time
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b(static_cast<int>(nthreads));
        auto body = [&](int t) {
          tl_block = &b;
          tl_linear = t;
          tl_threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          tl_blockIdx = {bx, by, bz};
          tl_blockDim = block;
          tl_gridDim = grid;
          try {
            kernel(args...);
            thread_exit();
          } catch (const Abort&) {
            std::unique_lock<std::mutex> lock(b.mu);
            ++b.exited;
            b.warps[t / 32].exited |= 1u << (t % 32);
          } catch (const std::exception& e) {
            std::unique_lock<std::mutex> lock(b.mu);
            ++b.exited;
            b.warps[t / 32].exited |= 1u << (t % 32);
            record_failure(b, cat(who(), " threw: ", e.what()));
          }
        };
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t) {
          try {
            threads.emplace_back(body, t);
          } catch (const std::system_error& e) {  // the OS refused another thread
            std::unique_lock<std::mutex> lock(b.mu);
            record_failure(b, cat("could not start CUDA thread ", t, " of the block: ", e.what()));
            break;
          }
        }
        for (auto& th : threads) th.join();
        if (b.failed) {
          throw std::runtime_error(cat("emulated launch grid (", grid.x, ",", grid.y, ",", grid.z, ") block (",
                                       block.x, ",", block.y, ",", block.z, "): in block (", bx, ",", by, ",", bz,
                                       "): ", b.error));
        }
      }
}

}  // namespace emu

#define threadIdx (::emu::tl_threadIdx)
#define blockIdx (::emu::tl_blockIdx)
#define blockDim (::emu::tl_blockDim)
#define gridDim (::emu::tl_gridDim)
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl_down(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl_up(__LINE__, __VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl(__LINE__, __VA_ARGS__)
#define DIT4DIT_CUDA_EMULATION 1
