// CPU kernels of dit4dit::adaln_modulate_fwd / adaln_modulate_bwd.
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
    // Ask for the next row of the run now (one prefetch per 64-byte line), so that its
    // load from memory overlaps this row's arithmetic.
    if (r + 1 < rows)
      for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(xr + D + d);
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

// Dispatch of a run to the row kernels. float32 and float64 rows are used in place;
// bfloat16 / float16 rows are widened into the per-thread Buffers, one row at a time.
template <typename scalar_t>
struct Buffers {
  std::vector<float> x, dy, shift, scale, out;
  explicit Buffers(int64_t D) {
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      x.resize(D); dy.resize(D); shift.resize(D); scale.resize(D); out.resize(D);
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

// ---------------------------------------------------------------------------------
// forward
template <typename scalar_t>
void adaln_fwd_impl(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                    at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
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
    Buffers<scalar_t> buf(D);
    // Runs of rows [row, run_end) inside one (sample, group) and inside [begin, end).
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / N, g = (row % N) / tokens_per_group;
      const int64_t run_end = std::min(end, b * N + (g + 1) * tokens_per_group);
      const int64_t bg = b * G + g;
      adaln_run_fwd<scalar_t, acc_t>(xp + row * D, shp + bg * D, scp + bg * D, yp + row * D, meanp + row,
                                     rstdp + row, run_end - row, D, static_cast<acc_t>(eps), buf);
      row = run_end;
    }
  });
}

}  // namespace

// Entry points (declared in ops.h, registered in ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                                                  const at::Tensor& scale, double eps) {
  const char* op = "dit4dit::adaln_modulate_fwd";
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

  at::Tensor y = at::empty_like(x);
  auto stat_opts = x.options().dtype(stats_dtype(dt));
  at::Tensor mean = at::empty({B, N}, stat_opts);
  at::Tensor rstd = at::empty({B, N}, stat_opts);
  if (B * N == 0) return {y, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "adaln_modulate_fwd_cpu", [&] {
    adaln_fwd_impl<scalar_t>(x, shift, scale, eps, y, mean, rstd);
  });
  return {y, mean, rstd};
}

namespace {

// ---------------------------------------------------------------------------------
// backward
template <typename scalar_t>
void adaln_bwd_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& mean,
                    const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dshift, at::Tensor& dscale) {
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
  // partial[(bg * C + c), 0, :] = sum of dy, partial[..., 1, :] = sum of dy * xhat.
  std::vector<acc_t> partial(static_cast<size_t>(BG * C * 2 * D));

  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* scp = scale.data_ptr<scalar_t>();
  const acc_t* meanp = mean.data_ptr<acc_t>();
  const acc_t* rstdp = rstd.data_ptr<acc_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();

  at::parallel_for(0, BG * C, 1, [&](int64_t begin, int64_t end) {
    Buffers<scalar_t> buf(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bg = item / C, c = item % C;
      const int64_t b = bg / G, g = bg % G;
      const int64_t n0 = std::min(rows_per_group, c * rows_per_chunk);
      const int64_t n1 = std::min(rows_per_group, n0 + rows_per_chunk);
      const int64_t row0 = b * N + g * rows_per_group + n0;  // first row of the chunk
      acc_t* dsh = partial.data() + (item * 2) * D;  // this chunk's own partial rows
      acc_t* dsc = dsh + D;
      adaln_run_bwd<scalar_t, acc_t>(dyp + row0 * D, xp + row0 * D, scp + bg * D, meanp + row0, rstdp + row0,
                                     dxp + row0 * D, dsh, dsc, n1 - n0, D, buf);
    }
  });

  // Second pass: add the C partials of each group in a fixed order.
  scalar_t* dshp = dshift.data_ptr<scalar_t>();
  scalar_t* dscp = dscale.data_ptr<scalar_t>();
  at::parallel_for(0, BG, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(2 * D);
    for (int64_t bg = begin; bg < end; ++bg) {
      const acc_t* p = partial.data() + (bg * C * 2) * D;
      std::copy(p, p + 2 * D, acc.begin());
      for (int64_t c = 1; c < C; ++c) {
        p += 2 * D;
        for (int64_t d = 0; d < 2 * D; ++d) acc[d] += p[d];
      }
      for (int64_t d = 0; d < D; ++d) {
        dshp[bg * D + d] = static_cast<scalar_t>(acc[d]);
        dscp[bg * D + d] = static_cast<scalar_t>(acc[D + d]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                  const at::Tensor& scale, const at::Tensor& mean,
                                                                  const at::Tensor& rstd, int64_t groups) {
  const char* op = "dit4dit::adaln_modulate_bwd";
  check_cpu_tensor(op, "grad_y", grad_y);
  check_cpu_tensor(op, "x", x);
  check_cpu_tensor(op, "scale", scale);
  check_cpu_tensor(op, "mean", mean);
  check_cpu_tensor(op, "rstd", rstd);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", dt);
  check_same_dtype(op, "grad_y", grad_y, "x", x);
  check_same_dtype(op, "scale", scale, "x", x);
  TORCH_CHECK(mean.scalar_type() == stats_dtype(dt) && rstd.scalar_type() == stats_dtype(dt), op,
              ": mean and rstd must be ", stats_dtype(dt), " for ", dt, " inputs (as returned by the forward), got ",
              mean.scalar_type(), " and ", rstd.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, N, D), got ", shape_str(x));
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y ", shape_str(grad_y), " must have the shape of x ",
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

  at::Tensor dx = at::empty_like(x);
  at::Tensor dshift = at::empty_like(scale);
  at::Tensor dscale = at::empty_like(scale);
  if (B * N == 0) {
    dshift.zero_();
    dscale.zero_();
    return {dx, dshift, dscale};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "adaln_modulate_bwd_cpu", [&] {
    adaln_bwd_impl<scalar_t>(grad_y, x, scale, mean, rstd, dx, dshift, dscale);
  });
  return {dx, dshift, dscale};
}

}  // namespace cpu
}  // namespace dit4dit
