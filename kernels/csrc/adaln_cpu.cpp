// CPU kernels of dit4dit::adaln_modulate_fwd / adaln_modulate_bwd and of the fused
// dit4dit::residual_modulate_fwd / residual_modulate_bwd.
//
// Computes adaptive-LayerNorm modulation, LayerNorm without affine followed by a
// per-group shift and scale:
//     y[b,n,:] = (x[b,n,:] - mean[b,n]) * rstd[b,n] * (1 + scale[b,g,:]) + shift[b,g,:]
//     mean = E[x], var = E[(x - mean)^2] (biased), rstd = 1 / sqrt(var + eps)
// with token n in group g = n / (N / G) (tokens grouped contiguously; G = 1 is one
// modulation per sample, G = T one per frame).
//
// Shapes: x, y, grad_x (B, N, D); shift, scale, grad_shift, grad_scale (B, G, D),
// N % G == 0, D >= 1; mean, rstd (B, N).
// Dtypes: float32, float64, bfloat16, float16; x, shift and scale share one dtype.
// Statistics and all accumulation run in float32 (float64 for float64 inputs),
// and mean/rstd are saved in that dtype for the backward.
// Limits: CPU, contiguous inputs (the Python wrapper makes them contiguous).
//
// Work is cut into runs of rows that share one (sample, group), so a run's shift and
// scale rows are fixed and every row is one call of a row kernel; the group count G
// changes only where the runs end. The float32 row kernels compute on the 16-lane v16f
// type in DIT4DIT_MULTIVERSION_AVX512 functions (AVX-512, AVX2+FMA and baseline clones;
// see cpu_common.h): at 8 lanes the arithmetic of the three passes, not memory, set the
// pace; bfloat16 and float16 rows are widened to float32 in per-thread buffers and go
// through the same kernels; float64 runs plain loops of the same steps.
//
// Forward, per row (one token): the row of D values is read once from memory;
// the mean and the centred second moment are two passes over the row while it
// sits in L1 (two-pass is as cheap as Welford here and exact in the centring);
// a third pass writes y.
//
// Backward (LayerNorm paper notation, xhat = (x - mean) * rstd, g = dy * (1 + scale)):
//     dx     = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
//     dshift = sum over the tokens of the group of dy
//     dscale = sum over the tokens of the group of dy * xhat
// One pass over memory per row: step 1 reads dy and x, writes g into the dx row
// (rounded once, so step 2 sees the very g that was summed and dx is exactly 0 at
// D = 1) and adds dy and dy * xhat into the chunk's partial dshift/dscale rows;
// step 2 rewrites the dx row, still in L1. The token sums are reduced without races:
// each group's rows are cut into C chunks, every chunk owns its partial
// (dshift, dscale) rows, and a second parallel pass adds the C partials in a fixed
// order (deterministic for a given thread count).
//
// residual_modulate folds a sublayer's gated residual into the next sublayer's adaLN:
//     x_new = x + gate[g] * y,   h = adaln_modulate(x_new, shift, scale)
// with y (B, N, D) and gate (B, G, D) like x and shift. Its forward runs, per row, the
// residual into the x_new row and then the forward row kernel above on that row while it
// is in L1 (x and y are read once, x_new and h written once; the unfused sequence moves
// about twice the bytes). Its backward runs, per row, the backward row kernel above
// (LayerNorm's gradient for x_new) and then, on the same row,
//     grad_x = grad_x_new + that gradient,  grad_y = gate * grad_x,
//     grad_gate = sum over the tokens of the group of y * grad_x
// with grad_gate's sum a third partial row beside dshift and dscale.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "ops.h"

namespace dit4dit {
namespace cpu {
namespace {

// Rows of `D` values per parallel chunk: about 64K elements, so that small D still
// gives chunks worth a thread.
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

// ---------------------------------------------------------------------------------
// Row kernels. Each handles `rows` consecutive rows of D values that share one
// (sample, group): `shift`, `scale` point at that group's rows of D values, `mean`,
// `rstd` at the rows' statistics. The float32 kernels are explicit 16-lane loops
// with a scalar tail; the templates are the same steps in plain loops (float64).

// Forward: mean, centred second moment, then y = xhat * (1 + scale) + shift.
DIT4DIT_MULTIVERSION_AVX512
void adaln_rows_fwd_f32(const float* x, const float* shift, const float* scale, float* y, float* mean, float* rstd,
                        int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    if (r + 1 < rows) prefetch_bytes(xr + D, D * static_cast<int64_t>(sizeof(float)));  // the next row
    // Step 1: mean (four accumulators, so the adds do not wait on each other).
    v16f s0 = splat16(0.f), s1 = splat16(0.f), s2 = splat16(0.f), s3 = splat16(0.f);
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) {
      s0 += load16(xr + d);
      s1 += load16(xr + d + 16);
      s2 += load16(xr + d + 32);
      s3 += load16(xr + d + 48);
    }
    for (; d + 16 <= D; d += 16) s0 += load16(xr + d);
    float sum = hsum16((s0 + s1) + (s2 + s3));
    for (; d < D; ++d) sum += xr[d];
    const float mu = sum / static_cast<float>(D);
    // Step 2: biased variance around the mean (the row is in L1 now).
    const v16f vmu = splat16(mu);
    s0 = s1 = s2 = s3 = splat16(0.f);
    for (d = 0; d + 64 <= D; d += 64) {
      const v16f c0 = load16(xr + d) - vmu, c1 = load16(xr + d + 16) - vmu;
      const v16f c2 = load16(xr + d + 32) - vmu, c3 = load16(xr + d + 48) - vmu;
      s0 += c0 * c0;
      s1 += c1 * c1;
      s2 += c2 * c2;
      s3 += c3 * c3;
    }
    for (; d + 16 <= D; d += 16) {
      const v16f c0 = load16(xr + d) - vmu;
      s0 += c0 * c0;
    }
    float sq = hsum16((s0 + s1) + (s2 + s3));
    for (; d < D; ++d) sq += (xr[d] - mu) * (xr[d] - mu);
    const float rs = 1.f / std::sqrt(sq / static_cast<float>(D) + eps);
    // Step 3: y = xhat * (1 + scale) + shift.
    const v16f vrs = splat16(rs);
    for (d = 0; d + 16 <= D; d += 16) {
      const v16f xhat = (load16(xr + d) - vmu) * vrs;
      store16(yr + d, xhat * (1.f + load16(scale + d)) + load16(shift + d));
    }
    for (; d < D; ++d) yr[d] = (xr[d] - mu) * rs * (1.f + scale[d]) + shift[d];
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T>
void adaln_rows_fwd(const T* x, const T* shift, const T* scale, T* y, T* mean, T* rstd, int64_t rows, int64_t D,
                    T eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    T sum = 0, sq = 0;
    for (int64_t d = 0; d < D; ++d) sum += xr[d];
    const T mu = sum / static_cast<T>(D);
    for (int64_t d = 0; d < D; ++d) sq += (xr[d] - mu) * (xr[d] - mu);
    const T rs = T(1) / std::sqrt(sq / static_cast<T>(D) + eps);
    for (int64_t d = 0; d < D; ++d) yr[d] = (xr[d] - mu) * rs * (T(1) + scale[d]) + shift[d];
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// Backward: dx rows, and dy, dy * xhat added into the partial rows dsh, dsc.
DIT4DIT_MULTIVERSION_AVX512
void adaln_rows_bwd_f32(const float* dy, const float* x, const float* scale, const float* mean, const float* rstd,
                        float* dx, float* dsh, float* dsc, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * D;
    const float* xr = x + r * D;
    float* dxr = dx + r * D;
    const float mu = mean[r], rs = rstd[r];
    const v16f vmu = splat16(mu), vrs = splat16(rs);
    // Step 1: g = dy * (1 + scale) into the dx row; row sums of g and g * xhat;
    // group sums of dy and dy * xhat.
    v16f s_g = splat16(0.f), s_gx = splat16(0.f);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const v16f vdy = load16(dyr + d);
      const v16f xhat = (load16(xr + d) - vmu) * vrs;
      const v16f g = vdy * (1.f + load16(scale + d));
      store16(dxr + d, g);
      s_g += g;
      s_gx += g * xhat;
      store16(dsh + d, load16(dsh + d) + vdy);
      store16(dsc + d, load16(dsc + d) + vdy * xhat);
    }
    float sum_g = hsum16(s_g), sum_gx = hsum16(s_gx);
    for (; d < D; ++d) {
      const float xhat = (xr[d] - mu) * rs;
      const float g = dyr[d] * (1.f + scale[d]);
      dxr[d] = g;
      sum_g += g;
      sum_gx += g * xhat;
      dsh[d] += dyr[d];
      dsc[d] += dyr[d] * xhat;
    }
    // Step 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    const float mean_g = sum_g / static_cast<float>(D), mean_gx = sum_gx / static_cast<float>(D);
    const v16f vmg = splat16(mean_g), vmgx = splat16(mean_gx);
    for (d = 0; d + 16 <= D; d += 16) {
      const v16f xhat = (load16(xr + d) - vmu) * vrs;
      store16(dxr + d, vrs * (load16(dxr + d) - vmg - xhat * vmgx));
    }
    for (; d < D; ++d) dxr[d] = rs * (dxr[d] - mean_g - (xr[d] - mu) * rs * mean_gx);
  }
}

template <typename T>
void adaln_rows_bwd(const T* dy, const T* x, const T* scale, const T* mean, const T* rstd, T* dx, T* dsh, T* dsc,
                    int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* dyr = dy + r * D;
    const T* xr = x + r * D;
    T* dxr = dx + r * D;
    const T mu = mean[r], rs = rstd[r];
    T sum_g = 0, sum_gx = 0;
    for (int64_t d = 0; d < D; ++d) {
      const T xhat = (xr[d] - mu) * rs;
      const T g = dyr[d] * (T(1) + scale[d]);
      dxr[d] = g;
      sum_g += g;
      sum_gx += g * xhat;
      dsh[d] += dyr[d];
      dsc[d] += dyr[d] * xhat;
    }
    const T mean_g = sum_g / static_cast<T>(D), mean_gx = sum_gx / static_cast<T>(D);
    for (int64_t d = 0; d < D; ++d) dxr[d] = rs * (dxr[d] - mean_g - (xr[d] - mu) * rs * mean_gx);
  }
}

// The gated residual of residual_modulate, one row of D values (gate is the group's row):
//   forward   xn = x + gate * y   (one fused multiply-add where the compiler contracts it,
//             so float32 may differ from the eager x + y * gate by one rounding);
//   backward  on entry dx holds LayerNorm's input gradient for x_new (adaln_rows_bwd);
//             dx += dxn (the gradient that reaches x_new directly) is the gradient of x,
//             dy = gate * dx, and dgate += y * dx adds the row into the partial row dgate.
// The templates are the plain loops (float64, and the float32 kernels' tails).
template <typename T>
void residual_row_fwd(const T* x, const T* y, const T* gate, T* xn, int64_t D) {
  for (int64_t d = 0; d < D; ++d) xn[d] = x[d] + gate[d] * y[d];
}

template <typename T>
void residual_row_bwd(const T* dxn, const T* y, const T* gate, T* dx, T* dy, T* dgate, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const T total = dx[d] + dxn[d];
    dx[d] = total;
    dy[d] = gate[d] * total;
    dgate[d] += y[d] * total;
  }
}

DIT4DIT_MULTIVERSION_AVX512
void residual_row_fwd_f32(const float* x, const float* y, const float* gate, float* xn, int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) store16(xn + d, load16(x + d) + load16(gate + d) * load16(y + d));
  residual_row_fwd<float>(x + d, y + d, gate + d, xn + d, D - d);
}

DIT4DIT_MULTIVERSION_AVX512
void residual_row_bwd_f32(const float* dxn, const float* y, const float* gate, float* dx, float* dy, float* dgate,
                          int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const v16f total = load16(dx + d) + load16(dxn + d);
    store16(dx + d, total);
    store16(dy + d, load16(gate + d) * total);
    store16(dgate + d, load16(dgate + d) + load16(y + d) * total);
  }
  residual_row_bwd<float>(dxn + d, y + d, gate + d, dx + d, dy + d, dgate + d, D - d);
}

// Dispatch of a run to the row kernels. float32 and float64 rows are used in place;
// bfloat16 / float16 rows are widened into the per-thread Buffers, one row at a time
// (y, gate and dres only for residual_modulate).
template <typename scalar_t>
struct Buffers {
  std::vector<float> x, dy, shift, scale, out, y, gate, dres;
  Buffers(int64_t D, bool residual) {
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      for (auto* v : {&x, &dy, &shift, &scale, &out}) v->resize(D);
      if (residual)
        for (auto* v : {&y, &gate, &dres}) v->resize(D);
    }
  }
};

template <typename scalar_t, typename acc_t>
void adaln_run_fwd(const scalar_t* x, const scalar_t* shift, const scalar_t* scale, scalar_t* y, acc_t* mean,
                   acc_t* rstd, int64_t rows, int64_t D, acc_t eps, Buffers<scalar_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    adaln_rows_fwd_f32(x, shift, scale, y, mean, rstd, rows, D, eps);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    adaln_rows_fwd<double>(x, shift, scale, y, mean, rstd, rows, D, eps);
  } else {
    at::vec::convert(shift, buf.shift.data(), D);
    at::vec::convert(scale, buf.scale.data(), D);
    for (int64_t r = 0; r < rows; ++r) {
      at::vec::convert(x + r * D, buf.x.data(), D);
      adaln_rows_fwd_f32(buf.x.data(), buf.shift.data(), buf.scale.data(), buf.out.data(), mean + r, rstd + r, 1, D,
                         eps);
      at::vec::convert(buf.out.data(), y + r * D, D);
    }
  }
}

template <typename scalar_t, typename acc_t>
void adaln_run_bwd(const scalar_t* dy, const scalar_t* x, const scalar_t* scale, const acc_t* mean,
                   const acc_t* rstd, scalar_t* dx, acc_t* dsh, acc_t* dsc, int64_t rows, int64_t D,
                   Buffers<scalar_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    adaln_rows_bwd_f32(dy, x, scale, mean, rstd, dx, dsh, dsc, rows, D);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    adaln_rows_bwd<double>(dy, x, scale, mean, rstd, dx, dsh, dsc, rows, D);
  } else {
    at::vec::convert(scale, buf.scale.data(), D);
    for (int64_t r = 0; r < rows; ++r) {
      at::vec::convert(dy + r * D, buf.dy.data(), D);
      at::vec::convert(x + r * D, buf.x.data(), D);
      adaln_rows_bwd_f32(buf.dy.data(), buf.x.data(), buf.scale.data(), mean + r, rstd + r, buf.out.data(), dsh, dsc,
                         1, D);
      at::vec::convert(buf.out.data(), dx + r * D, D);
    }
  }
}

// One run of residual_modulate's forward: per row, the residual into the x_new row, then
// the adaLN row kernel on that row while it is in L1. h is computed from x_new as stored
// (for bfloat16 / float16: rounded to the dtype first), as the unfused sequence does.
template <typename scalar_t, typename acc_t>
void residual_run_fwd(const scalar_t* x, const scalar_t* y, const scalar_t* gate, const scalar_t* shift,
                      const scalar_t* scale, scalar_t* xn, scalar_t* h, acc_t* mean, acc_t* rstd, int64_t rows,
                      int64_t D, acc_t eps, Buffers<scalar_t>& buf) {
  constexpr bool native = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;
  if constexpr (!native) {
    at::vec::convert(gate, buf.gate.data(), D);
    at::vec::convert(shift, buf.shift.data(), D);
    at::vec::convert(scale, buf.scale.data(), D);
  }
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * D;
    if (r + 1 < rows) {  // the next rows of x and y
      prefetch_bytes(x + o + D, row_bytes);
      prefetch_bytes(y + o + D, row_bytes);
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      residual_row_fwd_f32(x + o, y + o, gate, xn + o, D);
      adaln_rows_fwd_f32(xn + o, shift, scale, h + o, mean + r, rstd + r, 1, D, eps);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      residual_row_fwd<double>(x + o, y + o, gate, xn + o, D);
      adaln_rows_fwd<double>(xn + o, shift, scale, h + o, mean + r, rstd + r, 1, D, eps);
    } else {
      at::vec::convert(x + o, buf.x.data(), D);
      at::vec::convert(y + o, buf.y.data(), D);
      residual_row_fwd_f32(buf.x.data(), buf.y.data(), buf.gate.data(), buf.x.data(), D);
      at::vec::convert(buf.x.data(), xn + o, D);
      at::vec::convert(xn + o, buf.x.data(), D);  // the rounded x_new
      adaln_rows_fwd_f32(buf.x.data(), buf.shift.data(), buf.scale.data(), buf.out.data(), mean + r, rstd + r, 1, D,
                         eps);
      at::vec::convert(buf.out.data(), h + o, D);
    }
  }
}

// One run of residual_modulate's backward: per row, the adaLN row backward (LayerNorm's
// gradient into the dx row, dh and dh * xhat into dsh, dsc), then the residual row
// backward on the dx row while it is in L1.
template <typename scalar_t, typename acc_t>
void residual_run_bwd(const scalar_t* dxn, const scalar_t* dh, const scalar_t* xn, const scalar_t* y,
                      const scalar_t* gate, const scalar_t* scale, const acc_t* mean, const acc_t* rstd,
                      scalar_t* dx, scalar_t* dy, acc_t* dsh, acc_t* dsc, acc_t* dgate, int64_t rows, int64_t D,
                      Buffers<scalar_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * D;
      adaln_run_bwd<scalar_t, acc_t>(dh + o, xn + o, scale, mean + r, rstd + r, dx + o, dsh, dsc, 1, D, buf);
      if constexpr (std::is_same_v<scalar_t, float>)
        residual_row_bwd_f32(dxn + o, y + o, gate, dx + o, dy + o, dgate, D);
      else
        residual_row_bwd<double>(dxn + o, y + o, gate, dx + o, dy + o, dgate, D);
    }
  } else {
    at::vec::convert(scale, buf.scale.data(), D);
    at::vec::convert(gate, buf.gate.data(), D);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * D;
      at::vec::convert(dh + o, buf.dy.data(), D);
      at::vec::convert(xn + o, buf.x.data(), D);
      adaln_rows_bwd_f32(buf.dy.data(), buf.x.data(), buf.scale.data(), mean + r, rstd + r, buf.out.data(), dsh, dsc,
                         1, D);
      at::vec::convert(dxn + o, buf.dy.data(), D);
      at::vec::convert(y + o, buf.y.data(), D);
      residual_row_bwd_f32(buf.dy.data(), buf.y.data(), buf.gate.data(), buf.out.data(), buf.dres.data(), dgate, D);
      at::vec::convert(buf.out.data(), dx + o, D);
      at::vec::convert(buf.dres.data(), dy + o, D);
    }
  }
}

// The extra operands of residual_modulate (a null pointer to them: plain adaLN).
template <typename scalar_t>
struct ResidualFwd {
  const scalar_t* y;     // (B, N, D) sublayer output
  const scalar_t* gate;  // (B, G, D)
  scalar_t* x_new;       // (B, N, D) output; the adaLN input x of the impl is the old residual stream
};

template <typename scalar_t>
struct ResidualBwd {
  const scalar_t* grad_x_new;  // (B, N, D) the gradient that reaches x_new directly
  const scalar_t* y;           // (B, N, D)
  const scalar_t* gate;        // (B, G, D)
  scalar_t* grad_y;            // (B, N, D) output
  scalar_t* grad_gate;         // (B, G, D) output
};

// ---------------------------------------------------------------------------------
// forward (of adaln_modulate, and of residual_modulate when `res` is given)
template <typename scalar_t>
void adaln_fwd_impl(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                    at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, const ResidualFwd<scalar_t>* res) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(1), D = x.size(2), G = shift.size(1);
  const int64_t tokens_per_group = N / G;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* shp = shift.data_ptr<scalar_t>();
  const scalar_t* scp = scale.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t* meanp = mean.data_ptr<acc_t>();
  acc_t* rstdp = rstd.data_ptr<acc_t>();

  at::parallel_for(0, x.size(0) * N, row_grain(D), [&](int64_t begin, int64_t end) {
    Buffers<scalar_t> buf(D, res != nullptr);
    // Runs of rows [row, run_end) inside one (sample, group) and inside [begin, end).
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / N, g = (row % N) / tokens_per_group;
      const int64_t run_end = std::min(end, b * N + (g + 1) * tokens_per_group);
      const int64_t bg = b * G + g;
      if (res)
        residual_run_fwd<scalar_t, acc_t>(xp + row * D, res->y + row * D, res->gate + bg * D, shp + bg * D,
                                          scp + bg * D, res->x_new + row * D, yp + row * D, meanp + row, rstdp + row,
                                          run_end - row, D, static_cast<acc_t>(eps), buf);
      else
        adaln_run_fwd<scalar_t, acc_t>(xp + row * D, shp + bg * D, scp + bg * D, yp + row * D, meanp + row,
                                       rstdp + row, run_end - row, D, static_cast<acc_t>(eps), buf);
      row = run_end;
    }
  });
}

// Checks of the adaLN operands shared by both forward ops.
void check_fwd_inputs(const char* op, const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                      double eps) {
  check_cpu_tensor(op, "x", x);
  check_cpu_tensor(op, "shift", shift);
  check_cpu_tensor(op, "scale", scale);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", dt);
  check_same_dtype(op, "shift", shift, "x", x);
  check_same_dtype(op, "scale", scale, "x", x);
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, N, D), got ", shape_str(x));
  TORCH_CHECK(shift.dim() == 3, op, ": shift must have shape (B, G, D), got ", shape_str(shift));
  TORCH_CHECK(scale.sizes() == shift.sizes(), op, ": scale ", shape_str(scale), " must have the shape of shift ",
              shape_str(shift));
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), G = shift.size(1);
  TORCH_CHECK(shift.size(0) == B && shift.size(2) == D, op, ": shift/scale ", shape_str(shift),
              " must be (B, G, D) = (", B, ", G, ", D, ") to match x ", shape_str(x));
  TORCH_CHECK(D >= 1, op, ": x must have a feature dimension D >= 1, got ", shape_str(x));
  TORCH_CHECK(G >= 1, op, ": shift/scale need at least one group (G >= 1), got ", shape_str(shift));
  TORCH_CHECK(N % G == 0, op, ": the N = ", N, " tokens of x must split into G = ", G,
              " equal groups (N % G == 0)");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
}

// mean and rstd (B, N) of x, in the statistics dtype.
std::pair<at::Tensor, at::Tensor> empty_stats(const at::Tensor& x) {
  auto stat_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  return {at::empty({x.size(0), x.size(1)}, stat_opts), at::empty({x.size(0), x.size(1)}, stat_opts)};
}

}  // namespace

// Entry points (declared in ops.h, registered in ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                                                  const at::Tensor& scale, double eps) {
  check_fwd_inputs("dit4dit::adaln_modulate_fwd", x, shift, scale, eps);
  at::Tensor y = at::empty_like(x);
  auto [mean, rstd] = empty_stats(x);
  if (x.numel() == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_modulate_fwd_cpu", [&] {
    adaln_fwd_impl<scalar_t>(x, shift, scale, eps, y, mean, rstd, nullptr);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_fwd(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, double eps) {
  const char* op = "dit4dit::residual_modulate_fwd";
  check_fwd_inputs(op, x, shift, scale, eps);
  check_cpu_tensor(op, "y", y);
  check_cpu_tensor(op, "gate", gate);
  check_same_dtype(op, "y", y, "x", x);
  check_same_dtype(op, "gate", gate, "x", x);
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": y ", shape_str(y), " must have the shape of x ", shape_str(x));
  TORCH_CHECK(gate.sizes() == shift.sizes(), op, ": gate ", shape_str(gate), " must have the shape of shift ",
              shape_str(shift));
  at::Tensor x_new = at::empty_like(x);
  at::Tensor h = at::empty_like(x);
  auto [mean, rstd] = empty_stats(x);
  if (x.numel() == 0) return {x_new, h, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "residual_modulate_fwd_cpu", [&] {
    const ResidualFwd<scalar_t> res{y.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), x_new.data_ptr<scalar_t>()};
    adaln_fwd_impl<scalar_t>(x, shift, scale, eps, h, mean, rstd, &res);
  });
  return {x_new, h, mean, rstd};
}

namespace {

// ---------------------------------------------------------------------------------
// backward (of adaln_modulate, and of residual_modulate when `res` is given: then x is
// x_new, dy the gradient of h, and dx the gradient of the old residual stream x)
template <typename scalar_t>
void adaln_bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                    const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dshift, at::Tensor& dscale,
                    const ResidualBwd<scalar_t>* res) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(1), D = x.size(2), G = scale.size(1);
  const int64_t rows_per_group = N / G;
  const int64_t BG = x.size(0) * G;
  // C chunks per group: enough work items (about 4 per thread) for balance even
  // when B * G is small, never more chunks than rows.
  const int64_t nthreads = at::get_num_threads();
  const int64_t C = std::max<int64_t>(
      1, std::min<int64_t>(rows_per_group, (4 * nthreads + BG - 1) / std::max<int64_t>(BG, 1)));
  const int64_t rows_per_chunk = (rows_per_group + C - 1) / C;
  // P partial rows per chunk: partial[(bg * C + c), 0, :] = sum of dy, [..., 1, :] = sum of
  // dy * xhat, and for residual_modulate [..., 2, :] = sum of y * grad x.
  const int64_t P = res ? 3 : 2;
  std::vector<acc_t> partial(static_cast<size_t>(BG * C * P * D));

  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* scp = scale.data_ptr<scalar_t>();
  const acc_t* meanp = mean.data_ptr<acc_t>();
  const acc_t* rstdp = rstd.data_ptr<acc_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();

  at::parallel_for(0, BG * C, 1, [&](int64_t begin, int64_t end) {
    Buffers<scalar_t> buf(D, res != nullptr);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bg = item / C, c = item % C;
      const int64_t b = bg / G, g = bg % G;
      const int64_t n0 = std::min(rows_per_group, c * rows_per_chunk);
      const int64_t n1 = std::min(rows_per_group, n0 + rows_per_chunk);
      const int64_t row0 = b * N + g * rows_per_group + n0;  // first row of the chunk
      acc_t* dsh = partial.data() + (item * P) * D;  // this chunk's own partial rows
      acc_t* dsc = dsh + D;
      if (res)
        residual_run_bwd<scalar_t, acc_t>(res->grad_x_new + row0 * D, dyp + row0 * D, xp + row0 * D,
                                          res->y + row0 * D, res->gate + bg * D, scp + bg * D, meanp + row0,
                                          rstdp + row0, dxp + row0 * D, res->grad_y + row0 * D, dsh, dsc, dsc + D,
                                          n1 - n0, D, buf);
      else
        adaln_run_bwd<scalar_t, acc_t>(dyp + row0 * D, xp + row0 * D, scp + bg * D, meanp + row0, rstdp + row0,
                                       dxp + row0 * D, dsh, dsc, n1 - n0, D, buf);
    }
  });

  // Second pass: add the C partials of each group in a fixed order.
  scalar_t* outs[3] = {dshift.data_ptr<scalar_t>(), dscale.data_ptr<scalar_t>(), res ? res->grad_gate : nullptr};
  at::parallel_for(0, BG, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(P * D);
    for (int64_t bg = begin; bg < end; ++bg) {
      const acc_t* p = partial.data() + (bg * C * P) * D;
      std::copy(p, p + P * D, acc.begin());
      for (int64_t c = 1; c < C; ++c) {
        p += P * D;
        for (int64_t d = 0; d < P * D; ++d) acc[d] += p[d];
      }
      for (int64_t k = 0; k < P; ++k)
        for (int64_t d = 0; d < D; ++d) outs[k][bg * D + d] = static_cast<scalar_t>(acc[k * D + d]);
    }
  });
}

// Checks of the adaLN operands shared by both backward ops; grad_name names the gradient of
// the modulated output (grad_y of adaln_modulate, grad_h of residual_modulate).
void check_bwd_inputs(const char* op, const char* grad_name, const at::Tensor& grad, const at::Tensor& x,
                      const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups) {
  check_cpu_tensor(op, grad_name, grad);
  check_cpu_tensor(op, "x", x);
  check_cpu_tensor(op, "scale", scale);
  check_cpu_tensor(op, "mean", mean);
  check_cpu_tensor(op, "rstd", rstd);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", dt);
  check_same_dtype(op, grad_name, grad, "x", x);
  check_same_dtype(op, "scale", scale, "x", x);
  TORCH_CHECK(mean.scalar_type() == stats_dtype(dt) && rstd.scalar_type() == stats_dtype(dt), op,
              ": mean and rstd must be ", stats_dtype(dt), " for ", dt, " inputs (as returned by the forward), got ",
              mean.scalar_type(), " and ", rstd.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, N, D), got ", shape_str(x));
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": ", grad_name, " ", shape_str(grad), " must have the shape of x ",
              shape_str(x));
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(D >= 1, op, ": x must have a feature dimension D >= 1, got ", shape_str(x));
  TORCH_CHECK(groups >= 1 && N % groups == 0, op, ": groups = ", groups, " must be >= 1 and divide the N = ", N,
              " tokens of x");
  TORCH_CHECK(scale.dim() == 3 && scale.size(0) == B && scale.size(1) == groups && scale.size(2) == D, op,
              ": scale ", shape_str(scale), " must be (B, groups, D) = (", B, ", ", groups, ", ", D, ")");
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == B && mean.size(1) == N, op, ": mean ", shape_str(mean),
              " must be (B, N) = (", B, ", ", N, ")");
  TORCH_CHECK(rstd.sizes() == mean.sizes(), op, ": rstd ", shape_str(rstd), " must have the shape of mean ",
              shape_str(mean));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& scale, const at::Tensor& mean,
                                                                  const at::Tensor& rstd, int64_t groups) {
  check_bwd_inputs("dit4dit::adaln_modulate_bwd", "grad_y", grad_y, x, scale, mean, rstd, groups);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dshift = at::zeros_like(scale);
  at::Tensor dscale = at::zeros_like(scale);
  if (x.numel() == 0) return {dx, dshift, dscale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adaln_modulate_bwd_cpu", [&] {
    adaln_bwd_impl<scalar_t>(grad_y, x, scale, mean, rstd, dx, dshift, dscale, nullptr);
  });
  return {dx, dshift, dscale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_modulate_bwd(
    const at::Tensor& grad_x_new, const at::Tensor& grad_h, const at::Tensor& x_new, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "dit4dit::residual_modulate_bwd";
  TORCH_CHECK(scale.dim() == 3, op, ": scale must have shape (B, G, D), got ", shape_str(scale));
  check_bwd_inputs(op, "grad_h", grad_h, x_new, scale, mean, rstd, scale.size(1));
  auto check_like_x_new = [&](const char* name, const at::Tensor& t) {
    check_cpu_tensor(op, name, t);
    check_same_dtype(op, name, t, "x_new", x_new);
    TORCH_CHECK(t.sizes() == x_new.sizes(), op, ": ", name, " ", shape_str(t), " must have the shape of x_new ",
                shape_str(x_new));
  };
  check_like_x_new("grad_x_new", grad_x_new);
  check_like_x_new("y", y);
  check_cpu_tensor(op, "gate", gate);
  check_same_dtype(op, "gate", gate, "x_new", x_new);
  TORCH_CHECK(gate.sizes() == scale.sizes(), op, ": gate ", shape_str(gate), " must have the shape of scale ",
              shape_str(scale));

  at::Tensor dx = at::empty_like(x_new);
  at::Tensor dy = at::empty_like(x_new);
  at::Tensor dgate = at::zeros_like(scale);
  at::Tensor dshift = at::zeros_like(scale);
  at::Tensor dscale = at::zeros_like(scale);
  if (x_new.numel() == 0) return {dx, dy, dgate, dshift, dscale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_new.scalar_type(), "residual_modulate_bwd_cpu", [&] {
    const ResidualBwd<scalar_t> res{grad_x_new.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                    gate.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dgate.data_ptr<scalar_t>()};
    adaln_bwd_impl<scalar_t>(grad_h, x_new, scale, mean, rstd, dx, dshift, dscale, &res);
  });
  return {dx, dy, dgate, dshift, dscale};
}

}  // namespace cpu
}  // namespace dit4dit
