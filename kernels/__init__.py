"""Fused adaLN modulation (alone, or after a gated residual), the fused q/k RMSNorm + RoPE and
fused attention as registered torch ops (namespace `dit4dit`).

The C++ extension `kernels._C` (built with `python setup.py build_ext --inplace`) defines
the op schemas and their CPU kernels (and CUDA kernels when built with CUDA). This module

- loads the extension if it is present (`available()`, `load_error()`),
- registers fake (meta) kernels, so the ops trace under `torch.compile`, and autograd
  (the backward of each forward op calls its `*_bwd` op),
- exposes typed wrappers, `adaln_modulate(x, shift, scale, eps)`,
  `residual_modulate(x, y, gate, shift, scale, eps)`, `qk_norm_rope(x, weight, cos, sin, eps,
  interleaved)` and `attention(q, k, v)`, which validate
  shapes with clear errors and make inputs contiguous,
- and re-exports the pure-PyTorch references of kernels/reference.py as
  `reference_adaln_modulate`, `reference_residual_modulate`, `reference_qk_norm_rope` and
  `reference_attention`: one body
  per op, which dit4dit.py's
  fallback (kernels/dispatch.py) runs and the tests and bench/ops.py compare with.

Ops (all shapes are (batch, ...), statistics float32, float64 for float64 inputs):
    dit4dit::adaln_modulate_fwd(x (B,N,D), shift (B,G,D), scale (B,G,D), eps) -> (y, mean (B,N), rstd (B,N))
    dit4dit::adaln_modulate_bwd(grad_y, x, scale, mean, rstd, groups) -> (grad_x, grad_shift, grad_scale)
    dit4dit::residual_modulate_fwd(x (B,N,D), y (B,N,D), gate, shift, scale (B,G,D), eps) -> (x_new, h, mean, rstd)
    dit4dit::residual_modulate_bwd(grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd)
        -> (grad_x, grad_y, grad_gate, grad_shift, grad_scale)
    dit4dit::qk_norm_rope_fwd(x (B,nh,N,hd), weight (hd), cos (N,hd/2), sin (N,hd/2), eps, interleaved)
        -> (y, rstd (B,nh,N))            (weight, cos, sin, rstd in the statistics dtype)
    dit4dit::qk_norm_rope_bwd(grad_y, x, weight, cos, sin, rstd, interleaved) -> (grad_x, grad_weight)
    dit4dit::attention_fwd(q (B,nh,Lq,hd), k (B,nh,Lk,hd), v (B,nh,Lk,hd)) -> (o, lse (B,nh,Lq))
    dit4dit::attention_bwd(grad_o, q, k, v, o, lse) -> (grad_q, grad_k, grad_v)
"""
from __future__ import annotations

import torch

from .reference import adaln_modulate as reference_adaln_modulate
from .reference import attention as reference_attention
from .reference import qk_norm_rope as reference_qk_norm_rope
from .reference import residual_modulate as reference_residual_modulate
from .reference import compute_dtype as _stats_dtype  # the ops' statistics follow the same rule

__all__ = [
    "available",
    "load_error",
    "adaln_modulate",
    "residual_modulate",
    "qk_norm_rope",
    "attention",
    "reference_adaln_modulate",
    "reference_residual_modulate",
    "reference_qk_norm_rope",
    "reference_attention",
]

BUILD_HINT = "build it with `python setup.py build_ext --inplace` from the repository root"

_LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the shared object registers the ops)
except (ImportError, OSError) as exc:  # not built, or built against another torch (undefined symbol)
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

# The ops this package registers fakes and autograd for. An extension built from older sources
# (the repository updated, the build not) lacks some: treat it as not built, with a clear reason,
# so the PyTorch fallback still works and DIT4DIT_KERNELS=1 says what to do.
OPS = ("adaln_modulate_fwd", "adaln_modulate_bwd", "residual_modulate_fwd", "residual_modulate_bwd",
       "qk_norm_rope_fwd", "qk_norm_rope_bwd", "attention_fwd", "attention_bwd")
if _LOAD_ERROR is None:
    _missing = [name for name in OPS if not hasattr(torch.ops.dit4dit, name)]
    if _missing:
        _LOAD_ERROR = (f"kernels/_C was built from older sources: it lacks the op(s) {', '.join(_missing)}; "
                       f"rebuild it")


def available() -> bool:
    """True when the compiled extension `kernels._C` is loaded and its ops are registered."""
    return _LOAD_ERROR is None


def load_error() -> str | None:
    """Why `kernels._C` could not be loaded (None when it was loaded)."""
    return _LOAD_ERROR


def _require_extension() -> None:
    if not available():
        raise RuntimeError(f"the dit4dit kernels extension kernels._C is not available ({_LOAD_ERROR}); {BUILD_HINT}")


# ----------------------------------------------------------------------------------------
# argument checks of the wrappers (ValueError naming the argument)

def _check_adaln_args(x, shift, scale, op="adaln_modulate", extra=()) -> None:
    """x (B, N, D), shift/scale (B, G, D); `extra` holds residual_modulate's (name, tensor, like)
    pairs: y must have the shape of x, gate that of shift."""
    named = (("x", x), ("shift", shift), ("scale", scale)) + tuple((name, t) for name, t, _ in extra)
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have shape (B, N, D), got {tuple(x.shape)}")
    if shift.dim() != 3:
        raise ValueError(f"{op}: shift must have shape (B, G, D), got {tuple(shift.shape)}")
    if scale.shape != shift.shape:
        raise ValueError(f"{op}: scale {tuple(scale.shape)} must have the shape of shift {tuple(shift.shape)}")
    for name, t, like in extra:
        ref = x if like == "x" else shift
        if t.shape != ref.shape:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must have the shape of {like} {tuple(ref.shape)}")
    B, N, D = x.shape
    if shift.shape[0] != B or shift.shape[2] != D:
        raise ValueError(f"{op}: shift/scale {tuple(shift.shape)} must be (B, G, D) = ({B}, G, {D}) "
                         f"to match x {tuple(x.shape)}")
    G = shift.shape[1]
    if G < 1 or N % G != 0:
        raise ValueError(f"{op}: the N = {N} tokens of x must split into G = {G} equal groups (N % G == 0)")
    if D < 1:
        raise ValueError(f"{op}: x must have a feature dimension D >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    names = ", ".join(name for name, _ in named[:-1]) + " and " + named[-1][0]
    if any(t.dtype != x.dtype for _, t in named):
        raise ValueError(f"{op}: {names} must share one dtype, got {', '.join(str(t.dtype) for _, t in named)}")
    if any(t.device != x.device for _, t in named):
        raise ValueError(f"{op}: {names} must be on one device, got {', '.join(str(t.device) for _, t in named)}")


def _check_qk_norm_rope_args(x, weight, cos, sin) -> None:
    op = "qk_norm_rope"
    for name, t in (("x", x), ("weight", weight), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must have shape (B, nh, N, hd), got {tuple(x.shape)}")
    N, hd = x.shape[2], x.shape[3]
    if hd < 2 or hd % 2:
        raise ValueError(f"{op}: the head dim hd of x {tuple(x.shape)} must be even and >= 2 (RoPE rotates pairs)")
    if weight.shape != (hd,):
        raise ValueError(f"{op}: weight {tuple(weight.shape)} must be (hd,) = ({hd},)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (N, hd // 2):
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must be (N, hd/2) = ({N}, {hd // 2}) for x {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    acc = _stats_dtype(x.dtype)
    if any(t.dtype != acc for t in (weight, cos, sin)):
        raise ValueError(f"{op}: weight, cos and sin must be {acc} for {x.dtype} x (the statistics dtype), got "
                         f"{weight.dtype}, {cos.dtype}, {sin.dtype}")
    if any(t.device != x.device for t in (weight, cos, sin)):
        raise ValueError(f"{op}: x, weight, cos and sin must be on one device, got "
                         f"{x.device}, {weight.device}, {cos.device}, {sin.device}")


def _check_attention_args(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"attention: q must have shape (B, nh, Lq, hd), got {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"attention: k must have shape (B, nh, Lk, hd), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"attention: v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, heads and "
                         f"head dim (B, nh, *, hd)")
    if q.shape[3] < 1:
        raise ValueError(f"attention: head dim must be >= 1, got q {tuple(q.shape)}")
    if k.shape[2] < 1:
        raise ValueError(f"attention: k and v need at least one key (Lk >= 1), got k {tuple(k.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"attention: q must be a floating-point tensor, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


# ----------------------------------------------------------------------------------------
# fake kernels and autograd (only when the ops exist)

if available():

    @torch.library.register_fake("dit4dit::adaln_modulate_fwd")
    def _adaln_modulate_fwd_fake(x, shift, scale, eps):
        torch._check(x.dim() == 3 and shift.dim() == 3 and scale.shape == shift.shape,
                     lambda: "adaln_modulate_fwd: x must be (B, N, D) and shift/scale (B, G, D)")
        B, N, D = x.shape
        stats = x.new_empty((B, N), dtype=_stats_dtype(x.dtype))
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake("dit4dit::adaln_modulate_bwd")
    def _adaln_modulate_bwd_fake(grad_y, x, scale, mean, rstd, groups):
        torch._check(grad_y.shape == x.shape, lambda: "adaln_modulate_bwd: grad_y must have the shape of x")
        return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)

    @torch.library.register_fake("dit4dit::residual_modulate_fwd")
    def _residual_modulate_fwd_fake(x, y, gate, shift, scale, eps):
        torch._check(x.dim() == 3 and y.shape == x.shape and shift.dim() == 3 and gate.shape == shift.shape
                     and scale.shape == shift.shape,
                     lambda: "residual_modulate_fwd: x, y must be (B, N, D) and gate/shift/scale (B, G, D)")
        B, N, D = x.shape
        stats = x.new_empty((B, N), dtype=_stats_dtype(x.dtype))
        return torch.empty_like(x), torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake("dit4dit::residual_modulate_bwd")
    def _residual_modulate_bwd_fake(grad_x_new, grad_h, x_new, y, gate, scale, mean, rstd):
        torch._check(grad_h.shape == x_new.shape and grad_x_new.shape == x_new.shape,
                     lambda: "residual_modulate_bwd: grad_x_new and grad_h must have the shape of x_new")
        return (torch.empty_like(x_new), torch.empty_like(x_new), torch.empty_like(scale), torch.empty_like(scale),
                torch.empty_like(scale))

    @torch.library.register_fake("dit4dit::qk_norm_rope_fwd")
    def _qk_norm_rope_fwd_fake(x, weight, cos, sin, eps, interleaved):
        torch._check(x.dim() == 4, lambda: "qk_norm_rope_fwd: x must be (B, nh, N, hd)")
        return torch.empty_like(x), x.new_empty(x.shape[:3], dtype=_stats_dtype(x.dtype))

    @torch.library.register_fake("dit4dit::qk_norm_rope_bwd")
    def _qk_norm_rope_bwd_fake(grad_y, x, weight, cos, sin, rstd, interleaved):
        torch._check(grad_y.shape == x.shape, lambda: "qk_norm_rope_bwd: grad_y must have the shape of x")
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake("dit4dit::attention_fwd")
    def _attention_fwd_fake(q, k, v):
        torch._check(q.dim() == 4 and k.dim() == 4 and v.shape == k.shape,
                     lambda: "attention_fwd: q must be (B, nh, Lq, hd) and k, v (B, nh, Lk, hd)")
        B, nh, Lq, _ = q.shape
        return torch.empty_like(q), q.new_empty((B, nh, Lq), dtype=_stats_dtype(q.dtype))

    @torch.library.register_fake("dit4dit::attention_bwd")
    def _attention_bwd_fake(grad_o, q, k, v, o, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _adaln_setup_context(ctx, inputs, output):
        x, shift, scale, eps = inputs
        _, mean, rstd = output
        ctx.groups = shift.shape[1]
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def _adaln_backward(ctx, grad_y, grad_mean, grad_rstd):
        x, scale, mean, rstd = ctx.saved_tensors
        grad_x, grad_shift, grad_scale = torch.ops.dit4dit.adaln_modulate_bwd(
            grad_y.contiguous(), x, scale, mean, rstd, ctx.groups)
        return grad_x, grad_shift, grad_scale, None

    torch.library.register_autograd("dit4dit::adaln_modulate_fwd", _adaln_backward,
                                    setup_context=_adaln_setup_context)

    def _residual_setup_context(ctx, inputs, output):
        x, y, gate, shift, scale, eps = inputs
        x_new, _, mean, rstd = output
        ctx.save_for_backward(x_new, y, gate, scale, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def _residual_backward(ctx, grad_x_new, grad_h, grad_mean, grad_rstd):
        x_new, y, gate, scale, mean, rstd = ctx.saved_tensors
        grad_x, grad_y, grad_gate, grad_shift, grad_scale = torch.ops.dit4dit.residual_modulate_bwd(
            grad_x_new.contiguous(), grad_h.contiguous(), x_new, y, gate, scale, mean, rstd)
        return grad_x, grad_y, grad_gate, grad_shift, grad_scale, None

    torch.library.register_autograd("dit4dit::residual_modulate_fwd", _residual_backward,
                                    setup_context=_residual_setup_context)

    def _qk_norm_rope_setup_context(ctx, inputs, output):
        x, weight, cos, sin, eps, interleaved = inputs
        _, rstd = output
        ctx.interleaved = interleaved
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        ctx.mark_non_differentiable(rstd)

    def _qk_norm_rope_backward(ctx, grad_y, grad_rstd):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        grad_x, grad_weight = torch.ops.dit4dit.qk_norm_rope_bwd(grad_y.contiguous(), x, weight, cos, sin, rstd,
                                                                 ctx.interleaved)
        return grad_x, grad_weight, None, None, None, None

    torch.library.register_autograd("dit4dit::qk_norm_rope_fwd", _qk_norm_rope_backward,
                                    setup_context=_qk_norm_rope_setup_context)

    def _attention_setup_context(ctx, inputs, output):
        q, k, v = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)

    def _attention_backward(ctx, grad_o, grad_lse):
        q, k, v, o, lse = ctx.saved_tensors
        return torch.ops.dit4dit.attention_bwd(grad_o.contiguous(), q, k, v, o, lse)

    torch.library.register_autograd("dit4dit::attention_fwd", _attention_backward,
                                    setup_context=_attention_setup_context)


# ----------------------------------------------------------------------------------------
# public wrappers

def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused LayerNorm (no affine, statistics in float32) + per-group modulation.

    x (B, N, D); shift, scale (B, G, D), N % G == 0, tokens grouped contiguously
    (G = 1: one modulation per sample; G = T: one per frame). Returns
    y = LayerNorm(x) * (1 + scale[g]) + shift[g], shape (B, N, D). Differentiable in
    x, shift and scale."""
    _check_adaln_args(x, shift, scale)
    _require_extension()
    y, _, _ = torch.ops.dit4dit.adaln_modulate_fwd(x.contiguous(), shift.contiguous(), scale.contiguous(),
                                                  float(eps))
    return y


def residual_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                      scale: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """A sublayer's gated residual folded into the next sublayer's adaLN, in one pass over memory:
    x_new = x + gate[g] * y and h = LayerNorm(x_new) * (1 + scale[g]) + shift[g] (LayerNorm
    without affine, statistics in float32).

    x, y (B, N, D); gate, shift, scale (B, G, D), N % G == 0, tokens grouped contiguously as in
    `adaln_modulate`. Returns (x_new, h), both (B, N, D); h is computed from x_new as returned
    (rounded to x's dtype). Differentiable in x, y, gate, shift and scale."""
    _check_adaln_args(x, shift, scale, op="residual_modulate", extra=(("y", y, "x"), ("gate", gate, "shift")))
    _require_extension()
    x_new, h, _, _ = torch.ops.dit4dit.residual_modulate_fwd(x.contiguous(), y.contiguous(), gate.contiguous(),
                                                             shift.contiguous(), scale.contiguous(), float(eps))
    return x_new, h


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6,
                 interleaved: bool = True) -> torch.Tensor:
    """Fused per-head RMSNorm with gain + rotary embedding, one pass per row of hd values:
    y = RoPE(x * rsqrt(mean(x^2) + eps) * weight), channel pairs (2i, 2i+1) when interleaved
    (the toy presets), else (i, i + hd/2) (Cosmos, the paper preset).

    x (B, nh, N, hd), hd even; weight (hd,); cos, sin (N, hd/2), the angle of pair i at token n;
    weight, cos and sin in float32 (float64 for float64 x). Returns (B, nh, N, hd) in x's dtype.
    Differentiable in x and weight (the rotation tables are constants)."""
    _check_qk_norm_rope_args(x, weight, cos, sin)
    _require_extension()
    y, _ = torch.ops.dit4dit.qk_norm_rope_fwd(x.contiguous(), weight.contiguous(), cos.contiguous(),
                                              sin.contiguous(), float(eps), bool(interleaved))
    return y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Fused softmax attention, softmax(q k^T / sqrt(hd)) v, no mask (FlashAttention-2 style:
    no Lq x Lk matrix is stored; the logsumexp is kept for the backward).

    q (B, nh, Lq, hd); k, v (B, nh, Lk, hd), Lq != Lk allowed. Returns (B, nh, Lq, hd).
    Differentiable in q, k and v."""
    _check_attention_args(q, k, v)
    _require_extension()
    o, _ = torch.ops.dit4dit.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous())
    return o
