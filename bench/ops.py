"""Benchmark of the fused ops against the PyTorch reference and the best built-in alternatives.

    python -m bench.ops                        # from the repository root, after building the extension
    python -m bench.ops --reps 9               # more repetitions
    python -m bench.ops --threads 1 --ops adaln --reps 15   # adaLN only, one torch thread
    python -m bench.ops --threads 1 --ops residual          # residual_modulate only
    python -m bench.ops --threads 1 --ops qknorm            # qk_norm_rope only

For each op and size it prints the forward and backward times of
  - kernel:     the dit4dit op (kernels.adaln_modulate / kernels.residual_modulate /
                kernels.qk_norm_rope / kernels.attention, autograd for the backward),
  - unfused:    residual_modulate: what the video block ran before the fusion, the eager gated
                residual x + gate * y followed by the adaLN kernel; qk_norm_rope: what the video
                self-attention ran before the fusion on q and on k, the RMSNorm module's
                F.rms_norm with its casts, then the rotation (complex multiply, or chunk/cat and
                two multiplies) by rope_3d's precomputed tables,
  - reference:  kernels/reference.py, the PyTorch body dit4dit.py falls back to and the tests
                compare with; it is also the best built-in eager form (F.layer_norm + addcmul /
                F.scaled_dot_product_attention),
  - naive:      matmul-softmax-matmul (attention only),
  - copy:       x.clone(), the memory-bandwidth bar (adaLN only),
with the speed-up of the kernel over each, and the achieved GB/s (adaLN: bytes that must move,
fwd reads x and writes y, bwd reads dy and x and writes dx; residual_modulate: fwd reads x and y and
writes x_new and h, bwd reads the two incoming gradients, x_new and y and writes dx and dy;
qk_norm_rope: fwd reads x and writes y, bwd reads dy and x and writes dx) or GFLOP/s (attention: forward
4·B·H·Lq·Lk·hd, backward 10·B·H·Lq·Lk·hd, the FlashAttention convention that counts the
recomputation of the scores).

Timing: every variant is warmed up, then the variants are run interleaved (one call of each per
round, order rotated every round) and the median of the rounds is reported, so a burst of load
from other processes hits all variants alike. Backward times are backward-only: the graph is built
once and `torch.autograd.grad(..., retain_graph=True)` is timed.

Peak extra memory of attention (forward + backward) is measured in a fresh child process per
variant and size: after the inputs exist and a small warm-up ran, the kernel's peak-RSS mark is
reset (Linux, /proc/self/clear_refs) and the growth of VmHWM over the RSS at that point is
reported. RSS sees every allocation (torch's allocator and the kernels' own scratch buffers
alike), which torch.profiler's allocator view would not; the number includes the outputs and
gradients themselves (4 tensors of the input size, printed alongside), and a linear method shows
it doubling with L while a quadratic one quadruples.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

import torch

import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------- helpers

def hardware() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    caps = torch.backends.cpu.get_cpu_capability()
    return (f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, ATen CPU capability {caps}), python {platform.python_version()}")


def timeit(variants: dict, reps: int, warmup: int = 2) -> dict:
    """Median seconds per call of each variant, measured interleaved."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    samples = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            variants[n]()
            samples[n].append(time.perf_counter() - t0)
    return {n: statistics.median(s) for n, s in samples.items()}


def grad_timer(out, inputs, grad_out):
    """Times the backward of out (a tensor, or a tuple of them with matching grad_out)."""
    return lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)


def row(cols, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


TABLE_W = [44, 10, 10, 12, 12]


def print_block(title: str, times: dict, kernel: str, work: float, unit: str):
    """times: name -> seconds; work in bytes (unit 'GB/s') or flops (unit 'GFLOP/s')."""
    print(row([title, "ms", unit, "kernel ×", ""], TABLE_W))
    for name, t in times.items():
        speed = work / t / 1e9
        ratio = t / times[kernel]
        print(row([f"  {name}", f"{t * 1e3:.2f}", f"{speed:.1f}", f"{ratio:.2f}" if name != kernel else "1.00", ""],
                  TABLE_W))


# ----------------------------------------------------------------------------------------- adaLN

# Untimed calls per adaLN variant before the rounds. With 2 the first 16 MiB shape measured in a
# process came out up to 15 % slower than the same shape measured later (the allocator was still
# settling on where 16 MiB blocks come from); with 10 the order no longer shows.
ADALN_WARMUP = 10


def bench_adaln(B, N, D, G, reps, results):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g)
    shift = torch.randn(B, G, D, generator=g)
    scale = torch.randn(B, G, D, generator=g)
    fwd = timeit({
        "kernel": lambda: kernels.adaln_modulate(x, shift, scale),
        "reference (F.layer_norm)": lambda: kernels.reference_adaln_modulate(x, shift, scale),
        "x.clone() (bandwidth bar)": lambda: x.clone(),
    }, reps, warmup=ADALN_WARMUP)
    nbytes = x.numel() * x.element_size()
    print_block(f"adaLN fwd  B={B} N={N} D={D} G={G}", fwd, "kernel", 2 * nbytes, "GB/s")

    xs, shs, scs = (t.clone().requires_grad_() for t in (x, shift, scale))
    gy = torch.randn_like(x)
    y_k = kernels.adaln_modulate(xs, shs, scs)
    y_r = kernels.reference_adaln_modulate(xs, shs, scs)
    bwd = timeit({
        "kernel": grad_timer(y_k, (xs, shs, scs), gy),
        "reference autograd": grad_timer(y_r, (xs, shs, scs), gy),
    }, reps, warmup=ADALN_WARMUP)
    print_block(f"adaLN bwd  B={B} N={N} D={D} G={G}", bwd, "kernel", 3 * nbytes, "GB/s")
    results.append((f"adaLN fwd ({B},{N},{D}) G={G}: vs reference", fwd["reference (F.layer_norm)"] / fwd["kernel"],
                    1.5))
    results.append((f"adaLN fwd ({B},{N},{D}) G={G}: clone time / kernel time", fwd["x.clone() (bandwidth bar)"]
                    / fwd["kernel"], 0.8))
    results.append((f"adaLN bwd ({B},{N},{D}) G={G}: vs reference autograd", bwd["reference autograd"] / bwd["kernel"],
                    1.5))


# ----------------------------------------------------------------------------------------- residual_modulate

def unfused_residual_modulate(x, y, gate, shift, scale):
    """The video block's sequence before the fusion: eager gated residual, then the adaLN kernel."""
    B, N, D = x.shape
    G = gate.shape[1]
    x_new = x + (y.view(B, G, N // G, D) * gate[:, :, None]).view(B, N, D)  # (B, G, N/G, D) -> (B, N, D)
    return x_new, kernels.adaln_modulate(x_new, shift, scale)


def bench_residual(B, N, D, G, reps, results):
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(B, N, D, generator=g) for _ in range(2))
    gate, shift, scale = (torch.randn(B, G, D, generator=g) for _ in range(3))
    variants = {
        "kernel": kernels.residual_modulate,
        "unfused (eager x + gate*y, adaLN kernel)": unfused_residual_modulate,
        "reference (PyTorch)": kernels.reference_residual_modulate,
    }
    fwd = timeit({name: (lambda fn=fn: fn(x, y, gate, shift, scale)) for name, fn in variants.items()}, reps,
                 warmup=ADALN_WARMUP)
    nbytes = x.numel() * x.element_size()
    print_block(f"residual_modulate fwd  B={B} N={N} D={D} G={G}", fwd, "kernel", 4 * nbytes, "GB/s")

    inputs = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    grad_outs = (torch.randn_like(x), torch.randn_like(x))
    bwd = timeit({name: grad_timer(fn(*inputs), inputs, grad_outs) for name, fn in variants.items()}, reps,
                 warmup=ADALN_WARMUP)
    print_block(f"residual_modulate bwd  B={B} N={N} D={D} G={G}", bwd, "kernel", 6 * nbytes, "GB/s")
    record_fused_ratios(results, f"residual_modulate ({B},{N},{D}) G={G}", fwd, bwd, variants, 1.0)


def record_fused_ratios(results, tag, fwd, bwd, variants, target):
    """The target lines of a fused op: the unfused sequence's and the reference's time over the
    kernel's (variants: kernel, unfused, reference, in that order), forward and backward."""
    unfused, reference = list(variants)[1:]
    for direction, times in (("fwd", fwd), ("bwd", bwd)):
        for label, name in (("unfused", unfused), ("reference", reference)):
            results.append((f"{tag} {direction}: vs {label}", times[name] / times["kernel"], target))


# ----------------------------------------------------------------------------------------- qk_norm_rope

def bench_qknorm(B, H, N, hd, interleaved, reps, results):
    from tests.oracle import unfused_qk_norm_rope  # the repository's tests folder: run from its root

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, N, hd, generator=g)
    weight = 1 + 0.1 * torch.randn(hd, generator=g)
    angle = torch.rand(N, hd // 2, generator=g) * 6
    cos, sin = angle.cos(), angle.sin()  # (N, hd/2), the op's tables
    rot = torch.polar(torch.ones_like(angle), angle) if interleaved else (torch.cat([cos, cos], -1),
                                                                          torch.cat([sin, sin], -1))
    variants = {
        "kernel": lambda x, w: kernels.qk_norm_rope(x, w, cos, sin, 1e-6, interleaved),
        "unfused (RMSNorm, then the rotation)": lambda x, w: unfused_qk_norm_rope(x, w, rot),
        "reference (PyTorch)": lambda x, w: kernels.reference_qk_norm_rope(x, w, cos, sin, 1e-6, interleaved),
    }
    layout = "interleaved" if interleaved else "half"
    fwd = timeit({name: (lambda fn=fn: fn(x, weight)) for name, fn in variants.items()}, reps, warmup=ADALN_WARMUP)
    nbytes = x.numel() * x.element_size()
    print_block(f"qk_norm_rope fwd  B={B} H={H} N={N} hd={hd} {layout}", fwd, "kernel", 2 * nbytes, "GB/s")

    inputs = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
    gy = torch.randn_like(x)
    bwd = timeit({name: grad_timer(fn(*inputs), inputs, gy) for name, fn in variants.items()}, reps,
                 warmup=ADALN_WARMUP)
    print_block(f"qk_norm_rope bwd  B={B} H={H} N={N} hd={hd} {layout}", bwd, "kernel", 3 * nbytes, "GB/s")
    record_fused_ratios(results, f"qk_norm_rope ({B},{H},{N},{hd}) {layout}", fwd, bwd, variants, 1.5)


# ----------------------------------------------------------------------------------------- attention

def naive_attention(q, k, v):
    return torch.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])), dim=-1) @ v


def bench_attention(B, H, Lq, Lk, hd, reps, results, targets: bool):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Lq, hd, generator=g)
    k = torch.randn(B, H, Lk, hd, generator=g)
    v = torch.randn(B, H, Lk, hd, generator=g)
    fwd = timeit({
        "kernel": lambda: kernels.attention(q, k, v),
        "reference (SDPA)": lambda: kernels.reference_attention(q, k, v),
        "naive matmul-softmax-matmul": lambda: naive_attention(q, k, v),
    }, reps)
    flops = 4.0 * B * H * Lq * Lk * hd
    print_block(f"attention fwd  B={B} H={H} Lq={Lq} Lk={Lk} hd={hd}", fwd, "kernel", flops, "GFLOP/s")

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)
    outs = {
        "kernel": kernels.attention(qs, ks, vs),
        "reference (SDPA)": kernels.reference_attention(qs, ks, vs),
        "naive matmul-softmax-matmul": naive_attention(qs, ks, vs),
    }
    bwd = timeit({n: grad_timer(o, (qs, ks, vs), go) for n, o in outs.items()}, reps)
    del outs
    print_block(f"attention bwd  B={B} H={H} Lq={Lq} Lk={Lk} hd={hd}", bwd, "kernel", 2.5 * flops, "GFLOP/s")
    if targets:
        tag = f"attention ({B},{H},{Lq},{Lk},{hd})"
        results.append((f"{tag} fwd: vs SDPA", fwd["reference (SDPA)"] / fwd["kernel"], 0.9))
        results.append((f"{tag} fwd: vs naive", fwd["naive matmul-softmax-matmul"] / fwd["kernel"], 3.0))
        results.append((f"{tag} bwd: vs SDPA backward", bwd["reference (SDPA)"] / bwd["kernel"], 0.8))


MEM_CHILD = textwrap.dedent("""
    import math, sys, torch, kernels
    from bench.ops import reset_peak_rss, peak_rss_growth_mib
    variant, B, H, L, hd = sys.argv[1], *map(int, sys.argv[2:6])
    fn = {"kernel": kernels.attention, "reference": kernels.reference_attention,
          "naive": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1) @ v}[variant]
    q, k, v = (torch.randn(B, H, L, hd, requires_grad=True) for _ in range(3))
    fn(q[:, :, :32], k[:, :, :32], v[:, :, :32]).sum().backward()
    q.grad = k.grad = v.grad = None
    base = reset_peak_rss()
    fn(q, k, v).sum().backward()
    print(peak_rss_growth_mib(base))
""")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Resets the kernel's peak-RSS mark of this process (Linux: `5` to /proc/self/clear_refs) and
    returns the current RSS in KiB. The peak left behind by `import torch` would otherwise hide a
    smaller computation."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def peak_rss_growth_mib(base_kib: int) -> float:
    """Peak RSS since reset_peak_rss() above the RSS at that point, MiB."""
    return (_status_kib("VmHWM") - base_kib) / 1024


def peak_memory_mib(variant, B, H, L, hd) -> float:
    out = subprocess.run([sys.executable, "-c", MEM_CHILD, variant, str(B), str(H), str(L), str(hd)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def bench_attention_memory(B, H, hd, lengths):
    print(row([f"attention fwd+bwd peak RSS growth, MiB (B={B} H={H} hd={hd})"] + [f"L={L}" for L in lengths],
              [58] + [10] * len(lengths)))
    io = [4 * B * H * L * hd * 4 / 2 ** 20 for L in lengths]
    print(row(["  outputs+grads themselves (o, dq, dk, dv)"] + [f"{m:.1f}" for m in io], [58] + [10] * len(lengths)))
    for variant in ("kernel", "reference", "naive"):
        mib = [peak_memory_mib(variant, B, H, L, hd) for L in lengths]
        print(row([f"  {variant}"] + [f"{m:.1f}" for m in mib], [58] + [10] * len(lengths)))


# ----------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="timed rounds per variant (median reported)")
    p.add_argument("--skip-memory", action="store_true", help="skip the child-process memory measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ops", choices=("all", "adaln", "residual", "qknorm", "attention"), default="all",
                   help="which ops to measure")
    args = p.parse_args(argv)
    if not kernels.available():
        sys.exit(f"kernels._C is not available ({kernels.load_error()}); {kernels.BUILD_HINT}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"hardware: {hardware()}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"dtype float32, median of {args.reps} interleaved rounds\n")
    results = []
    if args.ops in ("all", "adaln"):
        # G = 1: one modulation per sample (action DiT); G = 8, 6: one per frame (video DiT).
        for B, N, D, G in ((8, 1024, 512, 1), (8, 1024, 512, 8), (4, 1200, 384, 6)):
            bench_adaln(B, N, D, G, args.reps, results)
            print()
    if args.ops in ("all", "residual"):
        # the video DiT's per-frame modulation (G = T), the adaLN shapes above
        for B, N, D, G in ((8, 1024, 512, 8), (4, 1200, 384, 6)):
            bench_residual(B, N, D, G, args.reps, results)
            print()
    if args.ops in ("all", "qknorm"):
        # the toy video DiT's self-attention q or k (batch 32: 3 frames x 16 tokens, 4 heads of 24;
        # interleaved pairs), and a paper-like head (hd 128, rotate-half pairs as Cosmos)
        for B, H, N, hd, interleaved in ((32, 4, 48, 24, True), (32, 4, 48, 24, False), (2, 16, 1024, 128, False)):
            bench_qknorm(B, H, N, hd, interleaved, args.reps, results)
            print()
    if args.ops in ("all", "attention"):
        bench_attention(8, 8, 1024, 1024, 64, args.reps, results, targets=True)
        print()
        bench_attention(8, 8, 1024, 77, 64, args.reps, results, targets=False)   # video tokens -> text tokens
        print()
        bench_attention(8, 8, 64, 1024, 64, args.reps, results, targets=False)   # action tokens -> video tokens
        print()
    if args.ops in ("all", "attention") and not args.skip_memory:
        bench_attention_memory(1, 8, 64, [1024, 2048, 4096])
        print()
    print("targets (ratio = how many times faster the kernel is; 'clone/kernel' >= 0.8 means within 1.25x of a copy)")
    for name, ratio, target in results:
        print(row([f"  {name}", f"{ratio:.2f}", f">= {target}", "met" if ratio >= target else "MISSED"],
                  [66, 8, 8, 8]))


if __name__ == "__main__":
    main()
