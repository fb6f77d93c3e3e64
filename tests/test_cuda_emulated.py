"""The CUDA kernels (kernels/csrc/cuda/*.cuh), executed on the CPU by the emulation harness.

tests/emu/cuda_emu.h turns the device headers into host C++: each CUDA thread is an OS
thread, `__syncthreads` a real barrier, warp shuffles real exchanges among the lanes of the
mask. tests/emu/emu_kernels.cpp launches the same kernels with the launchers' grids and
template arguments; it is compiled once per session (cached in ~/.cache/dit4dit/cuda_emu,
or DIT4DIT_EMU_BUILD_DIR) and called through ctypes on raw pointers of CPU tensors.

Accuracy rule: outputs and gradients are compared with a float64 ground truth computed from
the same (rounded) inputs. float32 must match tightly; for float16 and bfloat16 the kernel's
error may be at most twice the error of the PyTorch reference run on the same-dtype inputs
(kernels/reference.py, which computes in float32 and rounds the result), plus one unit of
the dtype at the largest magnitude.
mean, rstd and lse are float32 outputs at every dtype and must match tightly.

When a GPU is visible the same comparisons run on the device against the built kernels._C.
"""
import ctypes
import functools
import math
import os
import pathlib

import pytest
import torch

from kernels.reference import adaln_modulate as reference_modulate
from kernels.reference import attention as reference_attention
from kernels.reference import qk_norm_rope as reference_qk_norm_rope
from kernels.reference import residual_modulate as reference_residual_modulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "emu"
CUDA_DIR = ROOT / "kernels" / "csrc" / "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
EPS = 1e-6

# (B, N, D, G): rows B*N not a multiple of the 4 rows of a block, D not a multiple of 32.
ADALN_SHAPES = [(2, 9, 40, 1), (2, 9, 70, 3)]
# (B, nh, Lq, hd, Lk): one per head-dim bucket (32, 64, 128), partial Q and K/V tiles, Lq != Lk.
ATTN_SHAPES = [(1, 2, 37, 40, 45), (1, 1, 70, 16, 9), (1, 1, 20, 80, 33)]
# Tensor-core attention (B, nh, Lq, hd, Lk). Forward tiles: 64 query rows by BC = 64 keys at
# hd 64, 32 at hd 128; backward tiles: 64 keys by BR = 32 query rows at hd 64, 16 at hd 128.
# Lq and Lk not multiples of the tiles, Lq != Lk (both ways), B*nh > 1, several tiles of each
# kind; a single query; a single key; and the paper preset's action cross-attention (17 action
# queries at hd 64), with 2 of its 12 heads and 130 of its 768 keys (3 K/V tiles of the backward).
ATTN_TC_SHAPES = [(1, 2, 150, 64, 100), (2, 1, 37, 128, 77), (1, 1, 1, 64, 45), (1, 1, 20, 128, 1),
                  (1, 2, 17, 64, 130)]
# (B, nh, N, hd): rows not a multiple of the 4 rows of a block; hd 24 (the toy), 18 (odd pair
# count) and 80 (more than 32 pairs: lanes own two; more than 32 columns for the weight kernel).
QK_SHAPES = [(2, 3, 7, 24), (1, 2, 5, 18), (1, 2, 6, 80)]


# ----------------------------------------------------------------------------------------------
# Reference: the project's one PyTorch body per op (kernels/reference.py).
def _reference(fn, keys, inputs, grad_outs):
    """{keys: the outputs of fn(*inputs), then the gradients of sum_i(output_i * grad_outs[i]) for every
    input} by autograd, in the dtype of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grad_outs)
    return dict(zip(keys, [o.detach() for o in outs] + [t.grad for t in leaves]))


def _assert_accuracy(name, got, low, truth, dtype):
    """got: kernel result; low: PyTorch in the same dtype; truth: float64 from the same inputs."""
    truth = truth.double()
    err = (got.double() - truth).abs().max().item()
    scale = max(truth.abs().max().item(), 1.0)
    if dtype == torch.float32:
        bound = 2e-5 * scale
    else:
        torch_err = (low.double() - truth).abs().max().item()
        bound = 2 * torch_err + torch.finfo(dtype).eps * scale
    assert err <= bound, f"{name} ({dtype}): max error {err:.3g} > bound {bound:.3g}"


def _assert_float32_stat(name, got, truth):
    torch.testing.assert_close(got.double(), truth.double(), rtol=1e-4, atol=1e-5, msg=f"{name} mismatch")


# ----------------------------------------------------------------------------------------------
# The emulation library.
class Emu:
    def __init__(self, path):
        lib = ctypes.CDLL(path)
        p, i, f, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_longlong
        err = [ctypes.c_char_p, i]
        lib.emu_adaln_fwd.argtypes = [i, p, p, p, p, p, p, i, i, i, i, f] + err
        lib.emu_adaln_bwd.argtypes = [i, p, p, p, p, p, p, p, p, i, i, i, i] + err
        lib.emu_residual_fwd.argtypes = [i, p, p, p, p, p, p, p, p, p, i, i, i, i, f] + err
        lib.emu_residual_bwd.argtypes = [i, p, p, p, p, p, p, p, p, p, p, p, p, p, i, i, i, i] + err
        lib.emu_qk_norm_rope_fwd.argtypes = [i, p, p, p, p, p, p, i, i, i, f, i] + err
        lib.emu_qk_norm_rope_bwd.argtypes = [i, p, p, p, p, p, p, p, p, p, i, i, i, i] + err
        lib.emu_attention_fwd.argtypes = [i, p, p, p, p, p, i, i, i, i] + err
        lib.emu_attention_bwd.argtypes = [i, p, p, p, p, p, p, p, p, p, p, p, i, i, i, i] + err
        lib.emu_attention_fwd_tc.argtypes = [i, p, p, p, p, p, i, i, i, i] + err
        lib.emu_attention_bwd_tc.argtypes = [i, p, p, p, p, p, p, p, p, p, p, p, i, i, i, i] + err
        lib.emu_set_mma_b_layout_fault.argtypes = [i]
        lib.emu_set_ldmatrix_trans_fault.argtypes = [i]
        lib.emu_attention_fwd_broken.argtypes = [p, p, p, p, p, i, i, i, i] + err
        lib.emu_warp_sum.argtypes = [p, p, i, i] + err
        lib.emu_half_warp_sum.argtypes = [p, p, i] + err
        lib.emu_bad_kernel.argtypes = [i, p] + err
        lib.emu_float_to_half.argtypes = [p, p, ll]
        lib.emu_float_to_bfloat16.argtypes = [p, p, ll]
        lib.emu_half_to_float.argtypes = [p, p, ll]
        self.lib = lib

    def call(self, fn, *args):
        """Runs fn(*args, err, errlen); raises RuntimeError with the harness's message on failure."""
        buf = ctypes.create_string_buffer(4096)
        conv = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
        if getattr(self.lib, fn)(*conv, buf, len(buf)) != 0:
            raise RuntimeError(buf.value.decode())

    def adaln_fwd(self, x, shift, scale):
        B, N, D = x.shape
        y = torch.empty_like(x)
        mean = torch.empty(B, N)
        rstd = torch.empty(B, N)
        self.call("emu_adaln_fwd", DTYPE_CODE[x.dtype], x, shift, scale, y, mean, rstd, B, N, D, shift.shape[1], EPS)
        return y, mean, rstd

    def adaln_bwd(self, dy, x, scale, mean, rstd):
        B, N, D = x.shape
        G = scale.shape[1]
        dx, dshift, dscale = torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)
        self.call("emu_adaln_bwd", DTYPE_CODE[x.dtype], dy, x, scale, mean, rstd, dx, dshift, dscale, B, N, D, G)
        return dx, dshift, dscale

    def residual_fwd(self, x, y, gate, shift, scale):
        B, N, D = x.shape
        x_new, h = torch.empty_like(x), torch.empty_like(x)
        mean, rstd = torch.empty(B, N), torch.empty(B, N)
        self.call("emu_residual_fwd", DTYPE_CODE[x.dtype], x, y, gate, shift, scale, x_new, h, mean, rstd, B, N, D,
                  shift.shape[1], EPS)
        return x_new, h, mean, rstd

    def residual_bwd(self, dx_new, dh, x_new, y, gate, scale, mean, rstd):
        B, N, D = x_new.shape
        dx, dy = torch.empty_like(x_new), torch.empty_like(x_new)
        dgate, dshift, dscale = (torch.empty_like(scale) for _ in range(3))
        self.call("emu_residual_bwd", DTYPE_CODE[x_new.dtype], dx_new, dh, x_new, y, gate, scale, mean, rstd, dx, dy,
                  dgate, dshift, dscale, B, N, D, scale.shape[1])
        return dx, dy, dgate, dshift, dscale

    def qk_norm_rope_fwd(self, x, weight, cos, sin, interleaved):
        B, nh, N, hd = x.shape
        y, rstd = torch.empty_like(x), torch.empty(B, nh, N)
        self.call("emu_qk_norm_rope_fwd", DTYPE_CODE[x.dtype], x, weight, cos, sin, y, rstd, B * nh * N, N, hd, EPS,
                  int(interleaved))
        return y, rstd

    def qk_norm_rope_bwd(self, dy, x, weight, cos, sin, rstd, interleaved):
        B, nh, N, hd = x.shape
        rows = B * nh * N
        dx, dw = torch.empty_like(x), torch.empty(hd)
        partial = torch.empty(min(64, -(-rows // 8)), hd)  # kQkWeightBlocks, kQkWeightRows
        self.call("emu_qk_norm_rope_bwd", DTYPE_CODE[x.dtype], dy, x, weight, cos, sin, rstd, dx, partial, dw, rows,
                  N, hd, int(interleaved))
        return dx, dw

    def attention_fwd(self, q, k, v, broken=False):
        B, nh, Lq, hd = q.shape
        o = torch.empty_like(q)
        lse = torch.empty(B, nh, Lq)
        if broken:
            self.call("emu_attention_fwd_broken", q, k, v, o, lse, B * nh, Lq, k.shape[2], hd)
        else:
            self.call("emu_attention_fwd", DTYPE_CODE[q.dtype], q, k, v, o, lse, B * nh, Lq, k.shape[2], hd)
        return o, lse

    def attention_fwd_tc(self, q, k, v):
        """The tensor-core forward (attention_tc.cuh): float16 / bfloat16, hd 64 or 128."""
        B, nh, Lq, hd = q.shape
        o = torch.empty_like(q)
        lse = torch.empty(B, nh, Lq)
        self.call("emu_attention_fwd_tc", DTYPE_CODE[q.dtype], q, k, v, o, lse, B * nh, Lq, k.shape[2], hd)
        return o, lse

    def attention_bwd(self, do, q, k, v, o, lse, tensor_cores=False):
        """The SIMT backward (attention.cuh), or with tensor_cores=True the tensor-core one
        (attention_tc_bwd.cuh: float16 / bfloat16, hd 64 or 128)."""
        B, nh, Lq, hd = q.shape
        delta = torch.empty(B, nh, Lq)
        dq_accum = torch.zeros(q.shape)
        dq = dq_accum if q.dtype == torch.float32 else torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        fn = "emu_attention_bwd_tc" if tensor_cores else "emu_attention_bwd"
        self.call(fn, DTYPE_CODE[q.dtype], do, q, k, v, o, lse, delta, dq_accum, dq, dk, dv, B * nh, Lq, k.shape[2],
                  hd)
        return dq, dk, dv


def _cpu_has_fma():
    try:
        return " fma " in pathlib.Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


# nvcc contracts a * b + c into one fused multiply-add by default (--fmad=true; --use_fast_math
# keeps it), while g++ in ISO C++ mode does not: without these flags the emulation would hide
# rounding that only the GPU shows (an exactly cancelling difference of a product and its own
# rounded copy, as in the adaLN backward at D = 1, is not zero after contraction).
_CONTRACT_FLAGS = ["-ffp-contract=fast"] + (["-mfma"] if _cpu_has_fma() else [])


@pytest.fixture(scope="session")
def emu():
    from torch.utils.cpp_extension import load

    build = os.environ.get("DIT4DIT_EMU_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dit4dit", "cuda_emu")
    os.makedirs(build, exist_ok=True)
    name = "dit4dit_cuda_emu"
    load(name=name, sources=[str(EMU_DIR / "emu_kernels.cpp"), str(EMU_DIR / "emu_broken.cpp")],
         extra_include_paths=[str(EMU_DIR), str(CUDA_DIR)],
         extra_cflags=["-O2", "-std=c++20", "-pthread", "-Wno-unknown-pragmas"] + _CONTRACT_FLAGS,
         extra_ldflags=["-pthread"],
         build_directory=build, is_python_module=False, verbose=False)
    return Emu(os.path.join(build, name + ".so"))


# ----------------------------------------------------------------------------------------------
# Kernel runners: the emulated kernels on CPU tensors, or kernels._C on the GPU.
def _run_adaln_emu(emu, x, shift, scale, dy):
    y, mean, rstd = emu.adaln_fwd(x, shift, scale)
    dx, dshift, dscale = emu.adaln_bwd(dy, x, scale, mean, rstd)
    return dict(y=y, mean=mean, rstd=rstd, dx=dx, dshift=dshift, dscale=dscale)


def _run_adaln_cuda(x, shift, scale, dy):
    import kernels  # noqa: F401  (loads kernels._C and its CUDA registrations)

    ops = torch.ops.dit4dit
    dev = [t.cuda() for t in (x, shift, scale, dy)]
    y, mean, rstd = ops.adaln_modulate_fwd(dev[0], dev[1], dev[2], EPS)
    dx, dshift, dscale = ops.adaln_modulate_bwd(dev[3], dev[0], dev[2], mean, rstd, shift.shape[1])
    out = dict(y=y, mean=mean, rstd=rstd, dx=dx, dshift=dshift, dscale=dscale)
    return {key: t.cpu() for key, t in out.items()}


RESIDUAL_KEYS = ("x_new", "h", "dx", "dy", "dgate", "dshift", "dscale")


def _run_residual_emu(emu, x, y, gate, shift, scale, dx_new, dh):
    x_new, h, mean, rstd = emu.residual_fwd(x, y, gate, shift, scale)
    grads = emu.residual_bwd(dx_new, dh, x_new, y, gate, scale, mean, rstd)
    return dict(zip(RESIDUAL_KEYS, (x_new, h) + grads), mean=mean, rstd=rstd)


def _run_residual_cuda(x, y, gate, shift, scale, dx_new, dh):
    import kernels  # noqa: F401

    ops = torch.ops.dit4dit
    x, y, gate, shift, scale, dx_new, dh = (t.cuda() for t in (x, y, gate, shift, scale, dx_new, dh))
    x_new, h, mean, rstd = ops.residual_modulate_fwd(x, y, gate, shift, scale, EPS)
    grads = ops.residual_modulate_bwd(dx_new, dh, x_new, y, gate, scale, mean, rstd)
    out = dict(zip(RESIDUAL_KEYS, (x_new, h) + tuple(grads)), mean=mean, rstd=rstd)
    return {key: t.cpu() for key, t in out.items()}


QK_KEYS = ("y", "dx", "dweight")


def _run_qk_emu(emu, x, weight, cos, sin, dy, interleaved):
    y, rstd = emu.qk_norm_rope_fwd(x, weight, cos, sin, interleaved)
    dx, dw = emu.qk_norm_rope_bwd(dy, x, weight, cos, sin, rstd, interleaved)
    return dict(y=y, rstd=rstd, dx=dx, dweight=dw)


def _run_qk_cuda(x, weight, cos, sin, dy, interleaved):
    import kernels  # noqa: F401

    ops = torch.ops.dit4dit
    x, weight, cos, sin, dy = (t.cuda() for t in (x, weight, cos, sin, dy))
    y, rstd = ops.qk_norm_rope_fwd(x, weight, cos, sin, EPS, interleaved)
    dx, dw = ops.qk_norm_rope_bwd(dy, x, weight, cos, sin, rstd, interleaved)
    return {key: t.cpu() for key, t in dict(y=y, rstd=rstd, dx=dx, dweight=dw).items()}


def _run_attn_emu(emu, q, k, v, do):
    o, lse = emu.attention_fwd(q, k, v)
    dq, dk, dv = emu.attention_bwd(do, q, k, v, o, lse)
    return dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv)


def _run_attn_tc_emu(emu, q, k, v, do):
    """What attention.cu runs for float16 / bfloat16 at hd 64 or 128 on sm_80+: the tensor-core
    forward, then the tensor-core backward on its o and lse."""
    o, lse = emu.attention_fwd_tc(q, k, v)
    dq, dk, dv = emu.attention_bwd(do, q, k, v, o, lse, tensor_cores=True)
    return dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv)


def _run_attn_cuda(q, k, v, do):
    import kernels  # noqa: F401

    ops = torch.ops.dit4dit
    dev = [t.cuda() for t in (q, k, v, do)]
    o, lse = ops.attention_fwd(dev[0], dev[1], dev[2])
    dq, dk, dv = ops.attention_bwd(dev[3], dev[0], dev[1], dev[2], o, lse)
    return {key: t.cpu() for key, t in dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv).items()}


def _adaln_inputs(shape, dtype, seed=0):
    B, N, D, G = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=gen) * 2 + 0.5).to(dtype)
    shift = torch.randn(B, G, D, generator=gen).to(dtype)
    scale = (0.5 * torch.randn(B, G, D, generator=gen)).to(dtype)
    dy = torch.randn(B, N, D, generator=gen).to(dtype)
    return x, shift, scale, dy


def _residual_inputs(shape, dtype, seed=0):
    """(x, y, gate, shift, scale, grad of x_new, grad of h) of residual_modulate."""
    B, N, D, G = shape
    gen = torch.Generator().manual_seed(seed)
    x, y, dx_new, dh = ((torch.randn(B, N, D, generator=gen) * 2 + 0.5).to(dtype) for _ in range(4))
    gate, shift, scale = ((0.5 * torch.randn(B, G, D, generator=gen)).to(dtype) for _ in range(3))
    return x, y, gate, shift, scale, dx_new, dh


def _attn_inputs(shape, dtype, seed=0):
    B, nh, Lq, hd, Lk = shape
    gen = torch.Generator().manual_seed(seed)
    q = (1.5 * torch.randn(B, nh, Lq, hd, generator=gen)).to(dtype)
    k = (1.5 * torch.randn(B, nh, Lk, hd, generator=gen)).to(dtype)
    v = torch.randn(B, nh, Lk, hd, generator=gen).to(dtype)
    do = torch.randn(B, nh, Lq, hd, generator=gen).to(dtype)
    return q, k, v, do


def _qk_inputs(shape, dtype, seed=0):
    """(x, weight, cos, sin, grad of y) of qk_norm_rope; weight and the tables are float32."""
    B, nh, N, hd = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, nh, N, hd, generator=gen) * 2).to(dtype)
    weight = 1 + 0.5 * torch.randn(hd, generator=gen)
    angle = torch.rand(N, hd // 2, generator=gen) * 20 - 10
    dy = torch.randn(B, nh, N, hd, generator=gen).to(dtype)
    return x, weight, angle.cos(), angle.sin(), dy


def _check_qk(run, inputs, interleaved):
    """run(x, weight, cos, sin, dy, interleaved) -> the kernel's outputs, checked on `inputs`
    (_qk_inputs): y and dx like every op's outputs; grad_weight and rstd are float32 at every
    dtype and are compared with the float64 truth at float32 tolerance."""
    x, weight, cos, sin, dy = inputs
    got = run(x, weight, cos, sin, dy, interleaved)

    def fn(x, weight):  # the tables follow weight's dtype (float64 for the truth)
        return reference_qk_norm_rope(x, weight, cos.to(weight.dtype), sin.to(weight.dtype), EPS, interleaved)

    dtype = x.dtype
    truth = _reference(fn, QK_KEYS, [x.double(), weight.double()], [dy.double()])
    low = _reference(fn, QK_KEYS, [x, weight], [dy])
    for key in ("y", "dx"):
        assert got[key].dtype == dtype and got[key].shape == truth[key].shape, key
        _assert_accuracy(key, got[key], low[key], truth[key], dtype)
    assert got["dweight"].dtype == torch.float32
    rows = x.numel() // x.shape[-1]
    torch.testing.assert_close(got["dweight"].double(), truth["dweight"], rtol=1e-4, atol=1e-4 * rows ** 0.5,
                               msg="dweight mismatch")
    _assert_float32_stat("rstd", got["rstd"], torch.rsqrt(x.double().square().mean(-1) + EPS))


def _check_outputs(got, fn, keys, inputs, grad_outs):
    """The kernel's outputs and input gradients `got` against the float64 truth of fn, within the
    error bar of fn run on the same-dtype inputs (_assert_accuracy)."""
    dtype = inputs[0].dtype
    truth = _reference(fn, keys, [t.double() for t in inputs], [g.double() for g in grad_outs])
    low = _reference(fn, keys, inputs, grad_outs)
    for key in keys:
        assert got[key].dtype == dtype and got[key].shape == truth[key].shape, key
        _assert_accuracy(key, got[key], low[key], truth[key], dtype)


def _check_adaln(run, inputs):
    """run(x, shift, scale, dy) -> the kernel's outputs, checked on `inputs` (_adaln_inputs)."""
    x, shift, scale, dy = inputs
    got = run(x, shift, scale, dy)
    _check_outputs(got, lambda *tensors: reference_modulate(*tensors, EPS), ("y", "dx", "dshift", "dscale"),
                   (x, shift, scale), (dy,))
    x64 = x.double()
    _assert_float32_stat("mean", got["mean"], x64.mean(-1))
    _assert_float32_stat("rstd", got["rstd"], torch.rsqrt(x64.var(-1, unbiased=False) + EPS))


def _check_residual(run, inputs):
    """run(x, y, gate, shift, scale, dx_new, dh) -> the kernel's outputs, checked on `inputs`
    (_residual_inputs); mean and rstd are the statistics of the returned x_new."""
    got = run(*inputs)
    _check_outputs(got, lambda *tensors: reference_residual_modulate(*tensors, EPS), RESIDUAL_KEYS, inputs[:5],
                   inputs[5:])
    x_new = got["x_new"].double()
    _assert_float32_stat("mean", got["mean"], x_new.mean(-1))
    _assert_float32_stat("rstd", got["rstd"], torch.rsqrt(x_new.var(-1, unbiased=False) + EPS))


def _check_residual_one_feature(run, dtype):
    """D = 1: h = shift, and LayerNorm adds exactly 0 to the gradient of x: grad x = grad x_new."""
    inputs = _residual_inputs((2, 6, 1, 3), dtype)
    got = run(*inputs)
    assert torch.equal(got["h"], inputs[3].repeat_interleave(2, dim=1))
    assert torch.equal(got["dx"], inputs[5]), f"grad x at D = 1 is not grad x_new: {got['dx'].flatten()}"
    _check_residual(run, inputs)


def _check_attn(run, inputs):
    """run(q, k, v, do) -> the kernel's outputs, checked on `inputs` (_attn_inputs)."""
    q, k, v, do = inputs
    got = run(q, k, v, do)
    _check_outputs(got, reference_attention, ("o", "dq", "dk", "dv"), (q, k, v), (do,))
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    _assert_float32_stat("lse", got["lse"], torch.logsumexp(scores, -1))


def _check_adaln_one_feature(run, dtype):
    """D = 1: LayerNorm of a single value is 0 whatever x, so y = shift and dx is exactly zero (the
    fp32 rstd is 1/sqrt(eps) = 1000 there, so any rounding in dx is multiplied by 1000)."""
    x, shift, scale, dy = _adaln_inputs((2, 6, 1, 3), dtype)
    got = run(x, shift, scale, dy)
    assert torch.equal(got["y"], shift.repeat_interleave(2, dim=1))
    assert torch.equal(got["dx"], torch.zeros_like(x)), f"dx at D = 1 is not zero: {got['dx'].flatten()}"
    _check_adaln(run, (x, shift, scale, dy))


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "B{}N{}D{}G{}".format(*s))
def test_adaln_emulated(emu, shape, dtype):
    _check_adaln(functools.partial(_run_adaln_emu, emu), _adaln_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adaln_emulated_one_feature(emu, dtype):
    _check_adaln_one_feature(functools.partial(_run_adaln_emu, emu), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "B{}N{}D{}G{}".format(*s))
def test_residual_modulate_emulated(emu, shape, dtype):
    _check_residual(functools.partial(_run_residual_emu, emu), _residual_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_modulate_emulated_one_feature(emu, dtype):
    _check_residual_one_feature(functools.partial(_run_residual_emu, emu), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}H{}Lq{}hd{}Lk{}".format(*s))
def test_attention_emulated(emu, shape, dtype):
    _check_attn(functools.partial(_run_attn_emu, emu), _attn_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ATTN_TC_SHAPES, ids=lambda s: "B{}H{}Lq{}hd{}Lk{}".format(*s))
def test_attention_tensor_core_emulated(emu, shape, dtype):
    _check_attn(functools.partial(_run_attn_tc_emu, emu), _attn_inputs(shape, dtype))


@pytest.mark.parametrize("hd", [64, 128])
def test_attention_tensor_core_wrong_b_layout_is_caught(emu, hd):
    """The same kernel with the emulated mma reading its B fragments transposed (k and n swapped
    inside each 8x8 block) is far from the truth: the tests see a wrong fragment layout."""
    q, k, v, _ = _attn_inputs((1, 2, 70, hd, 45), torch.bfloat16, seed=2)
    truth = reference_attention(q.double(), k.double(), v.double())
    good, _ = emu.attention_fwd_tc(q, k, v)
    assert (good.double() - truth).abs().max() < 0.05
    emu.lib.emu_set_mma_b_layout_fault(1)
    try:
        wrong, _ = emu.attention_fwd_tc(q, k, v)
    finally:
        emu.lib.emu_set_mma_b_layout_fault(0)
    assert (wrong.double() - truth).abs().max() > 0.3


def _set_fault(emu, fault, on):
    {"mma_b_layout": emu.lib.emu_set_mma_b_layout_fault,
     "ldmatrix_trans": emu.lib.emu_set_ldmatrix_trans_fault}[fault](int(on))


@pytest.mark.parametrize("fault", ["mma_b_layout", "ldmatrix_trans"])
@pytest.mark.parametrize("hd", [64, 128])
def test_attention_tensor_core_backward_wrong_layout_is_caught(emu, hd, fault):
    """The tensor-core backward with the emulated mma reading its B fragments transposed, or with
    the emulated ldmatrix ignoring .trans (the B operands of dV += P^T dO and dK += dS^T Q, both
    operands of dQ += dS K), gives gradients far from the truth; the forward runs without the fault."""
    q, k, v, do = _attn_inputs((1, 1, 37, hd, 70), torch.bfloat16, seed=2)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    truth = torch.autograd.grad(reference_attention(*leaves), leaves, do.double())
    o, lse = emu.attention_fwd_tc(q, k, v)

    def worst_relative_error(grads):
        return max(((g.double() - t).abs().max() / t.abs().max()).item() for g, t in zip(grads, truth))

    assert worst_relative_error(emu.attention_bwd(do, q, k, v, o, lse, tensor_cores=True)) < 0.03
    _set_fault(emu, fault, True)
    try:
        wrong = emu.attention_bwd(do, q, k, v, o, lse, tensor_cores=True)
    finally:
        _set_fault(emu, fault, False)
    assert worst_relative_error(wrong) > 0.3


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QK_SHAPES, ids=lambda s: "B{}H{}N{}hd{}".format(*s))
def test_qk_norm_rope_emulated(emu, shape, dtype, interleaved):
    _check_qk(functools.partial(_run_qk_emu, emu), _qk_inputs(shape, dtype), interleaved)


def test_broken_kernel_is_caught(emu):
    """The forward kernel without the barrier after staging K gives wrong results."""
    q, k, v, _ = _attn_inputs((1, 2, 37, 40, 100), torch.float32, seed=1)
    good, _ = emu.attention_fwd(q, k, v)
    truth = reference_attention(q.double(), k.double(), v.double())
    assert (good.double() - truth).abs().max() < 1e-4
    try:
        broken, _ = emu.attention_fwd(q, k, v, broken=True)
    except RuntimeError:  # the harness reporting a race as an error also counts
        return
    assert not torch.isfinite(broken).all() or (broken.double() - truth).abs().max() > 1e-2


def test_harness_warp_reduction(emu):
    x = torch.randn(3 * 96)
    out = torch.empty(3 * 3)
    emu.call("emu_warp_sum", x, out, 3, 96)
    torch.testing.assert_close(out, x.view(9, 32).sum(-1), rtol=1e-5, atol=1e-5)


def test_harness_disjoint_shuffles(emu):
    """Half-warps exchanging with disjoint masks in different branches is legal and works."""
    x = torch.randn(64)
    out = torch.empty(4)
    emu.call("emu_half_warp_sum", x, out, 64)
    torch.testing.assert_close(out, x.view(4, 16).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which, message", [
    (0, "divergent barrier"),  # part of the block skips a __syncthreads
    (1, "divergent barrier"),  # two halves wait at different __syncthreads
    (2, "not in the mask"),    # a lane reads a lane outside the shuffle's mask
    (3, "does not include itself"),  # lanes call a shuffle whose mask excludes them
])
def test_harness_reports_sync_errors(emu, which, message):
    with pytest.raises(RuntimeError, match=message):
        emu.call("emu_bad_kernel", which, torch.zeros(64))


def test_harness_half_conversions_match_torch(emu):
    """The emulated __half / __nv_bfloat16 round to nearest even exactly like torch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-9, 6, (4000,), generator=gen),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, -3e-8, 6e-5, float("inf"),
                                 float("-inf")])])
    for fn, dtype in (("emu_float_to_half", torch.float16), ("emu_float_to_bfloat16", torch.bfloat16)):
        bits = torch.empty(x.numel(), dtype=torch.int16)
        getattr(emu.lib, fn)(x.data_ptr(), bits.data_ptr(), x.numel())
        assert torch.equal(bits, x.to(dtype).view(torch.int16)), fn
    halves = x.to(torch.float16)
    back = torch.empty(x.numel())
    emu.lib.emu_half_to_float(halves.data_ptr(), back.data_ptr(), x.numel())
    assert torch.equal(back, halves.float())


# ----------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA kernels are compiled by .ci/build_cuda.sh and executed here only under "
           "CPU emulation")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "B{}N{}D{}G{}".format(*s))
def test_adaln_on_device(shape, dtype):
    _check_adaln(_run_adaln_cuda, _adaln_inputs(shape, dtype))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adaln_on_device_one_feature(dtype):
    _check_adaln_one_feature(_run_adaln_cuda, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "B{}N{}D{}G{}".format(*s))
def test_residual_modulate_on_device(shape, dtype):
    _check_residual(_run_residual_cuda, _residual_inputs(shape, dtype))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_modulate_on_device_one_feature(dtype):
    _check_residual_one_feature(_run_residual_cuda, dtype)


@needs_gpu
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "half"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QK_SHAPES, ids=lambda s: "B{}H{}N{}hd{}".format(*s))
def test_qk_norm_rope_on_device(shape, dtype, interleaved):
    _check_qk(_run_qk_cuda, _qk_inputs(shape, dtype), interleaved)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}H{}Lq{}hd{}Lk{}".format(*s))
def test_attention_on_device(shape, dtype):
    _check_attn(_run_attn_cuda, _attn_inputs(shape, dtype))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ATTN_TC_SHAPES, ids=lambda s: "B{}H{}Lq{}hd{}Lk{}".format(*s))
def test_attention_tensor_core_on_device(shape, dtype):
    """On sm_80+ these shapes take the tensor-core forward and backward (attention_tc.cuh,
    attention_tc_bwd.cuh)."""
    _check_attn(_run_attn_cuda, _attn_inputs(shape, dtype))
