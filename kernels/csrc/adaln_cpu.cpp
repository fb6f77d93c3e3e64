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
// Forward, per row (one token): the row of D values is read once from memory;
// the mean and the centred second moment are two passes over the row while it
// sits in L1 (two-pass is as cheap as Welford here and exact in the centring);
// a third pass writes y. Rows are spread over threads with at::parallel_for and
// the passes use at::vec::Vectorized.
//
// Backward (LayerNorm paper notation, xhat = (x - mean) * rstd, g = dy * (1 + scale)):
//     dx     = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
//     dshift = sum over the tokens of the group of dy
//     dscale = sum over the tokens of the group of dy * xhat
// The token sums are reduced without races: each group's rows are cut into C
// chunks, every chunk writes its own partial (dshift, dscale) row, and a second
// parallel pass adds the C partials in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "ops.h"

namespace dit4dit {
namespace cpu {
namespace {

using at::vec::Vectorized;

// Rows of `D` values per parallel chunk: about 64K elements, so that small D still
// gives chunks worth a thread.
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1)); }

// Loads n values of a reduced-precision row into an accumulation buffer; for
// float/double the row is used in place and no copy is made.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// Horizontal sum of the lanes of a vector.
template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = acc_t(0);
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

template <typename acc_t>
inline acc_t vec_sum(const acc_t* a, int64_t n) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  V s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 = s0 + V::loadu(a + i);
    s1 = s1 + V::loadu(a + i + W);
  }
  for (; i + W <= n; i += W) s0 = s0 + V::loadu(a + i);
  acc_t s = hsum<acc_t>(s0 + s1);
  for (; i < n; ++i) s += a[i];
  return s;
}

template <typename acc_t>
inline acc_t vec_centred_sq_sum(const acc_t* a, int64_t n, acc_t mean) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const V vm(mean);
  V s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    V d0 = V::loadu(a + i) - vm, d1 = V::loadu(a + i + W) - vm;
    s0 = at::vec::fmadd(d0, d0, s0);
    s1 = at::vec::fmadd(d1, d1, s1);
  }
  for (; i + W <= n; i += W) {
    V d0 = V::loadu(a + i) - vm;
    s0 = at::vec::fmadd(d0, d0, s0);
  }
  acc_t s = hsum<acc_t>(s0 + s1);
  for (; i < n; ++i) s += (a[i] - mean) * (a[i] - mean);
  return s;
}

// ---------------------------------------------------------------------------------
// forward
template <typename scalar_t>
void adaln_fwd_impl(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                    at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), G = shift.size(1);
  const int64_t tokens_per_group = N / G;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* shp = shift.data_ptr<scalar_t>();
  const scalar_t* scp = scale.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t* meanp = mean.data_ptr<acc_t>();
  acc_t* rstdp = rstd.data_ptr<acc_t>();
  const acc_t eps_a = static_cast<acc_t>(eps);

  at::parallel_for(0, B * N, row_grain(D), [&](int64_t begin, int64_t end) {
    // Per-thread rows in the accumulation dtype (only used for reduced dtypes).
    std::vector<acc_t> xbuf, shbuf, scbuf, ybuf;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      xbuf.resize(D); shbuf.resize(D); scbuf.resize(D); ybuf.resize(D);
    }
    int64_t loaded_group = -1;  // (b * G + g) whose shift/scale rows sit in shbuf/scbuf
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row % N, g = n / tokens_per_group;
      const int64_t bg = b * G + g;
      const acc_t* xr = row_as_acc<scalar_t, acc_t>(xp + row * D, D, xbuf.data());
      const acc_t* shr;
      const acc_t* scr;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        shr = shp + bg * D;
        scr = scp + bg * D;
      } else {
        if (bg != loaded_group) {
          at::vec::convert(shp + bg * D, shbuf.data(), D);
          at::vec::convert(scp + bg * D, scbuf.data(), D);
          loaded_group = bg;
        }
        shr = shbuf.data();
        scr = scbuf.data();
      }
      // Statistics: mean, then the centred second moment (row is in L1 now).
      const acc_t mu = vec_sum<acc_t>(xr, D) / static_cast<acc_t>(D);
      const acc_t var = vec_centred_sq_sum<acc_t>(xr, D, mu) / static_cast<acc_t>(D);
      const acc_t rs = acc_t(1) / std::sqrt(var + eps_a);
      meanp[row] = mu;
      rstdp[row] = rs;
      // y = xhat * (1 + scale) + shift, xhat = (x - mean) * rstd.
      acc_t* yr;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        yr = yp + row * D;
      } else {
        yr = ybuf.data();
      }
      const V vmu(mu), vrs(rs), one(acc_t(1));
      int64_t d = 0;
      for (; d + W <= D; d += W) {
        V xhat = (V::loadu(xr + d) - vmu) * vrs;
        V out = at::vec::fmadd(xhat, one + V::loadu(scr + d), V::loadu(shr + d));
        out.store(yr + d);
      }
      for (; d < D; ++d) yr[d] = (xr[d] - mu) * rs * (acc_t(1) + scr[d]) + shr[d];
      if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(yr, yp + row * D, D);
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
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), G = scale.size(1);
  const int64_t rows_per_group = N / G;
  const int64_t BG = B * G;
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
  const acc_t inv_D = acc_t(1) / static_cast<acc_t>(D);

  at::parallel_for(0, BG * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf, dybuf, scbuf, dxbuf;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      xbuf.resize(D); dybuf.resize(D); scbuf.resize(D); dxbuf.resize(D);
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bg = item / C, c = item % C;
      const int64_t b = bg / G, g = bg % G;
      const int64_t n0 = g * rows_per_group + c * rows_per_chunk;
      const int64_t n1 = std::min(g * rows_per_group + rows_per_group, n0 + rows_per_chunk);
      acc_t* dsh = partial.data() + (item * 2) * D;  // this chunk's own partial rows
      acc_t* dsc = dsh + D;
      std::fill(dsh, dsh + 2 * D, acc_t(0));
      const acc_t* scr = row_as_acc<scalar_t, acc_t>(scp + bg * D, D, scbuf.data());
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t row = b * N + n;
        const acc_t* xr = row_as_acc<scalar_t, acc_t>(xp + row * D, D, xbuf.data());
        const acc_t* dyr = row_as_acc<scalar_t, acc_t>(dyp + row * D, D, dybuf.data());
        const acc_t mu = meanp[row], rs = rstdp[row];
        const V vmu(mu), vrs(rs), one(acc_t(1));
        // Pass 1: sum_g = sum(g), sum_gx = sum(g * xhat); accumulate dshift, dscale.
        V s_g(acc_t(0)), s_gx(acc_t(0));
        int64_t d = 0;
        for (; d + W <= D; d += W) {
          V vdy = V::loadu(dyr + d);
          V xhat = (V::loadu(xr + d) - vmu) * vrs;
          V gv = vdy * (one + V::loadu(scr + d));
          s_g = s_g + gv;
          s_gx = at::vec::fmadd(gv, xhat, s_gx);
          (V::loadu(dsh + d) + vdy).store(dsh + d);
          at::vec::fmadd(vdy, xhat, V::loadu(dsc + d)).store(dsc + d);
        }
        acc_t sum_g = hsum<acc_t>(s_g);
        acc_t sum_gx = hsum<acc_t>(s_gx);
        for (; d < D; ++d) {
          const acc_t xhat = (xr[d] - mu) * rs;
          const acc_t gv = dyr[d] * (acc_t(1) + scr[d]);
          sum_g += gv;
          sum_gx += gv * xhat;
          dsh[d] += dyr[d];
          dsc[d] += dyr[d] * xhat;
        }
        // Pass 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
        const acc_t mean_g = sum_g * inv_D, mean_gx = sum_gx * inv_D;
        const V vmg(mean_g), vmgx(mean_gx);
        acc_t* dxr;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          dxr = dxp + row * D;
        } else {
          dxr = dxbuf.data();
        }
        d = 0;
        for (; d + W <= D; d += W) {
          V xhat = (V::loadu(xr + d) - vmu) * vrs;
          V gv = V::loadu(dyr + d) * (one + V::loadu(scr + d));
          (vrs * (gv - vmg - xhat * vmgx)).store(dxr + d);
        }
        for (; d < D; ++d) {
          const acc_t xhat = (xr[d] - mu) * rs;
          const acc_t gv = dyr[d] * (acc_t(1) + scr[d]);
          dxr[d] = rs * (gv - mean_g - xhat * mean_gx);
        }
        if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(dxr, dxp + row * D, D);
      }
    }
  });

  // Second pass: add the C partials of each group in a fixed order.
  scalar_t* dshp = dshift.data_ptr<scalar_t>();
  scalar_t* dscp = dscale.data_ptr<scalar_t>();
  at::parallel_for(0, BG, std::max<int64_t>(1, 4096 / D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(2 * D);
    for (int64_t bg = begin; bg < end; ++bg) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* p = partial.data() + ((bg * C + c) * 2) * D;
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
