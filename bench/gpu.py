"""The Python steps of one prepared GPU run (.ci/gpu_check.sh): the fused kernels against
PyTorch's built-ins, the `paper` preset's control rate, its training step at the largest batch
that fits, and the `toy` preset's training speed.

    PYTHONPATH=. python3 bench/gpu.py env                       # device, versions, copy and matmul ceilings
    PYTHONPATH=. python3 bench/gpu.py shapes                    # the op shapes of the presets, with the arithmetic
    PYTHONPATH=. python3 bench/gpu.py ops [--reps 25]           # each op vs SDPA (flash, efficient, cuDNN) / eager adaLN
    PYTHONPATH=. python3 bench/gpu.py predict [--repeats 20]    # paper preset, bf16, batch 1: early exit vs the release's path
    PYTHONPATH=. python3 bench/gpu.py paper-train [--steps 5]   # paper preset, bf16 autocast + AdamW, batch 1, 2, 4, ... until OOM
    PYTHONPATH=. python3 bench/gpu.py train --data .gpu_data    # toy preset, 100 steps, DiT4DiT and --action-only
    PYTHONPATH=. python3 bench/gpu.py make-data --out .gpu_data # here, before the run: scripted demos to carry
    PYTHONPATH=. python3 bench/gpu.py summary                   # the short table of the results file

Every step takes --cpu-smoke (the same code at tiny sizes on the CPU, so that a crash shows up
here and not on the device) and --json FILE (results appended, one JSON object per line).

Timing: every variant is warmed up, then the variants run interleaved (one call of each per
round) and the median is reported; on CUDA each call is timed with CUDA events. Work counts
follow bench/ops.py: attention forward 4·B·nh·Lq·Lk·hd FLOP, backward 2.5× that (the
recomputation of the scores counted, FlashAttention's convention); adaLN forward reads x and
writes y, backward reads dy and x and writes dx (the small shift/scale/statistics traffic is
left out). "row/kernel" is a row's time over the kernel's: above 1 the kernel is faster.
"""
import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_HZ_A100 = 6.0  # DiT4DiT paper: about 6 Hz for the full model on an A100 (docs/design.md §3.9)

# The paper's latents: Wan2.1 VAE, 16 channels, 8x spatial, 4x temporal (causal: the first frame
# alone, then groups of 4). Its text: a frozen LM's features, here S precomputed embeddings.
VAE_CHANNELS, VAE_SPATIAL, VAE_TEMPORAL = 16, 8, 4
PAPER_TEXT_TOKENS = 512  # assumption: the paper fixes no S; Cosmos-Predict pads its text to 512 tokens


# ----------------------------------------------------------------------------------------------
# Shapes of the ops inside a preset's model

def causal_latent_frames(num_frames, temporal_factor):
    """Latent frames of a causal video VAE: the first frame alone, then one per `temporal_factor`."""
    return 1 + math.ceil((num_frames - 1) / temporal_factor)


def model_shapes(cfg, spatial_factor, temporal_factor, text_tokens):
    """The token arithmetic of a config with a tokenizer of the given factors.

    Returns dict(lines=[str], plus the numbers): pixels -> latents -> patches -> tokens, for the
    video DiT (self-attention over all frames' tokens, cross-attention to the text, per-frame
    adaLN) and the action DiT ([state, K actions] tokens, cross-attention to h)."""
    H = cfg.image_size
    latent = H // spatial_factor
    side = latent // cfg.patch_size
    frames = 1 + cfg.num_future_frames
    T = causal_latent_frames(frames, temporal_factor)
    N = T * side * side
    hd_v = cfg.video_width // cfg.video_heads
    hd_a = cfg.action_width // cfg.action_heads
    La = 1 + cfg.action_horizon
    # what the action DiT cross-attends to: h (all frames' tokens, or the conditioning frame's),
    # plus the instruction's tokens with action_text
    context = (N if cfg.feature_frames == "all" else side * side) + (text_tokens if cfg.action_text else 0)
    lines = [
        f"image {H} px / {spatial_factor}x spatial = {latent}x{latent} latent; / patch {cfg.patch_size} = "
        f"{side}x{side} = {side * side} tokens per latent frame",
        f"frames: 1 conditioning + {cfg.num_future_frames} future = {frames}; {temporal_factor}x temporal "
        f"(causal: 1 + ceil({frames - 1}/{temporal_factor})) = {T} latent frames",
        f"video tokens N = {T} x {side * side} = {N}; video DiT {cfg.video_heads} heads x {hd_v}, width "
        f"{cfg.video_width}, text tokens S = {text_tokens}",
        f"action DiT tokens = 1 state + {cfg.action_horizon} actions = {La}; {cfg.action_heads} heads x {hd_a}, "
        f"width {cfg.action_width}; cross-attention to {context} tokens (features: {cfg.feature_frames} "
        f"frames{', + the text tokens' if cfg.action_text else ''})",
    ]
    return dict(lines=lines, latent=latent, tokens_per_frame=side * side, latent_frames=T, video_tokens=N,
                video_heads=cfg.video_heads, video_head_dim=hd_v, video_width=cfg.video_width, text_tokens=text_tokens,
                action_tokens=La, action_context=context, action_heads=cfg.action_heads, action_head_dim=hd_a,
                action_width=cfg.action_width, repeat=cfg.repeat)


def op_cases(s, batch):
    """The attention and adaLN calls of one forward at batch B = `batch` (the action DiT's
    training batch is B*R: R noise draws per sample share h). Returns a list of
    (name, op, shape): attention (B, nh, Lq, Lk, hd), adaln (B, N, D, G)."""
    Ba = batch * s["repeat"] if batch > 1 else 1
    N, S, T = s["video_tokens"], s["text_tokens"], s["latent_frames"]
    return [
        ("video self-attn", "attention", (batch, s["video_heads"], N, N, s["video_head_dim"])),
        ("video cross-attn (text)", "attention", (batch, s["video_heads"], N, S, s["video_head_dim"])),
        ("action cross-attn (h)", "attention", (Ba, s["action_heads"], s["action_tokens"], s["action_context"],
                                                s["action_head_dim"])),
        ("action self-attn", "attention", (Ba, s["action_heads"], s["action_tokens"], s["action_tokens"],
                                           s["action_head_dim"])),
        ("video adaLN (per frame)", "adaln", (batch, N, s["video_width"], T)),
        ("action adaLN", "adaln", (Ba, s["action_tokens"], s["action_width"], 1)),
    ]


def preset_shapes(preset, text_tokens=None):
    import dit4dit

    cfg = dit4dit.make_config(preset)
    if preset == "paper":
        return model_shapes(cfg, VAE_SPATIAL, VAE_TEMPORAL, text_tokens or PAPER_TEXT_TOKENS)
    # toy presets: the pixel tokenizer (1x, 1x) and the byte-level text encoder's fixed length
    return model_shapes(cfg, 1, 1, text_tokens or cfg.text_max_len)


def attention_flops(shape, backward=False):
    B, nh, Lq, Lk, hd = shape
    return 4.0 * B * nh * Lq * Lk * hd * (2.5 if backward else 1.0)


def adaln_bytes(shape, dtype, backward=False):
    B, N, D, _ = shape
    return (3 if backward else 2) * B * N * D * torch.finfo(dtype).bits // 8


# ----------------------------------------------------------------------------------------------
# Timing and the results file

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fns, device, reps, warmup=3):
    """Median milliseconds per call of each callable in `fns` (dict), calls interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def record(path, step, payload):
    """Append one JSON object to the results file (JSON Lines)."""
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **payload}, default=str) + "\n")


def rel_err(got, truth):
    """||got - truth|| / ||truth|| in float64; inf when got has NaN or inf."""
    got, truth = got.double(), truth.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def pick_device(cpu_smoke):
    if cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device visible (use --cpu-smoke for a dry run on the CPU)")
    return torch.device("cuda")


# ----------------------------------------------------------------------------------------------
# env: the device and its two ceilings (METHOD.md: measure them in the run)

def cmd_env(args):
    device = pick_device(args.cpu_smoke)
    info = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = f"unavailable ({err})"
    else:
        info["device"] = f"CPU ({os.cpu_count()} logical cores), --cpu-smoke"
    n = 2 ** 20 if args.cpu_smoke else 2 ** 28  # 1 GiB of float32 on the device
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    ms = time_calls({"copy": lambda: y.copy_(x)}, device, reps=5 if args.cpu_smoke else 20)["copy"]
    info["copy_GBps"] = round(2 * x.numel() * 4 / ms / 1e6, 1)  # read + write
    m = 256 if args.cpu_smoke else 8192
    dt = torch.float32 if args.cpu_smoke else torch.bfloat16
    a, b = torch.randn(m, m, device=device, dtype=dt), torch.randn(m, m, device=device, dtype=dt)
    ms = time_calls({"mm": lambda: a @ b}, device, reps=5 if args.cpu_smoke else 20)["mm"]
    info[f"matmul_{m}_{str(dt).split('.')[-1]}_TFLOPs"] = round(2 * m ** 3 / ms / 1e9, 1)
    for key, value in info.items():
        print(f"{key:28s} {value}")
    record(args.json, "env", info)
    return info


def cmd_shapes(args):
    out = {}
    for preset in ("toy", "paper"):
        s = preset_shapes(preset, args.text_tokens if preset == "paper" else None)
        print(f"{preset}:")
        for line in s["lines"]:
            print(f"  {line}")
        out[preset] = {k: v for k, v in s.items() if k != "lines"}
    record(args.json, "shapes", out)
    return out


# ----------------------------------------------------------------------------------------------
# ops: each fused op against PyTorch's built-ins

def sdpa_variants():
    """name -> SDPA restricted to one backend (None when this torch lacks torch.nn.attention)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    out = {}
    for name, backend in (("SDPA flash", "FLASH_ATTENTION"), ("SDPA efficient", "EFFICIENT_ATTENTION"),
                          ("SDPA cuDNN", "CUDNN_ATTENTION")):
        if hasattr(SDPBackend, backend):
            def run(q, k, v, _b=getattr(SDPBackend, backend)):
                with sdpa_kernel(_b):
                    return F.scaled_dot_product_attention(q, k, v)
            out[name] = run
    return out


def eager_adaln(x, shift, scale):
    """dit4dit's own PyTorch path (what DIT4DIT_KERNELS=0 runs): F.layer_norm in fp32 + modulation.
    cmd_ops selects the torch backend once, so dit4dit.modulate is that path."""
    import dit4dit

    return dit4dit.modulate(x, shift, scale)


def _try(fn):
    """Call fn once: None when it works, else the first line of the error (a backend that
    rejects this dtype or shape)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA warns for every backend it cannot use
            fn()
        return None
    except (RuntimeError, ValueError, NotImplementedError) as err:
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:100]


SIMT_VARIANT = "dit4dit SIMT kernel (TC off)"


@contextmanager
def tensor_cores_off():
    """DIT4DIT_CUDA_ATTENTION_TC=0 inside the block: kernels/csrc/cuda/attention.cu reads it at
    every forward and backward call and then runs the SIMT kernels."""
    os.environ["DIT4DIT_CUDA_ATTENTION_TC"] = "0"
    try:
        yield
    finally:
        del os.environ["DIT4DIT_CUDA_ATTENTION_TC"]


def simt_attention(q, k, v):
    """kernels.attention with the tensor-core forward switched off: the SIMT kernel, for comparison
    (a backward row also runs its gradient call under tensor_cores_off)."""
    import kernels

    with tensor_cores_off():
        return kernels.attention(q, k, v)


def attention_paths(inputs):
    """Which CUDA kernels kernels.attention launches on `inputs`, forward and backward, from the
    profiler's kernel names: {"fwd": ..., "bwd": ...}, each the tensor-core kernel
    (attention_tc.cuh, attention_tc_bwd.cuh) or the SIMT one (attention.cuh)."""
    import kernels
    from torch.profiler import ProfilerActivity, profile

    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = kernels.attention(*leaves)
            out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
    except Exception as err:  # a profiler without CUPTI: say so rather than fail the step
        why = f"unknown (profiler: {str(err).splitlines()[0][:80]})"
        return dict(fwd=why, bwd=why)
    return attention_paths_from_names(names)


def attention_paths_from_names(names):
    """{"fwd": ..., "bwd": ...} from the kernel names of a profiled forward and backward."""
    def which(tc, simt):
        if any(tc in n for n in names):
            return f"tensor cores ({tc})"
        if any(simt in n for n in names):
            return f"SIMT ({simt})"
        return "unknown (no dit4dit attention kernel in the profile)"

    return dict(fwd=which("attention_fwd_tc_kernel", "attention_fwd_kernel"),
                bwd=which("attention_bwd_tc_kernel", "attention_bwd_kernel"))


def with_tensor_cores_off(fn):
    """fn, called under tensor_cores_off."""
    def run(*args):
        with tensor_cores_off():
            return fn(*args)
    return run


def bench_one(name, op, shape, dtype, device, reps, backward):
    """Time the kernel and its baselines on one shape, print a block, return a result dict.
    err: each variant's relative error against float64 math on the same (rounded) inputs: the
    output for a forward row, the worst of the input gradients for a backward row."""
    import kernels

    g = torch.Generator(device=device).manual_seed(0)
    if op == "attention":
        B, nh, Lq, Lk, hd = shape
        inputs = [torch.randn(B, nh, L, hd, device=device, generator=g).to(dtype) for L in (Lq, Lk, Lk)]
        variants = {"dit4dit kernel": kernels.attention, **sdpa_variants(),
                    "PyTorch reference (fp32 compute)": kernels.reference_attention}
        if device.type == "cpu":  # no flash/efficient/cuDNN on the CPU: the default dispatch stands in
            variants = {"dit4dit kernel": kernels.attention, "SDPA (default)": F.scaled_dot_product_attention,
                        "PyTorch reference (fp32 compute)": kernels.reference_attention}
        reference, work, unit = kernels.reference_attention, attention_flops(shape, backward), "TFLOP/s"
        path = attention_paths(inputs)["bwd" if backward else "fwd"] if device.type == "cuda" else "CPU kernel"
        if device.type == "cuda" and path.startswith("tensor cores"):
            variants = {"dit4dit kernel": kernels.attention, SIMT_VARIANT: simt_attention,
                        **{n: f for n, f in variants.items() if n != "dit4dit kernel"}}
    else:
        B, N, D, G = shape
        path = None
        inputs = [(torch.randn(B, N, D, device=device, generator=g) * 2 + 0.5).to(dtype),
                  torch.randn(B, G, D, device=device, generator=g).to(dtype),
                  (torch.randn(B, G, D, device=device, generator=g) * 0.5).to(dtype)]
        variants = {"dit4dit kernel": kernels.adaln_modulate, "eager adaLN (dit4dit torch path)": eager_adaln,
                    "PyTorch reference (fp32 compute)": kernels.reference_adaln_modulate}
        reference, work, unit = kernels.reference_adaln_modulate, adaln_bytes(shape, dtype, backward), "GB/s"
    leaves64 = [t.detach().double().requires_grad_(backward) for t in inputs]
    truth = reference(*leaves64)
    grad_out = torch.randn(truth.shape, device=device, generator=g).to(dtype)
    if backward:
        truth = torch.autograd.grad(truth, leaves64, grad_out.double())
    fns, errs, skipped = {}, {}, {}
    for n, fn in variants.items():
        if backward:
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            why = _try(lambda: fn(*leaves))
            if why is None:
                out = fn(*leaves)
                call = (lambda o=out, ls=leaves: torch.autograd.grad(o, ls, grad_out, retain_graph=True))
                if n == SIMT_VARIANT:  # the SIMT backward too
                    call = with_tensor_cores_off(call)
                why = _try(call)
        else:
            call = (lambda f=fn: f(*inputs))
            why = _try(call)
        if why is not None:
            skipped[n] = why
            continue
        fns[n] = call
        got = call()
        errs[n] = max(rel_err(a, b) for a, b in zip(got, truth)) if backward else rel_err(got, truth)
    ms = time_calls(fns, device, reps)
    direction = "bwd" if backward else "fwd"
    dname = str(dtype).split(".")[-1]
    print(f"{op} {direction}  {name}  {tuple(shape)}  {dname}")
    if path is not None:
        print(f"    dit4dit {'backward' if backward else 'forward'} path: {path}")
    print(f"    {'variant':34s} {'ms':>9s} {unit:>9s} {'row/kernel':>10s} {'rel. err':>9s}")
    k = ms.get("dit4dit kernel")
    for n, t in ms.items():
        rate = work / t / (1e9 if unit == "TFLOP/s" else 1e6)
        print(f"    {n:34s} {t:9.4f} {rate:9.2f} {(t / k if k else float('nan')):10.2f} {errs[n]:9.1e}")
    for n, why in skipped.items():
        print(f"    {n:34s} {'n/a':>9s}   ({why})")
    return dict(name=name, op=op, shape=list(shape), dtype=dname, direction=direction, ms=ms, errors=errs,
                skipped=skipped, unit=unit, work=work, path=path)


def cmd_ops(args):
    import dit4dit
    import kernels

    device = pick_device(args.cpu_smoke)
    if not kernels.available():
        sys.exit(f"gpu_bench ops: kernels._C is not available ({kernels.load_error()})")
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("dit4dit::attention_fwd", "CUDA"):
        sys.exit("gpu_bench ops: kernels._C has no CUDA kernels (built without FORCE_CUDA/CUDA?)")
    dtypes = [torch.float32] if args.cpu_smoke else [torch.float32, torch.bfloat16]
    dit4dit.select_backend("0")  # dit4dit.modulate is then the eager baseline; the kernel is called directly
    rows = []
    for preset in args.presets:
        s = preset_shapes(preset, args.text_tokens if preset == "paper" else None)
        train_batch = args.train_batch.get(preset, 8)
        if args.cpu_smoke:  # same code, small sizes: shrink the token counts
            s = dict(s, video_tokens=min(s["video_tokens"], 48), text_tokens=min(s["text_tokens"], 9),
                     action_context=min(s["action_context"], 48),
                     video_width=min(s["video_width"], 64), action_width=min(s["action_width"], 32))
            train_batch = 2
        print(f"== {preset}: " + "; ".join(s.get("lines", [])[2:3]))
        for batch, backward_too in ((1, False), (train_batch, True)):
            for name, op, shape in op_cases(s, batch):
                for dtype in dtypes:
                    for backward in ((False, True) if backward_too else (False,)):
                        label = f"{preset} {name}, {'inference' if batch == 1 else 'training'} batch"
                        rows.append(dict(preset=preset, **bench_one(label, op, shape, dtype, device,
                                                                    args.reps, backward)))
    record(args.json, "ops", dict(device=device_name(device), reps=args.reps, rows=rows))
    broken = [f"{r['name']} {r['dtype']} {r['direction']}: " + r["skipped"].get("dit4dit kernel", "non-finite output")
              for r in rows if "dit4dit kernel" in r["skipped"] or not math.isfinite(r["errors"]["dit4dit kernel"])]
    if broken:
        sys.exit("gpu_bench ops: the kernel failed on\n  " + "\n  ".join(broken))
    return rows


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--cpu-smoke)"


# ----------------------------------------------------------------------------------------------
# predict: the paper preset's control rate

class LatentStandIn(nn.Module):
    """Stand-in for the Wan2.1 VAE behind dit4dit's tokenizer interface: the VAE's shapes
    (16 channels, 8x spatial, causal 4x temporal) at almost no cost. encode averages each group
    of 4 frames after the first, folds 8x8 pixel blocks into channels and projects them to 16
    with a fixed random matrix; decode inverts that approximately. Its time is not the VAE's."""

    channels, spatial_factor, temporal_factor = VAE_CHANNELS, VAE_SPATIAL, VAE_TEMPORAL

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        fan_in = 3 * self.spatial_factor ** 2
        self.register_buffer("proj", torch.randn(fan_in, self.channels, generator=g) / math.sqrt(fan_in))

    def latent_frames(self, num_frames):
        return causal_latent_frames(num_frames, self.temporal_factor)

    def encode(self, video):  # (B, 3, T, H, W) -> (B, 16, T', H/8, W/8)
        video = video.to(self.proj.dtype)
        first, rest = video[:, :, :1], video[:, :, 1:]
        groups = [first] + [rest[:, :, i:i + self.temporal_factor].mean(2, keepdim=True)
                            for i in range(0, rest.shape[2], self.temporal_factor)]
        x = torch.cat(groups, dim=2)  # (B, 3, T', H, W)
        B, C, T, H, W = x.shape
        x = F.pixel_unshuffle(x.transpose(1, 2).reshape(B * T, C, H, W), self.spatial_factor)  # (B*T', 192, h, w)
        x = torch.einsum("nchw,cd->ndhw", x, self.proj)  # (B*T', 16, h, w)
        return x.reshape(B, T, self.channels, *x.shape[-2:]).transpose(1, 2)  # (B, 16, T', h, w)

    def decode(self, latents):  # (B, 16, T', h, w) -> (B, 3, T', H, W), one frame per latent frame
        B, C, T, h, w = latents.shape
        x = torch.einsum("ndhw,cd->nchw", latents.transpose(1, 2).reshape(B * T, C, h, w), self.proj)
        x = F.pixel_shuffle(x, self.spatial_factor)  # (B*T', 3, H, W)
        return x.reshape(B, T, 3, *x.shape[-2:]).transpose(1, 2).clamp(-1, 1)


def randomize_zero_init(model, seed=0):
    """Random weights where adaLN-Zero left zeros (modulation outputs, final layers), scaled by
    fan-in so activations keep their size: no path of the model is trivially zero."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * (0.5 / math.sqrt(fan_in)))
    return model


def small_paper_config():
    """The paper preset's structure (LoRA adaLN, VAE latents, text embeddings, K = 16, F = 8) at a
    width a CPU runs in seconds: the --cpu-smoke stand-in for `paper`."""
    import dit4dit

    return dit4dit.make_config("paper", image_size=64, video_width=96, video_depth=6, video_heads=4,
                               video_mlp_dim=128, adaln_lora_rank=8, text_dim=32, text_proj_dim=16, action_width=48,
                               action_depth=4, action_heads=4, action_mlp_dim=64, action_hidden_dim=96,
                               extract_layer=3)


def build_model(preset, device, dtype, cpu_smoke, randomize=True):
    """The preset's model (with the stand-in VAE tokenizer when it takes 16-channel latents), built
    on `device`, zero-initialized layers randomized, cast to `dtype`, in eval mode."""
    import dit4dit

    cfg = small_paper_config() if (cpu_smoke and preset == "paper") else dit4dit.make_config(preset)
    tokenizer = LatentStandIn() if cfg.latent_channels == VAE_CHANNELS else None
    torch.manual_seed(0)
    with torch.device(device):
        model = dit4dit.DiT4DiT(cfg, tokenizer=tokenizer)
    model.to(device)  # the tokenizer was built outside the device context
    if randomize:
        randomize_zero_init(model)
    return model.to(dtype).eval()


def predict_inputs(model, device, dtype, text_tokens, seed=0, batch=1):
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(seed)
    H = cfg.image_size
    obs = (torch.rand(batch, 3, H, H, device=device, generator=g) * 2 - 1).to(dtype)
    state = (torch.rand(batch, cfg.state_dim, device=device, generator=g) * 2 - 1).to(dtype)
    if cfg.text_encoder == "embeddings":  # precomputed LM features (B, S, D_text), as the paper preset takes
        text = torch.randn(batch, text_tokens, cfg.text_dim, device=device, generator=g).to(dtype)
    else:
        text = ["push the puck onto the red pad"] * batch
    return obs, state, text


def release_path():
    """The release's predict_action (tests/oracle.py), which early exit must agree with."""
    from tests.oracle import release_predict_action
    return release_predict_action


def cmd_predict(args):
    import dit4dit
    import kernels

    release_predict_action = release_path()

    device = pick_device(args.cpu_smoke)
    results = []
    for preset in args.presets:
        t0 = time.perf_counter()
        dtype = torch.bfloat16
        model = build_model(preset, device, dtype, args.cpu_smoke)
        cfg = model.config
        n_params = sum(p.numel() for p in model.parameters())
        sync(device)
        print(f"== predict_action, preset {preset}{' (small stand-in, --cpu-smoke)' if args.cpu_smoke and preset == 'paper' else ''}: "
              f"{n_params / 1e9:.3f} B parameters in {str(dtype).split('.')[-1]}, built on {device} in {time.perf_counter() - t0:.1f} s; "
              f"batch 1, extract_layer {cfg.extract_layer} of {cfg.video_depth} blocks, "
              f"{cfg.num_action_steps} Euler steps")
        obs, state, text = predict_inputs(model, device, dtype, args.text_tokens)
        # on the CPU the kernels run in float32 (the CPU attention kernel has no bf16): bf16 first
        backends = ["0"] if not kernels.available() else ["1", "0"] if device.type == "cuda" else ["0", "1"]
        if not kernels.available():
            print(f"    fused kernels not available ({kernels.load_error()}): PyTorch backend only")
        actions = {}
        for mode in backends:
            dit4dit.select_backend(mode)
            run_dtype = dtype
            if mode == "1" and device.type == "cpu":  # the CPU attention kernel is float32/float64 only
                model, run_dtype = model.float(), torch.float32
                obs, state, text = predict_inputs(model, device, run_dtype, args.text_tokens)
            amp = torch.autocast(device.type, dtype=torch.bfloat16) if run_dtype == torch.bfloat16 else nullcontext()

            def fast(seed=1):
                with amp:
                    return model.predict_action(obs, state, text, generator=torch.Generator(device=device).manual_seed(seed))

            def naive(seed=1):
                with torch.inference_mode(), amp:  # the grad mode predict_action runs in
                    return release_predict_action(model, obs, state, text, torch.Generator(device=device).manual_seed(seed))

            a_fast, a_naive = fast().float(), naive().float()
            diff = (a_fast - a_naive).abs().max().item()
            agree = diff <= args.tolerance
            actions[mode] = a_fast
            ms = time_calls({"fast": fast, "naive": naive}, device, args.repeats, warmup=2)
            backend = "fused kernels" if mode == "1" else "PyTorch (SDPA, eager adaLN)"
            dname = str(run_dtype).split(".")[-1]
            print(f"  backend {backend}, {dname}{' autocast' if run_dtype == torch.bfloat16 else ''}:")
            for label, t in (("early exit + cached K/V (predict_action)", ms["fast"]),
                             (f"all {cfg.video_depth} blocks + K/V every step (release)", ms["naive"])):
                print(f"    {label:46s} {t:9.2f} ms  {1e3 / t:8.1f} Hz")
            print(f"    speed-up {ms['naive'] / ms['fast']:.2f}x" + (
                f"; paper: about {PAPER_HZ_A100:g} Hz on an A100 (its whole policy; here a stand-in tokenizer "
                f"and precomputed text embeddings)" if preset == "paper" else ""))
            print(f"    same seed, max |fast - release| of the actions: {diff:.2e} "
                  f"({'OK' if agree else 'MISMATCH'}, tolerance {args.tolerance:g})")
            results.append(dict(preset=preset, backend=mode, dtype=dname, fast_ms=ms["fast"], naive_ms=ms["naive"],
                                fast_hz=1e3 / ms["fast"], naive_hz=1e3 / ms["naive"], max_diff=diff, agree=agree,
                                params=n_params, device=device_name(device)))
        if len(actions) == 2:
            cross = (actions["1"] - actions["0"]).abs().max().item()
            print(f"  kernels vs PyTorch backend, same seed: max |diff| of the actions {cross:.2e} (report only)")
            results[-1]["kernels_vs_torch_max_diff"] = cross
        dit4dit.select_backend(os.environ.get("DIT4DIT_KERNELS", "auto"))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record(args.json, "predict", dict(rows=results))
    bad = [r for r in results if not r["agree"]]
    if bad:
        sys.exit("gpu_bench predict: early exit and the release path disagree: "
                 + ", ".join(f"{r['preset']} backend {r['backend']} max |diff| {r['max_diff']:.2e}" for r in bad))
    return results


# ----------------------------------------------------------------------------------------------
# paper-train: the paper preset's training step, and the largest batch that fits

PAPER_LR_VIDEO, PAPER_LR_ACTION = 1e-5, 1e-4  # docs/design.md §3.9: the video DiT's and the action DiT's rates
TRAIN_WARMUP = 2  # untimed steps per batch size: the first allocates AdamW's states and picks the kernels


def train_inputs(model, device, text_tokens, batch, seed=0):
    """A random training batch of `batch` samples for DiT4DiT.loss, on `device` in the model's
    dtype: bench/model.py's video, state and actions, and the text as predict_inputs draws it (the
    paper preset's precomputed LM features (B, S, text_dim), drawn on the device)."""
    from bench.model import toy_inputs

    dtype = next(model.parameters()).dtype
    inputs = toy_inputs(model.config, batch, seed)
    out = {key: inputs[key].to(device, dtype) for key in ("video", "state", "actions")}
    text = predict_inputs(model, device, dtype, text_tokens, seed, batch=batch)[2]
    out["text" if torch.is_tensor(text) else "instruction"] = text
    return out


def measure_train_batch(model, optimizer, device, amp_dtype, text_tokens, batch, steps):
    """Median time of one optimizer step at this batch size, as train_toy.train_step takes it with
    one micro-step: the loss under autocast, backward, gradient clipping, AdamW. The peak memory
    counts from the caller's reset (weights, gradients, AdamW's states, activations, the batch)."""
    import train_toy

    inputs = train_inputs(model, device, text_tokens, batch)
    generator = torch.Generator(device=device).manual_seed(0)
    losses = []

    def step():
        with train_toy.autocast(device, amp_dtype):
            loss = model.loss(inputs, generator)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_toy.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    ms = time_calls({"step": step}, device, reps=steps, warmup=TRAIN_WARMUP)["step"]
    row = dict(batch=batch, ms=ms, samples_s=batch * 1e3 / ms, loss=losses[-1].float().item(),
               peak_gib=None, reserved_gib=None)
    if device.type == "cuda":
        row.update(peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30,
                   reserved_gib=torch.cuda.max_memory_reserved(device) / 2 ** 30)
    return row


def out_of_memory(err):
    """Whether an error is the device running out of memory: torch's OutOfMemoryError, or a
    library's failed allocation inside an op (cuBLAS and cuDNN raise a plain RuntimeError)."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def gib(value):
    return "n/a" if value is None else f"{value:.1f}"


def cmd_paper_train(args):
    import dit4dit
    import train_toy

    device = pick_device(args.cpu_smoke)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # train_toy.pick_device's rule
    max_batch = args.max_batch or (2 if args.cpu_smoke else 256)
    steps = 2 if args.cpu_smoke else args.steps
    t0 = time.perf_counter()
    # fp32 weights, as train_toy.py trains: AdamW keeps two fp32 states per weight, 16 bytes per
    # parameter with the gradient (about 35 GB at 2.2 B parameters) before any activation
    model = build_model("paper", device, torch.float32, args.cpu_smoke).train()
    optimizer = torch.optim.AdamW(train_toy.param_groups(model, PAPER_LR_VIDEO, PAPER_LR_ACTION),
                                  betas=train_toy.BETAS)
    n_params = sum(p.numel() for p in model.parameters())
    weights_gib = torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    amp = "bf16 autocast" if amp_dtype else "fp32"
    print(f"== training step, preset paper{' (small stand-in, --cpu-smoke)' if args.cpu_smoke else ''} on "
          f"{device_name(device)}: {n_params / 1e9:.3f} B parameters, fp32 weights ({gib(weights_gib)} GiB), {amp}, "
          f"AdamW (lr video {PAPER_LR_VIDEO:g}, action {PAPER_LR_ACTION:g}), grad clip {train_toy.GRAD_CLIP:g}; "
          f"activation checkpointing: none (dit4dit.py has none); fused-op backend {dit4dit.backend()}; "
          f"built in {time.perf_counter() - t0:.1f} s")
    print(f"    batch sizes 1, 2, 4, ... up to {max_batch} (per GPU), until out of memory or the "
          f"{args.budget_s:g} s budget; {TRAIN_WARMUP} warm-up + {steps} timed steps each (median)")
    print(f"    {'batch':>5s} {'ms/step':>10s} {'samples/s':>10s} {'peak GiB':>9s} {'reserved GiB':>13s} {'loss':>8s}")
    rows, oom_at, stopped = [], None, f"--max-batch {max_batch} reached"
    batch = 1
    while batch <= max_batch:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_batch = time.perf_counter()
        try:
            row = measure_train_batch(model, optimizer, device, amp_dtype, args.text_tokens, batch, steps)
        except RuntimeError as err:
            if not out_of_memory(err):
                raise
            oom_at, why = batch, (str(err).strip().splitlines() or ["out of memory"])[0][:120]
        if oom_at is not None:
            # the error's frames held the batch and the activations: free them, and the gradients
            # of the step that failed, before reporting
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"    {batch:5d} out of memory ({why})")
            stopped = f"out of memory at batch {batch}"
            break
        rows.append(row)
        print(f"    {batch:5d} {row['ms']:10.1f} {row['samples_s']:10.2f} {gib(row['peak_gib']):>9s} "
              f"{gib(row['reserved_gib']):>13s} {row['loss']:8.4f}")
        took, spent = time.perf_counter() - t_batch, time.perf_counter() - t0
        if 2 * batch <= max_batch and spent + 2 * took > args.budget_s:  # the step time grows about linearly
            stopped = (f"time budget: batch {2 * batch} would take about {2 * took:.0f} s, "
                       f"{max(0.0, args.budget_s - spent):.0f} s of {args.budget_s:g} s left")
            break
        batch *= 2
    largest = rows[-1]["batch"] if rows else None
    print(f"    largest batch that fit: {largest if largest else 'none'}; stopped by {stopped}")
    result = dict(device=device_name(device), params=n_params, amp=amp, weights_gib=weights_gib,
                  activation_checkpointing=False, lr_video=PAPER_LR_VIDEO, lr_action=PAPER_LR_ACTION,
                  grad_clip=train_toy.GRAD_CLIP, warmup=TRAIN_WARMUP, steps=steps, budget_s=args.budget_s,
                  max_batch=max_batch, rows=rows, largest_fit=largest, oom_at=oom_at, stopped=stopped,
                  cpu_smoke=args.cpu_smoke)
    record(args.json, "paper-train", result)
    if not rows:
        sys.exit("gpu_bench paper-train: not even batch 1 fits")
    bad = [r["batch"] for r in rows if not math.isfinite(r["loss"])]
    if bad:
        sys.exit(f"gpu_bench paper-train: non-finite loss at batch size(s) {bad}")
    return result


# ----------------------------------------------------------------------------------------------
# train: seconds per step of train_toy.py

def probe_mujoco_gl(env):
    """MUJOCO_GL for the training runs: the caller's (egl by default) when `import eval_sim` works
    with it, else "disable" (training from --data renders nothing; a machine without EGL
    libraries fails at `import mujoco` with MUJOCO_GL=egl)."""
    for value in (env.get("MUJOCO_GL", "egl"), "disable"):
        probe = subprocess.run([sys.executable, "-c", "import eval_sim"], cwd=ROOT, capture_output=True,
                               text=True, env={**env, "MUJOCO_GL": value}, timeout=120)
        if probe.returncode == 0:
            return value, None
        print(f"    import eval_sim with MUJOCO_GL={value} failed: {probe.stderr.strip().splitlines()[-1:]}")
    return None, probe.stderr[-2000:]


def read_step_seconds(log_path):
    """Seconds per step from train_log.jsonl, leaving out step 1 (it pays the one-off costs)."""
    rows = [json.loads(line) for line in open(log_path) if line.strip()]
    if len(rows) < 2:
        raise ValueError(f"{log_path}: need at least two log rows, got {len(rows)}")
    first, last = rows[0], rows[-1]
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"]), last


def cmd_train(args):
    device = pick_device(args.cpu_smoke)
    env = dict(os.environ)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # train_toy picks CUDA whenever one is visible
    gl, err = probe_mujoco_gl(env)
    if gl is None:
        sys.exit(f"gpu_bench train: train_toy.py cannot import eval_sim:\n{err}")
    env["MUJOCO_GL"] = gl
    steps = 3 if args.cpu_smoke else args.steps
    runs = args.runs or tempfile.mkdtemp(prefix="dit4dit_gpu_runs_")
    variants = [("DiT4DiT", [], "auto"), ("action-only", ["--action-only"], "auto")]
    if args.with_torch_backend:
        variants.append(("DiT4DiT, DIT4DIT_KERNELS=0", [], "0"))
    results = []
    for name, flags, kernels_mode in variants:
        out = os.path.join(runs, name.split(",")[0].replace(" ", "_") + ("_torch" if kernels_mode == "0" else ""))
        cmd = [sys.executable, "train_toy.py", "--data", args.data, "--eval-episodes", "0", "--steps", str(steps),
               "--out", out, "--log-every", str(max(1, steps // 10)), "--ckpt-every", str(steps), *flags]
        if args.cpu_smoke:
            cmd += ["--batch-size", "4", "--threads", "1"]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                             env={**env, "DIT4DIT_KERNELS": kernels_mode})
        wall = time.perf_counter() - t0
        if run.returncode != 0:
            print(f"  {name}: train_toy.py failed (rc {run.returncode}): {' '.join(cmd)}\n{run.stdout[-1500:]}"
                  f"{run.stderr[-3000:]}")
            results.append(dict(name=name, ok=False, rc=run.returncode))
            continue
        per_step, last = read_step_seconds(os.path.join(out, "train_log.jsonl"))
        head = [line for line in run.stdout.splitlines() if line.startswith(("run folder", "preset", "measured"))]
        print(f"  {name}: {steps} steps, {per_step * 1e3:.1f} ms/step (steps 2..{steps}), wall {wall:.1f} s "
              f"(process start, data, model, training); final loss {last['loss']:.4f} "
              f"(action {last['action_loss']:.4f}, video {last['video_loss']:.4f})")
        for line in head:
            print(f"      {line}")
        results.append(dict(name=name, ok=True, steps=steps, s_per_step=per_step, wall_s=wall, final=last,
                            kernels=kernels_mode, mujoco_gl=gl))
    record(args.json, "train", dict(device=device_name(device), rows=results))
    if not all(r["ok"] for r in results):
        sys.exit("gpu_bench train: a training run failed")
    return results


# ----------------------------------------------------------------------------------------------
# make-data (here, before the run) and summary (last lines of the device log)

def cmd_make_data(args):
    import eval_sim
    from bridges.episodes import save_episode
    from suites import toy

    n = 0
    for task in toy.TASKS:
        for seed in toy.demo_seeds(task, args.demos_per_task):
            path = os.path.join(args.out, task, f"seed_{seed:06d}.npz")
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                save_episode(path, eval_sim.collect_episode(task, seed, args.image_size))
            n += 1
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
    print(f"{n} episodes in {args.out} ({size / 2 ** 20:.1f} MiB)")
    return n


def summarize(rows_by_step):
    """Short table of the results: one line per op, shape, dtype and direction (the kernel's time,
    the best built-in's, and best/kernel: above 1 the kernel is faster), then predict, the paper
    preset's training step per batch size, and train."""
    lines = []
    for row in rows_by_step.get("ops", {}).get("rows", []):
        ms = row["ms"]
        k = ms.get("dit4dit kernel")
        base = {n: t for n, t in ms.items() if n.startswith(("SDPA", "eager"))}
        if k is None or not base:
            continue
        best, t = min(base.items(), key=lambda kv: kv[1])
        what = row["name"].split(",")[0].split(" ", 1)[1]  # "paper video self-attn, ..." -> "video self-attn"
        shape = "x".join(map(str, row["shape"]))
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(row["dtype"], row["dtype"])
        lines.append(f"{row['preset']:5s} {what:24s} {shape:18s} {dtype} {row['direction']}  "
                     f"kernel {k:8.4f} ms  {best.replace('SDPA ', '').split(' (')[0]:9s} {t:8.4f} ms  "
                     f"best/kernel {t / k:5.2f}x")
    for row in rows_by_step.get("predict", {}).get("rows", []):
        lines.append(f"predict_action {row['preset']} {'kernels' if row['backend'] == '1' else 'torch'} "
                     f"{row['dtype']}: {row['fast_ms']:.2f} ms = {row['fast_hz']:.1f} Hz (early exit + K/V cache) vs "
                     f"{row['naive_ms']:.2f} ms = {row['naive_hz']:.1f} Hz (release path)"
                     + (f"; paper ~{PAPER_HZ_A100:g} Hz on A100" if row["preset"] == "paper" else "")
                     + f"; actions agree: {row['agree']}")
    paper = rows_by_step.get("paper-train")
    if paper:
        for row in paper["rows"]:
            lines.append(f"paper train step, batch {row['batch']}, {paper['amp']} + AdamW: {row['ms']:.1f} ms/step = "
                         f"{row['samples_s']:.2f} samples/s, peak {gib(row['peak_gib'])} GiB")
        lines.append(f"paper train step: largest batch that fit {paper['largest_fit']} on {paper['device']} "
                     f"(stopped by {paper['stopped']}; activation checkpointing: "
                     f"{'yes' if paper['activation_checkpointing'] else 'none'})")
    for row in rows_by_step.get("train", {}).get("rows", []):
        if row.get("ok"):
            lines.append(f"train_toy {row['name']}: {row['s_per_step'] * 1e3:.1f} ms/step over {row['steps']} steps")
        else:
            lines.append(f"train_toy {row['name']}: FAILED (rc {row['rc']})")
    return lines


def cmd_summary(args):
    rows = {}
    if args.json and os.path.exists(args.json):
        for line in open(args.json):
            if line.strip():
                obj = json.loads(line)
                rows[obj["step"]] = obj
    env = rows.get("env", {})
    ceilings = ", ".join(f"{k} {v}" for k, v in env.items() if k.startswith(("copy_", "matmul_")))
    print(f"summary ({env.get('device', '?')}, torch {env.get('torch', '?')}; measured ceilings: {ceilings or '?'}):")
    for line in summarize(rows):
        print("  " + line)
    return rows


# ----------------------------------------------------------------------------------------------
# Command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cpu-smoke", action="store_true", help="run at tiny sizes on the CPU (dry run)")
    common.add_argument("--json", default=None, metavar="FILE", help="append results to this JSON Lines file")
    common.add_argument("--text-tokens", type=int, default=PAPER_TEXT_TOKENS,
                        help=f"S, text tokens of the paper preset (default {PAPER_TEXT_TOKENS}, an assumption)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", parents=[common], help="device, versions, copy bandwidth and bf16 matmul rate")
    sub.add_parser("shapes", parents=[common], help="op shapes of the toy and paper presets, with the arithmetic")
    ops = sub.add_parser("ops", parents=[common], help="each fused op vs SDPA backends / eager adaLN")
    ops.add_argument("--reps", type=int, default=25, help="timed rounds per variant (median)")
    ops.add_argument("--presets", nargs="+", default=["toy", "paper"], choices=["toy", "paper"])
    pred = sub.add_parser("predict", parents=[common], help="predict_action: early exit + K/V cache vs release path")
    pred.add_argument("--repeats", type=int, default=20, help="timed calls per variant (median)")
    pred.add_argument("--presets", nargs="+", default=["paper"], choices=["toy", "paper"])
    pred.add_argument("--tolerance", type=float, default=2e-2,
                      help="max |diff| allowed between the two paths' actions (bf16; default 2e-2)")
    pt = sub.add_parser("paper-train", parents=[common],
                        help="paper preset training step: time and peak memory at batch 1, 2, 4, ... until out of memory")
    pt.add_argument("--steps", type=int, default=5, help="timed steps per batch size (median; --cpu-smoke: 2)")
    pt.add_argument("--budget-s", type=float, default=60.0,
                    help="seconds for the step, model build included: no larger batch once it would run past them")
    pt.add_argument("--max-batch", type=int, default=None,
                    help="largest batch size tried (default 256; --cpu-smoke: 2)")
    tr = sub.add_parser("train", parents=[common], help="seconds per step of train_toy.py on --data")
    tr.add_argument("--data", required=True, help="episode folder (make-data writes one)")
    tr.add_argument("--steps", type=int, default=100)
    tr.add_argument("--runs", default=None, help="parent of the training runs' folders (default: a new temp folder)")
    tr.add_argument("--with-torch-backend", action="store_true", help="also train with DIT4DIT_KERNELS=0")
    tr.add_argument("--timeout", type=float, default=240, help="seconds per training run")
    md = sub.add_parser("make-data", parents=[common], help="scripted demos to carry to the device")
    md.add_argument("--out", default=".gpu_data")
    md.add_argument("--demos-per-task", type=int, default=10)
    md.add_argument("--image-size", type=int, default=64)
    sub.add_parser("summary", parents=[common], help="short table of the --json results")
    return p


COMMANDS = {"env": cmd_env, "shapes": cmd_shapes, "ops": cmd_ops, "predict": cmd_predict,
            "paper-train": cmd_paper_train, "train": cmd_train, "make-data": cmd_make_data, "summary": cmd_summary}


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "ops":
        args.train_batch = {"toy": 32, "paper": 8}  # train_toy's default batch; a per-GPU paper batch
    for name in ("reps", "repeats", "steps", "text_tokens", "demos_per_task", "max_batch"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"gpu_bench: --{name.replace('_', '-')} must be >= 1")
    if getattr(args, "budget_s", 1) <= 0:
        raise SystemExit("gpu_bench: --budget-s must be > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
