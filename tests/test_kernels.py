"""Tests of the fused ops in kernels/ (CPU kernels of the compiled extension kernels._C).

Ops: adaln_modulate, residual_modulate (the gated residual folded into adaLN), qk_norm_rope
(q/k RMSNorm + RoPE, both pair layouts), attention.
Order (STYLE.md): forward against the explicit-math reference in fp32 at tight tolerance,
gradients, gradcheck in float64, torch.library.opcheck, torch.compile(fullgraph=True);
sizes that are not multiples of the tile sizes (attention forward tiles up to 256 x 512,
backward 128 x 256, fewer columns for large head dims; adaLN vectors of 8 lanes), G = 1 and G > 1, Lq != Lk, non-contiguous
inputs, bad inputs, and attention memory that grows linearly in the sequence length.

The module is skipped when the extension is not built, unless DIT4DIT_KERNELS=1, where a
missing extension is an error."""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import kernels

if not kernels.available():
    if os.environ.get("DIT4DIT_KERNELS") == "1":
        pytest.fail(f"DIT4DIT_KERNELS=1 but kernels._C is not loaded ({kernels.load_error()}); "
                    f"{kernels.BUILD_HINT}", pytrace=False)
    pytest.skip(f"kernels._C is not built ({kernels.load_error()}); {kernels.BUILD_HINT}",
                allow_module_level=True)

OPS = torch.ops.dit4dit
TIGHT = dict(rtol=1e-5, atol=1e-5)


def _adaln_inputs(B, N, D, G, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=dtype) * 2 + 0.5
    shift = torch.randn(B, G, D, generator=g, dtype=dtype)
    scale = torch.randn(B, G, D, generator=g, dtype=dtype) * 0.5
    return [t.requires_grad_(requires_grad) for t in (x, shift, scale)]


def _attn_inputs(B, nh, Lq, Lk, hd, dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, Lq, hd, generator=g, dtype=dtype)
    k = torch.randn(B, nh, Lk, hd, generator=g, dtype=dtype)
    v = torch.randn(B, nh, Lk, hd, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


ADALN_SHAPES = [  # (B, N, D, G)
    (2, 12, 37, 1),
    (2, 12, 37, 3),
    (3, 10, 130, 5),
    (1, 1, 1, 1),
    (2, 64, 512, 4),
]
ATTN_SHAPES = [  # (B, nh, Lq, Lk, hd)
    (2, 3, 70, 70, 33),
    (1, 2, 130, 530, 64),   # partial Q tiles, several partial K/V tiles, Lq != Lk
    (2, 2, 67, 5, 16),      # cross-attention to a few keys
    (1, 1, 1, 1, 1),
    (1, 3, 200, 129, 7),
    (1, 2, 40, 300, 160),   # large head dim: narrower K/V tiles, again partial
]


# ----------------------------------------------------------------------------- adaLN

@pytest.mark.parametrize("B,N,D,G", ADALN_SHAPES)
def test_adaln_forward_matches_reference(B, N, D, G):
    x, shift, scale = _adaln_inputs(B, N, D, G)
    y, mean, rstd = OPS.adaln_modulate_fwd(x, shift, scale, 1e-6)
    torch.testing.assert_close(y, kernels.reference_adaln_modulate(x, shift, scale, 1e-6), **TIGHT)
    var, mu = torch.var_mean(x, dim=-1, unbiased=False)
    torch.testing.assert_close(mean, mu, **TIGHT)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-6), **TIGHT)
    assert mean.dtype == rstd.dtype == torch.float32


def test_adaln_matches_layer_norm_per_group():
    """Independent oracle: F.layer_norm, and group g modulates exactly tokens [g*N/G, (g+1)*N/G)."""
    B, N, D, G = 2, 9, 20, 3
    x, shift, scale = _adaln_inputs(B, N, D, G)
    y = kernels.adaln_modulate(x, shift, scale, eps=1e-5)
    ln = torch.nn.functional.layer_norm(x, (D,), eps=1e-5)
    for g in range(G):
        rows = slice(g * N // G, (g + 1) * N // G)
        torch.testing.assert_close(y[:, rows], ln[:, rows] * (1 + scale[:, g:g + 1]) + shift[:, g:g + 1], **TIGHT)


@pytest.mark.parametrize("B,N,D,G", ADALN_SHAPES)
def test_adaln_grads_match_reference(B, N, D, G):
    x, shift, scale = _adaln_inputs(B, N, D, G, requires_grad=True)
    y = kernels.adaln_modulate(x, shift, scale)
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, shift, scale), grad_y)
    want = torch.autograd.grad(kernels.reference_adaln_modulate(x, shift, scale), (x, shift, scale), grad_y)
    for name, a, b in zip(("x", "shift", "scale"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m: f"grad of {name}: {m}")


def test_adaln_gradcheck_float64():
    for G in (1, 3):
        x, shift, scale = _adaln_inputs(2, 6, 5, G, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, c: kernels.adaln_modulate(a, b, c, 1e-6), (x, shift, scale))


def test_adaln_float64_statistics_are_float64():
    x, shift, scale = _adaln_inputs(2, 4, 9, 2, dtype=torch.float64)
    y, mean, rstd = OPS.adaln_modulate_fwd(x, shift, scale, 1e-6)
    assert mean.dtype == rstd.dtype == torch.float64
    torch.testing.assert_close(y, kernels.reference_adaln_modulate(x, shift, scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adaln_low_precision_against_fp32_truth(dtype):
    """Low precision is judged against the fp32 result on the same (rounded) inputs:
    the kernel's error may be at most 2x the error of PyTorch's own same-dtype computation."""
    x, shift, scale = _adaln_inputs(2, 24, 100, 3, dtype=dtype)
    truth = kernels.reference_adaln_modulate(x.float(), shift.float(), scale.float())
    ours = kernels.adaln_modulate(x, shift, scale).float()
    d = x.shape[-1]
    torch_same_dtype = (torch.nn.functional.layer_norm(x, (d,), eps=1e-6).reshape(2, 3, 8, d)
                        * (1 + scale[:, :, None]) + shift[:, :, None]).reshape(x.shape).float()
    assert (ours - truth).abs().max() <= 2 * (torch_same_dtype - truth).abs().max() + 1e-6


def _outputs_and_grads(fn, inputs, grad_outs):
    """(outputs of fn(*inputs, 1e-6)..., gradients of every input) for incoming gradients grad_outs."""
    out = fn(*inputs, 1e-6)
    outs = out if isinstance(out, tuple) else (out,)
    return (*outs, *torch.autograd.grad(outs, inputs, grad_outs))


def _float64_truth(reference, inputs, grad_outs):
    """The reference in float64 on the same values: outputs and the gradients of every input."""
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    return _outputs_and_grads(reference, inputs64, [g.double() for g in grad_outs])


def _with_grads(op, inputs, grad_outs, threads):
    """(outputs, gradients of every input) of the kernel op, run with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _outputs_and_grads(op, inputs, grad_outs)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,N,D,G", [
    (2, 2400, 40, 8),    # 4800 rows: several parallel chunks, whose ends fall inside groups
    (4, 1200, 389, 6),   # the video DiT's shape with D neither a multiple of 8 nor of 32
    (3, 96, 35, 1),      # one group per sample, vector loop plus a 3-wide tail
    (2, 12, 7, 12),      # one token per group, D below one vector
])
def test_adaln_float32_against_float64_truth(B, N, D, G, threads):
    """float32 kernel (forward, and every gradient) against the reference in float64, at
    every group count the model uses, with 1 and 2 threads (the partial-sum chunks of the
    backward change with the thread count)."""
    x, shift, scale = _adaln_inputs(B, N, D, G, requires_grad=True)
    grad_y = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1))
    got = _with_grads(kernels.adaln_modulate, (x, shift, scale), (grad_y,), threads)
    want = _float64_truth(kernels.reference_adaln_modulate, (x, shift, scale), (grad_y,))
    for name, a, b in zip(("y", "grad x", "grad shift", "grad scale"), got, want):
        # group sums run over up to N/G = 300 tokens: their float32 rounding grows with the count
        tol = dict(rtol=1e-5, atol=1e-5 * max(1, N // G) ** 0.5)
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{name}: {m}")


def test_adaln_grad_x_is_exactly_zero_at_D1():
    """At D = 1, xhat = 0 and LayerNorm's output is constant: grad_x is exactly 0, not the
    rounding error of dy * (1 + scale) times rstd = 1 / sqrt(eps) = 1000."""
    x, shift, scale = _adaln_inputs(2, 6, 1, 3, requires_grad=True)
    y = kernels.adaln_modulate(x, shift, scale, 1e-6)
    (gx,) = torch.autograd.grad(y, x, torch.randn(2, 6, 1) * 3)
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adaln_low_precision_grads_against_float64_truth(dtype, threads):
    """bfloat16 / float16: every gradient within a few roundings of the dtype (the kernel
    widens to float32 and rounds each output once) of the float64 truth on the same values."""
    B, N, D, G = 2, 480, 100, 6  # 960 rows: with 2 threads each thread widens its own rows
    x, shift, scale = _adaln_inputs(B, N, D, G, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _with_grads(kernels.adaln_modulate, (x, shift, scale), (grad_y,), threads)
    want = _float64_truth(kernels.reference_adaln_modulate, (x, shift, scale), (grad_y,))
    ulp = torch.finfo(dtype).eps
    for name, a, b in zip(("y", "grad x", "grad shift", "grad scale"), got, want):
        assert a.dtype == dtype
        err = (a.double() - b).abs()
        assert (err <= 2 * ulp * b.abs() + 2 * ulp * b.abs().max()).all(), f"{name}: max error {err.max():.3g}"


def test_adaln_non_contiguous_inputs():
    x, shift, scale = _adaln_inputs(3, 16, 40, 4)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous layout
    sh = shift.repeat_interleave(2, dim=2)[:, :, ::2]
    sc = scale.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (xt.is_contiguous() or sh.is_contiguous() or sc.is_contiguous())
    torch.testing.assert_close(kernels.adaln_modulate(xt, sh, sc), kernels.reference_adaln_modulate(x, shift, scale),
                               **TIGHT)
    # non-contiguous incoming gradient
    xr = x.clone().requires_grad_()
    y = kernels.adaln_modulate(xr, shift, scale)
    gy = torch.randn(y.shape[2], y.shape[1], y.shape[0]).permute(2, 1, 0)
    (gx,) = torch.autograd.grad(y, xr, gy)
    xr2 = x.clone().requires_grad_()
    (gx_ref,) = torch.autograd.grad(kernels.reference_adaln_modulate(xr2, shift, scale), xr2, gy)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=2e-5)


def test_adaln_empty_batch():
    x, shift, scale = _adaln_inputs(0, 4, 8, 2)
    assert kernels.adaln_modulate(x, shift, scale).shape == (0, 4, 8)


# ----------------------------------------------------------------------------- residual_modulate

def _residual_inputs(B, N, D, G, dtype=torch.float32, requires_grad=False, seed=0):
    """(x, y, gate, shift, scale): the residual stream, a sublayer's output and the modulation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g) * 2 + 0.5
    y = torch.randn(B, N, D, generator=g)
    gate = torch.randn(B, G, D, generator=g)
    shift = torch.randn(B, G, D, generator=g)
    scale = torch.randn(B, G, D, generator=g) * 0.5
    return [t.to(dtype).requires_grad_(requires_grad) for t in (x, y, gate, shift, scale)]


RESIDUAL_SHAPES = [  # (B, N, D, G): G = 1 and G > 1, D neither a multiple of 16 nor of 32
    (2, 12, 37, 1),
    (2, 12, 37, 3),
    (3, 10, 130, 5),
    (1, 1, 1, 1),
    (2, 64, 512, 4),
]
RESIDUAL_GRADS = ("grad x", "grad y", "grad gate", "grad shift", "grad scale")


@pytest.mark.parametrize("B,N,D,G", RESIDUAL_SHAPES)
def test_residual_modulate_forward_matches_reference(B, N, D, G):
    x, y, gate, shift, scale = _residual_inputs(B, N, D, G)
    x_new, h, mean, rstd = OPS.residual_modulate_fwd(x, y, gate, shift, scale, 1e-6)
    want_x_new, want_h = kernels.reference_residual_modulate(x, y, gate, shift, scale, 1e-6)
    torch.testing.assert_close(x_new, want_x_new, **TIGHT)
    torch.testing.assert_close(h, want_h, **TIGHT)
    var, mu = torch.var_mean(x_new, dim=-1, unbiased=False)  # the statistics are x_new's
    torch.testing.assert_close(mean, mu, **TIGHT)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-6), **TIGHT)


def test_residual_modulate_equals_the_unfused_sequence():
    """Independent oracle: the eager gated residual per group, then the adaLN kernel on its result."""
    B, N, D, G = 2, 9, 20, 3
    x, y, gate, shift, scale = _residual_inputs(B, N, D, G)
    x_new, h = kernels.residual_modulate(x, y, gate, shift, scale, eps=1e-5)
    for g in range(G):
        rows = slice(g * N // G, (g + 1) * N // G)
        torch.testing.assert_close(x_new[:, rows], x[:, rows] + gate[:, g:g + 1] * y[:, rows], **TIGHT)
    torch.testing.assert_close(h, kernels.adaln_modulate(x_new, shift, scale, eps=1e-5), **TIGHT)


@pytest.mark.parametrize("B,N,D,G", RESIDUAL_SHAPES)
def test_residual_modulate_grads_match_reference(B, N, D, G):
    inputs = _residual_inputs(B, N, D, G, requires_grad=True)
    grad_outs = [torch.randn(B, N, D, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    got = _outputs_and_grads(kernels.residual_modulate, inputs, grad_outs)[2:]
    want = _outputs_and_grads(kernels.reference_residual_modulate, inputs, grad_outs)[2:]
    for name, a, b in zip(RESIDUAL_GRADS, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_residual_modulate_gradcheck_float64():
    for G in (1, 3):
        inputs = _residual_inputs(2, 6, 5, G, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda *t: kernels.residual_modulate(*t, 1e-6), inputs)


def test_residual_modulate_float64_matches_reference():
    x, y, gate, shift, scale = _residual_inputs(2, 4, 9, 2, dtype=torch.float64)
    x_new, h, mean, rstd = OPS.residual_modulate_fwd(x, y, gate, shift, scale, 1e-6)
    assert mean.dtype == rstd.dtype == torch.float64
    for a, b in zip((x_new, h), kernels.reference_residual_modulate(x, y, gate, shift, scale)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,N,D,G", [
    (2, 2400, 40, 8),    # several parallel chunks, whose ends fall inside groups
    (4, 1200, 389, 6),   # the video DiT's shape with D neither a multiple of 8 nor of 32
    (3, 96, 35, 1),      # one group per sample
])
def test_residual_modulate_float32_against_float64_truth(B, N, D, G, threads):
    """Both outputs and every gradient against the reference in float64, with 1 and 2 threads
    (the partial sums of grad gate, shift and scale are cut into chunks by thread count)."""
    inputs = _residual_inputs(B, N, D, G, requires_grad=True)
    grad_outs = [torch.randn(B, N, D, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    got = _with_grads(kernels.residual_modulate, inputs, grad_outs, threads)
    want = _float64_truth(kernels.reference_residual_modulate, inputs, grad_outs)
    for name, a, b in zip(("x_new", "h") + RESIDUAL_GRADS, got, want):
        tol = dict(rtol=1e-5, atol=1e-5 * max(1, N // G) ** 0.5)  # group sums over up to N/G tokens
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_modulate_low_precision_against_float64_truth(dtype, threads):
    """bfloat16 / float16: x_new rounded once, h from the rounded x_new, gradients accumulated in
    float32 and rounded once: every result within a few roundings of the float64 truth."""
    B, N, D, G = 2, 480, 100, 6
    inputs = _residual_inputs(B, N, D, G, dtype=dtype, requires_grad=True)
    grad_outs = [torch.randn(B, N, D, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (1, 2)]
    got = _with_grads(kernels.residual_modulate, inputs, grad_outs, threads)
    want = _float64_truth(kernels.reference_residual_modulate, inputs, grad_outs)
    ulp = torch.finfo(dtype).eps
    for name, a, b in zip(("x_new", "h") + RESIDUAL_GRADS, got, want):
        assert a.dtype == dtype
        err = (a.double() - b).abs()
        assert (err <= 2 * ulp * b.abs() + 2 * ulp * b.abs().max()).all(), f"{name}: max error {err.max():.3g}"


def test_residual_modulate_one_feature():
    """At D = 1 LayerNorm's output is 0, so h = shift and the gradient of x is exactly the
    gradient that reaches x_new directly (LayerNorm adds exactly 0)."""
    inputs = _residual_inputs(2, 6, 1, 3, requires_grad=True)
    grad_x_new, grad_h = torch.randn(2, 6, 1) * 3, torch.randn(2, 6, 1) * 3
    x_new, h, grad_x, grad_y, *_ = _outputs_and_grads(kernels.residual_modulate, inputs, (grad_x_new, grad_h))
    assert torch.equal(h, inputs[3].detach().repeat_interleave(2, dim=1))
    assert torch.equal(grad_x, grad_x_new)
    assert torch.equal(grad_y, grad_x_new * inputs[2].detach().repeat_interleave(2, dim=1))


def test_residual_modulate_non_contiguous_inputs_and_empty_batch():
    x, y, gate, shift, scale = _residual_inputs(3, 16, 40, 4)
    xt, yt = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (x, y))
    gt = gate.repeat_interleave(2, dim=2)[:, :, ::2]
    assert not (xt.is_contiguous() or yt.is_contiguous() or gt.is_contiguous())
    for a, b in zip(kernels.residual_modulate(xt, yt, gt, shift, scale),
                    kernels.reference_residual_modulate(x, y, gate, shift, scale)):
        torch.testing.assert_close(a, b, **TIGHT)
    x_new, h = kernels.residual_modulate(*_residual_inputs(0, 4, 8, 2))
    assert x_new.shape == h.shape == (0, 4, 8)


# ----------------------------------------------------------------------------- qk_norm_rope

def _rope_tables(N, hh, dtype=torch.float32, seed=1):
    """cos, sin (N, hh) of random angles (any angle table is a valid rotation)."""
    angle = torch.rand(N, hh, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 20 - 10
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _qk_inputs(B, nh, N, hd, dtype=torch.float32, requires_grad=False, seed=0):
    """x (B, nh, N, hd) with rows of different scales, weight (hd), cos, sin (N, hd/2)."""
    acc = kernels.reference.compute_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, nh, N, hd, generator=g) * torch.rand(B, nh, N, 1, generator=g) * 3).to(dtype)
    weight = (1 + 0.5 * torch.randn(hd, generator=g)).to(acc)
    cos, sin = _rope_tables(N, hd // 2, acc, seed + 1)
    return x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), cos, sin


QK_SHAPES = [  # (B, nh, N, hd)
    (2, 4, 48, 24),     # the toy video DiT's self-attention (batch 2)
    (1, 3, 7, 2),       # one pair
    (2, 2, 5, 18),      # hd/2 odd, hd not a multiple of 8
    (1, 2, 9, 128),     # the paper's head dim
]
LAYOUTS = {"interleaved": True, "half": False}


def _qk_op(interleaved):
    return lambda x, weight, cos, sin, eps: kernels.qk_norm_rope(x, weight, cos, sin, eps, interleaved)


def _qk_ref(interleaved):
    return lambda x, weight, cos, sin, eps: kernels.reference_qk_norm_rope(x, weight, cos, sin, eps, interleaved)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,nh,N,hd", QK_SHAPES)
def test_qk_norm_rope_forward_and_grads_match_reference(B, nh, N, hd, layout):
    x, weight, cos, sin = _qk_inputs(B, nh, N, hd, requires_grad=True)
    grad_y = torch.randn(B, nh, N, hd, generator=torch.Generator().manual_seed(3))
    got = _outputs_and_grads(lambda x, w, eps: _qk_op(LAYOUTS[layout])(x, w, cos, sin, eps), (x, weight), (grad_y,))
    want = _outputs_and_grads(lambda x, w, eps: _qk_ref(LAYOUTS[layout])(x, w, cos, sin, eps), (x, weight), (grad_y,))
    for name, a, b in zip(("y", "grad_x", "grad_weight"), got, want):
        tol = dict(rtol=1e-5, atol=1e-5 * max(1, B * nh * N) ** 0.5) if name == "grad_weight" else TIGHT
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    _, rstd = OPS.qk_norm_rope_fwd(x.detach(), weight.detach(), cos, sin, 1e-6, LAYOUTS[layout])
    torch.testing.assert_close(rstd, torch.rsqrt(x.detach().square().mean(-1) + 1e-6), **TIGHT)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qk_norm_rope_layouts_pair_the_documented_channels(layout):
    """With weight 1 and one angle of 90 degrees, RoPE maps pair (a, b) to (-x_b, x_a): the
    interleaved layout pairs (2i, 2i+1), the half layout (i, i + hd/2)."""
    x = torch.randn(1, 1, 1, 8)
    cos, sin = torch.zeros(1, 4), torch.ones(1, 4)
    y = kernels.qk_norm_rope(x, torch.ones(8), cos, sin, 0.0, LAYOUTS[layout])
    xn = x * torch.rsqrt(x.square().mean(-1, keepdim=True))
    a, b = (xn[..., 0::2], xn[..., 1::2]) if layout == "interleaved" else xn.chunk(2, -1)
    want = torch.stack([-b, a], -1).flatten(-2) if layout == "interleaved" else torch.cat([-b, a], -1)
    torch.testing.assert_close(y, want, **TIGHT)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qk_norm_rope_gradcheck_float64(layout):
    x, weight, cos, sin = _qk_inputs(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: kernels.qk_norm_rope(x, w, cos, sin, 1e-6, LAYOUTS[layout]),
                                    (x, weight))
    y, rstd = OPS.qk_norm_rope_fwd(x.detach(), weight.detach(), cos, sin, 1e-6, LAYOUTS[layout])
    assert rstd.dtype == torch.float64
    torch.testing.assert_close(y, kernels.reference_qk_norm_rope(x, weight, cos, sin, 1e-6, LAYOUTS[layout]),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qk_norm_rope_float32_against_float64_truth(layout, threads):
    """Output and gradients against the reference in float64, with 1 and 2 threads (grad_weight's
    partial rows are cut into chunks by thread count)."""
    B, nh, N, hd = 4, 4, 48, 24
    x, weight, cos, sin = _qk_inputs(B, nh, N, hd, requires_grad=True)
    grad_y = torch.randn(B, nh, N, hd, generator=torch.Generator().manual_seed(3))
    op = lambda x, w, eps: _qk_op(LAYOUTS[layout])(x, w, cos, sin, eps)  # noqa: E731
    ref = lambda x, w, eps: _qk_ref(LAYOUTS[layout])(x, w, cos.double(), sin.double(), eps)  # noqa: E731
    got = _with_grads(op, (x, weight), (grad_y,), threads)
    want = _float64_truth(ref, (x, weight), (grad_y,))
    for name, a, b in zip(("y", "grad_x", "grad_weight"), got, want):
        tol = dict(rtol=1e-5, atol=1e-5 * (B * nh * N) ** 0.5) if name == "grad_weight" else TIGHT
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qk_norm_rope_low_precision_against_float64_truth(dtype, layout):
    """bfloat16 / float16 x: computed in float32 and rounded once, so y and grad_x are within a
    rounding or two of the float64 truth (the unfused sequence rounds twice); grad_weight is float32."""
    B, nh, N, hd = 2, 4, 48, 24
    x, weight, cos, sin = _qk_inputs(B, nh, N, hd, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(B, nh, N, hd, generator=torch.Generator().manual_seed(3)).to(dtype)
    op = lambda x, w, eps: _qk_op(LAYOUTS[layout])(x, w, cos, sin, eps)  # noqa: E731
    ref = lambda x, w, eps: _qk_ref(LAYOUTS[layout])(x, w, cos.double(), sin.double(), eps)  # noqa: E731
    got = _outputs_and_grads(op, (x, weight), (grad_y,))
    want = _float64_truth(ref, (x, weight), (grad_y,))
    ulp = torch.finfo(dtype).eps
    for name, a, b in zip(("y", "grad_x"), got, want):
        assert a.dtype == dtype
        err = (a.double() - b).abs()
        assert (err <= ulp * b.abs() + 2 * ulp * b.abs().max()).all(), f"{name}: max error {err.max():.3g}"
    assert got[2].dtype == torch.float32
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-4, atol=1e-4 * (B * nh * N) ** 0.5)


def test_qk_norm_rope_non_contiguous_input_and_empty_batch():
    x, weight, cos, sin = _qk_inputs(2, 3, 10, 16)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # the layout of Attention._split's view
    assert not xt.is_contiguous()
    torch.testing.assert_close(kernels.qk_norm_rope(xt, weight, cos, sin),
                               kernels.reference_qk_norm_rope(x, weight, cos, sin), **TIGHT)
    assert kernels.qk_norm_rope(x[:0], weight, cos, sin).shape == (0, 3, 10, 16)


def test_qk_norm_rope_bad_inputs_raise_clear_errors():
    x, weight, cos, sin = _qk_inputs(2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, nh, N, hd\)"):
        kernels.qk_norm_rope(x[0], weight, cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        kernels.qk_norm_rope(x[..., :7], weight[:7], cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match=r"weight \(7,\) must be \(hd,\) = \(8,\)"):
        kernels.qk_norm_rope(x, weight[:7], cos, sin)
    with pytest.raises(ValueError, match=r"sin \(4, 4\) must be \(N, hd/2\) = \(5, 4\)"):
        kernels.qk_norm_rope(x, weight, cos, sin[:4])
    with pytest.raises(ValueError, match="weight, cos and sin must be torch.float32 for torch.bfloat16 x"):
        kernels.qk_norm_rope(x.bfloat16(), weight.bfloat16(), cos, sin)
    with pytest.raises(ValueError, match="floating-point"):
        kernels.qk_norm_rope(x.long(), weight, cos, sin)
    with pytest.raises(ValueError, match="one device"):
        kernels.qk_norm_rope(x, weight, cos.to("meta"), sin)
    with pytest.raises(TypeError, match="cos must be a torch.Tensor"):
        kernels.qk_norm_rope(x, weight, 1.0, sin)
    y, rstd = OPS.qk_norm_rope_fwd(x, weight, cos, sin, 1e-6, True)
    with pytest.raises(RuntimeError, match="rstd must be Float"):
        OPS.qk_norm_rope_bwd(y, x, weight, cos, sin, rstd.double(), True)


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("B,nh,Lq,Lk,hd", ATTN_SHAPES)
def test_attention_forward_matches_reference(B, nh, Lq, Lk, hd):
    q, k, v = _attn_inputs(B, nh, Lq, Lk, hd)
    o, lse = OPS.attention_fwd(q, k, v)
    torch.testing.assert_close(o, kernels.reference_attention(q, k, v), **TIGHT)
    s = q @ k.transpose(-2, -1) / hd ** 0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), **TIGHT)
    assert lse.dtype == torch.float32


def test_attention_matches_sdpa_with_large_logits():
    """Scores of magnitude ~50 exercise the running-max rescaling across K/V tiles."""
    q, k, v = _attn_inputs(1, 2, 90, 1100, 16)
    q = q * 12
    torch.testing.assert_close(kernels.attention(q, k, v),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("B,nh,Lq,Lk,hd", ATTN_SHAPES)
def test_attention_grads_match_reference(B, nh, Lq, Lk, hd):
    q, k, v = _attn_inputs(B, nh, Lq, Lk, hd, requires_grad=True)
    o = kernels.attention(q, k, v)
    grad_o = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), grad_o)
    want = torch.autograd.grad(kernels.reference_attention(q, k, v), (q, k, v), grad_o)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m: f"grad of {name}: {m}")


def test_attention_backward_few_heads_path():
    """With fewer heads than threads the backward splits K/V tiles over threads with private
    dQ buffers; force two threads so that path runs whatever OMP_NUM_THREADS says."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = _attn_inputs(1, 1, 150, 400, 24, requires_grad=True)
        o = kernels.attention(q, k, v)
        grad_o = torch.randn_like(o)
        got = torch.autograd.grad(o, (q, k, v), grad_o)
    finally:
        torch.set_num_threads(before)
    want = torch.autograd.grad(kernels.reference_attention(q, k, v), (q, k, v), grad_o)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_attention_gradcheck_float64():
    q, k, v = _attn_inputs(1, 2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.attention, (q, k, v))
    q, k, v = _attn_inputs(1, 1, 3, 7, 2, dtype=torch.float64, requires_grad=True, seed=1)
    assert torch.autograd.gradcheck(kernels.attention, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_low_precision_against_float64_truth(dtype):
    """bfloat16 / float16 on the CPU: widened to float32, outputs rounded once. Output and every
    gradient within a few roundings of the dtype of the float64 reference on the same values."""
    q, k, v = _attn_inputs(2, 3, 70, 45, 33, dtype=dtype, requires_grad=True)
    grad_o = torch.randn(2, 3, 70, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    o = kernels.attention(q, k, v)
    got = (o, *torch.autograd.grad(o, (q, k, v), grad_o))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = kernels.reference_attention(q64, k64, v64)
    want = (o64, *torch.autograd.grad(o64, (q64, k64, v64), grad_o.double()))
    ulp = torch.finfo(dtype).eps
    for name, a, b in zip(("o", "grad q", "grad k", "grad v"), got, want):
        assert a.dtype == dtype
        err = (a.double() - b).abs()
        assert (err <= 2 * ulp * b.abs() + 2 * ulp * b.abs().max()).all(), f"{name}: max error {err.max():.3g}"


def test_attention_non_contiguous_inputs():
    q, k, v = _attn_inputs(2, 3, 40, 50, 16)
    # (B, L, nh, hd) layouts viewed as (B, nh, L, hd), as a model's head split produces
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(kernels.attention(qt, kt, vt), kernels.reference_attention(q, k, v), **TIGHT)


def test_attention_zero_queries():
    q, k, v = _attn_inputs(1, 2, 0, 5, 4, requires_grad=True)
    o = kernels.attention(q, k, v)
    assert o.shape == (1, 2, 0, 4)
    gq, gk, gv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert gk.abs().sum() == 0 and gv.abs().sum() == 0


def test_attention_memory_grows_linearly():
    """Peak resident memory of forward + backward at Lq = Lk = 8192 must stay far below the
    256 MiB one float32 8192 x 8192 score matrix would take (in a fresh process, with the
    kernel's peak-RSS mark reset just before the computation)."""
    code = textwrap.dedent("""
        import torch, kernels
        from bench.ops import reset_peak_rss, peak_rss_growth_mib
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 1, 8192, 8, requires_grad=True) for _ in range(3))
        kernels.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64]).sum().backward()  # warm-up
        base = reset_peak_rss()
        kernels.attention(q, k, v).sum().backward()
        print(peak_rss_growth_mib(base))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 64, f"attention fwd+bwd at L=8192 grew the peak RSS by {growth_mib:.0f} MiB"


# ----------------------------------------------------------------------------- opcheck, compile

def test_opcheck_all_ops():
    x, shift, scale = _adaln_inputs(2, 6, 10, 3, requires_grad=True)
    torch.library.opcheck(OPS.adaln_modulate_fwd, (x, shift, scale, 1e-6))
    y, mean, rstd = OPS.adaln_modulate_fwd(x.detach(), shift.detach(), scale.detach(), 1e-6)
    torch.library.opcheck(OPS.adaln_modulate_bwd, (torch.randn_like(y), x.detach(), scale.detach(), mean, rstd, 3))
    inputs = _residual_inputs(2, 6, 10, 3, requires_grad=True)
    torch.library.opcheck(OPS.residual_modulate_fwd, (*inputs, 1e-6))
    x, y, gate, shift, scale = (t.detach() for t in inputs)
    x_new, h, mean, rstd = OPS.residual_modulate_fwd(x, y, gate, shift, scale, 1e-6)
    torch.library.opcheck(OPS.residual_modulate_bwd, (torch.randn_like(x), torch.randn_like(x), x_new, y, gate, scale,
                                                      mean, rstd))
    x, weight, cos, sin = _qk_inputs(2, 2, 5, 6, requires_grad=True)
    for interleaved in (True, False):
        torch.library.opcheck(OPS.qk_norm_rope_fwd, (x, weight, cos, sin, 1e-6, interleaved))
        y, rstd = OPS.qk_norm_rope_fwd(x.detach(), weight.detach(), cos, sin, 1e-6, interleaved)
        torch.library.opcheck(OPS.qk_norm_rope_bwd, (torch.randn_like(y), x.detach(), weight.detach(), cos, sin, rstd,
                                                     interleaved))
    q, k, v = _attn_inputs(1, 2, 9, 13, 8, requires_grad=True)
    torch.library.opcheck(OPS.attention_fwd, (q, k, v))
    o, lse = OPS.attention_fwd(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(OPS.attention_bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse))


def test_torch_compile_fullgraph():
    """Dynamo traces through the wrappers with the registered fake kernels; backend aot_eager
    (AOTAutograd with the fakes and the registered backward, no inductor codegen, so it is cheap)."""
    torch._dynamo.reset()

    cos, sin = _rope_tables(6, 4)

    def block(x, shift, scale, q, k, v, rx, ry, gate, rshift, rscale, qw, ops=kernels):
        x_new, h = ops.residual_modulate(rx, ry, gate, rshift, rscale)
        q = ops.qk_norm_rope(q, qw, cos, sin, 1e-6, False)
        return (ops.adaln_modulate(x, shift, scale).square().mean() + ops.attention(q, k, v).square().mean()
                + (x_new * h).mean())

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    args = (_adaln_inputs(2, 8, 12, 2, requires_grad=True) + _attn_inputs(1, 2, 6, 6, 8, requires_grad=True)
            + _residual_inputs(2, 8, 12, 2, requires_grad=True) + [torch.rand(8).add(0.5).requires_grad_()])
    out = compiled(*args)
    grads = torch.autograd.grad(out, args)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    references = SimpleNamespace(adaln_modulate=kernels.reference_adaln_modulate,
                                 residual_modulate=kernels.reference_residual_modulate,
                                 qk_norm_rope=kernels.reference_qk_norm_rope,
                                 attention=kernels.reference_attention)
    ref = block(*ref_args, ops=references)
    ref_grads = torch.autograd.grad(ref, ref_args)
    torch.testing.assert_close(out, ref, **TIGHT)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad inputs

def test_adaln_bad_inputs_raise_clear_errors():
    x, shift, scale = _adaln_inputs(2, 6, 8, 3)
    shift4, scale4 = torch.randn(2, 4, 8), torch.randn(2, 4, 8)  # 4 groups do not divide N = 6
    with pytest.raises(ValueError, match="N % G"):
        kernels.adaln_modulate(x, shift4, scale4)
    with pytest.raises(ValueError, match="shape of shift"):
        kernels.adaln_modulate(x, shift, scale[:, :1])
    with pytest.raises(ValueError, match=r"\(B, G, D\)"):
        kernels.adaln_modulate(x, shift[..., :7], scale[..., :7])
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, D\)"):
        kernels.adaln_modulate(x[0], shift, scale)
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.adaln_modulate(x, shift.double(), scale)
    with pytest.raises(ValueError, match="floating-point"):
        kernels.adaln_modulate(x.long(), shift.long(), scale.long())
    with pytest.raises(ValueError, match="one device"):
        kernels.adaln_modulate(x, shift.to("meta"), scale)
    # the C++ checks, reached by calling the op directly
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.adaln_modulate_fwd(x.transpose(0, 1).contiguous().transpose(0, 1), shift, scale, 1e-6)
    with pytest.raises(RuntimeError, match="N % G"):
        OPS.adaln_modulate_fwd(x, shift4, scale4, 1e-6)
    with pytest.raises(RuntimeError, match="share one dtype"):
        OPS.adaln_modulate_fwd(x, shift.double(), scale, 1e-6)
    with pytest.raises(RuntimeError, match="float32, float64"):
        OPS.adaln_modulate_fwd(x.int(), shift.int(), scale.int(), 1e-6)
    y, mean, rstd = OPS.adaln_modulate_fwd(x, shift, scale, 1e-6)
    with pytest.raises(RuntimeError, match="groups = 4"):
        OPS.adaln_modulate_bwd(y, x, scale, mean, rstd, 4)
    with pytest.raises(RuntimeError, match="mean and rstd must be Float"):
        OPS.adaln_modulate_bwd(y, x, scale, mean.double(), rstd.double(), 3)


def test_residual_modulate_bad_inputs_raise_clear_errors():
    x, y, gate, shift, scale = _residual_inputs(2, 6, 8, 3)
    with pytest.raises(ValueError, match=r"y \(2, 5, 8\) must have the shape of x"):
        kernels.residual_modulate(x, y[:, :5], gate, shift, scale)
    with pytest.raises(ValueError, match=r"gate \(2, 1, 8\) must have the shape of shift"):
        kernels.residual_modulate(x, y, gate[:, :1], shift, scale)
    with pytest.raises(ValueError, match="N % G"):
        kernels.residual_modulate(x, y, *(torch.randn(2, 4, 8) for _ in range(3)))
    with pytest.raises(ValueError, match="x, shift, scale, y and gate must share one dtype"):
        kernels.residual_modulate(x, y.double(), gate, shift, scale)
    with pytest.raises(ValueError, match="must be on one device"):
        kernels.residual_modulate(x, y, gate.to("meta"), shift, scale)
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        kernels.residual_modulate(x, y, 0.5, shift, scale)
    x_new, h, mean, rstd = OPS.residual_modulate_fwd(x, y, gate, shift, scale, 1e-6)
    with pytest.raises(RuntimeError, match="mean and rstd must be Float"):
        OPS.residual_modulate_bwd(h, h, x_new, y, gate, scale, mean.double(), rstd.double())


def _r(*shape):
    return torch.randn(*shape)


# Inputs that the Python wrappers never pass, given straight to the ops: the C++ kernels must
# reject each one before reading any tensor data (the ops are public as torch.ops.dit4dit.*).
DIRECT_BAD_CALLS = {
    "fwd no groups": (lambda: OPS.adaln_modulate_fwd(_r(2, 6, 8), _r(2, 0, 8), _r(2, 0, 8), 1e-6), "G >= 1"),
    "fwd D = 0": (lambda: OPS.adaln_modulate_fwd(_r(2, 6, 0), _r(2, 3, 0), _r(2, 3, 0), 1e-6), "D >= 1"),
    "fwd batch": (lambda: OPS.adaln_modulate_fwd(_r(2, 6, 8), _r(1, 3, 8), _r(1, 3, 8), 1e-6), "to match x"),
    "fwd expanded shift": (lambda: OPS.adaln_modulate_fwd(_r(2, 6, 8), _r(1, 3, 8).expand(2, 3, 8), _r(2, 3, 8),
                                                          1e-6), "contiguous"),
    "fwd eps nan": (lambda: OPS.adaln_modulate_fwd(_r(2, 6, 8), _r(2, 3, 8), _r(2, 3, 8), float("nan")), "eps"),
    "bwd groups 0": (lambda: OPS.adaln_modulate_bwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 3, 8), _r(2, 6), _r(2, 6), 0),
                     "groups = 0"),
    "bwd grad_y": (lambda: OPS.adaln_modulate_bwd(_r(2, 6, 4), _r(2, 6, 8), _r(2, 3, 8), _r(2, 6), _r(2, 6), 3),
                   "grad_y"),
    "bwd mean short": (lambda: OPS.adaln_modulate_bwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 3, 8), _r(2, 5), _r(2, 5), 3),
                       r"mean \(2, 5\)"),
    "bwd rstd short": (lambda: OPS.adaln_modulate_bwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 3, 8), _r(2, 6), _r(2, 5), 3),
                       "rstd"),
    "bwd mean strided": (lambda: OPS.adaln_modulate_bwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 3, 8), _r(6, 2).t(),
                                                        _r(2, 6), 3), "contiguous"),
    "residual fwd y": (lambda: OPS.residual_modulate_fwd(_r(2, 6, 8), _r(2, 6, 7), _r(2, 3, 8), _r(2, 3, 8),
                                                         _r(2, 3, 8), 1e-6), r"y \(2, 6, 7\) must have the shape of x"),
    "residual fwd gate": (lambda: OPS.residual_modulate_fwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 2, 8), _r(2, 3, 8),
                                                            _r(2, 3, 8), 1e-6), "gate .* must have the shape of shift"),
    "residual fwd strided y": (lambda: OPS.residual_modulate_fwd(_r(2, 6, 8), _r(2, 8, 6).transpose(1, 2),
                                                                 _r(2, 3, 8), _r(2, 3, 8), _r(2, 3, 8), 1e-6),
                               "y must be contiguous"),
    "residual fwd N % G": (lambda: OPS.residual_modulate_fwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 4, 8), _r(2, 4, 8),
                                                             _r(2, 4, 8), 1e-6), "N % G"),
    "residual bwd grad_h": (lambda: OPS.residual_modulate_bwd(_r(2, 6, 8), _r(2, 6, 4), _r(2, 6, 8), _r(2, 6, 8),
                                                              _r(2, 3, 8), _r(2, 3, 8), _r(2, 6), _r(2, 6)),
                            "grad_h"),
    "residual bwd grad_x_new": (lambda: OPS.residual_modulate_bwd(_r(2, 5, 8), _r(2, 6, 8), _r(2, 6, 8),
                                                                  _r(2, 6, 8), _r(2, 3, 8), _r(2, 3, 8), _r(2, 6),
                                                                  _r(2, 6)), "grad_x_new"),
    "residual bwd gate": (lambda: OPS.residual_modulate_bwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 6, 8), _r(2, 6, 8),
                                                            _r(2, 2, 8), _r(2, 3, 8), _r(2, 6), _r(2, 6)),
                          "gate .* must have the shape of scale"),
    "residual bwd scale 2-d": (lambda: OPS.residual_modulate_bwd(_r(2, 6, 8), _r(2, 6, 8), _r(2, 6, 8), _r(2, 6, 8),
                                                                 _r(2, 3, 8), _r(3, 8), _r(2, 6), _r(2, 6)),
                               r"scale must have shape \(B, G, D\)"),
    "qk fwd hd odd": (lambda: OPS.qk_norm_rope_fwd(_r(1, 2, 3, 5), _r(5), _r(3, 2), _r(3, 2), 1e-6, True),
                      "must be even"),
    "qk fwd cos": (lambda: OPS.qk_norm_rope_fwd(_r(1, 2, 3, 6), _r(6), _r(3, 2), _r(3, 3), 1e-6, True),
                   r"cos \(3, 2\) must be \(N, hd/2\) = \(3, 3\)"),
    "qk fwd weight dtype": (lambda: OPS.qk_norm_rope_fwd(_r(1, 2, 3, 6), _r(6).double(), _r(3, 3), _r(3, 3), 1e-6,
                                                         True), "weight, cos and sin must be Float"),
    "qk fwd strided x": (lambda: OPS.qk_norm_rope_fwd(_r(1, 3, 2, 6).transpose(1, 2), _r(6), _r(3, 3), _r(3, 3),
                                                      1e-6, False), "x must be contiguous"),
    "qk fwd eps": (lambda: OPS.qk_norm_rope_fwd(_r(1, 2, 3, 6), _r(6), _r(3, 3), _r(3, 3), -1.0, False), "eps"),
    "qk bwd grad_y": (lambda: OPS.qk_norm_rope_bwd(_r(1, 2, 3, 4), _r(1, 2, 3, 6), _r(6), _r(3, 3), _r(3, 3),
                                                   _r(1, 2, 3), True), "grad_y"),
    "qk bwd rstd": (lambda: OPS.qk_norm_rope_bwd(_r(1, 2, 3, 6), _r(1, 2, 3, 6), _r(6), _r(3, 3), _r(3, 3),
                                                 _r(1, 2, 2), True), r"rstd \(1, 2, 2\)"),
    "attn fwd Lk = 0": (lambda: OPS.attention_fwd(_r(2, 2, 5, 8), _r(2, 2, 0, 8), _r(2, 2, 0, 8)), "Lk >= 1"),
    "attn fwd v": (lambda: OPS.attention_fwd(_r(2, 2, 5, 8), _r(2, 2, 7, 8), _r(2, 2, 6, 8)), "shape of k"),
    "attn bwd o": (lambda: OPS.attention_bwd(_r(2, 2, 5, 8), _r(2, 2, 5, 8), _r(2, 2, 7, 8), _r(2, 2, 7, 8),
                                             _r(2, 2, 4, 8), _r(2, 2, 5)), "shape of q"),
    "attn bwd grad_o": (lambda: OPS.attention_bwd(_r(2, 2, 5, 4), _r(2, 2, 5, 8), _r(2, 2, 7, 8), _r(2, 2, 7, 8),
                                                  _r(2, 2, 5, 8), _r(2, 2, 5)), "grad_o"),
}


@pytest.mark.parametrize("case", DIRECT_BAD_CALLS)
def test_ops_reject_bad_inputs_called_directly(case):
    call, message = DIRECT_BAD_CALLS[case]
    with pytest.raises(RuntimeError, match=message):
        call()


def test_attention_bad_inputs_raise_clear_errors():
    q, k, v = _attn_inputs(2, 2, 5, 7, 8)
    with pytest.raises(ValueError, match=r"q must have shape \(B, nh, Lq, hd\)"):
        kernels.attention(q[0], k, v)
    with pytest.raises(ValueError, match="shape of k"):
        kernels.attention(q, k, v[:, :, :6])
    with pytest.raises(ValueError, match="head dim"):
        kernels.attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="batch, heads"):
        kernels.attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="Lk >= 1"):
        kernels.attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="one device"):
        kernels.attention(q, k.to("meta"), v)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 and float16"):
        OPS.attention_fwd(q.int(), k.int(), v.int())
    with pytest.raises(RuntimeError, match="contiguous"):
        OPS.attention_fwd(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)
    o, lse = OPS.attention_fwd(q, k, v)
    with pytest.raises(RuntimeError, match=r"lse .* must be \(B, nh, Lq\)"):
        OPS.attention_bwd(o, q, k, v, o, lse[:, :, :4].contiguous())


def test_missing_extension_gives_build_hint(monkeypatch):
    monkeypatch.setattr(kernels, "_LOAD_ERROR", "ImportError: no module named kernels._C")
    assert not kernels.available()
    x, shift, scale = _adaln_inputs(1, 2, 4, 1)
    with pytest.raises(RuntimeError, match=r"setup.py build_ext --inplace"):
        kernels.adaln_modulate(x, shift, scale)
    with pytest.raises(RuntimeError, match=r"setup.py build_ext --inplace"):
        kernels.residual_modulate(*_residual_inputs(1, 2, 4, 1))
    q, k, v = _attn_inputs(1, 1, 2, 2, 4)
    with pytest.raises(RuntimeError, match=r"setup.py build_ext --inplace"):
        kernels.attention(q, k, v)


def test_an_extension_built_from_older_sources_falls_back_with_a_clear_reason():
    """A kernels/_C that loads but lacks ops this package registers (the sources were updated,
    the build was not) counts as not built: dit4dit still imports and runs on PyTorch, and
    DIT4DIT_KERNELS=1 names the missing ops and the rebuild."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent("""
        import sys, types
        sys.modules["kernels._C"] = types.ModuleType("kernels._C")  # loads, registers no op
        import torch, kernels, dit4dit
        print(kernels.available(), dit4dit.backend())
        print(kernels.load_error())
        try:
            dit4dit.select_backend("1")
        except RuntimeError as err:
            print("refused:", err)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DIT4DIT_KERNELS": "auto"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "False torch"
    assert "older sources" in lines[1] and "qk_norm_rope_fwd" in lines[1] and "rebuild" in lines[1]
    assert lines[2].startswith("refused:") and "older sources" in lines[2]


def test_auto_dispatch_on_a_gpu_uses_only_the_ops_measured_faster(monkeypatch):
    """On CUDA, `auto` picks SDPA for attention (bf16 and fp32: the kernel measured slower) and the
    fused adaLN (measured faster); DIT4DIT_KERNELS=1 forces every kernel; the CPU keeps them all."""
    from kernels import dispatch

    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))  # only the device is read
    on_cpu = torch.zeros(1)
    before = dispatch.backend()
    monkeypatch.setattr(kernels, "available", lambda: True)
    try:
        dispatch.select_backend("auto")
        assert not dispatch.use_kernel("attention", on_gpu)
        assert dispatch.use_kernel("adaln_modulate", on_gpu)
        assert not dispatch.use_kernel("residual_modulate", on_gpu)  # not measured on a GPU yet
        assert not dispatch.use_kernel("qk_norm_rope", on_gpu)
        assert all(dispatch.use_kernel(op, on_cpu) for op in dispatch.CUDA_FASTER)
        dispatch.select_backend("1")
        assert all(dispatch.use_kernel(op, on_gpu) for op in dispatch.CUDA_FASTER)
        dispatch.select_backend("0")
        assert not any(dispatch.use_kernel(op, x) for op in dispatch.CUDA_FASTER for x in (on_gpu, on_cpu))
    finally:
        monkeypatch.undo()
        dispatch.select_backend("1" if before == "kernels" else "0")


def test_the_wrappers_follow_the_dispatch_rule(monkeypatch):
    """Where the rule says PyTorch, attention() never calls the kernel: it returns SDPA's result."""
    from kernels import dispatch

    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel was called")

    monkeypatch.setattr(dispatch, "use_kernel", lambda op, x: False)
    monkeypatch.setattr(kernels, "attention", refuse)
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(dispatch.attention(q, k, v), kernels.reference_attention(q, k, v))
