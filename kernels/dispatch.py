"""The one switch between the fused kernels and their pure-PyTorch references: the functions
dit4dit.py calls for adaLN modulation (alone, and after a gated residual), the q/k RMSNorm +
rotary embedding, and attention. select_backend, or the environment variable
DIT4DIT_KERNELS=auto|0|1 read at import, chooses; backend() says which is active.

"1" uses every fused op. "auto" uses them on the CPU whenever the extension is built, and on a GPU
only where one was measured faster than PyTorch's own path for that op (CUDA_FASTER below); else
PyTorch (SDPA for attention). "0" always uses PyTorch."""
import logging
import os

import torch

import kernels  # the fused ops when built; always the references (kernels/reference.py)

log = logging.getLogger("dit4dit")


_BACKEND = None  # "kernels" or "torch", set by select_backend() at import; read it with backend()
_FORCED = False  # DIT4DIT_KERNELS=1: every fused op, on every device

# On CUDA, the ops whose fused kernel was measured faster than PyTorch's path (docs/kernels.md,
# "CUDA kernels on NVIDIA H200": one run, fp32 and bf16, the toy's and the paper's shapes).
# adaLN: 1.13-2.36x of eager F.layer_norm + modulation at every shape. Attention: 0.02-0.30x of
# SDPA over the paper's video tokens in bf16 (no tensor cores), so SDPA. residual_modulate and
# qk_norm_rope have not been measured on a GPU: PyTorch until a measurement says otherwise.
CUDA_FASTER = {"adaln_modulate": True, "residual_modulate": False, "qk_norm_rope": False,
               "attention": False}


def use_kernel(op, x):
    """Whether `op` runs the fused kernel for input x under the active backend."""
    if _BACKEND != "kernels":
        return False
    return _FORCED or x.device.type != "cuda" or CUDA_FASTER[op]


def select_backend(mode="auto"):
    """Choose the implementation of `modulate`, `residual_modulate` and `attention`: "auto" uses
    the fused kernels when the extension is built, "0" always uses PyTorch, "1" requires them."""
    global _BACKEND, _FORCED
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"mode (DIT4DIT_KERNELS) must be 'auto', '0' or '1', got {mode!r}")
    chosen, why = "torch", "DIT4DIT_KERNELS=0"
    if mode != "0":
        if kernels.available():
            chosen = "kernels"
        else:
            why = f"kernels._C is not loaded ({kernels.load_error()}); {kernels.BUILD_HINT}"
            if mode == "1":
                raise RuntimeError(f"DIT4DIT_KERNELS=1 asks for the fused kernels, but {why}")
    if chosen != _BACKEND:
        log.info("fused-op backend = %s%s", chosen, "" if chosen == "kernels" else f" ({why})")
    _BACKEND, _FORCED = chosen, mode == "1"
    return chosen


def backend():
    """The active implementation of the fused ops: "kernels" or "torch"."""
    return _BACKEND


def modulate(x, shift, scale):
    """adaLN modulation: LayerNorm(x) (no affine, eps 1e-6) * (1 + scale) + shift.

    x (B, N, D); shift, scale (B, G, D) with N divisible by G: the N tokens are G contiguous
    groups (G = 1: one vector per sample; G = T: one per frame) and group g uses row g."""
    if use_kernel("adaln_modulate", x):
        return kernels.adaln_modulate(x.contiguous(), shift.to(x.dtype).contiguous(),
                                      scale.to(x.dtype).contiguous(), eps=1e-6)
    return kernels.reference_adaln_modulate(x, shift, scale, eps=1e-6)


def residual_modulate(x, y, gate, shift, scale):
    """A sublayer's gated residual folded into the next sublayer's adaLN (one fused kernel):
    x_new = x + per_frame(gate, y), h = modulate(x_new, shift, scale). Returns (x_new, h).

    x, y (B, N, D); gate, shift, scale (B, G, D), grouped like `modulate`."""
    if use_kernel("residual_modulate", x):
        x = x.contiguous()
        y, gate, shift, scale = (t.to(x.dtype).contiguous() for t in (y, gate, shift, scale))
        return kernels.residual_modulate(x, y, gate, shift, scale, eps=1e-6)
    return kernels.reference_residual_modulate(x, y, gate, shift, scale, eps=1e-6)


def qk_norm_rope(x, norm, rot):
    """The per-head RMSNorm of q or k (norm: its RMSNorm module) and the rotary embedding of
    rope_3d, in one fused op: rot complex (N, hd/2) rotates the channel pairs (2i, 2i+1) read
    as complex numbers; rot = (cos, sin), each (N, hd), rotates the pairs (i, i + hd/2)
    ("rotate half"). x (B, nh, N, hd); computed in float32 (float64 for float64 x)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    if isinstance(rot, tuple):  # (N, hd) tables whose halves are equal -> the per-pair (N, hd/2)
        cos, sin = (t[:, : t.shape[1] // 2].to(acc) for t in rot)
    else:
        cos, sin = rot.real.to(acc), rot.imag.to(acc)
    interleaved = not isinstance(rot, tuple)
    if use_kernel("qk_norm_rope", x):
        return kernels.qk_norm_rope(x.contiguous(), norm.weight.to(acc), cos.contiguous(),
                                    sin.contiguous(), norm.eps, interleaved)
    return kernels.reference_qk_norm_rope(x, norm.weight, cos, sin, norm.eps, interleaved)


def attention(q, k, v):
    """Softmax attention without mask, scale 1/sqrt(hd). q (B, nh, Lq, hd), k, v (B, nh, Lk, hd)."""
    if use_kernel("attention", q):
        k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        return kernels.attention(q.contiguous(), k, v)
    return kernels.reference_attention(q, k, v)


select_backend(os.environ.get("DIT4DIT_KERNELS", "auto"))
