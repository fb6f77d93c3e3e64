"""The pure-PyTorch reference of each fused op: one body per op, used by all three of
- dit4dit.py's fallback when the fused kernels are off (DIT4DIT_KERNELS=0, or not built),
- the tests, which compare the kernels with it (fp32 at tight tolerance; for float16 and
  bfloat16 it computes in float32 and rounds the result, the error bar a kernel must meet),
- the `reference` rows of bench/ops.py.

It imports nothing from the extension, so it works whether or not kernels._C is built. Both
bodies are the fast built-ins (F.layer_norm, F.scaled_dot_product_attention) rather than
explicit math, so the fallback trains at PyTorch's speed; the logsumexp that the attention
tests also check is computed in the tests from the scores; `residual_modulate` is the gated
residual plus `adaln_modulate`, and `qk_norm_rope` the per-head RMSNorm plus the rotary
embedding, each written as the model wrote them before the fusion. The wrappers in
kernels/__init__.py
validate arguments; these bodies do not (the model calls them on every sublayer).
"""
import torch
import torch.nn.functional as F


def compute_dtype(dtype):
    """float64 stays float64; everything else (float32, float16, bfloat16) computes in float32
    (the ops' saved statistics, mean/rstd and logsumexp, use the same rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def adaln_modulate(x, shift, scale, eps=1e-6):
    """LayerNorm without affine over the last dim, statistics in float32 (float64 for float64
    x), then y = xhat * (1 + scale[g]) + shift[g] with token n in group g = n // (N // G).

    x (B, N, D); shift, scale (B, G, D) with N % G == 0. Returns y (B, N, D) in x's dtype."""
    B, N, D = x.shape
    G = shift.shape[1]
    acc = compute_dtype(x.dtype)
    xhat = F.layer_norm(x.to(acc), (D,), eps=eps).view(B, G, N // G, D)  # (B, G, N/G, D)
    y = torch.addcmul(shift.to(acc)[:, :, None], xhat, 1 + scale.to(acc)[:, :, None])  # shift + xhat * (1 + scale)
    return y.view(B, N, D).to(x.dtype)  # (B, N, D)


def residual_modulate(x, y, gate, shift, scale, eps=1e-6):
    """A sublayer's gated residual folded into the next sublayer's adaLN:
    x_new = x + gate[g] * y, then h = adaln_modulate(x_new, shift, scale, eps), token n in group
    g = n // (N // G). x_new is computed in float32 (float64 for float64 x; for float32 inputs
    exactly the eager `x + y * gate`) and rounded once to x's dtype; h is computed from that
    rounded x_new, as the unfused sequence does.

    x, y (B, N, D); gate, shift, scale (B, G, D) with N % G == 0. Returns (x_new, h), both
    (B, N, D) in x's dtype."""
    B, N, D = x.shape
    G = gate.shape[1]
    acc = compute_dtype(x.dtype)
    gated = y.to(acc).view(B, G, N // G, D) * gate.to(acc)[:, :, None]  # (B, G, N/G, D)
    x_new = (x.to(acc) + gated.view(B, N, D)).to(x.dtype)  # (B, N, D)
    return x_new, adaln_modulate(x_new, shift, scale, eps)


def attention(q, k, v):
    """softmax(q k^T / sqrt(hd)) v, no mask, computed in float32 (float64 for float64 q).

    q (B, nh, Lq, hd); k, v (B, nh, Lk, hd). Returns (B, nh, Lq, hd) in q's dtype. Under
    autocast the built-in runs in the autocast dtype, as the rest of the model does."""
    acc = compute_dtype(q.dtype)
    return F.scaled_dot_product_attention(q.to(acc), k.to(acc), v.to(acc)).to(q.dtype)


def qk_norm_rope(x, weight, cos, sin, eps=1e-6, interleaved=True):
    """Per-head RMSNorm with a gain, then the rotary embedding (RoPE) of token n:
    xn = rms_norm(x) * weight (statistics in float32, float64 for float64 x, rounded to x's
    dtype), then pair (a, b) of channels is rotated by angle theta[n, i]:
        y_a = xn_a cos - xn_b sin,  y_b = xn_a sin + xn_b cos.
    interleaved=True pairs channels (2i, 2i+1) (complex numbers, the toy presets); False pairs
    (i, i + hd/2) ("rotate half", Cosmos and the paper preset).

    x (B, nh, N, hd), hd even; weight (hd,); cos, sin (N, hd/2), the per-pair tables, in
    float32 (float64 for float64 x). Returns (B, nh, N, hd) in x's dtype, bit for bit what the
    model's RMSNorm and rotation computed before the fusion (float64 rotations now run in
    float64 in both layouts)."""
    acc = compute_dtype(x.dtype)
    xn = F.rms_norm(x.to(acc), x.shape[-1:], weight.to(acc), eps).to(x.dtype)
    if interleaved:
        xc = torch.view_as_complex(xn.to(acc).unflatten(-1, (-1, 2)).contiguous())  # (B, nh, N, hd/2) complex
        rot = torch.complex(cos.to(acc), sin.to(acc))  # (N, hd/2) e^{i*angle}
        return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)  # (B, nh, N, hd/2, 2) -> (B, nh, N, hd)
    x1, x2 = xn.chunk(2, dim=-1)  # (B, nh, N, hd/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, nh, N, hd)
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (N, hd): i and i + hd/2 share an angle
    return (xn.to(acc) * cos + rotated.to(acc) * sin).to(x.dtype)
