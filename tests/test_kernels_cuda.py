"""The CUDA kernels of kernels/ on a GPU, through the public wrappers (autograd included).

Skipped without a CUDA device (the development machines and CI have none; there the CUDA code
runs under CPU emulation, tests/test_cuda_emulated.py). With a device and DIT4DIT_KERNELS=1, a
missing extension or an extension built without its CUDA kernels is a failure, not a skip.

Accuracy rule: outputs and input gradients are compared with float64 math on the same (rounded)
inputs, by the relative error ||got - truth|| / ||truth||. float32 must be within 2e-5 (the
kernels build with --use_fast_math). float16 and bfloat16 must be within twice the error of
PyTorch's own kernel in the same dtype (F.scaled_dot_product_attention; for adaLN F.layer_norm
in that dtype) plus half a unit of the dtype, and under an absolute ceiling (1e-2 bfloat16, 2e-3
float16). Shapes include tile remainders (the attention tiles are 32 to 128 wide), every head-dim
bucket (hd <= 32, 64, 128: 24, 33, 64, 100, 128), Lq != Lk, and the toy and paper presets' shapes.
Before each call a NaN buffer of the output's size is freed, so that the caching allocator hands
the op memory full of NaN: an element the kernel fails to write shows up.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import kernels

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA kernels run here only under CPU emulation (test_cuda_emulated.py)",
                allow_module_level=True)
_CUDA_OPS = kernels.available() and all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"dit4dit::{op}", "CUDA")
    for op in ("attention_fwd", "attention_bwd", "adaln_modulate_fwd", "adaln_modulate_bwd", "residual_modulate_fwd",
               "residual_modulate_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd"))
if not _CUDA_OPS:
    why = (f"kernels._C is not loaded ({kernels.load_error()})" if not kernels.available()
           else "kernels._C was built without its CUDA kernels (build with FORCE_CUDA=1 or on a GPU machine)")
    if os.environ.get("DIT4DIT_KERNELS") == "1":
        pytest.fail(f"DIT4DIT_KERNELS=1 on a CUDA machine but {why}; {kernels.BUILD_HINT}", pytrace=False)
    pytest.skip(f"{why}; {kernels.BUILD_HINT}", allow_module_level=True)

DEV = torch.device("cuda")
OPS = torch.ops.dit4dit
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CEILING = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

ATTN_SHAPES = [  # (B, nh, Lq, Lk, hd)
    (1, 1, 1, 1, 1),
    (2, 3, 70, 70, 33),       # partial tiles everywhere, hd just above the 32 bucket
    (1, 2, 130, 530, 64),     # several partial K/V tiles, Lq != Lk
    (2, 2, 67, 5, 16),        # cross-attention to a few keys
    (1, 2, 40, 300, 100),     # the 128 bucket, zero-padded
    (3, 4, 192, 48, 24),      # toy: video tokens -> byte-text tokens, hd 24
    (1, 16, 768, 768, 128),   # paper: video self-attention (3 latent frames x 16 x 16 tokens)
    (2, 12, 17, 768, 64),     # paper: action tokens -> video tokens
]
ADALN_SHAPES = [  # (B, N, D, G)
    (1, 1, 1, 1),
    (2, 12, 37, 3),
    (3, 10, 130, 5),
    (4, 1030, 96, 10),        # rows not a multiple of the block's 4 rows; toy width
    (2, 768, 2048, 3),        # paper video DiT, per-frame modulation
    (8, 17, 768, 1),          # paper action DiT
    (1, 7, 4100, 7),          # wide rows, D not a multiple of 32
]


def _rel(got, truth):
    """||got - truth|| / ||truth||; the denominator is at least 1e-3 per element (rms), so that an
    exactly-zero truth (the gradients of a single key) asks for near-zero rather than exact zero."""
    got, truth = got.double(), truth.double()
    assert torch.isfinite(got).all(), "non-finite values (an unwritten or overflowing element)"
    return ((got - truth).norm() / truth.norm().clamp_min(1e-3 * truth.numel() ** 0.5)).item()


def _poison(numel, dtype):
    """Leave a freed NaN block of this size in the caching allocator (the next allocation of the
    same size is likely to get it)."""
    buf = torch.full((numel,), float("nan"), dtype=dtype, device=DEV)
    del buf


def _check(name, dtype, got, truth, torch_same_dtype):
    err = _rel(got, truth)
    if dtype == torch.float32:
        bound = 2e-5
    else:
        bound = min(2 * _rel(torch_same_dtype, truth) + torch.finfo(dtype).eps / 2, CEILING[dtype])
    assert err <= bound, f"{name} ({dtype}): relative error {err:.3g} > bound {bound:.3g}"


def _grads(fn, inputs, grad_out):
    """(outputs, input gradients) of fn; fn may return one tensor or a tuple, grad_out matches."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    if isinstance(out, tuple):
        return tuple(o.detach() for o in out), torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)


def _check_op_and_grads(op, reference, torch_same_dtype, inputs, grad_out, names):
    """The output(s) of `op` (each shaped like inputs[0]) and its input gradients, each judged by
    _check against `reference` in float64 on the same inputs, with PyTorch's own kernel in the
    inputs' dtype (`torch_same_dtype`) setting the low-precision bound. `names`: outputs, then
    gradients; grad_out is one tensor, or a tuple for an op with several outputs."""
    dtype = inputs[0].dtype
    as_tuple = (lambda t: t if isinstance(t, tuple) else (t,))
    truth_out, truth_g = _grads(reference, [t.double() for t in inputs],
                                tuple(g.double() for g in as_tuple(grad_out)))
    torch_out, torch_g = _grads(torch_same_dtype, inputs, grad_out)
    _poison(inputs[0].numel(), dtype)
    out, grads = _grads(op, inputs, grad_out)
    for o in as_tuple(out):
        assert o.dtype == dtype and o.shape == inputs[0].shape
    results = zip(names, (*as_tuple(out), *grads), (*as_tuple(truth_out), *truth_g), (*as_tuple(torch_out), *torch_g),
                  strict=True)
    for name, got, truth, same in results:
        assert got.dtype == dtype and got.shape == truth.shape, name
        _check(name, dtype, got, truth, same)


# ------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}H{}Lq{}Lk{}hd{}".format(*s))
def test_attention_cuda_matches_float64(shape, dtype):
    B, nh, Lq, Lk, hd = shape
    g = torch.Generator(device=DEV).manual_seed(hash(shape) % 2 ** 31)
    q, k, v = ((1.5 * torch.randn(B, nh, L, hd, device=DEV, generator=g)).to(dtype) for L in (Lq, Lk, Lk))
    do = torch.randn(B, nh, Lq, hd, device=DEV, generator=g).to(dtype)
    _check_op_and_grads(kernels.attention, kernels.reference_attention, F.scaled_dot_product_attention,
                        (q, k, v), do, ("o", "dq", "dk", "dv"))
    # the saved logsumexp (float32 at every dtype) against float64 scores
    _, lse = OPS.attention_fwd(q, k, v)
    scores = (q.double() @ k.double().transpose(-1, -2)) * hd ** -0.5
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-4, atol=1e-4)


def test_attention_cuda_non_contiguous_and_large_logits():
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(2, 50, 4, 64, device=DEV, generator=g).transpose(1, 2) * 4  # (B, nh, L, hd), strided
    k = torch.randn(2, 70, 4, 64, device=DEV, generator=g).transpose(1, 2) * 4  # logits of std 16
    v = torch.randn(2, 70, 4, 64, device=DEV, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    truth = kernels.reference_attention(q.double(), k.double(), v.double())
    assert _rel(kernels.attention(q, k, v), truth) <= 2e-5


def test_attention_cuda_rejects_float64_and_mixed_devices():
    q = torch.randn(1, 2, 8, 16, device=DEV, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        OPS.attention_fwd(q, q, q)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        kernels.attention(q.float(), q.float().cpu(), q.float())


# ------------------------------------------------------------------------------------- adaLN

def _layer_norm_same_dtype(x, shift, scale):
    """PyTorch's own kernels in the input dtype (F.layer_norm computes its statistics in fp32)."""
    B, N, D = x.shape
    G = shift.shape[1]
    y = F.layer_norm(x, (D,), eps=1e-6).view(B, G, N // G, D)
    return (y * (1 + scale[:, :, None]) + shift[:, :, None]).view(B, N, D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "B{}N{}D{}G{}".format(*s))
def test_adaln_cuda_matches_float64(shape, dtype):
    B, N, D, G = shape
    g = torch.Generator(device=DEV).manual_seed(hash(shape) % 2 ** 31)
    x = (torch.randn(B, N, D, device=DEV, generator=g) * 2 + 0.5).to(dtype)
    shift = torch.randn(B, G, D, device=DEV, generator=g).to(dtype)
    scale = (0.5 * torch.randn(B, G, D, device=DEV, generator=g)).to(dtype)
    dy = torch.randn(B, N, D, device=DEV, generator=g).to(dtype)
    _check_op_and_grads(kernels.adaln_modulate, kernels.reference_adaln_modulate, _layer_norm_same_dtype,
                        (x, shift, scale), dy, ("y", "dx", "dshift", "dscale"))
    _, mean, rstd = OPS.adaln_modulate_fwd(x, shift, scale, 1e-6)
    var, mu = torch.var_mean(x.double(), dim=-1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-6), rtol=1e-4, atol=1e-5)


def _residual_same_dtype(x, y, gate, shift, scale):
    """PyTorch's own kernels in the input dtype: the eager gated residual, then adaLN as above."""
    B, N, D = x.shape
    G = gate.shape[1]
    x_new = x + (y.view(B, G, N // G, D) * gate[:, :, None]).view(B, N, D)
    return x_new, _layer_norm_same_dtype(x_new, shift, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "B{}N{}D{}G{}".format(*s))
def test_residual_modulate_cuda_matches_float64(shape, dtype):
    B, N, D, G = shape
    g = torch.Generator(device=DEV).manual_seed(hash(shape) % 2 ** 31)
    x, y, dx_new, dh = ((torch.randn(B, N, D, device=DEV, generator=g) * 2 + 0.5).to(dtype) for _ in range(4))
    gate, shift, scale = ((0.5 * torch.randn(B, G, D, device=DEV, generator=g)).to(dtype) for _ in range(3))
    _check_op_and_grads(kernels.residual_modulate, kernels.reference_residual_modulate, _residual_same_dtype,
                        (x, y, gate, shift, scale), (dx_new, dh),
                        ("x_new", "h", "dx", "dy", "dgate", "dshift", "dscale"))


QK_SHAPES = [  # (B, nh, N, hd)
    (1, 1, 1, 2),
    (3, 5, 7, 18),            # rows not a multiple of the block's 4 rows, odd pair count
    (32, 4, 48, 24),          # toy video self-attention
    (2, 16, 768, 128),        # paper video self-attention
]


def _qk_norm_rope_same_dtype(interleaved, cos, sin):
    """PyTorch's own kernels in the input dtype: F.rms_norm with the gain, then the rotation."""
    def fn(x, weight):
        xn = F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), 1e-6)
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        a, b = (xn[..., 0::2], xn[..., 1::2]) if interleaved else xn.chunk(2, -1)
        ya, yb = a * c - b * s, a * s + b * c
        return torch.stack([ya, yb], -1).flatten(-2) if interleaved else torch.cat([ya, yb], -1)
    return fn


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QK_SHAPES, ids=lambda s: "B{}H{}N{}hd{}".format(*s))
def test_qk_norm_rope_cuda_matches_float64(shape, dtype, interleaved):
    B, nh, N, hd = shape
    g = torch.Generator(device=DEV).manual_seed(hash(shape) % 2 ** 31)
    x = (2 * torch.randn(B, nh, N, hd, device=DEV, generator=g)).to(dtype)
    weight = 1 + 0.5 * torch.randn(hd, device=DEV, generator=g)
    angle = torch.rand(N, hd // 2, device=DEV, generator=g) * 20 - 10
    cos, sin = angle.cos(), angle.sin()
    dy = torch.randn(B, nh, N, hd, device=DEV, generator=g).to(dtype)
    got_y, (got_dx, got_dw) = _grads(lambda x, w: kernels.qk_norm_rope(x, w, cos, sin, 1e-6, interleaved),
                                     (x, weight), dy)
    ref = lambda x, w: kernels.reference_qk_norm_rope(x, w, cos.to(w.dtype), sin.to(w.dtype), 1e-6,  # noqa: E731
                                                      interleaved)
    truth_y, (truth_dx, truth_dw) = _grads(ref, (x.double(), weight.double()), dy.double())
    low_y, (low_dx, _) = _grads(_qk_norm_rope_same_dtype(interleaved, cos, sin), (x, weight), dy)
    _check("y", dtype, got_y, truth_y, low_y)
    _check("dx", dtype, got_dx, truth_dx, low_dx)
    assert got_dw.dtype == torch.float32
    assert _rel(got_dw, truth_dw) <= 1e-4, f"grad weight: relative error {_rel(got_dw, truth_dw):.3g}"


def test_adaln_cuda_backward_is_deterministic():
    """The parameter gradients are reduced without atomics: two runs give identical bits."""
    g = torch.Generator(device=DEV).manual_seed(2)
    x, shift, scale = (torch.randn(s, device=DEV, generator=g) for s in ((4, 600, 256), (4, 3, 256), (4, 3, 256)))
    dy = torch.randn_like(x)
    first = _grads(kernels.adaln_modulate, (x, shift, scale), dy)[1]
    second = _grads(kernels.adaln_modulate, (x, shift, scale), dy)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- registration

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda(dtype):
    g = torch.Generator(device=DEV).manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, device=DEV, generator=g).to(dtype).requires_grad_(True)

    x, shift, scale = rand(2, 6, 40), rand(2, 3, 40), rand(2, 3, 40)
    torch.library.opcheck(OPS.adaln_modulate_fwd, (x, shift, scale, 1e-6))
    y, mean, rstd = OPS.adaln_modulate_fwd(x.detach(), shift.detach(), scale.detach(), 1e-6)
    torch.library.opcheck(OPS.adaln_modulate_bwd, (torch.randn_like(y), x.detach(), scale.detach(), mean, rstd, 3))
    q, k, v = rand(1, 2, 9, 32), rand(1, 2, 13, 32), rand(1, 2, 13, 32)
    torch.library.opcheck(OPS.attention_fwd, (q, k, v))
    o, lse = OPS.attention_fwd(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(OPS.attention_bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse))


def test_torch_compile_fullgraph_cuda():
    torch._dynamo.reset()

    def block(x, shift, scale, q, k, v):
        return kernels.adaln_modulate(x, shift, scale).square().mean() + kernels.attention(q, k, v).square().mean()

    g = torch.Generator(device=DEV).manual_seed(4)
    shapes = [(2, 8, 64), (2, 2, 64), (2, 2, 64), (1, 2, 40, 64), (1, 2, 24, 64), (1, 2, 24, 64)]
    args = [torch.randn(s, device=DEV, generator=g).requires_grad_(True) for s in shapes]
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    grads = torch.autograd.grad(out, args)
    ref_args = [a.detach().double().requires_grad_(True) for a in args]
    ref = (kernels.reference_adaln_modulate(*ref_args[:3]).square().mean()
           + kernels.reference_attention(*ref_args[3:]).square().mean())
    for a, b in zip((out, *grads), (ref, *torch.autograd.grad(ref, ref_args))):
        assert _rel(a, b) <= 2e-5


# ------------------------------------------------------------------------------------- the model on the GPU

def test_tiny_model_cuda_kernels_match_pytorch_backend():
    """The `tiny` preset on the GPU: loss, gradients and predicted actions with the fused kernels
    agree with the PyTorch backend (float32)."""
    import dit4dit

    torch.manual_seed(0)
    with torch.device(DEV):
        model = dit4dit.DiT4DiT(dit4dit.make_config("tiny"))
    with torch.no_grad():  # no zero-initialized path, so every layer matters
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(0.05 * torch.randn_like(p))
    cfg = model.config
    g = torch.Generator(device=DEV).manual_seed(5)
    H = cfg.image_size
    batch = dict(video=torch.rand(2, 3, 1 + cfg.num_future_frames, H, H, device=DEV, generator=g) * 2 - 1,
                 state=torch.rand(2, cfg.state_dim, device=DEV, generator=g) * 2 - 1,
                 actions=torch.rand(2, cfg.action_horizon, cfg.action_dim, device=DEV, generator=g) * 2 - 1,
                 instruction=["reach the red pad", "push the puck onto the blue pad"])
    results = {}
    try:
        for mode in ("1", "0"):
            dit4dit.select_backend(mode)
            model.zero_grad(set_to_none=True)
            loss = model.loss(batch, generator=torch.Generator(device=DEV).manual_seed(6))["loss"]
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            model.eval()
            actions = model.predict_action(batch["video"][:, :, 0], batch["state"], batch["instruction"],
                                           generator=torch.Generator(device=DEV).manual_seed(7))
            model.train()
            results[mode] = (loss.detach(), grads, actions)
    finally:
        dit4dit.select_backend(os.environ.get("DIT4DIT_KERNELS", "auto"))
    for name, a, b in zip(("loss", "gradients", "actions"), results["1"], results["0"]):
        assert _rel(a, b) <= 2e-4, name
