// CPU kernels of dit4dit::qk_norm_rope_fwd / qk_norm_rope_bwd: the per-head RMSNorm of
// q or k with its gain, followed by the rotary embedding (RoPE), in one pass per row.
//
//     r  = 1 / sqrt(mean_hd(x^2) + eps)           (one row = one head of one token)
//     xn = x * r * w
//     y_a = xn_a cos[n,i] - xn_b sin[n,i],   y_b = xn_a sin[n,i] + xn_b cos[n,i]
// for every channel pair i = (a, b): interleaved pairs (2i, 2i+1) (complex numbers), or
// "rotate half" pairs (i, i + hd/2) (Cosmos). n is the row's token.
//
// Shapes: x, y, grad_y, grad_x (B, nh, N, hd) with hd even; weight, grad_weight (hd);
// cos, sin (N, hd/2), one angle per pair and token; rstd (B, nh, N).
// Dtypes: x float32, float64, bfloat16 or float16; weight, cos, sin, rstd and grad_weight
// in the statistics dtype (float32, float64 for float64 x), so the rotation tables and the
// gain are never rounded to a narrow dtype. All arithmetic runs in that dtype.
// Limits: CPU, contiguous inputs (the Python wrapper makes them contiguous).
//
// Forward, per row: one 8-lane pass for sum(x^2), one for xn = x * r * w into a row
// buffer, then the pair rotation from the buffer into y. The unfused sequence (rms_norm,
// two casts, chunk/cat or complex views, three multiplies) moves the row through memory
// about eight times.
//
// Backward (xhat = x * r, g = grad_y):
//     dxn   = R^T g            (the rotation by -angle: the transpose of a rotation)
//     dw    = sum over rows of dxn * xhat
//     dxhat = dxn * w,   dx = r * (dxhat - xhat * mean_hd(dxhat * xhat))
// Per row: the inverse rotation into a row buffer, then one pass for the dot product
// and dw's partial row, and one for dx. The rows are cut into C chunks; every chunk owns a
// partial dw row and a second step adds the C partials in a fixed order (deterministic for
// a given thread count).
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

// Rotates the hd/2 channel pairs of `in` into `out` by the angles (c, s); INVERSE rotates by
// minus the angle (the backward's transpose).
template <typename T, bool INVERSE>
inline void rotate_pairs(const T* in, const T* c, const T* s, T* out, int64_t hh, bool interleaved) {
  const int64_t step = interleaved ? 2 : 1;        // a = i * step
  const int64_t other = interleaved ? 1 : hh;      // b = a + other
  for (int64_t i = 0; i < hh; ++i) {
    const int64_t a = i * step, b = a + other;
    const T sn = INVERSE ? -s[i] : s[i];
    const T xa = in[a], xb = in[b];
    out[a] = xa * c[i] - xb * sn;
    out[b] = xa * sn + xb * c[i];
  }
}

// float32 row steps, 8 lanes with a scalar tail (cpu_common.h's v8f).
DIT4DIT_MULTIVERSION
float row_fwd_f32(const float* x, const float* w, const float* c, const float* s, float* buf, float* y, int64_t hd,
                  float eps, bool interleaved) {
  v8f sq8 = splat(0.f);
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    const v8f v = load8(x + d);
    sq8 += v * v;
  }
  float sq = hsum8(sq8);
  for (; d < hd; ++d) sq += x[d] * x[d];
  const float r = 1.f / std::sqrt(sq / static_cast<float>(hd) + eps);
  const v8f r8 = splat(r);
  for (d = 0; d + 8 <= hd; d += 8) store8(buf + d, load8(x + d) * r8 * load8(w + d));
  for (; d < hd; ++d) buf[d] = x[d] * r * w[d];
  rotate_pairs<float, false>(buf, c, s, y, hd / 2, interleaved);
  return r;
}

// dw += dxn * xhat and dx from dxn (already in buf), r and w.
DIT4DIT_MULTIVERSION
void row_bwd_f32(const float* x, const float* w, float r, const float* buf, float* dx, float* dw, int64_t hd) {
  const v8f r8 = splat(r);
  v8f dot8 = splat(0.f);
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8) {
    const v8f xhat = load8(x + d) * r8, dxn = load8(buf + d);
    store8(dw + d, load8(dw + d) + dxn * xhat);
    dot8 += dxn * load8(w + d) * xhat;
  }
  float dot = hsum8(dot8);
  for (; d < hd; ++d) {
    const float xhat = x[d] * r;
    dw[d] += buf[d] * xhat;
    dot += buf[d] * w[d] * xhat;
  }
  const float m = dot / static_cast<float>(hd);
  const v8f m8 = splat(m);
  for (d = 0; d + 8 <= hd; d += 8) {
    const v8f xhat = load8(x + d) * r8;
    store8(dx + d, r8 * (load8(buf + d) * load8(w + d) - xhat * m8));
  }
  for (; d < hd; ++d) dx[d] = r * (buf[d] * w[d] - x[d] * r * m);
}

// The same steps in plain loops (float64).
template <typename T>
T row_fwd(const T* x, const T* w, const T* c, const T* s, T* buf, T* y, int64_t hd, T eps, bool interleaved) {
  T sq = 0;
  for (int64_t d = 0; d < hd; ++d) sq += x[d] * x[d];
  const T r = T(1) / std::sqrt(sq / static_cast<T>(hd) + eps);
  for (int64_t d = 0; d < hd; ++d) buf[d] = x[d] * r * w[d];
  rotate_pairs<T, false>(buf, c, s, y, hd / 2, interleaved);
  return r;
}

template <typename T>
void row_bwd(const T* x, const T* w, T r, const T* buf, T* dx, T* dw, int64_t hd) {
  T dot = 0;
  for (int64_t d = 0; d < hd; ++d) {
    dw[d] += buf[d] * x[d] * r;
    dot += buf[d] * w[d] * x[d] * r;
  }
  const T m = dot / static_cast<T>(hd);
  for (int64_t d = 0; d < hd; ++d) dx[d] = r * (buf[d] * w[d] - x[d] * r * m);
}

// Per-thread row buffers: the rotation's row, and for bfloat16 / float16 the widened in/out rows.
template <typename scalar_t, typename acc_t>
struct RowBuffers {
  std::vector<acc_t> rot, in, grad, out;
  explicit RowBuffers(int64_t hd) : rot(hd) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>)
      for (auto* v : {&in, &grad, &out}) v->resize(hd);
  }
};

template <typename scalar_t, typename acc_t>
acc_t run_row_fwd(const scalar_t* x, const acc_t* w, const acc_t* c, const acc_t* s, scalar_t* y, int64_t hd,
                  acc_t eps, bool interleaved, RowBuffers<scalar_t, acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row_fwd_f32(x, w, c, s, buf.rot.data(), y, hd, eps, interleaved);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    return row_fwd<double>(x, w, c, s, buf.rot.data(), y, hd, eps, interleaved);
  } else {
    at::vec::convert(x, buf.in.data(), hd);
    const float r = row_fwd_f32(buf.in.data(), w, c, s, buf.rot.data(), buf.out.data(), hd, eps, interleaved);
    at::vec::convert(buf.out.data(), y, hd);
    return r;
  }
}

template <typename scalar_t, typename acc_t>
void run_row_bwd(const scalar_t* dy, const scalar_t* x, const acc_t* w, const acc_t* c, const acc_t* s, acc_t r,
                 scalar_t* dx, acc_t* dw, int64_t hd, bool interleaved, RowBuffers<scalar_t, acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    rotate_pairs<acc_t, true>(dy, c, s, buf.rot.data(), hd / 2, interleaved);
    if constexpr (std::is_same_v<scalar_t, float>)
      row_bwd_f32(x, w, r, buf.rot.data(), dx, dw, hd);
    else
      row_bwd<double>(x, w, r, buf.rot.data(), dx, dw, hd);
  } else {
    at::vec::convert(dy, buf.grad.data(), hd);
    at::vec::convert(x, buf.in.data(), hd);
    rotate_pairs<float, true>(buf.grad.data(), c, s, buf.rot.data(), hd / 2, interleaved);
    row_bwd_f32(buf.in.data(), w, r, buf.rot.data(), buf.out.data(), dw, hd);
    at::vec::convert(buf.out.data(), dx, hd);
  }
}

// Checks shared by the forward and the backward: x (B, nh, N, hd) with hd even, weight (hd),
// cos and sin (N, hd/2), the last three in the statistics dtype.
void check_common(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                  const at::Tensor& sin) {
  check_cpu_tensor(op, "x", x);
  check_cpu_tensor(op, "weight", weight);
  check_cpu_tensor(op, "cos", cos);
  check_cpu_tensor(op, "sin", sin);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, float64, bfloat16 or float16, got ", dt);
  const auto acc = stats_dtype(dt);
  TORCH_CHECK(weight.scalar_type() == acc && cos.scalar_type() == acc && sin.scalar_type() == acc, op,
              ": weight, cos and sin must be ", acc, " for ", dt, " x, got ", weight.scalar_type(), ", ",
              cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (B, nh, N, hd), got ", shape_str(x));
  const int64_t N = x.size(2), hd = x.size(3);
  TORCH_CHECK(hd >= 2 && hd % 2 == 0, op, ": the head dim hd of x ", shape_str(x),
              " must be even and >= 2 (RoPE rotates channel pairs)");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hd, op, ": weight ", shape_str(weight), " must be (hd) = (", hd,
              ")");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == N && cos.size(1) == hd / 2, op, ": cos ", shape_str(cos),
              " must be (N, hd/2) = (", N, ", ", hd / 2, ")");
  TORCH_CHECK(sin.sizes() == cos.sizes(), op, ": sin ", shape_str(sin), " must have the shape of cos ",
              shape_str(cos));
}

}  // namespace

// Entry points (declared in ops.h, registered in ops.cpp).
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                    const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                    bool interleaved) {
  const char* op = "dit4dit::qk_norm_rope_fwd";
  check_common(op, x, weight, cos, sin);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(stats_dtype(x.scalar_type())));
  if (x.numel() == 0) return {y, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qk_norm_rope_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t N = x.size(2), hd = x.size(3), hh = hd / 2;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* wp = weight.data_ptr<acc_t>();
    const acc_t* cp = cos.data_ptr<acc_t>();
    const acc_t* sp = sin.data_ptr<acc_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / hd);
    at::parallel_for(0, rstd.numel(), grain, [&](int64_t begin, int64_t end) {
      RowBuffers<scalar_t, acc_t> buf(hd);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row % N;
        rp[row] = run_row_fwd<scalar_t, acc_t>(xp + row * hd, wp, cp + n * hh, sp + n * hh, yp + row * hd, hd,
                                               static_cast<acc_t>(eps), interleaved, buf);
      }
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& cos,
                                                    const at::Tensor& sin, const at::Tensor& rstd,
                                                    bool interleaved) {
  const char* op = "dit4dit::qk_norm_rope_bwd";
  check_common(op, x, weight, cos, sin);
  check_cpu_tensor(op, "grad_y", grad_y);
  check_cpu_tensor(op, "rstd", rstd);
  check_same_dtype(op, "grad_y", grad_y, "x", x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y ", shape_str(grad_y), " must have the shape of x ",
              shape_str(x));
  TORCH_CHECK(rstd.scalar_type() == stats_dtype(x.scalar_type()), op, ": rstd must be ",
              stats_dtype(x.scalar_type()), " (as returned by the forward), got ", rstd.scalar_type());
  TORCH_CHECK(rstd.dim() == 3 && rstd.size(0) == x.size(0) && rstd.size(1) == x.size(1) && rstd.size(2) == x.size(2),
              op, ": rstd ", shape_str(rstd), " must be (B, nh, N) of x ", shape_str(x));
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros_like(weight);
  if (x.numel() == 0) return {dx, dw};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qk_norm_rope_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = rstd.numel(), N = x.size(2), hd = x.size(3), hh = hd / 2;
    // C chunks of rows, about 4 per thread, each with its own partial dw row.
    const int64_t C = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
    const int64_t rows_per_chunk = (rows + C - 1) / C;
    std::vector<acc_t> partial(static_cast<size_t>(C * hd));
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* wp = weight.data_ptr<acc_t>();
    const acc_t* cp = cos.data_ptr<acc_t>();
    const acc_t* sp = sin.data_ptr<acc_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      RowBuffers<scalar_t, acc_t> buf(hd);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        acc_t* dwp = partial.data() + chunk * hd;
        const int64_t row1 = std::min(rows, (chunk + 1) * rows_per_chunk);
        for (int64_t row = chunk * rows_per_chunk; row < row1; ++row) {
          const int64_t n = row % N;
          run_row_bwd<scalar_t, acc_t>(gp + row * hd, xp + row * hd, wp, cp + n * hh, sp + n * hh, rp[row],
                                       dxp + row * hd, dwp, hd, interleaved, buf);
        }
      }
    });
    acc_t* out = dw.data_ptr<acc_t>();  // the C partials, added in chunk order
    for (int64_t chunk = 0; chunk < C; ++chunk)
      for (int64_t d = 0; d < hd; ++d) out[d] += partial[chunk * hd + d];
  });
  return {dx, dw};
}

}  // namespace cpu
}  // namespace dit4dit
